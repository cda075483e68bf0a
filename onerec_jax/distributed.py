"""Multi-process start-up: whether to call `jax.distributed.initialize`, and with what.

A run is multi-process only when asked: by flags (`--coordinator_address`, `--num_processes`,
`--process_id`, or `--distributed` to let JAX detect a TPU pod / Open MPI job), by the
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` environment variables
(launch/local_multiprocess.sh sets them), by a SLURM step of several tasks (`srun`), or by a
GKE TPU slice of several hosts. On a plain single host nothing is initialized: JAX's no-argument
`initialize()` raises there. `plan()` reads flags and environment without touching JAX, so it can
be tested (and fail on incomplete settings) before any device exists.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping

from onerec_jax.errors import UserError

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_COUNT = "JAX_NUM_PROCESSES"
ENV_ID = "JAX_PROCESS_ID"
# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py); srun sets them per task.
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)
_FIX = (
    "give all three: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the "
    f"environment variables {ENV_ADDRESS}, {ENV_COUNT}, {ENV_ID}), the same address and count "
    "on every process, ids 0..N-1"
)


class DistributedError(UserError):
    """Multi-process settings are incomplete or the processes could not join each other."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins a multi-process run; None fields are detected by JAX."""

    source: str  # what asked for it, for messages: "flags", "SLURM", ...
    coordinator_address: str | None = None  # host:port of process 0's coordinator
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a process counts as dead


def _int(value: str | int, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={value!r} is not an integer; {_FIX}.") from None


def plan(
    *,
    distributed: bool | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    environ: Mapping[str, str] | None = None,
) -> Plan | None:
    """The multi-process plan the flags and environment ask for; None for a single process.

    Args:
      distributed: True forces multi-process start-up (JAX detects what is not given), False
        forbids it (launcher environment ignored), None (default) decides from the rest.
      coordinator_address, num_processes, process_id: explicit settings (flags); each falls back
        on its JAX_* environment variable. Giving some but not all of them is an error.
      initialization_timeout, heartbeat_timeout: seconds, passed to `jax.distributed.initialize`.
      environ: the environment (default `os.environ`).
    """
    env = os.environ if environ is None else environ
    timeouts = dict(
        initialization_timeout=initialization_timeout, heartbeat_timeout=heartbeat_timeout
    )
    for name, seconds in timeouts.items():
        if seconds < 1:
            raise DistributedError(f"{name}={seconds}: use a positive number of seconds.")
    if distributed is False:
        return None
    explicit = {
        "coordinator_address": (coordinator_address, ENV_ADDRESS),
        "num_processes": (num_processes, ENV_COUNT),
        "process_id": (process_id, ENV_ID),
    }
    flagged = {k for k, (v, _) in explicit.items() if v is not None}
    values = {k: v if v is not None else env.get(var) or None for k, (v, var) in explicit.items()}
    if any(v is not None for v in values.values()):
        source = "flags" if flagged else "environment"
        missing = [f"--{k} ({var})" for k, (_, var) in explicit.items() if values[k] is None]
        if missing:
            given = ", ".join(k for k in explicit if values[k] is not None)
            raise DistributedError(
                f"incomplete multi-process settings: {given} given but {' and '.join(missing)} "
                f"missing; {_FIX}."
            )
        address = str(values["coordinator_address"])
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(
                f"coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.1:12345); {_FIX}."
            )
        count = _int(values["num_processes"], "num_processes")
        index = _int(values["process_id"], "process_id")
        if count < 1 or not 0 <= index < count:
            raise DistributedError(
                f"process_id={index} with num_processes={count}: ids run 0..N-1 with N >= 1."
            )
        if count == 1 and not distributed:
            return None  # one process needs no coordinator
        return Plan(source, address, count, index, **timeouts)
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS")
    if tasks and _int(tasks, "SLURM_NTASKS") > 1:
        missing = [v for v in SLURM_VARS if v not in env]
        if missing:
            raise DistributedError(
                f"a SLURM job of {tasks} tasks, but {', '.join(missing)} not set: start one "
                "process per task with `srun python -m onerec_jax.main ...` (see "
                "launch/slurm_gpu.sbatch), or pass --nodistributed for a single process."
            )
        return Plan(
            "SLURM", None, int(tasks), _int(env["SLURM_PROCID"], "SLURM_PROCID"), **timeouts
        )
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    hosts = [h for h in hosts.split(",") if h.strip()]
    if len(hosts) > 1:  # a GKE TPU slice of several hosts; JAX counts them (and the slices)
        return Plan("TPU slice", **timeouts)
    if distributed:
        return Plan("--distributed", **timeouts)  # e.g. a GCE TPU pod: JAX asks the metadata
    return None


def initialize(p: Plan | None) -> None:
    """`jax.distributed.initialize` as `p` says (nothing for None); failures as one-line errors.

    A peer that never arrives ends this process after `p.initialization_timeout` seconds with
    exit status 1 and one line on stderr (XLA would otherwise abort with a C++ stack trace); once
    running, a peer that dies stops the others after `p.heartbeat_timeout` seconds (XLA's own
    heartbeat, exit status 134).
    """
    if p is None:
        return
    import jax

    where = (
        f"{p.num_processes or 'all'} processes ({p.source}) at "
        f"{p.coordinator_address or 'the detected coordinator'}"
    )
    watchdog = threading.Timer(p.initialization_timeout, _give_up, args=(p, where))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=p.coordinator_address,
            num_processes=p.num_processes,
            process_id=p.process_id,
            initialization_timeout=p.initialization_timeout,
            heartbeat_timeout_seconds=p.heartbeat_timeout,
        )
    except ValueError as e:  # JAX found no launcher environment to fill in the gaps
        raise DistributedError(
            f"{p.source} asked for a multi-process run but JAX found no launcher to join "
            f"({e}); {_FIX}, or start under srun / on every TPU worker."
        ) from None
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise DistributedError(f"could not join {where}: {first}. {_CHECK}") from None
    finally:
        watchdog.cancel()


_CHECK = (
    "Check that every process was started with the same coordinator address and process count "
    "and that process 0 is reachable; raise --distributed_init_timeout if start-up is slow."
)


def _give_up(p: Plan, where: str) -> None:
    """The watchdog: the other processes did not all join in time."""
    print(
        f"error: process {p.process_id if p.process_id is not None else '?'} could not join "
        f"{where} within {p.initialization_timeout}s. {_CHECK}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


def topology_line() -> str:
    """`process i of n: L local devices, G global devices (platform)` for this process."""
    import jax

    return (
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local devices, {jax.device_count()} global devices "
        f"({jax.default_backend()})"
    )
