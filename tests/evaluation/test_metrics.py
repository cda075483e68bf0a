"""Tests for onerec_jax.evaluation.metrics: hand-computed metrics, weights, intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onerec_jax.evaluation.metrics import KS, bootstrap_ci, metric_values, metrics_from_ranks

RANKS = np.array([1, 3, 11, 60])


def test_hand_computed_metrics():
    m = metrics_from_ranks(RANKS)
    assert m["n_users"] == 4
    assert m["hr@10"] == pytest.approx(0.5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / 2) / 4)  # 1/log2(2) = 1, 1/log2(4) = 1/2
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 60) / 4)
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.5)
    assert m["hr@20"] == pytest.approx(0.75)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / 2 + 1 / math.log2(12)) / 4)
    assert m["mrr@50"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 4)
    assert m["hr@50"] == pytest.approx(0.75)  # rank 60 is outside every cut-off
    names = {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in KS} | {"mrr"}
    assert set(m) == names | {f"{n}_ci95" for n in names} | {"n_users"}


def test_fractional_ranks_of_ties():
    """Ranks ending in .5 (a target tied with an odd number of items) are taken as they are."""
    m = metrics_from_ranks(np.array([1.5, 4.5, 10.5, 10.0], np.float32), ks=(1, 5, 10))
    assert m["hr@1"] == 0.0  # 1.5 > 1: a target tied for first is not a hit at 1
    assert m["hr@5"] == pytest.approx(0.5) and m["hr@10"] == pytest.approx(0.75)
    gains = 1 / math.log2(2.5) + 1 / math.log2(5.5) + 1 / math.log2(11)
    assert m["ndcg@10"] == pytest.approx(gains / 4)
    assert m["mrr@10"] == pytest.approx((1 / 1.5 + 1 / 4.5 + 1 / 10) / 4)
    assert m["mrr"] == pytest.approx((1 / 1.5 + 1 / 4.5 + 1 / 10.5 + 1 / 10) / 4)


def test_normal_interval_matches_hand_formula():
    m = metrics_from_ranks(RANKS)
    # hr@10 per user: 1, 1, 0, 0 -> mean 0.5, sample variance (4 * 0.25) / 3.
    assert m["hr@10_ci95"] == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
    rr = np.array([1, 1 / 3, 1 / 11, 1 / 60])
    std = math.sqrt(((rr - rr.mean()) ** 2).sum() / 3)
    assert m["mrr_ci95"] == pytest.approx(1.96 * std / 2)
    assert m["hr@1_ci95"] == pytest.approx(1.96 * math.sqrt(0.75 / 3) / 2)  # 1,0,0,0


def test_weights_exclude_padding_rows():
    ranks = np.array([1, 3, 11, 60, 1, 1])
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)  # two padding rows ranked first
    assert metrics_from_ranks(ranks, weights) == pytest.approx(metrics_from_ranks(RANKS))
    assert metrics_from_ranks(ranks)["hr@1"] == pytest.approx(3 / 6)


def test_single_user_interval_is_nan_and_custom_ks():
    m = metrics_from_ranks(np.array([2]), ks=(2,))
    assert m["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert m["mrr@2"] == pytest.approx(0.5)
    assert math.isnan(m["ndcg@2_ci95"])
    assert "hr@10" not in m


@pytest.mark.parametrize("bad", [[1, 0, 3], [1, -2], [1.0, np.nan], [np.inf, 1.0], [0.5]])
def test_ranks_below_one_or_not_finite_are_rejected(bad):
    with pytest.raises(ValueError, match="rank"):
        metrics_from_ranks(np.array(bad))


def test_rank_below_one_rejected_even_on_padding_row():
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks(np.array([1, 0]), np.array([1, 0]))


def test_bad_weights_and_empty_batch_are_rejected():
    with pytest.raises(ValueError, match="weights must be 0"):
        metrics_from_ranks(RANKS, np.array([1, 2, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        metrics_from_ranks(RANKS, np.ones(3))
    with pytest.raises(ValueError, match="no user"):
        metrics_from_ranks(RANKS, np.zeros(4))
    with pytest.raises(ValueError, match="ks"):
        metrics_from_ranks(RANKS, ks=(0, 10))


def test_metric_values_per_user():
    v = metric_values(RANKS, ks=(10,))
    np.testing.assert_allclose(v["hr@10"], [1, 1, 0, 0])
    np.testing.assert_allclose(v["ndcg@10"], [1, 0.5, 0, 0])
    np.testing.assert_allclose(v["mrr"], [1, 1 / 3, 1 / 11, 1 / 60])


def test_bootstrap_two_values_by_hand():
    # Resampled means of [0, 1] are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the central
    # 95% of 1000 resamples spans [0, 1].
    assert bootstrap_ci(np.array([0.0, 1.0])) == (0.0, 1.0)
    assert bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))


def test_bootstrap_agrees_with_normal_interval_and_is_deterministic():
    rng = np.random.default_rng(1)
    ranks = rng.integers(1, 100, size=2000)
    m = metrics_from_ranks(ranks)
    values = metric_values(ranks)["hr@10"]
    low, high = bootstrap_ci(values, n_resamples=2000, seed=3)
    assert bootstrap_ci(values, n_resamples=2000, seed=3) == (low, high)
    assert low < m["hr@10"] < high
    assert (high - low) / 2 == pytest.approx(m["hr@10_ci95"], rel=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.array([]))
