"""Memory per device and step times with a 10,000,000-item catalogue split over 8 devices.

  python benchmarks/scale_catalogue.py --markdown                       # configs/scale.py (SASRec)
  python benchmarks/scale_catalogue.py --config configs/scale.py:onerec --steps 3
  python benchmarks/scale_catalogue.py --n_items 100000 --eval_users 64  # a quick look

On CPU the script asks for 8 fake devices (XLA_FLAGS, set before JAX is imported). Users are
synthetic (`train_throughput.synthetic_sequences`: ML-25M-like lengths, items uniform over the
catalogue), built in memory. It trains `--steps` timed steps (after `--warmup`) with the config's
jitted `train_step` (training/train.py), then ranks `--eval_users` users against every item with
the `Evaluator`.

Reported: the bytes each device holds of every large state leaf (the item table and its Adam
moments: 1/S of the table each when split S ways, the whole table when replicated), the compiled
train step's and ranker's `memory_analysis()` per device (arguments, outputs, temporaries), the
number of collectives in their HLO that move an array with as many rows as one table shard or
more (0: the table is never gathered), the process peak RSS (all fake devices share one process),
and compile and step times.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import numpy as np
import train_throughput as _train_throughput

_table, peak_memory = _train_throughput._table, _train_throughput.peak_memory
run_timed_steps = _train_throughput.run_timed_steps
synthetic_sequences = _train_throughput.synthetic_sequences

REPO = Path(__file__).resolve().parents[1]
BIG_LEAF = 1 << 20  # leaves of at least this many bytes are listed one by one


def load_config(spec: str):
    """`path[:variant]` -> that config file's `get_config(variant)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("scale_config", REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def leaf_bytes(state, table_rows: int) -> list[dict]:
    """Per state leaf with `table_rows` rows or >= BIG_LEAF bytes: its name, global bytes, and
    bytes on each device."""
    import jax

    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if leaf.nbytes < BIG_LEAF and (not leaf.ndim or leaf.shape[0] != table_rows):
            continue
        per_device = {s.device: s.data.nbytes for s in leaf.addressable_shards}
        rows.append(
            {
                "leaf": jax.tree_util.keystr(path),
                "shape": tuple(leaf.shape),
                "spec": str(leaf.sharding.spec),
                "bytes": leaf.nbytes,
                "device_max": max(per_device.values()),
                "device_min": min(per_device.values()),
            }
        )
    return rows


def compiled_report(compiled, table_rows: int, shards: int) -> dict:
    """memory_analysis() per device and the collectives that move a table shard or more."""
    from onerec_jax.parallel import vocab_parallel

    stats = compiled.memory_analysis()
    moves = vocab_parallel.whole_table_collectives(compiled.as_text(), table_rows // shards)
    return {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
        "table_collectives": len(moves),
        "table_collective_lines": moves[:3],
    }


def run(config, *, steps: int, warmup: int, eval_users: int, seed: int = 0) -> dict:
    """Trains and evaluates `config` on an in-memory catalogue of `config.scale.n_items`."""
    import jax
    from absl import flags, logging

    from onerec_jax.evaluation import ranking
    from onerec_jax.evaluation.evaluator import make_evaluator
    from onerec_jax.parallel import sharding, vocab_parallel
    from onerec_jax.training import train

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
    logging.set_verbosity(logging.WARNING)
    out = {"n_items": config.scale.n_items, "n_devices": jax.device_count()}
    start = time.perf_counter()
    data = synthetic_sequences(config.scale.n_users, config.scale.n_items, seed)
    setup = _train_throughput.train_setup(config, data)
    mesh, rules = setup.mesh, setup.rules
    shards = max(1, vocab_parallel._size(vocab_parallel.vocab_axes()))
    out["vocab_shards"], out["mesh"] = shards, dict(mesh.shape)
    it = iter(train.train_batches(setup, seed))
    batches = [sharding.global_batch(next(it), mesh, rules) for _ in range(2)]
    state = train.initial_state(setup, seed)
    jax.block_until_ready(state)
    out["setup_s"] = time.perf_counter() - start
    table_rows = max(  # the item tables: the params' largest embedding
        leaf.shape[0]
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
        if "embedding" in jax.tree_util.keystr(path) and leaf.ndim == 2
    )
    out["table_rows"] = table_rows
    out["leaves"] = leaf_bytes(state, table_rows)

    rng = jax.random.key(seed)
    start = time.perf_counter()
    step = setup.train_step.compile(state, batches[0], rng)
    out["compile_s"] = time.perf_counter() - start
    out["train_step"] = compiled_report(step, table_rows, shards)
    state, times, losses = run_timed_steps(step, state, batches, rng, warmup, steps)
    out["step_s"] = float(np.median(times))
    out["losses"] = losses
    out["train_peak_rss"], out["peak_source"] = peak_memory()

    if eval_users > 0:
        eval_data = synthetic_sequences(eval_users, config.scale.n_items, seed + 1)
        evaluator = make_evaluator(setup.model, eval_data, config, mesh, rules)
        params = state.params
        table = jax.jit(setup.model.item_table)(params)
        e = config.eval
        b = e.batch_size
        users = jax.numpy.zeros((b, config.model.dim), table.dtype)
        ids = jax.numpy.ones((b,), jax.numpy.int32)
        ranker = ranking.make_ranker(
            mesh,
            k=e.k,
            chunk_size=ranking.cpu_block_sizes(config, mesh)["chunk_size"],
            mask_history=e.mask_history,
            n_items=eval_data.n_items,
            rules=rules,
        )
        out["ranker"] = compiled_report(
            ranker.lower(users, table, ids, jax.numpy.ones((b, 256), jax.numpy.int32)).compile(),
            table_rows,
            shards,
        )
        first, _ = evaluator.evaluate(params, "test")  # compiles once per history width
        steady, _ = evaluator.evaluate(params, "test")
        batches_run = -(-eval_users // b)
        out["eval"] = {
            "users": eval_users,
            "batches": batches_run,
            "first_s": first["seconds"],
            "steady_s": steady["seconds"],
            "batch_s": steady["seconds"] / batches_run,
            "ndcg@10": steady["ndcg@10"],
        }
    out["peak_rss"], out["peak_source"] = peak_memory()
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.3f} GB"


def report(result: dict, config, command: str, markdown: bool) -> str:
    import jax

    c = config
    lines = [
        f"{c.model.name}, dim {c.model.dim}, {result['n_items']:,} items ({result['table_rows']:,} "
        f"table rows), mesh {result['mesh']}, vocab split {result['vocab_shards']} ways, "
        f"{c.loss.name} ({c.loss.n_negatives} negatives), batch {c.train.batch_size} x "
        f"max_len {c.data.max_len}",
        f"{jax.devices()[0].device_kind} x {result['n_devices']}; jax {metadata.version('jax')}, "
        f"flax {metadata.version('flax')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores; {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"command: {command}",
        "",
        _table(
            ["state leaf", "shape", "spec", "global", "per device"],
            [
                [r["leaf"], str(r["shape"]), r["spec"], _gb(r["bytes"]), _gb(r["device_max"])]
                for r in result["leaves"]
            ],
            markdown,
        ),
        "",
    ]
    compiled = [("train step", result["train_step"])]
    if "ranker" in result:
        compiled.append((f"ranker ({c.eval.batch_size} users)", result["ranker"]))
    lines.append(
        _table(
            ["compiled, per device", "arguments", "outputs", "temporaries", "table collectives"],
            [
                [
                    name,
                    _gb(r["argument"]),
                    _gb(r["output"]),
                    _gb(r["temp"]),
                    str(r["table_collectives"]),
                ]
                for name, r in compiled
            ],
            markdown,
        )
    )
    rows = [
        ["setup (data, init)", f"{result['setup_s']:.1f} s"],
        ["train step compile", f"{result['compile_s']:.1f} s"],
        ["train step (median)", f"{1e3 * result['step_s']:,.0f} ms"],
        ["losses", ", ".join(f"{x:.3f}" for x in result["losses"])],
        ["peak RSS after training", _gb(result["train_peak_rss"])],
    ]
    if "eval" in result:
        e = result["eval"]
        rows += [
            [f"evaluation, {e['users']} users, first pass (compiles)", f"{e['first_s']:.1f} s"],
            [f"evaluation, steady, per batch of {c.eval.batch_size}", f"{e['batch_s']:.1f} s"],
        ]
    rows.append(["peak RSS (whole process, all devices)", _gb(result["peak_rss"])])
    lines += ["", _table(["measure", "value"], rows, markdown)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/scale.py", help="path[:variant]")
    p.add_argument("--n_items", type=int, default=0, help="override scale.n_items")
    p.add_argument("--dim", type=int, default=0, help="override model.dim")
    p.add_argument("--mesh", default="", help="override mesh.shape, e.g. 2,1,4")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--eval_users", type=int, default=-1, help="-1: scale.eval_users; 0: none")
    p.add_argument("--train_users", type=int, default=0, help="override scale.n_users")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    config = load_config(args.config)
    if args.n_items:
        config.scale.n_items = args.n_items
    if args.train_users:
        config.scale.n_users = args.train_users
    if args.dim:
        config.model.dim = args.dim
        config.model.mlp_dim = args.dim * (2 if config.model.name == "onerec" else 1)
    if args.mesh:
        config.mesh.shape = tuple(int(x) for x in args.mesh.split(","))
    eval_users = config.scale.eval_users if args.eval_users < 0 else args.eval_users
    result = run(config, steps=args.steps, warmup=args.warmup, eval_users=eval_users)
    command = "python " + " ".join([os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])])
    text = report(result, config, command, args.markdown)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
