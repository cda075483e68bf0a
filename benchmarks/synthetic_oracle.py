"""The oracle's NDCG@10 on synthetic data: the ceiling model numbers are reported against.

  python benchmarks/synthetic_oracle.py --data /tmp/synth25m      # written by the generator

Builds the leave-one-out sequences exactly as training does (PROTOCOL.md) and ranks every item by
the true next-item distribution given each user's validation and test history.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from onerec_jax.data import movielens, sequences, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="folder written by data/synthetic.py")
    args = parser.parse_args()
    model = synthetic.load_synthetic(args.data)
    inter = movielens.read_ratings_csv(os.path.join(args.data, "ratings.csv"))
    data = sequences.build_sequences(inter, sequences.SequenceOptions())
    print(f"{args.data}: {data.n_users:,} users, {data.n_items:,} items")
    for name in ("valid", "test"):
        split = data.split(name)
        start = time.perf_counter()
        histories = [
            data.item_ids[data.items[s:e]] for s, e in zip(split.starts, split.ends, strict=True)
        ]
        targets = data.item_ids[split.targets]
        ndcg = model.oracle_ndcg_at_k(histories, np.asarray(targets), k=10)
        print(f"oracle NDCG@10 on {name}: {ndcg:.4f} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
