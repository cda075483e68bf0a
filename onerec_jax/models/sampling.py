"""Negative sampling for the sampled softmax, BPR and NCF: samplers, draws, in-batch picks."""

import math

import jax
import jax.numpy as jnp

from onerec_jax.errors import ConfigError
from onerec_jax.parallel.vocab_parallel import take_rows

SAMPLERS = ("uniform", "popularity")


def check_vocab(vocab_size: int, minimum: int, loss: str) -> None:
    if vocab_size < minimum:
        raise ConfigError(
            f"{loss} needs a table of at least {minimum} rows (padding + {minimum - 1} items), "
            f"got {vocab_size}"
        )


def sampler_log_probs(
    vocab_size: int, sampler: str = "uniform", item_log_probs: jax.Array | None = None
) -> jax.Array:
    """[V] normalised log-probabilities of one draw of `sampler`; -inf for item 0."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown negative sampler {sampler!r}; valid samplers: {SAMPLERS}")
    if sampler == "uniform":
        logq = jnp.full((vocab_size,), -math.log(vocab_size - 1), jnp.float32)
        return logq.at[0].set(-jnp.inf)
    if item_log_probs is None:
        raise ConfigError("sampler='popularity' needs item_log_probs [V] (log item frequencies)")
    return normalised_log_probs(item_log_probs, vocab_size)


def normalised_log_probs(item_log_probs: jax.Array, vocab_size: int) -> jax.Array:
    if item_log_probs.shape != (vocab_size,):
        raise ConfigError(
            f"item_log_probs must have shape ({vocab_size},) like the table, "
            f"got {item_log_probs.shape}"
        )
    # Item 0 is never drawn, whatever the caller put there; counts need not be normalised.
    logits = item_log_probs.astype(jnp.float32).at[0].set(-jnp.inf)
    return jax.nn.log_softmax(logits)


def sample_negatives(
    rng: jax.Array,
    n: int,
    vocab_size: int,
    *,
    sampler: str = "uniform",
    item_log_probs: jax.Array | None = None,
) -> jax.Array:
    """[n] int32 item ids drawn with replacement from 1..V-1, uniformly or by popularity."""
    logq = sampler_log_probs(vocab_size, sampler, item_log_probs)
    if sampler == "uniform":
        return jax.random.randint(rng, (n,), 1, vocab_size, dtype=jnp.int32)
    return jax.random.categorical(rng, logq, shape=(n,)).astype(jnp.int32)


def negatives_avoiding(rng: jax.Array, positives: jax.Array, n: int, vocab_size: int) -> jax.Array:
    """[*positives.shape, n] int32 ids, uniform over the items 1..V-1 other than the positive.

    Each draw r is uniform over 1..V-2 and shifted past its positive (r >= positive -> r + 1),
    as in `bce_one_negative`, so every other real item has probability 1 / (V - 2). A padding
    positive (0) gets ids 2..V-1: still real items, and its position is masked anyway.
    """
    check_vocab(vocab_size, 3, "negatives_avoiding")
    r = jax.random.randint(rng, (*positives.shape, n), 1, vocab_size - 1, dtype=jnp.int32)
    return r + (r >= positives[..., None]).astype(jnp.int32)


def select_hard_negatives(
    hidden: jax.Array, table: jax.Array, targets: jax.Array, pool: jax.Array, k: int
) -> jax.Array:
    """Per row, the k highest-scoring pool items other than the row's target: [N, k] ids.

    Pool entries equal to 0 or to the target are skipped; where fewer than k remain, the
    slot holds 0 (the padding id), which the loss scores as -inf.
    """
    if k > pool.shape[0]:
        raise ConfigError(f"hard_negatives={k} exceeds the hard_pool size {pool.shape[0]}")
    pool_rows = take_rows(table, pool)  # [P, D]
    scores = jnp.einsum("nd,pd->np", hidden, pool_rows, preferred_element_type=jnp.float32)
    excluded = (pool[None, :] == targets[:, None]) | (pool[None, :] == 0)
    scores = jax.lax.stop_gradient(jnp.where(excluded, -jnp.inf, scores))
    top, idx = jax.lax.top_k(scores, k)  # [N, k]
    return jnp.where(jnp.isfinite(top), pool[idx], 0).astype(jnp.int32)


def pick_in_batch(rng: jax.Array, mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """k positions drawn uniformly without replacement among the valid ones (Gumbel top-k).

    Every valid position gets an iid Gumbel score and padding -inf; the k highest scores are
    a uniformly random k-subset of the valid positions. Where fewer than k positions are
    valid, the remaining picks are padding positions, flagged invalid.

    Returns:
      positions [k] int32 indices into mask, and valid [k] bool (= mask[positions]).
    """
    n = mask.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"in-batch negatives: need 1 <= k <= {n} positions, got k={k}")
    gumbel = jax.random.gumbel(rng, (n,), jnp.float32)
    _, positions = jax.lax.top_k(jnp.where(mask, gumbel, -jnp.inf), k)
    return positions.astype(jnp.int32), mask[positions]
