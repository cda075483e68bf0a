"""Popularity under PROTOCOL.md: rank items by training count, seen items masked (the floor).

  python benchmarks/popularity.py --config configs/demo.py
  python benchmarks/popularity.py --config configs/ml_latest_small.py \
      --config.data.path=../shared/data/ml-latest-small

Not a second implementation: the `:pop` model of the config (models/pop.py, log(1 + training
count) per item) is built by the trainer and scored by the same `Evaluator` as a `:pop` run, so
the numbers are those of `python -m onerec_jax.main --config <config>:pop` (same batches, history
masking, ranker, tie rule and metrics), without a workdir or checkpoints.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from onerec_jax.data import dataset
from onerec_jax.defaults import apply_variant
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.parallel import sharding
from onerec_jax.training import train


def popularity_metrics(config: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
    """{"valid": metrics, "test": metrics} of the popularity model on `config`'s data."""
    config = apply_variant(config.copy_and_resolve_references(), "pop")
    data, _ = dataset.load_data(config.data, with_items=False)
    mesh, rules = train.make_mesh(config)
    with sharding.use_mesh(mesh, rules):
        setup = train.make_setup(config, data, None, mesh, rules)
        params = train.initial_state(setup, config.seed).params  # the counts: nothing is trained
        evaluator = make_evaluator(setup.model, data, config, mesh, rules)
        return {split: evaluator.evaluate(params, split)[0] for split in ("valid", "test")}


def main(argv):
    del argv
    for split, m in popularity_metrics(flags.FLAGS.config).items():
        print(
            f"popularity {split}: HR@10 {m['hr@10']:.4f} +- {m['hr@10_ci95']:.4f}  "
            f"NDCG@10 {m['ndcg@10']:.4f} +- {m['ndcg@10_ci95']:.4f}  "
            f"MRR {m['mrr']:.4f} +- {m['mrr_ci95']:.4f}  ({int(m['n_users']):,} users)"
        )


if __name__ == "__main__":
    # Defined here, not on import: tests import this module beside others defining --config.
    config_flags.DEFINE_config_file("config", None, "Dataset config file.")
    app.run(main)
