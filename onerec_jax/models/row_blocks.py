"""The full softmax's logsumexp in row blocks, skipping blocks of padding rows only.

`losses.full_softmax_xent(..., row_block=b)` on one device: left-padded windows are often half
padding, and on a CPU their softmax is most of a step.
"""

import functools
import math

import jax
import jax.numpy as jnp


def one_device() -> bool:
    """No mesh, or a mesh of one device: the only case for row blocks, whose valid-first order
    is global (on a split batch it would gather every row onto every device)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def in_row_blocks(fn, rows: int):
    """`fn(params, batch)` (every leaf of `batch` and of the result [B, ...], rows independent)
    computed `rows` batch rows at a time under `lax.map`: the same values, with each block's
    intermediates small enough to stay in cache (on one CPU core a [256, 200]-slot Transformer
    pass runs ~3x faster in blocks of 8 users). Batches of at most `rows` rows, or whose size
    `rows` does not divide, are computed whole."""

    def blocked(params, batch):
        b = jax.tree.leaves(batch)[0].shape[0]
        if not splits(b, rows):
            return fn(params, batch)
        blocks = jax.tree.map(lambda x: x.reshape(b // rows, rows, *x.shape[1:]), batch)
        out = jax.lax.map(lambda block: fn(params, block), blocks)
        return jax.tree.map(lambda y: y.reshape(b, *y.shape[2:]), out)

    return blocked


def splits(batch: int, rows: int) -> bool:
    """Whether `in_row_blocks` cuts a batch of `batch` rows into blocks of `rows`."""
    return 0 < rows < batch and batch % rows == 0


def encoder_rows(setting: int) -> int:
    """`train.encoder_rows` resolved inside a trace: 0 (auto) is 4 on one CPU device (one core,
    dev-set shapes: the OneRec item head's epoch 15.6 -> 11.3 CPU-s; 16: 13.0, 1: 12.3), whole
    batches elsewhere; a positive setting applies on one device only (on a split batch a block
    loop would cut across the split)."""
    if not one_device():
        return 0
    return setting or (4 if jax.default_backend() == "cpu" else 0)


def valid_blocks_lse(
    rows: jax.Array, table: jax.Array, mask: jax.Array, block: int, items: int = 1024
):
    """[N] logsumexp of `rows` [N, D] (float32) against `table` [V, D] over items 1..V-1,
    computed in tiles of `block` rows x `items` items, skipping blocks that hold padding only.

    The rows are put valid first (a stable order) and cut into blocks; a block whose first row
    is padding is all padding, and `lax.cond` skips it forward and backward (its rows get 0,
    masked by the caller). Each live block scans the table in chunks of `items` rows with an
    online logsumexp, so a [block, items] tile of logits stays in cache: on one CPU core a
    [512, 59,048] block's logits cost 3.3x the time of the same work in 4,096-item tiles
    (BENCHMARKS.md). `_blocked_lse` has its own backward pass, which recomputes each tile's
    logits from the saved logsumexp and accumulates the table's gradient tile by tile in the
    loop. Results come back in the rows' own order.
    """
    n, vocab = rows.shape[0], table.shape[0]
    n_blocks = -(-n // block)
    order = jnp.argsort(jnp.logical_not(mask), stable=True)  # [N]: valid rows first
    pad = n_blocks * block - n
    blocks = jnp.pad(rows[order], ((0, pad), (0, 0))).reshape(n_blocks, block, -1)
    live = jnp.pad(mask[order], (0, pad)).reshape(n_blocks, block)[:, 0]  # [n_blocks]
    n_chunks = -(-vocab // max(1, items))
    width = -(-vocab // n_chunks)  # balanced chunks: fewer than n_chunks padding rows
    chunks = jnp.pad(table, ((0, n_chunks * width - vocab), (0, 0)))
    chunks = chunks.reshape(n_chunks, width, -1)  # [n_chunks, width, D]
    lse = _blocked_lse(blocks, chunks, live, vocab).reshape(-1)[:n]
    return jnp.zeros((n,), jnp.float32).at[order].set(lse)


def _tile_logits(x: jax.Array, chunk: jax.Array, start: jax.Array, vocab: int) -> jax.Array:
    """[b, C] float32 logits of rows `x` (cast to the table's dtype) against table rows
    start..start+C-1; -inf for row 0 and for rows >= vocab (chunk padding)."""
    logits = jnp.einsum(
        "nd,vd->nv", x.astype(chunk.dtype), chunk, preferred_element_type=jnp.float32
    )
    ids = start + jnp.arange(chunk.shape[0])
    return jnp.where((ids >= 1) & (ids < vocab), logits, -jnp.inf)


def _starts(chunks: jax.Array) -> jax.Array:
    return jnp.arange(chunks.shape[0], dtype=jnp.int32) * chunks.shape[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_lse(blocks: jax.Array, chunks: jax.Array, live: jax.Array, vocab: int) -> jax.Array:
    """[n_blocks, b] logsumexp of each live block's rows; 0 for the rest."""
    return _blocked_lse_fwd(blocks, chunks, live, vocab)[0]


def _block_lse(x: jax.Array, chunks: jax.Array, vocab: int) -> jax.Array:
    """[b] logsumexp of rows `x` over the items of every chunk, online (running max and sum)."""

    def body(carry, xs):
        run_max, run_sum = carry
        chunk, start = xs
        logits = _tile_logits(x, chunk, start, vocab)
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1
        )
        return (new_max, run_sum), None

    if chunks.shape[0] == 1:  # one tile: no loop (compiles faster; small catalogues, tests)
        return jax.nn.logsumexp(_tile_logits(x, chunks[0], jnp.int32(0), vocab), axis=-1)
    lowest = jnp.full(x.shape[:1], jnp.finfo(jnp.float32).min)
    init = (lowest, jnp.zeros(x.shape[:1], jnp.float32))
    (run_max, run_sum), _ = jax.lax.scan(body, init, (chunks, _starts(chunks)))
    return run_max + jnp.log(run_sum)


def _blocked_lse_fwd(blocks, chunks, live, vocab):
    def body(_, xs):
        x, on = xs
        skip = lambda x: jnp.zeros(x.shape[:1], jnp.float32)  # noqa: E731
        return None, jax.lax.cond(on, lambda x: _block_lse(x, chunks, vocab), skip, x)

    _, lse = jax.lax.scan(body, None, (blocks, live))
    return lse, (blocks, chunks, live, lse)


def _blocked_lse_bwd(vocab, residuals, g):
    """d lse_i / d x_i = softmax_i . table and d lse_i / d table = softmax_i^T x_i, tile by
    tile (softmax recomputed from the saved lse); the table's gradient is the loop's carry."""
    blocks, chunks, live, lse = residuals

    def grads(args):
        d_chunks, x, row_lse, row_g = args

        def tile(dx, xs):
            chunk, start, d_chunk = xs
            p = jnp.exp(_tile_logits(x, chunk, start, vocab) - row_lse[:, None]) * row_g[:, None]
            p = p.astype(chunk.dtype)  # [b, C]
            dx = dx + jnp.einsum("nv,vd->nd", p, chunk, preferred_element_type=jnp.float32)
            dt = jnp.einsum(
                "nv,nd->vd", p, x.astype(chunk.dtype), preferred_element_type=jnp.float32
            )
            return dx, d_chunk + dt

        dx0 = jnp.zeros(x.shape, jnp.float32)
        if chunks.shape[0] == 1:  # one tile: no loop
            dx, d_chunk = tile(dx0, (chunks[0], jnp.int32(0), d_chunks[0]))
            return d_chunk[None], dx
        dx, d_chunks = jax.lax.scan(tile, dx0, (chunks, _starts(chunks), d_chunks))
        return d_chunks, dx

    def skip(args):
        d_chunks, x = args[:2]
        return d_chunks, jnp.zeros(x.shape, jnp.float32)

    def body(d_chunks, xs):
        x, on, row_lse, row_g = xs
        return jax.lax.cond(on, grads, skip, (d_chunks, x, row_lse, row_g))

    d_chunks0 = jnp.zeros(chunks.shape, jnp.float32)
    d_chunks, d_blocks = jax.lax.scan(body, d_chunks0, (blocks, live, lse, g))
    return d_blocks.astype(blocks.dtype), d_chunks.astype(chunks.dtype), None


_blocked_lse.defvjp(_blocked_lse_fwd, _blocked_lse_bwd)
