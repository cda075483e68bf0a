"""Trains every model variant of one dataset config under one protocol, then writes the report.

  python benchmarks/compare.py --config configs/ml_latest_small.py --root runs/mls \
      [--variants sasrec,onerec] [--seed 1] [--extra data.path=../shared/data/ml-latest-small ...]

Each variant trains in its own process, `python -m onerec_jax.main --config CONFIG:<variant>
--workdir ROOT/<variant>`, its output going to ROOT/<variant>/train.log. A variant whose
results.json exists is skipped (--force deletes its folder and trains it again); an unfinished
one resumes from its checkpoints. A failing variant is recorded in ROOT/<variant>/run_status.json
(exit code, last log line) and the others still run. Last, ROOT/report.md and its plots are
written (onerec_jax/evaluation/report.py) and the table is printed. Exit status 1 if any failed.
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

from onerec_jax.evaluation import report

# Item-scoring models, then the semantic-id schemes (each tokenizes into its run folder first).
VARIANTS = ("pop", "bpr", "ncf", "gru4rec", "sasrec", "bert4rec", "onerec",
            "onerec_sidfeat", "tiger", "onerec_sid")  # fmt: skip

# (command, log file) -> exit code; tests pass a fake one.
Runner = Callable[[list[str], Path], int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="dataset config file, without a :variant")
    p.add_argument("--root", required=True, type=Path, help="one folder per variant goes here")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--seed", type=int, default=None, help="config.seed for every variant")
    p.add_argument("--extra", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for every variant, e.g. train.num_epochs=3")  # fmt: skip
    p.add_argument("--force", action="store_true", help="retrain variants that have results")
    args = p.parse_args(argv)
    if ":" in Path(args.config).name:
        p.error(f"--config {args.config}: give the file without ':variant'; --variants picks them")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants:
        p.error("--variants is empty: name at least one, e.g. --variants sasrec,onerec")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants {','.join(args.variants)} names a variant twice")
    for item in args.extra:
        key = item.partition("=")[0]
        if "=" not in item or not key or key.startswith("-"):
            p.error(f"--extra {item!r}: write KEY=VALUE with a config key, e.g. train.num_epochs=3")
    return args


def config_overrides(seed: int | None, extra: list[str]) -> list[str]:
    """`--config.KEY=VALUE` flags (ml_collections config_flags syntax) for every variant."""
    flags = [] if seed is None else [f"--config.seed={seed}"]
    return flags + [f"--config.{item}" for item in extra]


def train_command(config: str, variant: str, workdir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "onerec_jax.main", "--config", f"{config}:{variant}",
            "--mode", "train", f"--workdir={workdir}", *overrides]  # fmt: skip


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
    """Trains each variant not yet done; returns one record per variant (status, seconds)."""
    overrides = config_overrides(args.seed, args.extra)
    records = []
    for variant in args.variants:
        workdir = args.root / variant
        if (workdir / "results.json").exists() and not args.force:
            print(f"[{variant}] skipped: {workdir / 'results.json'} exists (--force retrains)")
            records.append({"variant": variant, "status": "skipped"})
            continue
        if args.force and workdir.exists():
            shutil.rmtree(workdir)  # else the trainer would resume the finished run
        workdir.mkdir(parents=True, exist_ok=True)
        command = train_command(args.config, variant, workdir, overrides)
        log = workdir / "train.log"
        print(f"[{variant}] training in {workdir} (log: {log})", flush=True)
        start = time.perf_counter()
        code = runner(command, log)
        seconds = time.perf_counter() - start
        status = {"variant": variant, "command": command, "returncode": code,
                  "wall_seconds": seconds, "log": log.name,
                  "error": error_line(log) if code else None}  # fmt: skip
        (workdir / report.RUN_STATUS).write_text(json.dumps(status, indent=2))
        outcome = "done" if code == 0 else f"FAILED (exit {code}): {status['error']}"
        print(f"[{variant}] {outcome} in {seconds:,.0f}s wall", flush=True)
        records.append({**status, "status": "done" if code == 0 else "failed"})
    return records


def main(argv: list[str] | None = None, runner: Runner = run_logged) -> int:
    args = parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    records = train_variants(args, runner)
    path = report.write_report(args.root)
    print()
    print(path.read_text())
    print(f"report: {path}")
    for r in records:
        if "wall_seconds" in r:
            print(f"  {r['variant']}: {r['status']}, {r['wall_seconds']:,.0f}s wall")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
