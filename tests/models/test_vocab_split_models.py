"""SASRec, the OneRec item head, GRU4Rec, BERT4Rec, BPR and NCF with their item (and user)
tables split over 8 devices ("model" axis): padded tables, the same loss, gradients and user
states as on one device, and no whole-table collective in the compiled step (nor in NCF's
full-ranking evaluation)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.evaluation import ranking
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.parallel import sharding, vocab_parallel

N_ITEMS, N_USERS, B, L = 100, 61, 4, 8
# One attention head cannot split 8 ways: only the item tables go over "model" (configs/scale.py).
RULES = tuple((n, None if n in ("heads", "mlp") else a) for n, a in sharding.DEFAULT_RULES)


def config(name: str, loss: str):
    c = apply_variant(base_config(), name)
    c.model.dim, c.model.mlp_dim, c.model.num_layers, c.model.dropout = 16, 16, 1, 0.0
    c.model.side_features = ()
    c.loss.name, c.loss.n_negatives, c.loss.chunk_size = loss, 32, 24
    c.eval.chunk_size = 24  # evaluation gathers a chunk's rows, never a whole table
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
        "user": jnp.asarray([0, 5, 60, 7], jnp.int32),
    }


def unbox(tree):
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


# (param path, real rows) of every table split over the vocab axes.
TABLES = {
    "sasrec": [("item_embedding/embedding", N_ITEMS + 1)],
    "onerec": [("id_embedding/embedding", N_ITEMS + 2)],  # + a mask row
    "gru4rec": [("item_embedding/embedding", N_ITEMS + 1)],
    "bert4rec": [("item_embedding/embedding", N_ITEMS + 2)],  # + the [MASK] row
    "bpr": [
        ("user_embedding/embedding", N_USERS),
        ("item_embedding/embedding", N_ITEMS + 1),
        ("item_bias", N_ITEMS + 1),
    ],
    "ncf": [
        (f"{side}_{tower}/embedding", N_USERS if side == "user" else N_ITEMS + 1)
        for side in ("user", "item")
        for tower in ("gmf", "mlp")
    ],
}


def get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def put(tree, path, value):
    key, _, rest = path.partition("/")
    return {**tree, key: put(tree[key], rest, value) if rest else value}


# Each model once, each loss on several models (every loss is tested on a split table for any
# model in tests/parallel/test_vocab_parallel.py; the user-item models have their own losses).
@pytest.mark.parametrize(
    ("name", "loss"),
    [
        ("sasrec", "sampled_softmax"),
        ("onerec", "full_softmax"),
        ("gru4rec", "full_softmax"),
        ("bert4rec", "sampled_softmax"),
        ("bpr", "full_softmax"),
        ("ncf", "full_softmax"),
    ],
)
def test_split_model_matches_the_single_device_one(name, loss):
    c, data = config(name, loss), batch()
    info = DataInfo(
        n_items=N_ITEMS, max_len=L, item_counts=np.arange(N_ITEMS + 1) % 7, n_users=N_USERS
    )
    model = build_model(c, info)
    params = unbox(model.init(jax.random.key(1), data))
    for path, real in TABLES[name]:
        assert get(params, path).shape[0] == real  # unsplit: no padding rows
    rng = jax.random.key(2)
    grad_fn = jax.value_and_grad(lambda p: model.loss(p, data, rng)[0])
    want_loss, want_grads = jax.jit(grad_fn)(params)
    want_states = jax.jit(model.user_state)(params, data)
    history = data["inputs"]
    want_top = jax.jit(model.topk, static_argnames="k")(params, data, history, k=10)
    want_table = None if name == "ncf" else jax.jit(model.item_table)(params)
    targets = data["targets"][:, -1]
    if name == "ncf":
        want_rank = ranking.make_ranker_with(model.score_chunk, N_ITEMS, k=10, chunk_size=24)(
            want_states, params, targets, history
        )

    mesh = sharding.make_mesh((1, 1, 8))
    jax.set_mesh(mesh)
    nn.set_logical_axis_rules(RULES)
    jax.clear_caches()
    split_model = build_model(c, info)
    abstract = unbox(jax.eval_shape(lambda k: split_model.init(k, data), jax.random.key(1)))
    shardings = unbox(
        sharding.state_shardings(
            jax.eval_shape(lambda k: split_model.init(k, data), jax.random.key(1)), mesh, RULES
        )
    )
    split_params, largest, smallest = params, 0, None
    for path, real in TABLES[name]:
        rows = get(abstract, path).shape[0]
        assert rows == vocab_parallel.padded_rows(real) and rows % 8 == 0 and rows > real
        table = get(params, path)
        pad = jnp.full((rows - real, *table.shape[1:]), 9.0)  # never read: any value
        split_params = put(split_params, path, jnp.concatenate([table, pad]))
        largest, smallest = max(largest, rows), min(smallest or rows, rows)
    split_params = jax.device_put(split_params, shardings)
    for path, _ in TABLES[name]:
        assert get(split_params, path).sharding.spec[0] == "model"

    grad_fn = jax.value_and_grad(lambda p: split_model.loss(p, data, rng)[0])
    step = jax.jit(grad_fn).lower(split_params).compile()
    assert vocab_parallel.whole_table_collectives(step.as_text(), smallest) == []
    got_loss, got_grads = step(split_params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    split_paths = {path for path, _ in TABLES[name]}
    for path, real in TABLES[name]:
        got_table = np.asarray(get(got_grads, path))
        np.testing.assert_allclose(
            got_table[:real], get(want_grads, path), rtol=1e-4, atol=1e-6, err_msg=path
        )
        assert not got_table[real:].any(), path
    for path, want in jax.tree_util.tree_flatten_with_path(want_grads)[0]:
        key = "/".join(p.key for p in path)
        if key not in split_paths:
            np.testing.assert_allclose(get(got_grads, key), want, rtol=1e-4, atol=1e-6)
    states = jax.jit(split_model.user_state)(split_params, data)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), states, want_states
    )
    topk = jax.jit(split_model.topk, static_argnames="k").lower(split_params, data, history, k=10)
    topk = topk.compile()
    assert vocab_parallel.whole_table_collectives(topk.as_text(), smallest) == []
    got_top = topk(split_params, data, history)
    np.testing.assert_array_equal(got_top[0], want_top[0])
    np.testing.assert_allclose(got_top[1], want_top[1], rtol=1e-5, atol=1e-6)
    if name == "ncf":  # the evaluator's ranker for a model with its own scorer
        ranker = ranking.make_ranker_with(
            split_model.score_chunk, N_ITEMS, mesh, k=10, chunk_size=24
        )
        compiled = ranker.lower(states, split_params, targets, history).compile()
        assert vocab_parallel.whole_table_collectives(compiled.as_text(), smallest) == []
        for got, expected in zip(
            compiled(states, split_params, targets, history), want_rank, strict=True
        ):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if want_table is not None:
        item_table = jax.jit(split_model.item_table)(split_params)
        assert item_table.shape[0] == largest or name == "bpr"
        assert item_table.sharding.spec[0] == "model"
        np.testing.assert_allclose(item_table[: want_table.shape[0]], want_table)
