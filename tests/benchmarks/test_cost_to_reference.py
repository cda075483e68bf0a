"""benchmarks/cost_to_reference.py: CPU-seconds to reach the reference's best validation."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "cost_to_reference", REPO / "benchmarks" / "cost_to_reference.py"
)
cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cost)


def _run(path: Path, history, cpu_total, times=None):
    path.mkdir(parents=True)
    result = {"history": history, "cpu_seconds": cpu_total}
    (path / "results.json").write_text(json.dumps(result))
    if times is not None:  # metrics.jsonl: a train line at t0, then one val line per validation
        lines = [{"step": 0, "time": times[0], "train/loss": 1.0}]
        lines += [
            {"step": h[0], "time": t, "val/ndcg@10": h[2]}
            for h, t in zip(history, times[1:], strict=True)
        ]
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_recorded_and_estimated_cpu_curves(tmp_path, capsys):
    new = _run(tmp_path / "new", [[5, 1.0, 0.02, 10.0], [10, 2.0, 0.05, 20.0]], 20.0)
    # Wall seconds since the first line: 10, 30, 40 of 40; 80 CPU-s in all -> 2 CPU-s a second.
    old = _run(
        tmp_path / "old",
        [[5, 1, 0.01], [10, 2, 0.06], [15, 3, 0.04]],
        80.0,
        times=[100.0, 110.0, 130.0, 140.0],
    )
    assert cost.cpu_curve(new) == ([(10.0, 0.02), (20.0, 0.05)], False)
    assert cost.cpu_curve(old) == ([(20.0, 0.01), (60.0, 0.06), (80.0, 0.04)], True)
    assert cost.first_reaching([(20.0, 0.01), (60.0, 0.06)], 0.05) == 60.0
    assert cost.first_reaching([(20.0, 0.01)], 0.05) is None

    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"valid": {"ndcg@10": 0.05}, "cpu_seconds_to_best": 100.0}))
    cost.main(["--runs", str(new), str(old), "--reference", str(ref)])
    out = capsys.readouterr().out
    assert "| 20 | 0.20 |" in out and "| 60 | 0.60 |" in out and "(est.)" in out
    assert "0.40 +- 0.28" in out  # mean and sample sd of 0.2 and 0.6
    ref.write_text(json.dumps({"valid": {"ndcg@10": 0.07}, "cpu_seconds_to_best": 100.0}))
    cost.main(["--runs", str(new), "--reference", str(ref)])
    assert "not reached (best 0.0500)" in capsys.readouterr().out


def test_pooled_reference_and_counts(tmp_path, capsys):
    fast = _run(tmp_path / "fast", [[5, 1.0, 0.04, 30.0], [10, 2.0, 0.06, 50.0]], 50.0)
    slow = _run(tmp_path / "slow", [[5, 1.0, 0.03, 40.0], [10, 2.0, 0.045, 90.0]], 90.0)
    refs = []
    for i, (v, c) in enumerate([(0.05, 100.0), (0.04, 60.0)]):
        refs.append(tmp_path / f"ref{i}.json")
        refs[-1].write_text(json.dumps({"valid": {"ndcg@10": v}, "cpu_seconds_to_best": c}))
    cost.main(["--runs", str(fast), str(slow), "--reference", *map(str, refs)])
    out = capsys.readouterr().out
    # Pairs: fast reaches 0.05 at 50 (0.50) and 0.04 at 30 (0.50); slow misses 0.05 and reaches
    # 0.04 at 90 (1.50). Pooled: target 0.045, cost 80; fast at 50 (0.62), slow at 90 (1.12).
    assert "pairs reaching the reference's best: 3 of 4; within half its CPU-seconds: 2 of 4" in out
    assert "best val NDCG@10 0.0450 (sd 0.0071), CPU-s to best 80" in out
    assert "fast: 50 CPU-s, fraction 0.62" in out and "slow: 90 CPU-s, fraction 1.12" in out
    assert "runs reaching it: 2 of 2; within half: 0 of 2; fraction 0.88 +- 0.35" in out
