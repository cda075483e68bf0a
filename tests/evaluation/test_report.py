"""report.md from a folder of runs: one real trained run, one written by hand, broken ones."""

import json
import math

import jax
import numpy as np
import pytest
from matplotlib import image

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import UserError
from onerec_jax.evaluation import report
from onerec_jax.training import train


def _tiny_config(data_root):
    c = apply_variant(base_config(), "sasrec")
    c.data.update(synthetic="demo", root=str(data_root), max_len=20, progress=False)
    c.model.update(dim=16, num_layers=1, num_heads=1, mlp_dim=16, dropout=0.1)
    c.train.update(
        batch_size=16,
        num_steps=8,
        eval_every_steps=4,
        log_every_steps=4,
        progress=False,
        patience=100,
    )
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=512, chunk_size=256)
    c.mesh.num_devices = 1
    return c


def _metrics(hr, ndcg, mrr, ci):
    return {
        "hr@10": hr,
        "hr@10_ci95": ci,
        "ndcg@10": ndcg,
        "ndcg@10_ci95": ci,
        "mrr": mrr,
        "mrr_ci95": ci,
        "n_users": 671,
    }


HAND = {  # train.py's results.json layout, numbers chosen to win and lose against the real run
    "model": "onerec",
    "data": {"users": 671, "items": 9066, "source": "ml-latest-small"},
    "protocol": {
        "split": "leave-one-out",
        "mask_history": True,
        "max_len": 200,
        "min_rating": 4.0,
        "min_user_interactions": 5,
        "min_item_interactions": 5,
        "ranking": "full",
    },
    "best_step": 30,
    "steps": 40,
    "stopped_early": True,
    "params": 1234567,
    "train_seconds": 1234.5,
    "eval_seconds": 12.25,
    "history": [[10, 100.0, 0.0], [20, 150.5, 0.0], [30, 210.0, 0.0], [40, 260.0, 0.0]],
    "val": _metrics(0.5, 0.0, 0.3, 0.02),
    "test": _metrics(0.9, 0.0, 0.5, 0.01),
}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    train.train_and_evaluate(_tiny_config(tmp_path_factory.mktemp("data")), root / "sasrec")
    _write(root / "hand" / "onerec" / "results.json", json.dumps(HAND))
    _write(root / "hand" / "onerec" / "config.json", json.dumps({"loss": {"name": "bce"}}))
    _write(root / "broken" / "results.json", '{"model": "sasrec", ')
    nan = {**HAND, "test": {**HAND["test"], "ndcg@10": math.nan}}
    _write(root / "nan" / "results.json", json.dumps(nan))  # json writes NaN, as train.py would
    lacking = {k: v for k, v in HAND.items() if k != "val"}
    _write(root / "lacking" / "results.json", json.dumps(lacking))
    failed = {"returncode": 1, "error": "ValueError: unknown config variant 'pop'"}
    _write(root / "failed" / report.RUN_STATUS, json.dumps(failed))
    _write(root / "empty" / "config.json", "{}")
    # Killed at step 12, resumed from step 4: steps 8 and 12 logged twice; the last line cut.
    (root / "killed" / "checkpoints" / "4").mkdir(parents=True)
    (root / "killed" / "checkpoints" / "12").mkdir()
    log = [
        {"step": 1, "time": 1000.0, "train/loss": 7.0},
        {"step": 4, "time": 1010.0, "val/ndcg@10": 0.01},
        {"step": 8, "time": 1020.0, "val/ndcg@10": 0.02},
        {"step": 8, "time": 1100.0, "val/ndcg@10": 0.025},
        {"step": 12, "time": 1112.0, "val/ndcg@10": 0.03},
    ]
    _write(
        root / "killed" / "metrics.jsonl",
        "".join(json.dumps(r) + "\n" for r in log) + '{"step": 16, "ti',
    )
    _write(root / "notes" / "todo.txt", "not a run")
    report.write_report(root)
    return root


def _table_rows(text):
    """Table lines of report.md by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| run"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells
    return rows


def test_usable_runs_carry_their_results_json_numbers(root):
    rows, broken = report.collect_runs(root)
    assert [r.run for r in rows] == ["hand/onerec", "sasrec"]
    hand, real = rows
    saved = json.loads((root / "sasrec" / "results.json").read_text())
    for m in ("hr@10", "ndcg@10", "mrr"):
        assert real.test[m] == (saved["test"][m], saved["test"][f"{m}_ci95"])
    assert (real.val_ndcg10, real.best_step, real.params) == (
        saved["val"]["ndcg@10"],
        saved["best_step"],
        saved["params"],
    )
    assert (real.model, real.data, real.loss) == ("sasrec", "demo", "full_softmax")
    assert real.curve == [(h[1], h[2]) for h in saved["history"]] and len(real.curve) == 2
    assert hand.test["hr@10"] == (0.9, 0.01) and hand.loss == "bce" and hand.users == 671
    assert hand.curve[1] == (150.5, 0.0)
    assert [b.run for b in broken] == ["broken", "empty", "failed", "killed", "lacking", "nan"]


def test_table_shows_intervals_and_bolds_the_best_of_each_column(root):
    text = (root / "report.md").read_text()
    saved = json.loads((root / "sasrec" / "results.json").read_text())
    t, v = saved["test"], saved["val"]
    assert t["ndcg@10"] > 0 and t["hr@10"] < 0.9 and t["mrr"] < 0.5 and v["ndcg@10"] > 0
    rows = _table_rows(text)
    hand, real = rows["hand/onerec"], rows["sasrec"]
    assert hand == [
        "hand/onerec",
        "onerec",
        "ml-latest-small (671 users)",
        "ratings >= 4.0, k-core 5/5, max_len 200, history masked, loss bce",
        "**0.9000 +- 0.0100**",
        "0.0000 +- 0.0100",
        "**0.5000 +- 0.0100**",
        "0.0000 (step 30 of 40)",
        "1,234,567",
        "1,234",
        "12",
    ]
    protocol = "all ratings, k-core 5/0, max_len 20, history masked, loss full_softmax"
    assert real[1:4] == ["sasrec", "demo (2,000 users)", protocol]
    assert real[4] == f"{t['hr@10']:.4f} +- {t['hr@10_ci95']:.4f}"
    assert real[5] == f"**{t['ndcg@10']:.4f} +- {t['ndcg@10_ci95']:.4f}**"
    assert real[7] == f"**{v['ndcg@10']:.4f} (step 8 of 8)**"
    assert real[8] == f"{saved['params']:,}"
    assert "rows differ in data or protocol" in text  # demo and ml-latest-small side by side
    # the demo's ratings give liked / disliked segments and the graded NDCG@10 (evaluator.py)
    seg = _table_rows(text.split("## Test metrics by segment")[1])
    liked = seg["sasrec: liked"]
    assert liked[1] == f"{t['liked/n_users']:,}"
    assert liked[3] == f"{t['liked/ndcg@10']:.4f} +- {t['liked/ndcg@10_ci95']:.4f}"
    graded = seg["sasrec: all, rating as gain"]
    assert graded[3] == f"{t['graded_ndcg@10']:.4f}" and graded[2] == "-"


def test_runs_without_results_are_listed_with_their_reason(root):
    text = (root / "report.md").read_text()
    section = text.split("## Runs without usable results")[1]
    reasons = {cells[0]: cells[1] for cells in _table_rows(section).values()}
    assert reasons["broken"].startswith("results.json is not valid JSON (Expecting")
    assert reasons["nan"] == "results.json test.ndcg@10 is nan (a diverged or empty evaluation)"
    assert reasons["lacking"] == "results.json lacks val.ndcg@10"
    assert reasons["failed"] == (
        "no results.json: training failed (exit 1): ValueError: unknown config variant 'pop'"
    )
    assert "checkpoints up to step 12" in reasons["killed"]
    assert reasons["empty"].startswith("no results.json and no checkpoint")
    assert "notes" not in reasons and "notes" not in _table_rows(text)


def test_killed_run_curve_comes_from_metrics_jsonl(root):
    _, broken = report.collect_runs(root)
    killed = next(b for b in broken if b.run == "killed")
    # Wall seconds since the first line; step 8's resumed line wins; the cut line is skipped.
    assert killed.curve == [(10.0, 0.01), (100.0, 0.025), (112.0, 0.03)]


def test_plots_are_written_and_linked(root):
    text = (root / "report.md").read_text()
    for png in (report.BARS_PNG, report.VALIDATION_PNG):
        assert f"]({png})" in text
        data = (root / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        pixels = image.imread(root / png)
        assert pixels.shape[0] > 100 and np.std(pixels) > 0.01  # not a blank canvas


def test_root_without_usable_runs(tmp_path):
    _write(tmp_path / "a" / "results.json", "[1, 2]")
    text = report.write_report(tmp_path).read_text()
    assert "(no run with usable results)" in text
    assert "| a | results.json does not hold a JSON object |" in text
    assert not (tmp_path / report.BARS_PNG).exists()
    with pytest.raises(UserError, match="no such directory"):
        report.write_report(tmp_path / "nowhere")


def test_loss_column_names_the_models_own_objective(tmp_path):
    path = tmp_path / "config.json"
    for model, loss, shown in [
        ("bpr", "full_softmax", "BPR pairwise"),
        ("sasrec", "bce", "bce"),
        ("pop", "full_softmax", "none (counts)"),
    ]:
        path.write_text(json.dumps({"model": {"name": model}, "loss": {"name": loss}}))
        assert report._config_loss(path) == shown
