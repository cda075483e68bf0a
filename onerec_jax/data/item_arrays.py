"""Per-item arrays aligned with dense item ids (row 0 = padding): counts, genres, year buckets."""

from __future__ import annotations

import numpy as np

from onerec_jax.data.records import ItemInfo
from onerec_jax.data.sequences import SequenceData

YEAR_BUCKET_SIZE = 5  # years per release-year bucket
_FIRST_YEAR = 1880  # bucket 1 starts here; bucket 0 means "unknown"


def train_counts(data: SequenceData) -> np.ndarray:
    """[V] number of training interactions of each item (validation/test targets excluded)."""
    split = data.train
    lengths = split.lengths
    rows = np.repeat(split.starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    return np.bincount(data.items[rows], minlength=data.n_items + 1).astype(np.int64)


def genre_multi_hot(data: SequenceData, items: ItemInfo) -> tuple[np.ndarray, tuple[str, ...]]:
    """([V, G] float32 multi-hot, genre names); items without info or genres get a zero row."""
    rows = items.rows(data.item_ids[1:]) if len(items) else np.full(data.n_items, -1)
    names = sorted({g for r in rows if r >= 0 for g in items.genres[r]})
    index = {g: k for k, g in enumerate(names)}
    out = np.zeros((data.n_items + 1, max(len(names), 1)), np.float32)
    for dense, r in enumerate(rows, start=1):
        if r >= 0:
            for g in items.genres[r]:
                out[dense, index[g]] = 1.0
    return out, tuple(names)


def year_buckets(data: SequenceData, items: ItemInfo) -> np.ndarray:
    """[V] int32: 0 for unknown years, else 1 + (year - 1880) // 5 (clipped at 1)."""
    rows = items.rows(data.item_ids[1:]) if len(items) else np.full(data.n_items, -1)
    years = np.where(rows >= 0, items.years[np.maximum(rows, 0)] if len(items) else 0, 0)
    bucket = np.where(years > 0, 1 + np.maximum(years - _FIRST_YEAR, 0) // YEAR_BUCKET_SIZE, 0)
    return np.concatenate([[0], bucket]).astype(np.int32)
