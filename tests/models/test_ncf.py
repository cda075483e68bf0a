"""NeuMF: the logit and BCE loss against numpy, chunked full ranking, a run end to end."""

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

V, N_USERS, D, LAYERS = 23, 6, 4, (6, 5, 3)


def _model(**model):
    c = apply_variant(base_config(), "ncf")
    c.model.update(dim=D, mlp_layers=LAYERS, **model)
    info = DataInfo(n_items=V - 1, max_len=3, item_counts=np.ones(V), n_users=N_USERS)
    return build_model(c, info)


def _params(model, seed=0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), {"user": jnp.zeros((2,), jnp.int32)})
    # Larger random values than the initialisation, so every term of the logit matters.
    leaves, tree = jax.tree.flatten(train._unbox(shapes))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [jnp.asarray(0.5 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
    )


def _numpy_logits(params, users, items, towers="both"):
    """Slow reference: NeuMF on the explicit concatenation, one (user, item) pair at a time."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    kernel0 = np.concatenate([p["first_user"]["kernel"], p["first_item"]["kernel"]])  # [2D, H0]
    out = np.zeros(np.broadcast_shapes(np.shape(users), np.shape(items)))
    users, items = np.broadcast_to(users, out.shape), np.broadcast_to(items, out.shape)
    for idx in np.ndindex(out.shape):
        u, i = users[idx], items[idx]
        gmf = p["user_gmf"]["embedding"][u] * p["item_gmf"]["embedding"][i]  # [D]
        x = np.concatenate([p["user_mlp"]["embedding"][u], p["item_mlp"]["embedding"][i]])
        out[idx] = p["out_bias"]
        if towers in ("both", "gmf"):
            out[idx] += gmf @ p["out_gmf"][:, 0]
        if towers in ("both", "mlp"):  # a GMF-only model has no MLP layers
            h = np.maximum(x @ kernel0 + p["first_user"]["bias"], 0)
            for k in range(len(LAYERS) - 1):
                h = np.maximum(h @ p[f"hidden_{k}"]["kernel"] + p[f"hidden_{k}"]["bias"], 0)
            out[idx] += h @ p["out_mlp"][:, 0]
    return out


@pytest.mark.parametrize("loss_name", ["bce", "bpr"])
def test_loss_matches_numpy(loss_name):
    model = _model(negatives_per_pair=2, l2=0.03, ncf_loss=loss_name)
    params = _params(model)
    batch = {
        "user": jnp.array([5, 2], jnp.int32),
        "inputs": jnp.array([[0, 4, 2], [7, 8, 9]], jnp.int32),
        "targets": jnp.array([[0, 2, 6], [8, 9, 22]], jnp.int32),
        "mask": jnp.array([[False, True, True], [True, True, True]]),
    }
    rng = jax.random.key(3)
    loss, metrics = jax.jit(model.loss)(params, batch, rng)
    negatives = np.asarray(
        jax.jit(losses.negatives_avoiding, static_argnums=(2, 3))(rng, batch["targets"], 2, V)
    )  # [2, 3, 2]
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

    def sq(table, i):
        return np.sum(p[table]["embedding"][i] ** 2, axis=-1)

    rows = []
    for r in range(2):
        u = int(batch["user"][r])
        for t in range(3):
            if not batch["mask"][r, t]:
                continue
            i, js = int(batch["targets"][r, t]), negatives[r, t]
            assert i not in js
            s_pos = _numpy_logits(params, u, i)
            s_neg = _numpy_logits(params, u, js)
            if loss_name == "bce":
                sig_pos, sig_neg = 1 / (1 + np.exp(-s_pos)), 1 / (1 + np.exp(-s_neg))
                fit = -np.log(sig_pos) - np.sum(np.log(1 - sig_neg))
            else:  # BPR: the mean over negatives of -log sigmoid(s_pos - s_neg)
                fit = np.mean(-np.log(1 / (1 + np.exp(-(s_pos - s_neg)))))
            reg = (
                sq("user_gmf", u)
                + sq("user_mlp", u)
                + sq("item_gmf", i)
                + sq("item_mlp", i)
                + np.mean(sq("item_gmf", js) + sq("item_mlp", js))
            )
            rows.append(fit + 0.03 * reg)
    np.testing.assert_allclose(float(loss), np.mean(rows), rtol=1e-5)
    assert float(metrics["tokens"]) == 5


def test_score_chunk_matches_numpy_and_needs_no_item_table():
    model = _model()
    params = _params(model)
    users = jnp.array([0, 5, 3], jnp.int32)
    batch = {"user": users, "inputs": jnp.zeros((3, 3), jnp.int32)}
    state = jax.jit(model.user_state)(params, batch)
    assert state["gmf"].shape == (3, D) and state["mlp"].shape == (3, LAYERS[0])
    ids = jnp.array([4, 0, 22, 9, 9], jnp.int32)
    scores = jax.jit(model.score_chunk)(params, state, ids)
    assert scores.shape == (3, 5) and scores.dtype == jnp.float32
    want = _numpy_logits(params, np.asarray(users)[:, None], np.asarray(ids)[None, :])
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    assert not model.dot_product_scores


@pytest.mark.parametrize("towers", ["gmf", "mlp"])
def test_one_tower_alone_drops_the_other_term(towers):
    # The GMF-only and MLP-only ablations of NeuMF (He et al. 2017; Rendle et al. 2020).
    model = _model(ncf_towers=towers)
    params = _params(model, seed=3)
    users = jnp.array([1, 4], jnp.int32)
    state = model.user_state(params, {"user": users, "inputs": jnp.zeros((2, 3), jnp.int32)})
    ids = jnp.array([2, 7, 21], jnp.int32)
    want = _numpy_logits(params, np.asarray(users)[:, None], np.asarray(ids)[None, :], towers)
    np.testing.assert_allclose(model.score_chunk(params, state, ids), want, rtol=1e-5, atol=1e-5)
    # The MLP tower's upper layers exist only when the model uses that tower.
    assert ("hidden_0" in params) == (towers == "mlp")


def test_chunked_ranking_equals_scoring_all_items_at_once():
    model = _model()
    params = _params(model)
    users = jnp.arange(N_USERS, dtype=jnp.int32)
    state = jax.jit(model.user_state)(params, {"user": users})
    rng = np.random.default_rng(0)
    targets = rng.integers(1, V, N_USERS).astype(np.int32)
    history = rng.integers(0, V, (N_USERS, 7)).astype(np.int32)
    history[history == targets[:, None]] = 0
    # The reference: all V scores at once, seen items dropped, rank = 1 + strictly higher + half
    # the tied ones.
    full = _numpy_logits(params, np.asarray(users)[:, None], np.arange(V)[None, :])  # [U, V]
    k = 8
    for chunk_size in (7, V + 1):  # 4 chunks, the last one partial; one chunk
        ranker = ranking.make_ranker_with(model.score_chunk, V - 1, k=k, chunk_size=chunk_size)
        ranks, top, _ = ranker(state, params, jnp.asarray(targets), jnp.asarray(history))
        for u in range(N_USERS):
            seen = set(history[u].tolist()) - {0}
            assert not seen & set(np.asarray(top[u]).tolist())  # seen items never in the top-K
            unseen = [i for i in range(1, V) if i not in seen]
            order = sorted(unseen, key=lambda i: -full[u, i])
            np.testing.assert_array_equal(top[u], order[:k])
            higher = sum(full[u, i] > full[u, targets[u]] for i in unseen if i != targets[u])
            tied = sum(full[u, i] == full[u, targets[u]] for i in unseen if i != targets[u])
            assert ranks[u] == 1 + higher + tied / 2


def test_end_to_end_run_trains_and_writes_results(tmp_path):
    config = tiny_config(tmp_path / "data", "ncf")
    config.model.mlp_layers = (8, 4)
    jax.clear_caches()
    results = train.train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model"] == "ncf" and saved["steps"] == 4 and saved["best_step"] == 4
    tables = 2 * (2000 + 1001) * 8  # GMF and MLP rows for every user and item
    mlp = (8 * 8 + 8) + 8 * 8 + (8 * 4 + 4) + (8 + 4 + 1)  # first layer, hidden, output
    assert saved["params"] == tables + mlp
    assert saved["test"]["n_users"] == 2000 and 0 <= saved["test"]["ndcg@10"] <= 1
    assert results["test"] == pytest.approx(saved["test"])


def test_unknown_loss_is_one_clear_error():
    with pytest.raises(ConfigError, match="ncf_loss='hinge'"):
        _model(ncf_loss="hinge")
