"""The records every reader produces: Interactions, ItemInfo, RawDataset, and title parsing.

MovieLens readers (movielens.py) and the generic formats (generic.py) both build these.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

_YEAR_RE = re.compile(r"^(.*?)\s*\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$")


@dataclasses.dataclass(frozen=True)
class Interactions:
    """All rating events in source-file order (the order ties keep when sorting by time).

    `users`/`items` hold the source ids (int64). For formats whose ids are strings, they hold
    int64 codes into `user_vocab`/`item_vocab` instead.
    """

    users: np.ndarray  # [n] int64
    items: np.ndarray  # [n] int64
    ratings: np.ndarray  # [n] float32 (1.0 where the source has no rating)
    timestamps: np.ndarray  # [n] int64 seconds; file position where the source has no time
    files: tuple[str, ...]  # the files read: their identity keys the sequence cache
    user_vocab: np.ndarray | None = None  # [n_codes] str, when source user ids are strings
    item_vocab: np.ndarray | None = None  # [n_codes] str, when source item ids are strings

    def __len__(self) -> int:
        return len(self.users)


@dataclasses.dataclass(frozen=True)
class ItemInfo:
    """Per-item side information, one row per catalogue item, keyed by source item id."""

    item_ids: np.ndarray  # [n] source ids (int64, or str for string-id formats)
    titles: list[str]  # title without the trailing "(year)"
    years: np.ndarray  # [n] int32, 0 when unknown
    genres: list[tuple[str, ...]]  # () when none listed
    tags: list[dict[str, int]]  # lower-cased user tag -> number of applications
    genome: np.ndarray | None = None  # [n_genome_items, n_genome_tags] float32 relevance
    genome_item_ids: np.ndarray | None = None  # [n_genome_items] source ids of genome rows
    genome_tags: tuple[str, ...] = ()  # [n_genome_tags] names of genome columns

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row index of each source id in this table, -1 where unknown."""
        return lookup_rows(self.item_ids, ids)

    def genome_rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each source id in `genome`, -1 where the item has no genome vector."""
        if self.genome_item_ids is None:
            return np.full(len(ids), -1, np.int64)
        return lookup_rows(self.genome_item_ids, ids)


@dataclasses.dataclass(frozen=True)
class RawDataset:
    interactions: Interactions | None  # None when read with with_interactions=False
    items: ItemInfo
    users: dict[str, np.ndarray] | None = None  # demographics (users.dat / u.user) if present


def lookup_rows(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each of `ids` in `keys`, -1 where absent."""
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys, ids, sorter=order).clip(0, max(len(keys) - 1, 0))
    found = order[pos] if len(keys) else np.zeros(len(ids), np.int64)
    ok = (keys[found] == ids) if len(keys) else np.zeros(len(ids), bool)
    return np.where(ok, found, -1)


def split_title(title: str) -> tuple[str, int]:
    """'Matrix, The (1999)' -> ('Matrix, The', 1999); a title without a year gives 0."""
    m = _YEAR_RE.match(title.strip())
    return (m.group(1), int(m.group(2))) if m else (title.strip(), 0)
