"""GRU4Rec: a slow numpy GRU reference, padding that holds the state, the softmax loss, a run."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.training import train

V, D = 13, 6


def _model(num_layers=2):
    c = apply_variant(base_config(), "gru4rec")
    c.model.update(dim=D, num_layers=num_layers, dropout=0.0)
    return build_model(c, DataInfo(n_items=V - 1, max_len=10, item_counts=np.arange(V)))


def _inputs():
    return jnp.array([[0, 0, 0, 5, 7, 2, 9, 11], [0, 0, 0, 0, 0, 0, 3, 4]], jnp.int32)


def _params(model, inputs):
    boxed = jax.jit(lambda rng: model.init(rng, {"inputs": inputs}))(jax.random.key(0))
    # Random (not zero) biases, so the reference checks where each one enters.
    leaves, tree = jax.tree.flatten(nn.meta.unbox(boxed))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _hidden(model, params, inputs):
    """model.apply at inference, jitted (eager Flax is slow on a busy CPU)."""
    return jax.jit(model.apply, static_argnames="train")(params, inputs, train=False)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_gru4rec(params, inputs):
    """Slow reference: per row, per step, the GRU equations, skipping padding slots."""
    p = jax.tree.map(np.asarray, params)
    x = p["item_embedding"]["embedding"][np.asarray(inputs)]  # [B, L, D]
    layer = 0
    while f"gru_{layer}" in p:
        g = p[f"gru_{layer}"]["cell"]
        out = np.zeros_like(x)
        for b in range(x.shape[0]):
            h = np.zeros(D)
            for t in range(x.shape[1]):
                if inputs[b, t] > 0:
                    xt = x[b, t]
                    r = _sigmoid(xt @ g["ir"]["kernel"] + g["ir"]["bias"] + h @ g["hr"]["kernel"])
                    z = _sigmoid(xt @ g["iz"]["kernel"] + g["iz"]["bias"] + h @ g["hz"]["kernel"])
                    n = np.tanh(
                        xt @ g["in"]["kernel"]
                        + g["in"]["bias"]
                        + r * (h @ g["hn"]["kernel"] + g["hn"]["bias"])
                    )
                    h = (1 - z) * n + z * h
                out[b, t] = h
        x, layer = out, layer + 1
    return x @ p["output"]["kernel"] + p["output"]["bias"]  # [B, L, D]


def test_hidden_states_match_a_numpy_gru():
    model, inputs = _model(), _inputs()
    params = _params(model, inputs)
    hidden = _hidden(model, params, inputs)
    np.testing.assert_allclose(hidden, numpy_gru4rec(params, inputs), atol=1e-5)
    # The user state is the hidden state after the most recent item.
    np.testing.assert_allclose(jax.jit(model.user_state)(params, {"inputs": inputs}), hidden[:, -1])


def test_left_padding_does_not_change_the_state():
    model, inputs = _model(), _inputs()
    params = _params(model, inputs)
    wider = jnp.pad(inputs, ((0, 0), (5, 0)))  # the same windows in a wider bucket
    hidden, hidden_wide = (_hidden(model, params, x) for x in (inputs, wider))
    np.testing.assert_allclose(hidden_wide[:, 5:][inputs > 0], hidden[inputs > 0], atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(model.user_state)(params, {"inputs": wider}),
        jax.jit(model.user_state)(params, {"inputs": inputs}),
        atol=1e-6,
    )
    # Row 1's first real item is at slot 6: an earlier padding slot must not count as a step.
    alone = _hidden(model, params, inputs[1:, 6:])
    np.testing.assert_allclose(hidden[1, 6:], alone[0], atol=1e-6)


def test_full_softmax_loss_matches_numpy_cross_entropy():
    model, inputs = _model(num_layers=1), _inputs()
    targets = jnp.array([[0, 0, 0, 7, 2, 9, 11, 4], [0, 0, 0, 0, 0, 0, 4, 12]], jnp.int32)
    batch = {"inputs": inputs, "targets": targets, "mask": targets > 0}
    params = _params(model, inputs)
    loss, metrics = jax.jit(model.loss)(params, batch, jax.random.key(3))
    hidden = numpy_gru4rec(params, inputs).reshape(-1, D)
    logits = hidden @ np.asarray(params["item_embedding"]["embedding"]).T  # [N, V]
    logits[:, 0] = -np.inf  # padding is never a candidate
    top = logits.max(1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    rows = np.flatnonzero(np.asarray(targets).reshape(-1) > 0)
    want = -log_probs[rows, np.asarray(targets).reshape(-1)[rows]].mean()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["tokens"]) == len(rows) == 7


def test_variant():
    c = apply_variant(base_config(), "gru4rec")
    assert (c.model.name, c.model.num_layers) == ("gru4rec", 1)


def test_end_to_end_writes_results(tmp_path, tmp_path_factory):
    c = apply_variant(base_config(), "gru4rec")
    c.data.synthetic = "demo"
    c.data.root = str(tmp_path_factory.getbasetemp() / "demo_data")  # shared by both models
    c.data.max_len = 20
    c.data.progress = False
    c.model.update(dim=16, dropout=0.1)
    c.train.update(
        batch_size=16,
        num_steps=8,
        eval_every_steps=4,
        log_every_steps=4,
        progress=False,
        patience=100,
    )
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=512, chunk_size=256)
    c.mesh.num_devices = 1
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    results = train.train_and_evaluate(c, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model"] == "gru4rec"
    assert [h[0] for h in saved["history"]] == [4, 8]
    assert saved["test"]["n_users"] == 2000
    assert saved["test"]["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"])
    assert 0.0 <= saved["test"]["ndcg@10"] <= saved["test"]["hr@10"] <= 1.0
