"""The rating head (issue 16's second objective): its loss by hand, ranking by logit + alpha x
rating as one dot product, target ratings in training batches, and a run that learns ratings."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from onerec_jax.data.training_examples import Windows, window_rows
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model

V = 9


def _model(variant="sasrec", alpha=0.0, weight=0.5):
    c = apply_variant(base_config(), variant)
    c.model.update(dim=8, num_layers=1, num_heads=1, mlp_dim=8, dropout=0.0, rating_weight=weight)
    c.eval.rating_alpha = alpha
    c.loss.name = "full_softmax"
    info = DataInfo(n_items=V - 1, max_len=5, item_counts=np.ones(V), rating_mean=3.5)
    model = build_model(c, info)
    params = nn.meta.unbox(model.init(jax.random.key(0), {"inputs": np.zeros((2, 5), np.int32)}))
    rng = np.random.default_rng(0)
    head = params["rating"]  # P and b start at zero: set them to something to check
    params["rating"] = {
        "projection": rng.normal(size=head["projection"].shape).astype(np.float32),
        "bias": rng.normal(size=head["bias"].shape).astype(np.float32),
    }
    return model, params


def _batch():
    inputs = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]], np.int32)
    targets = np.array([[0, 0, 2, 3, 4], [5, 6, 7, 8, 1]], np.int32)
    ratings = np.array([[0, 0, 4.0, 2.5, 5.0], [1.0, 3.0, 3.5, 4.5, 2.0]], np.float32)
    return {"inputs": inputs, "targets": targets, "mask": targets > 0, "target_ratings": ratings}


@pytest.mark.parametrize("variant", ["sasrec", "onerec"])
def test_rating_loss_by_hand(variant):
    model, params = _model(variant)
    batch = _batch()
    loss, metrics = model.loss(params, batch, jax.random.key(1))
    hidden = np.asarray(model.apply(params, batch["inputs"], train=False), np.float64)
    table = np.asarray(model.item_table(params), np.float64)
    p = np.asarray(params["rating"]["projection"], np.float64)
    b = np.asarray(params["rating"]["bias"], np.float64)
    # next-item cross-entropy over items 1..V-1
    logits = hidden @ table[1:V].T  # [B, L, V-1]
    lse = np.log(np.exp(logits).sum(-1))
    t = batch["targets"]
    target_logit = np.take_along_axis(logits, np.maximum(t - 1, 0)[..., None], -1)[..., 0]
    mask = batch["mask"]
    xent = ((lse - target_logit) * mask).sum() / mask.sum()
    predicted = ((hidden @ p) * table[t]).sum(-1) + b[t] + 3.5
    mse = (((predicted - batch["target_ratings"]) ** 2) * mask).sum() / mask.sum()
    assert float(metrics["next_item_loss"]) == pytest.approx(xent, rel=1e-4)
    assert float(metrics["rating_mse"]) == pytest.approx(mse, rel=1e-4)
    assert float(loss) == pytest.approx(xent + 0.5 * mse, rel=1e-4)
    ratings = np.asarray(model.predict_ratings(params, {"inputs": batch["inputs"]}, np.arange(V)))
    state = hidden[:, -1]
    np.testing.assert_allclose(ratings, (state @ p) @ table[:V].T + b[:V] + 3.5, rtol=1e-4)


def test_ranking_by_logit_plus_alpha_rating_is_one_dot_product():
    model, params = _model(alpha=2.0)
    batch = {"inputs": _batch()["inputs"]}
    state = np.asarray(model.ranking_state(params, batch), np.float64)
    table = np.asarray(model.ranking_table(params), np.float64)
    h = np.asarray(model.user_state(params, batch), np.float64)
    e = np.asarray(model.item_table(params), np.float64)
    rating = np.asarray(model.predict_ratings(params, batch, np.arange(V)), np.float64)
    want = h @ e[:V].T + 2.0 * (rating - 3.5)  # the constant mean does not reorder
    np.testing.assert_allclose(state @ table[:V].T, want, rtol=1e-4, atol=1e-5)
    items, scores = model.topk(params, batch, np.zeros((2, 1), np.int32), k=V - 1)
    order = np.argsort(-want[:, 1:], axis=1, kind="stable") + 1
    np.testing.assert_array_equal(np.asarray(items), order)
    plain, _ = _model(alpha=0.0)
    np.testing.assert_array_equal(plain.ranking_table(params), plain.item_table(params))


def test_training_batches_carry_the_targets_ratings():
    items = np.array([1, 2, 3, 4, 5, 6], np.int32)
    ratings = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], np.float32)
    windows = Windows(user=np.array([0, 0]), lo=np.array([0, 2]), length=np.array([2, 3]))
    rows = window_rows(items, windows, np.array([0, 1]), 4, ratings=ratings)
    np.testing.assert_array_equal(rows["targets"], [[0, 0, 2, 3], [0, 4, 5, 6]])
    np.testing.assert_array_equal(rows["target_ratings"], [[0, 0, 1.0, 1.5], [0, 2.0, 2.5, 3.0]])
    assert "target_ratings" not in window_rows(items, windows, np.array([0]), 4)


def test_training_with_a_rating_head_end_to_end(tmp_path_factory):
    import json

    from onerec_jax.errors import ConfigError
    from onerec_jax.training import train

    c = apply_variant(base_config(), "sasrec")
    c.data.synthetic = "demo"
    c.data.root = str(tmp_path_factory.getbasetemp() / "demo_data")
    c.data.update(max_len=8, progress=False)
    c.model.update(dim=16, num_layers=1, num_heads=1, mlp_dim=16, rating_weight=0.5)
    c.train.update(batch_size=64, num_steps=4, eval_every_steps=4, log_every_steps=1)
    c.train.update(progress=False)
    c.eval.update(valid_users=200, rating_alpha=1.0)
    c.mesh.num_devices = 1
    jax.clear_caches()
    workdir = tmp_path_factory.mktemp("rating_run")
    results = train.train_and_evaluate(c, workdir)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    mse = [m["train/rating_mse"] for m in logged if "train/rating_mse" in m]
    assert len(mse) == 4 and 0.3 < mse[0] < 3.0  # the head trains on the batches' ratings
    assert {"liked/ndcg@10", "disliked/ndcg@10", "graded_ndcg@10"} <= set(results["test"])
    # the reward-model metrics: the per-user-mean baseline worked out by hand
    from onerec_jax.data import dataset

    data, _ = dataset.load_data(c.data, with_items=False)
    means = np.array(
        [
            data.ratings[a : b - 2].mean()
            for a, b in zip(data.offsets[:-1], data.offsets[1:], strict=True)
        ]
    )
    truth = data.ratings[data.offsets[1:] - 1]
    want = np.sqrt(np.mean((means - truth) ** 2))
    assert results["test"]["rating_rmse_user_mean"] == pytest.approx(want, rel=1e-5)
    assert 0.3 < results["test"]["rating_rmse"] < 3.0
    # --mode align on this run (its own rating head as the reward): one short iteration
    from onerec_jax import align
    from onerec_jax.recommend import Recommender

    settings = base_config().align
    settings.update(iterations=1, steps=1, candidates=5)
    aligned = align.align(workdir, out=workdir.parent / "aligned", settings=settings)
    (it,) = aligned["align"]["iterations"]
    assert it["pairs"] > 0 and it["reward_chosen"] > it["reward_rejected"]
    assert "liked/ndcg@10" in aligned["test"] and aligned["steps"] == 1
    assert len(Recommender.from_run(workdir.parent / "aligned").recommend_for_user(1, 3)) == 3
    c2 = apply_variant(base_config(), "bpr")
    c2.data = c.data
    c2.model.rating_weight = 0.5
    with pytest.raises(ConfigError, match="has no rating head"):
        train.train_and_evaluate(c2, tmp_path_factory.mktemp("bpr_rating"))


def test_a_planted_rating_rule_is_learnt():
    """Items 1-4 are rated 5 and items 5-8 rated 1, whoever watches them: the head must learn
    it (the item bias alone can), while the next-item loss trains beside it."""
    import optax

    model, params = _model(weight=1.0)
    params["rating"] = jax.tree.map(np.zeros_like, params["rating"])
    opt = optax.adam(3e-2)
    state = opt.init(params)
    rng = np.random.default_rng(0)

    @jax.jit
    def step(params, state, batch):
        (loss, metrics), grads = jax.value_and_grad(model.loss, has_aux=True)(
            params, batch, jax.random.key(0)
        )
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, metrics

    first = None
    for _ in range(150):
        seq = rng.integers(1, V, size=(16, 6)).astype(np.int32)
        batch = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": seq[:, 1:] > 0}
        batch["target_ratings"] = np.where(seq[:, 1:] <= 4, 5.0, 1.0).astype(np.float32)
        params, state, metrics = step(params, state, batch)
        first = float(metrics["rating_mse"]) if first is None else first
    assert first == pytest.approx(4.25, abs=0.6)  # the mean 3.5 against 5 and 1: 4.25 expected
    assert float(metrics["rating_mse"]) < 0.05
    predicted = np.asarray(model.predict_ratings(params, {"inputs": seq[:2, :-1]}, np.arange(1, V)))
    np.testing.assert_allclose(
        predicted, np.where(np.arange(1, V) <= 4, 5.0, 1.0)[None].repeat(2, 0), atol=0.5
    )
