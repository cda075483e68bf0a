"""The full softmax's loss and gradient, all rows at once against row blocks (loss.row_block).

  taskset -c 1 python benchmarks/softmax_rows.py                       # ml-latest-small shapes
  taskset -c 1 python benchmarks/softmax_rows.py --items 59047 --chunk 65536 --batch 32

`losses.full_softmax_xent` value and gradient (hidden and table), jitted, on [batch * max_len, dim]
hidden rows against a [items + 1, dim] table, for each `--row_blocks` value (0: every row at
once, the dense path) x `--tiles` value (loss.row_block_items) and each share of valid rows
(`--valid`: left-padded windows whose lengths are drawn uniformly so that this share of the
positions is real). Prints the median process CPU-seconds of `--repeats` calls after one that
compiles, and the largest difference of the gradients from the dense path's (float32 round-off
only). Pin the process to one core.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax.models.losses import full_softmax_xent


def padding_mask(batch: int, max_len: int, valid: float, seed: int) -> np.ndarray:
    """[batch * max_len] bool, left-padded rows whose real share is about `valid`."""
    rng = np.random.default_rng(seed)
    if valid >= 1.0:
        lengths = np.full(batch, max_len)
    else:
        top = max(1, round(2 * valid * max_len))  # uniform on 1..top has mean ~valid * max_len
        lengths = np.minimum(rng.integers(1, top + 1, batch), max_len)
    return (np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]).reshape(-1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=9066)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max_len", type=int, default=200)
    p.add_argument("--chunk", type=int, default=16384, help="loss.chunk_size")
    p.add_argument("--row_blocks", default="0,256,512,1024")
    p.add_argument("--tiles", default="1024", help="loss.row_block_items values to time")
    p.add_argument("--valid", default="1.0,0.5", help="shares of real (unpadded) rows")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    n, v = args.batch * args.max_len, args.items + 1
    gen = np.random.default_rng(0)
    hidden = jnp.asarray(gen.normal(size=(n, args.dim)), jnp.float32)
    table = jnp.asarray(0.1 * gen.normal(size=(v, args.dim)), jnp.float32)
    targets = jnp.asarray(gen.integers(1, v, n), jnp.int32)
    print(f"{n:,} rows x {v:,} items, dim {args.dim}, chunk {args.chunk}; {jax.devices()[0]}")
    print(
        "| real rows | row_block | items per tile | CPU-s (median) | vs the first | max grad diff |"
    )
    print("|---|---|---|---|---|---|")
    for valid in (float(x) for x in args.valid.split(",")):
        mask = jnp.asarray(padding_mask(args.batch, args.max_len, valid, 0))
        base_time, base_grads = None, None
        runs = [(0, 0)] if "0" in args.row_blocks.split(",") else []
        runs += [
            (int(b), int(t))
            for b in args.row_blocks.split(",")
            if b != "0"
            for t in args.tiles.split(",")
        ]
        for block, tile in runs:

            def loss(h, t, block=block, tile=tile, mask=mask):
                total, count = full_softmax_xent(
                    h,
                    t,
                    targets,
                    mask,
                    chunk_size=args.chunk,
                    row_block=block,
                    row_block_items=tile,
                )
                return total / jnp.maximum(count, 1.0)

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            _, grads = jax.block_until_ready(fn(hidden, table))
            times = []
            for _ in range(args.repeats):
                start = time.process_time()
                jax.block_until_ready(fn(hidden, table))
                times.append(time.process_time() - start)
            t = float(np.median(times))
            if base_time is None:
                base_time, base_grads = t, grads
            diff = max(float(jnp.abs(a - b).max()) for a, b in zip(grads, base_grads, strict=True))
            share = float(mask.mean())
            print(
                f"| {share:.2f} | {block} | {tile or ''} | {t:.3f} | {base_time / t:.2f}x ", end=""
            )
            print(f"| {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
