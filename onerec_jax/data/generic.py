"""Readers for the generic layouts users bring: RecBole atomic files and user-sequence text."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from onerec_jax.data.records import Interactions, ItemInfo, RawDataset, split_title
from onerec_jax.data.tables import read_table, to_numpy
from onerec_jax.errors import DataFormatError

# RecBole's default field names (USER_ID_FIELD, ITEM_ID_FIELD, RATING_FIELD, TIME_FIELD) and the
# item-side fields of its MovieLens conversions.
_USER, _ITEM, _RATING, _TIME = "user_id", "item_id", "rating", "timestamp"
_TITLE_FIELDS = ("movie_title", "title", "item_name")
_YEAR_FIELDS = ("release_year", "year")
_GENRE_FIELDS = ("genre", "class", "categories")
_RECBOLE_KINDS = {"token": "str", "token_seq": "str", "float": "float", "float_seq": "str"}


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """String ids -> (int64 codes, vocab); ids that are all integers stay integers."""
    trimmed = pc.utf8_trim_whitespace(column)
    if len(trimmed) and pc.all(pc.match_substring_regex(trimmed, r"^[+-]?\d{1,18}$")).as_py():
        return to_numpy(pc.cast(trimmed, pa.int64()), np.int64), None
    encoded = pc.dictionary_encode(trimmed).combine_chunks()
    vocab = np.asarray(encoded.dictionary.to_pylist(), dtype=str)
    return to_numpy(encoded.indices, np.int64), vocab


def _recbole_header(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """((name, kind) per column, the raw header fields) of a RecBole atomic file."""
    with open(path, encoding="utf8") as f:
        first = f.readline().rstrip("\r\n")
    columns = []
    for field in first.split("\t"):
        name, _, kind = field.partition(":")
        if kind not in _RECBOLE_KINDS:
            raise DataFormatError(
                f"{path}, line 1: header field {field!r} is not 'name:type' with type in "
                f"{tuple(_RECBOLE_KINDS)}. RecBole atomic files need typed headers such as "
                "'user_id:token'."
            )
        columns.append((name, _RECBOLE_KINDS[kind]))
    return columns, first.split("\t")


def _recbole_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_file():
        inter = path
    else:
        found = sorted(path.glob("*.inter"))
        if len(found) != 1:
            raise DataFormatError(
                f"{path}: expected exactly one *.inter file, found {len(found)}. Point "
                "--config.data.path at the .inter file itself."
            )
        inter = found[0]
    item = inter.with_suffix(".item")
    return inter, item if item.is_file() else None


def read_recbole(path: str | os.PathLike, on_bad_rows: str = "error") -> RawDataset:
    """RecBole atomic files: NAME.inter (user_id, item_id, [rating], [timestamp]) + NAME.item."""
    inter_path, item_path = _recbole_files(Path(path))
    columns, header = _recbole_header(inter_path)
    names = [n for n, _ in columns]
    for required in (_USER, _ITEM):
        if required not in names:
            raise DataFormatError(
                f"{inter_path}, line 1: no {required!r} field in the header {names}. Rename "
                f"the id columns to RecBole's defaults ({_USER}:token, {_ITEM}:token)."
            )
    table, _ = read_table(
        inter_path,
        columns,
        delimiter="\t",
        quoting=False,
        on_bad_rows=on_bad_rows,
        header_fields=header,
    )
    users, user_vocab = _codes(table.column(_USER))
    items, item_vocab = _codes(table.column(_ITEM))
    n = table.num_rows
    ratings = to_numpy(table.column(_RATING), np.float32) if _RATING in names else np.ones(n)
    if _TIME in names:
        t = to_numpy(table.column(_TIME), np.float64)
        # Integral seconds stay as they are; fractional times become their order-preserving
        # dense rank, which keeps ties tied.
        ts = (
            t.astype(np.int64) if np.all(t == np.floor(t)) else np.unique(t, return_inverse=True)[1]
        )
    else:
        ts = np.arange(n, dtype=np.int64)
    inter = Interactions(
        users,
        items,
        ratings.astype(np.float32),
        ts.astype(np.int64),
        (os.fspath(inter_path),),
        user_vocab,
        item_vocab,
    )
    return RawDataset(inter, _recbole_items(item_path, item_vocab, on_bad_rows))


def _recbole_items(path: Path | None, item_vocab, on_bad_rows: str) -> ItemInfo:
    empty = ItemInfo(np.zeros(0, np.int64), [], np.zeros(0, np.int32), [], [])
    if path is None:
        return empty
    columns, header = _recbole_header(path)
    names = [n for n, _ in columns]
    if _ITEM not in names:
        raise DataFormatError(f"{path}, line 1: no {_ITEM!r} field in the header {names}.")
    table, _ = read_table(
        path, columns, delimiter="\t", quoting=False, on_bad_rows=on_bad_rows, header_fields=header
    )
    raw_ids, vocab = _codes(table.column(_ITEM))
    ids = raw_ids if vocab is None else vocab[raw_ids]
    if item_vocab is None and vocab is not None:
        raise DataFormatError(f"{path}: item ids are not integers while the .inter ids are.")
    n = len(ids)

    def pick(fields):
        return next((table.column(f).to_pylist() for f in fields if f in names), None)

    titles, years, genres = pick(_TITLE_FIELDS), pick(_YEAR_FIELDS), pick(_GENRE_FIELDS)
    titles = titles or [""] * n
    split = [split_title(t) for t in titles]
    if years is None:
        years = [y for _, y in split]
    years = [int(float(y)) if str(y).strip().replace(".", "", 1).isdigit() else 0 for y in years]
    genres = [tuple(str(g).split()) for g in genres] if genres else [()] * n
    return ItemInfo(
        ids, [t for t, _ in split], np.asarray(years, np.int32), genres, [{} for _ in range(n)]
    )


def read_user_sequences(path: str | os.PathLike, encoding: str = "utf8") -> RawDataset:
    """One line per user, `user item item ...` in chronological order (SASRec, S3-Rec, TIGER).

    There is no time or rating: timestamps are file positions (so order is kept exactly) and
    every rating is 1. A user may span several lines; they are concatenated in file order.
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: file not found. Check --config.data.path.")
    try:
        table = pcsv.read_csv(
            p,
            pcsv.ReadOptions(column_names=["line"], encoding=encoding, block_size=1 << 24),
            pcsv.ParseOptions(delimiter="\x1f", quote_char=False, newlines_in_values=False),
            pcsv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        problem = ": ".join(str(e).splitlines()[0].split(": ")[:2])  # not the garbled row
        raise DataFormatError(
            f"{p}: not {encoding} text of 'user item item ...' lines ({problem}). Check "
            "--config.data.path, data.format and data.encoding."
        ) from None
    tokens = pc.utf8_split_whitespace(table.column("line")).combine_chunks()
    lengths = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    if (short := np.flatnonzero(lengths == 1)).size:
        raise DataFormatError(
            f"{p}, line {short[0] + 1}: a user with no items. Each line is 'user item item ...'."
        )
    lengths = np.where(lengths == 0, 0, lengths)  # blank lines are allowed and ignored
    flat = pc.list_flatten(tokens)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_user = np.zeros(len(flat), bool)
    is_user[starts[lengths > 0]] = True
    user_tokens, user_vocab = _codes(pa.chunked_array([flat.filter(pa.array(is_user))]))
    item_codes, item_vocab = _codes(pa.chunked_array([flat.filter(pa.array(~is_user))]))
    users = np.repeat(user_tokens, lengths[lengths > 0] - 1)
    n = len(item_codes)
    inter = Interactions(
        users,
        item_codes,
        np.ones(n, np.float32),
        np.arange(n, dtype=np.int64),
        (os.fspath(p),),
        user_vocab,
        item_vocab,
    )
    ids = np.unique(item_codes) if item_vocab is None else item_vocab
    empty = ItemInfo(
        ids, [""] * len(ids), np.zeros(len(ids), np.int32), [()] * len(ids), [{} for _ in ids]
    )
    return RawDataset(inter, empty)
