"""Full-catalogue ranking on device: each target's rank and the top-k items, chunk by chunk.

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
`make_ranker` and `make_ranker_with` are their jitted, mesh-sharded forms for the evaluator.
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

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onerec_jax.data.sequences import SequenceData
from onerec_jax.parallel import vocab_parallel

BATCH_AXES = ("data", "fsdp")  # mesh axes the eval batch is split over; the rest replicate

# (user_state pytree, item_ids [C] int32) -> scores [B, C]; ids are all valid (0 = padding).
ScoreChunkFn = Callable[[Any, jax.Array], jax.Array]


def _check_static(n_items: int, k: int, chunk_size: int) -> None:
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
    _check_static(n_items, k, chunk_size)
    targets = targets.astype(jnp.int32)
    history = history.astype(jnp.int32)
    if target_scores is None:
        diagonal = score_chunk_fn(user_state, jnp.clip(targets, 0, n_items))  # [B, B]
        target_scores = jnp.diagonal(diagonal)
    target_scores = target_scores.astype(jnp.float32)  # [B]
    higher, tied, top_scores, top_items = _scan_ids(
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
    return _finish(higher, tied, top_scores, top_items, target_scores, n_items)


def tie_rank(higher: jax.Array, tied: jax.Array) -> jax.Array:
    """The protocol's rank, float32: 1 + `higher` + `tied` / 2, the expected 1-based position of
    a target below `higher` items and among `tied` others of its score, in a random tie order."""
    return 1.0 + higher.astype(jnp.float32) + 0.5 * tied.astype(jnp.float32)


def _finish(higher, tied, top_scores, top_items, target_scores, n_items: int):
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


def _scan_ids(
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
        # target's rank is overridden in `_finish`).
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


def _dot_scores(state: tuple[jax.Array, jax.Array], ids: jax.Array) -> jax.Array:
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
        _dot_scores,
        (user_states, item_table),
        n_items,
        targets,
        history,
        target_scores=target_scores,
        k=k,
        chunk_size=chunk_size,
        mask_history=mask_history,
    )


def rank_and_topk_split(
    user_states: jax.Array,
    item_table: jax.Array,
    targets: jax.Array,
    history: jax.Array,
    *,
    axes: tuple[str, ...],
    mesh: jax.sharding.Mesh | None = None,
    n_items: int | None = None,
    k: int = 50,
    chunk_size: int = 8192,
    mask_history: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`rank_and_topk` on an item table whose rows are split over the mesh `axes`.

    Each shard ranks its own rows (global ids offset + local) chunk by chunk against the
    targets' scores, which are computed once up front exactly as `rank_and_topk` does; the
    shards' counts of higher-scoring and tied items are summed (so a tie across shards counts
    as one in a single table) and their top-k lists (global ids) are
    all-gathered over `axes`, in shard order, and merged by one more top_k, so ties still go
    to the lower id. The table is never gathered: besides [B, chunk] scores, a device holds
    only S * [B, k] candidates. The batch stays split as it arrives (the mesh's other axes).
    """
    n_items = item_table.shape[0] - 1 if n_items is None else n_items
    _check_static(n_items, k, chunk_size)
    shard_rows = item_table.shape[0] // math.prod(
        (mesh or jax.sharding.get_abstract_mesh()).shape[a] for a in axes
    )
    targets = targets.astype(jnp.int32)
    history = history.astype(jnp.int32)

    def body(user_states, table_shard, targets, history):
        first = vocab_parallel.local_offset(axes, shard_rows)
        # As `rank_and_topk`: the targets' rows (each from its shard), one float32 dot each.
        target_rows = vocab_parallel.local_take(table_shard, jnp.clip(targets, 0, n_items), axes)
        target_scores = jnp.sum(
            user_states.astype(jnp.float32) * target_rows.astype(jnp.float32), axis=-1
        )  # [B]

        def scores(state, ids):  # global ids -> this shard's rows
            return _dot_scores((state, table_shard), jnp.clip(ids - first, 0, shard_rows - 1))

        higher, tied, top_scores, top_items = _scan_ids(
            scores,
            user_states,
            n_items,
            targets,
            history,
            target_scores,
            first_id=first,
            n_ids=shard_rows,
            k=k,
            chunk_size=chunk_size,
            mask_history=mask_history,
            varying=axes,
        )
        higher, tied = jax.lax.psum((higher, tied), axes)
        every_score = jax.lax.all_gather(
            top_scores, axes, axis=1, tiled=True, to="invarying"
        )  # [B, S * k]
        every_item = jax.lax.all_gather(top_items, axes, axis=1, tiled=True, to="invarying")
        top_scores, pos = jax.lax.top_k(every_score, k)  # lower position = lower id on ties
        top_items = jnp.take_along_axis(every_item, pos, axis=1)
        return higher, tied, top_scores, top_items, target_scores

    higher, tied, top_scores, top_items, target_scores = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), P(axes, None), P(), P()),
        out_specs=(P(), P(), P(), P(), P()),
        axis_names=set(axes),
    )(user_states, item_table, targets, history)
    return _finish(higher, tied, top_scores, top_items, target_scores, n_items)


def make_ranker(
    mesh: jax.sharding.Mesh | None = None,
    *,
    k: int = 50,
    chunk_size: int = 8192,
    mask_history: bool = True,
    n_items: int | None = None,
    rules=None,
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """Jitted `rank_and_topk(user_states, item_table, targets, history)` with static options.

    With a mesh, the batch dimension of the user inputs and of the outputs is split over the
    mesh's ("data", "fsdp") axes (the global batch must be a multiple of their size). An item
    table whose rows split evenly over the mesh axes that `rules` (default: the global logical
    rules) give "vocab" stays split and is ranked shard by shard (`rank_and_topk_split`);
    otherwise it is replicated. The layouts are set by sharding constraints inside the jitted
    function rather than by `in_shardings`, so inputs may arrive in any layout on the mesh.
    `n_items`: the real items when the table has padding rows (default: rows - 1).
    """
    options = dict(k=k, chunk_size=chunk_size, mask_history=mask_history, n_items=n_items)
    fn = functools.partial(rank_and_topk, **options)
    if mesh is None:
        return jax.jit(fn)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    rows = NamedSharding(mesh, P(axes))  # [B]
    rows2d = NamedSharding(mesh, P(axes, None))  # [B, *]
    replicated = NamedSharding(mesh, P())

    def sharded(user_states, item_table, targets, history):
        split = vocab_parallel.split_axes(item_table, mesh, rules)
        table = NamedSharding(mesh, P(split, None)) if split else replicated
        user_states, item_table, targets, history = jax.lax.with_sharding_constraint(
            (user_states, item_table, targets, history), (rows2d, table, rows, rows2d)
        )
        if split:
            return rank_and_topk_split(
                user_states, item_table, targets, history, axes=split, mesh=mesh, **options
            )
        return fn(user_states, item_table, targets, history)

    return jax.jit(sharded, out_shardings=(rows, rows2d, rows2d))


def make_ranker_with(
    score_chunk_fn: Callable[[Any, Any, jax.Array], jax.Array],
    n_items: int,
    mesh: jax.sharding.Mesh | None = None,
    *,
    k: int = 50,
    chunk_size: int = 8192,
    mask_history: bool = True,
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """Jitted `ranker(user_state, params, targets, history)` for a model with its own scorer.

    `score_chunk_fn(params, user_state, item_ids [C]) -> [B, C]` (e.g. `ScoringModel.score_chunk`)
    scores item chunks inside `rank_and_topk_with`; the targets' scores come from the same
    function. With a mesh, every leaf of `user_state` and the other user inputs and outputs are
    split over ("data", "fsdp") along their first (batch) dimension and the params replicated,
    as `make_ranker` does with the item table.
    """

    def fn(user_state, params, targets, history):
        return rank_and_topk_with(
            lambda state, ids: score_chunk_fn(params, state, ids),
            user_state,
            n_items,
            targets,
            history,
            k=k,
            chunk_size=chunk_size,
            mask_history=mask_history,
        )

    if mesh is None:
        return jax.jit(fn)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    rows = NamedSharding(mesh, P(axes))  # [B]
    rows2d = NamedSharding(mesh, P(axes, None))  # [B, *]
    replicated = NamedSharding(mesh, P())

    def by_rows(x):  # [B, ...] split over the batch axes
        return NamedSharding(mesh, P(axes, *(None,) * (x.ndim - 1)))

    def sharded(user_state, params, targets, history):
        user_state = jax.lax.with_sharding_constraint(user_state, jax.tree.map(by_rows, user_state))
        params, targets, history = jax.lax.with_sharding_constraint(
            (params, targets, history), (replicated, rows, rows2d)
        )
        return fn(user_state, params, targets, history)

    return jax.jit(sharded, out_shardings=(rows, rows2d, rows2d))


def history_width(longest: int) -> int:
    """The width a batch of seen-item histories is padded to: the next power of two >= `longest`
    (>= 1), so few distinct shapes reach jit and few recompilations happen."""
    return 1 << max(longest - 1, 0).bit_length()


def history_batch(
    data: SequenceData, split_name: str, users: np.ndarray, width: int | None = None
) -> np.ndarray:
    """[B, H] int32: each dense user's whole prefix before the `split_name` target, 0-padded.

    H is `width`, or the longest prefix in the batch rounded up to a power of two (few distinct
    shapes, few recompilations). Padding rows of an eval batch (user 0) get user 0's prefix;
    their weight is 0.
    """
    split = data.split(split_name)
    users = np.asarray(users, np.int64)
    if users.ndim != 1 or (len(users) and (users.min() < 0 or users.max() >= data.n_users)):
        raise ValueError(f"users must be a 1-D array of dense ids in 0..{data.n_users - 1}")
    starts = split.starts[users]  # [B]
    lengths = split.ends[users] - starts  # [B]
    longest = int(lengths.max()) if len(users) else 0
    if width is None:
        width = history_width(longest)
    elif longest > width:
        raise ValueError(
            f"history width {width} is shorter than a prefix of {longest} items in this batch: "
            "masking would miss items; pass width=None or a larger width"
        )
    col = np.arange(width)  # [H]
    inside = col[None, :] < lengths[:, None]  # [B, H]
    idx = np.where(inside, starts[:, None] + col[None, :], 0)
    return np.where(inside, data.items[idx], 0).astype(np.int32)
