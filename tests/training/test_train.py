"""The trainer: sharded step equality, kill-and-resume, eval-restore, a tiny end-to-end run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from onerec_jax import modes
from onerec_jax.data import dataset
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.parallel import sharding
from onerec_jax.training import train

REPO = Path(__file__).resolve().parents[2]


def tiny_config(root, model="sasrec", **train_overrides):
    c = apply_variant(base_config(), model)
    c.data.synthetic = "demo"
    c.data.root = str(root)
    c.data.max_len = 20
    c.data.progress = False
    c.model.update(dim=16, num_layers=1, num_heads=1, mlp_dim=16, dropout=0.1)
    if model == "onerec":
        c.model.update(num_heads=2, mlp_dim=32, aux_weight=0.5)
    c.train.update(
        batch_size=16,
        num_steps=12,
        eval_every_steps=4,
        log_every_steps=1,
        progress=False,
        patience=100,
    )
    c.train.update(**train_overrides)
    c.optim.warmup_steps = 2
    c.eval.batch_size = 512
    c.eval.chunk_size = 256
    return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _run_steps(config, n_devices, n_steps=3):
    config.mesh.num_devices = n_devices
    data, items = dataset.load_data(config.data)
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    mesh, rules = train.make_mesh(config)
    with sharding.use_mesh(mesh, rules):
        setup = train.make_setup(config, data, items, mesh, rules)
        state = train.initial_state(setup, config.seed)
        it = iter(train.train_batches(setup, config.seed))
        rng, losses = jax.random.key(0), []
        for _ in range(n_steps):
            batch = sharding.global_batch(next(it), mesh, rules)
            state, metrics = setup.train_step(state, batch, rng)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), setup


@pytest.mark.parametrize("model", ["sasrec", "onerec"])
def test_sharded_step_matches_one_device(root, model):
    # Whole-batch encoder passes on one device too: on one CPU device `train.encoder_rows` auto
    # cuts the batch into blocks with their own dropout keys (tests/models/test_encoder_blocks.py),
    # which a split batch does not.
    one_losses, one_params, _ = _run_steps(tiny_config(root, model, encoder_rows=16), 1)
    eight_losses, eight_params, setup = _run_steps(tiny_config(root, model), 8)
    assert setup.mesh.shape["data"] == 8
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(eight_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert one_losses[0] != one_losses[-1]  # training moved


def _losses(workdir):
    """Last logged train/loss per step (a killed run may have logged steps twice)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def _cli(config_overrides, workdir):
    return [
        sys.executable,
        "-m",
        "onerec_jax.main",
        "--config",
        "configs/demo.py",
        "--mode",
        "train",
        f"--workdir={workdir}",
        *config_overrides,
    ]


def test_kill_and_resume_continues_exactly(root, tmp_path):
    overrides = [
        f"--config.data.root={root}",
        "--config.data.max_len=20",
        "--config.model.dim=16",
        "--config.model.mlp_dim=16",
        "--config.train.batch_size=16",
        "--config.train.num_steps=24",
        "--config.train.eval_every_steps=4",
        "--config.train.log_every_steps=1",
        "--config.train.progress=False",
        "--config.eval.chunk_size=256",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole = subprocess.run(
        _cli(overrides, tmp_path / "whole"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    # The same command, killed (SIGKILL: no clean-up) once step 8 is checkpointed, then rerun.
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(overrides, killed_dir),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "8").exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        _cli(overrides, killed_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = _losses(tmp_path / "whole"), _losses(killed_dir)
    assert sorted(got) == sorted(want) == list(range(1, 25))
    np.testing.assert_allclose(
        [got[s] for s in range(9, 25)], [want[s] for s in range(9, 25)], rtol=1e-6
    )
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((killed_dir / "results.json").read_text())
    assert a["test"]["ndcg@10"] == b["test"]["ndcg@10"] and a["best_step"] == b["best_step"]


def test_end_to_end_and_eval_restore_on_other_devices(root, tmp_path):
    config = tiny_config(root, num_steps=16)
    config.mesh.num_devices = 1
    jax.clear_caches()
    results = train.train_and_evaluate(config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"] == pytest.approx(results["test"], nan_ok=True)
    # The best step is the validation argmax (first on ties) among the evaluated steps.
    history = saved["history"]
    assert [h[0] for h in history] == [4, 8, 12, 16]
    scores = [h[2] for h in history]
    assert saved["best_step"] == history[int(np.argmax(scores))][0]
    assert saved["val"]["ndcg@10"] == pytest.approx(max(scores))
    assert (
        saved["protocol"]["mask_history"] is True and saved["protocol"]["split"] == "leave-one-out"
    )
    assert saved["test"]["n_users"] == 2000
    assert saved["data"]["source"] == "demo"
    assert 0 < saved["cpu_seconds_to_best"] <= saved["cpu_seconds"]
    cpu = [h[3] for h in history]  # CPU-seconds at each validation: rising, the best's recorded
    assert all(a < b for a, b in zip(cpu, cpu[1:], strict=False))
    assert cpu[-1] == saved["cpu_seconds"]
    assert saved["cpu_seconds_to_best"] == cpu[int(np.argmax(scores))]
    logged = _losses(tmp_path)
    assert sorted(logged) == list(range(1, 17)) and all(np.isfinite(list(logged.values())))
    assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())
    # --mode eval restores the best params onto 4 devices and reproduces the test metrics.
    config.mesh.num_devices = 4
    jax.clear_caches()
    again = modes.evaluate(config, tmp_path)
    assert again["best_step"] == saved["best_step"]
    for key in ("hr@10", "ndcg@10", "mrr", "ndcg@50"):
        assert again["test"][key] == saved["test"][key]


def test_non_finite_loss_stops_with_a_clear_error(root, tmp_path):
    config = tiny_config(root, num_steps=12)
    config.optim.learning_rate = 1e30  # diverges at once
    config.optim.clip_norm = 0.0
    config.optim.warmup_steps = 0
    jax.clear_caches()
    with pytest.raises(train.TrainingError, match="non-finite loss .* No checkpoint yet"):
        train.train_and_evaluate(config, tmp_path)
    # Diverging after a checkpoint keeps that checkpoint and names it.
    config = tiny_config(root, num_steps=12, eval_every_steps=2)
    jax.clear_caches()
    state_dir = tmp_path / "later"
    train.train_and_evaluate(config, state_dir)  # a good run with checkpoints up to step 12
    config.train.num_steps = 20
    config.optim.learning_rate = 1e30  # same optimizer structure, so the checkpoint restores
    jax.clear_caches()
    with pytest.raises(train.TrainingError, match=r"last good checkpoint \(step 12\) is kept"):
        train.train_and_evaluate(config, state_dir)
    assert (state_dir / "checkpoints" / "12").exists()


def _patience_zero_run(root, tmp_path, **train_overrides) -> dict:
    """results.json of 12 steps at batch 512 (3 steps an epoch), validating every 2, patience 0."""
    config = tiny_config(
        root, batch_size=512, num_steps=12, eval_every_steps=2, patience=0, **train_overrides
    )
    config.mesh.num_devices = 1
    jax.clear_caches()
    return train.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize(("min_epochs", "steps"), [(0, 2), (2, 6)])
def test_early_stopping_waits_for_min_epochs(root, tmp_path, min_epochs, steps):
    """Patience 0 stops at the first validation unless train.min_epochs has not passed: at batch
    512 the demo's 2,000 users make 3 steps an epoch, so 2 epochs are 6 steps."""
    results = _patience_zero_run(root, tmp_path, min_epochs=min_epochs, patience_below_popularity=0)
    assert results["stopped_early"] and results["steps"] == steps
    assert [h[0] for h in results["history"]] == list(range(2, steps + 1, 2))
    assert results["popularity_val_ndcg@10"] is None


@pytest.mark.parametrize(("pop_val", "stopped", "steps"), [(-1.0, True, 2), (2.0, False, 12)])
def test_early_stopping_waits_while_below_popularity(
    root, tmp_path, monkeypatch, pop_val, stopped, steps
):
    """Patience 0 stops at the first validation once it beats popularity's (here forced to -1);
    below it (forced to 2, above any NDCG) patience_below_popularity = 100 validations apply, so
    the 12 steps run out first."""
    monkeypatch.setattr(train, "popularity_validation", lambda *a: pop_val)
    results = _patience_zero_run(root, tmp_path, patience_below_popularity=100)
    assert results["stopped_early"] is stopped and results["steps"] == steps
    assert results["popularity_val_ndcg@10"] == pop_val


def test_a_vocab_split_checkpoint_evaluates_unsplit_and_the_reverse(root, tmp_path):
    """A table split 8 ways has 1,008 rows (1,001 rounded up); `--mode eval` on one device reads
    1,001 of them, and a one-device run's 1,001 rows evaluate split 4 ways (padded to 1,004):
    the test metrics equal the run's own."""
    from onerec_jax.parallel.sharding import DEFAULT_RULES

    # only the item tables over "model" (configs/scale.py's rules): a 16-wide head stays whole
    rules = tuple((n, None if n in ("heads", "mlp") else a) for n, a in DEFAULT_RULES)
    split = tiny_config(root, num_steps=4)
    split.mesh.shape, split.mesh.num_devices, split.mesh.rules = (1, 1, 8), 8, rules
    plain = tiny_config(root, num_steps=4)
    plain.mesh.num_devices, plain.mesh.rules = 1, rules
    for name, train_cfg, eval_shape, eval_devices, rows in (
        ("split", split, (-1, 1, 1), 1, 1_008),
        ("plain", plain, (1, 1, 4), 4, 1_001),
    ):
        jax.clear_caches()
        saved = train.train_and_evaluate(train_cfg, tmp_path / name)
        step_dir = tmp_path / name / "checkpoints" / str(saved["best_step"]) / "params"
        assert any(len(s) == 2 and s[0] == rows for s in _stored_shapes(step_dir))
        other = train_cfg.copy_and_resolve_references()
        other.mesh.shape, other.mesh.num_devices = eval_shape, eval_devices
        jax.clear_caches()
        again = modes.evaluate(other, tmp_path / name)
        for key in ("hr@10", "ndcg@10", "mrr"):
            assert again["test"][key] == pytest.approx(saved["test"][key], rel=1e-5), (name, key)


def _stored_shapes(step_dir):
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(step_dir)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return [tuple(leaf.shape) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape")]
