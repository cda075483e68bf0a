"""Next-item losses over an item catalogue: full, sampled and one-negative softmax/BCE.

Every loss is a pure, jittable function of

  hidden   [N, D]  sequence outputs, flattened over batch * positions
  table    [V, D]  item output embedding; row 0 is the padding item, never a target or negative
  targets  [N]     int32 item ids in 0..V-1
  mask     [N]     bool, False on padding positions

and returns `(loss_sum, count)` as float32 scalars: the loss summed over valid positions and
the number of valid positions, so callers can average over a global batch or accumulate
exactly (`mean = loss_sum / max(count, 1)`). Masked rows are zeroed *before* any arithmetic,
so a NaN or inf in a padding row reaches neither the loss nor the gradient. Logits are always
accumulated in float32. With a narrower-than-float32 `hidden` (bf16) the logit matmuls take
their operands in hidden's dtype, the table rows cast to it (see `_operand_dtype`), so bf16
training runs its largest matmul in bf16; float32 inputs compute in float32 throughout.
Option arguments (sizes, names, flags) are static Python values; arrays may be traced.

A table may have more rows than items (`vocab_size`, by default its row count): models pad
tables so that they split evenly over the mesh's vocab axes, and then every row lookup and the
full softmax go through parallel/vocab_parallel.py, which never gathers the table on one device.
"""

import jax
import jax.numpy as jnp

from onerec_jax.errors import ConfigError
from onerec_jax.models.row_blocks import one_device, valid_blocks_lse
from onerec_jax.models.sampling import (  # noqa: F401  re-exported: models and tests use losses.*
    SAMPLERS,
    check_vocab,
    negatives_avoiding,
    normalised_log_probs,
    pick_in_batch,
    sample_negatives,
    sampler_log_probs,
    select_hard_negatives,
)
from onerec_jax.parallel import vocab_parallel
from onerec_jax.parallel.vocab_parallel import take_rows


def _valid_rows(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    # `where`, not a product: its gradient is a select, so 0 * inf cannot make a NaN.
    return jnp.where(mask[:, None], hidden, jnp.zeros((), hidden.dtype))


def _sum_and_count(row_loss: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss_sum = jnp.sum(jnp.where(mask, row_loss, 0.0)).astype(jnp.float32)
    return loss_sum, jnp.sum(mask).astype(jnp.float32)


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Row-wise dot product in float32: [N, D] x [N, D] -> [N]."""
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)


def _operand_dtype(hidden: jax.Array, table: jax.Array):
    """Operand dtype of the logit matmuls (accumulation is float32 regardless).

    hidden's own dtype when it is narrower than float32 (bf16 activations: the table rows are
    rounded to bf16 too, so the [N, C] matmuls run on bf16 tensor cores; bf16 x bf16 products
    are exact in float32), otherwise the promoted dtype (float32 stays float32).
    """
    if jnp.finfo(hidden.dtype).bits < 32:
        return hidden.dtype
    return jnp.promote_types(hidden.dtype, table.dtype)


# ----------------------------------------------------------------------------- full softmax


def full_softmax_xent(
    hidden: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = 8192,
    label_smoothing: float = 0.0,
    vocab_size: int | None = None,
    row_block: int = 0,
    row_block_items: int = 1024,
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy over all real items 1..V-1, without materialising [N, V] logits.

    The table is padded to a multiple of `chunk_size` and scanned chunk by chunk with an
    online logsumexp (running max and rescaled running sum). The scan body is rematerialised
    (`jax.checkpoint`), so the backward pass also holds one [N, chunk] block at a time; the
    gradient equals the dense softmax's.

    Args:
      chunk_size: items scored per scan step (clipped to V).
      label_smoothing: eps; the target distribution is (1 - eps) one-hot + eps uniform over
        the V - 1 real items. The uniform part needs the sum of all logits, which is linear:
        sum_j h . t_j = h . (sum_j t_j), one [D] vector instead of a running sum.
      vocab_size: V, the rows that are items (padding row 0 included); default: all rows.
        On a vocab-split table each shard scans its own rows (vocab_parallel.py).
      row_block: > 0: the logsumexp is computed in blocks of this many rows, the rows ordered
        valid first, and a block of padding rows only is skipped (models/row_blocks.py):
        left-padded windows are often half padding, and their softmax is most of a CPU step.
        Each block scans the table in chunks of `row_block_items` items, so one [row_block,
        row_block_items] tile of logits is live at a time (cache-sized on a CPU). Used on one
        device (no mesh, or a mesh of one); otherwise, and with 0, the paths above.
    """
    vocab_size = table.shape[0] if vocab_size is None else vocab_size
    check_vocab(vocab_size, 2, "full_softmax_xent")
    dtype = _operand_dtype(hidden, table)
    # hidden is closed over by the scan in float32, so its gradient is summed over the chunks in
    # float32; each chunk's matmul still runs in the operand dtype (bf16 on tensor cores). The
    # target logit (`_finish`) uses the same cast table, so the loss is the exact softmax of the
    # logits it normalises over.
    h = _valid_rows(hidden, mask).astype(jnp.float32)  # [N, D]
    table = table.astype(dtype)
    axes = vocab_parallel.split_axes(table)
    if axes:
        lse = vocab_parallel.full_softmax_lse(h, table, vocab_size, chunk_size, axes)
        return _finish(lse, h, table, targets, mask, label_smoothing, vocab_size, axes)
    if table.shape[0] != vocab_size:
        table = table[:vocab_size]

    if 0 < row_block < h.shape[0] and one_device():
        lse = valid_blocks_lse(h, table, mask, row_block, row_block_items)  # [N]
    elif vocab_size <= max(1, chunk_size):
        # The catalogue fits one chunk: plain logsumexp, no scan and no rematerialisation
        # (measured 2.8x faster than a one-chunk scan on CPU for 25,600 x 9,067 logits).
        logits = jnp.einsum("nd,vd->nv", h.astype(dtype), table, preferred_element_type=jnp.float32)
        logits = jnp.where(jnp.arange(vocab_size) >= 1, logits, -jnp.inf)  # [N, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
    else:
        run_max, run_sum = vocab_parallel.online_max_sum(
            h, table, lambda ids: (ids >= 1) & (ids < vocab_size), chunk_size
        )
        lse = run_max + jnp.log(run_sum)  # [N]
    return _finish(lse, h, table, targets, mask, label_smoothing, vocab_size)


def _finish(lse, h, table, targets, mask, label_smoothing: float, vocab_size: int, axes=()):
    """(loss_sum, count) from each row's logsumexp: minus the (smoothed) target logit."""
    target_logit = _row_dot(h, take_rows(table, targets))
    row_loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        if axes:
            item_sum = vocab_parallel.item_sum(table, vocab_size, axes)
        else:
            item_sum = jnp.sum(table[1:].astype(jnp.float32), axis=0)  # [D]
        mean_logit = (h @ item_sum) / (vocab_size - 1)
        row_loss = row_loss - label_smoothing * mean_logit
    return _sum_and_count(row_loss, mask)


# ----------------------------------------------------------------------------- sampled softmax


def sampled_softmax_xent(
    hidden: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None,
    *,
    n_negatives: int | None = None,
    sampler: str = "uniform",
    item_log_probs: jax.Array | None = None,
    in_batch: bool = True,
    in_batch_negatives: int | None = 1024,
    logq_correction: bool = True,
    hard_negatives: int = 0,
    hard_pool: jax.Array | None = None,
    negatives: jax.Array | None = None,
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax over [target, shared sampled negatives, in-batch targets, hard negatives].

    Each row's candidates are its target, `n_negatives` ids drawn once for the whole batch
    (with replacement, from `sampler`) or the explicit `negatives [M]`, and if `in_batch` the
    targets of other valid positions (see below). Accidental hits (a negative equal to the
    row's own target, also a repeat of that item elsewhere in the batch) get -inf, as with TF's
    `remove_accidental_hits`, and so does an explicit negative id 0; padding positions are
    never in-batch negatives.

    In-batch negatives: with `in_batch_negatives=None`, or an int >= N, every position's
    target is a column ([N, N] logits block; padding columns are -inf). With an int K < N,
    K positions are drawn uniformly without replacement among the valid ones,
    `pick_in_batch(jax.random.fold_in(rng, 1), mask, K)` (fold_in leaves the shared draws on
    `rng` itself unchanged), and their targets are the columns: an [N, K] block. Picks beyond
    the number of valid positions are padding and get -inf like padding columns; a row's own
    position among the picks has the row's target, so it is an accidental hit like any pick
    with that item. K_eff = min(K, valid positions) columns are real.

    logQ correction (Yi et al. 2019; TF `subtract_log_q`): the shared and in-batch negatives
    form one multiset, and every negative occurrence of item j has its logit lowered by
    log E[count_j], its expected number of occurrences there:

      E[count_j] = M * q(j) + B * p(j),   B = K_eff * (n - 1) / n

    with M shared draws from the sampler distribution q, n valid positions, and p the in-batch
    frequency proxy: softmax(item_log_probs) when given, else uniform 1/(V-1). B is the
    expected number of in-batch columns per row other than the row's own position: each of
    the K_eff picks is the row itself with probability 1/n. Uncapped (K_eff = n) it is n - 1,
    the other valid positions, exactly; for K << n it is ~K. Like n - 1 before, B does not
    subtract other same-item hits. Then sum over occurrences of exp(s_j) / E[count_j] is an
    unbiased estimate of the full partition function without the target, and the loss
    estimates the full softmax loss (with all items as explicit negatives, q uniform and
    logq_correction=False it *is* the full softmax). Unlike TF, the target logit is not
    corrected: it is always a candidate, not a draw. With a uniform sampler and no
    item_log_probs the correction is the constant log((M + B) / (V - 1)).

    Hard negatives (if `hard_negatives > 0`): per row, the `hard_negatives` highest-scoring
    non-target items of `hard_pool [P]` under the current hidden (see
    `select_hard_negatives`). Only the selection is under stop_gradient; the chosen items'
    logits get gradients. They are deliberate, biased negatives and get no logQ correction;
    an item that is also a sampled or in-batch negative then appears twice in the softmax.

    Args:
      rng: key for the shared draws and the in-batch picks; may be None when `negatives` is
        given and in-batch negatives are not capped (in_batch False, or K None or >= N).
      n_negatives: number of shared draws; omitted (or equal to M) with `negatives`.
      sampler: "uniform" over 1..V-1, or "popularity" from item_log_probs.
      item_log_probs: [V] log item frequencies (any additive constant; item 0 is ignored).
        Give every possible target a finite value (e.g. add-one counts): an item with zero
        expected count is left uncorrected.
      negatives: explicit shared negative ids [M], instead of drawing them.
      in_batch_negatives: K, the cap on in-batch negative columns (above); None = all N.
      vocab_size: V, the rows that are items (default: all rows); negatives come from 1..V-1.
    """
    vocab_size = table.shape[0] if vocab_size is None else vocab_size
    check_vocab(vocab_size, 2, "sampled_softmax_xent")
    if negatives is None:
        if n_negatives is None:
            raise ConfigError("sampled_softmax_xent needs n_negatives (or explicit negatives)")
        if n_negatives and rng is None:
            raise ConfigError("sampled_softmax_xent needs an rng to draw its negatives")
        negatives = sample_negatives(
            rng, n_negatives, vocab_size, sampler=sampler, item_log_probs=item_log_probs
        )
    elif n_negatives is not None and n_negatives != negatives.shape[0]:
        raise ConfigError(f"n_negatives={n_negatives} but {negatives.shape[0]} negatives given")
    if hard_negatives and hard_pool is None:
        raise ConfigError("hard_negatives > 0 needs hard_pool [P] (candidate item ids)")
    n_rows = targets.shape[0]
    if in_batch_negatives is not None and in_batch_negatives < 1:
        raise ConfigError(f"in_batch_negatives must be >= 1 or None, got {in_batch_negatives}")
    capped = in_batch and in_batch_negatives is not None and in_batch_negatives < n_rows
    if capped and rng is None:
        raise ConfigError("sampled_softmax_xent needs an rng to pick in-batch negatives")

    dtype = _operand_dtype(hidden, table)
    h = _valid_rows(hidden, mask).astype(jnp.float32)  # [N, D]
    hc = h.astype(dtype)  # exact: the f32 copy of a bf16 hidden rounds back to itself
    target_rows = take_rows(table, targets).astype(dtype)  # [N, D]
    pos = _row_dot(hc, target_rows)  # [N]

    def logits_against(rows):  # [N, D] x [C, D] -> [N, C] float32
        return jnp.einsum("nd,cd->nc", hc, rows.astype(dtype), preferred_element_type=jnp.float32)

    hit = (negatives[None, :] == targets[:, None]) | (negatives[None, :] == 0)  # [N, M]
    shared = jnp.where(hit, -jnp.inf, logits_against(take_rows(table, negatives)))  # [N, M]
    blocks = [pos[:, None], shared]

    if in_batch:
        n_valid = jnp.sum(mask).astype(jnp.float32)
        if capped:
            picks, col_valid = pick_in_batch(jax.random.fold_in(rng, 1), mask, in_batch_negatives)
            col_targets, col_rows = targets[picks], target_rows[picks]  # [K], [K, D]
            k_eff = jnp.sum(col_valid).astype(jnp.float32)
        else:
            col_valid, col_targets, col_rows, k_eff = mask, targets, target_rows, n_valid
        # Drop padding columns and same-item accidental hits (this also drops the row's own
        # position, whose target is the row's positive).
        usable = col_valid[None, :] & (col_targets[None, :] != targets[:, None])  # [N, K or N]
        blocks.append(jnp.where(usable, logits_against(col_rows), -jnp.inf))

    if logq_correction:
        n_shared = negatives.shape[0]
        expected = n_shared * jnp.exp(sampler_log_probs(vocab_size, sampler, item_log_probs))
        if in_batch:
            if item_log_probs is None:
                freq = jnp.full((vocab_size,), 1.0 / (vocab_size - 1), jnp.float32)
            else:
                freq = jnp.exp(normalised_log_probs(item_log_probs, vocab_size))
            # B = K_eff (n - 1) / n; uncapped, n (n - 1) / n is n - 1 exactly in float32.
            n_in_batch = k_eff * jnp.maximum(n_valid - 1, 0) / jnp.maximum(n_valid, 1)
            expected = expected + n_in_batch * freq
        # An item with zero expected count (impossible under q and p) stays uncorrected
        # rather than getting an infinite logit; the double `where` keeps gradients finite.
        safe = jnp.where(expected > 0, expected, 1.0)
        log_expected = jnp.where(expected > 0, jnp.log(safe), 0.0)  # [V]
        blocks[1] = shared - log_expected[negatives][None, :]
        if in_batch:
            blocks[2] = blocks[2] - log_expected[col_targets][None, :]

    if hard_negatives:
        hard_ids = select_hard_negatives(h, table, targets, hard_pool, hard_negatives)  # [N, k]
        hard_rows = take_rows(table, hard_ids).astype(dtype)  # [N, k, D]
        hard = jnp.einsum("nd,nkd->nk", hc, hard_rows, preferred_element_type=jnp.float32)
        blocks.append(jnp.where(hard_ids == 0, -jnp.inf, hard))

    logits = jnp.concatenate(blocks, axis=1)  # [N, 1 + M (+ K or N) (+ k)]
    row_loss = jax.nn.logsumexp(logits, axis=-1) - pos
    return _sum_and_count(row_loss, mask)


# ----------------------------------------------------------------------------- SASRec BCE


def bce_one_negative(
    hidden: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    rng: jax.Array,
    *,
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SASRec's loss: -log sigmoid(s_pos) - log(1 - sigmoid(s_neg)) per valid position.

    One negative per position, uniform over the items 1..V-1 other than the target: draw r
    uniformly from 1..V-2 and shift it past the target (r >= target -> r + 1). `vocab_size`:
    V, the rows that are items (default: all rows).
    """
    vocab_size = table.shape[0] if vocab_size is None else vocab_size
    check_vocab(vocab_size, 3, "bce_one_negative")
    h = _valid_rows(hidden, mask)
    r = jax.random.randint(rng, targets.shape, 1, vocab_size - 1, dtype=jnp.int32)
    neg = r + (r >= targets).astype(jnp.int32)
    pos_logit = _row_dot(h, take_rows(table, targets))
    neg_logit = _row_dot(h, take_rows(table, neg))
    # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), both stable.
    row_loss = jax.nn.softplus(-pos_logit) + jax.nn.softplus(neg_logit)
    return _sum_and_count(row_loss, mask)


# ----------------------------------------------------------------------------- by name


def _full_softmax(cfg, hidden, table, targets, mask, rng, item_log_probs, vocab_size):
    del rng, item_log_probs
    return full_softmax_xent(
        hidden,
        table,
        targets,
        mask,
        chunk_size=cfg.chunk_size,
        label_smoothing=cfg.label_smoothing,
        vocab_size=vocab_size,
        row_block=cfg.get("row_block", 0),
        row_block_items=cfg.get("row_block_items", 1024),
    )


def _sampled_softmax(cfg, hidden, table, targets, mask, rng, item_log_probs, vocab_size):
    pool = None
    rng, pool_rng = jax.random.split(rng)
    if cfg.hard_negatives > 0:
        pool = jax.random.randint(pool_rng, (cfg.hard_pool_size,), 1, vocab_size or len(table))
    return sampled_softmax_xent(
        hidden,
        table,
        targets,
        mask,
        rng,
        n_negatives=cfg.n_negatives,
        sampler=cfg.sampler,
        item_log_probs=item_log_probs if cfg.sampler == "popularity" or cfg.logq else None,
        in_batch=cfg.in_batch,
        in_batch_negatives=cfg.in_batch_negatives or None,
        logq_correction=cfg.logq,
        hard_negatives=cfg.hard_negatives,
        hard_pool=pool,
        vocab_size=vocab_size,
    )


def _bce(cfg, hidden, table, targets, mask, rng, item_log_probs, vocab_size):
    del cfg, item_log_probs
    return bce_one_negative(hidden, table, targets, mask, rng, vocab_size=vocab_size)


# `config.loss.name` -> the loss with its options read from `config.loss`.
LOSSES = {"full_softmax": _full_softmax, "sampled_softmax": _sampled_softmax, "bce": _bce}


def next_item_loss(
    cfg,
    hidden: jax.Array,
    table: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    rng: jax.Array,
    item_log_probs: jax.Array | None,
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, count) of the loss `cfg.name` (config.loss) over flattened positions.

    `hidden` [..., D] and `targets`, `mask` [...] are flattened first. `item_log_probs` [V]:
    log item frequencies (the popularity sampler and logQ). `vocab_size`: the table rows that
    are items, when the table is padded to split evenly over the mesh
    (parallel/vocab_parallel.py); default: all rows.
    """
    if cfg.name not in LOSSES:
        raise ConfigError(
            f"loss.name={cfg.name!r}: use 'full_softmax', 'sampled_softmax' or 'bce'."
        )
    d = hidden.shape[-1]
    hidden, targets, mask = hidden.reshape(-1, d), targets.reshape(-1), mask.reshape(-1)
    return LOSSES[cfg.name](cfg, hidden, table, targets, mask, rng, item_log_probs, vocab_size)
