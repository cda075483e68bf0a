"""Popularity under PROTOCOL.md: rank items by training count, seen items masked (the floor).

  python benchmarks/popularity.py --config configs/demo.py
  python benchmarks/popularity.py --config configs/ml_latest_small.py \
      --config.data.path=../shared/data/ml-latest-small

Uses the same evaluation batches, history masking, ranker and metrics as every trained model:
the "model" is a user state of 1 scored against a one-column item table of training counts.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

from onerec_jax.data import dataset, item_arrays, pipeline
from onerec_jax.evaluation import metrics, ranking

_CONFIG = config_flags.DEFINE_config_file("config", None, "Dataset config file.")


def main(argv):
    del argv
    config = _CONFIG.value
    data, _ = dataset.load_data(config.data, with_items=False)
    counts = item_arrays.train_counts(data).astype(np.float32)
    # Ties in count are broken towards the lower item id, as a real ranker would not help.
    table = jnp.asarray((counts - np.arange(len(counts)) * 1e-7)[:, None])  # [V, 1]
    ranker = ranking.make_ranker(k=10, chunk_size=config.eval.chunk_size, mask_history=True)
    for split in ("valid", "test"):
        ranks, weights = [], []
        for batch in pipeline.eval_dataset(data, split, max_len=config.data.max_len,
                                           batch_size=config.eval.batch_size):  # fmt: skip
            history = ranking.history_batch(data, split, batch["user"])
            states = jnp.ones((len(batch["user"]), 1))
            r, _, _ = ranker(states, table, jnp.asarray(batch["target"]), jnp.asarray(history))
            ranks.append(np.asarray(r))
            weights.append(batch["weight"])
        m = metrics.metrics_from_ranks(np.concatenate(ranks), np.concatenate(weights))
        print(
            f"popularity {split}: HR@10 {m['hr@10']:.4f} +- {m['hr@10_ci95']:.4f}  "
            f"NDCG@10 {m['ndcg@10']:.4f} +- {m['ndcg@10_ci95']:.4f}  "
            f"MRR {m['mrr']:.4f} +- {m['mrr_ci95']:.4f}  ({int(m['n_users']):,} users)"
        )


if __name__ == "__main__":
    app.run(main)
