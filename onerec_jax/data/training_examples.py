"""Training examples of users' histories as numpy index arrays, and the batch rows they gather.

Next-item windows (`training_windows`): inputs `h[a:b]`, targets `h[a+1:b+1]`, left-padded with
item 0. Generative models (models/tiger.py, the OneRec semantic-id decoder) read the same windows
with the next M items' semantic-id codes at every slot (`window_code_rows`), or one example per
target position (`target_examples`, `target_rows`). Indices are computed once; rows are gathered
lazily from the CSR arrays by data/pipeline.py, which cuts them into batches.
"""

from __future__ import annotations

import dataclasses

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


def power_of_two_width(longest: int) -> int:
    """The next power of two >= `longest` (>= 1): the width a batch of rows is padded to, so
    few distinct shapes reach jit and few recompilations happen."""
    return 1 << max(longest - 1, 0).bit_length()


def left_padded(
    items: np.ndarray, lo: np.ndarray, length: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `items[lo[r]:lo[r]+length[r]]` right-aligned in zeros: ([rows, width] int32, valid)."""
    offset = np.arange(width) - (width - length)[:, None]  # [rows, width], < 0 on padding
    valid = offset >= 0
    gathered = np.take(items, lo[:, None] + np.maximum(offset, 0), mode="clip")
    return np.where(valid, gathered, 0).astype(np.int32), valid


def prefix_inputs(data: SequenceData, split: str, users: np.ndarray, max_len: int) -> np.ndarray:
    """[U, max_len] int32: the last max_len items of each user's `split` prefix, left-padded
    (what a model reads for that split's target)."""
    part = data.split(split)
    ends = part.ends[users]
    length = np.minimum(ends - part.starts[users], max_len)
    return left_padded(data.items, ends - length, length, max_len)[0]


def window_rows(
    items: np.ndarray, windows: Windows, ids: np.ndarray, width: int, ratings=None
) -> dict[str, np.ndarray]:
    """The training rows of windows `ids`, left-padded to `width` (>= each window's length);
    with `ratings` ([n_interactions], SequenceData.ratings) also each target's rating."""
    lo, length = windows.lo[ids], windows.length[ids]
    inputs, mask = left_padded(items, lo, length, width)
    targets, _ = left_padded(items, lo + 1, length, width)
    # inputs, targets, mask: [rows, width]; user: [rows]
    out = {"inputs": inputs, "targets": targets, "mask": mask, "user": windows.user[ids]}
    if ratings is not None:  # [rows, width] float32, 0 on padding
        offset = np.arange(width) - (width - length)[:, None]
        gathered = np.take(ratings, (lo + 1)[:, None] + np.maximum(offset, 0), mode="clip")
        out["target_ratings"] = np.where(offset >= 0, gathered, 0.0).astype(np.float32)
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


def target_rows(
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
    inputs, _ = left_padded(items, lo, length, width)
    nxt = _next_items(
        items, (lo + length)[:, None], examples.n_targets[ids][:, None], codes, session_items
    )
    return {"inputs": inputs, "user": examples.user[ids], **nxt}


def window_code_rows(
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
    inputs, valid = left_padded(items, lo, length, width)
    # slot q of a window holds input lo + q - (W - length); its first target follows it
    first = lo[:, None] + 1 + np.arange(width) - (width - length)[:, None]  # [rows, W]
    n_real = np.where(valid, np.minimum(session_items, train_end[user][:, None] - first), 0)
    nxt = _next_items(items, first, n_real, codes, session_items)
    return {"inputs": inputs, "user": user, **nxt}
