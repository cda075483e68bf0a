"""Generative models at ML-25M shapes: training step time and beam-search evaluation time.

  python benchmarks/generative_eval.py --variants onerec_sid,tiger --users 162541 --beam 20

No file is read: users are synthetic with ML-25M's shape (`train_throughput.synthetic_sequences`:
59,047 items, lognormal lengths, median 71), semantic ids are random codes (3 levels x 256 +
the collision token; timing does not depend on what the codes mean), and params are freshly
initialised (beam search costs the same whatever the weights). Per variant, in this process:
the jitted `train_step` of training/train.py compiled and timed over `--steps` steps (targets/s =
real target items per step / median step time), then `Evaluator.evaluate(params, "test")` over
`--users` users twice: the first pass includes compilation (one per history width), the second is
the steady time, extrapolated linearly to 162,541 users when fewer are run.

An item model among `--variants` (e.g. sasrec) is timed the same way on the same synthetic users,
so `--variants sasrec,onerec_sid --extra data.max_len=50` compares them on the same shapes (its
evaluation is the full ranking); `--extra KEY=VALUE ...` overrides every variant's config.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import train_throughput as _train_throughput

ML25M_ITEMS, ML25M_USERS = _train_throughput.ML25M_ITEMS, _train_throughput.ML25M_USERS
synthetic_sequences = _train_throughput.synthetic_sequences
time_train_steps = _train_throughput.time_train_steps
train_setup = _train_throughput.train_setup


def run_variant(args, variant: str, ids_path: str) -> dict:
    from absl import flags, logging

    from onerec_jax.defaults import apply_variant, base_config
    from onerec_jax.evaluation.evaluator import make_evaluator

    flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
    logging.set_verbosity(logging.WARNING)
    c = apply_variant(base_config(), variant)
    c.model.side_features = ()  # no item file
    c.model.semantic_ids = ids_path
    c.train.num_steps = 10_000  # only shapes the learning-rate schedule
    c.data.bucket_boundaries = ()  # full-width windows: one compilation
    c.eval.beam = args.beam
    for key, value in args.extra:
        section, field = key.split(".")
        c[section][field] = (
            type(c[section][field])(value)
            if not isinstance(c[section][field], bool)
            else value.lower() in ("1", "true")
        )
    if args.eval_batch:
        c.eval.batch_size = args.eval_batch
    data = synthetic_sequences(args.train_users, args.n_items, args.seed)
    setup = train_setup(c, data)
    state, host, compile_s, times, _ = time_train_steps(setup, args.seed, args.warmup, args.steps)
    targets = float(np.mean([b["mask"].sum() for b in host]))
    step_s = float(np.median(times))
    row = {
        "variant": variant,
        "batch": c.train.batch_size,
        "max_len": c.data.max_len,
        "targets_per_step": targets,
        "step_ms": 1e3 * step_s,
        "targets_per_s": targets / step_s,
        "compile_s": compile_s,
        "beam": args.beam,
        "eval_batch": c.eval.batch_size,
    }
    print("TRAIN " + json.dumps(row), flush=True)
    if args.users > 0:
        eval_data = synthetic_sequences(args.users, args.n_items, args.seed + 1)
        evaluator = make_evaluator(setup.model, eval_data, c, setup.mesh, setup.rules)
        params = state.params
        first, _ = evaluator.evaluate(params, "test")
        steady, _ = evaluator.evaluate(params, "test") if args.twice else (first, None)
        row.update(
            users=args.users,
            first_s=first["seconds"],
            steady_s=steady["seconds"],
            full_s=steady["seconds"] * ML25M_USERS / args.users,
            extrapolated=args.users != ML25M_USERS,
        )
        print("EVAL " + json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="onerec_sid,tiger")
    p.add_argument("--users", type=int, default=ML25M_USERS, help="evaluated users (0: none)")
    p.add_argument("--beam", type=int, default=0, help="eval.beam (0: eval.k, the default)")
    p.add_argument("--eval_batch", type=int, default=0, help="users per batch (0: the variant's)")
    p.add_argument("--twice", action="store_true", help="evaluate twice; report the second")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train_users", type=int, default=4096)
    p.add_argument("--n_items", type=int, default=ML25M_ITEMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--extra",
        nargs="+",
        default=[],
        type=lambda kv: tuple(kv.split("=", 1)),
        metavar="KEY=VALUE",
        help="config overrides for every variant (scalars), e.g. loss.name=sampled_softmax",
    )
    args = p.parse_args()

    from onerec_jax.tokenize.semantic_ids import random_codes

    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "semantic_ids.npz"
        random_codes(args.n_items, 3, 256, args.seed).save(ids)
        rows = [run_variant(args, v, str(ids)) for v in args.variants.split(",")]
    when = datetime.date.today().isoformat()
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, {when}, beam {args.beam}")
    print("| variant | train step ms | targets/s | eval s (users) | all 162,541 users s |")
    print("|---|---|---|---|---|")
    for r in rows:
        ev = f"{r['steady_s']:.0f} ({r['users']:,})" if "steady_s" in r else "-"
        full = f"{r['full_s']:.0f}" if "full_s" in r else "-"
        cells = [r["variant"], f"{r['step_ms']:.0f}", f"{r['targets_per_s']:,.0f}", ev, full]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
