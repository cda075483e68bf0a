"""launch/ scripts: their --dry-run commands, missing-variable errors, and fail-fast waiting."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ("local_multiprocess.sh", "slurm_gpu.sbatch", "tpu_pod.sh")
# Launcher variables of the surrounding shell must not leak into these runs.
_CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "TPU_", "JAX_"))
    and k
    not in (
        "CONFIG",
        "WORKDIR",
        "MODE",
        "ZONE",
        "PROJECT",
        "REPO_DIR",
        "PORT",
        "LOG_DIR",
        "NUM_PROCESSES",
        "DEVICES_PER_PROCESS",
        "PYTHON",
    )
}


def _run(script, *args, timeout=30, **env):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**_CLEAN, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0


def test_local_dry_run_prints_one_command_per_process(tmp_path):
    out = _run(
        "local_multiprocess.sh",
        "--dry-run",
        "--config",
        "configs/demo.py",
        "--workdir",
        "/tmp/a b",
        NUM_PROCESSES="3",
        DEVICES_PER_PROCESS="2",
        PORT="4567",
        LOG_DIR=str(tmp_path / "logs"),
        PYTHON="python3",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[:5] == [
            "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS=127.0.0.1:4567",
            "JAX_NUM_PROCESSES=3",
            f"JAX_PROCESS_ID={i}",
        ]
        assert words[5:13] == [
            "python3",
            "-m",
            "onerec_jax.main",
            "--config",
            "configs/demo.py",
            "--workdir",
            "/tmp/a b",
            ">",
        ]
        assert words[13] == f"{tmp_path}/logs/process_{i}.log"
    assert not (tmp_path / "logs").exists()  # nothing was run


def test_slurm_dry_run_runs_one_srun_step():
    out = _run(
        "slurm_gpu.sbatch",
        "--dry-run",
        "--config.train.num_steps=10",
        CONFIG="configs/ml25m.py:sasrec",
        WORKDIR="/shared/runs/s",
    )
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        "srun",
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "onerec_jax.main",
        "--config",
        "configs/ml25m.py:sasrec",
        "--workdir",
        "/shared/runs/s",
        "--mode",
        "train",
        "--config.train.num_steps=10",
    ]


def test_tpu_dry_run_runs_on_every_worker():
    out = _run(
        "tpu_pod.sh",
        "--dry-run",
        "--config.train.num_steps=10",
        TPU_NAME="pod",
        ZONE="us-east5-a",
        PROJECT="proj",
        CONFIG="configs/ml25m.py:sasrec",
        WORKDIR="/mnt/shared/it's here",
        MODE="eval",
    )
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:-1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone",
        "us-east5-a",
        "--project",
        "proj",
        "--worker=all",
        "--command",
    ]
    assert shlex.split(words[-1]) == [
        "cd",
        "onerec_jax",
        "&&",
        "python3",
        "-m",
        "onerec_jax.main",
        "--distributed",
        "--config",
        "configs/ml25m.py:sasrec",
        "--workdir",
        "/mnt/shared/it's here",
        "--mode",
        "eval",
        "--config.train.num_steps=10",
    ]


@pytest.mark.parametrize(
    "script, env, message",
    [
        ("slurm_gpu.sbatch", {"WORKDIR": "/w"}, "CONFIG is not set: export CONFIG="),
        ("slurm_gpu.sbatch", {"CONFIG": "c.py"}, "WORKDIR is not set: export WORKDIR="),
        (
            "slurm_gpu.sbatch",
            {"CONFIG": "c.py", "WORKDIR": "/w", "MODE": "prep"},
            "MODE='prep': use MODE=train or MODE=eval",
        ),
        ("tpu_pod.sh", {"ZONE": "z", "CONFIG": "c.py", "WORKDIR": "/w"}, "TPU_NAME is not set"),
        ("tpu_pod.sh", {"TPU_NAME": "t", "CONFIG": "c.py", "WORKDIR": "/w"}, "ZONE is not set"),
        ("tpu_pod.sh", {"TPU_NAME": "t", "ZONE": "z", "WORKDIR": "/w"}, "CONFIG is not set"),
        ("local_multiprocess.sh", {"NUM_PROCESSES": "two"}, "NUM_PROCESSES='two': set a positive"),
        ("local_multiprocess.sh", {"PYTHON": "/no/python"}, "PYTHON='/no/python' not found"),
    ],
)
def test_missing_variables_stop_before_running_anything(script, env, message):
    out = _run(script, "--dry-run", "--config", "c.py", **env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"{script}: {message}")


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    # A stand-in interpreter: process 1 fails after a moment, the others would run for minutes.
    fake = tmp_path / "fake_python"
    fake.write_text(
        '#!/usr/bin/env bash\necho "process $JAX_PROCESS_ID: $*"\n'
        "if [[ $JAX_PROCESS_ID == 1 ]]; then sleep 1; exit 3; fi\n"
        'echo $$ > "$LOG_DIR/alive_$JAX_PROCESS_ID"; exec sleep 120\n'
    )
    fake.chmod(0o755)
    logs = tmp_path / "logs"
    start = time.monotonic()
    out = _run(
        "local_multiprocess.sh",
        "--mode",
        "train",
        NUM_PROCESSES="3",
        PORT="4567",
        PYTHON=str(fake),
        LOG_DIR=str(logs),
        timeout=60,
    )
    assert out.returncode == 3 and time.monotonic() - start < 30
    assert "process 1 exited with status 3" in out.stderr
    assert (logs / "process_1.log").read_text() == "process 1: -m onerec_jax.main --mode train\n"
    assert out.stdout == "process 0: -m onerec_jax.main --mode train\n"  # process 0 is shown
    for i in (0, 2):  # the others were stopped, not left running
        pid = int((logs / f"alive_{i}").read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended
