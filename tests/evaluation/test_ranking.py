"""Tests for onerec_jax.evaluation.ranking against a slow numpy reference and hand cases."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.data.sequences import SequenceData
from onerec_jax.evaluation.metrics import metrics_from_ranks
from onerec_jax.evaluation.ranking import (
    block_sizes,
    history_batch,
    history_width,
    in_row_blocks,
    make_ranker,
    make_ranker_with,
    rank_and_topk,
    rank_and_topk_with,
    rank_in_list,
)

B, V, D, H = 7, 1000, 16, 12


def reference(users, table, targets, history, k, mask_history=True):
    """Slow float64 numpy reference: ranks (1 + strictly higher + half the tied others), top
    items (ties by lower id), top scores."""
    scores = users.astype(np.float64) @ table.astype(np.float64).T  # [B, V]
    ranks, items, values = [], [], []
    for b in range(len(users)):
        s = scores[b].copy()
        target_score = s[targets[b]]  # as-is, even if masked
        s[0] = -np.inf
        if mask_history:
            for h in history[b]:
                if h > 0:
                    s[h] = -np.inf
        higher = [j for j in range(1, len(s)) if j != targets[b] and s[j] > target_score]
        tied = [j for j in range(1, len(s)) if j != targets[b] and s[j] == target_score]
        ranks.append(1 + len(higher) + len(tied) / 2)
        order = sorted((j for j in range(1, len(s)) if s[j] > -np.inf), key=lambda j: (-s[j], j))
        order = (order + [0] * k)[:k]
        items.append(order)
        values.append([s[j] if j else -np.inf for j in order])
    return np.array(ranks), np.array(items), np.array(values)


def random_case(seed, batch=B, n_rows=V, dim=D, width=H, low=-2, high=3):
    """Integer-valued embeddings (exact in float32 and bfloat16, many exact ties)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(low, high, (batch, dim)).astype(np.float32)
    table = rng.integers(low, high, (n_rows, dim)).astype(np.float32)
    targets = rng.integers(1, n_rows, batch).astype(np.int32)
    history = rng.integers(1, n_rows, (batch, width)).astype(np.int32)
    history[rng.random((batch, width)) < 0.3] = 0  # padding, anywhere in the row
    history[history == targets[:, None]] = 0  # the protocol never has the target in history
    return users, table, targets, history


def run(users, table, targets, history, **kw):
    return [np.asarray(x) for x in rank_and_topk(users, table, targets, history, **kw)]


def assert_same(got, want):
    assert got[0].dtype == np.float32  # ranks end in .5 when the target ties with an odd count
    np.testing.assert_array_equal(got[0], want[0])  # ranks
    np.testing.assert_array_equal(got[1], want[1])  # top items, in order
    np.testing.assert_array_equal(got[2], want[2].astype(np.float32))  # top scores


@pytest.mark.parametrize(
    "chunk_size, k",
    [(8192, 50), (1000, 10), (250, 20), (128, 50), (37, 5), (16, 50), (1, 3)],
)
def test_matches_reference_for_chunkings(chunk_size, k):
    case = random_case(0)
    want = reference(*case, k)
    assert_same(run(*case, k=k, chunk_size=chunk_size), want)
    # The case has ties at the target and inside the top-k; check the test exercises them.
    users, table, targets, _ = case
    scores = users @ table.T
    assert (scores[np.arange(B), targets][:, None] == scores).sum() > 2 * B
    assert (want[0] % 1 == 0.5).any()  # some target ties with an odd number of others


@pytest.mark.parametrize("chunk_size", [1000, 96])
def test_matches_reference_without_history_mask(chunk_size):
    case = random_case(1)
    want = reference(*case, 20, mask_history=False)
    assert_same(run(*case, k=20, chunk_size=chunk_size, mask_history=False), want)
    masked = reference(*case, 20)
    assert (masked[0] <= want[0]).all() and (masked[0] < want[0]).any()


def test_bfloat16_inputs():
    case = random_case(2)
    users, table, targets, history = case
    got = run(jnp.bfloat16(users), jnp.bfloat16(table), targets, history, k=10, chunk_size=300)
    assert got[2].dtype == np.float32
    assert_same(got, reference(*case, 10))


def hand_case():
    """D=1, catalogue of 6 items: item scores are the table entries times user score 1."""
    table = np.array([[100.0], [5.0], [3.0], [9.0], [3.0], [1.0], [7.0]], np.float32)
    users = np.ones((1, 1), np.float32)
    return users, table


def test_hand_case_history_masking_ties_and_padding_item():
    users, table = hand_case()
    targets = np.array([2], np.int32)  # score 3; item 4 ties with it, item 0 scores 100
    history = np.array([[3, 0, 0]], np.int32)  # item 3 (score 9) scores above the target
    ranks, items, scores = run(users, table, targets, history, k=4, chunk_size=4)
    # Masked: items 1 (5) and 6 (7) are higher, tie item 4 counts half, padding item 0 never.
    assert ranks.tolist() == [3.5]
    assert items.tolist() == [[6, 1, 2, 4]]
    assert scores.tolist() == [[7, 5, 3, 3]]
    ranks, items, _ = run(users, table, targets, history, k=4, chunk_size=4, mask_history=False)
    assert ranks.tolist() == [4.5]  # item 3 now counts
    assert items.tolist() == [[3, 6, 1, 2]]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 7])
def test_partial_ties_count_half_with_and_without_history_mask(chunk_size):
    """Items 1..6 score [3, 1, 1, 1, 0, 2]; the target is item 3, one of the three 1s.

    Chunks of 1-4 cut the run of tied items 2, 3, 4 at every place."""
    table = np.array([[100.0], [3.0], [1.0], [1.0], [1.0], [0.0], [2.0]], np.float32)
    users = np.ones((4, 1), np.float32)
    targets = np.full(4, 3, np.int32)
    history = np.array([[0, 0], [4, 0], [1, 0], [2, 4]], np.int32)
    ranks, items, _ = run(users, table, targets, history, k=6, chunk_size=chunk_size)
    # 1 + 2 higher (items 1, 6) + 2 tied (items 2, 4) / 2 = 4; a masked tied item no longer
    # counts (3.5; both masked: 3), nor does a masked higher one (3). Padding item 0: never.
    assert ranks.dtype == np.float32
    assert ranks.tolist() == [4.0, 3.5, 3.0, 3.0]
    assert items[0].tolist() == [1, 6, 2, 3, 4, 5]  # top-k ties still by lower id
    ranks, _, _ = run(
        users, table, targets, history, k=6, chunk_size=chunk_size, mask_history=False
    )
    assert ranks.tolist() == [4.0] * 4


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_all_scores_equal_gives_a_random_rankings_mean_rank(chunk_size):
    """A model that scores every item alike ranks each target (n + 1) / 2 among its n unmasked
    items: the mean position over random orders, never first."""
    n_items = 9
    table = np.full((n_items + 1, 4), 0.5, np.float32)  # every row alike; sums exact in float32
    users = np.array([[1.0, -2.0, 0.5, 0.25]] * 3, np.float32)  # every score -0.125
    targets = np.array([2, 5, 9], np.int32)
    history = np.array([[0, 0], [3, 7], [1, 0]], np.int32)  # 9, 7 and 8 unmasked items
    ranks, _, _ = run(users, table, targets, history, k=3, chunk_size=chunk_size)
    unmasked = np.array([9, 7, 8])
    assert ranks.tolist() == [5.0, 4.0, 4.5] == ((unmasked + 1) / 2).tolist()
    assert [np.arange(1, n + 1).mean() for n in unmasked] == [5.0, 4.0, 4.5]
    m = metrics_from_ranks(ranks)
    # The metrics of those ranks, by hand: no target at 1; all three within 5.
    assert m["hr@1"] == m["ndcg@1"] == m["mrr@1"] == 0.0
    assert m["hr@5"] == m["hr@10"] == 1.0
    ndcg = (1 / math.log2(6) + 1 / math.log2(5) + 1 / math.log2(5.5)) / 3
    assert m["ndcg@5"] == pytest.approx(ndcg) and m["ndcg@10"] == pytest.approx(ndcg)
    assert m["mrr"] == pytest.approx((1 / 5 + 1 / 4 + 1 / 4.5) / 3)
    # ... the same whether the tied scores come from a dot product or a scorer of its own.
    got = rank_and_topk_with(
        lambda state, ids: jnp.zeros((3, ids.shape[0])),
        None,
        n_items,
        targets,
        history,
        k=3,
        chunk_size=chunk_size,
    )
    np.testing.assert_array_equal(got[0], ranks)


def test_rank_in_list_counts_ties_among_listed_items():
    """Beam-search lists: the target's score against the other listed items only."""
    items = np.array([[5, 2, 9, 4, 0]] * 6 + [[3, 1, 0, 0, 0], [6, 7, 8, 1, 2]], np.int32)
    scores = np.array(
        [[-1.0, -2.0, -2.0, -3.0, -np.inf]] * 6
        + [[np.nan, -1.0, -np.inf, -np.inf, -np.inf], [-2.0] * 5],
        np.float32,
    )
    targets = np.array([5, 2, 9, 4, 7, 0, 1, 8], np.int32)
    ranks = np.asarray(jax.jit(rank_in_list)(items, scores, targets, 10))
    assert ranks.dtype == np.float32
    # 5: first; 2 and 9: one above, tied with each other (2.5); 4: three above; 7: not listed
    # and 0 (padding row) only matches empty slots: n_items + 1; 1: below a NaN (2); a list
    # scored all alike: (5 + 1) / 2.
    assert ranks.tolist() == [1.0, 2.5, 2.5, 4.0, 11.0, 11.0, 2.0, 3.0]


def test_target_in_history_is_compared_as_is_and_empty_slots_are_zero():
    users, table = hand_case()
    targets = np.array([6], np.int32)  # score 7
    history = np.array([[6, 3, 1]], np.int32)  # target itself masked, and items 3, 1
    ranks, items, scores = run(users, table, targets, history, k=6, chunk_size=3)
    assert ranks.tolist() == [1]  # item 3 (9) is masked; the target keeps its own score
    assert items.tolist() == [[2, 4, 5, 0, 0, 0]]  # only 3 unmasked items; 0 fills the rest
    assert scores[0, :3].tolist() == [3, 3, 1] and np.isneginf(scores[0, 3:]).all()


def test_non_finite_scores_never_help_the_target():
    table = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]], np.float32)
    users = np.array([[1.0], [np.nan], [np.inf], [1.0]], np.float32)
    targets = np.array([2, 2, 3, 0], np.int32)  # last row: padding (target 0)
    history = np.zeros((4, 1), np.int32)
    ranks, items, _ = run(users, table, targets, history, k=2)
    assert ranks[:3].tolist() == [3, 4, 4]  # NaN and inf targets get the worst rank n_items
    assert 1 <= ranks[3] <= 5  # padding row: finite and >= 1
    assert items[0].tolist() == [4, 3]
    nan_item = table.copy()
    nan_item[4, 0] = np.nan  # a NaN item counts as higher and is kept out of the top-k
    ranks, items, _ = run(users[:1], nan_item, targets[:1], history[:1], k=2)
    assert ranks.tolist() == [3]
    assert items.tolist() == [[3, 2]]


def test_generic_scorer_matches_reference():
    """A non-dot scorer (negative squared distance), target scores from its diagonal."""
    users, table, targets, history = random_case(3, low=-3, high=4)

    def score_chunk(state, ids):
        diff = state[:, None, :] - jnp.asarray(table)[ids][None, :, :]  # [B, C, D]
        return -jnp.sum(diff * diff, axis=-1)

    got = rank_and_topk_with(score_chunk, users, V - 1, targets, history, k=15, chunk_size=200)
    got = [np.asarray(x) for x in got]
    dist = ((users[:, None, :] - table[None, :, :]) ** 2).sum(-1)  # [B, V]
    # Same reference as for dot products: -dist is a dot product in an augmented space.
    aug_users = np.concatenate([2 * users, -np.ones((B, 1)), -(users**2).sum(1, keepdims=True)], 1)
    aug_table = np.concatenate([table, (table**2).sum(1, keepdims=True), np.ones((V, 1))], 1)
    np.testing.assert_array_equal(aug_users @ aug_table.T, -dist)
    assert_same(got, reference(aug_users, aug_table, targets, history, 15))


def test_k_larger_than_catalogue_or_bad_chunk_is_rejected():
    users, table = hand_case()
    args = (users, table, np.array([1], np.int32), np.zeros((1, 1), np.int32))
    with pytest.raises(ValueError, match="k=7"):
        rank_and_topk(*args, k=7)
    with pytest.raises(ValueError, match="chunk_size"):
        rank_and_topk(*args, k=2, chunk_size=0)


def test_make_ranker_unsharded_is_jitted_and_matches():
    case = random_case(4)
    ranker = make_ranker(k=10, chunk_size=128)
    got = [np.asarray(x) for x in ranker(*case)]
    assert_same(got, reference(*case, 10))


@pytest.mark.parametrize("block_rows", [1, 2, 4, 3])  # 3 divides 12, 4 and 2 too; 1: each user
def test_ranking_users_in_blocks_matches_the_reference(block_rows):
    """Users ranked a block at a time (the CPU default) give the reference's ranks and lists,
    for the dot-product ranker and a model scorer over a pytree state."""
    users, table, targets, history = random_case(5, batch=12)
    want = reference(users, table, targets, history, 10)
    ranker = make_ranker(k=10, chunk_size=128, block_rows=block_rows)
    assert_same([np.asarray(x) for x in ranker(users, table, targets, history)], want)

    def score_chunk(params, state, ids):  # state: a pytree of [B, ...] leaves
        return state["u"] @ params[ids].T + 0.0 * state["pad"][:, :1]

    state = {"u": jnp.asarray(users), "pad": jnp.zeros((12, 3))}
    ranker = make_ranker_with(score_chunk, V - 1, k=10, chunk_size=128, block_rows=block_rows)
    assert_same([np.asarray(x) for x in ranker(state, table, targets, history)], want)


def test_in_row_blocks_maps_blocks_and_falls_back_to_whole_batches():
    calls = []

    def fn(params, batch):
        calls.append(batch["x"].shape)  # traced once per shape
        return {"y": batch["x"] * params + batch["z"][:, None]}

    x = jnp.arange(24.0).reshape(8, 3)
    batch = {"x": x, "z": jnp.arange(8.0)}
    want = x * 2.0 + jnp.arange(8.0)[:, None]
    for rows, traced in ((2, (2, 3)), (8, (8, 3)), (3, (8, 3)), (0, (8, 3))):
        calls.clear()
        got = jax.jit(in_row_blocks(fn, rows))(2.0, batch)
        np.testing.assert_array_equal(got["y"], want)
        assert calls == [traced]  # blocks of `rows` only when they divide the batch


def test_block_sizes_auto_on_one_cpu_device_and_as_set_elsewhere():
    e = {"state_rows": 0, "rank_rows": 0, "chunk_size": 0}
    assert jax.default_backend() == "cpu"
    assert block_sizes(e) == {"state_rows": 8, "rank_rows": 64, "chunk_size": 2048}
    assert block_sizes(e, one_device=False) == {"state_rows": 0, "rank_rows": 0, "chunk_size": 8192}
    e = {"state_rows": 16, "rank_rows": 32, "chunk_size": 512}
    assert block_sizes(e) == e
    assert block_sizes(e, one_device=False) == {"state_rows": 0, "rank_rows": 0, "chunk_size": 512}


def test_make_ranker_with_a_pytree_state_matches_and_shards_over_the_batch():
    """A model scorer over (params, state pytree): unsharded, on 8 devices, as dot products."""
    users, table, targets, history = random_case(6, batch=16)
    want = reference(users, table, targets, history, 12)

    def score_chunk(params, state, ids):  # state["u"] . table[ids] + state["bias"]
        return state["u"] @ params["table"][ids].T + state["bias"][:, None]

    state = {"u": users, "bias": np.zeros(16, np.float32)}
    params = {"table": table}
    got = make_ranker_with(score_chunk, V - 1, k=12, chunk_size=300)(
        state, params, targets, history
    )
    assert_same([np.asarray(x) for x in got], want)
    if jax.device_count() >= 8:
        from onerec_jax.parallel.sharding import make_mesh

        mesh = make_mesh((-1, 1, 1), jax.devices()[:8])
        ranker = make_ranker_with(score_chunk, V - 1, mesh, k=12, chunk_size=300)
        got = ranker(state, params, targets, history)
        assert got[0].sharding.spec[0] == ("data", "fsdp") and len(got[1].addressable_shards) == 8
        assert_same([np.asarray(x) for x in got], want)


SHARDED_CHECK = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from onerec_jax.evaluation.ranking import make_ranker
    assert jax.device_count() >= 8, jax.devices()
    rng = np.random.default_rng(5)
    users = rng.integers(-2, 3, (16, 16)).astype(np.float32)
    table = rng.integers(-2, 3, (1000, 16)).astype(np.float32)
    targets = rng.integers(1, 1000, 16).astype(np.int32)
    targets[-3:] = 0  # padding rows
    history = rng.integers(0, 1000, (16, 32)).astype(np.int32)
    history[history == targets[:, None]] = 0
    want = [np.asarray(x) for x in make_ranker(k=20, chunk_size=96)(users, table, targets, history)]
    for shape in [(2, 4, 1), (2, 2, 2)]:
        mesh = jax.make_mesh(shape, ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3,
                             devices=jax.devices()[:8])
        out = make_ranker(mesh, k=20, chunk_size=96)(users, table, targets, history)
        assert out[0].sharding.spec[0] == ("data", "fsdp"), out[0].sharding
        assert len(out[1].addressable_shards) == 8
        for g, w in zip(out, want):
            np.testing.assert_array_equal(np.asarray(g), w)
    # Inputs already laid out otherwise on the mesh (a model's table over "model"/"fsdp").
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    out = make_ranker(mesh, k=20, chunk_size=96)(
        put(users, "data", "model"), put(table, "model", "fsdp"), targets, history
    )
    for g, w in zip(out, want):
        np.testing.assert_array_equal(np.asarray(g), w)
    print("SHARDED_OK")
    """
)


@pytest.mark.skipif(jax.device_count() >= 8, reason="runs in process instead")
def test_sharded_matches_unsharded_on_8_cpu_devices():
    """The sharded check in a subprocess with 8 fake CPU devices, when this process has fewer
    (tests/conftest.py normally gives it 8): one of the two sharded tests always runs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices in this process")
def test_sharded_matches_unsharded_in_process():
    exec(compile(SHARDED_CHECK, "sharded_check", "exec"), {})


def make_data(sequences):
    lengths = [len(s) for s in sequences]
    items = np.array([i for s in sequences for i in s], np.int32)
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64),
        ratings=np.ones(len(items), np.float32),
        user_ids=np.arange(len(sequences)),
        item_ids=np.arange(int(items.max()) + 1),
        options={},
    )


def test_history_batch_by_hand():
    data = make_data([[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 1, 4, 1, 5, 9, 2, 6]])
    test = history_batch(data, "test", np.array([0, 1, 2, 0]))  # last row: padding (user 0)
    assert test.dtype == np.int32
    # Longest test prefix: 7 items -> width 8.
    np.testing.assert_array_equal(
        test,
        [
            [1, 2, 3, 4, 5, 0, 0, 0],
            [7, 8, 0, 0, 0, 0, 0, 0],
            [3, 1, 4, 1, 5, 9, 2, 0],
            [1, 2, 3, 4, 5, 0, 0, 0],
        ],
    )
    valid = history_batch(data, "valid", np.array([1, 0]))  # prefixes of 1 and 4 items
    np.testing.assert_array_equal(valid, [[7, 0, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(history_batch(data, "valid", np.array([1])), [[7]])
    wide = history_batch(data, "valid", np.array([1]), width=3)
    np.testing.assert_array_equal(wide, [[7, 0, 0]])
    with pytest.raises(ValueError, match="width 4"):
        history_batch(data, "test", np.array([2]), width=4)
    with pytest.raises(ValueError, match="dense ids"):
        history_batch(data, "test", np.array([3]))


def test_history_width_is_the_next_power_of_two():
    widths = [history_width(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 200)]
    assert widths == [1, 1, 2, 4, 4, 8, 8, 16, 256]


def test_history_batch_masks_whole_prefix_end_to_end():
    """The whole prefix is masked, not only a window: ranks from history_batch match numpy."""
    rng = np.random.default_rng(6)
    data = make_data([list(rng.permutation(np.arange(1, 200))[:n]) for n in (150, 3, 40, 77)])
    users = np.array([0, 1, 2, 3, 0])
    history = history_batch(data, "test", users)
    assert history.shape == (5, 256)
    targets = data.test.targets[users]
    emb_users = rng.integers(-2, 3, (5, 8)).astype(np.float32)
    table = rng.integers(-2, 3, (200, 8)).astype(np.float32)
    got = run(emb_users, table, targets, history, k=30, chunk_size=64)
    want = reference(emb_users, table, targets, [data.sequence(u)[:-1] for u in users], 30)
    assert_same(got, want)
