"""benchmarks/ml25m_full.py: commands, the split of a train stage, and a tiny run end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from onerec_jax.data.synthetic import SyntheticConfig, write_synthetic

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ml25m_full", REPO / "benchmarks" / "ml25m_full.py")
ml25m_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ml25m_full)

# 300 users of >= 20 ratings each (the generator's floor), so the 5-core filter keeps all of them.
TINY = SyntheticConfig(
    n_users=300,
    n_items=100,
    n_ratings=6_000,
    n_movies=110,
    n_clusters=4,
    n_genome_items=40,
    n_genome_tags=8,
    n_tags_rows=100,
    max_user_ratings=60,
    zipf_exponent=0.7,
)


def test_stage_commands(tmp_path):
    args = ml25m_full.parse_args(
        [
            "--data",
            "D",
            "--root",
            str(tmp_path),
            "--valid_users",
            "50",
            "--max_steps",
            "3",
            "--extra",
            "model.dim=16",
        ]
    )
    assert args.stages == ["prepare", "sasrec", "onerec"]
    data, root = Path("D").resolve(), tmp_path.resolve()
    common = [f"--config.data.path={data}", f"--config.data.cache_dir={root / 'cache'}"]
    main = [sys.executable, "-m", "onerec_jax.main", "--config"]
    assert ml25m_full.stage_command(args, "prepare") == [
        *main,
        "configs/custom.py",
        "--mode",
        "prepare",
        f"--workdir={root / 'prepare'}",
        *common,
        "--config.model.dim=16",
    ]
    assert ml25m_full.stage_command(args, "onerec") == [
        *main,
        "configs/custom.py:onerec",
        "--mode",
        "train",
        f"--workdir={root / 'onerec'}",
        *common,
        "--config.train.num_epochs=1",
        "--config.loss.name=sampled_softmax",
        "--config.eval.valid_users=50",
        "--config.train.num_steps=3",
        "--config.model.dim=16",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "prepare,bert4rec"], "name some of prepare,sasrec,onerec"),
        (["--config", "configs/ml25m.py:sasrec"], "without ':variant'"),
        (["--extra", "model.dim"], "write KEY=VALUE"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        ml25m_full.parse_args(["--data", "D", "--root", "R", *argv])
    assert message in capsys.readouterr().err


def test_train_breakdown_splits_by_what_the_run_records(tmp_path):
    m = {"ndcg@10": 0.1, "hr@10": 0.2}
    results = {
        "steps": 40,
        "params": 7,
        "train_seconds": 10.0,
        "eval_seconds": 4.0,
        "val": {**m, "n_users": 50},
        "test": {**m, "n_users": 300, "seconds": 1.5},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    rows = [
        {"time": 100.0, "train/loss": 6.0, "train/tokens_per_s": 10.0},  # compile window
        {"time": 105.0, "train/loss": 5.0, "train/tokens_per_s": 30.0},
        {"time": 110.0, "train/loss": 4.0, "train/tokens_per_s": 50.0},
        {"time": 113.0, "val/ndcg@10": 0.1},
        {"time": 115.0, "test/ndcg@10": 0.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [(99.0, 5), (109.0, 9), (110.0, 8), (111.0, 7), (113.0, 6), (114.0, 4), (116.0, 99)]
    out = ml25m_full.train_breakdown(tmp_path, 20.0, samples)
    parts = out["parts"]
    assert parts["training"] == {"seconds": 10.0, "peak_rss_bytes": 9}  # samples up to t=110
    assert parts["validation"] == {"seconds": 2.5, "users": 50, "peak_rss_bytes": 7}  # (110, 113]
    assert parts["test"] == {"seconds": 1.5, "users": 300, "peak_rss_bytes": 4}  # (113, 115]
    assert parts["other"] == {"seconds": 20.0 - 10.0 - 2.5 - 1.5}
    assert out["tokens_per_s"] == 40.0  # median of 30 and 50: the compile window is left out
    assert (out["steps"], out["final_loss"], out["test_ndcg@10"]) == (40, 4.0, 0.1)


def test_tiny_run_reports_every_stage(tmp_path):
    # prepare and SASRec only: the OneRec stage is the same code path with another variant, and
    # each stage is a JAX process (the suite's time budget).
    write_synthetic(TINY, tmp_path / "data")
    root = tmp_path / "runs"
    code = ml25m_full.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--root",
            str(root),
            "--stages",
            "prepare,sasrec",
            "--max_steps",
            "1",
            "--valid_users",
            "100",
            "--poll_s",
            "0.1",
            "--extra",
            "data.max_len=20",
            "data.bucket_boundaries=()",
            "model.dim=16",
            "model.num_layers=1",
            "train.batch_size=16",
            "eval.batch_size=512",
        ]
    )
    assert code == 0
    summary = json.loads((root / "ml25m_full.json").read_text())
    stages = {r["stage"]: r for r in summary["stages"]}
    assert list(stages) == ["prepare", "sasrec"]
    for r in stages.values():
        assert r["returncode"] == 0 and r["seconds"] > 0 and r["peak_rss_bytes"] > 0
    data = stages["prepare"]["data"]
    assert (data["users"], data["items"], data["interactions"]) == (300, 100, 6_000)
    r = stages["sasrec"]
    assert r["steps"] == 1
    assert (r["parts"]["validation"]["users"], r["parts"]["test"]["users"]) == (100, 300)
    assert all(p["seconds"] > 0 for p in r["parts"].values())
    assert r["parts"]["training"]["peak_rss_bytes"] > 0
    table = (root / "ml25m_full.md").read_text()
    for row in (
        "| prepare (cold cache) |",
        "| SASRec: 1 epoch + test |",
        "| - test (300 users, full ranking) |",
    ):
        assert row in table
