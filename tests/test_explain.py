"""Explanations (explain.py): occlusion by hand, a planted reason recovered from a trained
SASRec, the generative prefix reasons, and `--mode recommend --explain / --explain_png`."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from test_recommend import run  # noqa: F401 (fixture)

from onerec_jax import explain
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import UserError
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.recommend import recommendations_text


def test_occlusion_inputs_by_hand():
    inputs, positions = explain.occlusion_inputs(np.array([5, 6, 7, 8]), max_len=3)
    assert positions.tolist() == [1, 2, 3]  # the model sees 6, 7, 8: those are occluded
    assert inputs.tolist() == [
        [6, 7, 8],  # the whole history's input
        [5, 7, 8],  # without 6: the older 5 shifts into the window
        [5, 6, 8],
        [5, 6, 7],
    ]
    inputs, positions = explain.occlusion_inputs(np.array([4]), max_len=3)
    assert inputs.tolist() == [[0, 0, 4], [0, 0, 0]] and positions.tolist() == [0]


def test_occlusion_drops_and_top_reasons_by_hand():
    # a "model" whose score of item c is the sum of weights w[c, movie] over its input movies
    w = np.zeros((3, 10))
    w[0, 5], w[0, 7], w[1, 6], w[2, 5] = 2.0, 0.5, 1.0, -1.0
    items = np.array([0, 1, 2])

    def scores_fn(inputs):
        return np.stack([w[c][inputs].sum(axis=1) for c in items], axis=1)  # [R, C]

    history = np.array([5, 6, 7, 5])  # 5 watched twice
    drops, positions = explain.occlusion_drops(scores_fn, history, items, max_len=8)
    np.testing.assert_allclose(drops[0], [2.0, 0.0, 0.5, 2.0])  # item 0: each 5 is worth 2
    np.testing.assert_allclose(drops[2], [-1.0, 0.0, 0.0, -1.0])
    reasons = explain.top_reasons(drops, positions, history, top=3)
    assert reasons[0] == [explain.Reason(5, 2.0), explain.Reason(7, 0.5)]  # 5 once
    assert reasons[1] == [explain.Reason(6, 1.0)]
    assert reasons[2] == []  # nothing raises item 2's score


def test_prefix_reasons_and_genres_by_hand():
    codes = np.array([[0, 0, 0], [1, 2, 3], [1, 2, 4], [1, 5, 3], [2, 2, 3], [1, 2, 3]])
    reasons = explain.prefix_reasons(codes, np.array([2, 3, 4, 2]), item=1, top=3)
    assert reasons == [explain.Reason(2, 2.0), explain.Reason(3, 1.0)]  # 4 shares nothing
    genres = [(), ("Drama",), ("Drama", "War"), ("Comedy",), ("Drama",), ("War",)]
    n, top = explain.prefix_genres(codes, genres, item=1, length=2)
    assert n == 3  # items 1, 2, 5 start with (1, 2)
    assert top == [("Drama", 2 / 3), ("War", 2 / 3)]


FILLERS, TRIGGERS = np.arange(1, 21), np.arange(21, 26)  # partner of trigger t: t + 5


def _planted_batch(rng, n):
    """Histories of 7 random fillers and one trigger at a random position; target: its partner."""
    inputs = rng.choice(FILLERS, size=(n, 8))
    trigger = rng.choice(TRIGGERS, size=n)
    inputs[np.arange(n), rng.integers(0, 8, n)] = trigger
    return inputs.astype(np.int32), (trigger + 5).astype(np.int32)


def test_planted_reason_is_recovered_from_a_trained_sasrec():
    """Ratings follow a hidden rule (the movie after a history is the partner of the one
    trigger movie in it, wherever it sits); the explanation of the top recommendation must name
    that trigger, not the most recent movie."""
    c = apply_variant(base_config(), "sasrec")
    c.model.update(dim=32, num_layers=1, num_heads=1, mlp_dim=32, dropout=0.0)
    model = build_model(c, DataInfo(n_items=30, max_len=8, item_counts=np.ones(31)))
    params = nn.meta.unbox(model.init(jax.random.key(0), {"inputs": np.zeros((2, 8), np.int32)}))
    opt = optax.adam(3e-3)

    def loss_fn(params, inputs, targets):
        logits = model.user_state(params, {"inputs": inputs}) @ model.item_table(params).T
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    opt_state = opt.init(params)
    for _ in range(400):
        params, opt_state, loss = step(params, opt_state, *_planted_batch(rng, 64))
    assert loss < 0.2  # the rule is learnt

    scores = jax.jit(lambda p, x, i: model.score_chunk(p, model.user_state(p, {"inputs": x}), i))
    inputs, targets = _planted_batch(np.random.default_rng(1), 40)
    hits = 0
    for history, partner in zip(inputs, targets, strict=True):
        items = np.arange(1, 31, dtype=np.int32)
        full = np.asarray(scores(params, history[None], items))[0]
        top = int(items[np.argmax(full)])
        assert top == partner
        best = np.array([top], np.int32)
        drops, positions = explain.occlusion_drops(
            lambda x, best=best: scores(params, x, best), history, best, 8
        )
        (reasons,) = explain.top_reasons(drops, positions, history, top=1)
        hits += reasons[0].item == partner - 5
    assert hits >= 38  # of 40 (the trigger is last in about 1 in 8: recency alone would fail)


def test_recommend_explain_matches_recomputed_drops(run, tmp_path):  # noqa: F811
    workdir, rec = run
    rows = rec.recommend_for_user(7, k=3)
    history = rec.user_history(7)[1]
    reasons = rec.explain(history, rows, top=2)
    # recompute one drop directly: the score after the whole history minus after it without x
    item = rec.catalogue.dense_id(rows[0].movie_id)
    first = reasons[0][0]

    def score(hist):
        inputs = np.zeros((1, 6), np.int32)
        recent = np.asarray(hist[-6:], np.int32)
        inputs[0, 6 - len(recent) :] = recent
        state = rec.model.user_state(rec.params, {"inputs": inputs})
        return float(np.asarray(state @ rec.model.item_table(rec.params)[item])[0])

    p = int(np.flatnonzero(history == first.item)[-1])
    assert first.weight == pytest.approx(score(history) - score(np.delete(history, p)), abs=1e-4)
    assert all(r.weight > 0 for why in reasons for r in why)
    text = recommendations_text(
        workdir, user="7", k=3, explain=True, explain_png=tmp_path / "a.png"
    )
    assert "because you watched" in text and rec.catalogue.label(first.item) in text
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_attention_maps_are_distributions(run):  # noqa: F811
    _, rec = run
    inputs, _ = explain.occlusion_inputs(rec.user_history(3)[1], 6)
    maps = explain.attention_maps(rec.model, rec.params, inputs[0])
    assert len(maps) == 1 and maps[0].shape == (1, 6)  # one block: the scored query only
    np.testing.assert_allclose(maps[0].sum(axis=-1), 1.0, rtol=1e-5)


def test_models_without_history_say_so(run, monkeypatch):  # noqa: F811
    _, rec = run
    rows = rec.recommend_for_user(3, k=2)
    monkeypatch.setattr(rec, "spec", dataclasses.replace(rec.spec, reads_user_ids=True))
    with pytest.raises(UserError, match="does not read the watched movies"):
        rec.explain(rec.user_history(3)[1], rows)
