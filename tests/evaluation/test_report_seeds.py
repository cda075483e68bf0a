"""Runs over seeds in report.md: grouping by variant, mean +- sample sd, left-out seeds, plot."""

import json
import math

import numpy as np
import pytest
from matplotlib import image

from onerec_jax.evaluation import report, report_seeds


def _results(hr, ndcg, mrr, val, ci):
    test = {
        "hr@10": hr,
        "ndcg@10": ndcg,
        "mrr": mrr,
        "n_users": 100,
        "hr@10_ci95": 2 * ci,
        "ndcg@10_ci95": ci,
        "mrr_ci95": ci,
    }
    return {
        "model": "m",
        "data": {"users": 100, "source": "demo"},
        "protocol": {"mask_history": True, "max_len": 5},
        "best_step": 2,
        "steps": 4,
        "params": 10,
        "train_seconds": 3.0,
        "eval_seconds": 1.0,
        "history": [[2, 1.0, val], [4, 2.0, val / 2]],
        "val": {**test, "ndcg@10": val},
        "test": test,
    }


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# sasrec over seeds 0, 1, 2. By hand, sample sd (n - 1 = 2 in the denominator):
#   HR@10   0.10 0.12 0.17: mean 0.13, deviations -0.03 -0.01 0.04, sd sqrt(0.0026 / 2) = 0.0361
#   NDCG@10 0.05 0.06 0.07: mean 0.06, sd sqrt(0.0002 / 2) = 0.0100 (ddof=0 would give 0.0082)
#   MRR     0.02 0.02 0.05: mean 0.03, sd sqrt(0.0006 / 2) = 0.0173
#   val     0.04 0.08 0.06: mean 0.06, sd sqrt(0.0008 / 2) = 0.0200
SASREC = {
    0: (0.10, 0.05, 0.02, 0.04, 0.004),
    1: (0.12, 0.06, 0.02, 0.08, 0.005),
    2: (0.17, 0.07, 0.05, 0.06, 0.006),
}


@pytest.fixture
def root(tmp_path):
    for seed, numbers in SASREC.items():
        _write(tmp_path / "sasrec" / f"seed{seed}" / "results.json", _results(*numbers))
    # onerec: seed 0 fine, seed 1 failed (compare.py's run_status.json), seed 2 never run.
    _write(tmp_path / "onerec" / "seed0" / "results.json", _results(0.2, 0.09, 0.04, 0.05, 0.01))
    failed = {"returncode": 1, "error": "ValueError: boom"}
    _write(tmp_path / "onerec" / "seed1" / report.RUN_STATUS, failed)
    # A run outside seed folders: in the main table, not in the seeds section.
    _write(tmp_path / "pop" / "results.json", _results(0.3, 0.01, 0.01, 0.01, 0.001))
    return tmp_path


def _table(section):
    """Markdown table rows of `section` by their first cell (header rows skipped)."""
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| run ", "| variant ")):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_mean_and_sample_sd_by_hand():
    mean, sd = report_seeds.mean_sd([0.05, 0.06, 0.07])
    assert mean == pytest.approx(0.06) and sd == pytest.approx(0.01)  # ddof=0: 0.00816
    mean, sd = report_seeds.mean_sd([0.1, 0.3])
    assert mean == pytest.approx(0.2) and sd == pytest.approx(math.sqrt(0.02))  # 0.1414
    mean, sd = report_seeds.mean_sd([0.5])
    assert mean == 0.5 and math.isnan(sd)
    assert all(math.isnan(v) for v in report_seeds.mean_sd([]))


def test_seed_folder_names():
    assert report_seeds.split_seed("sasrec/seed2") == ("sasrec", 2)
    assert report_seeds.split_seed("a/b/seed10") == ("a/b", 10)
    assert report_seeds.split_seed("seed0") == ("", 0)
    for name in ("sasrec", "sasrec/seed", "sasrec/seed01", "sasrec/seed2x", "seed-1"):
        assert report_seeds.split_seed(name) is None
    names = ["s/seed10", "s/seed2", "s/seed1"]
    assert sorted(names, key=report_seeds.natural_key) == ["s/seed1", "s/seed2", "s/seed10"]


def test_runs_are_grouped_by_variant_and_failed_or_missing_seeds_left_out(root):
    rows, broken = report.collect_runs(root)
    groups = report_seeds.group_by_seed(rows, broken)
    assert [g.variant for g in groups] == ["onerec", "sasrec"]  # pop is not in seed folders
    onerec, sasrec = groups
    assert [r.seed for r in sasrec.runs] == [0, 1, 2] and len(sasrec.used) == 3
    assert [r.run for r in sasrec.used] == ["sasrec/seed0", "sasrec/seed1", "sasrec/seed2"]
    summary = sasrec.summary()
    assert summary["hr@10"] == pytest.approx((0.13, math.sqrt(0.0013)))
    assert summary["ndcg@10"] == pytest.approx((0.06, 0.01))
    assert summary["mrr"] == pytest.approx((0.03, math.sqrt(0.0003)))
    assert summary["val"] == pytest.approx((0.06, 0.02))
    assert [r.seed for r in onerec.runs] == [0, 1, 2] and [r.run for r in onerec.used] == [
        "onerec/seed0"
    ]
    assert onerec.runs[1].reason == "no results.json: training failed (exit 1): ValueError: boom"
    assert onerec.runs[2].reason.startswith("no folder onerec/seed2: seed 2 not run here")
    mean, sd = onerec.summary()["ndcg@10"]
    assert mean == 0.09 and math.isnan(sd)  # one seed used: no spread to estimate


def test_report_has_mean_sd_cells_left_out_seeds_and_each_runs_interval(root):
    text = report.write_report(root).read_text()
    main, seeds = text.split("## Seeds")
    seeds, broken = seeds.split("## Runs without usable results")
    assert "sample standard deviation (ddof=1)" in seeds
    table = _table(seeds.split("Seeds left out")[0])
    assert table["sasrec"] == [
        "sasrec",
        "m",
        "3 of 3 (0, 1, 2)",
        "0.1300 +- 0.0361",
        "0.0600 +- 0.0100",
        "0.0300 +- 0.0173",
        "**0.0600 +- 0.0200**",
        "0: 0.0500 +- 0.0040; 1: 0.0600 +- 0.0050; 2: 0.0700 +- 0.0060",
    ]
    assert table["onerec"] == [
        "onerec",
        "m",
        "1 of 3 (0)",
        "**0.2000 (1 seed, no sd)**",
        "**0.0900 (1 seed, no sd)**",
        "**0.0400 (1 seed, no sd)**",
        "0.0500 (1 seed, no sd)",
        "0: 0.0900 +- 0.0100; 1: left out; 2: left out",
    ]
    assert "pop" not in table
    left_out = seeds.split("Seeds left out of the means:")[1]
    assert left_out.count("\n| onerec | ") == 2 and "| sasrec |" not in left_out
    assert "| onerec | 1 | no results.json: training failed (exit 1): ValueError: boom |" in seeds
    assert "| onerec | 2 | no folder onerec/seed2: seed 2 not run here" in seeds
    # Each seed's run keeps its own row with its 95% interval (seed 1 has the best val).
    runs = _table(main)
    assert runs["sasrec/seed1"][4:8] == [
        "0.1200 +- 0.0100",
        "0.0600 +- 0.0050",
        "0.0200 +- 0.0050",
        "**0.0800 (step 2 of 4)**",
    ]
    assert list(runs) == ["onerec/seed0", "pop", "sasrec/seed0", "sasrec/seed1", "sasrec/seed2"]
    assert "| onerec/seed1 | no results.json: training failed" in broken


def test_seed_plot_is_written_and_linked(root):
    text = report.write_report(root).read_text()
    assert f"]({report.SEEDS_PNG})" in text.split("## Seeds")[1]
    data = (root / report.SEEDS_PNG).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    pixels = image.imread(root / report.SEEDS_PNG)
    assert pixels.shape[0] > 100 and np.std(pixels) > 0.01  # not a blank canvas


def test_roots_without_seed_folders_have_no_seed_section(root):
    report.write_report(root)
    for seed_run in ("sasrec", "onerec"):
        for child in sorted((root / seed_run).rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        (root / seed_run).rmdir()
    text = report.write_report(root).read_text()
    assert "## Seeds" not in text and not (root / report.SEEDS_PNG).exists()  # stale plot gone


def test_report_on_one_variant_folder_and_on_one_seed_run(root):
    text = report.write_report(root / "sasrec").read_text()
    table = _table(text.split("## Seeds")[1].split("Seeds left out")[0])
    assert table["sasrec"][2:5] == [
        "3 of 3 (0, 1, 2)",
        "**0.1300 +- 0.0361**",
        "**0.0600 +- 0.0100**",
    ]
    text = report.write_report(root / "sasrec" / "seed0").read_text()  # the root is one run
    assert "## Seeds" not in text and "| seed0 | m |" in text
