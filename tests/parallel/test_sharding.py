"""Mesh shapes and logical sharding rules (parallel/sharding.py)."""

import jax
import numpy as np
import pytest

from onerec_jax.errors import ConfigError
from onerec_jax.parallel import sharding


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    for bad, msg in [
        ((3, -1, 1), "does not divide"),
        ((2, 2, 1), "uses 4 devices"),
        ((-1, -1, 1), "at most one -1"),
        ((8, 1), "one size per axis"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            sharding.mesh_shape(bad, 8)


def test_logical_rules_shard_tables_and_batches():
    mesh = sharding.make_mesh((2, 2, 2), jax.devices()[:8])
    rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
    spec = sharding.batch_sharding(mesh, rules, ndim=2).spec
    assert tuple(spec) == (("data", "fsdp"), None)
    x = sharding.global_batch({"x": np.arange(16).reshape(8, 2)}, mesh, rules)["x"]
    assert x.shape == (8, 2) and len(x.addressable_shards) == 8
    assert x.addressable_shards[0].data.shape == (2, 2)  # 8 rows over data x fsdp = 4
