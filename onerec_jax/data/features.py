"""The item feature matrix the tokenizers quantise: config blocks, standardised, weighted, joined.

Blocks (`features.blocks`, concatenated in that order; one row per dense item id, row 0 = padding
and all zeros):
  genres  multi-hot over the genre vocabulary ("(no genres listed)" is no genre)
  year    one-hot release-year bucket of `year_bucket_years` years, plus an "unknown year" column
  title   TF-IDF of the title's words -> truncated SVD to `title_dim` components
  tags    TF-IDF of the aggregated user tags (a tag's count is its term frequency) -> truncated SVD
          to `tags_dim` components, plus a "has no tags" column
  genome  the tag-genome relevance vector, imputed per `genome_missing`, reduced to `genome_dim`
          principal components (fitted on the items that have one), plus a "missing genome"
          column
  collab  the item table of the best checkpoint of a trained run (`collab_workdir`), read by the
          caller's `collab_table` (runs.collab_item_table): data code never loads a model
  interactions  collaborative embeddings with no model: TF-IDF of each item's training users
          (the train split only: no validation or test item is read) -> truncated SVD to
          `interactions_dim` components, plus a "no training user" column. Items without a
          training user share one row, unless `cold_blocks` names content blocks: then a ridge
          regression (penalty `cold_ridge`) from those blocks, standardised, fitted on the items
          with training users, predicts their rows (the flag column is then 0 for every item)
  vectors your own item vectors (a text or image encoder's) from `vectors_path`, keyed by item id
          (data/item_vectors.py: layouts, checks, `vectors_missing`)

Content a dataset lacks (ML-100K and ML-1M have no tags, only ML-20M/25M a genome, a
`user item item ...` file nothing at all): with `missing="skip"` (the default) such a block is
left out with a warning naming it, and when no block is left the matrix is the `interactions`
block, so every dataset gets semantic ids; `missing="error"` raises instead.

Each block is standardised per column over the real items (constant columns stay 0), divided by
sqrt(its number of non-constant columns) so that a row's mean squared norm is 1 whatever the
block's width, then multiplied by `weights[block]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging
from scipy import sparse
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer
from sklearn.linear_model import Ridge

from onerec_jax.data import item_arrays, item_vectors
from onerec_jax.data.records import ItemInfo
from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import ConfigError, DataFormatError

BLOCKS = ("genres", "year", "title", "tags", "genome", "collab", "interactions", "vectors")
# (features.collab_workdir, data, items) -> [n_items, dim] item table rows of that trained run
CollabTable = Callable[[str, SequenceData, ItemInfo], np.ndarray]
_NO_GENRE = "(no genres listed)"
_SVD_SEED = 0  # truncated SVD is randomised: a fixed seed keeps the features reproducible


@dataclasses.dataclass(frozen=True)
class ItemFeatures:
    """The feature matrix and the column range of each block."""

    matrix: np.ndarray  # [n_items + 1, D] float32; row 0 (padding) is zeros
    blocks: tuple[tuple[str, int, int], ...]  # (name, start, stop) column ranges, config order

    def block(self, name: str) -> np.ndarray:
        """[n_items + 1, stop - start] columns of block `name`."""
        for block, start, stop in self.blocks:
            if block == name:
                return self.matrix[:, start:stop]
        raise KeyError(f"no block {name!r}: this matrix has {[b for b, _, _ in self.blocks]}")


def build_features(
    cfg: ml_collections.ConfigDict,
    data: SequenceData,
    items: ItemInfo,
    collab_table: CollabTable | None = None,
) -> ItemFeatures:
    """The feature matrix of `cfg` (the config's `features` section) for `data`'s items.

    Raises:
      ConfigError: an unknown block or bad option, or (with `missing="error"`) a block the
        dataset lacks.
      DataFormatError: a block holds NaN or infinite values.
    """
    names = _block_names(cfg)
    cold_names = _cold_block_names(cfg)
    missing = cfg.get("missing", "skip")
    if missing not in ("skip", "error"):
        raise ConfigError(f"features.missing={missing!r}: use 'skip' or 'error'.")
    raws = {}
    for name in names:
        try:
            raws[name] = raw_block(name, cfg, data, items, collab_table)  # [n_items, k]
        except MissingContent as e:
            if missing == "error":
                raise
            logging.warning("%s", e.skipped)
    if not raws:
        logging.warning(
            "features.blocks=%s: this dataset has none of them, so the item features are "
            "collaborative embeddings (block 'interactions': SVD of each item's training users).",
            names,
        )
        raws["interactions"] = raw_block("interactions", cfg, data, items)
    if "interactions" in raws and cold_names:
        raws["interactions"] = _cold_rows_from_content(raws, cold_names, cfg, data, items)
    if list(raws) == ["interactions"]:
        untrained = int((raws["interactions"][:, -1] > 0).sum())  # the "no training user" flag
        if untrained > 1:
            logging.warning(
                "%d items have no training interaction: with the 'interactions' block alone they "
                "share one feature row, so their semantic ids share a prefix, are told apart by "
                "collision handling alone and carry nothing of their content. For cold start, "
                "name content blocks that predict their rows, e.g. "
                "features.cold_blocks=('genres', 'year', 'title').",
                untrained,
            )
    parts, spans, start = [], [], 0
    for name, raw in raws.items():
        _check_finite(raw, name, "in its input (e.g. a NaN genome relevance): fix the data files")
        block = (standardised(raw) * _weight(cfg, name)).astype(np.float32)
        _check_finite(block, name, "after standardisation: its values overflow float32")
        parts.append(block)
        spans.append((name, start, start + block.shape[1]))
        start += block.shape[1]
    matrix = np.zeros((data.n_items + 1, start), np.float32)
    matrix[1:] = np.concatenate(parts, axis=1)
    return ItemFeatures(matrix, tuple(spans))


def raw_block(
    name: str,
    cfg: ml_collections.ConfigDict,
    data: SequenceData,
    items: ItemInfo,
    collab_table: CollabTable | None = None,
) -> np.ndarray:
    """[n_items, k] float64 block `name` before standardisation, row i-1 = dense item i."""
    builders = {
        "genres": _genres,
        "year": _year,
        "title": _title,
        "tags": _tags,
        "genome": _genome,
        "interactions": _interactions,
        "vectors": lambda cfg, data, items: item_vectors.vectors_block(cfg, data),
    }
    if name == "collab":
        return np.asarray(_collab(cfg, data, items, collab_table), np.float64)
    if name not in builders:
        raise ConfigError(f"features.blocks: unknown block {name!r}; valid blocks: {BLOCKS}.")
    return np.asarray(builders[name](cfg, data, items), np.float64)


def _as_names(blocks) -> tuple[str, ...]:
    if isinstance(blocks, str):  # "genres,year" from a command line
        blocks = [b.strip() for b in blocks.split(",") if b.strip()]
    return tuple(blocks)


def _block_names(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = _as_names(cfg.blocks)
    unknown = [b for b in names if b not in BLOCKS]
    if unknown:
        raise ConfigError(f"features.blocks: unknown block {unknown[0]!r}; valid blocks: {BLOCKS}.")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"features.blocks={names}: list each block once, at least one.")
    bad_weights = [k for k in cfg.weights if k not in BLOCKS]
    if bad_weights:
        raise ConfigError(f"features.weights.{bad_weights[0]}: not a block; valid: {BLOCKS}.")
    for name in names:  # checked before any block is built (collab restores a checkpoint)
        _weight(cfg, name)
    return names


def _cold_block_names(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = _as_names(cfg.get("cold_blocks", ()))
    bad = [b for b in names if b not in BLOCKS or b in ("collab", "interactions")]
    if bad:
        content = tuple(b for b in BLOCKS if b not in ("collab", "interactions"))
        raise ConfigError(
            f"features.cold_blocks: {bad[0]!r} cannot describe an item without training users; "
            f"use content blocks: {content}."
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"features.cold_blocks={names}: list each block once.")
    if names and not float(cfg.get("cold_ridge", 1.0)) > 0:
        raise ConfigError(f"features.cold_ridge={cfg.cold_ridge}: use a penalty > 0.")
    return names


def _cold_rows_from_content(
    raws: dict[str, np.ndarray],
    names: tuple[str, ...],
    cfg: ml_collections.ConfigDict,
    data: SequenceData,
    items: ItemInfo,
) -> np.ndarray:
    """The interactions block of `raws` (the raw blocks built so far) with its cold rows (flag
    column set) replaced by a ridge regression's prediction from the content blocks `names`
    (reused from `raws` where built already), fitted on the warm rows."""
    raw = raws["interactions"]
    cold = raw[:, -1] > 0
    if not cold.any() or cold.all():
        return raw
    parts = []
    for name in names:
        try:
            block = raws[name] if name in raws else raw_block(name, cfg, data, items)
        except MissingContent:  # the same block in features.blocks says so; here: silent
            continue
        parts.append(standardised(block))
    if not parts:
        logging.warning(
            "features.cold_blocks=%s: this dataset has none of them, so the %d items without a "
            "training interaction share one 'interactions' row.",
            names,
            int(cold.sum()),
        )
        return raw
    content = np.concatenate(parts, axis=1)
    _check_finite(content, "cold_blocks", "in its input (e.g. a NaN genome relevance)")
    ridge = Ridge(alpha=float(cfg.get("cold_ridge", 1.0)))
    ridge.fit(content[~cold], raw[~cold, :-1])
    out = raw.copy()
    out[cold, :-1] = ridge.predict(content[cold])
    out[:, -1] = 0.0  # every row is now a point in the warm items' space
    logging.info(
        "features: %d items without a training interaction get 'interactions' rows predicted "
        "from %s (ridge regression fitted on %d items).",
        int(cold.sum()),
        list(names),
        int((~cold).sum()),
    )
    return out


def _weight(cfg: ml_collections.ConfigDict, name: str) -> float:
    weight = float(cfg.weights.get(name, 1.0))
    if not weight >= 0:
        raise ConfigError(f"features.weights.{name}={weight}: use a weight >= 0.")
    return weight


def standardised(raw: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column; constant columns 0; / sqrt(non-constant columns)."""
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    varies = std > 1e-6 * np.abs(raw).max(axis=0, initial=0.0)  # float noise is no variation
    out = np.zeros_like(raw)
    out[:, varies] = (raw[:, varies] - mean[varies]) / std[varies]
    return out / np.sqrt(max(int(varies.sum()), 1))


def _check_finite(block: np.ndarray, name: str, where: str) -> None:
    bad = ~np.isfinite(block)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataFormatError(
            f"features block {name!r}: {int(bad.sum())} NaN/inf values {where} (first at dense "
            f"item {row + 1}, column {col})."
        )


class MissingContent(ConfigError):
    """A features block the dataset has no content for (skipped under features.missing=skip)."""

    def __init__(self, message: str, skipped: str = ""):
        super().__init__(message)
        self.skipped = skipped or message  # the warning when the block is skipped instead


def _lacks(name: str, what: str) -> MissingContent:
    return MissingContent(
        f"features block {name!r}: {what} in this dataset. Drop {name!r} from features.blocks.",
        f"features block {name!r} skipped: {what} in this dataset (name only the blocks the "
        "dataset has in features.blocks to silence this).",
    )


def _rows(data: SequenceData, items: ItemInfo) -> np.ndarray:
    """[n_items] row of each dense item (1..n_items) in `items`, -1 where it has no info."""
    return items.rows(data.item_ids[1:]) if len(items) else np.full(data.n_items, -1)


def _genres(cfg, data: SequenceData, items: ItemInfo) -> np.ndarray:
    multi_hot, names = item_arrays.genre_multi_hot(data, items)  # [V, G]
    keep = [k for k, genre in enumerate(names) if genre != _NO_GENRE]
    if not keep:
        raise _lacks("genres", "no item has a genre")
    return multi_hot[1:, keep]


def _year(cfg, data: SequenceData, items: ItemInfo) -> np.ndarray:
    width = int(cfg.year_bucket_years)
    if width < 1:
        raise ConfigError(f"features.year_bucket_years={width}: use a bucket width >= 1 year.")
    rows = _rows(data, items)
    years = np.where(rows >= 0, items.years[rows] if len(items) else 0, 0)
    known = years > 0
    if not known.any():
        raise _lacks("year", "no item has a release year")
    # One column per occupied bucket [k*width, (k+1)*width), then "unknown year".
    buckets, column = np.unique(years[known] // width, return_inverse=True)
    out = np.zeros((data.n_items, len(buckets) + 1))
    out[np.flatnonzero(known), column] = 1.0
    out[~known, -1] = 1.0
    return out


def _svd(tfidf: sparse.csr_matrix, dim: int, name: str) -> np.ndarray:
    """[n, k] truncated-SVD projection, k = `dim` clamped to the matrix's rank bound."""
    n_docs, n_terms = tfidf.shape
    k = min(int(dim), n_docs, n_terms)
    if k < dim:
        logging.warning(
            "features block %r: %d items x %d terms, so %d SVD components instead of %d",
            name,
            n_docs,
            n_terms,
            k,
            dim,
        )
    if n_terms < 2:  # TruncatedSVD needs two features; one column is its own projection
        return tfidf.toarray()
    svd = TruncatedSVD(n_components=k, random_state=_SVD_SEED)
    z = svd.fit_transform(tfidf)
    # Components beyond the true rank are rounding noise that standardisation would blow up.
    z[:, svd.singular_values_ <= 1e-6 * svd.singular_values_.max()] = 0.0
    return z


def _title(cfg, data: SequenceData, items: ItemInfo) -> np.ndarray:
    rows = _rows(data, items)
    docs = [items.titles[r] if r >= 0 else "" for r in rows]
    try:
        tfidf = TfidfVectorizer().fit_transform(docs)
    except ValueError:  # sklearn: "empty vocabulary"
        raise _lacks("title", "no item title has a word") from None
    return _svd(tfidf, cfg.title_dim, "title")


def tag_counts(data: SequenceData, items: ItemInfo) -> tuple[sparse.csr_matrix, tuple[str, ...]]:
    """([n_items, n_tags] user-tag application counts, tag names), row i-1 = dense item i."""
    vocab: dict[str, int] = {}
    indptr, indices, counts = [0], [], []
    for r in _rows(data, items):
        if r >= 0:
            for tag, count in items.tags[r].items():
                indices.append(vocab.setdefault(tag, len(vocab)))
                counts.append(count)
        indptr.append(len(indices))
    shape = (data.n_items, len(vocab))
    matrix = sparse.csr_matrix((np.asarray(counts, np.float64), indices, indptr), shape=shape)
    return matrix, tuple(vocab)


def _tags(cfg, data: SequenceData, items: ItemInfo) -> np.ndarray:
    counts, vocab = tag_counts(data, items)
    if not vocab:
        raise _lacks("tags", "no item has a user tag")
    tfidf = TfidfTransformer().fit_transform(counts)  # smooth idf, l2-normalised rows
    no_tags = (counts.getnnz(axis=1) == 0).astype(np.float64)
    return np.concatenate([_svd(tfidf, cfg.tags_dim, "tags"), no_tags[:, None]], axis=1)


def _genome(cfg, data: SequenceData, items: ItemInfo) -> np.ndarray:
    if items.genome is None or not items.genome.size:
        raise MissingContent(
            "features block 'genome': this dataset has no tag genome (genome-scores.csv, "
            "genome-tags.csv). Drop 'genome' from features.blocks; the genome ships with "
            "ML-20M, ML-25M and ML-32M.",
            "features block 'genome' skipped: this dataset has no tag genome (it ships with "
            "ML-20M, ML-25M and ML-32M).",
        )
    if cfg.genome_missing not in ("mean", "zero"):
        raise ConfigError(f"features.genome_missing={cfg.genome_missing!r}: use 'mean' or 'zero'.")
    rows = items.genome_rows(data.item_ids[1:])
    has = rows >= 0
    if not has.any():
        raise _lacks("genome", "no item of the interactions has a genome vector")
    out = np.zeros((data.n_items, items.genome.shape[1] + 1))
    out[has, :-1] = items.genome[rows[has]]
    if cfg.genome_missing == "mean":
        out[~has, :-1] = out[has, :-1].mean(axis=0)
    out[~has, -1] = 1.0  # "missing genome"
    k = min(int(cfg.genome_dim), int(has.sum()))
    if 0 < k < items.genome.shape[1]:
        # 1,128 correlated relevance scores: the leading principal components keep most of
        # their variance at a fraction of the width the tokenizer's first layer must read.
        pca = PCA(n_components=k, random_state=_SVD_SEED).fit(out[has, :-1])
        out = np.concatenate([pca.transform(out[:, :-1]), out[:, -1:]], axis=1)
    return out


def _collab(cfg, data: SequenceData, items: ItemInfo, collab_table: CollabTable | None):
    """Rows 1..n_items of the item table of `collab_workdir`'s best checkpoint."""
    if not cfg.collab_workdir:
        raise ConfigError(
            "features block 'collab' needs features.collab_workdir: the --workdir of a run "
            "trained (--mode train) on this same data."
        )
    if collab_table is None:
        raise ConfigError(
            "features block 'collab' reads a trained run's item table: build the features with "
            "collab_table=onerec_jax.runs.collab_item_table (as --mode tokenize does)."
        )
    return collab_table(cfg.collab_workdir, data, items)


def _interactions(cfg, data: SequenceData, items: ItemInfo) -> np.ndarray:
    """[n_items, k + 1]: each item's training users as TF-IDF (a user's count is how often
    they interacted with it), truncated SVD, then a "no training user" column."""
    users, items = data.prefix_items("train")
    counts = sparse.csr_matrix(
        (np.ones(len(items)), (items - 1, users)), shape=(data.n_items, data.n_users)
    )  # duplicates summed
    if not counts.nnz:
        raise _lacks("interactions", "no training interaction")
    tfidf = TfidfTransformer().fit_transform(counts)
    cold = (counts.getnnz(axis=1) == 0).astype(np.float64)
    return np.concatenate([_svd(tfidf, cfg.interactions_dim, "interactions"), cold[:, None]], 1)
