"""Ranking a catalogue on one device: each target's rank and the top-k items, chunk by chunk.


PROTOCOL.md "Scoring": every item is ranked (never sampled negatives); the user's whole prefix
before the target is masked; item 0 (padding) is never ranked or returned. One tie rule,
everywhere: rank = 1 + unmasked items scoring strictly higher than the target + half the other
unmasked items scoring exactly the same, the expected position under a random order of ties
(`tie_rank`). Ranks are therefore float32 and may end in .5; they are exact integers and halves
for catalogues under 2**23 items. A model scoring every item alike gets rank (n + 1) / 2 for n
unmasked items, never 1. (Metrics are then those of that expected rank, which for HR@K, NDCG@K
and MRR is not the same as the average of the metrics over random orders.)

The catalogue is scored in chunks of `chunk_size` items inside one `lax.fori_loop`, so at most
[B, chunk] scores exist at a time, whatever the catalogue size. `rank_and_topk_with` is that
single loop for any scorer; `rank_and_topk` plugs in the dot-product scorer of embedding models.
evaluation/ranking.py holds their jitted, mesh-sharded forms for the evaluator.
`rank_in_list` ranks targets within a returned list (beam search) by the same rule.

Rules for broken scores, so that a model emitting NaN or inf never looks good:
- a target whose own score is not finite gets the worst rank, `n_items`;
- an unmasked item whose score is NaN counts as scoring higher than the target (it is kept out
  of the top-k list).

The target's score is computed once, up front, and compared as-is. The protocol never puts the
target in its own history, but if it were there the target would still be ranked by its own
score (its column is masked like any history item, and it is never counted against itself).
Ties are exact float32 equality between that up-front score and each item's chunk score. They
are the same float32 products (a scorer of its own is called on the targets), but a sum may be
taken in another order, so two continuous scores equal in exact arithmetic may differ in the
last bit. Ties of exactly computed scores (integer-valued, popularity's one-column table, an
all-zero table) are always seen as ties.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# (user_state pytree, item_ids [C] int32) -> scores [B, C]; ids are all valid (0 = padding).
ScoreChunkFn = Callable[[Any, jax.Array], jax.Array]


def block_sizes(eval_config, one_device: bool = True) -> dict[str, int]:
    """`eval.state_rows`, `eval.rank_rows` and `eval.chunk_size`, 0 (auto) resolved.

    On one CPU device, small blocks keep each step's arrays in cache (one core, dev-set shapes,
    BENCHMARKS.md: user states ~3x and the ranking ~3x faster than whole 256-user batches against
    8,192-item chunks): auto = 8 users per encoder pass, 64 users x 2,048 items per ranking
    step. Elsewhere auto = whole batches and 8,192-item chunks. On several devices the row
    settings are ignored (each device holds its own rows; a block loop would cut across the
    batch's split)."""
    e = eval_config
    cpu = jax.default_backend() == "cpu"
    state, rank, chunk = e.get("state_rows", 0), e.get("rank_rows", 0), e.get("chunk_size", 0)
    return {
        "state_rows": (state or (8 if cpu else 0)) if one_device else 0,
        "rank_rows": (rank or (64 if cpu else 0)) if one_device else 0,
        "chunk_size": chunk or (2048 if cpu and one_device else 8192),
    }


def check_static(n_items: int, k: int, chunk_size: int) -> None:
    if n_items < 1:
        raise ValueError(f"the catalogue has no item to rank (n_items={n_items})")
    if not 1 <= k <= n_items:
        raise ValueError(f"k={k} must be in 1..n_items={n_items}: lower eval k")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def rank_and_topk_with(
    score_chunk_fn: ScoreChunkFn,
    user_state: Any,
    n_items: int,
    targets: jax.Array,
    history: jax.Array,
    *,
    target_scores: jax.Array | None = None,
    k: int = 50,
    chunk_size: int = 8192,
    mask_history: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Ranks every user's target among items 1..n_items and returns the top-k, for any scorer.

    Args:
      score_chunk_fn: `(user_state, item_ids [C]) -> [B, C]` scores of a chunk of items.
        It only ever receives ids in 0..n_items (ids past the catalogue are passed as 0).
      user_state: a pytree with whatever the scorer needs for the B users.
      n_items: number of real items; ids 1..n_items are ranked, 0 is padding.
      targets: [B] int32 target ids (0 on padding rows: the rank is then finite, meaningless).
      history: [B, H] int32 ids seen before the target, 0-padded; masked when `mask_history`.
      target_scores: [B] the targets' scores, if the caller has a cheaper way to get them;
        by default the diagonal of `score_chunk_fn(user_state, targets)` ([B, B] work).
      k: length of the returned list (static).
      chunk_size: items scored at once (static); clipped to n_items + 1.
      mask_history: mask the history items (static); the protocol's default is True.

    Returns:
      ranks [B] float32 in 1..n_items (`tie_rank`: 1 + unmasked items scoring strictly higher
      than the target + half the other unmasked items scoring the same), top_items [B, k]
      int32 (best first, ties by lower id; 0 fills slots whose score is -inf, i.e. when fewer
      than k items are unmasked), top_scores [B, k] float32.
    """
    check_static(n_items, k, chunk_size)
    targets = targets.astype(jnp.int32)
    history = history.astype(jnp.int32)
    if target_scores is None:
        diagonal = score_chunk_fn(user_state, jnp.clip(targets, 0, n_items))  # [B, B]
        target_scores = jnp.diagonal(diagonal)
    target_scores = target_scores.astype(jnp.float32)  # [B]
    higher, tied, top_scores, top_items = scan_ids(
        score_chunk_fn,
        user_state,
        n_items,
        targets,
        history,
        target_scores,
        first_id=0,
        n_ids=n_items + 1,
        k=k,
        chunk_size=chunk_size,
        mask_history=mask_history,
    )
    return finish_ranks(higher, tied, top_scores, top_items, target_scores, n_items)


def tie_rank(higher: jax.Array, tied: jax.Array) -> jax.Array:
    """The protocol's rank, float32: 1 + `higher` + `tied` / 2, the expected 1-based position of
    a target below `higher` items and among `tied` others of its score, in a random tie order."""
    return 1.0 + higher.astype(jnp.float32) + 0.5 * tied.astype(jnp.float32)


def finish_ranks(higher, tied, top_scores, top_items, target_scores, n_items: int):
    worst = jnp.float32(n_items)
    ranks = jnp.where(jnp.isfinite(target_scores), tie_rank(higher, tied), worst)
    top_items = jnp.where(top_scores == -jnp.inf, 0, top_items)
    return ranks, top_items, top_scores


def rank_in_list(
    top_items: jax.Array, top_scores: jax.Array, targets: jax.Array, n_items: int | jax.Array
) -> jax.Array:
    """[B] float32 rank of each target in a returned list of distinct items, by `tie_rank`.

    For generative models, whose beam search returns the top-K items with their scores but no
    score for the rest of the catalogue: rank = 1 + listed items scoring strictly higher than
    the target + half the other listed items scoring the same. A target outside the list, or
    listed with a score that is not finite, ranks n_items + 1. Ties with items outside the list
    cannot be seen: a target tied with the last listed items may also tie with unlisted ones.

    Args:
      top_items: [B, K] int32 distinct items, best first; 0 fills empty slots (never counted).
      top_scores: [B, K] float32 their scores (-inf on empty slots; NaN counts as higher).
      targets: [B] int32 target ids (0 on padding rows: the rank is then meaningless).
      n_items: real items; the rank of a target outside the list is n_items + 1.
    """
    hit = top_items == targets[:, None]  # [B, K]
    listed = top_items > 0  # [B, K]
    found = hit.any(axis=1)  # [B]
    t = jnp.take_along_axis(top_scores, jnp.argmax(hit, axis=1)[:, None], axis=1)  # [B, 1]
    higher = (listed & ~hit & ~(top_scores <= t)).sum(axis=1, dtype=jnp.int32)
    tied = (listed & ~hit & (top_scores == t)).sum(axis=1, dtype=jnp.int32)
    ok = found & jnp.isfinite(t[:, 0])
    return jnp.where(ok, tie_rank(higher, tied), jnp.asarray(n_items + 1, jnp.float32))


def scan_ids(
    score_chunk_fn: ScoreChunkFn,
    user_state: Any,
    n_items: int,
    targets: jax.Array,
    history: jax.Array,
    target_scores: jax.Array,
    *,
    first_id,
    n_ids: int,
    k: int,
    chunk_size: int,
    mask_history: bool,
    varying: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(counts of unmasked items scoring above the target and exactly as the target, running
    top-k scores, their ids) over ids first_id .. first_id + n_ids - 1 (those in 1..n_items),
    chunk by chunk; the target itself is never counted.

    `first_id` is 0 or, on one shard of a split catalogue, a traced offset; `varying` then
    names the shard_map axes the scores differ over (the loop carry must say so too).
    """
    chunk = min(chunk_size, n_ids)
    n_chunks = -(-n_ids // chunk)
    batch = targets.shape[0]
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1]
    neg_inf = jnp.float32(-jnp.inf)
    offset = not (isinstance(first_id, int) and first_id == 0)

    def body(c, carry):
        higher, tied, top_scores, top_items = carry  # [B], [B], [B, k], [B, k]
        start = first_id + c * chunk if offset else c * chunk
        ids = start + jnp.arange(chunk, dtype=jnp.int32)  # [C]
        valid = (ids >= 1) & (ids <= n_items)  # [C]
        if offset:  # a chunk running past this shard's rows
            valid = valid & (ids < first_id + n_ids)
        scores = score_chunk_fn(user_state, jnp.where(valid, ids, 0)).astype(jnp.float32)
        scores = jnp.where(valid[None, :], scores, neg_inf)  # [B, C]
        if mask_history and history.shape[1]:
            local = history - start  # [B, H]
            inside = (history > 0) & (local >= 0) & (local < chunk)
            # Out-of-chunk and padding entries point past the end and are dropped (never a
            # negative index, which would wrap around).
            local = jnp.where(inside, local, chunk)
            scores = scores.at[rows, local].set(neg_inf, mode="drop")
        other = ids[None, :] != targets[:, None]  # [B, C]: the target is not its own rival
        t = target_scores[:, None]  # [B, 1]
        # `~(s <= t)` is `s > t` for numbers and True for a NaN s: NaN never helps the target.
        # Masked and invalid columns are -inf: never tied with a finite target (a non-finite
        # target's rank is overridden in `finish_ranks`).
        higher = higher + (~(scores <= t) & other).sum(axis=1, dtype=jnp.int32)
        tied = tied + ((scores == t) & other).sum(axis=1, dtype=jnp.int32)
        scores = jnp.where(jnp.isnan(scores), neg_inf, scores)
        both_scores = jnp.concatenate([top_scores, scores], axis=1)  # [B, k + C]
        both_items = jnp.concatenate([top_items, jnp.broadcast_to(ids, scores.shape)], axis=1)
        # top_k keeps the lower position first among ties; running entries (earlier, lower ids)
        # come first, so ties are broken by lower item id.
        top_scores, pos = jax.lax.top_k(both_scores, k)
        top_items = jnp.take_along_axis(both_items, pos, axis=1)
        return higher, tied, top_scores, top_items

    init = (
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.full((batch, k), neg_inf),
        jnp.zeros((batch, k), jnp.int32),
    )
    if varying:
        init = jax.lax.pcast(init, varying, to="varying")
    return jax.lax.fori_loop(0, n_chunks, body, init)


def dot_scores(state: tuple[jax.Array, jax.Array], ids: jax.Array) -> jax.Array:
    """Scores [B, C] = user_states [B, D] @ item_table[ids].T, accumulated in float32."""
    user_states, item_table = state
    items = jnp.take(item_table, ids, axis=0)  # [C, D]
    # HIGHEST: the same float32 products as the up-front target score (no TF32 on GPUs).
    return jnp.einsum(
        "bd,cd->bc",
        user_states,
        items,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
    )


def rank_and_topk(
    user_states: jax.Array,
    item_table: jax.Array,
    targets: jax.Array,
    history: jax.Array,
    *,
    k: int = 50,
    chunk_size: int = 8192,
    mask_history: bool = True,
    n_items: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Full ranking of a dot-product model: score(u, i) = user_states[u] . item_table[i].

    Args:
      user_states: [B, D] float32 or bfloat16.
      item_table: [V, D] item embeddings, V = n_items + 1; row 0 (padding) is never ranked.
      targets: [B] int32 ids in 1..V-1 (0 on padding rows).
      history: [B, H] int32 the user's whole prefix before the target, 0-padded.
      k, chunk_size, mask_history: static; see `rank_and_topk_with`.
      n_items: real items (default V - 1); rows past n_items (table padding) are never ranked.

    Returns:
      ranks [B] float32 (1-based, ties as `tie_rank`), top_items [B, k] int32, top_scores
      [B, k] float32.
    """
    n_items = item_table.shape[0] - 1 if n_items is None else n_items
    target_rows = jnp.take(item_table, jnp.clip(targets, 0, n_items), axis=0)  # [B, D]
    target_scores = jnp.sum(
        user_states.astype(jnp.float32) * target_rows.astype(jnp.float32), axis=-1
    )  # [B]
    return rank_and_topk_with(
        dot_scores,
        (user_states, item_table),
        n_items,
        targets,
        history,
        target_scores=target_scores,
        k=k,
        chunk_size=chunk_size,
        mask_history=mask_history,
    )
