"""BPR-MF: the pairwise loss against numpy, dot-product scoring with the bias, a run end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pop import tiny_config

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError
from onerec_jax.evaluation import ranking
from onerec_jax.models import losses
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.training import train

V, N_USERS, D = 12, 5, 4


def _model(**model):
    c = apply_variant(base_config(), "bpr")
    c.model.update(dim=D, **model)
    info = DataInfo(n_items=V - 1, max_len=3, item_counts=np.ones(V), n_users=N_USERS)
    return build_model(c, info)


def _params(model, seed=0):
    """Random values in the structure `model.init` gives (traced only: nothing to compile)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), {"user": jnp.zeros((2,), jnp.int32)})
    leaves, tree = jax.tree.flatten(train._unbox(shapes))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [jnp.asarray(0.5 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
    )


def _batch():
    return {
        "user": jnp.array([3, 1], jnp.int32),
        "inputs": jnp.array([[0, 4, 2], [7, 8, 9]], jnp.int32),
        "targets": jnp.array([[0, 2, 6], [8, 9, 11]], jnp.int32),
        "mask": jnp.array([[False, True, True], [True, True, True]]),
    }


@pytest.mark.parametrize("item_bias", [True, False])
def test_loss_matches_numpy(item_bias):
    model = _model(item_bias=item_bias, negatives_per_pair=3, l2=0.05)
    params = _params(model)
    if item_bias:  # a non-zero bias, so that it enters the check
        params["item_bias"] = jnp.linspace(-1.0, 1.0, V)
    batch, rng = _batch(), jax.random.key(7)
    loss, metrics = jax.jit(model.loss)(params, batch, rng)
    # The same draws the loss makes from its rng.
    negatives = np.asarray(
        jax.jit(losses.negatives_avoiding, static_argnums=(2, 3))(rng, batch["targets"], 3, V)
    )  # [2, 3, 3]
    p = np.asarray(params["user_embedding"]["embedding"], np.float64)
    q = np.asarray(params["item_embedding"]["embedding"], np.float64)
    b = np.asarray(params["item_bias"], np.float64) if item_bias else np.zeros(V)
    rows, bprs = [], []
    for r in range(2):
        u = int(batch["user"][r])
        for t in range(3):
            if not batch["mask"][r, t]:
                continue
            i = int(batch["targets"][r, t])
            js = negatives[r, t]
            assert i not in js
            x = (p[u] @ q[i] + b[i]) - (q[js] @ p[u] + b[js])  # [3]
            bpr = np.mean(-np.log(1 / (1 + np.exp(-x))))
            reg = p[u] @ p[u] + q[i] @ q[i] + np.mean(np.sum(q[js] ** 2, axis=1))
            rows.append(bpr + 0.05 * reg)
            bprs.append(bpr)
    np.testing.assert_allclose(float(loss), np.mean(rows), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bpr"]), np.mean(bprs), rtol=1e-5)
    assert float(metrics["tokens"]) == 5


def test_scores_are_user_dot_item_plus_bias_and_history_is_masked():
    model = _model()
    params = _params(model)
    params["item_bias"] = jnp.linspace(-1.0, 1.0, V)
    users = jnp.array([0, 4, 2], jnp.int32)
    state = model.user_state(params, {"user": users, "inputs": jnp.zeros((3, 3), jnp.int32)})
    table = model.item_table(params)
    assert state.shape == (3, D + 1) and table.shape == (V, D + 1)
    p = np.asarray(params["user_embedding"]["embedding"])[np.asarray(users)]
    q = np.asarray(params["item_embedding"]["embedding"])
    want = p @ q.T + np.linspace(-1.0, 1.0, V)  # [3, V]
    scores = model.score_chunk(params, state, jnp.arange(V))
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    history = jnp.array([[3, 5, 0], [1, 0, 0], [2, 4, 6]], jnp.int32)
    targets = jnp.array([7, 9, 11], jnp.int32)
    ranks, top, scores = ranking.make_ranker(k=V - 4, chunk_size=5)(state, table, targets, history)
    for r in range(3):
        seen = set(np.asarray(history[r])) - {0}
        assert not seen & set(np.asarray(top[r]).tolist())
        order = [i for i in np.argsort(-want[r], kind="stable") if i and i not in seen]
        np.testing.assert_array_equal(top[r], order[: V - 4])
        t = want[r, targets[r]]
        others = [i for i in order if i != targets[r]]
        tied = sum(want[r, i] == t for i in others)
        assert ranks[r] == 1 + sum(want[r, i] > t for i in others) + tied / 2


def test_needs_users_and_a_negative():
    c = apply_variant(base_config(), "bpr")
    with pytest.raises(ConfigError, match="n_users=0"):
        build_model(c, DataInfo(n_items=V - 1, max_len=3, item_counts=np.ones(V)))
    c.model.negatives_per_pair = 0
    with pytest.raises(ConfigError, match="negatives_per_pair=0"):
        build_model(c, DataInfo(n_items=V - 1, max_len=3, item_counts=np.ones(V), n_users=2))


def test_end_to_end_run_trains_and_writes_results(tmp_path):
    config = tiny_config(tmp_path / "data", "bpr")
    jax.clear_caches()
    train.train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model"] == "bpr" and saved["steps"] == 4 and saved["best_step"] == 4
    assert saved["params"] == 2000 * 8 + 1001 * (8 + 1)  # user rows, item rows and biases
    assert saved["test"]["n_users"] == 2000 and 0 <= saved["test"]["ndcg@10"] <= 1
    assert saved["protocol"]["mask_history"] is True
