"""`train_and_evaluate(config, workdir)`: the sharded train loop, validation, early stopping, test.

One jitted step with donated state over the config's mesh; validation NDCG@10 every
`train.eval_every_steps` (default: once an epoch) picks the checkpoint; test is computed once, on
the best checkpoint. A run killed at any moment and restarted with the same command continues
from its last checkpoint and produces the same later losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
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

from onerec_jax.data import dataset, item_arrays, pipeline
from onerec_jax.errors import ConfigError, UserError
from onerec_jax.evaluation.evaluator import Evaluator
from onerec_jax.models import optim, registry
from onerec_jax.models.base import DataInfo
from onerec_jax.parallel import sharding
from onerec_jax.tokenize.semantic_ids import load_semantic_ids
from onerec_jax.training import checkpointing
from onerec_jax.training.logger import MetricLogger

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


def setup_model(config: ml_collections.ConfigDict, data, items):
    """(mesh, rules, DataInfo, model) of `config` on `data`; sets the global mesh and rules."""
    c = config
    if c.mesh.num_devices and jax.process_count() > 1:  # a prefix leaves processes out
        raise ConfigError(
            f"mesh.num_devices={c.mesh.num_devices} in a run of {jax.process_count()} "
            "processes: leave it 0 (every device); size the mesh with mesh.shape."
        )
    devices = jax.devices()[: c.mesh.num_devices] if c.mesh.num_devices else None
    mesh = sharding.make_mesh(c.mesh.shape, devices)
    rules = sharding.rules_from_config(c.mesh.rules)
    jax.set_mesh(mesh)
    nn.set_logical_axis_rules(rules)  # global, before any trace (JAX_GUIDE.md)
    info = data_info(data, items, c.data.max_len, c.model.semantic_ids)
    return mesh, rules, info, registry.build_model(c, info)


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


class Trainer:
    """Holds the jitted step, the state and its shardings for one config."""

    def __init__(self, config: ml_collections.ConfigDict, data, items):
        self.config, self.data = config, data
        c = config
        self.mesh, self.rules, self.info, self.model = setup_model(c, data, items)
        self.spec = registry.model_spec(c)
        self.code_windows = self.spec.batches == registry.CODE_WINDOWS  # + the targets' codes
        self.per_target = self.code_windows and not c.model.encoder_causal
        if self.per_target:  # a bidirectional encoder: one example per training target
            examples = pipeline.target_examples(
                data, max_len=c.data.max_len, session_items=c.model.session_items
            )
        else:
            examples = pipeline.training_windows(data, max_len=c.data.max_len, **_windows(c))
        self.steps_per_epoch = max(len(examples) // c.train.batch_size, 1)
        self.total_steps = c.train.num_steps or c.train.num_epochs * self.steps_per_epoch
        updates = max(self.total_steps // c.optim.accumulate_steps, 1)
        self.tx, self.schedule = optim.make_optimizer(c.optim, updates)
        if not self.model.trainable:  # e.g. popularity: one step that changes nothing, then test
            self.total_steps, self.tx = 1, optax.set_to_zero()
        self.eval_every = c.train.eval_every_steps or self.steps_per_epoch

        dummy = _init_batch(c)

        def init_fn(rng):
            params = self.model.init(rng, dummy)
            return {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0)}

        self._init_fn = init_fn
        self.abstract_state, self.state_sharding = _abstract(init_fn, self.mesh, self.rules)
        self.train_step = jax.jit(
            self._train_step, out_shardings=(self.state_sharding, None), donate_argnums=0
        )

    def init_state(self, seed: int):
        init = jax.jit(lambda rng: _unbox(self._init_fn(rng)), out_shardings=self.state_sharding)
        return init(jax.random.key(seed))

    def _train_step(self, state, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        grad_fn = jax.value_and_grad(self.model.loss, has_aux=True)
        (loss, metrics), grads = grad_fn(state["params"], batch, rng)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.schedule(state["step"] // self.config.optim.accumulate_steps),
        }
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def batches(self, seed: int):
        c = self.config
        if self.code_windows:
            return pipeline.generative_train_dataset(
                self.data,
                self.info.semantic_ids.codes,
                max_len=c.data.max_len,
                batch_size=c.train.batch_size,
                seed=seed,
                session_items=c.model.session_items,
                per_target=self.per_target,
                **_windows(c),
                bucket_boundaries=tuple(c.data.bucket_boundaries) or None,
                worker_count=c.data.worker_count,
            )
        return pipeline.train_dataset(
            self.data,
            max_len=c.data.max_len,
            batch_size=c.train.batch_size,
            seed=seed,
            **_windows(c),
            bucket_boundaries=tuple(c.data.bucket_boundaries) or None,
            worker_count=c.data.worker_count,
        )


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
    trainer = Trainer(config, data, items)
    evaluator = Evaluator(trainer.model, data, config, trainer.mesh, trainer.rules)
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", metric=SELECT_METRIC)
    data_iter = iter(trainer.batches(config.seed))
    rng = jax.random.key(config.seed)
    meta = {
        "best": -math.inf,
        "best_step": None,
        "bad_evals": 0,
        "train_seconds": 0.0,
        "eval_seconds": 0.0,
        "history": [],
    }
    latest = ckpt.latest_step()
    if latest is None:
        state = trainer.init_state(config.seed)
    else:
        abstract = trainer.abstract_state
        params, opt_state, meta = ckpt.restore(
            latest,
            abstract_params=abstract["params"],
            abstract_opt_state=abstract["opt_state"],
            data_iter=data_iter,
        )
        state = {
            "params": params,
            "opt_state": opt_state,
            "step": jax.device_put(jnp.int32(latest)),
        }
        logging.info("resumed from step %d in %s", latest, workdir)
    n_params = _count_params(state["params"])
    logger = MetricLogger(workdir, enabled=is_main)
    step = int(state["step"])
    progress = logger.progress(trainer.total_steps, step, enabled=config.train.progress and is_main)
    window = {"start": time.perf_counter(), "tokens": 0.0}
    cpu_mark = time.process_time()  # process CPU seconds (all threads): the cost BENCHMARKS reports
    stopped_early = meta["bad_evals"] >= config.train.patience  # a finished run stays finished
    while step < trainer.total_steps and not stopped_early:
        local = next(data_iter)
        window["tokens"] += float(local["mask"].sum()) * jax.process_count()  # host-side count
        batch = sharding.global_batch(local, trainer.mesh, trainer.rules)
        state, step_metrics = trainer.train_step(state, batch, rng)
        step += 1
        is_eval = step % trainer.eval_every == 0 or step == trainer.total_steps
        if step % config.train.log_every_steps == 0 or is_eval:
            host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            _check_finite(host, step, ckpt)
            elapsed = time.perf_counter() - window["start"]
            host["tokens_per_s"] = window["tokens"] / max(elapsed, 1e-9)
            meta["train_seconds"] += elapsed
            logger.write(step, {f"train/{k}": v for k, v in host.items()})
            progress.update(step, host["loss"], host["tokens_per_s"])
            window = {"start": time.perf_counter(), "tokens": 0.0}
        if is_eval:
            val, _ = evaluator.evaluate(state["params"], "valid")
            meta["eval_seconds"] += val["seconds"]
            meta["cpu_seconds"] = meta.get("cpu_seconds", 0.0) + time.process_time() - cpu_mark
            cpu_mark = time.process_time()
            score = val["ndcg@10"]
            improved = score > meta["best"]
            if improved:
                meta.update(best=score, best_step=step, bad_evals=0, best_val=val)
                meta["best_cpu_seconds"] = meta["cpu_seconds"]
            else:
                meta["bad_evals"] += 1
            meta["history"].append([step, meta["train_seconds"], score, meta["cpu_seconds"]])
            logger.write(step, {f"val/{k}": v for k, v in val.items() if "@" in k or k == "mrr"})
            ckpt.save(
                step,
                params=state["params"],
                opt_state=state["opt_state"],
                data_iter=data_iter,
                meta=meta,
                metrics={SELECT_METRIC: score},
            )
            stopped_early = meta["bad_evals"] >= config.train.patience
            window["start"] = time.perf_counter()
    progress.close()
    ckpt.wait()
    best_step = ckpt.best_step()
    if best_step is None:
        raise TrainingError(f"{workdir}: no validated checkpoint to test; train longer.")
    params = ckpt.restore_params(best_step, trainer.abstract_state["params"])
    test, _ = evaluator.evaluate(params, "test")
    if meta.get("best_step") == best_step and "best_val" in meta:
        best_val = meta["best_val"]  # recorded when that checkpoint was validated
    else:  # e.g. Orbax kept another step of equal score
        best_val, _ = evaluator.evaluate(params, "valid")
    results = {
        "model": config.model.name,
        "data": {
            **data.stats(),
            "source": config.data.path or config.data.synthetic or config.data.release,
        },
        "protocol": {
            "split": "leave-one-out",
            "mask_history": bool(config.eval.mask_history),
            "max_len": config.data.max_len,
            **data.options,
            "ranking": trainer.model.ranking,
        },
        "best_step": best_step,
        "steps": step,
        "stopped_early": stopped_early,
        "params": n_params,
        "train_seconds": meta["train_seconds"],
        "eval_seconds": meta["eval_seconds"] + test["seconds"],
        # process CPU seconds (every thread) of training and validation, in all and up to the
        # validation that selected the best checkpoint (compilation included)
        "cpu_seconds": meta.get("cpu_seconds"),
        "cpu_seconds_to_best": meta.get("best_cpu_seconds"),
        "history": meta["history"],
        "val": best_val,
        "test": test,
    }
    if is_main:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
        logger.write(best_step, {f"test/{k}": v for k, v in test.items() if "@" in k or k == "mrr"})
    logger.close()
    ckpt.close()
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
