"""Grain input pipelines over `SequenceData`: training batches of examples and padded eval batches.

Training examples (next-item windows, per-target examples) and the rows they gather are
data/training_examples.py; here they are shuffled per epoch, bucketed by length and batched.
Every pipeline cuts GLOBAL batches first and gives process `p` its share of each, so the union of
the processes' g-th batches does not depend on the process count, and every process yields the
same number of batches (no hangs in collectives).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from onerec_jax.data.sequences import SequenceData
from onerec_jax.data.training_examples import (
    TargetExamples,
    Windows,
    left_padded,
    power_of_two_width,
    target_examples,
    target_rows,
    training_windows,
    window_code_rows,
    window_rows,
)
from onerec_jax.errors import ConfigError


def _bucket_widths(boundaries: Sequence[int], max_len: int) -> np.ndarray:
    """Sorted pad widths: the boundaries below max_len, then max_len for all longer windows."""
    widths = [int(w) for w in boundaries]
    if not widths or min(widths) < 1 or np.any(np.diff(widths) <= 0):
        raise ConfigError(
            f"bucket_boundaries must be positive and strictly increasing, got {boundaries}"
        )
    return np.array([w for w in widths if w < max_len] + [max_len], np.int64)


class _BucketBatches:
    """Global batches of windows from one length bucket each; epoch plans depend on (seed, epoch).

    Per epoch each bucket's windows are shuffled and cut into global batches; a bucket's leftover
    (< batch_size windows) joins the next wider bucket, so only the widest bucket drops a
    remainder, as plain `drop_remainder` would. Batch order is then shuffled across buckets.
    Used with `map_with_index` over `range(batches_per_epoch).repeat(...)`: index -> batch.
    """

    def __init__(
        self,
        items: np.ndarray,
        windows: Windows,
        widths: np.ndarray,
        *,
        batch_size: int,
        rows: slice,
        seed: int,
        shuffle: bool,
        rows_fn: Callable[..., dict[str, np.ndarray]],
    ):
        self._items, self._windows, self._widths = items, windows, widths
        self._rows_fn = rows_fn  # (items, windows, ids, width) -> batch dict
        self._batch_size, self._rows, self._seed, self._shuffle = batch_size, rows, seed, shuffle
        bucket = np.searchsorted(widths, windows.length)  # [n_windows] first width >= length
        self._members = [np.flatnonzero(bucket == k) for k in range(len(widths))]
        self.batches_per_epoch = len(windows) // batch_size
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """([batches, batch_size] window ids, [batches] bucket index) for one epoch."""
        rng = np.random.default_rng([self._seed, epoch])
        carry = np.zeros(0, np.int64)
        batches, buckets = [], []
        for k, members in enumerate(self._members):
            pool = np.concatenate([carry, members])
            if self._shuffle:
                pool = rng.permutation(pool)
            full = len(pool) // self._batch_size * self._batch_size
            batches.append(pool[:full].reshape(-1, self._batch_size))
            buckets.append(np.full(full // self._batch_size, k))
            carry = pool[full:]
        batch_ids, bucket_ids = np.concatenate(batches), np.concatenate(buckets)
        order = rng.permutation(len(batch_ids)) if self._shuffle else np.arange(len(batch_ids))
        return batch_ids[order], bucket_ids[order]

    def __call__(self, index: int, _: int) -> dict[str, np.ndarray]:
        epoch, g = divmod(index, self.batches_per_epoch)
        plan = self._plans.get(epoch)
        if plan is None:  # threads may race here; both compute the same plan
            plan = self._plan(epoch)
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1} | {epoch: plan}
        batch_ids, bucket_ids = plan
        width = int(self._widths[bucket_ids[g]])
        return self._rows_fn(self._items, self._windows, batch_ids[g, self._rows], width)


def _process_share(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process index, process count, per-process batch size) for a GLOBAL batch size."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ConfigError(f"process_index must be in 0..{count - 1}, got {index}")
    if batch_size < 1 or batch_size % count:
        raise ConfigError(
            f"batch_size={batch_size} is the global batch size and must be a positive multiple "
            f"of the process count ({count}); pick e.g. {count * max(1, batch_size // count)}"
        )
    return index, count, batch_size // count


def _training_dataset(
    items: np.ndarray,
    make_examples: Callable[[], tuple[Windows | TargetExamples, Callable[..., dict]]],
    *,
    noun: str,
    max_len: int,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    shuffle: bool,
    bucket_boundaries: Sequence[int] | None,
    process_index: int | None,
    process_count: int | None,
    worker_count: int,
) -> grain.IterDataset:
    """What every training pipeline shares: the seed and batch size checked, then this process's
    rows of global batches of the examples `make_examples()` gives (anything with `.length` and
    `len`) with the function gathering their rows."""
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    p, _, local = _process_share(batch_size, process_index, process_count)
    examples, rows_fn = make_examples()
    if len(examples) < batch_size:
        raise ConfigError(
            f"only {len(examples)} training {noun}, fewer than one batch of {batch_size}: "
            "lower batch_size"
        )
    # Whole global batches are gathered at once with vectorised numpy (~20x the throughput of
    # Grain's per-example shuffle + batch, measured in benchmarks/input_pipeline.py); without
    # buckets there is one bucket, max_len wide.
    widths = (
        np.array([max_len])
        if bucket_boundaries is None
        else _bucket_widths(bucket_boundaries, max_len)
    )
    batches = _BucketBatches(
        items,
        examples,
        widths,
        batch_size=batch_size,
        rows=slice(p * local, (p + 1) * local),
        seed=seed,
        shuffle=shuffle,
        rows_fn=rows_fn,
    )
    ds = grain.MapDataset.range(batches.batches_per_epoch).repeat(num_epochs)
    ds = ds.map_with_index(batches)
    out = ds.to_iter_dataset()
    if worker_count > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out


def train_dataset(
    data: SequenceData,
    *,
    max_len: int,
    batch_size: int,
    seed: int,
    stride: int | None = None,
    latest_only: bool = False,
    num_epochs: int | None = None,
    shuffle: bool = True,
    bucket_boundaries: Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    with_ratings: bool = False,
) -> grain.IterDataset:
    """This process's training batches (`batch_size` is global), `num_epochs=None` = forever.

    Windows as `training_windows(data, max_len, stride, latest_only)`.

    Each batch: `inputs`, `targets` [b, W] int32, `mask` [b, W] bool (True on real targets),
    `user` [b] int32 (`with_ratings`: `target_ratings` [b, W] float32, each target's rating),
    with b = batch_size // process_count and W = max_len, or the width of the
    batch's bucket when `bucket_boundaries` is given (e.g. (16, 32, 64, 128, 200)). Each epoch
    is a fresh shuffle cut into whole global batches (the < batch_size remainder is dropped).
    """

    def windows():
        rows = functools.partial(window_rows, ratings=data.ratings) if with_ratings else window_rows
        return (
            training_windows(data, max_len=max_len, stride=stride, latest_only=latest_only),
            rows,
        )

    return _training_dataset(
        data.items,
        windows,
        noun="windows",
        max_len=max_len,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        shuffle=shuffle,
        bucket_boundaries=bucket_boundaries,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
    )


def generative_train_dataset(
    data: SequenceData,
    codes: np.ndarray,
    *,
    max_len: int,
    batch_size: int,
    seed: int,
    session_items: int = 1,
    per_target: bool = False,
    stride: int | None = None,
    latest_only: bool = False,
    num_epochs: int | None = None,
    shuffle: bool = True,
    bucket_boundaries: Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
    """This process's generative training batches (`batch_size` is global; None epochs = forever).

    `codes` [n_items + 1, L + 1] are the items' semantic ids (`SemanticIds.codes`). Two layouts:
      - windows (default, for a causal encoder): the next-item windows of `train_dataset`;
        every input slot is a target position, P = W;
      - `per_target=True` (TIGER's bidirectional encoder): one example per training target,
        its history before it, P = 1 (`target_examples`).
    Each batch: `inputs` [b, W] int32 histories (left-padded), `user` [b] int32, and per target
    position the next M = `session_items` items, cut at the end of the training history:
    `targets` [b, P, M] int32, `target_codes` [b, P, M, L+1] int32, `mask` [b, P, M] bool.
    W = max_len or the bucket's width. Batches are cut globally and sliced per process, as
    `train_dataset`.
    """
    if session_items < 1:
        raise ConfigError(f"session_items={session_items}: use >= 1 (1 = next item).")

    def examples():
        semantic_ids = np.asarray(codes)
        if semantic_ids.ndim != 2 or semantic_ids.shape[0] != data.n_items + 1:
            raise ConfigError(
                f"semantic ids have shape {semantic_ids.shape}, expected "
                f"[{data.n_items + 1}, L + 1]: they were made for another dataset; rerun "
                "--mode tokenize on this one."
            )
        semantic_ids = np.maximum(semantic_ids, 0)
        if per_target:
            return (
                target_examples(data, max_len=max_len, session_items=session_items),
                functools.partial(target_rows, codes=semantic_ids, session_items=session_items),
            )
        return (
            training_windows(data, max_len=max_len, stride=stride, latest_only=latest_only),
            functools.partial(
                window_code_rows,
                codes=semantic_ids,
                session_items=session_items,
                train_end=data.train.ends,
            ),
        )

    return _training_dataset(
        data.items,
        examples,
        noun="examples",
        max_len=max_len,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        shuffle=shuffle,
        bucket_boundaries=bucket_boundaries,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
    )


class _EvalBatches:
    """Global eval batch g, rows of this process; rows past the last user are weight-0 padding."""

    def __init__(
        self,
        data: SequenceData,
        split_name: str,
        *,
        max_len: int,
        batch_size: int,
        rows: slice,
        order: np.ndarray,
        narrow: bool = False,
    ):
        split = data.split(split_name)
        self._order = order  # [n_users] global row -> dense user
        self._items, self._targets = data.items, split.targets
        self._length = np.clip(split.lengths, 0, max_len)  # [n_users]
        self._lo = split.ends - self._length  # [n_users]
        self._n_users, self._max_len, self._batch_size = len(order), max_len, batch_size
        self._rows = np.arange(batch_size)[rows]  # [b] row positions inside a global batch
        self._narrow = narrow

    def width(self, g: int) -> int:
        """Global batch g's input width: max_len, or (narrow) the next power of two >= its
        longest input, at most max_len; the same on every process (it reads the global batch)."""
        if not self._narrow:
            return self._max_len
        users = self._order[g * self._batch_size : (g + 1) * self._batch_size]
        longest = int(self._length[users].max()) if len(users) else 0
        return min(self._max_len, power_of_two_width(longest))

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        row = g * self._batch_size + self._rows  # [b] global row = dense user id if real
        real = row < self._n_users
        user = np.where(real, self._order[np.minimum(row, self._n_users - 1)], 0)
        length = np.where(real, self._length[user], 0)
        inputs, _ = left_padded(self._items, self._lo[user], length, self.width(g))
        return {
            "inputs": inputs,  # [b, W] int32, the last <= max_len history items, left-padded
            "target": np.where(real, self._targets[user], 0).astype(np.int32),  # [b]
            "user": user.astype(np.int32),  # [b]; 0 on padding rows
            "weight": real.astype(np.float32),  # [b]; 1 for real users, 0 for padding
        }


def eval_dataset(
    data: SequenceData,
    split_name: str,
    *,
    max_len: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    by_length: bool = False,
    users: np.ndarray | None = None,
    narrow: bool = False,
) -> grain.IterDataset:
    """Users in order, each exactly once, in ceil(n_users / batch_size) batches on every process.

    `by_length=True` visits users by increasing history length instead (`eval_user_order`), so
    a batch's users have similar histories and history masks need little padding. `users`:
    evaluate only these dense user ids (e.g. a validation sample), in the same orders.
    `narrow=True`: each batch's inputs are as wide as its longest (power of two, <= max_len)
    instead of max_len: left padding that encoders skip (with `by_length`, most batches are
    much narrower than max_len); a jitted encoder then compiles once per width.

    Global batch g holds users g*batch_size ... ; process p gets its rows
    [p*b:(p+1)*b] (b = batch_size // process_count). The last batch is padded with weight-0 rows.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    p, _, local = _process_share(batch_size, process_index, process_count)
    rows = slice(p * local, (p + 1) * local)
    order = eval_user_order(data, split_name, by_length, users)
    batches = _EvalBatches(
        data,
        split_name,
        max_len=max_len,
        batch_size=batch_size,
        rows=rows,
        order=order,
        narrow=narrow,
    )
    n_batches = -(-len(order) // batch_size)
    read = grain.ReadOptions(prefetch_buffer_size=16)  # eval batches are large; keep few ahead
    return grain.MapDataset.range(n_batches).map(batches).to_iter_dataset(read)


def eval_user_order(
    data: SequenceData, split_name: str, by_length: bool, users: np.ndarray | None = None
) -> np.ndarray:
    """[n] the order eval batches visit users (all, or `users`): by id, or by history length
    (stable)."""
    users = np.arange(data.n_users) if users is None else np.unique(np.asarray(users, np.int64))
    if by_length:
        return users[np.argsort(data.split(split_name).lengths[users], kind="stable")]
    return users


def sample_users(n_users: int, size: int, seed: int = 0) -> np.ndarray | None:
    """A fixed random sample of `size` dense user ids (sorted), or None (all) if size is 0 or
    not below n_users: the validation sample of `eval.valid_users`."""
    if size <= 0 or size >= n_users:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_users, size, replace=False))
