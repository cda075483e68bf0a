"""The train state, the pure train step, and the record of the loop's progress.

`TrainState` holds the arrays one step changes; `train_step` is a pure function of it (jitted by
`training/train.py` with the state's shardings and the state donated). `LoopRecord` is what the
loop knows beyond the arrays (best validation so far, patience, seconds, history); checkpoints
store it as the plain `meta` dict of `to_meta`, which runs saved before this record existed also
wrote, so they resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any
Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """The arrays of a training run at one step."""

    params: PyTree  # the model's parameters (boxed with logical axis names until unboxed)
    opt_state: PyTree  # the optimizer's state for `params`
    step: jax.Array  # int32 scalar: train steps taken (micro-steps under gradient accumulation)


def init_state(
    rng: jax.Array, batch: Batch, *, init_fn: Callable, tx: optax.GradientTransformation
) -> TrainState:
    """Step 0: `init_fn(rng, batch)` params (as the model boxes them) and their optimizer state."""
    params = init_fn(rng, batch)
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0))


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    learning_rate_fn: Callable,
    accumulate_steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch`: (next state, metrics of this step).

    Args:
      state: the state before the step (donated by the jitted caller).
      batch: a global training batch (its arrays sharded over the batch axes).
      rng: the run's key; the step's own is `fold_in(rng, state.step)` (dropout, negatives).
      loss_fn: the model's `loss(params, batch, rng) -> (scalar, metrics)`.
      tx: the optimizer (gradient accumulation, if any, inside it).
      learning_rate_fn: the schedule, of optimizer updates; logged as "lr".
      accumulate_steps: train steps per optimizer update.

    Returns:
      The next state and the model's metrics plus "grad_norm" and "lr".
    """
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **metrics,
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate_fn(state.step // accumulate_steps),
    }
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


@dataclasses.dataclass
class LoopRecord:
    """The loop's progress that is not arrays: saved with every checkpoint as `meta`."""

    best: float = -math.inf  # best validation score so far
    best_step: int | None = None  # the step that scored it
    bad_evals: int = 0  # validations since the last improvement (early stopping at patience)
    train_seconds: float = 0.0  # wall seconds in train steps (validation excluded)
    eval_seconds: float = 0.0  # wall seconds in validation
    # one [step, train_seconds, score, cpu_seconds] per validation
    history: list[list[float]] = dataclasses.field(default_factory=list)
    cpu_seconds: float | None = None  # process CPU seconds up to the last validation
    best_cpu_seconds: float | None = None  # ... up to the validation of `best_step`
    best_val: dict[str, float] | None = None  # the validation metrics of `best_step`

    def record_validation(
        self, step: int, score: float, val: dict, cpu_now: float, cpu_mark: float
    ) -> None:
        """Counts a validation at `step` scoring `score` (`val`: its metrics, which took
        `val["seconds"]`); the process CPU clock read `cpu_mark` at the last one, `cpu_now` now."""
        self.eval_seconds += val["seconds"]
        self.cpu_seconds = (self.cpu_seconds or 0.0) + cpu_now - cpu_mark
        if score > self.best:
            self.best, self.best_step, self.bad_evals, self.best_val = score, step, 0, val
            self.best_cpu_seconds = self.cpu_seconds
        else:
            self.bad_evals += 1
        self.history.append([step, self.train_seconds, score, self.cpu_seconds])

    def to_meta(self) -> dict[str, Any]:
        """The checkpoint's `meta` dict; the optional fields only once set, as runs always wrote."""
        meta = dataclasses.asdict(self)
        for name in ("cpu_seconds", "best_cpu_seconds", "best_val"):
            if meta[name] is None:
                del meta[name]
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> LoopRecord:
        """The record a checkpoint's `meta` saved (keys it lacks keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})
