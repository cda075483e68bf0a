"""Grain input pipelines over `SequenceData`: next-item training windows and padded eval batches.

Training examples are windows of a user's training history: inputs `h[a:b]`, targets
`h[a+1:b+1]`, left-padded with item 0. Generative models (models/tiger.py, the OneRec
semantic-id decoder) read the same windows with the next M items' semantic-id codes at every
slot, or one example per target position (`generative_train_dataset`).

Window indices are computed once with numpy; examples are
gathered lazily from the CSR arrays. Every pipeline cuts GLOBAL batches first and gives process
`p` its share of each, so the union of the processes' g-th batches does not depend on the process
count, and every process yields the same number of batches (no hangs in collectives).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import jax
import numpy as np

from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Windows:
    """Training windows: window `w` has inputs `items[lo:lo+n]`, targets `items[lo+1:lo+n+1]`."""

    user: np.ndarray  # [n_windows] int32 dense user id
    lo: np.ndarray  # [n_windows] int64 index into SequenceData.items of the first input
    length: np.ndarray  # [n_windows] int64 number of (input, target) pairs, 1..max_len

    def __len__(self) -> int:
        return len(self.user)


def training_windows(
    data: SequenceData, *, max_len: int, stride: int | None = None, latest_only: bool = False
) -> Windows:
    """Next-item windows of every user's training history, user by user, latest window first.

    With `m = n - 1` pairs in a history of `n` items, window `k` ends at `b_k = m - k*stride` and
    starts at `a_k = max(0, b_k - max_len)`; windows are emitted until the first with `a_k == 0`,
    or only window 0 (the last max_len + 1 items) with `latest_only`.
    """
    stride = max_len if stride is None else stride
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    if not 1 <= stride <= max_len:
        raise ConfigError(f"stride must be in 1..max_len={max_len} (or None), got {stride}")
    split = data.train
    pairs = np.maximum(split.lengths - 1, 0)  # [n_users] m
    count = np.where(pairs > 0, 1 + -(-np.maximum(pairs - max_len, 0) // stride), 0)
    if latest_only:
        count = np.minimum(count, 1)
    user = np.repeat(np.arange(data.n_users, dtype=np.int32), count)  # [n_windows]
    first = np.cumsum(count) - count  # [n_users] position of each user's window 0
    k = np.arange(len(user), dtype=np.int64) - np.repeat(first, count)
    b = pairs[user] - k * stride
    a = np.maximum(b - max_len, 0)
    return Windows(user=user, lo=split.starts[user] + a, length=b - a)


def _left_padded(
    items: np.ndarray, lo: np.ndarray, length: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `items[lo[r]:lo[r]+length[r]]` right-aligned in zeros: ([rows, width] int32, valid)."""
    offset = np.arange(width) - (width - length)[:, None]  # [rows, width], < 0 on padding
    valid = offset >= 0
    gathered = np.take(items, lo[:, None] + np.maximum(offset, 0), mode="clip")
    return np.where(valid, gathered, 0).astype(np.int32), valid


def _window_rows(
    items: np.ndarray, windows: Windows, ids: np.ndarray, width: int
) -> dict[str, np.ndarray]:
    """The training rows of windows `ids`, left-padded to `width` (>= each window's length)."""
    lo, length = windows.lo[ids], windows.length[ids]
    inputs, mask = _left_padded(items, lo, length, width)
    targets, _ = _left_padded(items, lo + 1, length, width)
    # inputs, targets, mask: [rows, width]; user: [rows]
    return {"inputs": inputs, "targets": targets, "mask": mask, "user": windows.user[ids]}


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
        rows_fn=None,
    ):
        self._items, self._windows, self._widths = items, windows, widths
        # (items, windows, ids, width) -> batch dict; default: next-item windows
        self._rows_fn = rows_fn or _window_rows
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
) -> grain.IterDataset:
    """This process's training batches (`batch_size` is global), `num_epochs=None` = forever.

    Windows as `training_windows(data, max_len, stride, latest_only)`.

    Each batch: `inputs`, `targets` [b, W] int32, `mask` [b, W] bool (True on real targets),
    `user` [b] int32, with b = batch_size // process_count and W = max_len, or the width of the
    batch's bucket when `bucket_boundaries` is given (e.g. (16, 32, 64, 128, 200)). Each epoch
    is a fresh shuffle cut into whole global batches (the < batch_size remainder is dropped).
    """
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    p, count, local = _process_share(batch_size, process_index, process_count)
    windows = training_windows(data, max_len=max_len, stride=stride, latest_only=latest_only)
    if len(windows) < batch_size:
        raise ConfigError(
            f"only {len(windows)} training windows, fewer than one batch of {batch_size}: "
            "lower batch_size"
        )
    return _bucketed_dataset(
        data.items, windows, max_len, batch_size=batch_size, process=p, local=local, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, bucket_boundaries=bucket_boundaries,
        worker_count=worker_count,
    )  # fmt: skip


def _bucketed_dataset(
    items: np.ndarray,
    examples,
    max_len: int,
    *,
    batch_size: int,
    process: int,
    local: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    bucket_boundaries: Sequence[int] | None,
    worker_count: int,
    rows_fn=None,
) -> grain.IterDataset:
    """Global batches of `examples` (anything with `.length` and `len`), this process's rows."""
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
        rows=slice(process * local, (process + 1) * local),
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


@dataclasses.dataclass(frozen=True)
class TargetExamples:
    """One generative training example per target position of a user's training history.

    Example `e` has the history `items[lo:lo+length]` (the last <= max_len items before the
    target) and the targets `items[lo+length : lo+length+n_targets]`: the next M items, cut at
    the end of the user's training history (so validation and test items are never targets).
    """

    user: np.ndarray  # [n] int32 dense user id
    lo: np.ndarray  # [n] int64 index into SequenceData.items of the first history item
    length: np.ndarray  # [n] int64 history length, 1..max_len
    n_targets: np.ndarray  # [n] int64 real targets, 1..M

    def __len__(self) -> int:
        return len(self.user)


def target_examples(data: SequenceData, *, max_len: int, session_items: int = 1) -> TargetExamples:
    """Every training position t >= 1 of every user: history h[max(0, t-max_len):t], targets
    h[t:t+session_items] (fewer at the end of the training history)."""
    if max_len < 1 or session_items < 1:
        raise ConfigError(f"max_len ({max_len}) and session_items ({session_items}) must be >= 1")
    split = data.train
    pairs = np.maximum(split.lengths - 1, 0)  # [n_users] targets per user
    user = np.repeat(np.arange(data.n_users, dtype=np.int32), pairs)  # [n]
    first = np.cumsum(pairs) - pairs
    t = np.arange(len(user), dtype=np.int64) - np.repeat(first, pairs) + 1  # [n] 1..m
    length = np.minimum(t, max_len)
    end = split.starts[user] + t  # index of the first target
    n_targets = np.minimum(session_items, split.lengths[user] - t)
    return TargetExamples(user=user, lo=end - length, length=length, n_targets=n_targets)


def _next_items(
    items: np.ndarray, first: np.ndarray, n_real: np.ndarray, codes: np.ndarray, m: int
) -> dict[str, np.ndarray]:
    """Targets `items[first : first + n_real]` padded to `m`, with their code rows.

    first, n_real: [...] (n_real 0 = no target). Returns targets [..., M], target_codes
    [..., M, L+1] (zeros on padding) and mask [..., M].
    """
    slot = np.arange(m)
    mask = slot < n_real[..., None]  # [..., M]
    targets = np.where(mask, np.take(items, first[..., None] + slot, mode="clip"), 0)
    return {
        "targets": targets.astype(np.int32),
        "target_codes": np.where(mask[..., None], codes[targets], 0).astype(np.int32),
        "mask": mask,
    }


def _target_rows(
    items: np.ndarray,
    examples: TargetExamples,
    ids: np.ndarray,
    width: int,
    *,
    codes: np.ndarray,
    session_items: int,
) -> dict[str, np.ndarray]:
    """One example per target: the history and one target position (P = 1)."""
    lo, length = examples.lo[ids], examples.length[ids]
    inputs, _ = _left_padded(items, lo, length, width)
    nxt = _next_items(items, (lo + length)[:, None], examples.n_targets[ids][:, None], codes,
                      session_items)  # fmt: skip
    return {"inputs": inputs, "user": examples.user[ids], **nxt}


def _window_code_rows(
    items: np.ndarray,
    windows: Windows,
    ids: np.ndarray,
    width: int,
    *,
    codes: np.ndarray,
    session_items: int,
    train_end: np.ndarray,
) -> dict[str, np.ndarray]:
    """Next-item windows with a target position per input slot (P = W, causal encoder)."""
    lo, length, user = windows.lo[ids], windows.length[ids], windows.user[ids]
    inputs, valid = _left_padded(items, lo, length, width)
    # slot q of a window holds input lo + q - (W - length); its first target follows it
    first = lo[:, None] + 1 + np.arange(width) - (width - length)[:, None]  # [rows, W]
    n_real = np.where(valid, np.minimum(session_items, train_end[user][:, None] - first), 0)
    nxt = _next_items(items, first, n_real, codes, session_items)
    return {"inputs": inputs, "user": user, **nxt}


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
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    if session_items < 1:
        raise ConfigError(f"session_items={session_items}: use >= 1 (1 = next item).")
    p, _, local = _process_share(batch_size, process_index, process_count)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != data.n_items + 1:
        raise ConfigError(
            f"semantic ids have shape {codes.shape}, expected [{data.n_items + 1}, L + 1]: "
            "they were made for another dataset; rerun --mode tokenize on this one."
        )
    codes = np.maximum(codes, 0)
    if per_target:
        examples = target_examples(data, max_len=max_len, session_items=session_items)
        rows_fn = functools.partial(_target_rows, codes=codes, session_items=session_items)
    else:
        examples = training_windows(data, max_len=max_len, stride=stride, latest_only=latest_only)
        rows_fn = functools.partial(
            _window_code_rows, codes=codes, session_items=session_items, train_end=data.train.ends
        )
    if len(examples) < batch_size:
        raise ConfigError(
            f"only {len(examples)} training examples, fewer than one batch of {batch_size}: "
            "lower batch_size"
        )
    return _bucketed_dataset(
        data.items, examples, max_len, batch_size=batch_size, process=p, local=local, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, bucket_boundaries=bucket_boundaries,
        worker_count=worker_count, rows_fn=rows_fn,
    )  # fmt: skip


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
    ):
        split = data.split(split_name)
        self._order = order  # [n_users] global row -> dense user
        self._items, self._targets = data.items, split.targets
        self._length = np.clip(split.lengths, 0, max_len)  # [n_users]
        self._lo = split.ends - self._length  # [n_users]
        self._n_users, self._max_len, self._batch_size = len(order), max_len, batch_size
        self._rows = np.arange(batch_size)[rows]  # [b] row positions inside a global batch

    def __call__(self, g: int) -> dict[str, np.ndarray]:
        row = g * self._batch_size + self._rows  # [b] global row = dense user id if real
        real = row < self._n_users
        user = np.where(real, self._order[np.minimum(row, self._n_users - 1)], 0)
        length = np.where(real, self._length[user], 0)
        inputs, _ = _left_padded(self._items, self._lo[user], length, self._max_len)
        return {
            "inputs": inputs,  # [b, L] int32, the last L history items, left-padded
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
) -> grain.IterDataset:
    """Users in order, each exactly once, in ceil(n_users / batch_size) batches on every process.

    `by_length=True` visits users by increasing history length instead (`eval_user_order`), so
    a batch's users have similar histories and history masks need little padding. `users`:
    evaluate only these dense user ids (e.g. a validation sample), in the same orders.

    Global batch g holds users g*batch_size ... ; process p gets its rows
    [p*b:(p+1)*b] (b = batch_size // process_count). The last batch is padded with weight-0 rows.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    p, _, local = _process_share(batch_size, process_index, process_count)
    rows = slice(p * local, (p + 1) * local)
    order = eval_user_order(data, split_name, by_length, users)
    batches = _EvalBatches(
        data, split_name, max_len=max_len, batch_size=batch_size, rows=rows, order=order
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
