#!/usr/bin/env bash
# GPU check: training throughput and full-ranking evaluation at ML-25M shapes, one table.
#
#   bash benchmarks/gpu_check.sh          # from any folder; runs from the repository root
#
# What it runs: benchmarks/train_throughput.py (see its docstring) for SASRec and OneRec (item
# head), dim 64, sampled softmax and chunked full softmax, bfloat16 and float32: 8 training
# configurations, each in its own process (5 warm-up + 30 timed steps of batch 128 x 200 over
# 59,047 items), and per (model, dtype) one full-ranking evaluation of all 162,541 synthetic
# users over all 59,047 items, batch 1,024 users, run twice (the first pass includes
# compilation; the second, steady pass is the reported time). No file is read or written.
#
# Expected runtime: about 5-8 minutes on one H100 or H200 (an estimate; not yet run). It cannot pass 10 minutes: each
# configuration has a 150 s timeout, no configuration starts after 520 s, and an outer
# `timeout` stops the whole run at 570 s; in every case the table of the configurations
# finished so far is printed (unfinished ones say why).
#
# GPU_CHECK_SECONDS (default 570) scales the outer guard; no configuration starts after it minus
# 50 s. Assumes the repository's requirements are already installed: `python` on PATH is the venv's,
# with jax[cuda] and onerec_jax importable. Installs nothing. Exits 2 when JAX sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"  # PYTHON=/path/to/venv/bin/python when `python` is not the venv's

# Each configuration runs alone in its own process: let it take most of the GPU (the parent
# process never initialises JAX). Peak memory is read from the allocator, not this fraction.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

if ! XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 "$PY" -c '
import sys
import jax
d = jax.devices()[0]
print(f"jax {jax.__version__}: {jax.device_count()} x {d.device_kind} ({d.platform})")
sys.exit(0 if d.platform == "gpu" else 1)
'; then
  echo "gpu_check.sh: JAX sees no GPU (jax.devices()[0].platform != 'gpu'), or python/jax" \
    "failed to start. This check needs an NVIDIA GPU and jax[cuda] installed in the python" \
    "on PATH; nothing was run." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

budget="${GPU_CHECK_SECONDS:-570}"
timeout -k 10 "$budget" "$PY" benchmarks/train_throughput.py \
  --models sasrec,onerec --dims 64 \
  --losses sampled_softmax,full_softmax --dtypes bfloat16,float32 \
  --steps 30 --warmup 5 \
  --eval_users 162541 --eval_batch 1024 \
  --run_timeout 150 --deadline "$((budget - 50))" \
  --markdown
status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu_check.sh: stopped by the ${budget} s guard; the table above (if any) is partial." >&2
fi
exit "$status"
