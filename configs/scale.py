"""A 10,000,000-item synthetic catalogue on 8 devices: the item table split over "model".

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_catalogue.py
  python benchmarks/scale_catalogue.py --config configs/scale.py:onerec

The users and items are built in memory by benchmarks/scale_catalogue.py (`scale.*` below):
data/synthetic.py writes CSV files and keeps a per-user bitmap of the whole catalogue, too costly
at this size. Training uses the sampled softmax (a full softmax over 10M items per position is
~2,000x the work); evaluation still ranks every item, each device its shard of the table.
"""

import ml_collections

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.parallel.sharding import DEFAULT_RULES


def get_config(arg: str | None = None):
    """`arg`: sasrec (default) or onerec (the item head, ids only)."""
    if arg not in (None, "", "sasrec", "onerec"):
        raise ValueError(f"configs/scale.py variant {arg!r}: use sasrec or onerec")
    c = base_config()
    c.scale = s = ml_collections.ConfigDict()
    s.n_items = 10_000_000  # items in the synthetic catalogue (the table has n_items + 1 rows)
    s.n_users = 4_096  # training users; lognormal lengths (median 40), items uniform
    s.eval_users = 512  # users ranked against the whole catalogue
    c.model.dim = 32  # 10M x 32 float32 = 1.28 GB per copy of the table (param + 2 Adam moments)
    c.model.mlp_dim = 32
    c.model.dropout = 0.1
    c.model.side_features = ()  # ids only: no item file
    c.data.max_len = 50
    c.data.bucket_boundaries = ()  # one [batch, max_len] shape: one compilation
    c.loss.name = "sampled_softmax"
    c.loss.n_negatives = 1024  # shared uniform negatives per step
    c.loss.in_batch_negatives = 1024
    c.train.batch_size = 64
    c.train.num_steps = 1_000  # only shapes the learning-rate schedule of the benchmark
    c.eval.batch_size = 256
    c.eval.chunk_size = 65_536  # items scored at a time on each device
    c.mesh.shape = (1, 1, 8)  # (data, fsdp, model): the "vocab" rule splits tables 8 ways
    # Only the item tables are worth splitting: one 32-wide head and MLP stay whole on each device.
    c.mesh.rules = tuple((n, None if n in ("heads", "mlp") else a) for n, a in DEFAULT_RULES)
    c = apply_variant(c, arg)
    if arg == "onerec":
        c.model.side_features = ()  # apply_variant keeps them; there are none here
    return c
