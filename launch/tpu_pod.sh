#!/usr/bin/env bash
# The same `python -m onerec_jax.main --distributed ...` on every worker of a Cloud TPU pod
# slice, through `gcloud compute tpus tpu-vm ssh --worker=all`. `--distributed` makes each
# worker call jax.distributed.initialize() with no arguments: JAX reads the workers, their ids
# and the coordinator from the TPU metadata.
#
# Usage: TPU_NAME=my-v5p-32 ZONE=us-east5-a CONFIG=configs/ml25m.py:sasrec \
#          WORKDIR=/mnt/shared/runs/sasrec launch/tpu_pod.sh [--dry-run] [MAIN_ARGS...]
#   MAIN_ARGS go to onerec_jax.main, e.g. --config.train.num_steps=20000.
#
# Variables:
#   TPU_NAME  (required) the TPU VM (pod slice) name
#   ZONE      (required) its zone, e.g. us-east5-a
#   CONFIG    (required) config file[:variant], relative to REPO_DIR
#   WORKDIR   (required) run directory on a filesystem every worker shares (e.g. an NFS or
#             Filestore mount): all workers write checkpoints, worker 0 the results
#   PROJECT   (optional) Google Cloud project, if not gcloud's default
#   REPO_DIR  checkout of this repository on every worker (default: onerec_jax, relative to the
#             worker's home); install it there first (pip install -e .)
#   MODE      train (default) or eval
#   PYTHON    interpreter on the workers (default: python3)
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
[[ -n "${TPU_NAME:-}" ]] || die "TPU_NAME is not set: export TPU_NAME=<your TPU VM name> (gcloud compute tpus tpu-vm list)"
[[ -n "${ZONE:-}" ]] || die "ZONE is not set: export ZONE=<the TPU's zone>, e.g. ZONE=us-east5-a"
[[ -n "${CONFIG:-}" ]] || die "CONFIG is not set: export CONFIG=configs/ml25m.py:sasrec (a config file[:variant])"
[[ -n "${WORKDIR:-}" ]] || die "WORKDIR is not set: export WORKDIR=/mnt/shared/run (a directory every worker can write)"
MODE="${MODE:-train}"
[[ "$MODE" == train || "$MODE" == eval ]] || die "MODE='$MODE': use MODE=train or MODE=eval"
REPO_DIR="${REPO_DIR:-onerec_jax}"
PYTHON="${PYTHON:-python3}"

remote="cd $(printf '%q' "$REPO_DIR") && $(printf '%q' "$PYTHON") -m onerec_jax.main --distributed"
remote+=" --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR") --mode $MODE"
if [[ $# -gt 0 ]]; then remote+=" $(printf '%q ' "$@")" && remote="${remote% }"; fi
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project "$PROJECT"); fi
cmd+=(--worker=all --command)
if [[ $dry_run == 1 ]]; then  # the remote command in single quotes, readable as typed
  printf '%q ' "${cmd[@]}"
  printf "'%s'\n" "${remote//\'/\'\\\'\'}"
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
exec "${cmd[@]}" "$remote"
