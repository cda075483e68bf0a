"""Readers for every MovieLens layout and two generic formats -> records.Interactions, ItemInfo.

Layouts (`data.format`):
  movielens_csv   ratings.csv, movies.csv, tags.csv, links.csv, genome-*.csv (20M, 25M, 32M,
                  latest, latest-small)
  movielens_dat   ratings.dat, movies.dat, tags.dat, users.dat with "::" (1M, 10M), latin-1
  movielens_100k  u.data (tab), u.item (pipe), latin-1
  recbole         RecBole atomic files: NAME.inter (+ NAME.item), typed headers
  user_sequence   one line per user, "user item item ...", already in chronological order
  auto            picked from the files present
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from onerec_jax.data import generic
from onerec_jax.data.records import Interactions, ItemInfo, RawDataset, lookup_rows, split_title
from onerec_jax.data.tables import read_table, to_numpy
from onerec_jax.errors import DataFormatError

FORMATS = ("movielens_csv", "movielens_dat", "movielens_100k", "recbole", "user_sequence")
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)  # one word per line would take 19 lines


def _item_table(ids, raw_titles, genres, tags=None, years=None, **genome) -> ItemInfo:
    titles, parsed_years = zip(*map(split_title, raw_titles), strict=True) if len(ids) else ((), ())
    years = np.asarray(parsed_years if years is None else years, np.int32).reshape(-1)
    if tags is None:
        tags = [{} for _ in range(len(ids))]
    return ItemInfo(np.asarray(ids), list(titles), years, list(genres), tags, **genome)


def _interactions(table, files, *, user="user", item="item", rating="rating", ts="timestamp"):
    """Table columns -> Interactions, one column at a time: each Arrow column is released as
    soon as it is copied, so peak memory stays near one copy of the data (ML-25M scale)."""
    n = table.num_rows
    out = {}
    fields = (
        ("users", user, np.int64),
        ("items", item, np.int64),
        ("ratings", rating, np.float32),
        ("timestamps", ts, np.int64),
    )
    for field, column, dtype in fields:
        if column:
            out[field] = to_numpy(table.column(column), dtype)
            table = table.drop_columns([column])
            pa.default_memory_pool().release_unused()
    out.setdefault("ratings", np.ones(n, np.float32))
    out.setdefault("timestamps", np.arange(n, dtype=np.int64))
    return Interactions(**out, files=tuple(os.fspath(f) for f in files))


def _aggregate_tags(ids: np.ndarray, tag_items: np.ndarray, tag_text: pa.ChunkedArray):
    """Per item of `ids`: lower-cased tag -> count, from parallel (item, tag) arrays."""
    tags = [{} for _ in range(len(ids))]
    if len(tag_items) == 0:
        return tags
    table = pa.table({"item": tag_items, "tag": pc.utf8_lower(pc.utf8_trim_whitespace(tag_text))})
    counts = table.group_by(["item", "tag"]).aggregate([([], "count_all")])
    rows = lookup_rows(np.asarray(ids), to_numpy(counts.column("item"), np.int64))
    for row, tag, count in zip(
        rows, counts.column("tag").to_pylist(), counts.column("count_all").to_pylist(), strict=True
    ):
        if row >= 0 and tag:
            tags[row][tag] = count
    return tags


def read_ratings_csv(path: str | os.PathLike, on_bad_rows: str = "error") -> Interactions:
    """A MovieLens `ratings.csv` (userId,movieId,rating,timestamp) as Interactions."""
    columns = [("userId", "int"), ("movieId", "int"), ("rating", "float32"), ("timestamp", "int")]
    # The table is passed without a name so that _interactions can release it column by column.
    return _interactions(
        read_table(path, columns, on_bad_rows=on_bad_rows)[0], [path], user="userId", item="movieId"
    )


def read_movielens_csv(
    path: str | os.PathLike, on_bad_rows: str = "error", with_interactions: bool = True
) -> RawDataset:
    """ML-20M/25M/32M/latest layout: ratings.csv, movies.csv and optional tags, genome."""
    d = Path(path)
    inter = read_ratings_csv(d / "ratings.csv", on_bad_rows) if with_interactions else None
    movies, _ = read_table(
        d / "movies.csv",
        [("movieId", "int"), ("title", "str"), ("genres", "str")],
        on_bad_rows=on_bad_rows,
    )
    ids = to_numpy(movies.column("movieId"), np.int64)
    genres = [
        () if g == "(no genres listed)" else tuple(g.split("|"))
        for g in movies.column("genres").to_pylist()
    ]
    tags = None
    if (d / "tags.csv").exists():
        t, _ = read_table(
            d / "tags.csv",
            [("userId", "int"), ("movieId", "int"), ("tag", "str"), ("timestamp", "int")],
            on_bad_rows=on_bad_rows,
        )
        tags = _aggregate_tags(ids, to_numpy(t.column("movieId"), np.int64), t.column("tag"))
    genome = {}
    if (d / "genome-scores.csv").exists() and (d / "genome-tags.csv").exists():
        genome = _read_genome(d, on_bad_rows)
    items = _item_table(ids, movies.column("title").to_pylist(), genres, tags, **genome)
    return RawDataset(inter, items)


def _read_genome(d: Path, on_bad_rows: str) -> dict:
    """genome-scores.csv as a dense [movies, tags] matrix, with its movie ids and tag names."""
    gtags, _ = read_table(d / "genome-tags.csv", [("tagId", "int"), ("tag", "str")])
    scores, _ = read_table(
        d / "genome-scores.csv",
        [("movieId", "int"), ("tagId", "int"), ("relevance", "float32")],
        on_bad_rows=on_bad_rows,
    )
    tag_ids = to_numpy(gtags.column("tagId"), np.int64)
    movie = to_numpy(scores.column("movieId"), np.int64)
    tag = to_numpy(scores.column("tagId"), np.int64)
    relevance = to_numpy(scores.column("relevance"), np.float32)
    del scores
    n_tags = len(tag_ids)
    if n_tags and len(movie) % n_tags == 0:
        # Every release writes the file sorted by (movieId, tagId) with every tag of every movie:
        # then it is a reshape. Checked in O(n), falling back to the general path otherwise.
        by_movie, by_tag = movie.reshape(-1, n_tags), tag.reshape(-1, n_tags)
        genome_ids = by_movie[:, 0]
        if (
            np.all(by_movie == genome_ids[:, None])
            and np.all(by_tag == tag_ids)
            and np.all(np.diff(genome_ids) > 0)
        ):
            matrix = relevance.reshape(-1, n_tags)
            return dict(
                genome=matrix,
                genome_item_ids=genome_ids,
                genome_tags=tuple(gtags.column("tag").to_pylist()),
            )
    col = lookup_rows(tag_ids, tag)
    if (col < 0).any():
        raise DataFormatError(
            f"{d / 'genome-scores.csv'}: tagId {tag[int(np.argmin(col))]} is not in "
            "genome-tags.csv. Use the genome files of the same release."
        )
    genome_ids, row = np.unique(movie, return_inverse=True)
    matrix = np.full((len(genome_ids), n_tags), np.nan, np.float32)
    matrix[row, col] = relevance
    if np.isnan(matrix).any():
        raise DataFormatError(
            f"{d / 'genome-scores.csv'}: {int(np.isnan(matrix).sum())} (movie, tag) relevance "
            "values are missing. The file looks truncated: re-extract the release."
        )
    return dict(
        genome=matrix,
        genome_item_ids=genome_ids,
        genome_tags=tuple(gtags.column("tag").to_pylist()),
    )


def _read_dat_lines(path: Path, n_fields: int, encoding: str) -> list[list[str]]:
    """Small "::"-separated files (movies.dat, tags.dat, users.dat): text fields may hold ':'."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found. Check --config.data.path.")
    rows = []
    with open(path, encoding=encoding, newline="") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            head = line.split("::", 1)
            if len(head) < 2:
                raise DataFormatError(f"{path}, line {line_no}: no '::' separator in {line!r:.200}")
            fields = [head[0], *head[1].rsplit("::", n_fields - 2)] if n_fields > 1 else head
            if len(fields) != n_fields:
                raise DataFormatError(
                    f"{path}, line {line_no}: expected {n_fields} '::'-separated fields, found "
                    f"{len(fields)}: {line!r:.200}"
                )
            rows.append(fields)
    return rows


def _int(path: Path, line: int, value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(
            f"{path}, line {line}: {name} should be an integer, found {value!r}. Fix the row."
        ) from None


def read_movielens_dat(
    path: str | os.PathLike,
    on_bad_rows: str = "error",
    encoding: str = "latin-1",
    with_interactions: bool = True,
) -> RawDataset:
    """ML-1M/10M layout: "::"-separated ratings.dat, movies.dat, optional tags.dat/users.dat."""
    d = Path(path)
    inter = None
    if with_interactions:
        if not (d / "ratings.dat").is_file():
            raise DataFormatError(f"{d / 'ratings.dat'}: file not found. Check data.path.")
        raw = (d / "ratings.dat").read_bytes().replace(b"::", b"\x1f")
        ratings, _ = read_table(
            d / "ratings.dat",
            [("user", "int"), ("item", "int"), ("rating", "float32"), ("timestamp", "int")],
            delimiter="\x1f",
            header=False,
            quoting=False,
            encoding=encoding,
            on_bad_rows=on_bad_rows,
            data=raw,
        )
        del raw
        inter = _interactions(ratings, [d / "ratings.dat"])
        del ratings
    movies = _read_dat_lines(d / "movies.dat", 3, encoding)
    ids = [_int(d / "movies.dat", i + 1, r[0], "MovieID") for i, r in enumerate(movies)]
    genres = [tuple(g for g in r[2].split("|") if g and g != "(no genres listed)") for r in movies]
    tags = None
    if (d / "tags.dat").is_file():
        rows = _read_dat_lines(d / "tags.dat", 4, encoding)
        tag_items = [_int(d / "tags.dat", i + 1, r[1], "MovieID") for i, r in enumerate(rows)]
        tags = _aggregate_tags(
            np.asarray(ids),
            np.asarray(tag_items, np.int64),
            pa.chunked_array([pa.array([r[2] for r in rows], pa.string())]),
        )
    users = None
    if (d / "users.dat").is_file():
        rows = _read_dat_lines(d / "users.dat", 5, encoding)
        cols = list(zip(*rows, strict=True)) if rows else [()] * 5
        users = {
            "user": np.asarray(
                [_int(d / "users.dat", i + 1, v, "UserID") for i, v in enumerate(cols[0])], np.int64
            ),
            "gender": np.asarray(cols[1], str),
            "age": np.asarray([int(v) for v in cols[2]], np.int32),
            "occupation": np.asarray([int(v) for v in cols[3]], np.int32),
            "zip": np.asarray(cols[4], str),
        }
    items = _item_table(ids, [r[1] for r in movies], genres, tags)
    return RawDataset(inter, items, users)


def read_movielens_100k(
    path: str | os.PathLike,
    on_bad_rows: str = "error",
    encoding: str = "latin-1",
    with_interactions: bool = True,
) -> RawDataset:
    """ML-100K layout: tab-separated u.data, pipe-separated u.item with 19 genre flags."""
    d = Path(path)
    inter = None
    if with_interactions:
        ratings, _ = read_table(
            d / "u.data",
            [("user", "int"), ("item", "int"), ("rating", "float32"), ("timestamp", "int")],
            delimiter="\t",
            header=False,
            quoting=False,
            encoding=encoding,
            on_bad_rows=on_bad_rows,
        )
        inter = _interactions(ratings, [d / "u.data"])
    if not (d / "u.item").is_file():
        raise DataFormatError(f"{d / 'u.item'}: file not found. Check --config.data.path.")
    ids, titles, genres, years = [], [], [], []
    with open(d / "u.item", encoding=encoding, newline="") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("|")
            if len(fields) != 5 + len(ML100K_GENRES):
                raise DataFormatError(
                    f"{d / 'u.item'}, line {line_no}: expected 24 '|'-separated fields, found "
                    f"{len(fields)}. Fix the row."
                )
            ids.append(_int(d / "u.item", line_no, fields[0], "movie id"))
            title, year = split_title(fields[1])
            release = fields[2].rsplit("-", 1)[-1]
            titles.append(fields[1])
            years.append(year or (int(release) if release.isdigit() else 0))
            genres.append(
                tuple(
                    g
                    for g, flag in zip(ML100K_GENRES, fields[5:], strict=True)
                    if flag == "1" and g != "unknown"
                )
            )
    return RawDataset(inter, _item_table(ids, titles, genres, years=years))


def read_dataset(
    path: str | os.PathLike,
    fmt: str = "auto",
    on_bad_rows: str = "error",
    encoding: str = "",
    with_interactions: bool = True,
) -> RawDataset:
    """Reads the dataset at `path` (a directory, or a file for the generic formats).

    `with_interactions=False` reads only the item side (titles, genres, tags, genome) where
    the layout keeps it in separate files; `interactions` is then None.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or directory. Check --config.data.path.")
    if fmt == "auto":
        fmt = detect_format(p)
    kwargs = {"encoding": encoding} if encoding else {}
    if fmt == "movielens_csv":
        return read_movielens_csv(p, on_bad_rows, with_interactions)
    if fmt == "movielens_dat":
        return read_movielens_dat(p, on_bad_rows, with_interactions=with_interactions, **kwargs)
    if fmt == "movielens_100k":
        return read_movielens_100k(p, on_bad_rows, with_interactions=with_interactions, **kwargs)
    if fmt == "recbole":
        return generic.read_recbole(p, on_bad_rows)
    if fmt == "user_sequence":
        return generic.read_user_sequences(p, **kwargs)
    raise DataFormatError(
        f"unknown data.format {fmt!r}: use one of {('auto', *FORMATS)} "
        "(see onerec_jax/data/movielens.py)."
    )


LAYOUTS = (
    "expected one of: a folder with ratings.csv (movielens_csv), ratings.dat (movielens_dat), "
    "u.data (movielens_100k) or NAME.inter (recbole); a RecBole NAME.inter file; a text file of "
    "'user item item ...' lines (user_sequence)"
)
_CONTROL_BYTES = bytes(range(9)) + bytes(range(14, 32))  # no text file holds these


def _sniff_file(p: Path) -> str:
    """`auto` for a single file: RecBole by its suffix, user_sequence when the first line reads
    as integer ids; DataFormatError naming what the file looks like otherwise."""
    if p.suffix == ".inter":
        return "recbole"
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    fix = (
        f"point --config.data.path at your data ({LAYOUTS}), or set data.format to one of "
        f"{FORMATS}."
    )
    if any(b in _CONTROL_BYTES for b in head):
        raise DataFormatError(f"{p}: a binary file, not text of ratings or sequences; {fix}")
    lines = head.decode("latin-1").splitlines()
    line_no, first = next(((i, line) for i, line in enumerate(lines, 1) if line.strip()), (1, ""))
    if first.strip().lower().startswith(("userid,", "user_id,", "user,")):
        raise DataFormatError(
            f"{p}: a CSV of ratings given as a file ({first[:80]!r}); MovieLens layouts are read "
            f"from their folder: point --config.data.path at the folder holding ratings.csv."
        )
    if not all(token.isdigit() for token in first.split()):
        raise DataFormatError(
            f"{p}, line {line_no}: {first[:80]!r} is not 'user item item ...' with integer ids "
            f"(data.format=user_sequence also reads string ids); {fix}"
        )
    return "user_sequence"


def detect_format(p: Path) -> str:
    """The layout of `p`, from the files present; DataFormatError if none matches."""
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or directory. Check --config.data.path.")
    if p.is_file():
        return _sniff_file(p)
    if (p / "ratings.csv").is_file():
        return "movielens_csv"
    if (p / "ratings.dat").is_file():
        return "movielens_dat"
    if (p / "u.data").is_file():
        return "movielens_100k"
    if list(p.glob("*.inter")):
        return "recbole"
    raise DataFormatError(
        f"{p}: unknown layout (no ratings.csv, ratings.dat, u.data or *.inter); {LAYOUTS}. Point "
        f"--config.data.path at the extracted release, or set data.format to one of {FORMATS}."
    )
