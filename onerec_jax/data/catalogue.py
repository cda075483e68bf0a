"""The trained items by movieId or title: what a person types, resolved to dense ids.

A query is a movieId when it is all digits (for integer-id datasets), else a title: case- and
space-insensitive, with or without its "(year)", with the article in front or at the end
("The Matrix" = "Matrix, The"), or one of the names MovieLens puts in parentheses ("Se7en" for
"Seven (a.k.a. Se7en) (1995)"); without its article ("Matrix") when nothing matches exactly.
Every failure is a UserError naming the fix: close titles for a typo, the candidates with years
for an ambiguous title, and the run's filters for a movie that exists but was not trained on.
"""

from __future__ import annotations

import difflib
import re

import numpy as np

from onerec_jax.data.records import ItemInfo, split_title
from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import UserError

_ARTICLES = "the|a|an|les|la|le|il|el|die|der|das|los|las"
_TRAILING_ARTICLE = re.compile(rf"^(.*), ({_ARTICLES})$")  # "matrix, the"
_LEADING_ARTICLE = re.compile(rf"^({_ARTICLES}) ")
_PARENTHESES = re.compile(r"\s*\(([^()]*)\)\s*$")  # one trailing "(other name)"


def title_key(title: str) -> str:
    """Lower-cased, single-spaced, article in front: 'Matrix,  The' -> 'the matrix'."""
    t = " ".join(title.lower().split())
    m = _TRAILING_ARTICLE.match(t)
    return f"{m.group(2)} {m.group(1)}" if m else t


def _bare(key: str) -> str:
    """A title key without its leading article: 'the matrix' -> 'matrix'."""
    return _LEADING_ARTICLE.sub("", key)


def _aliases(title: str) -> set[str]:
    """Keys of a title's other names: 'Seven (a.k.a. Se7en)' -> {'seven', 'se7en'}."""
    out, rest = set(), title
    while m := _PARENTHESES.search(rest):
        out.add(title_key(re.sub(r"^a\.k\.a\.\s*", "", m.group(1))))
        rest = rest[: m.start()]
        out.add(title_key(rest))
    return out


def parse_queries(values: list[str]) -> list[str]:
    """`--items` values -> queries: each value split on ';', and '1,260,2571' on ','.

    Titles may hold commas ("Matrix, The"), so commas split only a list of bare movieIds.
    """
    out = []
    for value in values:
        for part in value.split(";"):
            part = part.strip()
            if re.fullmatch(r"\d+(\s*,\s*\d+)+", part):
                out.extend(p.strip() for p in part.split(","))
            elif part:
                out.append(part)
    return out


class Catalogue:
    """Source ids, titles and side information of the trained items (dense ids, 0 = padding)."""

    def __init__(self, data: SequenceData, items: ItemInfo | None):
        self.data = data
        self.items = items if items is not None and len(items) else None
        self.row = np.full(data.n_items + 1, -1, np.int64)  # [V] dense id -> ItemInfo row
        # key -> ItemInfo rows, consulted in order: titles, other names, either without article.
        self._index: tuple[dict[str, list[int]], ...] = ({}, {}, {})
        if self.items is None:
            return
        self.row[1:] = self.items.rows(data.item_ids[1:])
        for r, title in enumerate(self.items.titles):
            key, names = title_key(title), _aliases(title)
            bare = {_bare(k) for k in {key, *names}}
            for index, keys in zip(self._index, ({key}, names, bare), strict=True):
                for k in keys:
                    rows = index.setdefault(k, [])
                    if not rows or rows[-1] != r:
                        rows.append(r)

    def dense_id(self, source_id) -> int:
        """Dense id of a source item id, 0 if the trained catalogue lacks it."""
        ids = self.data.item_ids[1:]
        pos = int(np.searchsorted(ids, source_id))  # dense ids follow ascending source ids
        return pos + 1 if pos < len(ids) and ids[pos] == source_id else 0

    def info(self, dense: int) -> tuple[int | str, str, int, tuple[str, ...]]:
        """(source id, title without year, year, genres) of a dense id; '', 0, () if unknown."""
        source = self.data.item_ids[dense]
        source = source.item() if hasattr(source, "item") else source
        r = self.row[dense]
        if r < 0:
            return source, "", 0, ()
        i = self.items
        return source, i.titles[r], int(i.years[r]), tuple(i.genres[r])

    def label(self, dense: int) -> str:
        """'Title (year)' of a dense id, or 'item <source id>' when the dataset has no title."""
        source, title, year, _ = self.info(dense)
        return (f"{title} ({year})" if year else title) if title else f"item {source}"

    def _row_label(self, r: int) -> str:
        year = int(self.items.years[r])
        return f"{self.items.titles[r]} ({year})" if year else self.items.titles[r]

    def resolve(self, query: str) -> int:
        """Dense id of one query (see the module docstring); UserError if none or several."""
        q = query.strip()
        int_ids = self.data.item_ids.dtype.kind in "iu"
        if int_ids and q.isdigit():
            return self._trained(int(q))
        if not int_ids and (dense := self.dense_id(q)):
            return dense
        if self.items is None:
            raise UserError(f"{q!r}: this dataset has no titles; give item ids instead.")
        title, year = split_title(q)
        key = title_key(title)
        hits = (index.get(k) for index, k in zip(self._index, (key, key, _bare(key)), strict=True))
        rows = next((rows for rows in hits if rows), [])
        if not rows:
            raise UserError(f"no movie titled {q!r}.{self._suggest(key)}")
        if year:
            dated = [r for r in rows if self.items.years[r] == year]
            if not dated:
                found = ", ".join(sorted({self._row_label(r) for r in rows}))
                raise UserError(f"no movie {q!r}; with that title: {found}.")
            rows = dated
        if len({int(self.items.years[r]) for r in rows}) > 1:
            found = "; ".join(
                f"{self._row_label(r)} [movieId {self.items.item_ids[r]}]" for r in rows
            )
            raise UserError(f"{q!r} is ambiguous: {found}. Add the year or give the movieId.")
        trained = [d for r in rows if (d := self.dense_id(self.items.item_ids[r]))]
        if len(trained) > 1:  # the same title and year twice in movies.csv, both trained
            ids = ", ".join(str(self.data.item_ids[d]) for d in trained)
            raise UserError(f"{q!r} names several movies (movieIds {ids}): give the movieId.")
        return trained[0] if trained else self._trained(self.items.item_ids[rows[0]])

    def _trained(self, source_id) -> int:
        """Dense id of `source_id`; UserError naming the movie if the run did not train on it."""
        dense = self.dense_id(source_id)
        if dense:
            return dense
        r = -1 if self.items is None else int(self.items.rows(np.asarray([source_id]))[0])
        if r < 0 and self.items is not None:
            raise UserError(f"movieId {source_id} is not in the dataset's movie list.")
        label = f"{self._row_label(r)} (movieId {source_id})" if r >= 0 else f"item {source_id}"
        filters = ", ".join(f"{k}={v}" for k, v in self.data.options.items())
        raise UserError(
            f"{label} is not in the trained catalogue of {self.data.n_items:,} items: the run's "
            f"filters ({filters}) dropped it (too few ratings). Pick another movie."
        )

    def _suggest(self, key: str) -> str:
        """' Did you mean: ...?' from titles containing the query, then the closest titles."""
        titles, bare = self._index[0], self._index[2]
        rows = [r for k in [k for k in titles if key in k][:5] for r in titles[k]]
        rows += [
            r for k in difflib.get_close_matches(_bare(key), list(bare), 5, 0.6) for r in bare[k]
        ]
        labels = list(dict.fromkeys(self._row_label(r) for r in rows))  # a title twice: once
        return f" Did you mean: {'; '.join(labels[:8])}?" if labels else ""
