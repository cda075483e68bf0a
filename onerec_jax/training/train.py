"""`train_and_evaluate(config, workdir)`: the sharded train loop, validation, early stopping, test.

It reads as set-up (`make_mesh`, `make_setup`, `_start`), loop (`_train_loop`) and finish
(`_finish`); the mesh and logical axis rules are in effect around all three. One jitted
`state.train_step` with donated state over the config's mesh; validation NDCG@10 every
`train.eval_every_steps` (default: once an epoch) picks the checkpoint; test is computed once, on
the best checkpoint. A run killed at any moment and restarted with the same command continues
from its last checkpoint and produces the same later losses as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onerec_jax.data import dataset, item_arrays, pipeline
from onerec_jax.errors import ConfigError, UserError
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.models import optim, registry
from onerec_jax.models.base import DataInfo
from onerec_jax.parallel import sharding
from onerec_jax.tokenize.semantic_ids import load_semantic_ids
from onerec_jax.training import checkpointing
from onerec_jax.training.logger import MetricLogger
from onerec_jax.training.state import LoopRecord, TrainState, init_state, train_step

SELECT_METRIC = "val/ndcg@10"


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to change."""


def data_info(data, items, max_len: int, semantic_ids: str = "") -> DataInfo:
    """What models may know about `data`; `semantic_ids`: a tokenize workdir or .npz to load."""
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
    )


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
    info = data_info(data, items, config.data.max_len, config.model.semantic_ids)
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
    return pipeline.train_dataset(data, **options)


def _windows(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The training-window options of `pipeline.training_windows` from `c.data`."""
    if c.data.windows not in ("all", "latest"):
        raise ConfigError(f"data.windows={c.data.windows!r}: use 'all' or 'latest'.")
    return {"stride": c.data.window_stride or None, "latest_only": c.data.windows == "latest"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns results.json."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    data, items = load_data(config)
    mesh, rules = make_mesh(config)
    with sharding.use_mesh(mesh, rules):
        setup = make_setup(config, data, items, mesh, rules)
        evaluator = make_evaluator(setup.model, data, config, mesh, rules)
        ckpt = checkpointing.Checkpointer(workdir / "checkpoints", metric=SELECT_METRIC)
        logger = MetricLogger(workdir, enabled=is_main)
        data_iter = iter(train_batches(setup, config.seed))
        state, record = _start(setup, ckpt, data_iter, workdir)
        steps, stopped_early = _train_loop(setup, state, record, data_iter, evaluator, ckpt, logger)
        results = _finish(setup, record, evaluator, ckpt, logger, workdir, steps, stopped_early)
    logger.close()
    ckpt.close()
    return results


def _start(setup: TrainSetup, ckpt, data_iter, workdir: Path) -> tuple[TrainState, LoopRecord]:
    """(state, record) at step 0, or at the latest checkpoint (`data_iter` then set to it)."""
    latest = ckpt.latest_step()
    if latest is None:
        return initial_state(setup, setup.config.seed), LoopRecord()
    params, opt_state, meta = ckpt.restore(
        latest,
        abstract_params=setup.abstract_state.params,
        abstract_opt_state=setup.abstract_state.opt_state,
        data_iter=data_iter,
    )
    step = jax.device_put(jnp.int32(latest))
    logging.info("resumed from step %d in %s", latest, workdir)
    return TrainState(params=params, opt_state=opt_state, step=step), LoopRecord.from_meta(meta)


@dataclasses.dataclass
class _Window:
    """Wall time and tokens since the last logged step: the train seconds and throughput."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: float = 0.0


def _train_loop(
    setup: TrainSetup, state: TrainState, record: LoopRecord, data_iter, evaluator, ckpt, logger
) -> tuple[int, bool]:
    """Trains `state` up to `total_steps` or early stopping, validating and checkpointing every
    `eval_every` steps (`record` follows); returns (steps taken in all, stopped early)."""
    c = setup.config
    rng = jax.random.key(c.seed)
    step = int(state.step)
    enabled = c.train.progress and jax.process_index() == 0
    progress = logger.progress(setup.total_steps, step, enabled=enabled)
    window = _Window()
    cpu_mark = time.process_time()  # process CPU seconds (all threads): the cost BENCHMARKS reports
    # Early stopping waits for train.min_epochs: validation is noise for the first epochs of
    # models that sit at popularity before they learn (the generative ones).
    min_steps = int(c.train.get("min_epochs", 0)) * setup.steps_per_epoch

    def should_stop(step: int) -> bool:  # (never before a first validation: patience 0 trains)
        return bool(record.history) and record.bad_evals >= c.train.patience and step >= min_steps

    stopped_early = should_stop(step)  # a finished run stays finished
    while step < setup.total_steps and not stopped_early:
        local = next(data_iter)
        window.tokens += float(local["mask"].sum()) * jax.process_count()  # host-side count
        batch = sharding.global_batch(local, setup.mesh, setup.rules)
        state, step_metrics = setup.train_step(state, batch, rng)
        step += 1
        is_eval = step % setup.eval_every == 0 or step == setup.total_steps
        if step % c.train.log_every_steps == 0 or is_eval:
            host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            _check_finite(host, step, ckpt)
            elapsed = time.perf_counter() - window.start
            host["tokens_per_s"] = window.tokens / max(elapsed, 1e-9)
            record.train_seconds += elapsed
            logger.write(step, {f"train/{k}": v for k, v in host.items()})
            progress.update(step, host["loss"], host["tokens_per_s"])
            window = _Window()
        if is_eval:
            val, _ = evaluator.evaluate(state.params, "valid")
            record.record_validation(step, val["ndcg@10"], val, time.process_time(), cpu_mark)
            cpu_mark = time.process_time()
            logger.write(
                step,
                {
                    f"val/{k}": v
                    for k, v in val.items()
                    if "@" in k or k == "mrr" or k.startswith("lists_")
                },
            )
            ckpt.save(
                step,
                params=state.params,
                opt_state=state.opt_state,
                data_iter=data_iter,
                # the data's sizes: a restore onto another mesh may then re-pad the tables
                meta={
                    **record.to_meta(),
                    "vocab_size": setup.info.vocab_size,
                    "n_users": setup.info.n_users,
                },
                metrics={SELECT_METRIC: val["ndcg@10"]},
            )
            stopped_early = should_stop(step)
            window.start = time.perf_counter()
    progress.close()
    return step, stopped_early


def _finish(
    setup: TrainSetup,
    record: LoopRecord,
    evaluator,
    ckpt,
    logger,
    workdir: Path,
    steps: int,
    stopped_early: bool,
) -> dict:
    """Tests the best validated checkpoint once; writes and returns results.json."""
    ckpt.wait()
    best_step = ckpt.best_step()
    if best_step is None:
        raise TrainingError(f"{workdir}: no validated checkpoint to test; train longer.")
    params = ckpt.restore_params(best_step, setup.abstract_state.params)
    test, _ = evaluator.evaluate(params, "test")
    if record.best_step == best_step and record.best_val is not None:
        best_val = record.best_val  # recorded when that checkpoint was validated
    else:  # e.g. Orbax kept another step of equal score
        best_val, _ = evaluator.evaluate(params, "valid")
    c, data = setup.config, setup.data
    results = {
        "model": c.model.name,
        "data": {**data.stats(), "source": c.data.path or c.data.synthetic or c.data.release},
        "protocol": {
            "split": "leave-one-out",
            "mask_history": bool(c.eval.mask_history),
            "max_len": c.data.max_len,
            **data.options,
            "ranking": evaluator.protocol,
        },
        "best_step": best_step,
        "steps": steps,
        "stopped_early": stopped_early,
        "params": _count_params(params),
        "train_seconds": record.train_seconds,
        "eval_seconds": record.eval_seconds + test["seconds"],
        # process CPU seconds (every thread) of training and validation, in all and up to the
        # validation that selected the best checkpoint (compilation included)
        "cpu_seconds": record.cpu_seconds,
        "cpu_seconds_to_best": record.best_cpu_seconds,
        "history": record.history,
        "val": best_val,
        "test": test,
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
        logger.write(best_step, {f"test/{k}": v for k, v in test.items() if "@" in k or k == "mrr"})
    return results


def load_data(config: ml_collections.ConfigDict):
    """`dataset.load_data(config.data)`, on process 0 first: it downloads, generates or caches the
    files once, then the other processes read them (instead of all writing them at once)."""
    if jax.process_count() == 1:
        return dataset.load_data(config.data)
    if jax.process_index() == 0:
        out = dataset.load_data(config.data)
    multihost_utils.sync_global_devices("data ready")
    if jax.process_index() != 0:
        out = dataset.load_data(config.data)
    return out


def _check_finite(host: dict[str, float], step: int, ckpt) -> None:
    if not math.isfinite(host["loss"]):
        ckpt.wait()
        last = ckpt.latest_step()
        kept = f"The last good checkpoint (step {last}) is kept" if last else "No checkpoint yet"
        raise TrainingError(
            f"non-finite loss ({host['loss']}) at step {step} (grad norm {host['grad_norm']:.3g}, "
            f"learning rate {host['lr']:.3g}). {kept}; lower optim.learning_rate, keep "
            "optim.clip_norm > 0 or use train.compute_dtype=float32, then rerun."
        )
