"""The report's PNG plots: test metrics per run, validation over training time, seed spread.

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


def plot_seed_spread(groups, path: str | Path) -> None:
    """Per variant, each seed's test metric with its 95% interval and the mean +- sd over seeds.

    Two panels, test NDCG@10 and HR@10. Seeds left out of the means are not drawn.

    Args:
      groups: `report_seeds.SeedGroup`s (their `variant`, `runs[i].seed`, `runs[i].row.test` and
        `summary()` are read).
      path: the PNG to write.
    """
    n = len(groups)
    fig = Figure(figsize=(max(6.5, 2.0 + 1.4 * n), 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    x = np.arange(n)
    tilt = n > 3
    for ax, metric, label in zip(axes, ("ndcg@10", "hr@10"), ("NDCG@10", "HR@10"), strict=True):
        for i, group in enumerate(groups):
            used = [r for r in group.runs if r.row is not None]
            # Seeds side by side left of the variant's tick, the mean +- sd right of it.
            offsets = np.linspace(-0.3, -0.05, len(used)) if len(used) > 1 else np.array([-0.15])
            for offset, run in zip(offsets, used, strict=True):
                mean, ci = run.row.test[metric]
                ax.errorbar(
                    i + offset,
                    mean,
                    yerr=ci,
                    fmt="o",
                    color="tab:blue",
                    markersize=4,
                    capsize=2,
                    label="one seed (95% interval)",
                )
            mean, sd = group.summary()[metric]
            if used:
                ax.errorbar(
                    i + 0.2,
                    mean,
                    yerr=None if np.isnan(sd) else sd,
                    fmt="D",
                    color="black",
                    markersize=6,
                    capsize=5,
                    elinewidth=2,
                    label="mean +- sd over seeds",
                )
        ax.set_xticks(
            x,
            [g.variant for g in groups],
            rotation=30 if tilt else 0,
            ha="right" if tilt else "center",
        )
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylabel(f"test {label}")
        ax.set_title(f"Test {label} over seeds")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per kind of marker
    fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncols=2)
    fig.savefig(path, dpi=100)
