"""SASRec, the OneRec item head, GRU4Rec and BERT4Rec with their item table split over 8
devices ("model" axis): padded tables, the same loss, gradients and user states as on one
device, and no whole-table collective in the compiled step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.parallel import sharding, vocab_parallel

N_ITEMS, B, L = 100, 4, 8
# One attention head cannot split 8 ways: only the item tables go over "model" (configs/scale.py).
RULES = tuple((n, None if n in ("heads", "mlp") else a) for n, a in sharding.DEFAULT_RULES)


def config(name: str, loss: str):
    c = apply_variant(base_config(), name)
    c.model.dim, c.model.mlp_dim, c.model.num_layers, c.model.dropout = 16, 16, 1, 0.0
    c.model.side_features = ()
    c.loss.name, c.loss.n_negatives, c.loss.chunk_size = loss, 32, 24
    return c


def batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, N_ITEMS + 1, (B, L)).astype(np.int32)
    inputs[:, :3] = 0  # left padding
    targets = rng.integers(1, N_ITEMS + 1, (B, L)).astype(np.int32)
    return {
        "inputs": jnp.asarray(inputs),
        "targets": jnp.asarray(targets),
        "mask": jnp.asarray(inputs > 0),
    }


def unbox(tree):
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


TABLE = {
    "sasrec": "item_embedding",
    "onerec": "id_embedding",
    "gru4rec": "item_embedding",
    "bert4rec": "item_embedding",
}


# Two of the four (model, loss) pairs: each loss is tested on a split table for any model in
# tests/parallel/test_vocab_parallel.py; here each model and each loss appear once (suite time).
@pytest.mark.parametrize(
    ("name", "loss"),
    [
        ("sasrec", "sampled_softmax"),
        ("onerec", "full_softmax"),
        ("gru4rec", "full_softmax"),
        ("bert4rec", "sampled_softmax"),
    ],
)
def test_split_model_matches_the_single_device_one(name, loss):
    c, data = config(name, loss), batch()
    info = DataInfo(n_items=N_ITEMS, max_len=L, item_counts=np.arange(N_ITEMS + 1) % 7)
    model = build_model(c, info)
    params = unbox(model.init(jax.random.key(1), data))
    plain_rows = params[TABLE[name]]["embedding"].shape[0]
    rng = jax.random.key(2)
    grad_fn = jax.value_and_grad(lambda p: model.loss(p, data, rng)[0])
    want_loss, want_grads = jax.jit(grad_fn)(params)
    want_states = jax.jit(model.user_state)(params, data)
    want_table = jax.jit(model.item_table)(params)

    mesh = sharding.make_mesh((1, 1, 8))
    jax.set_mesh(mesh)
    nn.set_logical_axis_rules(RULES)
    jax.clear_caches()
    split_model = build_model(c, info)
    abstract = jax.eval_shape(lambda k: split_model.init(k, data), jax.random.key(1))
    shardings = unbox(sharding.state_shardings(abstract, mesh, RULES))
    rows = unbox(abstract)[TABLE[name]]["embedding"].shape[0]
    assert rows == vocab_parallel.padded_rows(plain_rows) and rows % 8 == 0 and rows > plain_rows
    table = params[TABLE[name]]["embedding"]
    padded = jnp.concatenate([table, jnp.full((rows - plain_rows, table.shape[1]), 9.0)])
    split_params = jax.device_put({**params, TABLE[name]: {"embedding": padded}}, shardings)
    assert split_params[TABLE[name]]["embedding"].sharding.spec[0] == "model"

    grad_fn = jax.value_and_grad(lambda p: split_model.loss(p, data, rng)[0])
    step = jax.jit(grad_fn).lower(split_params).compile()
    assert vocab_parallel.whole_table_collectives(step.as_text(), rows) == []
    got_loss, got_grads = step(split_params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    got_table = np.asarray(got_grads[TABLE[name]]["embedding"])
    np.testing.assert_allclose(
        got_table[:plain_rows], want_grads[TABLE[name]]["embedding"], rtol=1e-4, atol=1e-6
    )
    assert not got_table[plain_rows:].any()
    for key in params:
        if key != TABLE[name]:
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                got_grads[key],
                want_grads[key],
            )
    states = jax.jit(split_model.user_state)(split_params, data)
    np.testing.assert_allclose(states, want_states, rtol=1e-5, atol=1e-6)
    item_table = jax.jit(split_model.item_table)(split_params)
    assert item_table.shape[0] == rows and item_table.sharding.spec[0] == "model"
    np.testing.assert_allclose(item_table[: want_table.shape[0]], want_table)
