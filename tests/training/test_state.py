"""The train state and step against hand-worked numbers; the loop record against saved meta."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onerec_jax.training.state import LoopRecord, TrainState, init_state, train_step


def _loss(params, batch, rng):
    """sum((w x - y)^2), and a draw of the step's key (to check which key the step passes)."""
    err = params["w"] * batch["x"] - batch["y"]
    return jnp.sum(err**2), {"loss": jnp.sum(err**2), "draw": jax.random.uniform(rng)}


def test_train_step_is_one_sgd_step_with_the_folded_key():
    tx = optax.sgd(0.1)
    batch = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([3.0, 0.0])}
    state = init_state(
        jax.random.key(0), batch, init_fn=lambda rng, b: {"w": jnp.array(1.0)}, tx=tx
    )
    assert isinstance(state, TrainState) and int(state.step) == 0
    state = state.replace(step=jnp.int32(6))
    step = jax.jit(
        lambda s, b, r: train_step(
            s, b, r, loss_fn=_loss, tx=tx, learning_rate_fn=lambda n: n * 0.5, accumulate_steps=4
        )
    )
    new, metrics = step(state, batch, jax.random.key(7))
    # loss = (1 - 3)^2 + (2 - 0)^2 = 8; dloss/dw = 2 (-2) 1 + 2 (2) 2 = 4; w = 1 - 0.1 * 4
    assert float(metrics["loss"]) == 8.0
    assert float(metrics["grad_norm"]) == pytest.approx(4.0)
    assert float(new.params["w"]) == pytest.approx(0.6)
    assert int(new.step) == 7
    assert float(metrics["lr"]) == 0.5  # the schedule at update 6 // 4 = 1
    want = jax.random.uniform(jax.random.fold_in(jax.random.key(7), 6))
    assert float(metrics["draw"]) == float(want)


# meta as the trainer wrote it before LoopRecord existed: before any validation, and after two
OLD_META_START = {
    "best": -math.inf,
    "best_step": None,
    "bad_evals": 0,
    "train_seconds": 0.0,
    "eval_seconds": 0.0,
    "history": [],
}
OLD_META = {
    "best": 0.3,
    "best_step": 10,
    "bad_evals": 1,
    "train_seconds": 5.0,
    "eval_seconds": 2.0,
    "history": [[10, 4.0, 0.3, 6.0], [20, 5.0, 0.25, 9.0]],
    "cpu_seconds": 9.0,
    "best_val": {"ndcg@10": 0.3, "seconds": 1.0},
    "best_cpu_seconds": 6.0,
}


@pytest.mark.parametrize("meta", [OLD_META_START, OLD_META])
def test_loop_record_reads_and_writes_the_meta_runs_saved(meta):
    record = LoopRecord.from_meta(dict(meta))
    assert record.to_meta() == meta
    assert LoopRecord().to_meta() == OLD_META_START


def test_loop_record_counts_validations_and_patience():
    record = LoopRecord(train_seconds=1.5)
    record.record_validation(10, 0.2, {"seconds": 2.0}, cpu_now=7.0, cpu_mark=3.0)
    record.train_seconds = 2.5
    record.record_validation(20, 0.1, {"seconds": 1.0}, cpu_now=12.0, cpu_mark=8.0)
    record.record_validation(30, 0.2, {"seconds": 1.0}, cpu_now=13.0, cpu_mark=12.0)  # a tie
    assert (record.best, record.best_step, record.bad_evals) == (0.2, 10, 2)
    assert record.best_val == {"seconds": 2.0} and record.best_cpu_seconds == 4.0
    assert record.eval_seconds == 4.0 and record.cpu_seconds == 9.0
    assert record.history == [[10, 1.5, 0.2, 4.0], [20, 2.5, 0.1, 8.0], [30, 2.5, 0.2, 9.0]]
    record.record_validation(40, math.nan, {"seconds": 0.0}, cpu_now=1.0, cpu_mark=1.0)
    assert record.best_step == 10 and record.bad_evals == 3  # NaN never improves
    np.testing.assert_equal(record.to_meta()["history"][-1], [40, 2.5, math.nan, 9.0])
