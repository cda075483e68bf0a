"""Shared pytest setup: 8 fake CPU devices for sharding tests, absl flags parsed for Grain, a
compilation cache shared by the suite's processes, and the number of xdist workers."""

import os
import sys
import tempfile

# The suite compiles the same tiny programs many times (tests clear jit's caches, subprocesses
# start cold): JAX's persistent compilation cache, shared by pytest-xdist's workers and every
# subprocess they start (they inherit these variables), saves ~20% of the suite's CPU time. Set
# before jax is imported; a variable already set wins.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "onerec_jax_test_jit_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Tiny programs: LLVM's optimisation passes cost more than they save (~10% of the suite's CPU
# time). HLO-level optimisation, and so FLOP counts and float semantics, are unchanged.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    flags_ = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags_.strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Must run before the first JAX operation (JAX_GUIDE.md): tests can then build meshes of 1, 2, 4
# or 8 devices. Ordinary single-device code still runs on device 0.
jax.config.update("jax_num_cpu_devices", 8)

# Grain's worker processes read absl flags; outside app.run they must be parsed once.
if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one worker per core, at most 4 (each holds a JAX runtime of
    1-3 GB; the suite's longest tests, not the worker count, set its time beyond that)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


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
