"""Groups a report's runs by variant across seeds: mean +- sample sd over the seeds that worked.

`benchmarks/compare.py --seeds 0,1,2` trains each variant into ROOT/<variant>/seed<k>. A run
folder named `seed<k>` is seed k of the variant named by the path above it (the report root's
own name when it sits directly under the root). A seed whose run has no usable results, or whose
folder is absent while other variants of the same root have that seed, is listed with the reason
and left out of the means; the number of seeds used is shown. The spread is the sample standard
deviation (ddof=1, n - 1 in the denominator): the seeds are a sample of the seeds one could run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onerec_jax.evaluation.report import BrokenRun, RunRow

SEED_DIR = re.compile(r"seed(0|[1-9][0-9]*)")  # no leading zeros: seed01 would alias seed1
# (key, column) of the numbers averaged over seeds; "val" is the selecting validation NDCG@10.
SUMMARY_METRICS = (
    ("hr@10", "test HR@10"),
    ("ndcg@10", "test NDCG@10"),
    ("mrr", "test MRR"),
    ("val", "val NDCG@10"),
)


def seed_dir(seed: int) -> str:
    """The folder name of one seed's run under its variant's folder."""
    return f"seed{seed}"


def split_seed(run: str) -> tuple[str, int] | None:
    """("sasrec", 2) for the run "sasrec/seed2"; ("", 2) for "seed2"; None outside a seed folder."""
    path = PurePosixPath(run)
    match = SEED_DIR.fullmatch(path.name)
    if match is None:
        return None
    parent = path.parent.as_posix()
    return ("" if parent == "." else parent, int(match.group(1)))


@dataclasses.dataclass
class SeedRun:
    """One seed of a variant: its usable run, or why it is left out of the means."""

    seed: int
    row: RunRow | None  # None: left out
    reason: str = ""  # why it is left out


@dataclasses.dataclass
class SeedGroup:
    """A variant's runs over seeds, sorted by seed."""

    variant: str  # the path above its seed<k> folders, relative to the report's root
    runs: list[SeedRun]

    @property
    def used(self) -> list[RunRow]:
        """The runs that enter the means."""
        return [r.row for r in self.runs if r.row is not None]

    def summary(self) -> dict[str, tuple[float, float]]:
        """SUMMARY_METRICS key -> (mean, sample sd) over the used seeds (see `mean_sd`)."""
        return {key: mean_sd([metric(row, key) for row in self.used]) for key, _ in SUMMARY_METRICS}


def metric(row: RunRow, key: str) -> float:
    """A SUMMARY_METRICS number of one run: a test metric's mean, or "val" NDCG@10."""
    return row.val_ndcg10 if key == "val" else row.test[key][0]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of `values`.

    Returns:
      (mean, sd); sd is nan for a single value (no spread can be estimated), both nan for none.
    """
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), math.nan
    return statistics.fmean(values), statistics.stdev(values)


def group_by_seed(
    rows: list[RunRow], broken: list[BrokenRun], root_name: str = "."
) -> list[SeedGroup]:
    """The runs in seed<k> folders, grouped by variant; runs outside seed folders are ignored.

    A seed that some variant of the root has and another lacks is listed for the latter as
    missing. Groups are in the order of their first run.

    Args:
      rows: the usable runs (report.collect_runs).
      broken: the runs without usable results, with their reasons.
      root_name: the label of seed folders lying directly in the report's root.
    """
    by_variant: dict[str, dict[int, SeedRun]] = {}
    entries = [(r.run, r, "") for r in rows] + [(b.run, None, b.reason) for b in broken]
    for run, row, reason in sorted(entries, key=lambda e: natural_key(e[0])):
        found = split_seed(run)
        if found is not None:
            variant, seed = found
            by_variant.setdefault(variant or root_name, {})[seed] = SeedRun(seed, row, reason)
    all_seeds = {seed for runs in by_variant.values() for seed in runs}
    groups = []
    for variant, runs in by_variant.items():
        for seed in all_seeds - runs.keys():
            folder = f"{variant}/{seed_dir(seed)}"
            reason = f"no folder {folder}: seed {seed} not run here (other variants have it)"
            runs[seed] = SeedRun(seed, None, reason)
        groups.append(SeedGroup(variant, [runs[s] for s in sorted(runs)]))
    return groups


def natural_key(name: str) -> list:
    """Sort key putting "seed2" before "seed10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _cell(text: str, best: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if best else text


def _mean_sd_text(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.4f} +- {sd:.4f}" if not math.isnan(sd) else f"{mean:.4f} (1 seed, no sd)"


def format_seed_section(groups: list[SeedGroup], plot: str | None) -> list[str]:
    """report.md's "Seeds" section: a mean +- sd table, the spread plot, the seeds left out."""
    lines = [
        "## Seeds",
        "",
        "Per variant (its `seed<k>` run folders): mean +- sample standard deviation (ddof=1) over "
        "the seeds with usable results, n of them. Each seed's run, with its own 95% interval, is "
        "a row of the table above; its test NDCG@10 is repeated in the last column. **Bold**: "
        "best mean in its column.",
        "",
    ]
    header = [
        "variant",
        "model",
        "seeds used",
        *(f"{label} mean +- sd" for _, label in SUMMARY_METRICS),
        "test NDCG@10 per seed (95% interval)",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summaries = [g.summary() for g in groups]
    best = {
        key: max((s[key][0] for s in summaries if not math.isnan(s[key][0])), default=None)
        for key, _ in SUMMARY_METRICS
    }
    for group, summary in zip(groups, summaries, strict=True):
        used = group.used
        seeds = ", ".join(str(r.seed) for r in group.runs if r.row is not None)
        count = f"{len(used)} of {len(group.runs)}" + (f" ({seeds})" if seeds else "")
        cells = [_cell(group.variant), _cell(used[0].model if used else "-"), count]
        for key, _ in SUMMARY_METRICS:
            mean, sd = summary[key]
            cells.append(_cell(_mean_sd_text(mean, sd), mean == best[key]))
        per_seed = [
            f"{r.seed}: {r.row.test['ndcg@10'][0]:.4f} +- {r.row.test['ndcg@10'][1]:.4f}"
            if r.row is not None
            else f"{r.seed}: left out"
            for r in group.runs
        ]
        lines.append("| " + " | ".join([*cells, "; ".join(per_seed)]) + " |")
    lines.append("")
    if plot:
        caption = "Test NDCG@10 and HR@10 per seed (95% intervals) and mean +- sd per variant"
        lines += [f"![{caption}]({plot})", ""]
    left_out = [(g.variant, r) for g in groups for r in g.runs if r.row is None]
    lines += ["Seeds left out of the means:", ""]
    if left_out:
        lines += ["| variant | seed | reason |", "|---|---|---|"]
        lines += [f"| {_cell(v)} | {r.seed} | {_cell(r.reason)} |" for v, r in left_out]
    else:
        lines.append("None.")
    return [*lines, ""]
