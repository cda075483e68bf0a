"""When `python -m onerec_jax.main` joins a multi-process run: flags and launcher environment."""

import subprocess
import sys
from pathlib import Path

import pytest

from onerec_jax import distributed
from onerec_jax.distributed import DistributedError, Plan

REPO = Path(__file__).resolve().parents[1]
SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
}


def test_a_plain_host_initializes_nothing():
    assert distributed.plan(environ={"HOME": "/root", "SLURM_NTASKS": "1"}) is None


def test_flags_give_an_explicit_plan():
    p = distributed.plan(
        coordinator_address="10.0.0.1:1234",
        num_processes=4,
        process_id=3,
        initialization_timeout=20,
        heartbeat_timeout=7,
        environ={},
    )
    assert p == Plan("flags", "10.0.0.1:1234", 4, 3, 20, 7)


def test_the_local_launchers_environment_gives_a_plan():
    env = {
        "JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    assert distributed.plan(environ=env) == Plan("environment", "127.0.0.1:5000", 2, 1)
    # a flag wins over its variable; --nodistributed ignores the environment
    assert distributed.plan(process_id=0, environ=env).process_id == 0
    assert distributed.plan(distributed=False, environ=env) is None
    # one process needs no coordinator
    assert (
        distributed.plan(environ={**env, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    )


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        (
            {"coordinator_address": "h:1"},
            {},
            "coordinator_address given but --num_processes (JAX_NUM_PROCESSES) and --process_id",
        ),
        (
            {},
            {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
            "--coordinator_address (JAX_COORDINATOR_ADDRESS) missing",
        ),
        (
            {"coordinator_address": "nohost", "num_processes": 2, "process_id": 0},
            {},
            "'nohost' is not HOST:PORT",
        ),
        (
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
            {},
            "process_id=2 with num_processes=2",
        ),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            "num_processes='two' is not an integer",
        ),
        ({"heartbeat_timeout": 0}, {}, "heartbeat_timeout=0"),
    ],
)
def test_incomplete_or_bad_settings_name_the_problem_and_the_fix(kwargs, env, message):
    with pytest.raises(DistributedError) as e:
        distributed.plan(environ=env, **kwargs)
    assert message in str(e.value)
    if "missing" in message:
        assert "--coordinator_address=HOST:PORT --num_processes=N --process_id=I" in str(e.value)


def test_a_slurm_step_of_several_tasks_is_detected():
    assert distributed.plan(environ=SLURM) == Plan("SLURM", None, 16, 9)
    outside_srun = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    with pytest.raises(DistributedError, match="SLURM_STEP_NODELIST not set: .*`srun python"):
        distributed.plan(environ=outside_srun)


def test_tpu_slices_and_forced_detection():
    env = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "2"}
    assert distributed.plan(environ=env) == Plan("TPU slice")
    assert distributed.plan(environ={"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert distributed.plan(distributed=True, environ={}) == Plan("--distributed")


def _main(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "onerec_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_main_reports_incomplete_settings_in_one_line(tmp_path):
    out = _main(
        "--config", "configs/demo.py", f"--workdir={tmp_path}", "--coordinator_address=127.0.0.1:1"
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: incomplete multi-process settings: coordinator_address")
    assert not list(tmp_path.iterdir())


def test_single_process_modes_run_on_process_zero_only(tmp_path):
    out = _main(
        "--config",
        "configs/demo.py",
        "--mode",
        "prepare",
        f"--workdir={tmp_path}",
        "--coordinator_address=127.0.0.1:1",
        "--num_processes=2",
        "--process_id=1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "process 1: --mode prepare runs on process 0 only; nothing to do here."
    )
    assert not list(tmp_path.iterdir())
