"""Next-item losses against dense optax softmax, slow per-row references and hand-worked numbers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from onerec_jax.defaults import base_config
from onerec_jax.errors import ConfigError
from onerec_jax.models import losses
from onerec_jax.models.losses import (
    bce_one_negative,
    full_softmax_xent,
    next_item_loss,
    pick_in_batch,
    sample_negatives,
    sampled_softmax_xent,
    select_hard_negatives,
)

V, D, N = 36, 8, 12  # chunk sizes 7 and 12 then do and do not divide V


def _problem(seed=0, dtype=jnp.float32):
    """Random hidden, table, targets; positions 3, 7, 11 are padding (11 with target 0)."""
    gen = np.random.default_rng(seed)  # numpy: instant, no eager JAX compiles
    hidden = jnp.asarray(gen.normal(size=(N, D)), dtype)
    table = jnp.asarray(gen.normal(size=(V, D)), dtype)
    targets = gen.integers(1, V, size=N).astype(np.int32)
    mask = np.ones(N, bool)
    mask[[3, 7, 11]] = False
    targets[11] = 0
    return hidden, table, jnp.asarray(targets), jnp.asarray(mask)


def dense_xent(hidden, table, targets, mask, label_smoothing=0.0):
    """Reference: [N, V-1] logits over items 1..V-1 and optax's cross-entropy."""
    logits = hidden.astype(jnp.float32) @ table.astype(jnp.float32)[1:].T
    labels = jnp.clip(targets - 1, 0, None)
    if label_smoothing:
        dist = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[1]), label_smoothing)
        rows = optax.softmax_cross_entropy(logits, dist)
    else:
        rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(jnp.where(mask, rows, 0.0)), jnp.sum(mask).astype(jnp.float32)


def _jit(loss_fn, **options):
    """The loss with its options bound, jitted: one compile instead of many eager ops."""
    return jax.jit(functools.partial(loss_fn, **options))


@functools.cache
def _vg(loss_fn):
    """Jitted ((loss_sum, count), (d/d hidden, d/d table)); cached so tests share compiles."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


# Bound once at module level: _vg's cache (and jit's) is keyed by the function object, so
# tests that use the same loss and shapes share one compile.
FULL = {c: functools.partial(full_softmax_xent, chunk_size=c) for c in (1, 7, 12, 8192)}
FULL_SMOOTHED = functools.partial(full_softmax_xent, chunk_size=7, label_smoothing=0.2)
DENSE_SMOOTHED = functools.partial(dense_xent, label_smoothing=0.2)
# Row blocks (loss.row_block): 9 valid rows of 12 -> blocks of 2 leave one all-padding block;
# each block scans the table in tiles of c items (loss.row_block_items): 5 cuts the 36-row table
# into 8 tiles of 5 (4 rows of padding in the last), 7 into 6 of 6, 8192 leaves one tile.
BLOCKED = {
    (b, c): functools.partial(full_softmax_xent, row_block=b, row_block_items=c)
    for b in (2, 5)
    for c in (5, 7, 8192)
}
SAMPLED = functools.partial(sampled_softmax_xent, n_negatives=6)


# ----------------------------------------------------------------------------- full softmax


@pytest.mark.parametrize("chunk_size", [1, 7, 12, 8192])
def test_full_softmax_matches_dense_values_and_grads(chunk_size):
    hidden, table, targets, mask = _problem()
    (loss_sum, count), (gh, gt) = _vg(FULL[chunk_size])(hidden, table, targets, mask)
    (ref_sum, ref_count), (rh, rt) = _vg(dense_xent)(hidden, table, targets, mask)
    assert loss_sum.dtype == jnp.float32 and count.dtype == jnp.float32
    assert count == ref_count == 9
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5)
    np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gh[~mask], 0.0)  # padding rows get no gradient
    np.testing.assert_array_equal(gt[0], 0.0)  # the padding item is never a logit


@pytest.mark.parametrize(("row_block", "items"), sorted(BLOCKED))
def test_full_softmax_in_row_blocks_matches_dense(row_block, items):
    """Rows reordered valid first, in rematerialised blocks of item tiles, all-padding blocks
    skipped: the same loss and gradients as the dense softmax, in the rows' own order."""
    hidden, table, targets, mask = _problem()
    (loss_sum, count), (gh, gt) = _vg(BLOCKED[row_block, items])(hidden, table, targets, mask)
    (ref_sum, ref_count), (rh, rt) = _vg(dense_xent)(hidden, table, targets, mask)
    assert count == ref_count == 9
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5)
    np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gh[~mask], 0.0)
    # Everything padding: every block is skipped, the loss and gradients are zero.
    none = jnp.zeros_like(mask)
    (loss_sum, count), (gh, gt) = _vg(BLOCKED[row_block, items])(hidden, table, targets, none)
    assert loss_sum == 0.0 and count == 0.0
    np.testing.assert_array_equal(gh, 0.0)
    np.testing.assert_array_equal(gt, 0.0)


def test_full_softmax_in_row_blocks_label_smoothing_matches_dense():
    hidden, table, targets, mask = _problem(seed=3)
    fn = functools.partial(full_softmax_xent, label_smoothing=0.2, row_block=4, row_block_items=7)
    (loss_sum, _), (gh, gt) = _vg(fn)(hidden, table, targets, mask)
    (ref_sum, _), (rh, rt) = _vg(DENSE_SMOOTHED)(hidden, table, targets, mask)
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5)
    np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-5, atol=1e-6)


def _shapes(jaxpr):
    """Shapes of every intermediate in a jaxpr, sub-jaxprs (scan, remat, jit) included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _shapes(sub)


def test_full_softmax_never_holds_positions_by_items_in_forward_or_backward():
    hidden, table, targets, mask = _problem()

    def largest(fn):
        grad = jax.grad(lambda h, t: fn(h, t, targets, mask)[0], argnums=(0, 1))
        return max(math.prod(shape) for shape in _shapes(jax.make_jaxpr(grad)(hidden, table).jaxpr))

    # Largest intermediate: the padded table [42, 8]; [N, chunk] blocks are 12 x 7. Without the
    # remat, the backward would stack every chunk's logits ([6, 12, 7] >= N * (V - 1)).
    assert largest(FULL[7]) < N * (V - 1)
    assert largest(dense_xent) >= N * (V - 1)  # the probe sees a dense [N, V - 1]
    # One chunk of items but blocks of 5 rows: [5, V] logits at a time, forward and backward.
    assert largest(BLOCKED[5, 8192]) < N * (V - 1)
    assert largest(FULL[8192]) >= N * (V - 1)


def test_full_softmax_bf16_inputs_compute_in_float32():
    hidden, table, targets, mask = _problem(seed=1, dtype=jnp.bfloat16)
    fn = functools.partial(full_softmax_xent, chunk_size=5)
    (loss_sum, _), grads = _vg(fn)(hidden, table, targets, mask)
    (ref_sum, _), ref_grads = _vg(dense_xent)(hidden, table, targets, mask)
    assert loss_sum.dtype == jnp.float32
    # bf16 x bf16 products are exact in float32, so the reference on upcast inputs is tight.
    np.testing.assert_allclose(loss_sum, ref_sum, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == jnp.bfloat16
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        # The reference rounds an exact gradient to bf16 once. Ours rounds each chunk's part
        # and sums the parts in float32: within 2 bf16 ulps (2 * 2**-7 relative) of the
        # largest entry, however many chunks (a bf16 running sum would drift with the count).
        np.testing.assert_allclose(got, want, rtol=0, atol=2**-6 * np.abs(want).max())


def test_full_softmax_label_smoothing_matches_dense():
    hidden, table, targets, mask = _problem(seed=2)
    (value, _), (gh, gt) = _vg(FULL_SMOOTHED)(hidden, table, targets, mask)
    (ref_value, _), (rh, rt) = _vg(DENSE_SMOOTHED)(hidden, table, targets, mask)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-5, atol=1e-6)
    (plain, _), _ = _vg(dense_xent)(hidden, table, targets, mask)
    assert abs(value - plain) > 0.1  # smoothing changed the loss


@pytest.mark.parametrize(
    "loss_fn, needs_rng",
    [
        (FULL[7], False),
        (FULL_SMOOTHED, False),
        (SAMPLED, True),
        (bce_one_negative, True),
    ],
    ids=["full", "full_smoothed", "sampled", "bce"],
)
def test_padding_rows_with_nan_and_inf_do_not_leak(loss_fn, needs_rng):
    hidden, table, targets, mask = _problem(seed=3)
    args = (jax.random.key(9),) if needs_rng else ()
    clean = hidden.at[~mask].set(0.0)
    dirty = hidden.at[3].set(jnp.nan).at[7].set(jnp.inf).at[11].set(-jnp.inf)
    (value, _), (gh, gt) = _vg(loss_fn)(dirty, table, targets, mask, *args)
    (ref_value, _), (_, rt) = _vg(loss_fn)(clean, table, targets, mask, *args)
    assert np.isfinite(value) and np.all(np.isfinite(gh)) and np.all(np.isfinite(gt))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_array_equal(gh[~mask], 0.0)
    np.testing.assert_allclose(gt, rt, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- sampled softmax


def test_sampled_softmax_with_every_item_as_negative_is_the_full_softmax():
    hidden, table, targets, mask = _problem(seed=4)
    all_items = jnp.arange(1, V, dtype=jnp.int32)
    fn = functools.partial(
        sampled_softmax_xent, rng=None, negatives=all_items, in_batch=False, logq_correction=False
    )
    (value, _), (gh, gt) = _vg(fn)(hidden, table, targets, mask)
    (ref_value, _), (rh, rt) = _vg(dense_xent)(hidden, table, targets, mask)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(gh, rh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, rt, rtol=1e-5, atol=1e-6)


def _tiny():
    """D = 1, table t_j = j, so every logit is h * j. Rows 0, 1 valid; row 2 is padding."""
    table = jnp.arange(4, dtype=jnp.float32)[:, None]  # items 1, 2, 3
    hidden = jnp.array([[1.0], [2.0], [5.0]])
    targets = jnp.array([3, 1, 2], jnp.int32)
    mask = jnp.array([True, True, False])
    log_probs = jnp.log(jnp.array([0.0, 0.5, 0.25, 0.25]))
    return hidden, table, targets, mask, log_probs


def test_logq_correction_hand_computed():
    hidden, table, targets, mask, log_probs = _tiny()

    def run(**options):
        options = dict(
            dict(negatives=jnp.array([1, 2], jnp.int32), sampler="popularity"), **options
        )
        options.setdefault("item_log_probs", log_probs)
        return _jit(sampled_softmax_xent, **options)(hidden, table, targets, mask, None)

    e = math.exp
    # Shared only: E[count_j] = M q_j = 2 q_j -> E_1 = 1, E_2 = 0.5.
    # Row 0 (h=1, target 3): 3 | 1 - log 1, 2 - log .5. Row 1 (h=2, target 1): 2 | item 1 hit, 4.
    row0 = math.log(e(3) + e(1) / 1.0 + e(2) / 0.5) - 3
    row1 = math.log(e(2) + e(4) / 0.5) - 2
    loss_sum, count = run(in_batch=False)
    np.testing.assert_allclose(loss_sum, row0 + row1, rtol=1e-6)
    assert count == 2

    # With in-batch: B = 1 other valid row, p = q, so E_j = 2 q_j + 1 q_j: 1.5, .75, .75.
    # Row 0 adds row 1's target (item 1); row 1 adds row 0's target (item 3, logit 6);
    # padding row 2 (item 2, h=5) is nobody's negative.
    row0 = math.log(e(3) + e(1) / 1.5 + e(2) / 0.75 + e(1) / 1.5) - 3
    row1 = math.log(e(2) + e(4) / 0.75 + e(6) / 0.75) - 2
    loss_sum, _ = run(in_batch=True)
    np.testing.assert_allclose(loss_sum, row0 + row1, rtol=1e-6)

    # Uncorrected, for contrast.
    row0 = math.log(e(3) + e(1) + e(2) + e(1)) - 3
    row1 = math.log(e(2) + e(4) + e(6)) - 2
    loss_sum, _ = run(in_batch=True, logq_correction=False)
    np.testing.assert_allclose(loss_sum, row0 + row1, rtol=1e-6)

    # Uniform, no frequencies: the constant log((M + B) / (V - 1)) = log(3 / 3) = 0.
    uniform, _ = run(sampler="uniform", item_log_probs=None)
    np.testing.assert_allclose(uniform, loss_sum, rtol=1e-6)


def test_accidental_hits_are_removed():
    hidden, table, targets, mask = _problem(seed=5)
    mask = jnp.ones((N,), bool)
    targets = targets.at[11].set(4).at[1].set(targets[0])  # the same item at two positions
    t0 = int(targets[0])
    negatives = jnp.array([t0, t0, 0, 5], jnp.int32)
    fn = _jit(sampled_softmax_xent, negatives=negatives, logq_correction=False)
    with_hits = fn(hidden, table, targets, mask, None)
    # Reference per row: target, then shared and in-batch items other than the row's target.
    h, t = np.asarray(hidden, np.float64), np.asarray(table, np.float64)
    tg = np.asarray(targets)
    total = 0.0
    for i in range(N):
        shared = [j for j in (t0, t0, 5) if j != tg[i]]  # id 0 is never a negative
        cands = [tg[i], *shared] + [tg[j] for j in range(N) if tg[j] != tg[i]]
        logits = t[cands] @ h[i]
        total += np.logaddexp.reduce(logits) - logits[0]
    np.testing.assert_allclose(with_hits[0], total, rtol=1e-5)


def test_padding_rows_contribute_nothing_and_are_not_negatives():
    hidden, table, targets, mask = _problem(seed=6)
    log_probs = jnp.log(jnp.arange(V, dtype=jnp.float32))  # popularity grows with the id
    opts = dict(negatives=jnp.array([2, 9, 9, 30], jnp.int32), item_log_probs=log_probs)
    fn = _jit(sampled_softmax_xent, sampler="popularity", **opts)
    full = fn(hidden, table, targets, mask, None)
    keep = np.flatnonzero(np.asarray(mask))
    only_valid = fn(hidden[keep], table, targets[keep], mask[keep], None)
    np.testing.assert_allclose(full[0], only_valid[0], rtol=1e-6)
    assert full[1] == only_valid[1] == len(keep)


def _reference(targets, mask, negatives, log_q, log_p, hard_ids=None, in_batch=None, b=None):
    """Jitted value and grads wrt (hidden, table) of a loss over per-row candidate lists
    built in Python (target first), logQ with E_j = M q_j + B p_j. In-batch items default to
    every valid position's target with B = valid - 1."""
    tg, m = np.asarray(targets), np.asarray(mask)
    negatives = np.asarray(negatives)
    in_batch = tg[m] if in_batch is None else np.asarray(in_batch)
    b = m.sum() - 1 if b is None else b
    expected = len(negatives) * np.exp(np.asarray(log_q, np.float64)) + b * np.exp(
        np.asarray(log_p, np.float64)
    )
    rows, cands = np.flatnonzero(m), []
    for i in rows:
        ids, offsets = [tg[i]], [0.0]
        for j in [*negatives, *in_batch]:  # shared, then in-batch; the own item is never a negative
            if j != tg[i]:
                ids.append(j)
                offsets.append(math.log(expected[j]))
        if hard_ids is not None:
            ids += [j for j in hard_ids[i] if j != 0]
            offsets += [0.0] * (len(ids) - len(offsets))
        cands.append((ids, offsets))
    width = max(len(ids) for ids, _ in cands)  # pad with item 0 at offset +inf: logit -inf
    ids = np.array([c + [0] * (width - len(c)) for c, _ in cands])
    offsets = np.array([o + [np.inf] * (width - len(o)) for _, o in cands], np.float32)

    def loss(hidden, table):
        logits = jnp.einsum("rd,rkd->rk", hidden[rows], table[ids]) - offsets
        return jnp.sum(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_sampled_softmax_with_drawn_popularity_negatives_matches_slow_reference():
    hidden, table, targets, mask = _problem(seed=7)
    counts = jnp.arange(V, dtype=jnp.float32) % 5 + 1
    log_probs = jnp.log(counts / counts[1:].sum()).at[0].set(-jnp.inf)
    rng = jax.random.key(3)
    fn = _jit(sampled_softmax_xent, n_negatives=16, sampler="popularity", item_log_probs=log_probs)
    loss_sum, count = fn(hidden, table, targets, mask, rng)
    # Drawn the documented way, independently of the module.
    negatives = jax.random.categorical(rng, log_probs, shape=(16,))
    ref, _ = _reference(targets, mask, negatives, log_probs, log_probs)(hidden, table)
    np.testing.assert_allclose(loss_sum, ref, rtol=1e-5)
    assert count == 9


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_sampler_frequencies_match_the_distribution(sampler):
    vocab, draws = 20, 200_000
    counts = np.arange(vocab, dtype=np.float64) ** 1.5
    log_probs = jnp.log(jnp.asarray(counts, jnp.float32)).at[0].set(-jnp.inf)
    ids = sample_negatives(
        jax.random.key(0), draws, vocab, sampler=sampler, item_log_probs=log_probs
    )
    observed = np.bincount(np.asarray(ids), minlength=vocab)
    assert observed[0] == 0 and observed.sum() == draws
    probs = counts[1:] / counts[1:].sum() if sampler == "popularity" else np.full(19, 1 / 19)
    # Pearson chi-square over the 19 real items (18 degrees of freedom; every expected count
    # is >= ~300, where the chi-square approximation is accurate). The threshold (~62) is the
    # 1 - 1e-6 quantile: a correct sampler fails once in a million seeds. Against it, 6% too
    # much mass on the top item adds ~75, ids off by one ~3e4, uniform for popularity ~6e5.
    chi2 = np.sum((observed[1:] - draws * probs) ** 2 / (draws * probs))
    assert chi2 < stats.chi2.ppf(1 - 1e-6, df=vocab - 2)


# ----------------------------------------------------------------------------- capped in-batch


def _popularity():
    counts = jnp.arange(V, dtype=jnp.float32) % 5 + 1
    return jnp.log(counts / counts[1:].sum()).at[0].set(-jnp.inf)


CAPPED = {
    k: functools.partial(
        sampled_softmax_xent,
        n_negatives=5,
        sampler="popularity",
        item_log_probs=_popularity(),
        in_batch_negatives=k,
    )
    for k in (None, 4, 9, 11)
}


@pytest.mark.parametrize("k", [9, 11])
def test_capped_in_batch_with_every_valid_position_picked_equals_uncapped(k):
    # 9 valid positions of N = 12: k = 9 picks all of them, k = 11 also 2 padding positions.
    # Both take the capped path (k < N) and must give the uncapped candidates and logQ
    # (B = K_eff (n - 1) / n = n - 1), only in another column order.
    hidden, table, targets, mask = _problem(seed=12)
    targets = targets.at[4].set(targets[0])  # a same-item accidental hit in the batch
    rng = jax.random.key(6)
    _, valid = pick_in_batch(jax.random.fold_in(rng, 1), mask, k)
    assert valid.sum() == 9
    (value, count), grads = _vg(CAPPED[k])(hidden, table, targets, mask, rng)
    (ref_value, ref_count), ref_grads = _vg(CAPPED[None])(hidden, table, targets, mask, rng)
    assert count == ref_count == 9
    # Equal up to the summation order of the logsumexp.
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_capped_in_batch_matches_slow_reference_on_the_same_picks():
    hidden, table, targets, mask = _problem(seed=13)
    # Few distinct items among the valid positions, so picks often hit a row's own item.
    targets = jnp.where(mask, 1 + jnp.arange(N) % 3, 0).astype(jnp.int32)
    log_probs, rng, k = _popularity(), jax.random.key(7), 4
    (value, count), grads = _vg(CAPPED[k])(hidden, table, targets, mask, rng)
    # The documented draws: shared negatives on rng, picks on fold_in(rng, 1).
    negatives = jax.random.categorical(rng, log_probs, shape=(5,))
    positions, valid = (np.asarray(x) for x in pick_in_batch(jax.random.fold_in(rng, 1), mask, k))
    assert valid.all() and np.asarray(mask)[positions].all()
    n = int(np.asarray(mask).sum())
    picked_items = np.asarray(targets)[positions]
    ref = _reference(
        targets, mask, negatives, log_probs, log_probs, in_batch=picked_items, b=k * (n - 1) / n
    )
    ref_value, ref_grads = ref(hidden, table)
    assert count == n
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The cap changed the loss: fewer in-batch columns than the uncapped version.
    (uncapped, _), _ = _vg(CAPPED[None])(hidden, table, targets, mask, rng)
    assert abs(value - uncapped) > 1e-3


def test_pick_in_batch_draws_valid_positions_uniformly_without_replacement():
    n, draws = 50, 2000
    mask = jnp.asarray(np.arange(n) % 5 < 2)  # 20 valid positions of 50
    keys = jax.random.split(jax.random.key(0), draws)
    pick = jax.jit(jax.vmap(pick_in_batch, in_axes=(0, None, None)), static_argnums=2)

    positions, valid = (np.asarray(x) for x in pick(keys, mask, 8))
    assert positions.shape == (draws, 8) and valid.all()
    assert np.asarray(mask)[positions].all()  # padding never picked while 20 >= 8 are valid
    assert all(len(set(row)) == 8 for row in positions)  # without replacement
    # Each valid position is picked with probability 8 / 20: chi-square over the 20 positions
    # (19 degrees of freedom, expected 800 each; the 1 - 1e-6 quantile is ~ 64: a 30% bias on
    # one position adds ~70, never picking one adds ~800).
    observed = np.bincount(positions.ravel(), minlength=n)[np.asarray(mask)]
    expected = draws * 8 / 20
    chi2 = np.sum((observed - expected) ** 2 / expected)
    assert chi2 < stats.chi2.ppf(1 - 1e-6, df=19)

    # More picks than valid positions: all 20 valid ones, the rest flagged padding.
    positions, valid = (np.asarray(x) for x in pick(keys[:50], mask, 25))
    assert np.all(valid.sum(1) == 20)
    for row, ok in zip(positions, valid, strict=True):
        assert set(row[ok]) == set(np.flatnonzero(np.asarray(mask)))
        assert not np.asarray(mask)[row[~ok]].any()
    with pytest.raises(ConfigError, match="1 <= k <= 50"):
        pick_in_batch(keys[0], mask, 51)


def test_capped_in_batch_never_holds_positions_by_positions():
    n, k, m = 4096, 256, 4
    gen = np.random.default_rng(0)
    hidden = jnp.asarray(gen.normal(size=(n, D)), jnp.float32)
    table = jnp.asarray(gen.normal(size=(V, D)), jnp.float32)
    targets = jnp.asarray(gen.integers(1, V, size=n), jnp.int32)
    mask = jnp.asarray(gen.random(n) < 0.8)

    def shapes(cap):
        fn = functools.partial(sampled_softmax_xent, n_negatives=m, in_batch_negatives=cap)
        grad = jax.grad(lambda h, t: fn(h, t, targets, mask, jax.random.key(0))[0], (0, 1))
        return list(_shapes(jax.make_jaxpr(grad)(hidden, table).jaxpr))

    capped = shapes(k)
    assert (n, k) in capped  # the [N, K] in-batch block
    # Largest: the [N, 1 + M + K] logits; nothing near [N, N] forward or backward.
    assert max(math.prod(s) for s in capped) <= n * (1 + m + k)
    assert max(math.prod(s) for s in shapes(None)) >= n * n  # the probe sees the uncapped block


def test_capped_in_batch_needs_an_rng_and_a_positive_cap():
    hidden, table, targets, mask = _problem()
    negatives = jnp.array([1, 2], jnp.int32)
    with pytest.raises(ConfigError, match="rng to pick in-batch"):
        sampled_softmax_xent(
            hidden, table, targets, mask, None, negatives=negatives, in_batch_negatives=4
        )
    with pytest.raises(ConfigError, match="in_batch_negatives must be >= 1"):
        sampled_softmax_xent(
            hidden, table, targets, mask, None, negatives=negatives, in_batch_negatives=0
        )


# ----------------------------------------------------------------------------- bf16 operands


def _dot_dtypes(fn, *args):
    """(operand dtypes, output dtype) of every dot_general in fn's forward jaxpr."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("chunk_size", [5, 8192])
def test_full_softmax_bf16_hidden_casts_a_float32_table_to_bf16(chunk_size):
    hidden, table, targets, mask = _problem(seed=14)
    hidden = hidden.astype(jnp.bfloat16)
    fn = functools.partial(full_softmax_xent, chunk_size=chunk_size)
    assert _dot_dtypes(fn, hidden, table, targets, mask) == {(("bfloat16", "bfloat16"), "float32")}
    assert _dot_dtypes(fn, hidden.astype(jnp.float32), table, targets, mask) == {
        (("float32", "float32"), "float32")
    }
    (value, _), (gh, gt) = _vg(fn)(hidden, table, targets, mask)
    # The loss is the exact softmax over the bf16-rounded table: bf16 x bf16 products are exact
    # in float32, so the reference on the rounded table agrees to float32 summation order.
    rounded = table.astype(jnp.bfloat16)
    (ref_value, _), (rh, rt) = _vg(dense_xent)(hidden, rounded, targets, mask)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert gh.dtype == jnp.bfloat16 and gt.dtype == jnp.float32
    for got, want in ((gh, rh), (gt, rt)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        # Same bound as the all-bf16 test: bf16-rounded chunk parts summed in float32.
        np.testing.assert_allclose(got, want, rtol=0, atol=2**-6 * np.abs(want).max())


def test_sampled_softmax_bf16_hidden_runs_its_logit_matmuls_in_bf16():
    hidden, table, targets, mask = _problem(seed=15)
    hidden = hidden.astype(jnp.bfloat16)
    rng, k = jax.random.key(8), 4
    fn = CAPPED[k]
    dots = _dot_dtypes(fn, hidden, table, targets, mask, rng)
    assert dots == {(("bfloat16", "bfloat16"), "float32")}, dots
    (value, _), (gh, gt) = _vg(fn)(hidden, table, targets, mask, rng)
    assert gh.dtype == jnp.bfloat16 and gt.dtype == jnp.float32
    # Reference in float32 on the bf16-rounded table: products are exact, so only the float32
    # summation order differs.
    log_probs = _popularity()
    negatives = jax.random.categorical(rng, log_probs, shape=(5,))
    positions, _ = pick_in_batch(jax.random.fold_in(rng, 1), mask, k)
    rounded = table.astype(jnp.bfloat16).astype(jnp.float32)
    ref = _reference(
        targets,
        mask,
        negatives,
        log_probs,
        log_probs,
        in_batch=np.asarray(targets)[np.asarray(positions)],
        b=k * 8 / 9,
    )
    ref_value, _ = ref(hidden.astype(jnp.float32), rounded)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)


# ----------------------------------------------------------------------------- hard negatives


def _hard_problem():
    """Item 17 is made the top scorer for every valid row; row 0's target is item 17."""
    hidden, table, targets, mask = (np.array(x) for x in _problem(seed=8))
    star = 17
    direction = hidden[mask].mean(0)
    table[star] = 4.0 * direction / np.linalg.norm(direction)
    hidden[mask] += 0.5 * table[star]
    targets[0] = star
    pool = jnp.array([0, 3, star, 8, 21, 30, 33], jnp.int32)
    return (*(jnp.asarray(x) for x in (hidden, table, targets, mask)), pool, star)


select_hard = jax.jit(select_hard_negatives, static_argnums=4)


def test_hard_negatives_pick_the_top_scoring_non_target_item():
    hidden, table, targets, mask, pool, star = _hard_problem()
    ids = np.asarray(select_hard(hidden, table, targets, pool, 2))
    scores = np.asarray(hidden @ table.T)
    for i in np.flatnonzero(np.asarray(mask)):
        allowed = [j for j in np.asarray(pool) if j not in (0, int(targets[i]))]
        expect = sorted(allowed, key=lambda j: -scores[i, j])[:2]
        np.testing.assert_array_equal(ids[i], expect)
        if i != 0:
            assert ids[i, 0] == star
    assert star not in ids[0]  # row 0's target is the star: never its own negative
    # More slots than usable pool items: the rest are 0 (empty).
    tiny = np.asarray(select_hard(hidden, table, targets, jnp.array([0, 4]), 2))
    np.testing.assert_array_equal(tiny[:, 1], 0)


def test_hard_negatives_loss_matches_reference_and_only_adds_denominator_terms():
    hidden, table, targets, mask, pool, _ = _hard_problem()
    rng = jax.random.key(4)
    (base, _), _ = _vg(SAMPLED)(hidden, table, targets, mask, rng)
    with_hard = functools.partial(sampled_softmax_xent, n_negatives=6, hard_negatives=2)
    (hard, _), grads = _vg(with_hard)(hidden, table, targets, mask, rng, hard_pool=pool)
    assert hard > base

    negatives = jax.random.randint(rng, (6,), 1, V)  # the documented uniform draw
    log_q = np.full(V, -math.log(V - 1))
    hard_ids = np.asarray(select_hard(hidden, table, targets, pool, 2))
    ref, ref_grads = _reference(targets, mask, negatives, log_q, log_q, hard_ids)(hidden, table)
    np.testing.assert_allclose(hard, ref, rtol=1e-5)
    # Gradients reach the chosen hard items' rows; only the choice is under stop_gradient.
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.any(grads[1][np.unique(hard_ids[hard_ids > 0])] != 0, axis=1))


# ----------------------------------------------------------------------------- BCE


def test_bce_matches_numpy_reference():
    hidden, table, targets, mask = _problem(seed=10)
    rng = jax.random.key(5)
    loss_sum, count = jax.jit(bce_one_negative)(hidden, table, targets, mask, rng)
    # The documented draw: uniform in 1..V-2, shifted past the target.
    r = np.asarray(jax.random.randint(rng, (N,), 1, V - 1))
    tg = np.asarray(targets)
    neg = r + (r >= tg)
    m = np.asarray(mask)
    assert np.all(neg[m] != tg[m]) and np.all((neg >= 1) & (neg < V))
    h, t = np.asarray(hidden, np.float64), np.asarray(table, np.float64)
    s_pos = np.sum(h * t[tg], axis=1)
    s_neg = np.sum(h * t[neg], axis=1)
    rows = -np.log(1 / (1 + np.exp(-s_pos))) - np.log(1 - 1 / (1 + np.exp(-s_neg)))
    np.testing.assert_allclose(loss_sum, rows[m].sum(), rtol=1e-5)
    assert count == m.sum()


def test_bce_negative_is_never_the_target():
    # One-hot table; each row's hidden points hard at its target. A negative equal to the
    # target would cost ~50 instead of log 2, so the sum tells whether any row drew it.
    vocab, rows = 5, 4000
    table = np.eye(vocab, dtype=np.float32)
    targets = np.random.default_rng(0).integers(1, vocab, size=rows).astype(np.int32)
    hidden = 50.0 * table[targets]
    mask = np.ones(rows, bool)
    loss_sum, _ = _jit(bce_one_negative)(hidden, table, targets, mask, jax.random.key(1))
    np.testing.assert_allclose(loss_sum, rows * (math.log(2) + math.log1p(math.exp(-50))), 1e-5)


def test_negatives_avoiding_is_uniform_over_the_other_items():
    vocab, n = 6, 2000
    positives = np.array([[1, 5], [3, 0]], np.int32)  # 0: padding, whose draws are 2..V-1
    draws = np.asarray(
        jax.jit(losses.negatives_avoiding, static_argnums=(2, 3))(
            jax.random.key(2), positives, n, vocab
        )
    )
    assert draws.shape == (2, 2, n) and draws.dtype == np.int32
    assert np.all((draws >= 1) & (draws < vocab)) and np.all(draws != positives[..., None])
    for row, positive in zip(draws.reshape(4, n), positives.reshape(4), strict=True):
        others = [i for i in range(1, vocab) if i != max(positive, 1)]
        counts = np.bincount(row, minlength=vocab)[others]
        assert stats.chisquare(counts).pvalue > 1e-3  # uniform over the other real items


# ----------------------------------------------------------------------------- dispatch


def _loss_config(**changes):
    cfg = base_config().loss
    cfg.update(changes)
    return cfg


def test_next_item_loss_dispatches_by_name():
    # Same computation, checked on the traced programs: no extra compiles.
    hidden, table, targets, mask = _problem(seed=11)
    rng, log_probs = jax.random.key(0), jnp.zeros((V,), jnp.float32)
    assert set(losses.LOSSES) == {"full_softmax", "sampled_softmax", "bce"}

    def sampled(h, t, y, m, r):  # the dispatcher keeps a split of rng for the hard-negative pool
        r, _ = jax.random.split(r)
        options = dict(n_negatives=4, item_log_probs=log_probs, in_batch_negatives=1024)
        return sampled_softmax_xent(h, t, y, m, r, **options)

    cases = [
        ("full_softmax", dict(chunk_size=4), lambda *a: full_softmax_xent(*a[:4], chunk_size=4)),
        ("bce", {}, bce_one_negative),
        ("sampled_softmax", dict(n_negatives=4), sampled),
    ]
    args = (hidden, table, targets, mask, rng)
    for name, options, direct in cases:
        cfg = _loss_config(name=name, **options)

        def by_name(h, t, y, m, r, cfg=cfg):
            return next_item_loss(cfg, h, t, y, m, r, log_probs)

        assert str(jax.make_jaxpr(by_name)(*args)) == str(jax.make_jaxpr(direct)(*args)), name
    other = _loss_config(name="full_softmax", chunk_size=5)
    other = jax.make_jaxpr(lambda *a: next_item_loss(other, *a, log_probs))(*args)
    assert str(other) != str(jax.make_jaxpr(cases[0][2])(*args))  # the comparison can fail


def test_next_item_loss_rejects_unknown_names():
    hidden, table, targets, mask = _problem()
    with pytest.raises(ConfigError, match="loss.name='softmax': use 'full_softmax'.*'bce'"):
        next_item_loss(_loss_config(name="softmax"), hidden, table, targets, mask, None, None)
    with pytest.raises(ConfigError, match="unknown negative sampler 'zipf'"):
        sample_negatives(jax.random.key(0), 3, V, sampler="zipf")
    with pytest.raises(ConfigError, match="popularity' needs item_log_probs"):
        sampled_softmax_xent(
            hidden, table, targets, mask, jax.random.key(0), n_negatives=3, sampler="popularity"
        )
