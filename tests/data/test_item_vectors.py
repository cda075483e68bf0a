"""Own item vectors (data/item_vectors.py): every layout, every check, the feature block and the
OneRec item head's "vectors" side feature."""

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onerec_jax.data import features, item_vectors
from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError, DataFormatError
from onerec_jax.models.registry import build_model
from onerec_jax.training import setup

# dense items 1..4 are source ids 100, 200, 300, 400
IDS = np.array([100, 200, 300, 400])
VECTORS = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def _data():
    return SequenceData(
        offsets=np.array([0, 4, 8]),
        items=np.array([1, 2, 3, 4, 4, 3, 2, 1], np.int32),
        timestamps=np.arange(8),
        ratings=np.ones(8, np.float32),
        user_ids=np.array([10, 20]),
        item_ids=np.array([-1, *IDS]),
        options={},
    )


def _cfg(path, **options):
    cfg = base_config().features
    cfg.vectors_path = str(path)
    cfg.update(options)
    return cfg


def _write(tmp_path, layout, ids=IDS, vectors=VECTORS, name="v"):
    """The vectors in `layout`, rows in a shuffled order (alignment is by id, not position)."""
    order = np.array([2, 0, 3, 1])[: len(ids)] if len(ids) == 4 else np.arange(len(ids))
    ids, vectors = np.asarray(ids)[order], np.asarray(vectors)[order]
    if layout == "npy":
        path = tmp_path / f"{name}.npy"
        np.save(path, np.concatenate([ids[:, None].astype(np.float64), vectors], axis=1))
    elif layout == "npz":
        path = tmp_path / f"{name}.npz"
        np.savez(path, ids=ids, vectors=vectors)
    elif layout == "parquet_list":
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"movieId": ids, "embedding": list(vectors)}), path)
    else:  # one column per dimension
        path = tmp_path / f"{name}.parquet"
        cols = {f"d{j}": vectors[:, j] for j in range(vectors.shape[1])}
        pq.write_table(pa.table({"item_id": ids, **cols}), path)
    return path


@pytest.mark.parametrize("layout", ["npy", "npz", "parquet_list", "parquet_wide"])
def test_every_layout_aligns_by_item_id(tmp_path, layout):
    out, has = item_vectors.aligned_vectors(_cfg(_write(tmp_path, layout)), _data())
    np.testing.assert_array_equal(out, VECTORS)  # row i-1 = dense item i = IDS[i-1]
    assert has.all()


def test_feature_block_is_the_standardised_vectors(tmp_path):
    cfg = _cfg(_write(tmp_path, "npz"), blocks=("vectors",))
    out = features.build_features(cfg, _data(), None)
    mean, std = VECTORS.mean(0), VECTORS.std(0)
    want = (VECTORS - mean) / std / np.sqrt(3)  # 3 varying columns
    np.testing.assert_allclose(out.matrix[1:], want, atol=1e-6)
    assert out.blocks == (("vectors", 0, 3),) and not out.matrix[0].any()


def test_missing_items_error_or_filled(tmp_path):
    path = _write(tmp_path, "npz", ids=IDS[:3], vectors=VECTORS[:3])  # item 400 has none
    with pytest.raises(
        DataFormatError,
        match=r"1 of the catalogue's 4 items have no vector "
        r"\(e\.g\. 400\).*vectors_missing=mean or zero",
    ):
        item_vectors.aligned_vectors(_cfg(path), _data())
    block = item_vectors.vectors_block(_cfg(path, vectors_missing="mean"), _data())
    np.testing.assert_allclose(block[3], [*VECTORS[:3].mean(0), 1.0])  # mean + "no vector"
    np.testing.assert_allclose(block[:3], np.c_[VECTORS[:3], np.zeros(3)])
    block = item_vectors.vectors_block(_cfg(path, vectors_missing="zero"), _data())
    np.testing.assert_allclose(block[3], [0, 0, 0, 1.0])


def test_ids_outside_the_catalogue_are_ignored(tmp_path):
    ids, vectors = np.r_[IDS, 999], np.r_[VECTORS, [[9.0, 9.0, 9.0]]]
    out, has = item_vectors.aligned_vectors(_cfg(_write(tmp_path, "npz", ids, vectors)), _data())
    np.testing.assert_array_equal(out, VECTORS)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda p: p / "none.npz", ConfigError, "no such file"),
        (lambda p: (p / "v.csv").write_text("x") and p / "v.csv", ConfigError, "unknown extension"),
        (
            lambda p: np.savez(p / "w.npz", item=IDS, vectors=VECTORS) or p / "w.npz",
            DataFormatError,
            r"needs arrays 'ids' \[n\] and 'vectors'",
        ),
        (lambda p: np.save(p / "w.npy", IDS) or p / "w.npy", DataFormatError, r"\[n, 1 \+ d\]"),
        (
            lambda p: _write(p, "npz", ids=[100, 200, 200, 400]),
            DataFormatError,
            "item 200 has 2 vectors",
        ),
        (
            lambda p: _write(p, "npy", ids=[100, 200.5, 300, 400]),
            DataFormatError,
            "item id 200.5 is not a whole number",
        ),
        (
            lambda p: _write(p, "npz", vectors=np.where(VECTORS == 3.0, np.nan, VECTORS)),
            DataFormatError,
            r"item 300's vector holds NaN or infinite values \(1 rows do\)",
        ),
        (
            lambda p: (
                pq.write_table(
                    pa.table({"movieId": IDS, "v": [[1.0, 2.0], [1.0], [0.0, 1.0], [2.0, 2.0]]}),
                    p / "r.parquet",
                )
                or p / "r.parquet"
            ),
            DataFormatError,
            "item 200's vector has 1 values, item 100's 2",
        ),
        (
            lambda p: (
                pq.write_table(pa.table({"key": IDS, "v": VECTORS[:, 0]}), p / "k.parquet")
                or p / "k.parquet"
            ),
            DataFormatError,
            "no item id column",
        ),
        (
            lambda p: (
                pq.write_table(
                    pa.table({"movieId": IDS, "name": ["a", "b", "c", "d"]}), p / "s.parquet"
                )
                or p / "s.parquet"
            ),
            DataFormatError,
            r"numeric columns only; \['name'\] is not",
        ),
    ],
)
def test_bad_files_name_the_problem(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        item_vectors.aligned_vectors(_cfg(make(tmp_path)), _data())


def test_width_check_and_options(tmp_path):
    path = _write(tmp_path, "npz")
    with pytest.raises(DataFormatError, match="3 wide; features.vectors_width=4"):
        item_vectors.aligned_vectors(_cfg(path, vectors_width=4), _data())
    assert item_vectors.aligned_vectors(_cfg(path, vectors_width=3), _data())[0].shape == (4, 3)
    with pytest.raises(ConfigError, match="vectors_missing='drop'"):
        item_vectors.aligned_vectors(_cfg(path, vectors_missing="drop"), _data())
    with pytest.raises(ConfigError, match="needs features.vectors_path"):
        item_vectors.aligned_vectors(_cfg(""), _data())


def test_item_head_adds_the_projected_vector(tmp_path):
    c = apply_variant(base_config(), "onerec")
    c.model.update(dim=8, num_layers=1, num_heads=1, mlp_dim=8, side_features=("vectors",))
    c.features.vectors_path = str(_write(tmp_path, "parquet_list"))
    data = _data()
    info = setup.data_info(data, None, 4, vectors=c.features)
    np.testing.assert_allclose(info.item_vectors[1:], item_features_reference(VECTORS), atol=1e-6)
    model = build_model(c, info)
    params = jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        model.init(jax.random.key(0), {"inputs": np.zeros((1, 4), np.int32)}),
        is_leaf=lambda x: hasattr(x, "unbox"),
    )
    w = np.asarray(params["vector_projection"])
    assert w.shape == (3, 8)
    table = np.asarray(model.item_table(params))
    ids = np.asarray(params["id_embedding"]["embedding"])
    np.testing.assert_allclose(table[1:5], ids[1:5] + info.item_vectors[1:] @ w, atol=1e-5)
    np.testing.assert_allclose(table[0], ids[0], atol=1e-6)  # padding: no vector


def item_features_reference(v):
    return (v - v.mean(0)) / v.std(0) / np.sqrt(v.shape[1])


def test_item_head_without_loaded_vectors_says_how(tmp_path):
    c = apply_variant(base_config(), "onerec")
    c.model.side_features = ("genres", "vectors")
    with pytest.raises(ConfigError, match="set features.vectors_path"):
        build_model(c, setup.data_info(_data(), None, 4))
