"""benchmarks/generative_rankings.py: which rankings of a generative run are measured."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "generative_rankings", REPO / "benchmarks" / "generative_rankings.py"
)
gr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gr)


def _run(rerank_weight, dense, candidates=0):
    model = SimpleNamespace(
        rerank_weight=rerank_weight, ranks_all_items=dense, beam=50, dense_candidates=candidates
    )
    return SimpleNamespace(model=model, config=SimpleNamespace(model=SimpleNamespace(name="m")))


def test_rankings_follow_what_the_run_has():
    assert gr.rankings(_run(0.0, False)) == [("beam", "topk_list", 0.0, 0)]
    assert gr.rankings(_run(2.0, True, candidates=50)) == [
        ("beam", "topk_list", 2.0, 50),
        ("beam alone", "topk_list", 0.0, 0),
        ("dense alone", "full_ranking", 2.0, 0),
    ]
    assert gr.rankings(_run(1.0, True), beam=150, weights=(2.0, 4.0)) == [
        ("beam 150, weight 2", "topk_list", 2.0, 0),
        ("beam 150, weight 4", "topk_list", 4.0, 0),
    ]
    assert gr.rankings(_run(0.0, False), beam=100, weights=(0.0,)) == [
        ("beam 100, weight 0", "topk_list", 0.0, 0)
    ]
    # the run's own beam (50) with dense candidates
    assert gr.rankings(_run(1.0, True), weights=(1.0,), candidates=(0, 20)) == [
        ("beam 50, weight 1", "topk_list", 1.0, 0),
        ("beam 50, weight 1, 20 dense candidates", "topk_list", 1.0, 20),
    ]
    with pytest.raises(SystemExit, match="no dense head"):
        gr.rankings(_run(0.0, False), beam=100, weights=(1.0,))
    with pytest.raises(SystemExit, match="weights must be > 0"):
        gr.rankings(_run(1.0, True), weights=(0.0, 1.0), candidates=(20,))
