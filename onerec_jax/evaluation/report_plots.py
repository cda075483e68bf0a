"""The report's PNG plots: test metrics per run, validation NDCG@10 over training time.

Drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot global state), so they are
safe in tests, threads and machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def plot_test_metrics(rows, path: str | Path) -> None:
    """Grouped bars of test NDCG@10 and HR@10 per run, whiskers = 95% half-widths.

    Args:
      rows: `report.RunRow`s (their `run` and `test[metric] = (mean, ci95)` are read).
      path: the PNG to write.
    """
    n = len(rows)
    fig = Figure(figsize=(max(5.0, 1.0 + 1.1 * n), 4.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(n)
    width = 0.38
    for offset, metric, label in ((-0.5, "ndcg@10", "NDCG@10"), (0.5, "hr@10", "HR@10")):
        means = [r.test[metric][0] for r in rows]
        cis = [r.test[metric][1] for r in rows]
        ax.bar(x + offset * width, means, width, yerr=cis, capsize=3, label=label)
    tilt = n > 3  # long run names side by side would overlap
    ax.set_xticks(
        x, [r.run for r in rows], rotation=30 if tilt else 0, ha="right" if tilt else "center"
    )
    ax.set_ylabel("test metric (95% interval)")
    ax.set_title("Test NDCG@10 and HR@10 per run")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_validation(
    curves: dict[str, list[tuple[float, float]]], path: str | Path, dashed: frozenset = frozenset()
) -> None:
    """One line per run of validation NDCG@10 against training time.

    Args:
      curves: run label -> [(seconds, validation NDCG@10)] in step order.
      path: the PNG to write.
      dashed: labels drawn dashed (runs whose time is measured differently).
    """
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for label, curve in curves.items():
        seconds, scores = zip(*curve, strict=True)
        style = "--" if label in dashed else "-"
        ax.plot(seconds, scores, style, marker="o", markersize=3, label=label)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title("Validation NDCG@10 during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
