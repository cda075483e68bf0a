"""Training throughput, step and compile time, peak memory, MFU and eval time at ML-25M shapes.

  python benchmarks/train_throughput.py --steps 5 --warmup 2 --eval_users 2048 --markdown
  bash benchmarks/gpu_check.sh                       # the GPU run (all 162,541 users ranked)

No file is read: users are synthetic, with ML-25M's shape (59,047 items; lognormal sequence
lengths, median 71, mean ~155, 20 to 32,202 items, which leaves ~46% of the positions of
max_len-200 training windows as padding, as on the real data). Each (model, dim, loss, dtype)
runs in its own process, so peak memory and compile caches do not leak from one to the next.
Models use `base_config()` + `apply_variant()`: SASRec with mlp_dim = dim, OneRec (item head,
no side features) with mlp_dim = 2 * dim; losses with their config defaults (sampled softmax:
256 uniform shared negatives + in-batch negatives, logQ; full softmax in 8,192-item chunks).

Per config: `train.py`'s jitted `train_step` is lowered and compiled ahead of time (compile s), run
`--warmup` steps, then `--steps` timed steps, each blocked until done (step ms = median).
tokens/s = mean valid target positions per batch / median step time. Peak memory is the
device's `peak_bytes_in_use` where the backend reports it, else the process peak RSS (VmHWM).

MFU = model FLOPs per step / step time / the devices' summed peak (blank when the peak is unknown,
e.g. on CPU). Model FLOPs per step = B * T * (6 * N + 12 * n_layers * d * T + F_out), counted over
all B * T positions since the dense step computes padding positions too, with N the non-embedding
parameters (attention, feed-forward, norms), 12 * n_layers * d * T the attention scores and
weighted sums (full T x T, forward + backward), and F_out = 6 * d * V for the full softmax (V =
59,048 rows; the rematerialised forward is not counted) or 6 * d * (1 + M + B * T) for the sampled
softmax (M shared negatives; with in-batch negatives every row scores all B * T targets).
Peaks: H100 SXM / H200 989e12 (bf16 dense), 494e12 (tf32: JAX's default precision for float32
matmuls on these GPUs); H100 PCIe 756e12 / 378e12. bfloat16 rows are held to the bf16 peak,
although the output layer (most of the FLOPs) stays float32: the item table is a float32 param.

Evaluation (once per model, dim and dtype): `Evaluator.evaluate` on `--eval_users` synthetic
users (user states at max_len 200, then `rank_and_topk` over every item, `--eval_batch` users a
batch), twice: the first pass includes compilation (one per history width), the second is the
steady time. With fewer users than 162,541 the steady time is extrapolated linearly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

ML25M_USERS, ML25M_ITEMS = 162_541, 59_047
PEAK_FLOPS = {  # device kind substring -> {compute dtype: dense peak FLOP/s}; first match wins
    "H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "H100 NVL": {},  # other clocks and power: peak unknown here
    "H100": {"bfloat16": 989e12, "float32": 494e12},  # SXM
    "H200": {"bfloat16": 989e12, "float32": 494e12},
}


def synthetic_sequences(n_users: int, n_items: int, seed: int):
    """ML-25M-like `SequenceData`: lognormal lengths (median 71, sigma 1.243), uniform items
    (`data.synthetic = "uniform"`, data/synthetic_uniform.py)."""
    from onerec_jax.data.synthetic_uniform import uniform_sequences

    return uniform_sequences(n_users, n_items, seed)


def make_config(args, model: str, dim: int, loss: str, dtype: str):
    from onerec_jax.defaults import apply_variant, base_config

    c = base_config()
    c.model.dim = dim
    c.model.mlp_dim = dim  # SASRec; apply_variant makes OneRec's 2 * dim
    c = apply_variant(c, model)
    c.model.side_features = ()  # no item file: ids only
    c.loss.name = loss
    c.train.compute_dtype = dtype
    c.train.batch_size = args.batch_size
    c.train.num_steps = 10_000  # only shapes the learning-rate schedule
    c.data.max_len = args.max_len
    c.data.bucket_boundaries = ()  # every step at the full [batch, max_len] shape: one compile
    c.eval.batch_size = args.eval_batch
    return c


def model_flops_per_step(c, non_embedding: int, n_rows: int) -> float:
    """The analytic training FLOPs of one step (module docstring), over B * T positions."""
    d, t, n_layers = c.model.dim, c.data.max_len, c.model.num_layers
    positions = c.train.batch_size * t
    if c.loss.name == "full_softmax":
        out = 6 * d * n_rows
    else:
        in_batch = min(c.loss.in_batch_negatives or positions, positions) if c.loss.in_batch else 0
        out = 6 * d * (1 + c.loss.n_negatives + in_batch)
    return positions * (6 * non_embedding + 12 * n_layers * d * t + out)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def peak_memory() -> tuple[float, str]:
    """(bytes, source): the device allocator's peak if reported, else this process's peak RSS."""
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = {}
    if "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024.0, "process peak RSS (VmHWM)"
    return float("nan"), "unknown"


def train_setup(config, data, items=None):
    """`training.train.make_setup` of `config` on `data` (and its item table `items`, if any),
    its mesh and logical axis rules set globally for the rest of this benchmark process."""
    import flax.linen as nn
    import jax

    from onerec_jax.training import train

    mesh, rules = train.make_mesh(config)
    jax.set_mesh(mesh)
    nn.set_logical_axis_rules(rules)  # before any trace (JAX_GUIDE.md)
    return train.make_setup(config, data, items, mesh, rules)


def time_train_steps(setup, seed: int, warmup: int, steps: int):
    """Compiles `setup.train_step` ahead of time and runs `warmup` + `steps` steps over 4
    cycled batches, each blocked until done. Returns (state, host batches, compile s, the timed
    steps' seconds, the last loss)."""
    import jax

    from onerec_jax.parallel import sharding
    from onerec_jax.training import train

    it = iter(train.train_batches(setup, seed))
    host = [next(it) for _ in range(4)]  # cycled through by the timed steps
    batches = [sharding.global_batch(b, setup.mesh, setup.rules) for b in host]
    state = train.initial_state(setup, seed)
    rng = jax.random.key(seed)
    start = time.perf_counter()
    step = setup.train_step.compile(state, batches[0], rng)
    compile_s = time.perf_counter() - start
    state, times, losses = run_timed_steps(step, state, batches, rng, warmup, steps)
    return state, host, compile_s, times, losses[-1] if losses else float("nan")


def run_timed_steps(step, state, batches: list, rng, warmup: int, steps: int):
    """`warmup` + `steps` calls of the compiled `step` over the cycled `batches`, each blocked until
    done. Returns (state, the timed steps' seconds, every step's loss)."""
    import jax

    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)], rng)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(metrics["loss"]))
    return state, times, losses


def run_one(args, model: str, dim: int, loss: str, dtype: str, with_eval: bool) -> None:
    """Trains, times (and evaluates) one configuration in this process.

    Prints `RESULT <json row>` once training is timed, then `EVAL <json>` after evaluation, so
    a run stopped during evaluation still reports its training numbers.
    """
    import jax
    from absl import flags, logging

    from onerec_jax.evaluation.evaluator import make_evaluator

    flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
    logging.set_verbosity(logging.WARNING)
    c = make_config(args, model, dim, loss, dtype)
    data = synthetic_sequences(args.train_users, args.n_items, args.seed)
    setup = train_setup(c, data)
    state, host, compile_s, times, loss_value = time_train_steps(
        setup, args.seed, args.warmup, args.steps
    )
    tokens = float(np.mean([b["mask"].sum() for b in host]))
    padding = 1.0 - float(np.mean([b["mask"].mean() for b in host]))
    step_s = float(np.median(times))
    peak_bytes, peak_source = peak_memory()  # before evaluation

    params = state.params
    embedding = sum(
        int(np.prod(x.shape))
        for path, x in jax.tree_util.tree_leaves_with_path(params)
        if "embedding" in jax.tree_util.keystr(path)
    )
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    flops = model_flops_per_step(c, n_params - embedding, data.n_items + 1)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, dtype) if device.platform == "gpu" else None
    row = {
        "model": model,
        "dim": dim,
        "loss": loss,
        "dtype": dtype,
        "tokens_per_step": tokens,
        "padding_share": padding,
        "tokens_per_s": tokens / step_s,
        "step_ms": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times),
        "compile_s": compile_s,
        "peak_bytes": peak_bytes,
        "peak_source": peak_source,
        "params": n_params,
        "non_embedding_params": n_params - embedding,
        "flops_per_step": flops,
        "mfu": flops / step_s / (peak * jax.device_count()) if peak else None,
        "final_loss": loss_value,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "n_devices": jax.device_count(),
    }
    print("RESULT " + json.dumps(row), flush=True)
    if with_eval and args.eval_users > 0:
        eval_data = synthetic_sequences(args.eval_users, args.n_items, args.seed + 1)
        evaluator = make_evaluator(setup.model, eval_data, c, setup.mesh, setup.rules)
        first, _ = evaluator.evaluate(params, "test")  # compiles once per history width
        steady, _ = evaluator.evaluate(params, "test")
        result = {
            "users": args.eval_users,
            "batch": args.eval_batch,
            "first_s": first["seconds"],
            "steady_s": steady["seconds"],
            "full_s": steady["seconds"] * ML25M_USERS / args.eval_users,
            "extrapolated": args.eval_users != ML25M_USERS,
        }
        print("EVAL " + json.dumps(result), flush=True)


def _text(out) -> str:
    """A child's captured output: str, or bytes when subprocess.run timed out."""
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def _parse_child(stdout: str) -> dict | None:
    """The child's RESULT row with its EVAL result attached, or None if it printed none."""
    row = None
    for line in stdout.splitlines():
        tag, _, payload = line.partition(" ")
        if tag == "RESULT":
            row = json.loads(payload)
        elif tag == "EVAL" and row is not None:
            row["eval"] = json.loads(payload)
    return row


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`): stop, and print what has finished."""


def _on_sigterm(signum, frame):
    raise Interrupted


def run_all(args) -> list[dict]:
    """Each configuration in a child process, within --run_timeout each and --deadline in all."""
    specs, seen = [], set()
    for model in args.models:
        for dim in args.dims:
            for dtype in args.dtypes:
                for loss in args.losses:
                    with_eval = (model, dim, dtype) not in seen
                    seen.add((model, dim, dtype))
                    specs.append((model, dim, loss, dtype, with_eval))
    signal.signal(signal.SIGTERM, _on_sigterm)
    start, rows = time.perf_counter(), []
    for k, (model, dim, loss, dtype, with_eval) in enumerate(specs):
        name = {"model": model, "dim": dim, "loss": loss, "dtype": dtype}
        limit = args.run_timeout
        if args.deadline:
            limit = min(limit, args.deadline - (time.perf_counter() - start))
            if limit < 20:
                rows.append({**name, "error": "skipped: --deadline reached"})
                continue
        child = f"{model},{dim},{loss},{dtype},{int(with_eval)}"
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_child", child]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            out, err = proc.stdout, proc.stderr
            failure = f"exit {proc.returncode}" if proc.returncode else ""
        except subprocess.TimeoutExpired as e:
            out, err, failure = _text(e.stdout), _text(e.stderr), f"timeout after {limit:.0f} s"
        except (Interrupted, KeyboardInterrupt):
            rows.append({**name, "error": "interrupted"})
            print("interrupted: printing the configurations finished so far", file=sys.stderr)
            break
        row = _parse_child(out)
        if row is None:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            row = {**name, "error": f"{failure or 'no result'}: {tail[:160]}"}
        elif with_eval and args.eval_users > 0 and "eval" not in row:
            row["eval_error"] = f"evaluation: {failure or 'no result'}"
        rows.append(row)
        print(f"[{k + 1}/{len(specs)}] {_summary(row)}", flush=True)  # stdout: as it comes
    return rows


def _summary(row: dict) -> str:
    head = f"{row['model']} d{row['dim']} {row['loss']} {row['dtype']}"
    if "error" in row:
        return f"{head}: {row['error']}"
    text = (
        f"{head}: {row['tokens_per_s']:,.0f} tokens/s, step {row['step_ms']:.1f} ms, "
        f"compile {row['compile_s']:.1f} s, peak {row['peak_bytes'] / 1e9:.2f} GB, "
        f"loss {row['final_loss']:.3f}, padding {row['padding_share']:.1%}"
    )
    if "eval" in row:
        e = row["eval"]
        text += f"; eval {e['users']:,} users {e['first_s']:.1f} s first, {e['steady_s']:.1f} s"
    return text + (f"; {row['eval_error']}" if "eval_error" in row else "")


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    return "\n".join(lines)


def report(rows: list[dict], args) -> str:
    done = [r for r in rows if "error" not in r]
    device = f"{done[0]['device_kind']} ({done[0]['platform']})" if done else "unknown"
    out = [
        f"device: {device}; jax {metadata.version('jax')}, flax {metadata.version('flax')}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores; "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}",
        f"command: python {' '.join(sys.argv)}",
        f"shapes: {args.n_items:,} items, max_len {args.max_len}, batch {args.batch_size}; "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        "",
    ]
    train = []
    for r in rows:
        key = [r["model"], str(r["dim"]), r["loss"], r["dtype"]]
        if "error" in r:
            train.append(key + [r["error"], "", "", "", ""])
            continue
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        train.append(
            key
            + [
                f"{r['tokens_per_s']:,.0f}",
                f"{r['step_ms']:,.1f}",
                f"{r['compile_s']:.1f}",
                f"{r['peak_bytes'] / 1e9:.2f} GB",
                mfu,
            ]
        )
    header = ["model", "dim", "loss", "dtype", "tokens/s", "step ms", "compile s", "peak mem"]
    out.append(_table(header + ["MFU"], train, args.markdown))
    sources = sorted({r["peak_source"] for r in done})
    if done:
        tokens = np.mean([r["tokens_per_step"] for r in done])
        padding = np.mean([r["padding_share"] for r in done])
        out.append(
            f"\npeak mem: {', '.join(sources)}. tokens/s counts valid target positions "
            f"({tokens:,.0f} per step, {padding:.1%} padding). MFU: analytic model FLOPs "
            "(module docstring) / median step time / device peak; blank where no peak is known."
        )
    evals = [r for r in done if "eval" in r or "eval_error" in r]
    if evals:
        note = (
            f"extrapolated linearly from {args.eval_users:,} users"
            if args.eval_users != ML25M_USERS
            else "measured on all users"
        )
        out.append(
            f"\nFull-ranking evaluation, {ML25M_USERS:,} users x {args.n_items:,} items, "
            f"batch {args.eval_batch:,} users ({note}):\n"
        )
        head = ["model", "dim", "dtype", "users timed", "first pass s (incl. compile)"]
        head += ["steady pass s", f"{ML25M_USERS:,} users s", "users/s"]
        eval_rows = []
        for r in evals:
            if "eval" not in r:
                eval_rows.append(
                    [r["model"], str(r["dim"]), r["dtype"], r["eval_error"]] + [""] * 4
                )
                continue
            e = r["eval"]
            full = f"{e['full_s']:,.1f}" + (" (extrapolated)" if e["extrapolated"] else "")
            eval_rows.append(
                [r["model"], str(r["dim"]), r["dtype"], f"{e['users']:,}", f"{e['first_s']:.1f}"]
                + [f"{e['steady_s']:.1f}", full, f"{e['users'] / e['steady_s']:,.0f}"]
            )
        out.append(_table(head, eval_rows, args.markdown))
    return "\n".join(out)


def _csv(cast):
    return lambda s: [cast(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=_csv(str), default=["sasrec", "onerec"])
    p.add_argument("--dims", type=_csv(int), default=[64, 128])
    p.add_argument("--losses", type=_csv(str), default=["sampled_softmax", "full_softmax"])
    p.add_argument("--dtypes", type=_csv(str), default=["float32"], help="float32,bfloat16")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--batch_size", type=int, default=128, help="global training batch")
    p.add_argument("--max_len", type=int, default=200)
    p.add_argument("--n_items", type=int, default=ML25M_ITEMS)
    p.add_argument("--train_users", type=int, default=4096, help="synthetic training users")
    p.add_argument(
        "--eval_users", type=int, default=ML25M_USERS, help="users ranked (0: no evaluation)"
    )
    p.add_argument("--eval_batch", type=int, default=1024, help="users per evaluation batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run_timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--deadline", type=float, default=0, help="seconds for all (0: none)")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    unknown = set(args.dtypes) - {"float32", "bfloat16"}
    if unknown:
        p.error(f"--dtypes {sorted(unknown)}: use float32 and/or bfloat16")
    if args._child:
        model, dim, loss, dtype, with_eval = args._child.split(",")
        run_one(args, model, int(dim), loss, dtype, with_eval == "1")
        return
    print(report(run_all(args), args), flush=True)


if __name__ == "__main__":
    main()
