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
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from onerec_jax.data import dataset
from onerec_jax.errors import UserError
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.parallel import sharding
from onerec_jax.training import checkpointing
from onerec_jax.training.logger import MetricLogger
from onerec_jax.training.setup import (  # noqa: F401  re-exported: train.make_setup etc.
    TrainSetup,
    _count_params,
    _unbox,
    abstract_params,
    build_model,
    data_info,
    initial_state,
    make_mesh,
    make_setup,
    train_batches,
)
from onerec_jax.training.state import LoopRecord, TrainState

SELECT_METRIC = "val/ndcg@10"


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the message says what to change."""


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, init_params=None
) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns results.json.

    `init_params(setup)`: the params to start from instead of a random initialisation (host
    arrays of the model's param tree; `--mode update`), when `workdir` holds no checkpoint."""
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
        selector = selection_evaluator(setup.model, data, config, mesh, rules)  # or None
        ckpt = checkpointing.Checkpointer(workdir / "checkpoints", metric=SELECT_METRIC)
        logger = MetricLogger(workdir, enabled=is_main)
        data_iter = iter(train_batches(setup, config.seed))
        state, record = _start(setup, ckpt, data_iter, workdir, init_params)
        pop_val = popularity_validation(setup, mesh, rules)
        steps, stopped_early = _train_loop(
            setup, state, record, data_iter, selector or evaluator, ckpt, logger, pop_val
        )
        results = _finish(
            setup,
            record,
            evaluator,
            ckpt,
            logger,
            workdir,
            steps,
            stopped_early,
            pop_val,
            selected_by=selector,
        )
    logger.close()
    ckpt.close()
    return results


def selection_evaluator(model, data, config: ml_collections.ConfigDict, mesh, rules):
    """The evaluator of eval.select_evaluator (validation during training), or None when it is
    empty or names eval.evaluator's own ranking."""
    name = config.eval.get("select_evaluator", "")
    if not name or name == (config.eval.get("evaluator", "") or model.evaluator):
        return None
    sc = config.copy_and_resolve_references()
    with sc.unlocked():
        sc.eval.evaluator = name
    return make_evaluator(model, data, sc, mesh, rules)


def popularity_validation(setup: TrainSetup, mesh, rules) -> float | None:
    """Validation NDCG@10 of popularity (models/pop.py) on this run's data and evaluation
    settings: the level below which a run has not started learning (`patience` then waits
    `train.patience_below_popularity` validations). None when that is off or nothing is trained."""
    c = setup.config
    if int(c.train.get("patience_below_popularity", 0)) <= 0 or not setup.model.trainable:
        return None
    from onerec_jax.models import pop  # noqa: PLC0415  (only runs that use it pay the import)

    pc = c.copy_and_resolve_references()
    with pc.unlocked():
        pc.model.pop_content = False
        pc.eval.evaluator = ""  # popularity's own: a full ranking of the catalogue
    model = pop.build(pc, setup.info)
    inputs = jnp.zeros((2, int(c.data.max_len)), jnp.int32)
    params = _unbox(model.init(jax.random.key(0), {"inputs": inputs}))
    val, _ = make_evaluator(model, setup.data, pc, mesh, rules).evaluate(params, "valid")
    logging.info("popularity's validation NDCG@10: %.4f", val["ndcg@10"])
    return float(val["ndcg@10"])


def stop_patience(c: ml_collections.ConfigDict, best: float, pop_val: float | None) -> int:
    """The validations without improvement that stop a run whose best validation is `best`:
    `train.patience`, or the larger `train.patience_below_popularity` while `best` has not beaten
    popularity's `pop_val` (None: no such check)."""
    patience = int(c.train.patience)
    if pop_val is None or best > pop_val:
        return patience
    return max(patience, int(c.train.get("patience_below_popularity", 0)))


def _start(
    setup: TrainSetup, ckpt, data_iter, workdir: Path, init_params=None
) -> tuple[TrainState, LoopRecord]:
    """(state, record) at step 0 (params from `init_params(setup)` when given), or at the latest
    checkpoint (`data_iter` then set to it)."""
    latest = ckpt.latest_step()
    if latest is None:
        state = initial_state(setup, setup.config.seed)
        if init_params is not None:  # the optimizer's fresh state depends on shapes only
            params = jax.device_put(init_params(setup), setup.state_sharding.params)
            state = TrainState(params=params, opt_state=state.opt_state, step=state.step)
        return state, LoopRecord()
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
    setup: TrainSetup,
    state: TrainState,
    record: LoopRecord,
    data_iter,
    evaluator,
    ckpt,
    logger,
    pop_val: float | None = None,
) -> tuple[int, bool]:
    """Trains `state` up to `total_steps` or early stopping, validating and checkpointing every
    `eval_every` steps (`record` follows); returns (steps taken in all, stopped early).
    `pop_val`: popularity's validation NDCG@10 (`stop_patience`)."""
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
        patience = stop_patience(c, record.best, pop_val)
        return bool(record.history) and record.bad_evals >= patience and step >= min_steps

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
    pop_val: float | None = None,
    selected_by=None,
) -> dict:
    """Tests the best validated checkpoint once; writes and returns results.json. With
    `selected_by` (the evaluator that validated during training), that checkpoint is validated
    again by `evaluator`, whose numbers are the results' "val"; the selecting ranking's are
    "select_val"."""
    ckpt.wait()
    best_step = ckpt.best_step()
    if best_step is None:
        raise TrainingError(f"{workdir}: no validated checkpoint to test; train longer.")
    params = ckpt.restore_params(best_step, setup.abstract_state.params)
    test, _ = evaluator.evaluate(params, "test")
    if record.best_step == best_step and record.best_val is not None:
        best_val = record.best_val  # recorded when that checkpoint was validated
    else:  # e.g. Orbax kept another step of equal score
        best_val, _ = (selected_by or evaluator).evaluate(params, "valid")
    select_val = None
    if selected_by is not None:
        select_val, best_val = best_val, evaluator.evaluate(params, "valid")[0]
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
        # popularity's validation NDCG@10 (train.patience_below_popularity), null when not computed
        "popularity_val_ndcg@10": pop_val,
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
    if select_val is not None:  # eval.select_evaluator's validation of the kept checkpoint
        results["protocol"]["selected_by"] = selected_by.protocol
        results["select_val"] = select_val
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
