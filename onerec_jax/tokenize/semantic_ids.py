"""Semantic ids of items (codes + collision token), their prefix tables, and their files.

An item's semantic id is `L` content codes (level `l` in `0..codebook_sizes[l]-1`) followed by
a collision token that numbers the items sharing all `L` codes (0, 1, ... in dense-id order), so
every full id of `L + 1` tokens names exactly one item. Constrained beam search walks the
prefix tables: at level `l` a beam holds a prefix id, `valid[l][prefix]` masks its next code and
`next_prefix[l][prefix, code]` is the extended prefix (at the last level: the item id).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from onerec_jax.errors import ConfigError, DataFormatError

IDS_FILE = "semantic_ids.npz"  # the ids' file in a tokenize workdir (`--mode tokenize`)
PAD_CODE = -1  # every token of row 0, the padding item
FILE_VERSION = 1  # bump when the .npz layout changes


@dataclasses.dataclass(frozen=True)
class PrefixTables:
    """Fixed-shape lookup tables for constrained decoding, one pair per token level.

    Level `l` (0..L) has `n_prefixes[l]` distinct prefixes of `l` tokens, numbered in
    lexicographic order of their tokens (level 0: the empty prefix, id 0). Per level:
      valid[l]:       [n_prefixes[l], codebook_sizes[l]] bool, whether prefix + code starts an id
      next_prefix[l]: [n_prefixes[l], codebook_sizes[l]] int32, id of the prefix + code at level
                      l + 1; at the last level l = L the dense item id (1..n_items); -1 if invalid.
    """

    valid: tuple[np.ndarray, ...]
    next_prefix: tuple[np.ndarray, ...]

    @property
    def n_prefixes(self) -> tuple[int, ...]:
        return tuple(v.shape[0] for v in self.valid)

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """All levels padded to one shape, for a `lax.scan` decoder.

        Returns:
          valid [L + 1, max n_prefixes, max codebook size] bool (False in the padding) and
          next_prefix of the same shape, int32 (-1 in the padding).
        """
        depth, rows = len(self.valid), max(self.n_prefixes)
        cols = max(v.shape[1] for v in self.valid)
        valid = np.zeros((depth, rows, cols), bool)
        nxt = np.full((depth, rows, cols), -1, np.int32)
        for level, (v, n) in enumerate(zip(self.valid, self.next_prefix, strict=True)):
            valid[level, : v.shape[0], : v.shape[1]] = v
            nxt[level, : n.shape[0], : n.shape[1]] = n
        return valid, nxt


@dataclasses.dataclass(eq=False)
class SemanticIds:
    """Every item's semantic id: `L` content codes plus a collision token.

    Build with `from_codes` (or `random_codes`, `load`); the constructor checks shapes only.
    """

    codes: np.ndarray  # [n_items + 1, L + 1] int32; row 0 (padding) is PAD_CODE everywhere
    codebook_sizes: tuple[int, ...]  # [L + 1]; the last = largest collision group
    _tables: PrefixTables | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.codes = np.asarray(self.codes, np.int32)
        self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.codebook_sizes):
            raise ValueError(
                f"codes {self.codes.shape} must be [n_items + 1, {len(self.codebook_sizes)}] "
                f"to match codebook_sizes {self.codebook_sizes}"
            )

    @property
    def levels(self) -> int:
        """L, the number of content levels (the collision token is not counted)."""
        return self.codes.shape[1] - 1

    @property
    def id_length(self) -> int:
        """L + 1, the number of tokens in a full semantic id."""
        return self.codes.shape[1]

    @property
    def n_items(self) -> int:
        return self.codes.shape[0] - 1

    @property
    def item_codes(self) -> np.ndarray:
        """[n_items, L + 1] the ids of items 1..n_items (row k is item k + 1)."""
        return self.codes[1:]

    def prefix_tables(self) -> PrefixTables:
        """The tables constrained beam search consults (built once, then cached)."""
        if self._tables is None:
            self._tables = _build_prefix_tables(self.item_codes, self.codebook_sizes)
        return self._tables

    def item_prefixes(self) -> np.ndarray:
        """[L, n_items + 1] int32: row `l - 1` holds each item's prefix id after `l` tokens
        (l = 1..L, the ids of `prefix_tables()`); column 0 (the padding item) is 0. Beam search
        counts each prefix's unseen items with it."""
        tables = self.prefix_tables()
        node = np.zeros(self.n_items, np.int64)
        rows = []
        for level in range(self.levels):
            node = tables.next_prefix[level][node, self.item_codes[:, level]]
            rows.append(node)
        out = np.zeros((self.levels, self.n_items + 1), np.int32)
        if rows:
            out[:, 1:] = np.stack(rows)
        return out

    def code_to_item(self, codes: np.ndarray) -> np.ndarray:
        """Dense item id of each full id in `codes [..., L + 1]`; 0 where no item has it."""
        codes = np.asarray(codes)
        flat = codes.reshape(-1, self.id_length)
        tables = self.prefix_tables()
        node = np.zeros(len(flat), np.int64)
        ok = np.ones(len(flat), bool)
        for level, size in enumerate(self.codebook_sizes):
            c = flat[:, level]
            ok &= (c >= 0) & (c < size)
            nxt = tables.next_prefix[level][np.where(ok, node, 0), np.where(ok, c, 0)]
            ok &= nxt >= 0
            node = np.where(ok, nxt, 0)
        return node.astype(np.int32).reshape(codes.shape[:-1])

    def lookup(self, codes: Sequence[int]) -> int:
        """The dense item id whose full semantic id is `codes`; KeyError if there is none."""
        if len(codes) != self.id_length:
            raise KeyError(f"{tuple(codes)}: a semantic id has {self.id_length} tokens")
        item = int(self.code_to_item(np.asarray(codes, np.int64)[None])[0])
        if item == 0:
            raise KeyError(f"no item has semantic id {tuple(int(c) for c in codes)}")
        return item

    def save(self, path: str | os.PathLike) -> None:
        """Writes `codes` and `codebook_sizes` to the .npz `path` atomically."""
        meta = json.dumps({"version": FILE_VERSION, "kind": "semantic_ids"})
        sizes = np.asarray(self.codebook_sizes, np.int64)
        _atomic_write(
            path, "wb", lambda f: np.savez(f, meta=np.array(meta), codes=self.codes, sizes=sizes)
        )


def _lexsort_rows(codes: np.ndarray) -> np.ndarray:
    """Row order sorting `codes [n, d]` lexicographically, ties in row order."""
    keys = [np.arange(len(codes))] + [codes[:, j] for j in range(codes.shape[1] - 1, -1, -1)]
    return np.lexsort(keys)


def _starts(sorted_codes: np.ndarray) -> np.ndarray:
    """[n] bool, True where a row of lexicographically sorted codes differs from the last."""
    start = np.ones(len(sorted_codes), bool)
    if len(sorted_codes) > 1:
        start[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    return start


def add_collision_tokens(codes: np.ndarray) -> np.ndarray:
    """Appends to `codes [n_items, L]` a column numbering the items that share all L codes.

    Within each group of equal rows the token is 0, 1, 2, ... in row (dense-id) order, so the
    rows of the result `[n_items, L + 1]` int32 are unique.
    """
    codes = np.asarray(codes)
    order = _lexsort_rows(codes)
    start = _starts(codes[order])
    pos = np.arange(len(codes))
    group_start = np.maximum.accumulate(np.where(start, pos, 0))
    token = np.empty(len(codes), np.int32)
    token[order] = pos - group_start
    return np.concatenate([codes.astype(np.int32), token[:, None]], axis=1)


def _check_codes(codes: np.ndarray, sizes: Sequence[int], what: str, error=ValueError) -> None:
    for level, size in enumerate(sizes):
        column = codes[:, level]
        bad = np.flatnonzero((column < 0) | (column >= size))
        if len(bad):
            raise error(
                f"{what}: code {int(column[bad[0]])} of item row {int(bad[0])} at level {level} "
                f"is outside 0..{size - 1} (codebook size {size})"
            )


def from_codes(codes: np.ndarray, codebook_size: int | Sequence[int]) -> SemanticIds:
    """SemanticIds from a tokenizer's codes `[n_items, L]` (row k = dense item k + 1).

    Args:
      codes: integer codes, level l in 0..codebook_size[l] - 1.
      codebook_size: one size for every level, or one per level.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"codes must be [n_items >= 1, levels >= 1], got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    levels = codes.shape[1]
    sizes = [codebook_size] * levels if np.isscalar(codebook_size) else list(codebook_size)
    if len(sizes) != levels or min(sizes) < 1:
        raise ValueError(f"codebook_size {codebook_size} does not fit {levels} levels of codes")
    _check_codes(codes, sizes, "from_codes")
    full = add_collision_tokens(codes)
    pad = np.full((1, levels + 1), PAD_CODE, np.int32)
    return SemanticIds(np.concatenate([pad, full]), (*sizes, int(full[:, -1].max()) + 1))


def random_codes(
    n_items: int, levels: int, codebook_size: int, rng: np.random.Generator | int
) -> SemanticIds:
    """The random-code control: every content code drawn uniformly and independently."""
    rng = np.random.default_rng(rng)
    return from_codes(rng.integers(0, codebook_size, (n_items, levels)), codebook_size)


def _build_prefix_tables(codes: np.ndarray, sizes: tuple[int, ...]) -> PrefixTables:
    """Tables for the unique full ids `codes [n_items, L + 1]` of items 1..n_items."""
    order = _lexsort_rows(codes)
    sorted_codes = codes[order]  # [n_items, L + 1]
    items = (order + 1).astype(np.int32)
    depth = codes.shape[1]
    # prefix_id[l][k]: id of the l-token prefix of the k-th sorted item (lexicographic order).
    change = np.zeros(len(codes), bool)
    change[0] = True
    prefix_id = [np.zeros(len(codes), np.int64)]
    for level in range(depth):
        if len(codes) > 1:
            change[1:] |= sorted_codes[1:, level] != sorted_codes[:-1, level]
        prefix_id.append(np.cumsum(change) - 1)
    valid, nxt = [], []
    for level in range(depth):
        rows, col = prefix_id[level], sorted_codes[:, level]
        v = np.zeros((int(rows[-1]) + 1, sizes[level]), bool)
        n = np.full(v.shape, -1, np.int32)
        v[rows, col] = True
        n[rows, col] = items if level == depth - 1 else prefix_id[level + 1]
        valid.append(v)
        nxt.append(n)
    return PrefixTables(tuple(valid), tuple(nxt))


def _atomic_write(path: str | os.PathLike, mode: str, write: Callable) -> None:
    """Calls `write(f)` on a temporary file beside `path`, then renames it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        text = {} if "b" in mode else {"newline": "", "encoding": "utf-8"}
        with os.fdopen(fd, mode, **text) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> SemanticIds:
    """Reads a file written by `SemanticIds.save`; DataFormatError if it is missing or bad."""
    fix = "Re-run the tokenizer (--mode tokenize) to rewrite it."
    if not Path(path).is_file():
        raise DataFormatError(f"{path}: no such semantic-id file. {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"meta", "codes", "sizes"} - set(npz.files)
            if missing:
                raise DataFormatError(
                    f"{path}: not a semantic-id file (no {sorted(missing)}). {fix}"
                )
            meta = json.loads(str(npz["meta"]))
            codes, sizes = npz["codes"], npz["sizes"]
    except DataFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, bad json, ...: all mean "corrupt"
        msg = f"{path}: corrupt semantic-id file ({type(e).__name__}: {e}). {fix}"
        raise DataFormatError(msg) from e
    version = meta.get("version") if isinstance(meta, dict) else None
    if version != FILE_VERSION:
        raise DataFormatError(f"{path}: file version {version}, need {FILE_VERSION}. {fix}")
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or sizes.shape != (codes.shape[1],):
        raise DataFormatError(
            f"{path}: codes {codes.shape} do not match sizes {sizes.shape}. {fix}"
        )
    if len(codes) < 2 or not (codes[0] == PAD_CODE).all():
        raise DataFormatError(f"{path}: row 0 must be the padding item ({PAD_CODE}s). {fix}")
    _check_codes(codes[1:], sizes, str(path), DataFormatError)
    if not _starts(codes[1:][_lexsort_rows(codes[1:])]).all():
        raise DataFormatError(f"{path}: two items share a semantic id. {fix}")
    return SemanticIds(codes, tuple(int(s) for s in sizes))


def load_semantic_ids(path: str, n_items: int) -> SemanticIds:
    """The ids at `path` (a semantic_ids.npz or a tokenize workdir), checked against the data."""
    p = Path(path)
    if p.is_dir():
        p = p / IDS_FILE
    if not p.exists():
        raise ConfigError(
            f"no semantic ids at {p}: run `--mode tokenize --workdir DIR` with the same data "
            "config first, then point model.semantic_ids at DIR (or DIR/semantic_ids.npz)."
        )
    sem = load(p)
    if sem.n_items != n_items:
        raise ConfigError(
            f"{p} codes {sem.n_items:,} items but the data has {n_items:,}: tokenize with the "
            "same data config (release, filters) as the model."
        )
    return sem


def write_csv(
    path: str | os.PathLike,
    semantic_ids: SemanticIds,
    item_ids_source: np.ndarray,
    titles: Sequence[str] | None = None,
    years: Sequence[int] | None = None,
) -> None:
    """Writes a human-readable table: item_id, movieId, title, year, code_0..code_L.

    Args:
      item_ids_source: source id per dense item, `SequenceData.item_ids` ([n_items + 1], row 0
        padding) or the same without row 0 ([n_items]).
      titles, years: per dense item 1..n_items (same two lengths allowed); None leaves blanks.
    """
    n = semantic_ids.n_items
    source = _per_item(item_ids_source, n, "item_ids_source")
    titles = [""] * n if titles is None else _per_item(titles, n, "titles")
    years = [""] * n if years is None else _per_item(years, n, "years")
    header = ["item_id", "movieId", "title", "year"]
    header += [f"code_{level}" for level in range(semantic_ids.id_length)]

    def write(f):
        out = csv.writer(f)
        out.writerow(header)
        for k, row in enumerate(semantic_ids.item_codes.tolist()):
            year = years[k] if years[k] != 0 else ""  # 0 = unknown year in ItemInfo
            out.writerow([k + 1, source[k], titles[k], year, *row])

    _atomic_write(path, "w", write)


def _per_item(values: Sequence, n_items: int, name: str) -> list:
    """`values` for items 1..n_items as a list, dropping a leading padding row if present."""
    values = list(np.asarray(values).tolist()) if isinstance(values, np.ndarray) else list(values)
    if len(values) == n_items + 1:
        values = values[1:]
    if len(values) != n_items:
        raise ValueError(f"{name} has {len(values)} rows; need {n_items} or {n_items + 1}")
    return values
