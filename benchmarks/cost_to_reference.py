"""CPU-seconds our runs need to reach the reference's best validation NDCG@10.

  python benchmarks/cost_to_reference.py --runs runs/mls/sasrec/seed* \
      --reference runs/reference/seed*.json

For each reference run (`benchmarks/reference_sasrec.py` output: its best validation V and the
CPU-seconds C it took to reach it) and each of our runs (a workdir with results.json), prints the
process CPU-seconds at our first validation scoring >= V, and that as a fraction of C; then the
means. The issue's goal is a fraction <= 0.5.

With several reference seeds it also compares against the pooled reference: the mean of their
best validations, reached for the mean of their CPU-seconds to best, and counts the runs and
pairs that reach the target at all and within half the CPU-seconds (a run that never reaches it
counts against, not out of, those counts; the mean fraction is over the runs that reached it).

Our CPU-seconds at each validation come from results.json's history (4th column, runs from
2026-12-06 on). Older runs lack it: their CPU-seconds at a validation are estimated as
cpu_seconds x (wall-clock seconds since the first metrics.jsonl line / the run's last line),
which is exact up to start-up when the run had a core to itself (taskset); such rows are marked
"est.". Runs never reaching V print "not reached" with their best validation.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cpu_curve(workdir: Path) -> tuple[list[tuple[float, float]], bool]:
    """[(CPU-seconds so far, val NDCG@10)] at every validation of a run; True if estimated."""
    result = json.loads((workdir / "results.json").read_text())
    history = result["history"]
    if history and all(len(row) >= 4 for row in history):
        return [(float(row[3]), float(row[2])) for row in history], False
    times: dict[int, float] = {}
    first = last = None
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        first = row["time"] if first is None else first
        last = row["time"]
        if "val/ndcg@10" in row:
            times[int(row["step"])] = row["time"]
    wall = max(last - first, 1e-9)
    scale = result["cpu_seconds"] / wall
    curve = [((times[int(step)] - first) * scale, float(score)) for step, _, score, *_ in history]
    return curve, True


def first_reaching(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((cpu for cpu, score in curve if score >= target), None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="our run workdirs")
    p.add_argument("--reference", nargs="+", type=Path, required=True, help="reference JSONs")
    args = p.parse_args(argv)
    refs = [json.loads(path.read_text()) for path in args.reference]
    ours = {run: cpu_curve(run) for run in args.runs if (run / "results.json").exists()}
    print(
        "| reference seed | its best val NDCG@10 | its CPU-s to best | our run | our CPU-s "
        "to reach it | fraction |"
    )
    print("|---|---|---|---|---|---|")
    fractions = []
    for ref, path in zip(refs, args.reference, strict=True):
        target, cost = ref["valid"]["ndcg@10"], ref["cpu_seconds_to_best"]
        for run, (curve, estimated) in ours.items():
            reached = first_reaching(curve, target)
            name = f"{run}{' (est.)' if estimated else ''}"
            if reached is None:
                best = max(score for _, score in curve)
                print(
                    f"| {path.stem} | {target:.4f} | {cost:,.0f} | {name} | not reached "
                    f"(best {best:.4f}) | - |"
                )
                continue
            fractions.append(reached / cost)
            print(
                f"| {path.stem} | {target:.4f} | {cost:,.0f} | {name} | {reached:,.0f} | "
                f"{reached / cost:.2f} |"
            )
    pairs = len(refs) * len(ours)
    if fractions:
        print(
            f"\nfraction of the reference's CPU-seconds, mean +- sd over {len(fractions)} "
            f"pairs that reached it: {_mean_sd(fractions)}"
        )
    print(
        f"pairs reaching the reference's best: {len(fractions)} of {pairs}; within half its "
        f"CPU-seconds: {sum(f <= 0.5 for f in fractions)} of {pairs}"
    )
    if len(refs) > 1 and ours:
        pooled(refs, ours)


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def pooled(refs: list[dict], ours: dict) -> None:
    """Our runs against the reference seeds' mean best validation and mean CPU-s to it."""
    target = statistics.mean(ref["valid"]["ndcg@10"] for ref in refs)
    cost = statistics.mean(ref["cpu_seconds_to_best"] for ref in refs)
    print(
        f"\npooled reference ({len(refs)} seeds): best val NDCG@10 {target:.4f} "
        f"(sd {statistics.stdev(ref['valid']['ndcg@10'] for ref in refs):.4f}), CPU-s to best "
        f"{cost:,.0f}"
    )
    fractions = []
    for run, (curve, _) in ours.items():
        reached = first_reaching(curve, target)
        if reached is None:
            print(f"- {run}: not reached (best {max(s for _, s in curve):.4f})")
            continue
        fractions.append(reached / cost)
        print(f"- {run}: {reached:,.0f} CPU-s, fraction {reached / cost:.2f}")
    line = f"runs reaching it: {len(fractions)} of {len(ours)}; within half: "
    line += f"{sum(f <= 0.5 for f in fractions)} of {len(ours)}"
    if fractions:
        line += f"; fraction {_mean_sd(fractions)}"
    print(line)


if __name__ == "__main__":
    main()
