"""2 processes x 4 CPU devices train exactly like 1 process x 8, through the real entry point.

One module fixture runs everything once, overlapping what it can: `--mode prepare`; a 2-process
training through launch/local_multiprocess.sh beside a 1-process, 8-device training of the same
config; then a 1-process `--mode eval` of the 2-process checkpoint beside a 2-process run whose
process 1 is killed mid-run. The tests read their outputs. A compilation cache shared by the runs
keeps the repeated compiles out (it changes no result).
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from onerec_jax.data import dataset
from onerec_jax.parallel import sharding
from onerec_jax.training import checkpointing, train

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
# The tiniest SASRec that trains: global batch 16 (8 rows per process, 2 per device).
OVERRIDES = {
    "data.max_len": 20,
    "data.progress": False,
    "model.dim": 16,
    "model.mlp_dim": 16,
    "model.num_layers": 1,
    "model.num_heads": 1,
    "train.batch_size": 16,
    "train.num_steps": STEPS,
    "train.eval_every_steps": 3,
    "train.log_every_steps": 1,
    "train.progress": False,
    "eval.batch_size": 256,
    "eval.chunk_size": 256,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path, devices: int | None, **extra) -> dict:
    """This environment without launcher or JAX settings, CPU only, `devices` fake devices."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TPU_", "JAX_")) and k != "XLA_FLAGS"
    }
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jit")  # shared by the runs of this module
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _main(root: Path, workdir: Path, mode: str, *extra, **overrides) -> list[str]:
    config = {**OVERRIDES, **overrides}
    return [
        sys.executable,
        "-m",
        "onerec_jax.main",
        "--config",
        "configs/demo.py",
        f"--config.data.root={root}",
        *(f"--config.{k}={v}" for k, v in config.items()),
        f"--workdir={workdir}",
        f"--mode={mode}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    try:
        yield _run_all(root)
    finally:  # a failed run leaves no process behind
        for proc in _STARTED:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_STARTED: list[subprocess.Popen] = []


def _run_all(root: Path) -> dict:
    _finish(_start(_main(root, root / "prep", "prepare"), _env(root, None), root / "prep.log"))
    launcher = [
        "bash",
        str(REPO / "launch" / "local_multiprocess.sh"),
        *_main(root, root / "two", "train")[3:],
    ]
    two = _start(
        launcher,
        _env(
            root,
            None,
            NUM_PROCESSES="2",
            DEVICES_PER_PROCESS="4",
            PYTHON=sys.executable,
            LOG_DIR=str(root / "logs"),
        ),
        root / "two.log",
    )
    one = _start(_main(root, root / "one", "train"), _env(root, 8), root / "one.log")
    out = {"root": root, "two_out": _finish(two)}
    killed = _start_killed_run(root)  # its compiles hit the cache of the 2-process run
    out["one_out"] = _finish(one)
    ev = _start(_main(root, root / "two", "eval"), _env(root, 8), root / "eval.log")
    out["killed"] = _kill_process_1(killed, root)
    out["eval_out"] = _finish(ev)
    return out


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nobody reads while the runs overlap
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    _STARTED.append(proc)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Its output, once it succeeded."""
    proc.wait(timeout=timeout)
    out = proc.log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def _start_killed_run(root: Path) -> list[subprocess.Popen]:
    """The 2-process training again, with a 5 s heartbeat timeout, into root/killed."""
    port = _free_port()
    return [
        _start(
            _main(root, root / "killed", "train", "--distributed_heartbeat_timeout=5"),
            _env(
                root,
                4,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            root / f"killed_{i}.log",
        )
        for i in range(2)
    ]


def _kill_process_1(procs: list[subprocess.Popen], root: Path) -> dict:
    """SIGKILLs process 1 once step 2 is logged (steps 3.. need it); how process 0 ended."""
    deadline = time.monotonic() + 300
    while '"step": 2,' not in _read(root / "killed" / "metrics.jsonl"):
        assert all(p.poll() is None for p in procs), "a process ended before the kill"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    procs[0].wait(timeout=120)
    return {
        "seconds": time.monotonic() - killed_at,
        "returncode": procs[0].returncode,
        "output": procs[0].log.read_text(),
    }


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_each_process_reports_its_topology_and_only_process_0_writes(runs):
    logs = runs["root"] / "logs"
    p0, p1 = ((logs / f"process_{i}.log").read_text() for i in (0, 1))
    assert "process 0 of 2: 4 local devices, 8 global devices (cpu)" in p0
    assert "process 1 of 2: 4 local devices, 8 global devices (cpu)" in p1
    assert "process 0 of 1: 8 local devices, 8 global devices (cpu)" in runs["one_out"]
    assert "test: HR@10" in p0 and "test: HR@10" in runs["two_out"]  # shown by the launcher
    assert "HR@10" not in p1 and "results in" not in p1
    # one metrics line per logged step: a single writer
    rows = (runs["root"] / "two" / "metrics.jsonl").read_text().splitlines()
    train_steps = [json.loads(r)["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, STEPS + 1))


def test_losses_match_one_process(runs):
    one, two = _losses(runs["root"] / "one"), _losses(runs["root"] / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5, atol=1e-5)
    assert len(set(one.values())) == STEPS  # the steps saw different batches


def test_final_params_match_one_process(runs):
    config = _config(runs["root"])
    data, items = dataset.load_data(config.data)
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    mesh, rules = train.make_mesh(config)
    with sharding.use_mesh(mesh, rules):
        abstract = train.make_setup(config, data, items, mesh, rules).abstract_state.params
    params = {}
    for name in ("one", "two"):
        with checkpointing.Checkpointer(runs["root"] / name / "checkpoints") as ckpt:
            assert ckpt.latest_step() == STEPS
            params[name] = jax.device_get(ckpt.restore_params(STEPS, abstract))
    leaves = jax.tree_util.tree_leaves_with_path(params["one"])
    assert len(leaves) > 5
    for (path, a), b in zip(leaves, jax.tree.leaves(params["two"]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_validation_and_test_metrics_match_one_process(runs):
    one, two = _results(runs["root"] / "one"), _results(runs["root"] / "two")
    assert one["best_step"] == two["best_step"] and one["steps"] == two["steps"] == STEPS
    assert [h[0] for h in two["history"]] == [3, 6]
    np.testing.assert_allclose(
        [h[2] for h in two["history"]], [h[2] for h in one["history"]], rtol=1e-5, atol=1e-5
    )
    assert two["test"]["n_users"] == one["test"]["n_users"] == 2000
    for key in one["test"]:
        if "@" in key or key.startswith("mrr"):
            assert two["test"][key] == pytest.approx(one["test"][key], rel=1e-5, abs=1e-5), key


def test_a_two_process_checkpoint_evaluates_on_one_process(runs):
    two = _results(runs["root"] / "two")
    assert "process 0 of 1: 8 local devices" in runs["eval_out"]
    # main compares every @k metric and MRR exactly with the recorded results.json
    assert "matches the recorded results.json" in runs["eval_out"]
    assert f"test (step {two['best_step']}): HR@10 {two['test']['hr@10']:.4f}" in runs["eval_out"]


def test_a_killed_process_stops_the_other(runs):
    killed = runs["killed"]
    assert killed["returncode"] != 0
    assert killed["seconds"] < 60, f"the surviving process took {killed['seconds']:.0f}s to stop"
    # Either the coordination service notices the missing heartbeat, or a collective in flight
    # reads the dead peer's socket first and Gloo aborts the process (seen once in CI).
    assert (
        "JAX distributed service detected fatal errors" in killed["output"]
        or "gloo::" in killed["output"]
    ), killed["output"][-3000:]
    assert not (runs["root"] / "killed" / "results.json").exists()


def test_a_missing_peer_fails_after_the_init_timeout(runs):
    start = time.monotonic()
    out = subprocess.run(
        _main(
            runs["root"],
            runs["root"] / "alone",
            "train",
            "--num_processes=2",
            "--process_id=1",
            f"--coordinator_address=127.0.0.1:{_free_port()}",
            "--distributed_init_timeout=3",
        ),
        cwd=REPO,
        env=_env(runs["root"], 4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and time.monotonic() - start < 60
    assert out.stderr.startswith(
        "error: process 1 could not join 2 processes (flags) at 127.0.0.1:"
    )
    assert "within 3s" in out.stderr


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _config(root: Path):
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(OVERRIDES)
    config.data.root = str(root)
    config.mesh.num_devices = 1
    return config
