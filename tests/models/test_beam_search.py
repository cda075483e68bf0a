"""Tests for onerec_jax.models.beam_search against brute force and a loop-based numpy beam."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onerec_jax.models.beam_search import (
    STATIC_ARGNAMES,
    beam_search,
    make_beam_search,
    seen_mask,
    unseen_counts,
)
from onerec_jax.tokenize.semantic_ids import SemanticIds, from_codes, random_codes

NEG_INF = -np.inf


# ---------------------------------------------------------------- a deterministic toy model


def _prefix_rows(code_sizes: tuple[int, ...]) -> int:
    """Rows of the logit table: every prefix of the content levels has its own mixed-radix row."""
    return int(np.prod(code_sizes[:-1]))


def _row_of(prefix, code_sizes):
    """Mixed-radix index of `prefix [..., level]` (works on numpy and jax arrays alike)."""
    row = 0
    for j in range(prefix.shape[-1]):
        row = row * code_sizes[j] + prefix[..., j]
    return row


@functools.cache
def toy_step_fn(code_sizes: tuple[int, ...]):
    """step_fn reading logits from context [B, L + 1, rows, C_max], one row per (user, prefix).

    Cached per catalogue shape so the jitted searches see the same callable (no recompiles).
    """

    def step_fn(context, tokens, level):  # tokens [B, W, level] -> logits [B, W, C_level]
        rows = _row_of(tokens, code_sizes) + jnp.zeros(tokens.shape[:2], jnp.int32)  # [B, W]
        logits = jax.vmap(lambda table, r: table[r])(context[:, level], rows)  # [B, W, C_max]
        return logits[..., : code_sizes[level]]

    return step_fn


def random_context(rng, batch, code_sizes, scale=2.0):
    """[B, L + 1, rows, C_max] float32 random logits (continuous: no ties between items)."""
    shape = (batch, len(code_sizes), _prefix_rows(code_sizes), max(code_sizes))
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def random_history(rng, batch, n_items, width):
    """[B, H] int32 item ids with about a third of the slots padding (0)."""
    history = rng.integers(1, n_items + 1, (batch, width))
    return np.where(rng.random((batch, width)) < 0.33, 0, history).astype(np.int32)


# ---------------------------------------------------------------- slow numpy references


def ref_logp(table, code_sizes, level, prefix):
    """float64 log_softmax over the level's full vocabulary for one user's `prefix` tuple."""
    row = table[level, _row_of(np.asarray(prefix, np.int64), code_sizes), : code_sizes[level]]
    row = row.astype(np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def ref_item_score(table, sem: SemanticIds, item):
    codes = sem.codes[item]
    return sum(
        ref_logp(table, sem.codebook_sizes, level, tuple(codes[:level]))[codes[level]]
        for level in range(sem.id_length)
    )


def brute_force(context, sem: SemanticIds, history, k):
    """Top-k unseen items of every row by enumerating the whole catalogue."""
    items = np.zeros((len(context), k), np.int32)
    scores = np.full((len(context), k), NEG_INF)
    for b, table in enumerate(context):
        seen = set(history[b].tolist())
        ranked = sorted(
            (
                (ref_item_score(table, sem, i), i)
                for i in range(1, sem.n_items + 1)
                if i not in seen
            ),
            key=lambda t: -t[0],
        )[:k]
        for j, (score, item) in enumerate(ranked):
            items[b, j], scores[b, j] = item, score
    return items, scores


def ref_beam(context, sem: SemanticIds, history, beam, k, prune=False):
    """The same algorithm in loops: keep `beam` prefixes per level, then the top-k items.

    Candidates are listed beam by beam, code by code, and sorted stably, which is the tie order
    of `lax.top_k` over the flat [beam * C] candidates. `prune`: a prefix none of whose items
    is unseen (found by scanning the catalogue's codes) is no candidate.
    """
    tables = sem.prefix_tables()
    sizes, depth = sem.codebook_sizes, sem.id_length
    items = np.zeros((len(context), k), np.int32)
    scores = np.full((len(context), k), NEG_INF)
    for b, table in enumerate(context):
        seen = set(history[b].tolist())
        unseen_codes = [tuple(sem.codes[i]) for i in range(1, sem.n_items + 1) if i not in seen]
        beams = [(0.0, (), 0)]  # (score, tokens, prefix id); only the empty prefix is live
        for level in range(depth):
            cands = []
            for score, tokens, prefix in beams:
                logp = ref_logp(table, sizes, level, tokens)
                for code in range(sizes[level]):
                    child = int(tables.next_prefix[level][prefix, code])
                    if not tables.valid[level][prefix, code]:
                        continue
                    if level == depth - 1 and (child in seen):
                        continue
                    path = (*tokens, code)
                    if prune and not any(c[: level + 1] == path for c in unseen_codes):
                        continue
                    cands.append((score + logp[code], (*tokens, code), child))
            cands.sort(key=lambda c: -c[0])
            beams = cands[: (beam if level < depth - 1 else k)]
        for j, (score, _, item) in enumerate(beams):
            items[b, j], scores[b, j] = item, score
    return items, scores


# ---------------------------------------------------------------- helpers


def run_search(context, sem: SemanticIds, history, beam, k, prune=False):
    """Jitted beam search through `make_beam_search`, as numpy arrays; `prune` passes the
    catalogue's item prefixes."""
    valid, next_prefix = sem.prefix_tables().stacked()
    search = _searcher(sem.codebook_sizes, sem.n_items, beam, k)
    prefixes = sem.item_prefixes() if prune else None
    items, scores = search(jnp.asarray(context), valid, next_prefix, jnp.asarray(history), prefixes)
    return np.asarray(items), np.asarray(scores)


@functools.cache
def _searcher(code_sizes, n_items, beam, k):
    return make_beam_search(toy_step_fn(code_sizes), code_sizes, n_items=n_items, beam=beam, k=k)


def assert_same_ranking(items, scores, ref_items, ref_scores):
    np.testing.assert_array_equal(np.isneginf(scores), np.isneginf(ref_scores))
    finite = np.isfinite(ref_scores)
    np.testing.assert_allclose(scores[finite], ref_scores[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(items, ref_items)


@pytest.fixture(scope="module")
def catalogue() -> SemanticIds:
    """30 items over codebooks (4, 3, 5), with collisions: a 4-level id (4, 3, 5, C)."""
    rng = np.random.default_rng(0)
    sem = from_codes(rng.integers(0, [4, 3, 5], (30, 3)), (4, 3, 5))
    assert sem.codebook_sizes[-1] >= 2  # the collision level is exercised
    return sem


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("k", [5, 30])
def test_exhaustive_beam_equals_brute_force(catalogue, k):
    rng = np.random.default_rng(k)
    beam = max(catalogue.prefix_tables().n_prefixes)  # >= valid prefixes at every level
    context = random_context(rng, 4, catalogue.codebook_sizes)
    history = random_history(rng, 4, catalogue.n_items, 6)
    items, scores = run_search(context, catalogue, history, beam, k)
    ref_items, ref_scores = brute_force(context, catalogue, history, k)
    assert_same_ranking(items, scores, ref_items, ref_scores)
    if k == 30:  # more slots than unseen items: padding at the end of every row
        assert (items == 0).any(axis=1).all()


def test_narrow_beam_invariants_over_random_inputs():
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        sem = random_codes(40, 3, 4, rng)
        tables, batch, beam, k = sem.prefix_tables(), 16, 3, 8
        context = random_context(rng, batch, sem.codebook_sizes, scale=3.0)
        history = random_history(rng, batch, sem.n_items, 10)
        items, scores = run_search(context, sem, history, beam, k)
        assert items.shape == (batch, k) and items.dtype == np.int32
        assert scores.dtype == np.float32
        assert np.all(scores[:, :-1] >= scores[:, 1:])  # non-increasing
        for b in range(batch):
            real = items[b][np.isfinite(scores[b])]
            assert np.all(items[b][~np.isfinite(scores[b])] == 0)
            assert np.all((real >= 1) & (real <= sem.n_items))
            assert len(set(real.tolist())) == len(real)  # distinct
            assert not set(real.tolist()) & set(history[b].tolist())
            for item, score in zip(real, scores[b][: len(real)], strict=True):
                codes = sem.codes[item]
                assert sem.code_to_item(codes[None])[0] == item  # a real full id
                node = 0  # the id walks the prefix tables to this very item
                for level, code in enumerate(codes):
                    assert tables.valid[level][node, code]
                    node = tables.next_prefix[level][node, code]
                assert node == item
                # The score is this item's own path log-probability.
                np.testing.assert_allclose(score, ref_item_score(context[b], sem, item), atol=1e-5)


def test_fewer_unseen_items_than_k_pads_with_item_zero(catalogue):
    rng = np.random.default_rng(7)
    n, k = catalogue.n_items, 10
    keep = rng.choice(np.arange(1, n + 1), 3, replace=False)  # the only unseen items
    seen = np.setdiff1d(np.arange(1, n + 1), keep)
    history = np.zeros((2, n + 2), np.int32)  # 0-padded
    history[0, : len(seen)] = rng.permutation(seen)
    history[1, :n] = np.arange(1, n + 1)  # row 1 has seen everything
    context = random_context(rng, 2, catalogue.codebook_sizes)
    beam = max(catalogue.prefix_tables().n_prefixes)
    items, scores = run_search(context, catalogue, history, beam, k)
    assert sorted(items[0, :3].tolist()) == sorted(keep.tolist())
    assert np.all(items[0, 3:] == 0) and np.all(np.isneginf(scores[0, 3:]))
    assert np.all(items[1] == 0) and np.all(np.isneginf(scores[1]))
    assert_same_ranking(items, scores, *brute_force(context, catalogue, history, k))


@pytest.mark.parametrize(("beam", "k"), [(1, 3), (2, 7), (4, 4)])
def test_narrow_beam_equals_numpy_beam_reference(beam, k):
    rng = np.random.default_rng(beam)
    sem = random_codes(40, 3, 4, rng)
    context = random_context(rng, 6, sem.codebook_sizes, scale=3.0)
    history = random_history(rng, 6, sem.n_items, 8)
    items, scores = run_search(context, sem, history, beam, k)
    assert_same_ranking(items, scores, *ref_beam(context, sem, history, beam, k))


def test_beam_smaller_than_final_k_and_dead_beams(catalogue):
    """k > beam x C_L: the final level ranks all beam x C_L expansions, the rest is padding."""
    rng = np.random.default_rng(3)
    beam, k = 2, 2 * catalogue.codebook_sizes[-1] + 3
    context = random_context(rng, 3, catalogue.codebook_sizes)
    history = np.zeros((3, 1), np.int32)
    items, scores = run_search(context, catalogue, history, beam, k)
    assert np.all(items[:, -3:] == 0) and np.all(np.isneginf(scores[:, -3:]))
    assert_same_ranking(items, scores, *ref_beam(context, catalogue, history, beam, k))


def test_sharded_over_eight_devices_matches_unsharded(catalogue):
    devices = jax.devices()
    assert len(devices) >= 8, "tests/conftest.py configures 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
    rng = np.random.default_rng(11)
    sizes, beam, k = catalogue.codebook_sizes, 4, 6
    context = random_context(rng, 16, sizes)
    history = random_history(rng, 16, catalogue.n_items, 5)
    valid, next_prefix = catalogue.prefix_tables().stacked()
    expected = run_search(context, catalogue, history, beam, k)

    search = jax.jit(beam_search, static_argnames=STATIC_ARGNAMES)
    rows = NamedSharding(mesh, P("data"))
    items, scores = search(
        toy_step_fn(sizes),
        jax.device_put(context, rows),
        valid,
        next_prefix,
        sizes,
        jax.device_put(history, rows),
        n_items=catalogue.n_items,
        beam=beam,
        k=k,
    )
    assert items.sharding.is_equivalent_to(rows, items.ndim)  # stayed split over the batch
    np.testing.assert_array_equal(np.asarray(items), expected[0])
    np.testing.assert_allclose(np.asarray(scores), expected[1], rtol=1e-6, atol=1e-6)


def test_nan_logits_return_nothing_for_that_row(catalogue):
    rng = np.random.default_rng(5)
    context = random_context(rng, 2, catalogue.codebook_sizes)
    context[1, 1] = np.nan  # user 1's level-1 logits are broken
    history = np.zeros((2, 1), np.int32)
    beam = max(catalogue.prefix_tables().n_prefixes)
    items, scores = run_search(context, catalogue, history, beam, 4)
    assert np.all(items[1] == 0) and np.all(np.isneginf(scores[1]))
    assert np.all(items[0] > 0) and np.all(np.isfinite(scores[0]))


def test_bad_arguments_raise_clear_errors(catalogue):
    valid, next_prefix = catalogue.prefix_tables().stacked()
    sizes, step = catalogue.codebook_sizes, toy_step_fn(catalogue.codebook_sizes)
    context = np.zeros((1, len(sizes), _prefix_rows(sizes), max(sizes)), np.float32)
    history = np.zeros((1, 1), np.int32)
    kw = {"n_items": catalogue.n_items, "beam": 2, "k": 3}
    with pytest.raises(ValueError, match="do not fit code_sizes"):
        beam_search(step, context, valid, next_prefix, sizes[:-1], history, **kw)
    with pytest.raises(ValueError, match="must be >= 1"):
        beam_search(step, context, valid, next_prefix, sizes, history, **{**kw, "k": 0})
    with pytest.raises(ValueError, match="step_fn returned logits"):
        beam_search(
            lambda c, t, level: jnp.zeros((*t.shape[:2], 99)),
            context,
            valid,
            next_prefix,
            sizes,
            history,
            **kw,
        )


def ref_item_score_renormalized(table, sem: SemanticIds, item):
    """Sum over levels of log p(code | prefix), the softmax taken over the codes that continue
    the prefix to some item (found by scanning the catalogue's codes)."""
    codes, total = sem.codes[item], 0.0
    for level in range(sem.id_length):
        prefix = tuple(codes[:level])
        allowed = {int(c[level]) for c in sem.codes[1:] if tuple(c[:level]) == prefix}
        row = table[level, _row_of(np.asarray(prefix, np.int64), sem.codebook_sizes)]
        row = row[: sem.codebook_sizes[level]].astype(np.float64)
        live = np.array(sorted(allowed))
        m = row[live].max()
        total += row[codes[level]] - m - np.log(np.exp(row[live] - m).sum())
    return total


def test_renormalized_exhaustive_beam_equals_brute_force(catalogue):
    rng = np.random.default_rng(7)
    beam, k = max(catalogue.prefix_tables().n_prefixes), 8
    context = random_context(rng, 3, catalogue.codebook_sizes)
    history = random_history(rng, 3, catalogue.n_items, 6)
    valid, next_prefix = catalogue.prefix_tables().stacked()
    search = jax.jit(beam_search, static_argnames=STATIC_ARGNAMES)
    items, scores = search(
        toy_step_fn(catalogue.codebook_sizes),
        jnp.asarray(context),
        valid,
        next_prefix,
        catalogue.codebook_sizes,
        jnp.asarray(history),
        n_items=catalogue.n_items,
        beam=beam,
        k=k,
        renormalize=True,
    )
    for b in range(3):
        seen = set(history[b].tolist())
        ranked = sorted(
            (
                (ref_item_score_renormalized(context[b], catalogue, i), i)
                for i in range(1, catalogue.n_items + 1)
                if i not in seen
            ),
            key=lambda t: -t[0],
        )[:k]
        np.testing.assert_array_equal(np.asarray(items[b]), [i for _, i in ranked])
        np.testing.assert_allclose(np.asarray(scores[b]), [s for s, _ in ranked], atol=1e-5)
    # a proper distribution over valid items: probabilities of all items sum to 1
    every = sum(
        np.exp(ref_item_score_renormalized(context[0], catalogue, i))
        for i in range(1, catalogue.n_items + 1)
    )
    assert every == pytest.approx(1.0)


def test_a_seen_mask_gives_the_same_result_as_the_history(catalogue):
    rng = np.random.default_rng(11)
    context = random_context(rng, 4, catalogue.codebook_sizes)
    history = random_history(rng, 4, catalogue.n_items, 6)
    by_ids = run_search(context, catalogue, history, 3, 6)
    mask = seen_mask(jnp.asarray(history), catalogue.n_items)
    by_mask = run_search(context, catalogue, np.asarray(mask), 3, 6)
    np.testing.assert_array_equal(by_ids[0], by_mask[0])
    np.testing.assert_array_equal(by_ids[1], by_mask[1])


def test_item_prefixes_walk_the_prefix_tables(catalogue):
    prefixes, tables = catalogue.item_prefixes(), catalogue.prefix_tables()
    assert prefixes.shape == (catalogue.levels, catalogue.n_items + 1)
    assert np.all(prefixes[:, 0] == 0)
    for item in range(1, catalogue.n_items + 1):
        node = 0
        for level in range(catalogue.levels):
            node = tables.next_prefix[level][node, catalogue.codes[item, level]]
            assert prefixes[level, item] == node
    # items sharing their first l codes share their level-l prefix, and only they do
    for level in range(catalogue.levels):
        keys = {tuple(c[: level + 1]) for c in catalogue.codes[1:]}
        assert len(set(prefixes[level, 1:].tolist())) == len(keys)


def test_a_fully_seen_prefix_frees_its_beam_slot():
    """Items 1-2 under code 0, items 3-4 under code 1; the model prefers code 0 strongly, and
    the user has seen items 1 and 2. Beam 1 without pruning keeps prefix (0,) and returns
    nothing; with pruning it keeps (1,) and returns item 4, the likelier of 3 and 4."""
    sem = from_codes(np.array([[0, 0], [0, 1], [1, 0], [1, 1]]), (2, 2))
    assert sem.codebook_sizes == (2, 2, 1)  # no collisions: the last token is always 0
    context = np.zeros((1, sem.id_length, _prefix_rows(sem.codebook_sizes), 2), np.float32)
    context[0, 0, 0] = [5.0, 0.0]  # level 0: code 0 is e^5 times as likely
    context[0, 1, 1] = [0.0, 1.0]  # level 1 after (1,): code 1 likelier
    history = np.array([[1, 2]], np.int32)
    items, scores = run_search(context, sem, history, beam=1, k=1)
    assert items.tolist() == [[0]] and np.all(np.isneginf(scores))
    items, scores = run_search(context, sem, history, beam=1, k=1, prune=True)
    assert items.tolist() == [[4]]
    # log p(code 1) + log p(code 1 | (1,)) + log p(collision 0 | (1, 1)) = 0
    expected = -np.log1p(np.exp(5.0)) - np.log1p(np.exp(-1.0))
    np.testing.assert_allclose(scores[0], [expected], rtol=1e-5)
    items, scores = run_search(context, sem, history, beam=2, k=2, prune=True)
    assert items.tolist() == [[4, 3]]


@pytest.mark.parametrize(("beam", "k"), [(1, 1), (2, 5), (3, 3)])
def test_pruned_narrow_beam_equals_numpy_reference_and_fills_k(beam, k):
    """Heavy histories: pruned search equals the loop reference, and beam >= k fills k slots
    whenever k unseen items exist (the unpruned search does not always)."""
    rng = np.random.default_rng(20 + beam)
    sem = random_codes(40, 3, 4, rng)
    context = random_context(rng, 8, sem.codebook_sizes, scale=3.0)
    history = random_history(rng, 8, sem.n_items, 60)  # most items seen
    items, scores = run_search(context, sem, history, beam, k, prune=True)
    assert_same_ranking(items, scores, *ref_beam(context, sem, history, beam, k, prune=True))
    for b in range(len(history)):
        unseen = sem.n_items - len(set(history[b].tolist()) - {0})
        filled = int(np.isfinite(scores[b]).sum())
        if beam >= k:
            assert filled == min(k, unseen)
    # scores equal the items' own path log-probabilities (pruning never renormalises)
    real = np.isfinite(scores)
    for b, j in zip(*np.nonzero(real), strict=True):
        np.testing.assert_allclose(
            scores[b, j], ref_item_score(context[b], sem, items[b, j]), atol=1e-5
        )


def test_pruned_exhaustive_beam_equals_brute_force(catalogue):
    rng = np.random.default_rng(9)
    beam, k = max(catalogue.prefix_tables().n_prefixes), 12
    context = random_context(rng, 4, catalogue.codebook_sizes)
    history = random_history(rng, 4, catalogue.n_items, 25)
    items, scores = run_search(context, catalogue, history, beam, k, prune=True)
    assert_same_ranking(items, scores, *brute_force(context, catalogue, history, k))


def test_unseen_counts_equal_a_count_by_hand():
    rng = np.random.default_rng(4)
    sem = random_codes(60, 3, 4, rng)
    history = random_history(rng, 5, sem.n_items, 30)
    seen = np.asarray(seen_mask(jnp.asarray(history), sem.n_items))
    prefixes = sem.item_prefixes()
    n_prefixes = max(sem.prefix_tables().n_prefixes)
    got = np.asarray(unseen_counts(jnp.asarray(seen), jnp.asarray(prefixes), n_prefixes))
    assert got.shape == (sem.levels, 5, n_prefixes)
    history[0, :4] = history[0, 4]  # repeats count once
    history[1, 0] = sem.n_items + 7  # out of range: ignored (as by seen_mask)
    seen = np.asarray(seen_mask(jnp.asarray(history), sem.n_items))
    by_mask = unseen_counts(jnp.asarray(seen), jnp.asarray(prefixes), n_prefixes)
    by_ids = unseen_counts(
        jnp.asarray(seen), jnp.asarray(prefixes), n_prefixes, jnp.asarray(history)
    )
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_mask))
    got = np.asarray(by_ids)
    for level in range(sem.levels):
        for b in range(5):
            want = np.zeros(n_prefixes, int)
            for item in range(1, sem.n_items + 1):
                if not seen[b, item]:
                    want[prefixes[level, item]] += 1
            np.testing.assert_array_equal(got[level, b], want)
