#!/usr/bin/env bash
# N processes of `python -m onerec_jax.main` on this machine, on CPU, joined through
# jax.distributed: a rehearsal of a multi-host run (same code path, same checkpoints).
#
# Usage: launch/local_multiprocess.sh [--dry-run] MAIN_ARGS...
#   e.g. NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh \
#          --config configs/demo.py --workdir /tmp/demo_2proc
#
# Variables (all optional):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4): mesh size N x D
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   LOG_DIR              per-process logs process_<i>.log (default: $TMPDIR/onerec_<date>_<pid>)
#   PYTHON               the interpreter (default: python)
#
# Process 0's output is also shown here. Waits for all; if one fails, stops the others and exits
# with its status. --dry-run prints the commands without running them.
set -euo pipefail

die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
[[ $# -gt 0 ]] || die "no arguments for onerec_jax.main; e.g. --config configs/demo.py --workdir /tmp/run"

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/onerec_$(date +%Y%m%d_%H%M%S)_$$}"
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES='$NUM_PROCESSES': set a positive integer, e.g. NUM_PROCESSES=2"
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS='$DEVICES_PER_PROCESS': set a positive integer, e.g. DEVICES_PER_PROCESS=4"
command -v "$PYTHON" >/dev/null || die "PYTHON='$PYTHON' not found: set PYTHON to the project's interpreter, e.g. PYTHON=.venv/bin/python"
if [[ -z "${PORT:-}" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT='$PORT': set a free TCP port number, e.g. PORT=12345"

command_for() {  # the environment and command of process $1
  echo "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$1" \
    "$PYTHON -m onerec_jax.main $(printf '%q ' "${@:2}")> $LOG_DIR/process_$1.log 2>&1"
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do command_for "$i" "$@"; done
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOG_DIR/process_$i.log"
  if [[ $i == 0 ]]; then
    exec {out}>&1
  else
    exec {out}>/dev/null
  fi
  JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES" \
    JAX_PROCESS_ID="$i" PYTHONUNBUFFERED=1 \
    "$PYTHON" -m onerec_jax.main "$@" > >(tee "$log" >&"$out") 2>&1 &
  pids+=($!)
  exec {out}>&-
done
echo "started $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices (coordinator" \
  "127.0.0.1:$PORT); logs in $LOG_DIR/" >&2

# Poll: `wait PID` would block on one process while another has already failed.
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ " ${running[*]} " == *" $pid "* ]] || continue
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    status=0
    wait "$pid" || status=$?
    if [[ $status != 0 ]]; then
      echo "process $i exited with status $status (log: $LOG_DIR/process_$i.log);" \
        "stopping the others" >&2
      stop_all
      wait 2>/dev/null || true
      exit "$status"
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [[ ${#running[@]} -eq 0 ]] || sleep 1
done
echo "all $NUM_PROCESSES processes finished; logs in $LOG_DIR/" >&2
