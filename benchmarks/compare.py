"""Trains every model variant of one dataset config under one protocol, then writes the report.

  python benchmarks/compare.py --config configs/ml_latest_small.py --root runs/mls \
      [--variants sasrec,onerec] [--seed 1 | --seeds 0,1,2] \
      [--extra data.path=../shared/data/ml-latest-small ...]

Each run trains in its own process, `python -m onerec_jax.main --config CONFIG:<variant>
--workdir WORKDIR`, its output going to WORKDIR/train.log. WORKDIR is ROOT/<variant> (with
--seed, or no seed: the config's own), or ROOT/<variant>/seed<k> for each k of --seeds (config.seed
= k; always a seed folder, even for one seed, so more seeds can be added to the root later). With
--seeds, every variant runs at the first seed, then every variant at the next, and so on. A run
whose results.json exists is skipped (--force deletes its folder and trains it again); an
unfinished one resumes from its checkpoints. A failing run is recorded in WORKDIR/run_status.json
(exit code, last log line) and the others still run. Last, ROOT/report.md and its plots are
written (onerec_jax/evaluation/report.py; with seed folders, also the mean +- sample sd per variant
over seeds) and the report is printed. Exit status 1 if any run failed, 2 if the root mixes the
two layouts for a variant.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from onerec_jax.evaluation import report, report_seeds

# Item-scoring models, then the semantic-id schemes (each tokenizes into its run folder first).
VARIANTS = (
    "pop",
    "bpr",
    "ncf",
    "gru4rec",
    "sasrec",
    "bert4rec",
    "onerec",
    "onerec_sidfeat",
    "tiger",
    "onerec_sid",
)

# (command, log file) -> exit code; tests pass a fake one.
Runner = Callable[[list[str], Path], int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="dataset config file, without a :variant")
    p.add_argument("--root", required=True, type=Path, help="one folder per variant goes here")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed",
        type=int,
        default=None,
        help="config.seed for every variant; runs go in ROOT/<variant>",
    )
    seeds.add_argument(
        "--seeds",
        default=None,
        metavar="K,K,...",
        help="train every variant once per seed, into ROOT/<variant>/seed<k>; the "
        "report gives the mean +- sd over seeds",
    )
    p.add_argument(
        "--extra",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every variant, e.g. train.num_epochs=3",
    )
    p.add_argument("--force", action="store_true", help="retrain runs that have results")
    args = p.parse_args(argv)
    if ":" in Path(args.config).name:
        p.error(f"--config {args.config}: give the file without ':variant'; --variants picks them")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants:
        p.error("--variants is empty: name at least one, e.g. --variants sasrec,onerec")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants {','.join(args.variants)} names a variant twice")
    if args.seeds is not None:
        args.seeds = parse_seeds(args.seeds, p)
    for item in args.extra:
        key = item.partition("=")[0]
        if "=" not in item or not key or key.startswith("-"):
            p.error(f"--extra {item!r}: write KEY=VALUE with a config key, e.g. train.num_epochs=3")
    return args


def parse_seeds(text: str, parser: argparse.ArgumentParser) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; anything else is refused through `parser.error`."""
    seeds = []
    for item in (s.strip() for s in text.split(",")):
        if item and not re.fullmatch(r"[0-9]+", item):
            parser.error(
                f"--seeds {text}: {item!r} is not a non-negative integer; e.g. --seeds 0,1,2"
            )
        if item:
            seeds.append(int(item))
    if not seeds:
        parser.error("--seeds is empty: name at least one, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {text} names a seed twice")
    return seeds


class Run(NamedTuple):
    """One training run the comparison needs."""

    variant: str
    seed: int | None  # config.seed; None: the config's own
    name: str  # its workdir below the root, as the report names it


def planned_runs(args: argparse.Namespace) -> list[Run]:
    """<variant> per variant, or with --seeds <variant>/seed<k>, every variant seed by seed."""
    if args.seeds is None:
        return [Run(v, args.seed, v) for v in args.variants]
    return [Run(v, s, f"{v}/{report_seeds.seed_dir(s)}") for s in args.seeds for v in args.variants]


def layout_conflicts(args: argparse.Namespace) -> list[str]:
    """Why the requested layout cannot go in ROOT: a variant folder already holding the other one
    (the report reads a folder with a run in it as one run and does not look below it)."""
    problems = []
    for variant in args.variants:
        folder = args.root / variant
        seed_folders = folder.is_dir() and any(
            report_seeds.split_seed(child.name) for child in folder.iterdir() if child.is_dir()
        )
        if args.seeds is not None and report.is_run(folder):
            problems.append(
                f"{folder} holds a single-seed run, which would hide seed folders below it from "
                "the report; use another --root for --seeds, or move its files into "
                f"{folder}/seed<k>"
            )
        elif args.seeds is None and seed_folders and not report.is_run(folder):
            problems.append(
                f"{folder} holds per-seed runs (seed<k> folders), which a single run there would "
                "hide from the report; use --seeds K (trains into seed<K>) or another --root"
            )
    return problems


def config_overrides(seed: int | None, extra: list[str]) -> list[str]:
    """`--config.KEY=VALUE` flags (ml_collections config_flags syntax) for every variant."""
    flags = [] if seed is None else [f"--config.seed={seed}"]
    return flags + [f"--config.{item}" for item in extra]


def train_command(config: str, variant: str, workdir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "onerec_jax.main",
        "--config",
        f"{config}:{variant}",
        "--mode",
        "train",
        f"--workdir={workdir}",
        *overrides,
    ]


def run_logged(command: list[str], log: Path) -> int:
    """Runs `command` with stdout and stderr into `log`; returns its exit code."""
    with open(log, "w") as f:
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def error_line(log: Path) -> str:
    """The log's last line naming an error (`error: ...`, `ValueError: ...`), else its last
    non-empty line; progress bars rewrite lines with carriage returns, so those split lines too."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    lines = [s.strip() for s in text.replace("\r", "\n").splitlines() if s.strip()]
    errors = [s for s in lines if re.match(r"^(\w+\.)*\w*(error|exception)\b", s, re.IGNORECASE)]
    return (errors or lines or [""])[-1][:300]


def train_variants(args: argparse.Namespace, runner: Runner = run_logged) -> list[dict]:
    """Trains each planned run not yet done; returns one record per run (status, seconds)."""
    records = []
    for run in planned_runs(args):
        workdir, name = args.root / run.name, run.name
        if (workdir / "results.json").exists() and not args.force:
            print(f"[{name}] skipped: {workdir / 'results.json'} exists (--force retrains)")
            records.append(
                {"variant": run.variant, "seed": run.seed, "run": name, "status": "skipped"}
            )
            continue
        if args.force and workdir.exists():
            shutil.rmtree(workdir)  # else the trainer would resume the finished run
        workdir.mkdir(parents=True, exist_ok=True)
        overrides = config_overrides(run.seed, args.extra)
        command = train_command(args.config, run.variant, workdir, overrides)
        log = workdir / "train.log"
        print(f"[{name}] training in {workdir} (log: {log})", flush=True)
        start = time.perf_counter()
        code = runner(command, log)
        seconds = time.perf_counter() - start
        status = {
            "variant": run.variant,
            "seed": run.seed,
            "command": command,
            "returncode": code,
            "wall_seconds": seconds,
            "log": log.name,
            "error": error_line(log) if code else None,
        }
        (workdir / report.RUN_STATUS).write_text(json.dumps(status, indent=2))
        outcome = "done" if code == 0 else f"FAILED (exit {code}): {status['error']}"
        print(f"[{name}] {outcome} in {seconds:,.0f}s wall", flush=True)
        records.append({**status, "run": name, "status": "done" if code == 0 else "failed"})
    return records


def main(argv: list[str] | None = None, runner: Runner = run_logged) -> int:
    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    problems = layout_conflicts(args)
    if problems:
        print("error: " + "\nerror: ".join(problems), file=sys.stderr)
        return 2
    records = train_variants(args, runner)
    path = report.write_report(args.root)
    print()
    print(path.read_text())
    print(f"report: {path}")
    for r in records:
        if "wall_seconds" in r:
            print(f"  {r['run']}: {r['status']}, {r['wall_seconds']:,.0f}s wall")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
