"""SASRec and the OneRec item head: causality, left-padding invariance, tied output, features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model

V = 30


def _info(with_features=True):
    rng = np.random.default_rng(0)
    genres = (rng.random((V, 4)) < 0.4).astype(np.float32)
    genres[0] = 0
    years = rng.integers(1, 6, V).astype(np.int32)
    years[0] = 0
    return DataInfo(
        n_items=V - 1,
        max_len=12,
        item_counts=np.arange(V),
        item_genres=genres if with_features else None,
        item_year_bucket=years if with_features else None,
    )


def _model(name, **model):
    c = apply_variant(base_config(), name)
    c.model.update(dim=16, num_layers=2, num_heads=2, mlp_dim=32, dropout=0.0, **model)
    if name == "sasrec":
        c.model.num_heads = 1
    return build_model(c, _info())


def _inputs():
    return jnp.array([[0, 0, 0, 5, 7, 2, 9, 11], [0, 0, 0, 0, 0, 0, 3, 4]], jnp.int32)


MODELS = [
    ("sasrec", {}),
    ("sasrec", {"block": "", "position_origin": "end", "init_std": 0.0}),
    ("sasrec", {"block": "", "prenorm": False}),
    ("onerec", {}),
    ("onerec", {"positions": "learned", "fusion": "concat"}),
    ("onerec", {"positions": "none"}),
]


@pytest.mark.parametrize("name, extra", MODELS)
def test_causal_and_left_padding_invariant(name, extra):
    model = _model(name, **extra)
    inputs = _inputs()
    params = model.init(jax.random.key(0), {"inputs": inputs})
    hidden = model.apply(params, inputs, train=False)  # [2, 8, 16]
    # Changing a later item leaves every earlier real position unchanged (causal attention;
    # padding slots 0-2 carry no meaning and are never scored).
    changed = inputs.at[0, 6].set(13)
    hidden2 = model.apply(params, changed, train=False)
    np.testing.assert_allclose(hidden2[0, 3:6], hidden[0, 3:6], atol=1e-6)
    assert not np.allclose(hidden2[0, 6:], hidden[0, 6:])
    # More left padding (a wider bucket) does not change the real positions' outputs.
    wider = jnp.pad(inputs, ((0, 0), (4, 0)))
    hidden3 = model.apply(params, wider, train=False)
    np.testing.assert_allclose(hidden3[:, 4:][inputs > 0], hidden[inputs > 0], atol=1e-5)


def test_sasrec_output_table_is_the_input_embedding():
    model = _model("sasrec")
    params = model.init(jax.random.key(0), {"inputs": _inputs()})
    table = model.item_table(params)
    assert table.shape == (V, 16)
    np.testing.assert_array_equal(table, params["item_embedding"]["embedding"].value)


def test_onerec_side_features_enter_the_item_table():
    model = _model("onerec")
    params = jax.tree.map(lambda x: x, model.init(jax.random.key(0), {"inputs": _inputs()}))
    table = np.asarray(model.item_table(params))
    ids = np.asarray(params["id_embedding"]["embedding"].value)[:V]
    genre = np.asarray(params["genre_embedding"].value)
    year = np.asarray(params["year_embedding"].value)
    info = _info()
    g = info.item_genres / np.maximum(info.item_genres.sum(-1, keepdims=True), 1)
    np.testing.assert_allclose(table, ids + g @ genre + year[info.item_year_bucket], atol=1e-5)


def test_onerec_aux_loss_adds_to_next_item_loss():
    batch = {
        "inputs": _inputs(),
        "targets": jnp.roll(_inputs(), -1, axis=1),
        "mask": jnp.roll(_inputs(), -1, axis=1) > 0,
    }
    plain, aux = _model("onerec"), _model("onerec", aux_weight=0.5, aux_mask_prob=0.5)
    params = plain.init(jax.random.key(0), batch)
    loss0, m0 = plain.loss(params, batch, jax.random.key(1))
    loss1, m1 = aux.loss(params, batch, jax.random.key(1))
    np.testing.assert_allclose(m1["next_item_loss"], loss0, rtol=1e-6)
    np.testing.assert_allclose(loss1, m1["next_item_loss"] + 0.5 * m1["aux_loss"], rtol=1e-6)
    assert float(m1["aux_loss"]) > 0


def test_unknown_model_and_features_are_config_errors():
    c = base_config()
    c.model.name = "transformer_xl"
    with pytest.raises(ConfigError, match="model.name='transformer_xl': no such model.*sasrec"):
        build_model(c, _info())
    c = apply_variant(base_config(), "onerec")
    c.model.side_features = ("genres", "colour")
    with pytest.raises(ConfigError, match=r"unknown \['colour'\]"):
        build_model(c, _info())


def test_side_features_the_data_lacks_are_left_out_with_a_warning(caplog):
    c = apply_variant(base_config(), "onerec")  # genres and year
    model = build_model(c, _info(with_features=False))
    assert model.module.item_genres is None and model.module.item_year_bucket is None
    assert "no item genres or year" in caplog.text


def test_onerec_semantic_ids_enter_the_item_table():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, (V, 2)).astype(np.int32)
    codes[:, 1] = rng.integers(0, 3, V)
    codes[0] = 0  # the padding row (masked)
    info = DataInfo(
        n_items=V - 1, max_len=12, item_counts=np.arange(V), item_codes=codes, code_sizes=(4, 3)
    )
    c = apply_variant(base_config(), "onerec")
    c.model.update(dim=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0)
    c.model.side_features = ("semantic_ids",)
    model = build_model(c, info)
    params = model.init(jax.random.key(0), {"inputs": _inputs()})
    table = np.asarray(model.item_table(params))
    ids = np.asarray(params["id_embedding"]["embedding"].value)[:V]
    code_rows = np.asarray(params["code_embedding"].value)  # [4 + 3, 16]
    expected = ids + code_rows[codes[:, 0]] + code_rows[4 + codes[:, 1]]
    expected[0] = ids[0]
    np.testing.assert_allclose(table, expected, atol=1e-5)
    c.model.side_features = ("semantic_ids", "genres")
    assert build_model(c, info).module.item_genres is None  # none in this info: left out
    with pytest.raises(ConfigError, match="--mode tokenize"):
        build_model(c, _info())
