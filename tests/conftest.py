"""Shared pytest setup: 8 fake CPU devices for sharding tests, absl flags parsed for Grain."""

import sys

import flax.linen as nn
import jax
import pytest
from absl import flags

# Must run before the first JAX operation (JAX_GUIDE.md): tests can then build meshes of 1, 2, 4
# or 8 devices. Ordinary single-device code still runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

# Grain's worker processes read absl flags; outside app.run they must be parsed once.
if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


@pytest.fixture(autouse=True)
def _no_global_mesh_leaks():
    """`runs.restore_best` sets a global mesh and logical-axis rules; later tests must not inherit
    them (a module applied outside a run would then constrain its batch to the 8-device mesh)."""
    rules = nn.get_logical_axis_rules()
    yield
    if nn.get_logical_axis_rules() != rules or not jax.sharding.get_abstract_mesh().empty:
        jax.set_mesh(None)
        nn.set_logical_axis_rules(rules)
        jax.clear_caches()  # rules are not part of jit's cache key (JAX_GUIDE.md)
