"""What a run is built from, before its loop: the mesh (`make_mesh`), the data's sizes
(`data_info`), the model, its abstract and initial state and the jitted train step
(`make_setup` -> `TrainSetup`), and the training batches (`train_batches`).

`training/train.py` runs the loop over a `TrainSetup`; benchmarks and `runs.py` build one (or
parts of one) without training.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onerec_jax.data import features as item_features
from onerec_jax.data import item_arrays, item_vectors, pipeline
from onerec_jax.errors import ConfigError
from onerec_jax.models import optim, registry
from onerec_jax.models.base import DataInfo
from onerec_jax.parallel import sharding
from onerec_jax.tokenize.semantic_ids import load_semantic_ids
from onerec_jax.training.state import TrainState, init_state, train_step


def data_info(data, items, max_len: int, semantic_ids: str = "", vectors=None) -> DataInfo:
    """What models may know about `data`; `semantic_ids`: a tokenize workdir or .npz to load;
    `vectors`: the config's `features` section, to load its own item vectors from."""
    genres = years = codes = sem = None
    sizes = ()
    if items is not None and len(items):
        genres, _ = item_arrays.genre_multi_hot(data, items)
        years = item_arrays.year_buckets(data, items)
    if semantic_ids:
        sem = load_semantic_ids(semantic_ids, data.n_items)
        codes = np.maximum(sem.codes[:, : sem.levels], 0)  # padding row -> code 0 (masked)
        sizes = sem.codebook_sizes[: sem.levels]
    return DataInfo(
        n_items=data.n_items,
        max_len=max_len,
        item_counts=item_arrays.train_counts(data),
        item_genres=genres,
        item_year_bucket=years,
        item_codes=codes,
        code_sizes=tuple(int(s) for s in sizes),
        n_users=data.n_users,
        semantic_ids=sem,
        item_vectors=None if vectors is None else own_vectors(vectors, data),
        rating_mean=_train_rating_mean(data),
    )


def _train_rating_mean(data) -> float:
    """Mean rating of the training interactions (0 without ratings)."""
    mask = data.train_mask()
    return float(data.ratings[mask].mean()) if mask.any() and data.has_ratings else 0.0


def own_vectors(features: ml_collections.ConfigDict, data) -> np.ndarray:
    """[V, d] float32: `features.vectors_path`'s item vectors (data/item_vectors.py), each column
    standardised and the block scaled to a mean squared row norm of 1 (as a feature block)."""
    block = item_features.standardised(item_vectors.vectors_block(features, data))
    out = np.zeros((data.n_items + 1, block.shape[1]), np.float32)
    out[1:] = block
    return out


def _unbox(tree):
    """Logically partitioned boxes -> their values (no sharding constraint applied)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def _count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def make_mesh(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, tuple]:
    """(mesh, logical axis rules) of `config.mesh`; the caller puts them in effect
    (`sharding.use_mesh`) before building or tracing anything."""
    c = config
    if c.mesh.num_devices and jax.process_count() > 1:  # a prefix leaves processes out
        raise ConfigError(
            f"mesh.num_devices={c.mesh.num_devices} in a run of {jax.process_count()} "
            "processes: leave it 0 (every device); size the mesh with mesh.shape."
        )
    devices = jax.devices()[: c.mesh.num_devices] if c.mesh.num_devices else None
    return sharding.make_mesh(c.mesh.shape, devices), sharding.rules_from_config(c.mesh.rules)


def build_model(config: ml_collections.ConfigDict, data, items) -> tuple[DataInfo, Any]:
    """(DataInfo, model object) of `config` on `data`."""
    wants_vectors = "vectors" in tuple(config.model.get("side_features", ()))
    info = data_info(
        data,
        items,
        config.data.max_len,
        config.model.semantic_ids,
        vectors=config.features if wants_vectors else None,
    )
    return info, registry.build_model(config, info)


def _init_batch(c: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Zeros shaped as this process's rows of a training batch: what `model.init` traces."""
    local = c.train.batch_size // jax.process_count()
    return {
        "inputs": jnp.zeros((local, c.data.max_len), jnp.int32),
        "user": jnp.zeros((local,), jnp.int32),
    }


def _abstract(init_fn, mesh: jax.sharding.Mesh, rules):
    """(abstract tree with shardings, its shardings) of what `init_fn(rng)` returns."""
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = _unbox(sharding.state_shardings(abstract, mesh, rules))
    tree = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), _unbox(abstract), shardings
    )
    return tree, shardings


def abstract_params(config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh, rules):
    """The params of `model` as abstract arrays laid out as in training (no optimizer state):
    what a checkpoint's params restore onto."""
    batch = _init_batch(config)
    return _abstract(lambda rng: model.init(rng, batch), mesh, rules)[0]


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What the loop needs, built once from the config (`make_setup`); holds no device state."""

    config: ml_collections.ConfigDict
    data: Any  # SequenceData
    mesh: jax.sharding.Mesh
    rules: tuple
    info: DataInfo
    model: Any  # the model object of models/ (init, loss, ...)
    steps_per_epoch: int
    total_steps: int  # train steps of the whole run
    eval_every: int  # train steps between validations
    init_fn: Callable  # rng -> TrainState at step 0 (params boxed)
    abstract_state: TrainState  # ShapeDtypeStructs with their shardings: what a checkpoint restores
    state_sharding: TrainState  # the state's NamedShardings
    train_step: Callable  # jitted (state, batch, rng) -> (state, metrics); the state is donated


def _batch_kind(c: ml_collections.ConfigDict) -> tuple[bool, bool]:
    """(code windows: batches carry the targets' codes, per target: one example per target)."""
    code_windows = registry.model_spec(c).batches == registry.CODE_WINDOWS
    return code_windows, code_windows and not c.model.encoder_causal  # per target: bidirectional


def make_setup(
    config: ml_collections.ConfigDict, data, items, mesh: jax.sharding.Mesh, rules
) -> TrainSetup:
    """The model, optimizer, schedule and jitted step of `config` on `data` over `mesh`; call it
    with `mesh` and `rules` in effect (`sharding.use_mesh`)."""
    c = config
    info, model = build_model(c, data, items)
    if c.model.get("rating_weight", 0.0) > 0 and not data.has_ratings:
        raise ConfigError(
            f"model.rating_weight={c.model.rating_weight}: this data has no ratings (its layout "
            "stores none, or one value everywhere); the rating head needs them. Set it to 0."
        )
    if c.model.get("rating_weight", 0.0) > 0 and not getattr(model, "has_rating_head", False):
        raise ConfigError(
            f"model.rating_weight: model {c.model.name!r} has no rating head (sasrec and onerec "
            "have one)."
        )
    if _batch_kind(c)[1]:
        examples = pipeline.target_examples(
            data, max_len=c.data.max_len, session_items=c.model.session_items
        )
    else:
        examples = pipeline.training_windows(data, max_len=c.data.max_len, **_windows(c))
    steps_per_epoch = max(len(examples) // c.train.batch_size, 1)
    total_steps = c.train.num_steps or c.train.num_epochs * steps_per_epoch
    updates = max(total_steps // c.optim.accumulate_steps, 1)
    tx, schedule = optim.make_optimizer(c.optim, updates)
    if not model.trainable:  # e.g. popularity: one step that changes nothing, then test
        total_steps, tx = 1, optax.set_to_zero()
    init_fn = functools.partial(init_state, batch=_init_batch(c), init_fn=model.init, tx=tx)
    abstract_state, state_sharding = _abstract(init_fn, mesh, rules)

    def step_fn(state, batch, rng, constants):  # the model's big arrays are arguments
        return train_step(
            state,
            batch,
            rng,
            loss_fn=model.with_constants(constants).loss,
            tx=tx,
            learning_rate_fn=schedule,
            accumulate_steps=c.optim.accumulate_steps,
        )

    jitted = jax.jit(step_fn, out_shardings=(state_sharding, None), donate_argnums=0)
    return TrainSetup(
        config=c,
        data=data,
        mesh=mesh,
        rules=rules,
        info=info,
        model=model,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        eval_every=c.train.eval_every_steps or steps_per_epoch,
        init_fn=init_fn,
        abstract_state=abstract_state,
        state_sharding=state_sharding,
        # replicated over the mesh (every process passes the same values)
        train_step=BoundStep(jitted, jax.device_put(model.constants(), NamedSharding(mesh, P()))),
    )


@dataclasses.dataclass(frozen=True)
class BoundStep:
    """The jitted `(state, batch, rng, constants)` step with the model's constants bound:
    called as `(state, batch, rng)`; `compile` compiles it ahead of time (benchmarks)."""

    jitted: Callable
    constants: dict

    def __call__(self, state, batch, rng):
        return self.jitted(state, batch, rng, self.constants)

    def compile(self, state, batch, rng) -> CompiledStep:
        return CompiledStep(self.jitted.lower(state, batch, rng, self.constants).compile(), self)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """An ahead-of-time compiled `BoundStep`: called as `(state, batch, rng)`; the compiled
    executable's own methods (`memory_analysis`, `as_text`, ...) pass through."""

    compiled: Any
    bound: BoundStep

    def __call__(self, state, batch, rng):
        return self.compiled(state, batch, rng, self.bound.constants)

    def __getattr__(self, name):
        return getattr(self.compiled, name)


def initial_state(setup: TrainSetup, seed: int) -> TrainState:
    """The state at step 0, laid out over the mesh."""
    init = jax.jit(lambda rng: _unbox(setup.init_fn(rng)), out_shardings=setup.state_sharding)
    return init(jax.random.key(seed))


def train_batches(setup: TrainSetup, seed: int):
    """This process's training batches (a Grain dataset; its iterator state is checkpointed)."""
    c, data = setup.config, setup.data
    code_windows, per_target = _batch_kind(c)
    options = {
        "max_len": c.data.max_len,
        "batch_size": c.train.batch_size,
        "seed": seed,
        **_windows(c),
        "bucket_boundaries": tuple(c.data.bucket_boundaries) or None,
        "worker_count": c.data.worker_count,
    }
    if code_windows:
        codes = setup.info.semantic_ids.codes
        return pipeline.generative_train_dataset(
            data, codes, session_items=c.model.session_items, per_target=per_target, **options
        )
    rated = bool(getattr(setup.model, "has_rating_head", False))
    return pipeline.train_dataset(data, with_ratings=rated, **options)


def _windows(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The training-window options of `pipeline.training_windows` from `c.data`."""
    if c.data.windows not in ("all", "latest"):
        raise ConfigError(f"data.windows={c.data.windows!r}: use 'all' or 'latest'.")
    return {"stride": c.data.window_stride or None, "latest_only": c.data.windows == "latest"}
