"""Synthetic MovieLens as files: the ratings, tags, titles, links and genome a planted world
(data/synthetic_world.py) gives, written in the ML-25M CSV layout."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from onerec_jax.data.synthetic_world import (
    GENRES,
    Synthetic,
    SyntheticConfig,
    generate_sequences,
    stream_rng,
    user_lengths,
)
from onerec_jax.errors import ConfigError

FILES = (
    "ratings.csv",
    "movies.csv",
    "tags.csv",
    "links.csv",
    "genome-tags.csv",
    "genome-scores.csv",
)
_T_START, _T_END = 789_652_009, 1_574_327_703  # ML-25M's first and last rating time, seconds


def ratings_and_timestamps(
    config: SyntheticConfig, lengths: np.ndarray, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rating codes (stars * 2, int8 in 1..10) and timestamps, in generation order.

    Timestamps are int64 seconds, strictly increasing inside each user: the row's index within
    its user is added to a non-decreasing session clock, so sorting by time recovers the order.
    """
    rng = stream_rng(config, 3)
    n, starts = len(items), np.concatenate([[0], np.cumsum(lengths)[:-1]])
    user = np.repeat(np.arange(config.n_users), lengths)
    value = rng.normal(3.55, 0.85, n)
    value += rng.normal(0.0, 0.45, config.n_items)[items]
    value += rng.normal(0.0, 0.35, config.n_users)[user]
    half_stars = rng.random(n) < 0.35  # older MovieLens only had whole stars
    codes = np.where(half_stars, np.rint(value * 2), 2 * np.rint(value)).clip(1, 10)
    codes = codes.astype(np.int8)
    del value, half_stars
    gap = rng.exponential(1.0, n) * np.where(rng.random(n) < 0.08, 200.0, 1.0)  # session breaks
    gap[starts] = 0.0
    clock = np.cumsum(gap)
    del gap
    clock -= np.repeat(clock[starts], lengths)
    total = clock[starts + lengths - 1]
    clock /= np.repeat(np.where(total > 0, total, 1.0), lengths)  # [0, 1] within each user
    room = _T_END - _T_START - lengths
    span = np.minimum(rng.lognormal(np.log(60 * 86_400), 1.8, config.n_users), room)
    first = _T_START + np.floor(rng.random(config.n_users) * (room - span)).astype(np.int64)
    timestamps = np.floor(clock * np.repeat(span, lengths)).astype(np.int64)
    del clock
    timestamps += np.arange(n) - np.repeat(starts - first, lengths)
    return codes, timestamps


def _write_csv(path: str, header: str, columns: dict[str, pa.Array | np.ndarray]) -> None:
    """Write columns without quotes (none may hold a comma or quote) under a literal header."""
    with pa.OSFile(path, "wb") as sink:
        sink.write((header + "\n").encode())
        options = pacsv.WriteOptions(include_header=False, quoting_style="none")
        pacsv.write_csv(pa.table(columns), sink, options)


def _csv_field(text: str) -> str:
    """RFC 4180 quoting, only where needed (as in MovieLens' own files)."""
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _write_movies_and_links(model: Synthetic, out: str) -> None:
    """movies.csv (titles, genres drawn around the cluster's genres) and links.csv."""
    rng, n = stream_rng(model.config, 4), model.config.n_movies
    years = np.clip(2019 - np.floor(rng.exponential(18.0, n)), 1902, 2019).astype(np.int64)
    comma, no_genres = rng.random(n) < 0.05, rng.random(n) < 0.01
    keep, extra = rng.random((n, 3)) < 0.8, rng.random(n) < 0.15
    extra_genre = rng.integers(0, len(GENRES), n)
    lines = ["movieId,title,genres"]
    for m in range(n):
        mid, own = int(model.movie_ids[m]), model.cluster_genres[model.movie_cluster[m]]
        genres = {g for g, k in zip(own, keep[m], strict=False) if k} or {own[0]}
        if extra[m]:
            genres.add(GENRES[extra_genre[m]])
        text = "(no genres listed)" if no_genres[m] else "|".join(sorted(genres))
        title = f"Synthetic Movie {mid}{', The' if comma[m] else ''} ({years[m]})"
        lines.append(f"{mid},{_csv_field(title)},{text}")
    with open(os.path.join(out, "movies.csv"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    imdb = np.sort(rng.choice(9_999_999, n, replace=False) + 1)
    tmdb = rng.choice(700_000, n, replace=False) + 1
    imdb_text = pa.array(np.char.zfill(imdb.astype(str), 7))
    tmdb_arr = pa.array(tmdb, mask=rng.random(n) < 0.002)  # a few blanks, as in ML-25M
    _write_csv(
        os.path.join(out, "links.csv"),
        "movieId,imdbId,tmdbId",
        {"movieId": model.movie_ids, "imdbId": imdb_text, "tmdbId": tmdb_arr},
    )


def _write_genome(model: Synthetic, out: str) -> None:
    """genome-tags.csv and genome-scores.csv (cluster centroid + noise, clipped to [0, 1])."""
    config, rng = model.config, stream_rng(model.config, 5)
    n_tags = config.n_genome_tags
    _write_csv(
        os.path.join(out, "genome-tags.csv"),
        "tagId,tag",
        {"tagId": np.arange(1, n_tags + 1), "tag": pa.array(model.genome_tags)},
    )
    items = np.sort(rng.choice(config.n_items, config.n_genome_items, replace=False))
    relevance = model.genome_centroids[model.item_cluster[items]]  # [n_genome_items, n_tags]
    relevance += rng.normal(0.0, 0.08, relevance.shape)
    relevance = np.round(np.clip(relevance, 0.00025, 0.99975), 5).ravel()
    _write_csv(
        os.path.join(out, "genome-scores.csv"),
        "movieId,tagId,relevance",
        {
            "movieId": np.repeat(model.item_movie_ids[items], n_tags),
            "tagId": np.tile(np.arange(1, n_tags + 1), len(items)),
            "relevance": relevance,
        },
    )


def _write_ratings_and_tags(model: Synthetic, out: str) -> None:
    """ratings.csv (sorted by userId, movieId) and tags.csv, from one generation pass."""
    config = model.config
    lengths = user_lengths(config)
    items = generate_sequences(model, lengths)
    unrated = config.n_items - np.count_nonzero(np.bincount(items, minlength=config.n_items))
    if unrated:
        raise ConfigError(
            f"{unrated} of n_items={config.n_items} items got no rating under this config; "
            "raise n_ratings, lower n_items or lower zipf_exponent"
        )
    codes, timestamps = ratings_and_timestamps(config, lengths, items)
    user = np.repeat(np.arange(config.n_users, dtype=np.int32), lengths)
    rng = stream_rng(config, 6)  # tags: a rated (user, movie), a word of the movie's cluster
    rows = rng.integers(0, len(items), config.n_tags_rows)
    by_cluster = np.argsort(model.tag_cluster, kind="stable")
    seg = np.searchsorted(model.tag_cluster[by_cluster], np.arange(config.n_clusters + 1))
    cluster = model.item_cluster[items[rows]]
    word = by_cluster[seg[cluster] + (rng.random(len(rows)) * np.diff(seg)[cluster]).astype(int)]
    noise = rng.random(len(rows)) < 0.1
    word[noise] = rng.integers(0, config.n_genome_tags, noise.sum())
    tag_time = timestamps[rows] + rng.integers(1, 3_600, len(rows))
    tag_order = np.lexsort((tag_time, items[rows], user[rows]))
    _write_csv(
        os.path.join(out, "tags.csv"),
        "userId,movieId,tag,timestamp",
        {
            "userId": user[rows][tag_order] + 1,
            "movieId": model.item_movie_ids[items[rows][tag_order]],
            "tag": pa.DictionaryArray.from_arrays(word[tag_order], pa.array(model.genome_tags)),
            "timestamp": tag_time[tag_order],
        },
    )
    # The file is sorted by (userId, movieId) like ML-25M; a user's rows are contiguous already.
    order = np.argsort(user.astype(np.int64) * config.n_items + items)
    del user
    stars = pa.array([f"{k / 2:.1f}" for k in range(11)])
    _write_csv(
        os.path.join(out, "ratings.csv"),
        "userId,movieId,rating,timestamp",
        {
            "userId": np.repeat(np.arange(1, config.n_users + 1, dtype=np.int32), lengths),
            "movieId": model.item_movie_ids.astype(np.int32)[items[order]],
            "rating": pa.DictionaryArray.from_arrays(codes[order], stars),
            "timestamp": timestamps[order],
        },
    )


def write_tables(model: Synthetic, out: str) -> None:
    """Every file of `FILES` into the directory `out`, drawn from `model`."""
    _write_movies_and_links(model, out)
    _write_genome(model, out)
    _write_ratings_and_tags(model, out)
