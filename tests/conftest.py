"""Shared pytest setup: 8 fake CPU devices for sharding tests, absl flags parsed for Grain."""

import sys

import jax
from absl import flags

# Must run before the first JAX operation (JAX_GUIDE.md): tests can then build meshes of 1, 2, 4
# or 8 devices. Ordinary single-device code still runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

# Grain's worker processes read absl flags; outside app.run they must be parsed once.
if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
