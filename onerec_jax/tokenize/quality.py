"""Measured quality of semantic ids: code usage, perplexity, collisions, content agreement.

Every number is computed from the ids themselves (and optional item labels), so a tokenizer
and the random-code control (`semantic_ids.random_codes`) are compared on the same scale.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onerec_jax.tokenize.semantic_ids import SemanticIds


def code_usage(codes: np.ndarray, codebook_size: int) -> float:
    """Fraction of the `codebook_size` codes used by at least one item."""
    return len(np.unique(codes)) / codebook_size


def perplexity(codes: np.ndarray) -> float:
    """exp(entropy) (natural log) of the codes' empirical distribution: the effective number
    of equally used codes (1 when every item has the same code)."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def collision_stats(content_codes: np.ndarray) -> dict[str, float]:
    """How often items share all L content codes (before the collision token).

    Args:
      content_codes: [n_items, L] the codes without the collision token.

    Returns:
      collision_fraction: share of items whose L codes equal another item's;
      largest_collision_group: most items sharing one L-code tuple (1 = no collision);
      distinct_content_ids: number of distinct L-code tuples.
    """
    _, counts = np.unique(content_codes, axis=0, return_counts=True)
    return {
        "collision_fraction": float(counts[counts > 1].sum() / len(content_codes)),
        "largest_collision_group": int(counts.max()),
        "distinct_content_ids": len(counts),
    }


def _contingency(labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[n distinct codes, n distinct labels] int64 co-occurrence counts."""
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(codes, return_inverse=True)
    n_labels = int(li.max()) + 1
    flat = np.bincount(ci.ravel() * n_labels + li.ravel(), minlength=(int(ci.max()) + 1) * n_labels)
    return flat.reshape(-1, n_labels)


def purity(labels: np.ndarray, codes: np.ndarray) -> float:
    """Share of items whose label is the majority label among the items with their code."""
    labels, codes = np.asarray(labels), np.asarray(codes)
    if len(labels) != len(codes) or len(labels) == 0:
        raise ValueError(
            f"purity needs equal, non-empty labels and codes: {labels.shape}, {codes.shape}"
        )
    return float(_contingency(labels, codes).max(axis=1).sum() / len(labels))


def chance_purity(
    labels: np.ndarray, codes: np.ndarray, n_permutations: int = 10, seed: int = 0
) -> float:
    """Mean purity after randomly permuting the codes over the items: the level that the same
    code-group sizes reach with no content information (many small groups score high)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([purity(labels, rng.permutation(codes)) for _ in range(n_permutations)]))


def nmi(labels: np.ndarray, codes: np.ndarray) -> float:
    """Normalized mutual information with the arithmetic-mean normalizer.

    Same definition and edge cases as `sklearn.metrics.normalized_mutual_info_score` (default
    `average_method="arithmetic"`), without the dependency.
    """
    table = _contingency(np.asarray(labels), np.asarray(codes)).astype(np.float64)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0  # one cluster on both sides: identical partitions
    p = table / table.sum()
    pc, pl = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pc, pl)[nz])).sum())
    h_codes, h_labels = -(pc * np.log(pc)).sum(), -(pl * np.log(pl)).sum()
    if mi <= 0:
        return 0.0
    return float(mi / max((h_codes + h_labels) / 2, np.finfo(np.float64).eps))


def dominant_genres(genres: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """Each item's dominant genre: of its genres, the most frequent in the catalogue (ties:
    first listed). Returns (labels [n] int64, -1 where an item lists no genre; genre names)."""
    frequency = Counter(g for item in genres for g in item)
    names = sorted(frequency)
    index = {g: k for k, g in enumerate(names)}
    labels = np.full(len(genres), -1, np.int64)
    for k, item in enumerate(genres):
        if item:
            labels[k] = index[max(item, key=lambda g: frequency[g])]  # max keeps the first tie
    return labels, names


def _per_item(values, n_items: int, name: str):
    """`values` for items 1..n_items, dropping a leading padding row if present."""
    if len(values) == n_items + 1:
        values = values[1:]
    if len(values) != n_items:
        raise ValueError(f"{name} has {len(values)} rows; need {n_items} or {n_items + 1}")
    return values


def _agreement(prefix: str, labels: np.ndarray, codes0: np.ndarray) -> dict[str, float]:
    keep = labels >= 0
    labels, codes0 = labels[keep], codes0[keep]
    if not len(labels):
        return {}
    return {
        f"{prefix}_purity": purity(labels, codes0),
        f"{prefix}_purity_chance": chance_purity(labels, codes0),
        f"{prefix}_nmi": nmi(labels, codes0),
        f"{prefix}_items": len(labels),
    }


def quality_report(
    sem_ids: SemanticIds,
    *,
    genres: Sequence[Sequence[str]] | None = None,
    labels: np.ndarray | None = None,
    recon_error: float | None = None,
) -> dict[str, float]:
    """Every quality number of `sem_ids` as a flat dict of plain floats and ints.

    Args:
      sem_ids: the ids to measure.
      genres: per dense item (1..n_items, optionally with the padding row first) its genres;
        adds genre_purity (share of items whose level-0 code's majority dominant genre is their
        own), genre_purity_chance (the same with codes permuted) and genre_nmi.
      labels: per dense item an integer class (e.g. the synthetic generator's clusters; < 0 =
        unknown); adds label_purity, label_purity_chance and label_nmi against level-0 codes.
      recon_error: the tokenizer's reconstruction error, copied into the report.

    Raises:
      ValueError: if two items share a full semantic id (the collision token failed).
    """
    codes = sem_ids.item_codes  # [n_items, L + 1]
    n, levels = sem_ids.n_items, sem_ids.levels
    report: dict[str, float] = {"n_items": n, "levels": levels}
    n_parents = 1
    for level in range(levels):
        column, size = codes[:, level], sem_ids.codebook_sizes[level]
        n_prefixes = len(np.unique(codes[:, : level + 1], axis=0))
        report[f"level{level}_codebook_size"] = size
        report[f"level{level}_used_codes"] = len(np.unique(column))
        report[f"level{level}_usage"] = code_usage(column, size)
        report[f"level{level}_perplexity"] = perplexity(column)
        report[f"level{level}_branching"] = n_prefixes / n_parents  # mean codes per parent
        n_parents = n_prefixes
    report.update(collision_stats(codes[:, :levels]))
    duplicates = n - len(np.unique(codes, axis=0))
    if duplicates:
        raise ValueError(f"{duplicates} items share a full semantic id despite the collision token")
    report["duplicate_ids"] = 0
    report["collision_token_size"] = sem_ids.codebook_sizes[-1]
    if genres is not None:
        genre_labels, _ = dominant_genres(_per_item(list(genres), n, "genres"))
        report.update(_agreement("genre", genre_labels, codes[:, 0]))
    if labels is not None:
        labels = np.asarray(_per_item(np.asarray(labels), n, "labels"), np.int64)
        report.update(_agreement("label", labels, codes[:, 0]))
    if recon_error is not None:
        report["recon_error"] = float(recon_error)
    return report


_LEVEL_KEY = re.compile(r"level(\d+)_(\w+)")
_COLUMNS = ("codebook_size", "used_codes", "usage", "perplexity", "branching")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_report(report: dict[str, float]) -> str:
    """`quality_report`'s dict as text: a per-level table, then the other numbers."""
    per_level: dict[int, dict[str, float]] = {}
    others = []
    for key, value in report.items():
        match = _LEVEL_KEY.fullmatch(key)
        if match and match.group(2) in _COLUMNS:
            per_level.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            others.append((key, _fmt(value)))
    lines = []
    if per_level:
        header = ("level", *_COLUMNS)
        rows = [header] + [
            (str(level), *(_fmt(per_level[level].get(c, "")) for c in _COLUMNS))
            for level in sorted(per_level)
        ]
        widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
        lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        lines.append("")
    width = max((len(k) for k, _ in others), default=0)
    lines += [f"{k:<{width}}  {v:>12}" for k, v in others]
    return "\n".join(lines).rstrip("\n")


def plot_usage(sem_ids: SemanticIds, path: str | os.PathLike) -> None:
    """Writes a PNG: per content level, items per code sorted descending (unused codes = 0)."""
    try:
        from matplotlib.figure import Figure  # Figure.savefig uses Agg: no pyplot, no display
    except ImportError as e:
        raise ImportError("plot_usage needs matplotlib: pip install matplotlib") from e
    levels = sem_ids.levels
    fig = Figure(figsize=(4 * levels, 3), layout="constrained")
    axes = fig.subplots(1, levels, squeeze=False)[0]
    for level, ax in enumerate(axes):
        column, size = sem_ids.item_codes[:, level], sem_ids.codebook_sizes[level]
        counts = np.sort(np.bincount(column, minlength=size))[::-1]
        ax.bar(np.arange(size), counts, width=1.0, color="tab:blue")
        ax.set_title(
            f"level {level}: {code_usage(column, size):.0%} used, "
            f"ppl {perplexity(column):.1f}/{size}",
            fontsize=9,
        )
        ax.set_xlabel("code (sorted by items)")
        ax.set_ylabel("items")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
