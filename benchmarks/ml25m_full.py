"""What the full ML-25M recipe costs: prepare, one SASRec and one OneRec epoch, full-ranking test.

  python benchmarks/ml25m_full.py --data /tmp/synth25m --root runs/ml25m_full --markdown
  python benchmarks/ml25m_full.py --data DIR --root R --max_steps 2 --extra data.max_len=20  # smoke

Each stage is one run of the real entry point in its own process, its output in ROOT/<stage>.log:
  prepare   `--mode prepare` with an empty sequence cache (ROOT/cache): parse, k-core, dense ids,
            leave-one-out views, cache write, then the item side (movies, tags, genome).
  sasrec    `--config CONFIG:sasrec --mode train` for one epoch (train.num_epochs=1) with the
  onerec    sampled softmax, validated once at its end on --valid_users users (eval.valid_users),
            then tested on ALL users by full ranking over every item, seen items masked.
Wall time is the parent's clock around the child; peak RSS is the child's own ru_maxrss from
os.wait4 (exact, host memory only: a GPU's memory is not counted). A train stage is split with
what the run records: results.json `train_seconds` (steps, first-step compilation included),
`eval_seconds` minus `test.seconds` (validation, its compilation included) and `test.seconds`;
the rest is start-up, data loading, initialisation and checkpoint writes and reads. Each part's
peak RSS is the largest RSS sampled every --poll_s seconds while it ran (phase ends: the
metrics.jsonl lines written as training, validation and test finish), so a spike shorter than
the interval can be missed. tokens/s: median of the logged windows after the first (which
includes compilation). The table goes to stdout and ROOT/ml25m_full.md, the records to
ROOT/ml25m_full.json. Exit status 1 if any stage failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "sasrec", "onerec")
NAMES = {"sasrec": "SASRec", "onerec": "OneRec (item head)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="folder with ratings.csv, movies.csv")
    p.add_argument("--root", required=True, type=Path, help="workdirs, cache, logs, the table")
    p.add_argument("--config", default="configs/custom.py", help="dataset config, no :variant")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + str(STAGES))
    p.add_argument("--valid_users", type=int, default=10_000, help="validation sample (0: all)")
    p.add_argument(
        "--max_steps", type=int, default=0, help="train this many steps, not 1 epoch (0: 1 epoch)"
    )
    p.add_argument(
        "--extra",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every stage, e.g. model.dim=128",
    )
    p.add_argument("--poll_s", type=float, default=0.5, help="RSS sampling interval, seconds")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages:
        p.error(f"--stages {','.join(args.stages)}: name some of {','.join(STAGES)}")
    if ":" in Path(args.config).name:
        p.error(f"--config {args.config}: give the file without ':variant'")
    for item in args.extra:
        if "=" not in item or item.startswith(("-", "=")):
            p.error(f"--extra {item!r}: write KEY=VALUE with a config key, e.g. model.dim=128")
    return args


def stage_command(args: argparse.Namespace, stage: str) -> list[str]:
    """`python -m onerec_jax.main ...` for `stage`, writing into ROOT/<stage>."""
    root = args.root.resolve()
    common = [
        f"--workdir={root / stage}",
        f"--config.data.path={args.data.resolve()}",
        f"--config.data.cache_dir={root / 'cache'}",
    ]
    if stage == "prepare":
        head, mode = [args.config], ["--mode", "prepare"]
    else:
        head, mode = [f"{args.config}:{stage}"], ["--mode", "train"]
        common += [
            "--config.train.num_epochs=1",
            "--config.loss.name=sampled_softmax",
            f"--config.eval.valid_users={args.valid_users}",
        ]
        if args.max_steps:
            common.append(f"--config.train.num_steps={args.max_steps}")
    extra = [f"--config.{item}" for item in args.extra]
    return [sys.executable, "-m", "onerec_jax.main", "--config", *head, *mode, *common, *extra]


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # gone, or a zombie (no VmRSS line)


def run_measured(command: list[str], log: Path, poll_s: float) -> dict:
    """Runs `command` (output into `log`); returns its exit code, wall seconds, exact peak RSS
    (wait4's ru_maxrss) and (unix time, RSS bytes) samples taken every `poll_s` seconds."""
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)

        def poll():
            while not done.is_set():
                rss = _rss_bytes(proc.pid)
                if rss is not None:
                    samples.append((time.time(), rss))
                done.wait(poll_s)

        sampler = threading.Thread(target=poll, daemon=True)
        sampler.start()
        # Wait for the exit without reaping, so the sampler never reads a reused pid.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "samples": samples,
    }


def _peak(samples: list[tuple[float, int]], start: float, end: float) -> int | None:
    inside = [rss for t, rss in samples if start < t <= end]
    return max(inside) if inside else None


def train_breakdown(workdir: Path, wall: float, samples: list[tuple[float, int]]) -> dict:
    """Splits a train stage by results.json and metrics.jsonl (module docstring)."""
    results = json.loads((workdir / "results.json").read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    ends = {
        key: max((r["time"] for r in rows if key in r), default=None)
        for key in ("train/loss", "val/ndcg@10", "test/ndcg@10")
    }
    train_s, test_s = results["train_seconds"], results["test"]["seconds"]
    valid_s = results["eval_seconds"] - test_s
    rates = [r["train/tokens_per_s"] for r in train_rows]
    t_train, t_val, t_test = ends.values()
    parts = {
        "training": {"seconds": train_s, "peak_rss_bytes": _peak(samples, 0, t_train or 0)},
        "validation": {
            "seconds": valid_s,
            "users": int(results["val"]["n_users"]),
            "peak_rss_bytes": _peak(samples, t_train or 0, t_val or 0),
        },
        "test": {
            "seconds": test_s,
            "users": int(results["test"]["n_users"]),
            "peak_rss_bytes": _peak(samples, t_val or 0, t_test or 0),
        },
        "other": {"seconds": wall - train_s - valid_s - test_s},
    }
    return {
        "parts": parts,
        "steps": results["steps"],
        "params": results["params"],
        "tokens_per_s": statistics.median(rates[1:] or rates) if rates else None,
        "logged_windows": len(rates),
        "final_loss": train_rows[-1]["train/loss"] if train_rows else None,
        "val_ndcg@10": results["val"]["ndcg@10"],
        "test_ndcg@10": results["test"]["ndcg@10"],
        "test_hr@10": results["test"]["hr@10"],
    }


def last_error(log: Path) -> str:
    """The log's last line naming an error, else its last non-empty line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [s.strip() for s in text.replace("\r", "\n").splitlines() if s.strip()]
    errors = [s for s in lines if "error" in s.split(":")[0].lower()]
    return (errors or lines or ["no output"])[-1][:200]


def run_stage(args: argparse.Namespace, stage: str) -> dict:
    root = args.root.resolve()
    workdir = root / stage
    shutil.rmtree(workdir, ignore_errors=True)  # a train stage would resume a finished run
    if stage == "prepare":
        shutil.rmtree(root / "cache", ignore_errors=True)  # measure a cold build
    command = stage_command(args, stage)
    log = root / f"{stage}.log"
    print(f"[{stage}] {shlex.join(command)}\n[{stage}] log: {log}", file=sys.stderr, flush=True)
    run = run_measured(command, log, args.poll_s)
    record = {
        "stage": stage,
        "command": command,
        "log": str(log),
        "returncode": run["returncode"],
        "seconds": run["seconds"],
        "peak_rss_bytes": run["peak_rss_bytes"],
    }
    if run["returncode"]:
        record["error"] = last_error(log)
    elif stage == "prepare":
        record["data"] = json.loads((workdir / "data_stats.json").read_text())
    else:
        record.update(train_breakdown(workdir, run["seconds"], run["samples"]))
    outcome = f"exit {run['returncode']}: {record['error']}" if run["returncode"] else "done"
    print(
        f"[{stage}] {outcome} in {run['seconds']:,.1f} s, peak RSS "
        f"{run['peak_rss_bytes'] / 1e9:.2f} GB",
        file=sys.stderr,
        flush=True,
    )
    return record


def _gb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f}"


def table_rows(records: list[dict]) -> list[list[str]]:
    """stage | wall s | peak RSS GB | notes, with a train stage's parts indented below it."""
    rows = []
    for r in records:
        head = [f"{r['seconds']:,.1f}", _gb(r["peak_rss_bytes"])]
        if "error" in r:
            rows.append([r["stage"], *head, f"FAILED (exit {r['returncode']}): {r['error']}"])
        elif r["stage"] == "prepare":
            d = r["data"]
            rows.append(
                [
                    "prepare (cold cache)",
                    *head,
                    f"{d['interactions']:,} interactions, {d['users']:,} users, "
                    f"{d['items']:,} items",
                ]
            )
        else:
            p = r["parts"]
            rate = "" if r["tokens_per_s"] is None else f", {r['tokens_per_s']:,.0f} tokens/s"
            if r["tokens_per_s"] is not None and r["logged_windows"] == 1:
                rate += " (one logged window: compilation included)"
            rows += [
                [
                    f"{NAMES[r['stage']]}: 1 epoch + test",
                    *head,
                    f"{r['params']:,} params, sampled softmax",
                ],
                [
                    "- training",
                    f"{p['training']['seconds']:,.1f}",
                    _gb(p["training"]["peak_rss_bytes"]),
                    f"{r['steps']:,} steps{rate}, last loss {r['final_loss']:.3f}",
                ],
                [
                    f"- validation ({p['validation']['users']:,} users)",
                    f"{p['validation']['seconds']:,.1f}",
                    _gb(p["validation"]["peak_rss_bytes"]),
                    f"NDCG@10 {r['val_ndcg@10']:.4f}",
                ],
                [
                    f"- test ({p['test']['users']:,} users, full ranking)",
                    f"{p['test']['seconds']:,.1f}",
                    _gb(p["test"]["peak_rss_bytes"]),
                    f"NDCG@10 {r['test_ndcg@10']:.4f}, HR@10 {r['test_hr@10']:.4f}",
                ],
                ["- start-up, data load, checkpoints", f"{p['other']['seconds']:,.1f}", "", ""],
            ]
    total = sum(r["seconds"] for r in records)
    peak = max(r["peak_rss_bytes"] for r in records)
    return rows + [["total", f"{total:,.1f}", _gb(peak), "peak: the largest stage's"]]


def format_table(rows: list[list[str]], markdown: bool) -> str:
    header = ["stage", "wall s", "peak RSS GB", "notes"]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(
            x.ljust(w) if i in (0, 3) else x.rjust(w)
            for i, (x, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [header, *rows]
    )


def describe_machine() -> str:
    """CPU, cores, memory and JAX's default device (asked in a child: a parent holding the
    GPU would take memory from the stages)."""
    probe = (
        "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind}', jax.__version__)"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
        ).stdout.split()
        device, jax_version = " ".join(out[:-1]), out[-1]
    except (subprocess.SubprocessError, IndexError):
        device, jax_version = "unknown device", "?"
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; JAX "
        f"{jax_version} on {device}; Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        for stage in args.stages:
            print(shlex.join(stage_command(args, stage)))
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    records = [run_stage(args, stage) for stage in args.stages]
    invocation = shlex.join(["python", "benchmarks/ml25m_full.py", *(argv or sys.argv[1:])])
    date = datetime.datetime.now().isoformat(timespec="minutes")
    rows = table_rows(records)
    head = f"`{invocation}`\n\nmachine: {machine}; {date}\n\n"
    (args.root / "ml25m_full.md").write_text(head + format_table(rows, markdown=True) + "\n")
    summary = {"command": invocation, "machine": machine, "date": date, "stages": records}
    (args.root / "ml25m_full.json").write_text(json.dumps(summary, indent=2))
    print(head + format_table(rows, args.markdown))
    print(f"\ntable: {args.root / 'ml25m_full.md'}; records: {args.root / 'ml25m_full.json'}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
