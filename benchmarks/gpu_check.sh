#!/usr/bin/env bash
# GPU check at ML-25M shapes in one call, every result printed to stdout as it is measured.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from any folder
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh   # the same path at tiny sizes on CPU (tests)
#
# Setup: the machine's own python and jax (never reinstalled). Whatever else it cannot import is
# installed, without network, from wheelhouse/ (`bash benchmarks/make_wheelhouse.sh` here; carry
# the folder with the tree) into a scratch folder put on PYTHONPATH, with the repository itself.
#
# Parts, each under its own timeout and all under GPU_CHECK_SECONDS (default 290): a one-line
# device report; benchmarks/train_throughput.py for SASRec and the OneRec item head (dim 64,
# sampled and full softmax, bfloat16 and float32: tokens/s, step ms, compile s, peak memory,
# MFU; one row per configuration as it finishes) with a full-ranking evaluation of 16,384 users
# (extrapolated to 162,541); benchmarks/generative_eval.py for the OneRec semantic-id decoder
# (train step target items/s, beam-search users/s); and a short training of the OneRec item
# head on the synthetic demo to a test NDCG@10. A part cut short by its guard prints what it
# had and the next part starts; the whole run cannot pass GPU_CHECK_SECONDS + 10 s. The CPU
# path gets 4x each limit and a 900 s budget (it runs in the test suite, maybe on a busy machine).
# Exit status: 0 when every part finished, 1 when one failed or was cut, 2 without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"  # PYTHON=/path/to/python when `python` is not the one with jax
cpu="${GPU_CHECK_CPU:-}"
# the GPU run's guards; the CPU path (a test, on a machine that may be busy) gets room instead
budget="${GPU_CHECK_SECONDS:-$([ -n "$cpu" ] && echo 900 || echo 290)}"
scale=$([ -n "$cpu" ] && echo 4 || echo 1)
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

site="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}"
mkdir -p "$site"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
if [ -d wheelhouse ]; then
  # each wheel whose distribution this python cannot find, without its dependencies
  "$PY" - "$site" <<'PYEOF'
import importlib.metadata as md, pathlib, subprocess, sys
site = sys.argv[1]
for wheel in sorted(pathlib.Path("wheelhouse").glob("*.whl")):
    name = wheel.name.split("-")[0]
    found = False
    for candidate in (name, name.replace("_", "-"), name.replace("_", ".")):
        try:
            md.version(candidate)
            found = True
        except md.PackageNotFoundError:
            pass
    if found:
        continue
    print(f"installing {wheel.name}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", site, str(wheel)], check=False)
PYEOF
fi

if [ -z "$cpu" ]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
  platform_check='sys.exit(0 if d.platform == "gpu" else 1)'
else
  export JAX_PLATFORMS=cpu
  platform_check='sys.exit(0)'
fi
if ! XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 "$PY" -c "
import sys
import jax
d = jax.devices()[0]
print(f'DEVICE jax {jax.__version__}: {jax.device_count()} x {d.device_kind} ({d.platform})', flush=True)
$platform_check
"; then
  echo "gpu_check.sh: JAX sees no GPU, or python/jax failed to start (set PYTHON=...);" \
    "nothing was run." >&2
  exit 2
fi
[ -z "$cpu" ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; }

if [ -z "$cpu" ]; then  # sizes: ML-25M shapes on the GPU, tiny on CPU
  throughput=(--models sasrec,onerec --dims 64 --losses sampled_softmax,full_softmax
    --dtypes bfloat16,float32 --steps 20 --warmup 3 --eval_users 16384 --eval_batch 1024
    --run_timeout 60)
  generative=(--variants onerec_sid --users 8192 --steps 10 --warmup 2)
  demo=(--config.train.num_epochs=3)
else
  throughput=(--models sasrec,onerec --dims 16 --losses sampled_softmax --dtypes float32
    --steps 1 --warmup 0 --n_items 2000 --train_users 64 --batch_size 8 --max_len 20
    --eval_users 64 --eval_batch 32 --run_timeout 200)
  generative=(--variants onerec_sid --users 32 --steps 1 --warmup 0 --n_items 2000
    --train_users 256 --eval_batch 32)
  demo=(--config.train.num_steps=4 --config.model.dim=16 --config.model.mlp_dim=16
    --config.eval.valid_users=64)
fi
status=0
part() {  # part NAME SECONDS COMMAND...: runs under min(SECONDS, time left), output as it comes
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  [ "$remaining" -lt "$limit" ] && limit=$remaining
  if [ "$limit" -lt 15 ]; then
    echo "PART $name: skipped, the ${budget} s budget is spent"
    status=1
    return
  fi
  echo "PART $name (limit ${limit} s)"
  timeout -k 5 "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "PART $name: cut by its ${limit} s limit"
    status=1
  elif [ "$rc" -ne 0 ]; then
    echo "PART $name: exit $rc"
    status=1
  fi
}
part throughput $((170 * scale)) "$PY" -u benchmarks/train_throughput.py "${throughput[@]}" \
  --deadline $((160 * scale)) --markdown
part generative $((60 * scale)) "$PY" -u benchmarks/generative_eval.py "${generative[@]}"
workdir="${TMPDIR:-/tmp}/gpu_check_demo"
rm -rf "$workdir"
part quality $((60 * scale)) "$PY" -u -m onerec_jax.main --config configs/demo.py:onerec --workdir "$workdir" \
  --config.data.root="${TMPDIR:-/tmp}/gpu_check_data" --config.train.progress=False \
  --config.data.progress=False "${demo[@]}"
echo "DONE in $((SECONDS - start)) s, status $status"
exit "$status"
