"""Full-catalogue ranking over a device mesh, for the evaluator, and seen-item histories.

The ranking itself (the tie rule, the chunked scan, the single-device `rank_and_topk` and
`rank_and_topk_with`, `rank_in_list`) is models/full_ranking.py, which models use for `topk`;
it is re-exported here. `make_ranker` and `make_ranker_with` are its jitted, mesh-sharded forms
(`rank_and_topk_split` ranks an item table whose rows are split over the mesh);
`history_batch` builds the [B, H] histories that are masked.
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
from onerec_jax.data.training_examples import power_of_two_width
from onerec_jax.models.full_ranking import (  # noqa: F401  re-exported
    ScoreChunkFn,
    block_sizes,
    check_static,
    dot_scores,
    finish_ranks,
    rank_and_topk,
    rank_and_topk_with,
    rank_in_list,
    scan_ids,
    tie_rank,
)
from onerec_jax.models.row_blocks import in_row_blocks  # noqa: F401  re-exported
from onerec_jax.parallel import vocab_parallel

BATCH_AXES = ("data", "fsdp")  # mesh axes the eval batch is split over; the rest replicate


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
    check_static(n_items, k, chunk_size)
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
            return dot_scores((state, table_shard), jnp.clip(ids - first, 0, shard_rows - 1))

        higher, tied, top_scores, top_items = scan_ids(
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
    return finish_ranks(higher, tied, top_scores, top_items, target_scores, n_items)


def make_ranker(
    mesh: jax.sharding.Mesh | None = None,
    *,
    k: int = 50,
    chunk_size: int = 8192,
    mask_history: bool = True,
    n_items: int | None = None,
    rules=None,
    block_rows: int = 0,
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """Jitted `rank_and_topk(user_states, item_table, targets, history)` with static options.

    With a mesh, the batch dimension of the user inputs and of the outputs is split over the
    mesh's ("data", "fsdp") axes (the global batch must be a multiple of their size). An item
    table whose rows split evenly over the mesh axes that `rules` (default: the global logical
    rules) give "vocab" stays split and is ranked shard by shard (`rank_and_topk_split`);
    otherwise it is replicated. The layouts are set by sharding constraints inside the jitted
    function rather than by `in_shardings`, so inputs may arrive in any layout on the mesh.
    `n_items`: the real items when the table has padding rows (default: rows - 1).
    `block_rows` > 0: users ranked that many at a time (`in_row_blocks`; one device only).
    """
    options = dict(k=k, chunk_size=chunk_size, mask_history=mask_history, n_items=n_items)
    fn = _user_blocks(functools.partial(rank_and_topk, **options), block_rows)
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
    block_rows: int = 0,
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """Jitted `ranker(user_state, params, targets, history)` for a model with its own scorer.

    `score_chunk_fn(params, user_state, item_ids [C]) -> [B, C]` (e.g. `ScoringModel.score_chunk`)
    scores item chunks inside `rank_and_topk_with`; the targets' scores come from the same
    function. With a mesh, every leaf of `user_state` and the other user inputs and outputs are
    split over ("data", "fsdp") along their first (batch) dimension; the params keep the layout
    they arrive in (a vocab-split table stays split: the scorer reads its chunk's rows through
    `vocab_parallel.take_rows`, never gathering the table on one device). `block_rows`: as
    `make_ranker`'s.
    """

    def ranked(user_state, params, targets, history):
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

    fn = _user_blocks(ranked, block_rows)
    if mesh is None:
        return jax.jit(fn)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    rows = NamedSharding(mesh, P(axes))  # [B]
    rows2d = NamedSharding(mesh, P(axes, None))  # [B, *]

    def by_rows(x):  # [B, ...] split over the batch axes
        return NamedSharding(mesh, P(axes, *(None,) * (x.ndim - 1)))

    def sharded(user_state, params, targets, history):
        user_state = jax.lax.with_sharding_constraint(user_state, jax.tree.map(by_rows, user_state))
        targets, history = jax.lax.with_sharding_constraint((targets, history), (rows, rows2d))
        return fn(user_state, params, targets, history)

    return jax.jit(sharded, out_shardings=(rows, rows2d, rows2d))


def _user_blocks(fn, rows: int):
    """`fn(user_state, table_or_params, targets, history)` ranked `rows` users at a time."""
    if rows <= 0:
        return fn
    blocked = in_row_blocks(lambda table, users: fn(users[0], table, *users[1:]), rows)
    return lambda user_state, table, targets, history: blocked(
        table, (user_state, targets, history)
    )


def cpu_block_sizes(config, mesh: jax.sharding.Mesh | None) -> dict[str, int]:
    """`eval.state_rows`, `eval.rank_rows` and `eval.chunk_size` resolved for `mesh`
    (`full_ranking.block_sizes`)."""
    one = mesh is None or math.prod(mesh.shape.values()) == 1
    return block_sizes(config.eval, one_device=one)


def history_width(longest: int) -> int:
    """The width a batch of seen-item histories is padded to: the next power of two >= `longest`
    (>= 1), so few distinct shapes reach jit and few recompilations happen."""
    return power_of_two_width(longest)


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
