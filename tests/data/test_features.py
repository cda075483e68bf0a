"""The item feature matrix: hand-made items checked by hand or against numpy references."""

import dataclasses
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from onerec_jax import runs
from onerec_jax.data import dataset, features, movielens, sequences
from onerec_jax.data.records import ItemInfo
from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError, DataFormatError
from onerec_jax.training import train

ML_LATEST_SMALL = Path(
    os.environ.get("ONEREC_ML_LATEST_SMALL")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-latest-small"
)


def _data():
    # Dense items 1..5 are source ids 100..500; item 500 has no row in the item table.
    return SequenceData(
        offsets=np.array([0, 4, 8]),
        items=np.array([1, 2, 3, 4, 5, 4, 3, 1], np.int32),
        timestamps=np.arange(8),
        ratings=np.ones(8, np.float32),
        user_ids=np.array([10, 20]),
        item_ids=np.array([-1, 100, 200, 300, 400, 500]),
        options={},
    )


def _items(genome=True, tags=True):
    g = np.array([[0.1, 0.5, 0.9], [0.3, 0.5, 0.7], [0.8, 0.5, 0.2]], np.float32)
    tag_dicts = [
        {"pixar": 3, "funny": 1},
        {"cyberpunk": 2, "philosophy": 1, "funny": 1},
        {},
        {"heist": 2, "funny": 1, "pacino": 1},
    ]
    return ItemInfo(
        item_ids=np.array([400, 100, 300, 200]),
        titles=["Toy Story", "Matrix, The", "Toy Soldiers", "Heat"],
        years=np.array([1995, 1999, 0, 1990], np.int32),
        genres=[
            ("Animation", "Comedy"),
            ("Action", "Sci-Fi"),
            ("(no genres listed)",),
            ("Action", "Crime"),
        ],
        tags=tag_dicts if tags else [{}, {}, {}, {}],
        genome=g if genome else None,
        genome_item_ids=np.array([100, 300, 400]) if genome else None,
        genome_tags=("dark", "long", "funny") if genome else (),
    )


def _cfg(blocks, **options):
    cfg = base_config().features
    cfg.blocks = tuple(blocks)
    cfg.update(options)
    return cfg


def _reference_standardise(x):
    """Independent: population std per column, constant columns 0, / sqrt(varying columns)."""
    x = np.asarray(x, np.float64)
    std = x.std(axis=0)
    varies = std > 1e-9
    out = np.zeros_like(x)
    out[:, varies] = (x[:, varies] - x.mean(axis=0)[varies]) / std[varies]
    return out / np.sqrt(varies.sum())


# Genres sorted: Action, Animation, Comedy, Crime, Sci-Fi ("(no genres listed)" is no genre).
GENRES = [[1, 0, 0, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
# 5-year buckets: 1990 -> [1990, 1995), 1995 and 1999 -> [1995, 2000); 300 and 500: unknown.
YEARS_5 = [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1]]


def test_genre_and_year_blocks_by_hand():
    cfg = _cfg(["genres", "year"])
    np.testing.assert_array_equal(features.raw_block("genres", cfg, _data(), _items()), GENRES)
    np.testing.assert_array_equal(features.raw_block("year", cfg, _data(), _items()), YEARS_5)
    cfg.year_bucket_years = 10  # all known years in [1990, 2000)
    np.testing.assert_array_equal(
        features.raw_block("year", cfg, _data(), _items()), [[1, 0], [1, 0], [0, 1], [1, 0], [0, 1]]
    )


def test_blocks_are_standardised_scaled_and_weighted():
    cfg = _cfg(["genres", "year"])
    cfg.weights.genres, cfg.weights.year = 2.0, 0.5
    out = features.build_features(cfg, _data(), _items())
    assert out.matrix.dtype == np.float32 and out.matrix.shape == (6, 8)
    assert out.blocks == (("genres", 0, 5), ("year", 5, 8))
    np.testing.assert_array_equal(out.matrix[0], 0.0)  # padding
    genres, years = out.block("genres")[1:], out.block("year")[1:]
    np.testing.assert_allclose(genres, 2.0 * _reference_standardise(GENRES), atol=1e-6)
    np.testing.assert_allclose(years, 0.5 * _reference_standardise(YEARS_5), atol=1e-6)
    # Action = [1, 1, 0, 0, 0]: mean 0.4, std sqrt(0.24); scaled by 2 / sqrt(5 columns).
    assert genres[0, 0] == pytest.approx(2 * 0.6 / np.sqrt(0.24) / np.sqrt(5), rel=1e-6)
    np.testing.assert_allclose(genres.mean(axis=0), 0.0, atol=1e-6)
    # Unit mean squared row norm before the weight.
    assert (genres**2).sum(axis=1).mean() == pytest.approx(4.0, rel=1e-5)
    assert (years**2).sum(axis=1).mean() == pytest.approx(0.25, rel=1e-5)


def test_title_svd_keeps_the_tfidf_geometry_and_clamps_its_width():
    cfg = _cfg(["title"], title_dim=32)
    raw = features.raw_block("title", cfg, _data(), _items())
    # 5 documents, 6 terms: 5 components; the 4 non-empty titles have rank 4, so one is zeroed.
    assert raw.shape == (5, 5)
    np.testing.assert_array_equal(np.abs(raw).max(axis=0) > 1e-9, [1, 1, 1, 1, 0])
    # Full-rank SVD keeps inner products: cosine of the two "toy" titles, smooth idf by hand.
    gram = raw @ raw.T
    toy, other = np.log(6 / 3) + 1, np.log(6 / 2) + 1
    np.testing.assert_allclose(np.diag(gram), [1, 1, 1, 1, 0], atol=1e-9)
    assert gram[2, 3] == pytest.approx(toy**2 / (toy**2 + other**2), rel=1e-9)
    assert abs(gram[0, 1]) < 1e-9 and abs(gram[0, 3]) < 1e-9
    block = features.build_features(cfg, _data(), _items()).block("title")
    np.testing.assert_array_equal(block[:, 4], 0.0)


def _tfidf_svd2(counts):
    """[rows, 2]: numpy's smooth-idf, l2-normalised TF-IDF of `counts` [rows, terms], projected
    on its top two singular directions (checked distinct, so unique up to sign)."""
    df = (counts > 0).sum(axis=0)
    tfidf = counts * (np.log((len(counts) + 1) / (1 + df)) + 1)  # smooth idf over the rows
    norms = np.linalg.norm(tfidf, axis=1, keepdims=True)
    tfidf = np.divide(tfidf, norms, out=np.zeros_like(tfidf), where=norms > 0)
    u, s, _ = np.linalg.svd(tfidf)
    assert s[0] > 1.01 * s[1] > 1.01 * s[2]  # distinct: the top-2 components are unique
    return u[:, :2] * s[:2]


def test_tags_block_matches_a_numpy_tfidf_and_svd():
    cfg = _cfg(["tags"], tags_dim=2)
    # Dense order: 100, 200, 300 (no tags), 400, 500 (no item row).
    vocab = ["cyberpunk", "funny", "heist", "pacino", "philosophy", "pixar"]
    counts = np.array(
        [[2, 1, 0, 0, 1, 0], [0, 1, 2, 1, 0, 0], [0] * 6, [0, 1, 0, 0, 0, 3], [0] * 6], np.float64
    )
    matrix, names = features.tag_counts(_data(), _items())
    order = [names.index(t) for t in vocab]
    np.testing.assert_array_equal(matrix.toarray()[:, order], counts)
    reference = np.concatenate([_tfidf_svd2(counts), [[0], [0], [1], [0], [1]]], axis=1)
    raw = features.raw_block("tags", cfg, _data(), _items())
    signs = np.sign((raw * reference).sum(axis=0))  # SVD components are defined up to sign
    np.testing.assert_allclose(raw * signs, reference, atol=1e-9)
    block = features.build_features(cfg, _data(), _items()).block("tags")[1:]
    np.testing.assert_allclose(block * signs, _reference_standardise(reference), atol=1e-6)


@pytest.mark.parametrize("missing, imputed", [("mean", [0.4, 0.5, 0.6]), ("zero", [0.0, 0.0, 0.0])])
def test_genome_imputation_and_missing_flag(missing, imputed):
    cfg = _cfg(["genome"], genome_missing=missing)
    raw = features.raw_block("genome", cfg, _data(), _items())
    # Dense 1, 3, 4 have genome rows (100, 300, 400); 2 and 5 are imputed and flagged.
    want = [
        [0.1, 0.5, 0.9, 0],
        [*imputed, 1],
        [0.3, 0.5, 0.7, 0],
        [0.8, 0.5, 0.2, 0],
        [*imputed, 1],
    ]
    np.testing.assert_allclose(raw, want, atol=1e-6)
    block = features.build_features(cfg, _data(), _items()).block("genome")[1:]
    np.testing.assert_allclose(block, _reference_standardise(want), atol=1e-5)
    if missing == "mean":  # the "long" column is constant 0.5: left at 0, not counted
        np.testing.assert_array_equal(block[:, 1], 0.0)
        assert (block**2).sum(axis=1).mean() == pytest.approx(1.0, rel=1e-5)


def test_clear_errors():
    with pytest.raises(ConfigError, match=r"unknown block 'colour'.*genres"):
        features.build_features(_cfg(["genres", "colour"]), _data(), _items())
    with pytest.raises(ConfigError, match=r"no tag genome.*Drop 'genome'.*ML-25M"):
        features.build_features(_cfg(["genome"], missing="error"), _data(), _items(genome=False))
    with pytest.raises(ConfigError, match=r"'tags'.*no item has a user tag.*Drop 'tags'"):
        features.build_features(_cfg(["tags"], missing="error"), _data(), _items(tags=False))
    with pytest.raises(ConfigError, match="features.missing='ignore'"):
        features.build_features(_cfg(["tags"], missing="ignore"), _data(), _items())
    with pytest.raises(ConfigError, match="genome_missing='median'"):
        features.build_features(_cfg(["genome"], genome_missing="median"), _data(), _items())
    items = _items()
    items.genome[1, 2] = np.nan
    with pytest.raises(DataFormatError, match=r"block 'genome'.*NaN"):
        features.build_features(_cfg(["genres", "genome"]), _data(), items)
    with pytest.raises(ConfigError, match="collab_workdir"):
        features.build_features(_cfg(["collab"]), _data(), _items(), runs.collab_item_table)
    with pytest.raises(ConfigError, match="collab_table=onerec_jax.runs.collab_item_table"):
        features.build_features(_cfg(["collab"], collab_workdir="/run"), _data(), _items())
    with pytest.raises(ConfigError, match="config.json or checkpoints/ is missing"):
        features.build_features(
            _cfg(["collab"], collab_workdir="/nonexistent"),
            _data(),
            _items(),
            runs.collab_item_table,
        )


def _tiny_run_config(root):
    c = apply_variant(base_config(), "sasrec")
    c.data.update(synthetic="demo", root=str(root), max_len=20, progress=False)
    c.model.update(dim=16, num_layers=1, num_heads=1, mlp_dim=16)
    c.train.update(batch_size=16, num_steps=2, eval_every_steps=2, progress=False)
    c.optim.warmup_steps = 1
    c.eval.update(batch_size=512, chunk_size=256)
    c.mesh.num_devices = 1
    return c


def test_collab_block_is_the_standardised_item_table_of_the_best_checkpoint(tmp_path):
    config = _tiny_run_config(tmp_path / "data")
    jax.clear_caches()
    results = train.train_and_evaluate(config, tmp_path / "run")
    data, items = dataset.load_data(config.data)
    cfg = _cfg(["collab"], collab_workdir=str(tmp_path / "run"))
    cfg.weights.collab = 0.5
    out = features.build_features(cfg, data, items, runs.collab_item_table)
    assert out.blocks == (("collab", 0, 16),) and out.matrix.shape == (data.n_items + 1, 16)
    # Independent restore: the raw array tree orbax wrote for the best step.
    step_dir = tmp_path / "run" / "checkpoints" / str(results["best_step"])
    params = ocp.StandardCheckpointer().restore(step_dir / "params")
    table = np.asarray(params["item_embedding"]["embedding"])  # [V, 16]
    np.testing.assert_allclose(out.matrix[1:], 0.5 * _reference_standardise(table[1:]), atol=1e-5)
    np.testing.assert_array_equal(out.matrix[0], 0.0)
    # A run trained on other data (another number of items) is refused, with or without
    # results.json (then the checkpoint's table shape tells).
    with pytest.raises(ConfigError, match="trained on other data .1000 items.*this data has 5"):
        features.build_features(cfg, _data(), _items(), runs.collab_item_table)
    shutil.move(tmp_path / "run" / "results.json", tmp_path / "results.json")
    with pytest.raises(ConfigError, match="trained on other data.*this data has 5"):
        features.build_features(cfg, _data(), _items(), runs.collab_item_table)


@pytest.mark.skipif(not (ML_LATEST_SMALL / "ratings.csv").exists(), reason="no ml-latest-small")
def test_ml_latest_small_default_blocks():
    raw = movielens.read_dataset(ML_LATEST_SMALL)
    data = sequences.build_sequences(raw.interactions, sequences.SequenceOptions())
    cfg = base_config().features  # genres, year, title, tags
    out = features.build_features(cfg, data, raw.items)
    assert out.matrix.shape[0] == data.n_items + 1 == 9_067
    assert [b for b, _, _ in out.blocks] == list(cfg.blocks) and out.blocks[-1][
        2
    ] == out.matrix.shape[1]
    assert np.isfinite(out.matrix).all() and not out.matrix[0].any()
    for name, _, _ in out.blocks:
        assert (out.block(name)[1:] ** 2).sum(axis=1).mean() == pytest.approx(1.0, rel=1e-4)
    assert out.block("title").shape[1] == 32 and out.block("tags").shape[1] == 33
    with pytest.raises(ConfigError, match="no tag genome"):
        features.build_features(_cfg(["genome"], missing="error"), data, raw.items)


def test_genome_principal_components():
    cfg = _cfg(["genome"], genome_missing="mean", genome_dim=2)
    raw = features.raw_block("genome", cfg, _data(), _items())
    full = np.array([[0.1, 0.5, 0.9], [0.3, 0.5, 0.7], [0.8, 0.5, 0.2]])  # dense 1, 3, 4
    centred = full - full.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:2].T  # [3, 2], each column up to its sign
    got = raw[[0, 2, 3], :2]
    signs = np.sign((got * want).sum(0))
    np.testing.assert_allclose(got, want * signs, atol=1e-6)
    np.testing.assert_allclose(raw[[1, 4], :2], 0.0, atol=1e-9)  # imputed mean -> origin
    np.testing.assert_array_equal(raw[:, 2], [0, 1, 0, 0, 1])  # the "missing genome" flag


def _interaction_data():
    # train split = all but each user's last two items: u0 [1, 2, 3, 1], u1 [2, 3, 4, 4],
    # u2 [1, 4, 5]; item 6 is only ever a validation/test item.
    seqs = [[1, 2, 3, 1, 5, 6], [2, 3, 4, 4, 1, 2], [1, 4, 5, 6, 3]]
    n = sum(map(len, seqs))
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum([len(q) for q in seqs])]),
        items=np.concatenate(seqs).astype(np.int32),
        timestamps=np.arange(n),
        ratings=np.ones(n, np.float32),
        user_ids=np.array([10, 20, 30]),
        item_ids=np.arange(7) * 10,
        options={},
    )


def test_interactions_block_matches_a_numpy_tfidf_and_svd_of_training_users_only():
    data = _interaction_data()
    counts = np.array(  # [item, user] training interactions
        [[2, 0, 1], [1, 1, 0], [1, 1, 0], [0, 2, 1], [0, 0, 1], [0, 0, 0]], np.float64
    )
    reference = np.concatenate([_tfidf_svd2(counts), [[0], [0], [0], [0], [0], [1]]], axis=1)
    raw = features.raw_block("interactions", _cfg(["interactions"], interactions_dim=2), data, None)
    signs = np.sign((raw * reference).sum(axis=0))
    np.testing.assert_allclose(raw * signs, reference, atol=1e-9)


def test_interactions_alone_warns_when_untrained_items_share_a_row(caplog):
    data = _interaction_data()  # item 6 alone has no training interaction: no shared row
    features.build_features(_cfg(["interactions"]), data, None)
    assert "no training interaction" not in caplog.text
    items = data.items.copy()
    items[data.offsets[2] - 1] = 7  # user 1's test item: a second untrained item
    data = dataclasses.replace(data, items=items, item_ids=np.arange(8) * 10)
    out = features.build_features(_cfg(["interactions"]), data, None)
    np.testing.assert_array_equal(out.matrix[6], out.matrix[7])
    assert "2 items have no training interaction" in caplog.text and "cold start" in caplog.text


def _cold_items():
    """Content for _interaction_data's items 10..60: genres and a year (item 60 is cold)."""
    return ItemInfo(
        item_ids=np.arange(1, 7) * 10,
        titles=[""] * 6,
        years=np.array([1990, 1990, 2000, 2000, 1990, 2000], np.int32),
        genres=[("A",), ("A", "B"), ("B",), ("B", "C"), ("C",), ("A", "B")],
        tags=[{}] * 6,
    )


def test_cold_items_get_interactions_rows_predicted_from_content(caplog):
    data, items = _interaction_data(), _cold_items()
    cfg = _cfg(["interactions"], interactions_dim=2, cold_blocks=("genres", "year", "tags"))
    cfg.cold_ridge = 0.5
    out = features.build_features(cfg, data, items)
    raw = features.raw_block("interactions", cfg, data, items)  # item 6: zeros, flag 1
    # Independent ridge regression with an unpenalised intercept (closed form, centred on the
    # warm items 1..5) from the standardised content: genres A B C, then the 5-year buckets
    # [1990, 1995) and [2000, 2005) (+ an all-zero "unknown year" column); no tags (skipped).
    genres = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]])
    years = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    x = np.concatenate([_reference_standardise(genres), _reference_standardise(years)], 1)
    y = raw[:5, :2]
    xm, ym = x[:5].mean(0), y.mean(0)
    xc = x[:5] - xm
    w = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(x.shape[1]), xc.T @ (y - ym))
    want = raw[:, :2].copy()
    want[5] = (x[5] - xm) @ w + ym
    # the flag column is 0 for every item now, so standardisation drops it
    np.testing.assert_allclose(out.matrix[1:, :2], _reference_standardise(want), atol=1e-6)
    np.testing.assert_array_equal(out.matrix[:, 2], 0.0)
    assert not np.allclose(want[5], 0.0)  # a row of its own, not the shared origin
    assert "no training interaction" not in caplog.text  # no shared rows: no warning
    # no cold block the dataset has: the shared row, said so
    caplog.clear()
    cfg.cold_blocks = ("tags",)
    out = features.build_features(cfg, data, items)
    np.testing.assert_allclose(out.matrix[1:], _reference_standardise(raw), atol=1e-6)
    assert "has none of them" in caplog.text
    for bad, match in [
        (("interactions",), "cannot describe an item without training users"),
        (("genres", "genres"), "list each block once"),
    ]:
        with pytest.raises(ConfigError, match=match):
            features.build_features(_cfg(["interactions"], cold_blocks=bad), data, items)
    with pytest.raises(ConfigError, match="cold_ridge"):
        features.build_features(
            _cfg(["interactions"], cold_blocks=("genres",), cold_ridge=0.0), data, items
        )


def test_missing_blocks_are_skipped_and_no_content_falls_back_to_interactions(caplog):
    out = features.build_features(_cfg(["genres", "tags", "genome"]), _data(), _items(tags=False))
    assert [b for b, _, _ in out.blocks] == ["genres", "genome"]
    assert "block 'tags' skipped: no item has a user tag" in caplog.text
    empty = ItemInfo(
        item_ids=np.arange(1, 7) * 10,
        titles=[""] * 6,
        years=np.zeros(6, np.int32),
        genres=[()] * 6,
        tags=[{}] * 6,
    )
    data = _interaction_data()
    caplog.clear()
    out = features.build_features(_cfg(["genres", "year", "title", "tags"]), data, empty)
    assert [b for b, _, _ in out.blocks] == ["interactions"]
    assert "has none of them" in caplog.text and "collaborative embeddings" in caplog.text
    assert out.matrix.shape == (7, 3 + 1)  # 3 users bound the SVD: 3 components + the flag
    raw = features.raw_block("interactions", _cfg(["interactions"]), data, empty)
    np.testing.assert_allclose(out.matrix[1:], _reference_standardise(raw), atol=1e-6)
    with pytest.raises(ConfigError, match="no item has a genre"):
        features.build_features(_cfg(["genres"], missing="error"), data, empty)
