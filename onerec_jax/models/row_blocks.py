"""The full softmax's logsumexp in row blocks, skipping blocks of padding rows only.

`losses.full_softmax_xent(..., row_block=b)` on one device, with a catalogue of one chunk:
left-padded windows are often half padding, and on a CPU their softmax is most of a step.
"""

import math

import jax
import jax.numpy as jnp


def one_device() -> bool:
    """No mesh, or a mesh of one device: the only case for row blocks, whose valid-first order
    is global (on a split batch it would gather every row onto every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def valid_blocks_lse(rows: jax.Array, table: jax.Array, mask: jax.Array, block: int):
    """[N] logsumexp of `rows` [N, D] (float32) against `table` [V, D] over items 1..V-1,
    computed in blocks of `block` rows, skipping blocks that hold padding only.

    The rows are put valid first (a stable order) and cut into blocks; a block whose first row
    is padding is all padding, and `lax.cond` skips it forward and backward (its rows get 0,
    masked by the caller). `_blocked_lse` has its own backward pass, which recomputes a block's
    logits and accumulates the table's gradient in the loop, so forward and backward hold one
    [block, V] block of logits at a time. Results come back in the rows' own order.
    """
    n = rows.shape[0]
    n_blocks = -(-n // block)
    order = jnp.argsort(jnp.logical_not(mask), stable=True)  # [N]: valid rows first
    pad = n_blocks * block - n
    blocks = jnp.pad(rows[order], ((0, pad), (0, 0))).reshape(n_blocks, block, -1)
    live = jnp.pad(mask[order], (0, pad)).reshape(n_blocks, block)[:, 0]  # [n_blocks]
    lse = _blocked_lse(blocks, table, live).reshape(-1)[:n]
    return jnp.zeros((n,), jnp.float32).at[order].set(lse)


def _block_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """[b, V] float32 logits of rows `x` (cast to the table's dtype); column 0 is -inf."""
    logits = jnp.einsum(
        "nd,vd->nv", x.astype(table.dtype), table, preferred_element_type=jnp.float32
    )
    return jnp.where(jnp.arange(table.shape[0]) >= 1, logits, -jnp.inf)


@jax.custom_vjp
def _blocked_lse(blocks: jax.Array, table: jax.Array, live: jax.Array) -> jax.Array:
    """[n_blocks, b] logsumexp of each live block's rows; 0 for the rest."""
    return _blocked_lse_fwd(blocks, table, live)[0]


def _blocked_lse_fwd(blocks, table, live):
    def body(_, xs):
        x, on = xs
        skip = lambda x: jnp.zeros(x.shape[:1], jnp.float32)  # noqa: E731
        lse = jax.lax.cond(on, lambda x: jax.nn.logsumexp(_block_logits(x, table), -1), skip, x)
        return None, lse

    _, lse = jax.lax.scan(body, None, (blocks, live))
    return lse, (blocks, table, live, lse)


def _blocked_lse_bwd(residuals, g):
    """d lse_i / d x_i = softmax_i . table and d lse_i / d table = softmax_i^T x_i, block by
    block (softmax recomputed from the saved lse); the table's gradient is the loop's carry."""
    blocks, table, live, lse = residuals

    def grads(args):
        d_table, x, row_lse, row_g = args
        p = jnp.exp(_block_logits(x, table) - row_lse[:, None]) * row_g[:, None]  # [b, V]
        p = p.astype(table.dtype)
        dx = jnp.einsum("nv,vd->nd", p, table, preferred_element_type=jnp.float32)
        dt = jnp.einsum("nv,nd->vd", p, x.astype(table.dtype), preferred_element_type=jnp.float32)
        return d_table + dt, dx

    def skip(args):
        d_table, x = args[:2]
        return d_table, jnp.zeros(x.shape, jnp.float32)

    def body(d_table, xs):
        x, on, row_lse, row_g = xs
        return jax.lax.cond(on, grads, skip, (d_table, x, row_lse, row_g))

    d_table0 = jnp.zeros(table.shape, jnp.float32)
    d_table, d_blocks = jax.lax.scan(body, d_table0, (blocks, live, lse, g))
    return d_blocks.astype(blocks.dtype), d_table.astype(table.dtype), None


_blocked_lse.defvjp(_blocked_lse_fwd, _blocked_lse_bwd)
