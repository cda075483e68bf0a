"""A generative run's best checkpoint ranked three ways: where its quality comes from.

  python benchmarks/generative_rankings.py runs/inter/onerec_sid_dense/seed0 --splits valid,test

For the run in each workdir (its own config.json and data, one device), prints NDCG@10, HR@10,
HR@50 and MRR of:
  beam           the run's own ranking: constrained beam search (re-ranked by the dense head when
                 the run has eval.rerank_weight > 0);
  beam alone     the beam's list without the re-ranker (runs with a re-ranker only);
  dense alone    the whole catalogue ranked by the dense head (eval.evaluator=full_ranking; runs
                 trained with loss.dense_weight > 0 only).
`--beam B --weights w1,w2` ranks instead by a beam of B re-ranked with each weight in turn
(B > eval.k gives the re-ranker B candidates). Validation is for choosing; read test once per
checkpoint.
"""

from __future__ import annotations

import argparse

from onerec_jax import runs
from onerec_jax.evaluation.evaluator import make_evaluator

METRICS = ("ndcg@10", "hr@10", "hr@50", "mrr")


def rankings(run, beam: int = 0, weights: tuple[float, ...] = ()) -> list[tuple[str, str, float]]:
    """(label, evaluator, rerank weight) of each ranking to measure for `run`."""
    model = run.model
    dense = getattr(model, "ranks_all_items", False)
    if beam:
        if any(weights) and not dense:
            raise SystemExit(f"{run.config.model.name}: no dense head to re-rank with (weights 0)")
        return [(f"beam {beam}, weight {w:g}", "topk_list", w) for w in weights]
    out = [("beam", "topk_list", model.rerank_weight)]
    if model.rerank_weight:
        out.append(("beam alone", "topk_list", 0.0))
    if dense:
        out.append(("dense alone", "full_ranking", model.rerank_weight))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdirs", nargs="+", help="trained generative runs (folders with checkpoints)")
    p.add_argument("--splits", default="valid", help="comma-separated: valid, test")
    p.add_argument("--beam", type=int, default=0, help="beam width to re-rank (0: the run's)")
    p.add_argument("--weights", default="1", help="with --beam: comma-separated rerank weights")
    args = p.parse_args(argv)
    weights = tuple(float(w) for w in args.weights.split(","))
    print("| run | step | split | ranking | " + " | ".join(METRICS) + " |")
    print("|---|---|---|---|" + "---|" * len(METRICS))
    for workdir in args.workdirs:
        run = runs.load_run(workdir)
        if args.beam:
            run.model.beam = args.beam
        for label, evaluator, weight in rankings(run, args.beam, weights):
            config = run.config.copy_and_resolve_references()
            config.eval.evaluator = evaluator
            run.model.rerank_weight = weight
            ev = make_evaluator(run.model, run.data, config, run.mesh, run.rules)
            for split in args.splits.split(","):
                m, _ = ev.evaluate(run.params, split)
                values = " | ".join(f"{m[k]:.4f}" for k in METRICS)
                print(f"| {workdir} | {run.best_step} | {split} | {label} | {values} |", flush=True)


if __name__ == "__main__":
    main()
