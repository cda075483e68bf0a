"""Per-item arrays on a hand-made dataset."""

import numpy as np

from onerec_jax.data import item_arrays
from onerec_jax.data.records import ItemInfo
from onerec_jax.data.sequences import SequenceData


def _data():
    # user 0: [1, 2, 3, 4]; user 1: [2, 4, 3]
    return SequenceData(
        offsets=np.array([0, 4, 7]),
        items=np.array([1, 2, 3, 4, 2, 4, 3], np.int32),
        timestamps=np.arange(7),
        ratings=np.ones(7, np.float32),
        user_ids=np.array([10, 20]),
        item_ids=np.array([-1, 100, 200, 300, 400]),
        options={},
    )


def test_train_counts_exclude_valid_and_test_targets():
    # training prefixes: user 0 -> [1, 2], user 1 -> [2]
    np.testing.assert_array_equal(item_arrays.train_counts(_data()), [0, 1, 2, 0, 0])


def test_genres_and_years_follow_dense_ids():
    items = ItemInfo(
        item_ids=np.array([400, 100, 300]),
        titles=["d", "a", "c"],
        years=np.array([1999, 0, 1880], np.int32),
        genres=[("Drama",), ("Action", "Drama"), ()],
        tags=[{}, {}, {}],
    )
    genres, names = item_arrays.genre_multi_hot(_data(), items)
    assert names == ("Action", "Drama")
    np.testing.assert_array_equal(genres, [[0, 0], [1, 1], [0, 0], [0, 0], [0, 1]])
    # 1999 -> 1 + 119 // 5 = 24; item 200 has no info; 1880 -> 1; year 0 -> unknown.
    np.testing.assert_array_equal(item_arrays.year_buckets(_data(), items), [0, 0, 0, 1, 24])
