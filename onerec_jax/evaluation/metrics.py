"""Ranking metrics from per-user target ranks (PROTOCOL.md "Scoring"), with 95% intervals.

Every user has one target, so HR@K equals Recall@K. Ranks may be fractional: the protocol counts
each item tied with the target as half a place (evaluation/ranking.py `tie_rank`), so a rank is
a whole number or a half. The metrics take the rank as it is: HR@K = [rank <= K],
NDCG@K = [rank <= K] / log2(rank + 1), MRR@K = [rank <= K] / rank, MRR = 1 / rank.

The reported interval is the normal approximation, `1.96 * sample_std / sqrt(n_users)` under the
key `<metric>_ci95` (a half-width: report `value +- ci95`). `bootstrap_ci` gives a percentile
bootstrap interval for checks and for small samples; the metrics files use the normal one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10, 20, 50)  # cut-offs reported for HR@K, NDCG@K, MRR@K
Z95 = 1.96  # two-sided 95% quantile of the standard normal
_BOOTSTRAP_BLOCK = 1 << 22  # resampled indices held in memory at once


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs such as {KS}, got {ks}")
    return ks


def _check_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be a 1-D array [n_users], got shape {ranks.shape}")
    bad = ~np.isfinite(ranks) | (ranks < 1) if ranks.dtype.kind == "f" else ranks < 1
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} rank(s) are not finite values >= 1 (row {first}: {ranks[first]}). "
            "Ranks are 1-based (1 + items scoring strictly higher than the target + half the "
            "tied ones); a rank < 1 "
            "means the ranker was bypassed or a 0-based rank was passed: use rank_and_topk."
        )
    return ranks.astype(np.float64)


def metric_values(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-user metric values [n_users] (float64) for 1-based `ranks` (integer or float, e.g.
    4.5 for a target tied with others): the terms averaged by
    `metrics_from_ranks`, e.g. to bootstrap one of them with `bootstrap_ci`."""
    ks, ranks = _check_ks(ks), _check_ranks(ranks)
    gain = 1.0 / np.log2(ranks + 1.0)  # [n] NDCG of a single relevant item at this rank
    reciprocal = 1.0 / ranks  # [n]
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, gain, 0.0)
        out[f"mrr@{k}"] = np.where(hit, reciprocal, 0.0)
    out["mrr"] = reciprocal
    return out


def metrics_from_ranks(
    ranks: np.ndarray, weights: np.ndarray | None = None, ks: Sequence[int] = KS
) -> dict[str, float]:
    """HR@K, NDCG@K, MRR@K, full MRR averaged over users, each with a normal 95% half-width.

    Args:
      ranks: [n_users] 1-based rank of each user's target among the unmasked items (float:
        ties count half, PROTOCOL.md).
      weights: [n_users] 1 for evaluated users, 0 for padding rows (excluded); None = all 1.
      ks: cut-offs.

    Returns:
      `{"hr@K", "ndcg@K", "mrr@K", "mrr"}` means, each with `<name>_ci95`
      (`1.96 * std(ddof=1) / sqrt(n)`, NaN for a single user), and `n_users`.
    """
    ranks = np.asarray(ranks)
    if weights is None:
        keep = np.ones(ranks.shape, bool)
    else:
        weights = np.asarray(weights)
        if weights.shape != ranks.shape:
            raise ValueError(f"weights shape {weights.shape} != ranks shape {ranks.shape}")
        if not np.isin(weights, (0, 1)).all():
            raise ValueError("weights must be 0 (padding row) or 1 (evaluated user)")
        keep = weights == 1
    values = metric_values(ranks, ks)  # validates every row, padding included
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no user to evaluate: every row has weight 0")
    out: dict[str, float] = {}
    for name, v in values.items():
        v = v[keep]
        out[name] = float(v.mean())
        std = float(v.std(ddof=1)) if n > 1 else float("nan")
        out[f"{name}_ci95"] = Z95 * std / np.sqrt(n)
    out["n_users"] = n
    return out


def bootstrap_ci(
    values: np.ndarray, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the mean of `values` over users.

    Users are resampled with replacement `n_resamples` times; the interval holds the central
    `confidence` share of the resampled means. Deterministic for a given `seed`.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError("n_resamples must be >= 1 and confidence in (0, 1)")
    rng = np.random.default_rng(seed)
    n = len(values)
    block = max(1, _BOOTSTRAP_BLOCK // n)  # resamples per block, to bound memory
    means = np.empty(n_resamples)
    for lo in range(0, n_resamples, block):
        hi = min(lo + block, n_resamples)
        idx = rng.integers(0, n, size=(hi - lo, n))  # [block, n]
        means[lo:hi] = values[idx].mean(axis=1)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)
