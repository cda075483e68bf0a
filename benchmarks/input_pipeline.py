"""Training input pipeline: padding saved by length buckets, and batches per second.

  python benchmarks/input_pipeline.py --data ../shared/data/ml-latest-small --data /tmp/synth25m

For each dataset: the number of training windows, the share of padded positions in an epoch of
plain (max_len-wide) batches and of length-bucketed batches, and the throughput of both
iterators (in-process, no Grain workers) over `--batches` batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from absl import flags

from onerec_jax.data import movielens, pipeline, sequences


def padding_share(data, max_len, batch_size, boundaries, seed=0) -> tuple[float, float]:
    """(padded share of positions, plain; same with buckets) over one epoch's batches."""
    windows = pipeline.training_windows(data, max_len=max_len)
    full = len(windows) // batch_size * batch_size
    plain = 1 - windows.length[:full].sum() / (full * max_len)  # drop_remainder, any order
    ds = pipeline.train_dataset(
        data,
        max_len=max_len,
        batch_size=batch_size,
        seed=seed,
        num_epochs=1,
        bucket_boundaries=boundaries,
    )
    real = total = 0
    for batch in ds:
        real += int(batch["mask"].sum())
        total += batch["mask"].size
    return float(plain), 1 - real / total


def throughput(data, max_len, batch_size, boundaries, n_batches) -> float:
    ds = pipeline.train_dataset(
        data, max_len=max_len, batch_size=batch_size, seed=0, bucket_boundaries=boundaries
    )
    it = iter(ds)
    next(it)  # start-up (window index, first plan) is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True, help="MovieLens CSV folder")
    parser.add_argument("--max_len", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
    boundaries = (16, 32, 64, 128, 200)
    print(
        f"max_len {args.max_len}, batch {args.batch_size}, buckets {boundaries}, "
        f"{os.cpu_count()} cores\n"
    )
    print(
        "| data | windows | padded, plain | padded, bucketed | tokens bucketed/plain "
        "| plain batches/s | bucketed batches/s |\n|---|---|---|---|---|---|---|"
    )
    for path in args.data:
        inter = movielens.read_ratings_csv(os.path.join(path, "ratings.csv"))
        data = sequences.build_sequences(inter, sequences.SequenceOptions())
        del inter
        n_windows = len(pipeline.training_windows(data, max_len=args.max_len))
        plain, bucketed = padding_share(data, args.max_len, args.batch_size, boundaries)
        ratio = (1 - plain) / (1 - bucketed)  # same real tokens: total positions scale inversely
        plain_rate = throughput(data, args.max_len, args.batch_size, None, args.batches)
        bucket_rate = throughput(data, args.max_len, args.batch_size, boundaries, args.batches)
        name = os.path.basename(os.path.normpath(path))
        print(
            f"| {name} | {n_windows:,} | {plain:.1%} | {bucketed:.1%} | {ratio:.2f} "
            f"| {plain_rate:,.0f} | {bucket_rate:,.0f} |"
        )


if __name__ == "__main__":
    main()
