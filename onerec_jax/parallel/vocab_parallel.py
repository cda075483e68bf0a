"""Item tables split over the mesh along their vocabulary axis: row lookups and the softmax.

When the logical rules map "vocab" to mesh axes of total size S > 1 (the default rule sends it
to "model"), each device holds R = rows / S consecutive rows of every item table: device s has
global ids s * R .. (s + 1) * R - 1. XLA's automatic partitioning of a gather from such a table
keeps the table but materialises its *gradient* whole on every device (a [V, D] scatter, then an
all-reduce over the batch axes), so the functions here are `jax.shard_map`s that are manual over
the vocab axes only; the batch axes ("data", "fsdp") stay automatic, so callers' batch sharding
is untouched.

- `take_rows`: each shard gathers the ids it owns (zeros for the others) and a psum adds them;
  the backward pass scatters into the local rows only.
- `full_softmax_lse`: each shard runs the chunked online logsumexp over its own rows, then the
  shards' (max, rescaled sum) pairs are combined with a pmax and a psum.

A table is split only if its row count divides by S; models round their tables up with
`padded_rows` (the extra rows are never items: losses and rankers take the real vocabulary size
separately). Without a mesh, with S = 1 or with a table of another row count, everything falls
back to plain indexing, so single-device code is unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def vocab_axes(mesh=None, rules=None) -> tuple[str, ...]:
    """Mesh axes of size > 1 that the "vocab" logical axis is split over, in order.

    Args:
      mesh: a Mesh or AbstractMesh; by default the current one (`jax.set_mesh`).
      rules: logical-axis rules; by default the global ones (`nn.set_logical_axis_rules`).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return ()
    rules = nn.get_logical_axis_rules() if rules is None else rules
    (axes,) = nn.logical_to_mesh_axes(("vocab",), rules)
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)


def _size(axes: tuple[str, ...], mesh=None) -> int:
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return math.prod(mesh.shape[a] for a in axes)


def padded_rows(n: int) -> int:
    """`n` rounded up to a multiple of the current vocab shard count (`n` itself if unsplit).

    Models size their item tables with it, so that the table splits evenly. A checkpoint then
    restores onto meshes with a shard count dividing its row count.
    """
    shards = _size(vocab_axes())
    return -(-n // shards) * shards


def split_axes(table: jax.Array, mesh=None, rules=None) -> tuple[str, ...]:
    """The vocab axes if `table` [rows, ...] splits evenly over them, else () (plain path)."""
    axes = vocab_axes(mesh, rules)
    if axes and table.shape[0] % _size(axes, mesh) == 0:
        return axes
    return ()


def local_offset(axes: tuple[str, ...], rows_per_shard: int) -> jax.Array:
    """Inside a shard_map over `axes`: the global id of this shard's first row."""
    return jax.lax.axis_index(axes) * rows_per_shard


def local_take(table_shard: jax.Array, ids: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Inside a shard_map over `axes`: rows `ids` of the split table, gathered where they live."""
    rows = table_shard.shape[0]
    local = ids - local_offset(axes, rows)
    inside = (local >= 0) & (local < rows)
    found = jnp.take(table_shard, jnp.where(inside, local, 0), axis=0)  # [..., D]
    found = jnp.where(inside[..., None], found, jnp.zeros((), found.dtype))
    return jax.lax.psum(found, axes)


def take_rows(table: jax.Array, ids: jax.Array, mesh=None, rules=None) -> jax.Array:
    """`table[ids]` ([*ids.shape, D]) that never gathers a vocab-split table on one device.

    Ids outside 0..rows-1 give zero rows on the split path (callers pass valid ids).
    """
    axes = split_axes(table, mesh, rules)
    if not axes:
        return table[ids]
    spec = P(axes, *(None,) * (table.ndim - 1))
    return jax.shard_map(
        lambda t, i: local_take(t, i, axes),
        mesh=mesh,
        in_specs=(spec, P()),
        out_specs=P(),
        axis_names=set(axes),
    )(table, ids)


def embed(module: nn.Embed, ids: jax.Array) -> jax.Array:
    """`module(ids)` for an `nn.Embed`, through `take_rows` when its table is vocab-split."""
    table = module.embedding
    if not split_axes(table):
        return module(ids)
    dtype = module.dtype or table.dtype
    return take_rows(table, ids).astype(dtype)


def online_max_sum(
    hidden: jax.Array,
    rows: jax.Array,
    is_item: Callable[[jax.Array], jax.Array],
    chunk_size: int,
    varying: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """(max, sum exp(logit - max)) per row of hidden [N, D] (float32) over `rows` [R, D], chunked.

    `is_item(local_ids [C]) -> bool [C]` says which rows count (others are -inf logits); the
    result is finite (max = float32 min, sum = 0) when none does. Each chunk's matmul takes
    its operands in `rows.dtype` and accumulates in float32; the scan body is rematerialised,
    so forward and backward hold one [N, chunk] block at a time. Inside a shard_map, `varying`
    names the manual axes `rows` differs over (the scan's carry must say so too).
    """
    n_rows, dim = rows.shape
    n_chunks = -(-n_rows // max(1, chunk_size))
    chunk = -(-n_rows // n_chunks)  # balanced chunks: at most n_chunks - 1 padding rows
    lowest = jnp.finfo(jnp.float32).min

    def block(rows_chunk, ids):  # -> [N, C] float32 logits, -inf off the items
        # hidden is closed over in float32 and cast per chunk, so its gradient is summed over
        # the chunks in float32 (bf16 x bf16 products are exact in the f32 accumulation).
        hc = hidden.astype(rows.dtype)
        logits = jnp.einsum("nd,cd->nc", hc, rows_chunk, preferred_element_type=jnp.float32)
        return jnp.where(is_item(ids), logits, -jnp.inf)

    if n_chunks == 1:
        logits = block(rows, jnp.arange(n_rows, dtype=jnp.int32))
        run_max = jnp.maximum(lowest, jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
        return run_max, jnp.sum(jnp.exp(logits - run_max[:, None]), axis=-1)
    padded = jnp.pad(rows, ((0, n_chunks * chunk - n_rows), (0, 0)))
    chunks = padded.reshape(n_chunks, chunk, dim)  # [n_chunks, chunk, D]
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * chunk

    @jax.checkpoint
    def step(carry, xs):
        run_max, run_sum = carry  # [N], [N]
        rows_chunk, start = xs
        ids = start + jnp.arange(chunk, dtype=jnp.int32)
        logits = block(rows_chunk, ids)
        new_max = jnp.maximum(run_max, jax.lax.stop_gradient(jnp.max(logits, axis=-1)))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1
        )
        return (new_max, run_sum), None

    n = hidden.shape[0]
    init = (jnp.full((n,), lowest, jnp.float32), jnp.zeros((n,), jnp.float32))
    if varying:
        init = jax.lax.pcast(init, varying, to="varying")
    (run_max, run_sum), _ = jax.lax.scan(step, init, (chunks, starts))
    return run_max, run_sum


def full_softmax_lse(
    hidden: jax.Array, table: jax.Array, vocab_size: int, chunk_size: int, axes: tuple[str, ...]
) -> jax.Array:
    """[N] logsumexp of hidden [N, D] (float32) against items 1..vocab_size-1 of a split table.

    `table` [rows, D] (already in the matmul operand dtype) is split over `axes`; each shard
    scans its own rows, and the per-shard (max, sum) pairs are merged exactly:
    lse = M + log(sum_s sum_s * exp(max_s - M)), M = max_s max_s (no gradient through M).
    """
    rows_per_shard = table.shape[0] // _size(axes)

    def body(h, table_shard):
        offset = local_offset(axes, rows_per_shard)

        def is_item(local):
            ids = offset + local
            return (local < rows_per_shard) & (ids >= 1) & (ids < vocab_size)

        run_max, run_sum = online_max_sum(h, table_shard, is_item, chunk_size, varying=axes)
        top = jax.lax.pmax(jax.lax.stop_gradient(run_max), axes)  # the shift has no gradient
        total = jax.lax.psum(run_sum * jnp.exp(run_max - top), axes)
        return top + jnp.log(total)

    return jax.shard_map(
        body,
        in_specs=(P(), P(axes, None)),
        out_specs=P(),
        axis_names=set(axes),
    )(hidden, table)


def item_sum(table: jax.Array, vocab_size: int, axes: tuple[str, ...]) -> jax.Array:
    """[D] float32 sum of rows 1..vocab_size-1 of a table split over `axes`."""
    rows_per_shard = table.shape[0] // _size(axes)

    def body(table_shard):
        ids = local_offset(axes, rows_per_shard) + jnp.arange(rows_per_shard)
        keep = (ids >= 1) & (ids < vocab_size)
        part = jnp.sum(jnp.where(keep[:, None], table_shard.astype(jnp.float32), 0.0), axis=0)
        return jax.lax.psum(part, axes)

    return jax.shard_map(body, in_specs=P(axes, None), out_specs=P(), axis_names=set(axes))(table)


def whole_table_collectives(hlo_text: str, rows: int) -> list[str]:
    """Lines of compiled HLO text whose collective (all-gather, all-reduce, collective-permute,
    all-to-all) yields an array with a dimension of at least `rows`: empty when a program never
    moves a table of that many rows (or more than one shard of it) between devices."""
    found = []
    for line in hlo_text.splitlines():
        if not re.search(r"all-gather|all-reduce|collective-permute|all-to-all", line):
            continue
        result = line.split("=", 2)[:2][-1]  # "name = TYPE[dims] op(...)": the result type
        dims = re.findall(r"\[([\d,]*)\]", result)
        if any(int(d) >= rows for group in dims for d in group.split(",") if d):
            found.append(line.strip()[:160])
    return found
