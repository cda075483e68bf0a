"""A 10,000,000-item synthetic catalogue on 8 devices: the item table split over "model".

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scale_catalogue.py
  python benchmarks/scale_catalogue.py --config configs/scale.py:onerec

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m onerec_jax.main \
      --config configs/scale.py --workdir runs/scale --config.train.num_steps=20

The users are built in memory (`scale.*` below; `data.synthetic="uniform"`,
data/synthetic_uniform.py: ML-25M-like lengths, uniform items): data/synthetic.py writes CSV
files and keeps a per-user bitmap of the whole catalogue, too costly at this size. Through main,
validation ranks a sample of `scale.eval_users` users and the test every user (34.8 s per 256
users on 2 CPU cores at 10M items, BENCHMARKS.md: about 9 minutes for 4,096). Training uses
the sampled softmax (a full softmax over 10M items per position is ~2,000x the work);
evaluation still ranks every item, each device its shard of the table.
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
    # `python -m onerec_jax.main --config configs/scale.py` reads the same users, in memory
    c.data.synthetic = "uniform"
    c.data.synthetic_users = s.get_ref("n_users")
    c.data.synthetic_items = s.get_ref("n_items")
    c.eval.valid_users = s.get_ref("eval_users")  # validation on a sample; test: every user
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
