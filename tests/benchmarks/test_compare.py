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
    return {"model": "x", "data": {"users": 10, "source": "demo"},
            "protocol": {"mask_history": True, "max_len": 5}, "best_step": 1, "steps": 1,
            "params": 3, "train_seconds": 1.0, "eval_seconds": 0.5, "history": [[1, 1.0, ndcg]],
            "val": m, "test": m}  # fmt: skip


class FakeTrainer:
    """Stands for `python -m onerec_jax.main`: writes results.json, or fails for `failing`."""

    def __init__(self, failing=()):
        self.failing, self.calls = failing, []

    def __call__(self, command, log):
        self.calls.append(command)
        workdir = Path(next(a for a in command if a.startswith("--workdir=")).split("=", 1)[1])
        variant = command[command.index("--config") + 1].rsplit(":", 1)[1]
        if variant in self.failing:
            log.write_text("step 1\rstep 2\nTraceback ...\nValueError: unknown variant\n\nhelp\n")
            return 2
        (workdir / "results.json").write_text(json.dumps(_results(0.1)))
        return 0


def test_arguments_become_config_flags():
    args = compare.parse_args(["--config", "configs/demo.py", "--root", "R", "--seed", "3",
                               "--extra", "train.num_epochs=2", "loss.name=bce"])  # fmt: skip
    assert args.variants == list(compare.VARIANTS)
    overrides = compare.config_overrides(args.seed, args.extra)
    assert overrides == ["--config.seed=3", "--config.train.num_epochs=2", "--config.loss.name=bce"]
    assert compare.train_command("configs/demo.py", "sasrec", Path("R/sasrec"), overrides) == [
        sys.executable, "-m", "onerec_jax.main", "--config", "configs/demo.py:sasrec",
        "--mode", "train", "--workdir=R/sasrec", *overrides]  # fmt: skip
    args = compare.parse_args(["--config", "c.py", "--root", "R", "--variants", " sasrec,onerec,"])
    assert args.variants == ["sasrec", "onerec"] and args.extra == [] and args.seed is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "c.py:sasrec"], "without ':variant'"),
        (["--config", "c.py", "--extra", "num_epochs"], "write KEY=VALUE"),
        (["--config", "c.py", "--variants", ","], "--variants is empty"),
        (["--config", "c.py", "--variants", "bpr,bpr"], "names a variant twice"),
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
