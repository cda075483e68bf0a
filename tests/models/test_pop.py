"""Popularity: log(1 + training count) scores, nothing trained, a normal run end to end."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.data import dataset
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.evaluation import ranking
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.training import train

_spec = importlib.util.spec_from_file_location(
    "popularity", Path(__file__).resolve().parents[2] / "benchmarks" / "popularity.py"
)
popularity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(popularity)

COUNTS = np.array([0, 5, 0, 9, 2, 9, 1, 7, 3, 0, 4])  # [V]; item 0 is padding


def _model():
    info = DataInfo(n_items=len(COUNTS) - 1, max_len=4, item_counts=COUNTS)
    return build_model(apply_variant(base_config(), "pop"), info)


def _params(model):
    boxed = model.init(jax.random.key(0), {"inputs": jnp.zeros((2, 4), jnp.int32)})
    return train._unbox(boxed)


def test_scores_are_log_one_plus_count_for_every_user():
    model = _model()
    params = _params(model)
    inputs = jnp.array([[0, 0, 3, 4], [1, 2, 6, 8]], jnp.int32)
    state = model.user_state(params, {"inputs": inputs})
    scores = model.score_chunk(params, state, jnp.arange(len(COUNTS)))
    np.testing.assert_allclose(scores, np.tile(np.log1p(COUNTS), (2, 1)), rtol=1e-6)
    assert model.dot_product_scores and not model.trainable


def test_ranking_is_training_counts_with_history_masked():
    model = _model()
    params = _params(model)
    state = model.user_state(params, {"inputs": jnp.zeros((3, 4), jnp.int32)})
    # User 0 saw item 3, user 1 items 7 and 1, user 2 nothing.
    history = jnp.array([[3, 0], [7, 1], [0, 0]], jnp.int32)
    targets = jnp.array([7, 8, 3], jnp.int32)
    ranks, top, _ = ranking.rank_and_topk(
        state, model.item_table(params), targets, history, k=5, chunk_size=4
    )
    # Counts: 3:9 5:9 7:7 1:5 10:4 8:3 4:2 6:1; top-k ties by lower id; seen items dropped.
    np.testing.assert_array_equal(top, [[5, 7, 1, 10, 8], [3, 5, 10, 8, 4], [3, 5, 7, 1, 10]])
    # Rank = 1 + unmasked items counted strictly higher + half those counted the same: item 7
    # (7) is below 5 only (3 is masked); item 8 (3) is below 3, 5 and 10; item 3 (9) ties
    # with item 5 (9).
    np.testing.assert_array_equal(ranks, [2, 4, 1.5])


def test_loss_is_zero():
    model = _model()
    batch = {
        "inputs": jnp.zeros((2, 4), jnp.int32),
        "targets": jnp.ones((2, 4), jnp.int32),
        "mask": jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool),
    }
    loss, metrics = model.loss(_params(model), batch, jax.random.key(0))
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 7


def tiny_config(root, variant):
    """The demo data, tiny training and evaluation settings (shared by the baseline tests)."""
    c = apply_variant(base_config(), variant)
    c.data.update(synthetic="demo", root=str(root), max_len=20, progress=False)
    c.model.dim = 8
    c.train.update(
        batch_size=16,
        num_steps=4,
        eval_every_steps=4,
        log_every_steps=1,
        progress=False,
        patience=100,
    )
    c.optim.warmup_steps = 1
    c.eval.update(batch_size=2048, chunk_size=256)  # one eval batch: few compilations
    return c


def _popularity_ndcg10(data, split: str) -> float:
    """Slow reference: every user's target ranked by training counts, prefix masked."""
    counts = np.zeros(data.n_items + 1)
    n_eval = {"valid": 2, "test": 1}[split]
    for u in range(data.n_users):
        np.add.at(counts, data.sequence(u)[:-2], 1)
    gains = []
    for u in range(data.n_users):
        seq = data.sequence(u)
        prefix, target = seq[: len(seq) - n_eval], seq[len(seq) - n_eval]
        scores = counts.copy()
        scores[0] = -np.inf
        scores[prefix] = -np.inf
        scores[target] = -np.inf  # never its own rival; ties with it count half (PROTOCOL.md)
        rank = 1 + np.count_nonzero(scores > counts[target])
        rank += np.count_nonzero(scores == counts[target]) / 2
        gains.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    return float(np.mean(gains))


def test_end_to_end_run_is_one_step_and_matches_reference(tmp_path):
    config = tiny_config(tmp_path / "data", "pop")
    jax.clear_caches()
    results = train.train_and_evaluate(config, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model"] == "pop" and saved["steps"] == 1 and saved["best_step"] == 1
    assert saved["params"] == 1001 and saved["test"]["n_users"] == 2000
    data, _ = dataset.load_data(config.data)
    assert saved["test"]["ndcg@10"] == pytest.approx(_popularity_ndcg10(data, "test"), abs=1e-6)
    assert saved["val"]["ndcg@10"] == pytest.approx(_popularity_ndcg10(data, "valid"), abs=1e-6)
    assert results["test"] == pytest.approx(saved["test"])
    # benchmarks/popularity.py is this model through the same evaluator: the same numbers.
    bench = popularity.popularity_metrics(config)
    for split, run in (("valid", results["val"]), ("test", results["test"])):
        same = {k: v for k, v in run.items() if k != "seconds"}
        assert {k: v for k, v in bench[split].items() if k != "seconds"} == same
