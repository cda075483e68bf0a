"""PROTOCOL.md steps 1-6 on toy data, against a slow pure-Python reference, and the cache."""

import os

import numpy as np
import pytest

from onerec_jax.data import sequences
from onerec_jax.data.records import Interactions
from onerec_jax.data.sequences import SequenceOptions, build_sequences
from onerec_jax.errors import ConfigError


def _inter(rows, files=("toy",)):
    """rows: (user, item, rating, timestamp) in file order."""
    u, i, r, t = (np.asarray(c) for c in zip(*rows, strict=True))
    return Interactions(
        u.astype(np.int64), i.astype(np.int64), r.astype(np.float32), t.astype(np.int64), files
    )


def reference(rows, min_rating=None, min_user=5, min_item=0):
    """Slow, obvious implementation of PROTOCOL.md steps 1-5: {source user: [source items]}."""
    rows = [(k, *row) for k, row in enumerate(rows) if min_rating is None or row[2] >= min_rating]
    while True:
        users, items = {}, {}
        for _, u, i, _, _ in rows:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        kept = [r for r in rows if users[r[1]] >= min_user and items[r[2]] >= min_item]
        if len(kept) == len(rows):
            break
        rows = kept
    seqs = {}
    for _, u, i, _, _ in sorted(rows, key=lambda r: (r[1], r[4], r[0])):  # time, then file order
        seqs.setdefault(u, []).append(i)
    return seqs


def _as_source(data):
    return {
        int(data.user_ids[u]): [int(x) for x in data.item_ids[data.sequence(u)]]
        for u in range(data.n_users)
    }


def test_stable_order_on_equal_timestamps():
    # User 7 rated 30, 10, 20 at the same second, then 40 earlier: file order breaks the tie.
    rows = [(7, 30, 4, 100), (7, 10, 3, 100), (7, 20, 5, 100), (7, 40, 1, 50), (7, 50, 2, 100)]
    data = build_sequences(_inter(rows), SequenceOptions(min_user_interactions=3))
    assert _as_source(data) == {7: [40, 30, 10, 20, 50]}
    np.testing.assert_array_equal(data.timestamps, [50, 100, 100, 100, 100])
    np.testing.assert_array_equal(data.ratings, [1, 4, 3, 5, 2])


def test_leave_one_out_on_toy_set():
    rows = [
        (2, 11, 1, 3),
        (1, 12, 1, 1),
        (2, 13, 1, 1),
        (1, 11, 1, 2),
        (1, 14, 1, 3),
        (2, 12, 1, 2),
        (1, 13, 1, 4),
        (2, 14, 1, 4),
        (2, 15, 1, 5),
    ]
    data = build_sequences(_inter(rows), SequenceOptions(min_user_interactions=3))
    # Dense ids follow ascending source ids; item 0 is padding.
    np.testing.assert_array_equal(data.user_ids, [1, 2])
    np.testing.assert_array_equal(data.item_ids[1:], [11, 12, 13, 14, 15])
    np.testing.assert_array_equal(data.offsets, [0, 4, 9])
    # user 1: 12, 11, 14, 13 -> dense 2, 1, 4, 3; user 2: 13, 12, 11, 14, 15 -> 3, 2, 1, 4, 5
    np.testing.assert_array_equal(data.items, [2, 1, 4, 3, 3, 2, 1, 4, 5])
    train, valid, test = data.train, data.valid, data.test
    hist = [list(data.items[s:e]) for s, e in zip(train.starts, train.ends, strict=True)]
    assert hist == [[2, 1], [3, 2, 1]]
    np.testing.assert_array_equal(valid.targets, [4, 4])
    assert [list(data.items[s:e]) for s, e in zip(valid.starts, valid.ends, strict=True)] == hist
    np.testing.assert_array_equal(test.targets, [3, 5])
    test_hist = [list(data.items[s:e]) for s, e in zip(test.starts, test.ends, strict=True)]
    assert test_hist == [[2, 1, 4], [3, 2, 1, 4]]
    assert data.n_items == 5 and data.n_users == 2 and data.n_interactions == 9


def test_kcore_iterates_until_stable():
    # min 3 per user and 2 per item. Item 99 is rated once -> dropped; then user 3 has only 2
    # ratings -> dropped; then item 50 (rated by users 3 and 1) has 1 -> dropped; then user 1
    # has 2 -> dropped. Only users 2 and 4 survive, which one pass would not find.
    rows = [
        (1, 10, 1, 1),
        (1, 20, 1, 2),
        (1, 50, 1, 3),
        (3, 50, 1, 1),
        (3, 99, 1, 2),
        (3, 10, 1, 3),
        (2, 10, 1, 1),
        (2, 20, 1, 2),
        (2, 30, 1, 3),
        (4, 10, 1, 1),
        (4, 20, 1, 2),
        (4, 30, 1, 3),
    ]
    opts = SequenceOptions(min_user_interactions=3, min_item_interactions=2)
    data = build_sequences(_inter(rows), opts)
    assert _as_source(data) == {2: [10, 20, 30], 4: [10, 20, 30]}
    assert _as_source(data) == reference(rows, min_user=3, min_item=2)


def test_min_rating_threshold():
    rows = [(1, i, r, i) for i, r in zip(range(10, 16), [5, 2, 4, 3.5, 1, 4], strict=True)]
    data = build_sequences(_inter(rows), SequenceOptions(min_rating=3.5, min_user_interactions=3))
    assert _as_source(data) == {1: [10, 12, 13, 15]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_slow_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    rows = list(
        zip(
            rng.integers(0, 120, n) * 7,
            rng.integers(1, 400, n) * 3,
            rng.integers(1, 11, n) / 2,
            rng.integers(0, 40, n),
            strict=True,
        )
    )
    opts = SequenceOptions(min_rating=2.0, min_user_interactions=8, min_item_interactions=3)
    data = build_sequences(_inter(rows), opts)
    ref = reference(rows, 2.0, 8, 3)
    assert _as_source(data) == ref
    assert data.n_items == len({i for s in ref.values() for i in s})


def test_string_ids_map_back():
    inter = Interactions(
        np.array([1, 0, 1, 1, 0, 0]),
        np.array([2, 0, 1, 0, 1, 2]),
        np.ones(6, np.float32),
        np.array([1, 1, 2, 3, 2, 3]),
        ("x",),
        np.array(["bob", "al"]),
        np.array(["c", "a", "b"]),
    )
    data = build_sequences(inter, SequenceOptions(min_user_interactions=3))
    assert list(data.user_ids) == ["al", "bob"]  # dense users in ascending source order
    assert list(data.item_ids) == ["", "a", "b", "c"]
    assert list(data.item_ids[data.sequence(0)]) == ["b", "a", "c"]  # al: rows 0, 2, 3
    assert list(data.item_ids[data.sequence(1)]) == ["c", "a", "b"]  # bob: rows 1, 4, 5


def test_options_are_validated():
    with pytest.raises(ConfigError, match="at least 3 interactions"):
        SequenceOptions(min_user_interactions=2)


def test_stats_table():
    rows = [(u, 10 + k, 1, k) for u, n in [(1, 3), (2, 5), (3, 4)] for k in range(n)]
    data = build_sequences(_inter(rows), SequenceOptions(min_user_interactions=3))
    s = data.stats()
    assert (s["users"], s["items"], s["interactions"]) == (3, 5, 12)
    assert s["density"] == pytest.approx(12 / 15)
    assert (s["length_p0"], s["length_p50"], s["length_p100"], s["length_mean"]) == (3, 4, 5, 4)
    assert "interactions" in sequences.format_stats(s)


# ----------------------------------------------------------------------------- the cache


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "ratings.bin"
    path.write_bytes(b"v1")
    rows = [(u, 10 + (k * u) % 7, 1, k) for u in range(1, 6) for k in range(6)]
    calls = []

    def read():
        calls.append(1)
        return _inter(rows, (str(path),))

    return path, read, calls


def test_cache_hit_invalidation_and_corruption(tmp_path, source, caplog):
    path, read, calls = source
    opts, cache = SequenceOptions(min_user_interactions=3), tmp_path / "cache"
    first = sequences.load_or_build(read, (str(path),), opts, cache)
    second = sequences.load_or_build(read, (str(path),), opts, cache)
    assert len(calls) == 1  # hit: not rebuilt
    for name in ("offsets", "items", "timestamps", "ratings", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert second.options == first.options
    # A changed option is another key: rebuilt, and the old file stays valid.
    sequences.load_or_build(read, (str(path),), SequenceOptions(min_user_interactions=4), cache)
    assert len(calls) == 2 and len(list(cache.glob("*.npz"))) == 2
    # A changed source file (size/mtime) is another key.
    path.write_bytes(b"v2-longer")
    sequences.load_or_build(read, (str(path),), opts, cache)
    assert len(calls) == 3
    # A corrupt cache file is rebuilt with a warning.
    key = sequences.cache_key((str(path),), opts)
    cached = cache / f"sequences-{key}.npz"
    blob = cached.read_bytes()
    cached.write_bytes(blob[: len(blob) // 2])
    rebuilt = sequences.load_or_build(read, (str(path),), opts, cache)
    assert len(calls) == 4 and "corrupt" in caplog.text
    np.testing.assert_array_equal(rebuilt.items, first.items)
    assert sequences.load_sequences(cached, key).n_interactions == first.n_interactions
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]


def test_cache_with_flipped_bytes_is_rebuilt(tmp_path, source):
    path, read, calls = source
    opts, cache = SequenceOptions(min_user_interactions=3), tmp_path / "cache"
    sequences.load_or_build(read, (str(path),), opts, cache)
    cached = next(cache.glob("*.npz"))
    blob = bytearray(cached.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # inside an array's data: the zip CRC catches it
    cached.write_bytes(bytes(blob))
    sequences.load_or_build(read, (str(path),), opts, cache)
    assert len(calls) == 2
