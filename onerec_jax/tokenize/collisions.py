"""Collision-aware last-level codes: items that share every code get distinct, near last codes.

A tokenizer's nearest-code assignment leaves many items with identical codes when their
residuals at the last level are alike (on ml-latest-small about 40% of the items, with RQ-VAE and
RQ-KMeans alike: BENCHMARKS.md). Following LC-Rec's uniform semantic mapping (Zheng et al. 2024),
the items of each prefix (the first L-1 codes) that would collide are given distinct last-level
codes by an optimal assignment on their distances to the last codebook: each keeps its nearest
code where it can and otherwise takes the next nearest free one. Items without a collision keep
their codes. Groups larger than the codebook cannot all be separated; the collision token of
tokenize/semantic_ids.py still makes every id unique.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def spread_last_level(codes: np.ndarray, last_distances: np.ndarray) -> np.ndarray:
    """Codes [n, L] whose last level is unique inside each (L-1)-prefix where the codebook allows.

    Args:
      codes: [n, L] the tokenizer's nearest-code assignment.
      last_distances: [n, K] distance (any monotone cost) of each item's last-level residual to
        each code of the last codebook.

    Returns:
      new codes [n, L]; levels < L-1 unchanged. Within a prefix, the items that shared a full id
      and the items they shared it with are reassigned together, minimising their summed
      distance subject to distinct codes that no other item of the prefix holds.
    """
    codes = np.array(codes, dtype=np.int32, copy=True)
    k = last_distances.shape[1]
    order = np.lexsort(codes.T[::-1])  # rows sorted by the full id, prefix first
    sorted_codes = codes[order]
    same_prefix = np.all(sorted_codes[1:, :-1] == sorted_codes[:-1, :-1], axis=1)
    starts = np.flatnonzero(np.concatenate([[True], ~same_prefix, [True]]))
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        members = order[lo:hi]  # items of one prefix
        last = codes[members, -1]
        values, counts = np.unique(last, return_counts=True)
        if counts.max() == 1:
            continue
        clashing = np.isin(last, values[counts > 1])
        movers = members[clashing]
        taken = np.zeros(k, bool)
        taken[last[~clashing]] = True  # codes of the prefix's non-colliding items stay theirs
        free = np.flatnonzero(~taken)
        if len(movers) > len(free):  # more items than codes: separate as many as possible
            free = np.arange(k)
        cost = last_distances[movers][:, free]  # [m, free]
        rows, cols = linear_sum_assignment(cost)
        codes[movers[rows], -1] = free[cols]
    return codes


def last_level_distances(
    vectors: np.ndarray, codes: np.ndarray, codebooks: np.ndarray, chunk: int = 8192
) -> np.ndarray:
    """[n, K] squared distances of each item's last-level residual to the last codebook.

    Args:
      vectors: [n, d] what was quantised (features for RQ-KMeans, latents for RQ-VAE).
      codes: [n, L] the codes of levels 0..L-1 (only levels < L-1 are used).
      codebooks: [L, K, d].
    """
    codebooks = np.asarray(codebooks, np.float32)
    levels = codebooks.shape[0]
    residual = np.asarray(vectors, np.float32).copy()
    for lvl in range(levels - 1):
        residual -= codebooks[lvl][codes[:, lvl]]
    last = codebooks[-1]  # [K, d]
    out = np.empty((len(residual), last.shape[0]), np.float32)
    for lo in range(0, len(residual), chunk):
        r = residual[lo : lo + chunk]
        out[lo : lo + chunk] = (r**2).sum(1, keepdims=True) - 2 * r @ last.T + (last**2).sum(1)
    return out
