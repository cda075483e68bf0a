"""Cold-start protocols (data/cold_start.py), the evaluator's segments and popularity by
content, on hand-made data checked by hand."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from onerec_jax.data import cold_start
from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError
from onerec_jax.evaluation import evaluator
from onerec_jax.models import pop
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model


def _data():
    # user 0: 1 2 3 4 5 | user 1: 2 5 6 3 | user 2: 6 6 1 2 (timestamps: first appearances
    # item 1 @0, 2 @1, 3 @2, 4 @3, 5 @4, 6 @11)
    items = np.array([1, 2, 3, 4, 5, 2, 5, 6, 3, 6, 6, 1, 2], np.int32)
    ts = np.array([0, 1, 2, 3, 4, 10, 10, 11, 12, 20, 21, 22, 23])
    return SequenceData(
        offsets=np.array([0, 5, 9, 13]),
        items=items,
        timestamps=ts,
        ratings=np.arange(13, dtype=np.float32),
        user_ids=np.array([7, 8, 9]),
        item_ids=np.array([-1, 10, 20, 30, 40, 50, 60]),
        options={"min_rating": None},
    )


def test_newest_and_random_items_held_out():
    data = _data()
    cold = cold_start.cold_item_mask(data, 2 / 6, "newest")
    assert np.flatnonzero(cold).tolist() == [5, 6]  # first seen at t=11 (6) and t=4 (5)
    cold = cold_start.cold_item_mask(data, 0.5, "random", seed=3)
    assert cold.sum() == 3 and not cold[0]
    assert not cold_start.cold_item_mask(data, 0.0).any()
    with pytest.raises(ConfigError, match="data.cold_items=1.0"):
        cold_start.cold_item_mask(data, 1.0)
    with pytest.raises(ConfigError, match="data.cold_items_by='oldest'"):
        cold_start.cold_item_mask(data, 0.2, "oldest")


def test_held_out_items_leave_training_only():
    data = _data()
    cold = np.zeros(7, bool)
    cold[[5, 6]] = True
    out = cold_start.hold_out_items(data, cold)
    # user 0 train 1 2 3 (4, 5 valid/test: kept); user 1 train 2 [5 6 removed] -> only 2
    # valid 6 test 3 -> 2 6 3; user 2 train [6 6 removed] -> no training item: dropped
    assert out.user_ids.tolist() == [7, 8]
    assert out.offsets.tolist() == [0, 5, 8]
    assert out.items.tolist() == [1, 2, 3, 4, 5, 2, 6, 3]
    assert out.ratings.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]  # rows follow their items
    assert out.options["cold_items_held_out"] == 2 and out.options["cold_users_dropped"] == 1
    assert out.options["min_rating"] is None
    assert out.valid.targets.tolist() == [4, 6] and out.test.targets.tolist() == [5, 3]


def test_new_users_keep_their_last_training_items():
    data = _data()
    out = cold_start.truncate_users(data, 1.0, n_items=1)  # every user is new
    assert out.items.tolist() == [3, 4, 5, 5, 6, 3, 6, 1, 2]
    assert out.split("train").lengths.tolist() == [1, 1, 1]
    assert cold_start.truncate_users(data, 0.0, 1).items.tolist() == data.items.tolist()
    with pytest.raises(ConfigError, match="new_user_items=0"):
        cold_start.truncate_users(data, 0.5, 0)


def test_apply_reads_the_config():
    cfg = base_config().data
    assert cold_start.apply(cfg, _data()).items.tolist() == _data().items.tolist()
    cfg.cold_items, cfg.new_users, cfg.new_user_items = 2 / 6, 1.0, 1
    out = cold_start.apply(cfg, _data())
    assert out.items.tolist() == [3, 4, 5, 2, 6, 3]
    assert out.options["new_users"] == 2


def test_segments_and_their_metrics_by_hand():
    data = _data()
    c = base_config()
    # train counts: item 6 occurs only as user 1's valid target (t 11) and user 2's training
    cold = np.zeros(7, bool)
    cold[[5, 6]] = True
    held = cold_start.hold_out_items(data, cold)  # users 7, 8; test targets 5 and 3
    masks = evaluator.segments(held, "test", np.array([0, 1]), c)
    assert masks["cold"].tolist() == [True, False] and masks["warm"].tolist() == [False, True]
    assert "new_users" not in masks
    per_user = {"users": np.array([0, 1]), "ranks": np.array([4.0, 1.0])}
    out = evaluator.segment_metrics(held, "test", per_user, c)
    assert out["cold/n_users"] == 1 and out["warm/n_users"] == 1
    assert out["cold/ndcg@10"] == pytest.approx(1 / np.log2(5))
    assert out["cold/mrr"] == pytest.approx(0.25) and out["warm/hr@10"] == 1.0
    c.data.new_users, c.data.new_user_items = 0.5, 2
    masks = evaluator.segments(held, "valid", np.array([0, 1]), c)
    assert masks["new_users"].tolist() == [False, True]  # train lengths 3 and 1
    assert "cold" in masks  # user 1's validation target 6 is held out
    # nothing cold: no cold/warm segments; the test targets are rated 4, 8, 12: all "liked"
    masks = evaluator.segments(data, "test", np.arange(3), base_config())
    assert sorted(masks) == ["disliked", "liked"] and masks["liked"].all()
    unrated = dataclasses.replace(data, ratings=np.ones(13, np.float32))  # a `user item` file
    no_protocol = base_config()
    assert not unrated.has_ratings
    assert evaluator.segments(unrated, "test", np.arange(3), no_protocol) == {}


def test_preference_segments_and_graded_ndcg_by_hand():
    data = dataclasses.replace(
        _data(), ratings=np.array([0, 0, 0, 1, 5, 0, 0, 2, 4.5, 0, 0, 3, 2.5], np.float32)
    )
    assert data.target_ratings("test").tolist() == [5, 4.5, 2.5]
    assert data.target_ratings("valid").tolist() == [1, 2, 3]
    per_user = {"users": np.arange(3), "ranks": np.array([1.0, 3.0, 20.0])}
    out = evaluator.segment_metrics(data, "test", per_user, base_config())
    assert out["liked/n_users"] == 2 and out["disliked/n_users"] == 1
    assert out["liked/ndcg@10"] == pytest.approx((1 + 1 / np.log2(4)) / 2)
    assert out["disliked/ndcg@10"] == 0.0
    # rating / 5 / log2(1 + rank) for ranks within 10: 5/5/1 + 4.5/5/2 + 0 (rank 20), over 3
    assert out["graded_ndcg@10"] == pytest.approx((1.0 + 0.45) / 3)


def test_popularity_by_content_by_hand():
    genres = np.array([[0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], np.float32)
    counts = np.array([0, 3, 7, 1, 0, 0])  # items 4 (genre B) and 5 (genre A) are cold
    info = DataInfo(n_items=5, max_len=4, item_counts=counts, item_genres=genres)
    out = pop.content_log_counts(info, alpha=1e-9)
    np.testing.assert_allclose(out[:4], np.log1p(counts[:4]))  # warm items keep their own
    # least squares with genre columns A, B and an intercept fits each genre's mean exactly
    assert out[5] == pytest.approx(np.log1p([3, 7]).mean(), abs=1e-6)
    assert out[4] == pytest.approx(np.log1p(1), abs=1e-6)
    plain = pop.content_log_counts(DataInfo(n_items=5, max_len=4, item_counts=counts))
    assert plain[4] == plain[5] == pytest.approx(np.log1p([3, 7, 1]).mean())
    c = apply_variant(base_config(), "popcontent")
    model = pop.build(c, info)
    params = nn.meta.unbox(model.init(jax.random.key(0), {"inputs": np.zeros((1, 4), np.int32)}))
    table = np.asarray(model.item_table(params))
    np.testing.assert_allclose(table[:, 0], pop.content_log_counts(info), rtol=1e-5)  # alpha 1


def test_item_head_ranks_untrained_items_by_content_alone():
    c = apply_variant(base_config(), "onerec")
    c.model.update(dim=8, num_layers=1, num_heads=1, mlp_dim=8, cold_content_only=True)
    genres = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 1, 0]]
    counts = np.array([0, 5, 0, 2, 0, 1])  # items 2 and 4 never trained on
    info = DataInfo(n_items=5, max_len=4, item_counts=counts, item_genres=genres)
    model = build_model(c, info)
    params = nn.meta.unbox(model.init(jax.random.key(0), {"inputs": np.zeros((1, 4), np.int32)}))
    full = np.asarray(model.item_table(params))
    ids = np.asarray(params["id_embedding"]["embedding"])[: len(full)]
    ranked = np.asarray(model.ranking_table(params))
    np.testing.assert_allclose(ranked[[2, 4]], full[[2, 4]] - ids[[2, 4]], atol=1e-6)
    np.testing.assert_allclose(ranked[[0, 1, 3, 5]], full[[0, 1, 3, 5]], atol=1e-6)
    c.model.cold_content_only = False
    np.testing.assert_array_equal(build_model(c, info).ranking_table(params), full)
