"""Tests for onerec_jax.data.pipeline: windows, batching, per-process slicing, resume, eval."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onerec_jax.data.pipeline import eval_dataset, train_dataset
from onerec_jax.data.sequences import SequenceData
from onerec_jax.data.training_examples import training_windows

F, T = False, True


def make_data(sequences: list[list[int]]) -> SequenceData:
    lengths = [len(s) for s in sequences]
    n = sum(lengths)
    items = np.array([i for s in sequences for i in s], np.int32)
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items,
        timestamps=np.arange(n, dtype=np.int64),
        ratings=np.ones(n, np.float32),
        user_ids=np.arange(100, 100 + len(sequences)),
        item_ids=np.arange(int(items.max()) + 1),
        options={},
    )


# user 0: training history 1..10; user 1: training history [5] (no pairs); user 2: [7, 2, 9].
HAND = make_data([list(range(1, 13)), [5, 3, 8], [7, 2, 9, 4, 6]])


def random_data(seed: int, n_users: int = 40, max_items: int = 40) -> SequenceData:
    """Random lengths 3..max_items; every interaction has its own item id, so windows are unique."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_items + 1, n_users)
    ids = rng.permutation(np.arange(1, lengths.sum() + 1))
    return make_data(np.split(ids, np.cumsum(lengths)[:-1]))


def reference_windows(data: SequenceData, max_len: int, stride: int) -> list[tuple]:
    """The windows as the spec words them, in plain Python: (user, inputs, targets, mask)."""
    out = []
    for u in range(data.n_users):
        h = [int(x) for x in data.sequence(u)[:-2]]
        n, k = len(h), 0
        while n - 1 - k * stride > 0:
            b = n - 1 - k * stride
            a = max(0, b - max_len)
            pad = max_len - (b - a)
            out.append(
                (
                    u,
                    (0,) * pad + tuple(h[a:b]),
                    (0,) * pad + tuple(h[a + 1 : b + 1]),
                    (F,) * pad + (T,) * (b - a),
                )
            )
            if a == 0:
                break
            k += 1
    return out


def rows(batch: dict) -> list[tuple]:
    """One hashable (user, inputs, targets, mask) per batch row, real tokens right-aligned."""
    return [
        (int(u), tuple(i.tolist()), tuple(t.tolist()), tuple(m.tolist()))
        for u, i, t, m in zip(
            batch["user"], batch["inputs"], batch["targets"], batch["mask"], strict=True
        )
    ]


def key(row: tuple) -> tuple:
    """A row without its padding, so rows of different widths compare."""
    user, inputs, targets, mask = row
    real = [i for i, m in enumerate(mask) if m]
    return user, tuple(inputs[i] for i in real), tuple(targets[i] for i in real)


def take(ds, n: int) -> list[dict]:
    return list(itertools.islice(iter(ds), n))


def train(data: SequenceData, **kw) -> list[dict]:
    """All batches of a finite training run on one process."""
    kw = {"seed": 0, "process_index": 0, "process_count": 1, **kw}
    return list(train_dataset(data, **kw))


def test_windows_stride_equal_max_len():
    batches = train(HAND, max_len=4, batch_size=1, num_epochs=1, shuffle=False)
    got = [r for b in batches for r in rows(b)]
    assert got == [
        (0, (6, 7, 8, 9), (7, 8, 9, 10), (T, T, T, T)),
        (0, (2, 3, 4, 5), (3, 4, 5, 6), (T, T, T, T)),
        (0, (0, 0, 0, 1), (0, 0, 0, 2), (F, F, F, T)),
        (2, (0, 0, 7, 2), (0, 0, 2, 9), (F, F, T, T)),  # user 1 (one training item): nothing
    ]
    b = batches[0]
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (1, 4)
    assert (b["inputs"].dtype, b["targets"].dtype, b["user"].dtype) == (np.int32,) * 3
    assert b["mask"].dtype == np.bool_ and b["user"].shape == (1,)


def test_windows_stride_less_than_max_len():
    batches = train(HAND, max_len=4, stride=2, batch_size=1, num_epochs=1, shuffle=False)
    assert [r for b in batches for r in rows(b)] == [
        (0, (6, 7, 8, 9), (7, 8, 9, 10), (T, T, T, T)),
        (0, (4, 5, 6, 7), (5, 6, 7, 8), (T, T, T, T)),
        (0, (2, 3, 4, 5), (3, 4, 5, 6), (T, T, T, T)),
        (0, (0, 1, 2, 3), (0, 2, 3, 4), (F, T, T, T)),
        (2, (0, 0, 7, 2), (0, 0, 2, 9), (F, F, T, T)),
    ]


def test_latest_window_only_is_the_last_max_len_plus_one_items():
    # As the public SASRec+ code: one example per user, its last max_len + 1 training items.
    batches = train(HAND, max_len=4, latest_only=True, batch_size=1, num_epochs=1, shuffle=False)
    assert [r for b in batches for r in rows(b)] == [
        (0, (6, 7, 8, 9), (7, 8, 9, 10), (T, T, T, T)),
        (2, (0, 0, 7, 2), (0, 0, 2, 9), (F, F, T, T)),
    ]


def test_one_item_history_yields_nothing():
    data = make_data([[4, 5, 6], [1, 2, 3, 7]])  # training histories [4] and [1, 2]
    w = training_windows(data, max_len=3)
    np.testing.assert_array_equal(w.user, [1])
    np.testing.assert_array_equal(w.length, [1])


@pytest.mark.parametrize("max_len,stride", [(1, 1), (3, 1), (5, 2), (5, 5), (8, 3), (50, 7)])
def test_windows_match_slow_reference(max_len, stride):
    data = random_data(seed=max_len * 10 + stride)
    want = reference_windows(data, max_len, stride)
    assert len(training_windows(data, max_len=max_len, stride=stride)) == len(want)
    kw = {"max_len": max_len, "stride": stride, "batch_size": 1, "num_epochs": 1}
    assert [r for b in train(data, shuffle=False, **kw) for r in rows(b)] == want


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="multiple of the process count"):
        train_dataset(HAND, max_len=4, batch_size=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="stride"):
        training_windows(HAND, max_len=4, stride=5)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_dataset(HAND, max_len=4, batch_size=8, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="strictly increasing"):
        train(HAND, max_len=4, batch_size=1, bucket_boundaries=(3, 2))


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
def test_shuffle_is_deterministic_by_seed(buckets):
    data = random_data(seed=1)
    kw = {"max_len": 8, "batch_size": 4, "num_epochs": 1, "bucket_boundaries": buckets}
    a, b, c = train(data, **kw), train(data, **kw), train(data, seed=1, **kw)
    assert [rows(x) for x in a] == [rows(x) for x in b]
    assert [rows(x) for x in a] != [rows(x) for x in c]


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
def test_each_epoch_visits_every_window_once(buckets):
    data = random_data(seed=2)
    want = {key(r) for r in reference_windows(data, 8, 8)}
    n, batch = len(want), 16
    got = [
        key(r)
        for b in train(data, max_len=8, batch_size=batch, num_epochs=2, bucket_boundaries=buckets)
        for r in rows(b)
    ]
    # Batches never span epochs; each epoch drops < batch windows, and is shuffled anew.
    per_epoch = n // batch * batch
    assert n % batch  # so that the remainder rule is exercised
    assert len(got) == 2 * per_epoch
    for epoch in (got[:per_epoch], got[per_epoch:]):
        assert len(set(epoch)) == per_epoch and set(epoch) <= want
    assert got[:per_epoch] != got[per_epoch:]


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
@pytest.mark.parametrize("num_epochs", [None, 3])
def test_process_union_equals_single_process_batch(buckets, num_epochs):
    data = random_data(seed=3, n_users=80)
    kw = {"max_len": 8, "batch_size": 8, "seed": 5, "num_epochs": num_epochs}
    kw["bucket_boundaries"] = buckets
    one = take(train_dataset(data, process_index=0, process_count=1, **kw), 40)
    p0 = take(train_dataset(data, process_index=0, process_count=2, **kw), 40)
    p1 = take(train_dataset(data, process_index=1, process_count=2, **kw), 40)
    assert len(one) == len(p0) == len(p1) == 40
    for g in range(40):
        assert p0[g]["inputs"].shape == p1[g]["inputs"].shape == (4, one[g]["inputs"].shape[1])
        assert sorted(rows(p0[g]) + rows(p1[g])) == sorted(rows(one[g]))


def test_finite_epochs_give_every_process_the_same_batch_count():
    # 15 one-window users; a plain [p::2] slice would give 8 and 7 windows: 2 and 1 batches of 4.
    data = make_data([[4 * u + 1, 4 * u + 2, 4 * u + 3, 4 * u + 4] for u in range(15)])
    kw = {"max_len": 3, "batch_size": 8, "seed": 0, "num_epochs": 1}
    per_process = [
        list(train_dataset(data, process_index=p, process_count=2, **kw)) for p in (0, 1)
    ]
    assert [len(batches) for batches in per_process] == [1, 1]
    one = list(train_dataset(data, process_index=0, process_count=1, **kw))
    assert sorted(rows(per_process[0][0]) + rows(per_process[1][0])) == sorted(rows(one[0]))


@pytest.mark.parametrize("buckets", [None, (2, 4, 8)])
def test_iterator_state_resumes_exactly(buckets):
    data = random_data(seed=5)
    ds = train_dataset(
        data,
        max_len=8,
        batch_size=8,
        seed=0,
        bucket_boundaries=buckets,
        process_index=0,
        process_count=1,
    )
    it = iter(ds)
    for _ in range(23):  # past the end of the first epoch
        next(it)
    state = it.get_state()
    want = [rows(next(it)) for _ in range(10)]
    resumed = iter(ds)
    resumed.set_state(state)
    assert [rows(next(resumed)) for _ in range(10)] == want


def test_buckets_fit_rows_and_save_padding():
    data = random_data(seed=6, n_users=200, max_items=60)
    windows = {key(r) for r in reference_windows(data, 32, 32)}
    batches = train(data, max_len=32, batch_size=8, num_epochs=1, bucket_boundaries=(4, 8, 16, 64))
    widths = [b["inputs"].shape[1] for b in batches]
    assert set(widths) == {4, 8, 16, 32}  # boundaries >= max_len collapse into max_len
    for b in batches:
        mask = b["mask"]
        assert mask[:, -1].all()  # every row ends with a real target: left padding
        assert (np.diff(mask.astype(int), axis=1) >= 0).all()  # padding only on the left
        assert (b["inputs"][~mask] == 0).all() and (b["targets"][~mask] == 0).all()
    got = [key(r) for b in batches for r in rows(b)]
    assert len(got) == len(windows) // 8 * 8 and len(set(got)) == len(got)
    assert set(got) <= windows
    for b, width in zip(batches, widths, strict=True):  # a full batch always holds a member of
        longest = b["mask"].sum(axis=1).max()  # its own bucket (carried windows are < batch_size)
        assert width == min(w for w in (4, 8, 16, 32) if w >= longest)
    assert sum(widths) * 8 < len(got) * 32  # fewer tokens than padding to max_len


def test_eval_batches_exact():
    for split, inputs, targets in [
        ("valid", [[7, 8, 9, 10], [0, 0, 0, 5], [0, 7, 2, 9]], [11, 3, 4]),
        ("test", [[8, 9, 10, 11], [0, 0, 5, 3], [7, 2, 9, 4]], [12, 8, 6]),
    ]:
        batches = list(eval_dataset(HAND, split, max_len=4, batch_size=2))
        assert len(batches) == 2
        b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
        np.testing.assert_array_equal(b["inputs"], inputs + [[0, 0, 0, 0]])
        np.testing.assert_array_equal(b["target"], targets + [0])
        np.testing.assert_array_equal(b["user"], [0, 1, 2, 0])
        np.testing.assert_array_equal(b["weight"], [1, 1, 1, 0])
        assert b["inputs"].dtype == b["target"].dtype == b["user"].dtype == np.int32
        assert b["weight"].dtype == np.float32


def test_eval_every_user_once_across_processes():
    data = random_data(seed=7, n_users=21)
    want_targets = data.test.targets
    seen = []
    counts = []
    for p in range(2):
        batches = list(
            eval_dataset(data, "test", max_len=6, batch_size=8, process_index=p, process_count=2)
        )
        counts.append(len(batches))
        for b in batches:
            assert b["inputs"].shape == (4, 6) and b["weight"].shape == (4,)
            real = b["weight"] == 1
            assert (b["weight"][~real] == 0).all() and (b["target"][~real] == 0).all()
            np.testing.assert_array_equal(b["target"][real], want_targets[b["user"][real]])
            seen.extend(b["user"][real].tolist())
    assert counts == [3, 3]
    assert sorted(seen) == list(range(21))


def test_eval_by_length_visits_every_user_once_shortest_first():
    data = random_data(seed=9, n_users=21)
    lengths = data.test.lengths
    users, targets = [], []
    for b in eval_dataset(data, "test", max_len=6, batch_size=8, by_length=True):
        real = b["weight"] == 1
        users.extend(b["user"][real].tolist())
        targets.extend(b["target"][real].tolist())
    assert sorted(users) == list(range(21))
    assert list(lengths[users]) == sorted(lengths)  # non-decreasing history length
    np.testing.assert_array_equal(targets, data.test.targets[users])


def test_worker_processes_give_the_same_batches():
    data = random_data(seed=8)
    kw = {"max_len": 8, "batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1}
    want = [rows(b) for b in take(train_dataset(data, **kw), 12)]
    it = iter(train_dataset(data, worker_count=2, **kw))
    try:
        assert [rows(next(it)) for _ in range(12)] == want
    finally:
        it.close()
