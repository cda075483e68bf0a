"""The top-k list evaluator on a catalogue small enough to work every rank and metric by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import base_config
from onerec_jax.evaluation.evaluator import TopKList, list_checks
from onerec_jax.parallel import sharding

N_ITEMS = 20
# Dense users 0..2; the test split's prefix is all but the last item, the target the last.
SEQUENCES = [[1, 2, 3, 4], [5, 6, 7, 1], [2, 5, 3, 6]]


def tiny_data() -> SequenceData:
    lengths = [len(s) for s in SEQUENCES]
    n = sum(lengths)
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=np.concatenate(SEQUENCES).astype(np.int32),
        timestamps=np.arange(n, dtype=np.int64),
        ratings=np.ones(n, np.float32),
        user_ids=np.arange(3, dtype=np.int64),
        item_ids=np.arange(N_ITEMS + 1, dtype=np.int64),
        options={},
    )


class FixedLists:
    """A model whose top-k list of each user is read from its params (`lists`, `scores`)."""

    evaluator = "topk_list"
    ranking = "fixed lists"

    def topk(self, params, batch, history, k=None):
        return params["lists"][batch["user"]], params["scores"][batch["user"]]


def evaluate(lists, scores, split="test"):
    config = base_config()
    config.eval.update(k=4, batch_size=8, valid_users=0)
    mesh = sharding.make_mesh(config.mesh.shape, jax.devices()[:1])
    rules = sharding.rules_from_config(config.mesh.rules)
    params = {
        "lists": jnp.asarray(lists, jnp.int32),
        "scores": jnp.asarray(scores, jnp.float32),
    }
    with sharding.use_mesh(mesh, rules):
        evaluator = TopKList(FixedLists(), tiny_data(), config, mesh, rules)
        return evaluator.evaluate(params, split)


def test_ranks_and_metrics_by_hand():
    ninf = -np.inf
    lists = [[5, 4, 6, 0], [2, 3, 1, 4], [1, 4, 0, 0]]
    scores = [[-1, -2, -3, ninf], [-1, -2, -2, -3], [-1, -2, ninf, ninf]]
    result, per_user = evaluate(lists, scores)
    # user 0: target 4 second -> 2; user 1: target 1 tied with item 3 after item 2 -> 1 + 1 +
    # 1/2 = 2.5; user 2: target 6 not listed -> n_items + 1 = 21
    np.testing.assert_array_equal(per_user["users"], [0, 1, 2])
    np.testing.assert_allclose(per_user["ranks"], [2.0, 2.5, 21.0])
    np.testing.assert_array_equal(per_user["top_items"], lists)
    assert result["hr@1"] == 0.0
    assert result["hr@5"] == pytest.approx(2 / 3)
    assert result["ndcg@5"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(3.5)) / 3)
    assert result["mrr@5"] == pytest.approx((1 / 2 + 1 / 2.5) / 3)
    assert result["ndcg@50"] == pytest.approx(
        (1 / np.log2(3) + 1 / np.log2(3.5) + 1 / np.log2(22)) / 3
    )
    assert result["mrr"] == pytest.approx((1 / 2 + 1 / 2.5 + 1 / 21) / 3)
    assert result["n_users"] == 3
    # users 0 and 2 have 17 unseen items but lists of 3 and 2: short; nothing invalid
    assert (result["lists_short"], result["lists_invalid"], result["lists_duplicate"]) == (2, 0, 0)


def test_list_checks_count_invalid_seen_and_repeated_items():
    data = tiny_data()
    lists = np.array(
        [
            [5, 5, 9, 0],  # a repeat of 5 (1 duplicate), short
            [21, 6, 8, 9],  # 21 is past the catalogue, 6 is in the prefix (5, 6, 7): 2 invalid
            [1, 4, 7, 8],  # full and clean
        ]
    )
    checks = list_checks(lists, data, "test", np.array([0, 1, 2]))
    assert checks == {"lists_invalid": 2, "lists_duplicate": 1, "lists_short": 1}
    # the validation prefix of user 1 is (5, 6): item 7 is then unseen, 6 still seen
    checks = list_checks(np.array([[7, 6, 0, 0]]), data, "valid", np.array([1]))
    assert checks == {"lists_invalid": 1, "lists_duplicate": 0, "lists_short": 1}
