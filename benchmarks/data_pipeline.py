"""Data pipeline speed and memory at full ML-25M scale, against a pandas baseline.

  python benchmarks/data_pipeline.py --data /tmp/synth25m        # reuses the data if present

Stages, each in the same process with the peak RSS reset before it (Linux clear_refs):
parse ratings.csv (pyarrow), build sequences (k-core, stable sort, dense ids, leave-one-out
views), write the cache, reload the cache (in a fresh process, as a later run would). The pandas
baseline runs in its own process: read_csv, stable sort by (userId, timestamp), id remap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _stage(results: dict, name: str, fn):
    _reset_peak()
    start = time.perf_counter()
    out = fn()
    results[name] = {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb()}
    print(
        f"  {name:<16} {results[name]['seconds']:7.2f} s  {results[name]['peak_rss_mb']:7.0f} MB",
        file=sys.stderr,
    )
    return out


def run_ours(data_dir: str, cache: str) -> dict:
    from onerec_jax.data import movielens, sequences

    results = {}
    opts = sequences.SequenceOptions()
    path = os.path.join(data_dir, "ratings.csv")
    inter = _stage(results, "parse", lambda: movielens.read_ratings_csv(path))
    data = _stage(results, "build sequences", lambda: sequences.build_sequences(inter, opts))
    _stage(results, "write cache", lambda: sequences.save_sequences(data, cache, "bench"))
    results["rows"] = data.n_interactions
    results["users"], results["items"] = data.n_users, data.n_items
    return results


def run_reload(cache: str) -> dict:
    from onerec_jax.data import sequences

    results = {}
    _stage(results, "reload cache", lambda: sequences.load_sequences(cache, "bench"))
    return results


def run_pandas(data_dir: str) -> dict:
    import pandas as pd

    results = {}
    path = os.path.join(data_dir, "ratings.csv")
    df = _stage(results, "read_csv", lambda: pd.read_csv(path))

    def sort_and_remap():
        out = df.sort_values(["userId", "timestamp"], kind="stable")
        out["user"] = pd.factorize(out["userId"], sort=True)[0]
        out["item"] = pd.factorize(out["movieId"], sort=True)[0] + 1
        return out

    _stage(results, "sort + remap", sort_and_remap)
    return results


def _subprocess(kind: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--_child", kind, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_runs(runs: list[dict]) -> dict:
    """Per stage: median seconds, (min, max) seconds, and the largest peak RSS over runs."""
    out = {}
    for name, first in runs[0].items():
        if not isinstance(first, dict):
            out[name] = first
            continue
        secs = sorted(r[name]["seconds"] for r in runs)
        out[name] = {
            "seconds": secs[len(secs) // 2],
            "range": (secs[0], secs[-1]),
            "peak_rss_mb": max(r[name]["peak_rss_mb"] for r in runs),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/synth25m", help="ML-25M-layout folder")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians reported")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        kind, *rest = args._child
        fn = {"ours": run_ours, "reload": run_reload, "pandas": run_pandas}[kind]
        print(json.dumps(fn(*rest)))
        return
    if not (Path(args.data) / "ratings.csv").exists():
        from onerec_jax.data import synthetic

        print(f"writing synthetic ML-25M to {args.data} (once) ...", file=sys.stderr)
        synthetic.write_synthetic(synthetic.SyntheticConfig.ml25m(), args.data)
    ours_runs, base_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "sequences.npz")
        for r in range(args.repeats):  # interleaved, so drift in the machine hits both sides
            print(f"run {r + 1}/{args.repeats} onerec_jax:", file=sys.stderr)
            ours_runs.append(_subprocess("ours", args.data, cache))
            ours_runs[-1].update(_subprocess("reload", cache))
            print(f"run {r + 1}/{args.repeats} pandas baseline:", file=sys.stderr)
            base_runs.append(_subprocess("pandas", args.data))
    ours, base = _median_runs(ours_runs), _median_runs(base_runs)
    build_runs = [
        sum(r[k]["seconds"] for k in ("parse", "build sequences", "write cache")) for r in ours_runs
    ]
    pandas_runs = [sum(v["seconds"] for v in r.values()) for r in base_runs]
    build, pandas_total = (
        sorted(build_runs)[len(build_runs) // 2],
        sorted(pandas_runs)[len(pandas_runs) // 2],
    )
    peak = max(v["peak_rss_mb"] for v in ours.values() if isinstance(v, dict))
    rows = [(f"onerec_jax {k}", v) for k, v in ours.items() if isinstance(v, dict)]
    rows += [(f"pandas {k}", v) for k, v in base.items()]
    print(
        f"\n{ours['rows']:,} interactions, {ours['users']:,} users, {ours['items']:,} items; "
        f"{platform.machine()}, {os.cpu_count()} cores; median of {args.repeats} runs\n"
    )
    print("| stage | wall s (median) | min - max | peak RSS MB |\n|---|---|---|---|")
    for name, v in rows:
        lo, hi = v["range"]
        print(f"| {name} | {v['seconds']:.2f} | {lo:.2f} - {hi:.2f} | {v['peak_rss_mb']:,.0f} |")
    print(
        f"| **onerec_jax full build** (parse + build + write) | **{build:.2f}** | "
        f"{min(build_runs):.2f} - {max(build_runs):.2f} | {peak:,.0f} |"
    )
    print(
        f"| **pandas baseline** (read + sort + remap) | **{pandas_total:.2f}** | "
        f"{min(pandas_runs):.2f} - {max(pandas_runs):.2f} | |"
    )
    print(
        f"\nratio full build / pandas = {build / pandas_total:.2f} (goal <= 0.7); "
        f"peak RSS {peak / 1024:.2f} GB (goal <= 2.5); "
        f"reload {ours['reload cache']['seconds']:.2f} s (goal < 1)"
    )


if __name__ == "__main__":
    main()
