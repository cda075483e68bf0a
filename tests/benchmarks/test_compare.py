"""benchmarks/compare.py: arguments, commands, skip/force/failure handling (a fake trainer)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)


def _results(ndcg):
    m = {"hr@10": 2 * ndcg, "ndcg@10": ndcg, "mrr": ndcg / 2, "n_users": 10}
    m.update({f"{k}_ci95": 0.01 for k in ("hr@10", "ndcg@10", "mrr")})
    return {
        "model": "x",
        "data": {"users": 10, "source": "demo"},
        "protocol": {"mask_history": True, "max_len": 5},
        "best_step": 1,
        "steps": 1,
        "params": 3,
        "train_seconds": 1.0,
        "eval_seconds": 0.5,
        "history": [[1, 1.0, ndcg]],
        "val": m,
        "test": m,
    }


class FakeTrainer:
    """Stands for `python -m onerec_jax.main`: writes results.json (test NDCG@10 0.1, or with
    --config.seed=k 0.05 + 0.01 k), or fails for a variant or "variant/seed<k>" in `failing`."""

    def __init__(self, failing=()):
        self.failing, self.calls = failing, []

    def __call__(self, command, log):
        self.calls.append(command)
        workdir = Path(next(a for a in command if a.startswith("--workdir=")).split("=", 1)[1])
        variant = command[command.index("--config") + 1].rsplit(":", 1)[1]
        seed = next((int(a.split("=")[1]) for a in command if a.startswith("--config.seed=")), None)
        if variant in self.failing or f"{variant}/seed{seed}" in self.failing:
            log.write_text("step 1\rstep 2\nTraceback ...\nValueError: unknown variant\n\nhelp\n")
            return 2
        ndcg = 0.1 if seed is None else 0.05 + 0.01 * seed
        (workdir / "results.json").write_text(json.dumps(_results(ndcg)))
        return 0


def test_arguments_become_config_flags():
    args = compare.parse_args(
        [
            "--config",
            "configs/demo.py",
            "--root",
            "R",
            "--seed",
            "3",
            "--extra",
            "train.num_epochs=2",
            "loss.name=bce",
        ]
    )
    assert args.variants == list(compare.VARIANTS)
    overrides = compare.config_overrides(args.seed, args.extra)
    assert overrides == ["--config.seed=3", "--config.train.num_epochs=2", "--config.loss.name=bce"]
    assert compare.train_command("configs/demo.py", "sasrec", Path("R/sasrec"), overrides) == [
        sys.executable,
        "-m",
        "onerec_jax.main",
        "--config",
        "configs/demo.py:sasrec",
        "--mode",
        "train",
        "--workdir=R/sasrec",
        *overrides,
    ]
    args = compare.parse_args(["--config", "c.py", "--root", "R", "--variants", " sasrec,onerec,"])
    assert args.variants == ["sasrec", "onerec"] and args.extra == [] and args.seed is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "c.py:sasrec"], "without ':variant'"),
        (["--config", "c.py", "--extra", "num_epochs"], "write KEY=VALUE"),
        (["--config", "c.py", "--variants", ","], "--variants is empty"),
        (["--config", "c.py", "--variants", "bpr,bpr"], "names a variant twice"),
        (["--config", "c.py", "--seed", "1", "--seeds", "0,1"], "not allowed with argument"),
        (["--config", "c.py", "--seeds", "0,x"], "'x' is not a non-negative integer"),
        (["--config", "c.py", "--seeds", "0,-1"], "'-1' is not a non-negative integer"),
        (["--config", "c.py", "--seeds", ","], "--seeds is empty"),
        (["--config", "c.py", "--seeds", "1,2,1"], "names a seed twice"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args([*argv, "--root", "R"])
    assert message in capsys.readouterr().err


def test_skips_done_variants_records_failures_and_reports(tmp_path, capsys):
    (tmp_path / "sasrec").mkdir()
    (tmp_path / "sasrec" / "results.json").write_text(json.dumps(_results(0.2)))
    fake = FakeTrainer(failing=("pop",))
    argv = ["--config", "c.py", "--root", str(tmp_path), "--variants", "pop,sasrec,onerec"]
    assert compare.main(argv, runner=fake) == 1  # one variant failed
    assert [c[4] for c in fake.calls] == ["c.py:pop", "c.py:onerec"]  # sasrec was done
    status = json.loads((tmp_path / "pop" / "run_status.json").read_text())
    assert status["returncode"] == 2 and status["error"] == "ValueError: unknown variant"
    assert json.loads((tmp_path / "onerec" / "run_status.json").read_text())["error"] is None
    out = capsys.readouterr().out
    assert "[sasrec] skipped" in out and "[pop] FAILED (exit 2)" in out
    text = (tmp_path / "report.md").read_text()
    assert (
        "| pop | no results.json: training failed (exit 2): ValueError: unknown variant |" in text
    )
    assert "| sasrec | x |" in text and "**0.2000 +- 0.0100**" in text and text in out
    # --force retrains a finished variant from an empty folder (no resume of the old run).
    (tmp_path / "sasrec" / "checkpoints").mkdir()
    fake = FakeTrainer()
    argv = ["--config", "c.py", "--root", str(tmp_path), "--variants", "sasrec", "--force"]
    assert compare.main(argv, runner=fake) == 0
    assert len(fake.calls) == 1 and not (tmp_path / "sasrec" / "checkpoints").exists()
    assert json.loads((tmp_path / "sasrec" / "results.json").read_text())["test"]["ndcg@10"] == 0.1


def test_seeds_plan_one_run_per_variant_and_seed():
    args = compare.parse_args(
        [
            "--config",
            "c.py",
            "--root",
            "R",
            "--variants",
            "sasrec,pop",
            "--seeds",
            " 2, 0,",
            "--extra",
            "train.num_epochs=2",
        ]
    )
    assert args.seeds == [2, 0] and args.seed is None
    runs = compare.planned_runs(args)  # every variant at the first seed, then the next
    assert [(r.variant, r.seed, r.name) for r in runs] == [
        ("sasrec", 2, "sasrec/seed2"),
        ("pop", 2, "pop/seed2"),
        ("sasrec", 0, "sasrec/seed0"),
        ("pop", 0, "pop/seed0"),
    ]
    args = compare.parse_args(["--config", "c.py", "--root", "R", "--variants", "pop"])
    assert [(r.variant, r.seed, r.name) for r in compare.planned_runs(args)] == [
        ("pop", None, "pop")
    ]


def test_seeds_train_into_seed_folders_and_report_mean_and_sd(tmp_path, capsys):
    fake = FakeTrainer(failing=("pop/seed0",))
    argv = [
        "--config",
        "c.py",
        "--root",
        str(tmp_path),
        "--variants",
        "sasrec,pop",
        "--seeds",
        "0,1,2",
        "--extra",
        "loss.name=bce",
    ]
    assert compare.main(argv, runner=fake) == 1  # pop's seed 0 failed
    assert [(c[4], c[7], c[8:]) for c in fake.calls] == [
        (
            f"c.py:{v}",
            f"--workdir={tmp_path / v / f'seed{k}'}",
            [f"--config.seed={k}", "--config.loss.name=bce"],
        )
        for k in (0, 1, 2)
        for v in ("sasrec", "pop")
    ]
    status = json.loads((tmp_path / "pop" / "seed0" / "run_status.json").read_text())
    assert status["seed"] == 0 and status["returncode"] == 2
    text = (tmp_path / "report.md").read_text().replace("**", "")  # bold: test_report_seeds.py
    seeds = text.split("## Seeds")[1]
    # sasrec test NDCG@10 0.05, 0.06, 0.07: mean 0.06, sample sd 0.01; HR@10 twice that.
    assert "| sasrec | x | 3 of 3 (0, 1, 2) | 0.1200 +- 0.0200 | 0.0600 +- 0.0100 |" in seeds
    # pop without seed 0: 0.06 and 0.07, mean 0.065, sd sqrt(0.00005 / 1) = 0.0071.
    assert "| pop | x | 2 of 3 (1, 2) | 0.1300 +- 0.0141 | 0.0650 +- 0.0071 |" in seeds
    assert "| pop | 0 | no results.json: training failed (exit 2): ValueError: unknown" in seeds
    out = capsys.readouterr().out
    assert "[pop/seed0] FAILED (exit 2)" in out and "  sasrec/seed2: done" in out
    # More seeds later: the finished ones are skipped, only seed 3 trains.
    fake = FakeTrainer()
    argv = [
        "--config",
        "c.py",
        "--root",
        str(tmp_path),
        "--variants",
        "sasrec",
        "--seeds",
        "0,1,2,3",
    ]
    assert compare.main(argv, runner=fake) == 0
    assert [c[7] for c in fake.calls] == [f"--workdir={tmp_path / 'sasrec' / 'seed3'}"]
    text = (tmp_path / "report.md").read_text().replace("**", "")
    # 0.05..0.08: mean 0.065, sd sqrt(0.0005 / 3) = 0.0129.
    assert "| sasrec | x | 4 of 4 (0, 1, 2, 3) | 0.1300 +- 0.0258 | 0.0650 +- 0.0129 |" in text
    assert "| pop | 3 | no folder pop/seed3: seed 3 not run here" in text


def test_a_root_mixing_the_two_layouts_is_refused(tmp_path, capsys):
    (tmp_path / "sasrec").mkdir()
    (tmp_path / "sasrec" / "results.json").write_text(json.dumps(_results(0.2)))
    fake = FakeTrainer()
    argv = ["--config", "c.py", "--root", str(tmp_path), "--variants", "sasrec"]
    assert compare.main([*argv, "--seeds", "0,1"], runner=fake) == 2 and not fake.calls
    assert "sasrec holds a single-seed run" in capsys.readouterr().err
    (tmp_path / "pop" / "seed0").mkdir(parents=True)
    (tmp_path / "pop" / "seed0" / "results.json").write_text(json.dumps(_results(0.2)))
    argv = ["--config", "c.py", "--root", str(tmp_path), "--variants", "pop", "--seed", "0"]
    assert compare.main(argv, runner=fake) == 2 and not fake.calls
    assert "pop holds per-seed runs" in capsys.readouterr().err
