"""`write_report(root)`: every run's results.json under `root` in one table, report.md + plots.

A run is a directory holding `config.json`, `results.json`, `checkpoints/` or `run_status.json`
(what `benchmarks/compare.py` leaves beside each run it launches). A run whose results.json is
missing, unreadable, incomplete or not finite is listed with the reason under "Runs without
usable results", never dropped. Test numbers are those of the checkpoint selected on validation
NDCG@10 (PROTOCOL.md), which the table shows beside them. Runs in `seed<k>` folders (what
`benchmarks/compare.py --seeds` writes) are also summarised per variant over seeds
(report_seeds.py: mean +- sample sd, seeds left out with the reason) with a plot of the spread.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

from onerec_jax.errors import UserError
from onerec_jax.evaluation import report_plots, report_seeds

RUN_MARKERS = ("config.json", "results.json", "checkpoints", "run_status.json")
RUN_STATUS = "run_status.json"  # written by a launcher: command, returncode, wall_seconds, error
TEST_METRICS = (("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"), ("mrr", "MRR"))
REPORT, BARS_PNG, VALIDATION_PNG = "report.md", "report_ndcg_hr.png", "report_validation.png"
SEEDS_PNG = "report_seeds.png"  # per-seed points and mean +- sd per variant


@dataclasses.dataclass
class RunRow:
    """One usable run: the numbers of its results.json, as the report shows them."""

    run: str  # the run directory, relative to the report's root
    model: str  # config.model.name
    data: str  # data.release, data.synthetic or data.path
    users: int  # users in the data after filtering
    protocol: dict  # results.json "protocol" (split, mask_history, max_len, filters, ranking)
    loss: str  # the training objective: config.loss.name or the model's own ("?": no config)
    test: dict[str, tuple[float, float]]  # metric -> (mean, 95% half-width) on test
    val_ndcg10: float  # validation NDCG@10 of the selected checkpoint
    best_step: int  # the selected checkpoint
    steps: int  # steps trained
    params: int
    train_seconds: float
    eval_seconds: float
    curve: list[tuple[float, float]]  # (training seconds, validation NDCG@10) per validation
    # test metrics of the cold-start segments (evaluator.segments): name -> {"n_users", metric:
    # (mean, 95% half-width)}; empty when the test split had none
    segments: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BrokenRun:
    """A run without usable results, the reason, and any validation curve it logged."""

    run: str
    reason: str
    curve: list[tuple[float, float]]  # (wall seconds since its first log line, val NDCG@10)


class _Unusable(Exception):
    """results.json cannot be reported; the message is the reason shown."""


def is_run(path: Path) -> bool:
    """Whether `path` holds a run (any of RUN_MARKERS)."""
    return any((path / m).exists() for m in RUN_MARKERS)


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (itself included), sorted with numbers by value (seed2
    before seed10); a run's own subfolders are not searched (checkpoints and TensorBoard folders
    are not runs)."""
    if is_run(root):
        return [root]
    children = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    found = []
    for child in sorted(children, key=lambda p: report_seeds.natural_key(p.name)):
        found += find_runs(child)
    return found


def collect_runs(root: str | Path) -> tuple[list[RunRow], list[BrokenRun]]:
    """The report's rows as data: usable runs and runs without usable results, by run path."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root}: no such directory; pass the folder holding the runs "
            "(--workdir of --mode report, --root of benchmarks/compare.py)."
        )
    rows, broken = [], []
    for run_dir in find_runs(root):
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        try:
            rows.append(_read_row(run_dir, name))
        except _Unusable as e:
            broken.append(BrokenRun(name, str(e), validation_log_curve(run_dir / "metrics.jsonl")))
    return rows, broken


def _number(results: dict, key: str) -> float:
    value = results
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise _Unusable(f"results.json lacks {key}")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Unusable(f"results.json {key} is not a number ({value!r})")
    if not math.isfinite(value):
        raise _Unusable(f"results.json {key} is {value} (a diverged or empty evaluation)")
    return value


def _read_row(run_dir: Path, name: str) -> RunRow:
    path = run_dir / "results.json"
    if not path.exists():
        raise _Unusable(_missing_reason(run_dir))
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise _Unusable(f"results.json cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Unusable(f"results.json is not valid JSON ({e})") from None
    if not isinstance(results, dict):
        raise _Unusable("results.json does not hold a JSON object")
    for key in ("model", "data", "protocol"):
        if key not in results:
            raise _Unusable(f"results.json lacks {key}")
    if not isinstance(results["protocol"], dict) or not isinstance(results["data"], dict):
        raise _Unusable("results.json protocol and data are not JSON objects")
    test = {
        m: (_number(results, f"test.{m}"), _number(results, f"test.{m}_ci95"))
        for m, _ in TEST_METRICS
    }
    return RunRow(
        run=name,
        model=str(results["model"]),
        data=str(results["data"].get("source", "?")),
        users=int(_number(results, "data.users")),
        protocol=results["protocol"],
        loss=_config_loss(run_dir / "config.json"),
        test=test,
        val_ndcg10=_number(results, "val.ndcg@10"),
        best_step=int(_number(results, "best_step")),
        steps=int(_number(results, "steps")),
        params=int(_number(results, "params")),
        train_seconds=_number(results, "train_seconds"),
        eval_seconds=_number(results, "eval_seconds"),
        curve=_history_curve(results.get("history")),
        segments=_segments(results.get("test")),
    )


def _segments(test) -> dict:
    """{segment: {"n_users": n, metric: (mean, ci95)}} from results.json's test metrics."""
    out: dict = {}
    if not isinstance(test, dict):
        return out
    for key, value in test.items():
        name, _, metric = key.partition("/")
        if not metric or not isinstance(value, int | float):
            continue
        seg = out.setdefault(name, {})
        if metric == "n_users":
            seg["n_users"] = int(value)
        elif any(metric == m for m, _ in TEST_METRICS):
            seg[metric] = (float(value), float(test.get(f"{key}_ci95", float("nan"))))
    graded = test.get("graded_ndcg@10")
    if isinstance(graded, int | float) and isinstance(test.get("n_users"), int | float):
        out["all, rating as gain"] = {
            "n_users": int(test["n_users"]),
            "ndcg@10": (float(graded), float("nan")),
        }
    return {k: v for k, v in out.items() if v.get("n_users")}


def _missing_reason(run_dir: Path) -> str:
    try:
        status = json.loads((run_dir / RUN_STATUS).read_text())
    except (OSError, ValueError):
        status = {}
    if isinstance(status, dict) and status.get("returncode", 0) != 0:
        error = status.get("error") or "no message"
        return f"no results.json: training failed (exit {status['returncode']}): {error}"
    ckpt = run_dir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
    if steps:
        return (
            f"no results.json; checkpoints up to step {max(steps)}: unfinished or killed "
            "(rerun the same command to resume)"
        )
    return "no results.json and no checkpoint: not started, or stopped before its first validation"


# Models that train with their own objective rather than config.loss.
_OWN_LOSS = {"pop": "none (counts)", "bpr": "BPR pairwise", "ncf": "BCE, sampled negatives"}


def _config_loss(path: Path) -> str:
    try:
        config = json.loads(path.read_text())
        own = _OWN_LOSS.get(config.get("model", {}).get("name"))
        return own or str(config["loss"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _history_curve(history) -> list[tuple[float, float]]:
    """results.json "history" rows are [step, training seconds so far, val NDCG@10, process
    CPU-seconds so far] (runs before 2026-12-06 lack the last). The training seconds are
    wall-clock time spent in training steps, validation excluded; they carry over a resume, so a
    killed and resumed run's curve has no gap. Rows that are not 3 or 4 numbers are left out.
    """
    curve = []
    for row in history if isinstance(history, list) else []:
        numbers = isinstance(row, list) and len(row) in (3, 4)
        numbers = numbers and all(isinstance(v, int | float) for v in row)
        if numbers and math.isfinite(row[1]) and math.isfinite(row[2]):
            curve.append((float(row[1]), float(row[2])))
    return curve


def validation_log_curve(path: Path) -> list[tuple[float, float]]:
    """(wall seconds since the file's first line, val NDCG@10) from a metrics.jsonl, one point
    per step (a resumed run logs some steps twice: the later line wins). For runs without
    results.json only: this time includes validation and any pause between a kill and a resume.
    Lines that do not parse (a write cut by a kill) are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    start, by_step = None, {}
    for line in lines:
        try:
            row = json.loads(line)
            t = float(row["time"])
        except (ValueError, KeyError, TypeError):
            continue
        start = t if start is None else start
        score = row.get("val/ndcg@10")
        if isinstance(score, int | float) and math.isfinite(score) and "step" in row:
            by_step[row["step"]] = (t - start, float(score))
    return [by_step[s] for s in sorted(by_step)]


def _protocol_text(row: RunRow) -> str:
    p = row.protocol
    rating = p.get("min_rating")
    parts = [
        "all ratings" if rating is None else f"ratings >= {rating}",
        f"k-core {p.get('min_user_interactions', '?')}/{p.get('min_item_interactions', '?')}",
        f"max_len {p.get('max_len', '?')}",
        "history masked" if p.get("mask_history") else "history NOT masked",
        f"loss {row.loss}",
    ]
    if p.get("split", "leave-one-out") != "leave-one-out":
        parts.append(f"{p.get('split')} split")
    if p.get("ranking", "full") != "full":  # generative: top-K by beam search, exact @K <= K
        parts.append(f"top-K by {p.get('ranking')}")
    return ", ".join(parts)


def _comparable_key(row: RunRow) -> tuple:
    p = row.protocol
    # Not "ranking": a beam-searched top-K gives the same HR/NDCG/MRR@K as a full ranking
    # would for K up to its length, so those rows compare with the full-ranking ones.
    keys = ("split", "mask_history", "min_rating", "min_user_interactions", "min_item_interactions")
    return (row.data, *(str(p.get(k)) for k in keys))


def _cell(text: str, best: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if best else text


def _seconds(s: float) -> str:
    return f"{s:,.0f}" if s >= 10 else f"{s:.1f}"


def format_report(
    rows: list[RunRow],
    broken: list[BrokenRun],
    plots: list[str],
    groups: Sequence[report_seeds.SeedGroup] = (),
) -> str:
    """report.md's text: the table (best of each metric column in bold), plots, the summary over
    seeds when `groups` is not empty, broken runs."""
    lines = [
        "# Model comparison",
        "",
        f"{len(rows)} run(s) with results, {len(broken)} without. Test metrics are read once, on "
        "the checkpoint with the best validation NDCG@10 (shown with its step). Intervals are "
        "95% half-widths (normal approximation over test users). **Bold**: best in its column.",
        "",
    ]
    if len({_comparable_key(r) for r in rows}) > 1:
        lines += ["Note: the rows differ in data or protocol; compare their numbers with care.", ""]
    metric_cols = [f"test {label}" for _, label in TEST_METRICS] + ["val NDCG@10 (step)"]
    header = ["run", "model", "data", "protocol", *metric_cols, "params", "train s", "eval s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {m: max((r.test[m][0] for r in rows), default=None) for m, _ in TEST_METRICS}
    best_val = max((r.val_ndcg10 for r in rows), default=None)
    for r in rows:
        text = [r.run, r.model, f"{r.data} ({r.users:,} users)", _protocol_text(r)]
        cells = [_cell(t, False) for t in text]
        for m, _ in TEST_METRICS:
            mean, ci = r.test[m]
            cells.append(_cell(f"{mean:.4f} +- {ci:.4f}", mean == best[m]))
        val = f"{r.val_ndcg10:.4f} (step {r.best_step:,} of {r.steps:,})"
        cells += [
            _cell(val, r.val_ndcg10 == best_val),
            f"{r.params:,}",
            _seconds(r.train_seconds),
            _seconds(r.eval_seconds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (no run with usable results) |" + " |" * (len(header) - 1))
    lines.append("")
    for png in (p for p in plots if p != SEEDS_PNG):  # the seeds plot goes in its section
        caption = {
            BARS_PNG: "Test NDCG@10 and HR@10 with 95% intervals",
            VALIDATION_PNG: "Validation NDCG@10 against training time",
        }[png]
        lines += [f"![{caption}]({png})", ""]
    if VALIDATION_PNG in plots:
        lines += [
            "Training time in the validation plot: results.json's history (wall-clock seconds in "
            "training steps, validation excluded); for runs without results, metrics.jsonl's "
            "wall clock since its first line (validation and pauses included; dashed).",
            "",
        ]
    lines += _segment_section(rows)
    if groups:
        lines += report_seeds.format_seed_section(groups, SEEDS_PNG if SEEDS_PNG in plots else None)
    lines += ["## Runs without usable results", ""]
    if broken:
        lines += ["| run | reason |", "|---|---|"]
        lines += [f"| {_cell(b.run, False)} | {_cell(b.reason, False)} |" for b in broken]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _mean_ci(mean: float, ci: float) -> str:
    return f"{mean:.4f}" if math.isnan(ci) else f"{mean:.4f} +- {ci:.4f}"


def _segment_section(rows: list[RunRow]) -> list[str]:
    """The test metrics of cold targets, warm targets and new users (data/cold_start.py), for
    the runs whose test split has such segments."""
    if not any(r.segments for r in rows):
        return []
    lines = [
        "## Test metrics by segment",
        "",
        "cold: the test target had no training interaction (held out by data.cold_items, or "
        "absent from training); warm: the rest; new_users: at most data.new_user_items training "
        "interactions; liked / disliked: the test target was rated >= 4 / <= 2.5; all, rating as "
        "gain: NDCG@10 with the target's rating / the highest rating as its gain.",
        "",
        "| run: segment | users | " + " | ".join(f"test {lb}" for _, lb in TEST_METRICS) + " |",
        "|---|---|" + "---|" * len(TEST_METRICS),
    ]
    for r in rows:
        for name, seg in sorted(r.segments.items()):
            cells = [_mean_ci(*seg[m]) if m in seg else "-" for m, _ in TEST_METRICS]
            lines.append(
                f"| {_cell(f'{r.run}: {name}', False)} | {seg['n_users']:,} | "
                + " | ".join(cells)
                + " |"
            )
    return lines + [""]


def write_report(root: str | Path) -> Path:
    """Writes `root/report.md` and its PNG plots for every run under `root`; returns its path."""
    root = Path(root)
    rows, broken = collect_runs(root)
    # A root that is itself a run named seed<k> is one run, not a variant over seeds.
    groups = [] if is_run(root) else report_seeds.group_by_seed(rows, broken, root.resolve().name)
    plots = []
    for png in (BARS_PNG, VALIDATION_PNG, SEEDS_PNG):
        (root / png).unlink(missing_ok=True)  # a stale plot must not outlive its data
    if rows:
        report_plots.plot_test_metrics(rows, root / BARS_PNG)
        plots.append(BARS_PNG)
    curves = {r.run: r.curve for r in rows if r.curve}
    unfinished = {f"{b.run} (no results)": b.curve for b in broken if b.curve}
    curves.update(unfinished)
    if curves:
        report_plots.plot_validation(curves, root / VALIDATION_PNG, frozenset(unfinished))
        plots.append(VALIDATION_PNG)
    if any(g.used for g in groups):
        report_plots.plot_seed_spread(groups, root / SEEDS_PNG)
        plots.append(SEEDS_PNG)
    path = root / REPORT
    path.write_text(format_report(rows, broken, plots, groups))
    return path
