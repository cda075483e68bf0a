"""Device mesh from the config, logical-axis rules, and shardings for the train state and batches.

Model code names logical axes ("batch", "vocab", "embed", "mlp", "heads", "kv", "length");
`config.mesh.rules` maps them to mesh axes ("data", "fsdp", "model"). The same code runs on one
device, on 8 fake CPU devices and on many hosts: only the mesh shape changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from onerec_jax.errors import ConfigError

AXES = ("data", "fsdp", "model")
# Default logical -> mesh rules: data parallel over ("data", "fsdp"); item tables and wide
# feed-forward/attention dims over "model"; embeddings' feature dim over "fsdp".
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("expert", "model"),  # before "mlp": Flax gives a mesh axis to the first matching rule
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("length", None),
)


def mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """`shape` with its one -1 filled so that the product is `n_devices`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(AXES):
        raise ConfigError(f"mesh.shape={shape} needs one size per axis {AXES}, e.g. (-1, 1, 1).")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape={shape}: sizes are positive, with at most one -1.")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh.shape={shape} does not divide the {n_devices} devices.")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != n_devices:
        raise ConfigError(
            f"mesh.shape={shape} uses {int(np.prod(shape))} devices but {n_devices} are present; "
            "use -1 for one axis to fill it from the device count."
        )
    return shape


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A mesh over all (or the given) devices with Auto axis types (see JAX_GUIDE.md)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(shape, len(devices))
    mesh = jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    assert mesh.size == len(devices)  # make_mesh silently uses fewer devices on a bad shape
    return mesh


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Config rules (lists from JSON/ConfigDict) as the tuple-of-pairs Flax expects."""
    out = []
    for name, axes in rules:
        out.append((name, tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules) -> Iterator[None]:
    """`mesh` and the logical axis `rules` in effect inside the block, as they were after it.

    Enter it before anything is traced: the rules are not part of jit's cache key (JAX_GUIDE.md).
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for a (boxed) state tree from its logical axis names; others replicated."""
    specs = nn.get_partition_spec(abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh, rules, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dim over the mesh axes the "batch" rule names; other dims replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, P(*spec))


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules) -> dict:
    """This process's rows of a batch -> global jax.Arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
        for k, v in local.items()
    }
