"""A generative run's best checkpoint ranked three ways: where its quality comes from.

  python benchmarks/generative_rankings.py runs/inter/onerec_sid_dense/seed0 --splits valid,test

For the run in each workdir (its own config.json and data, one device), prints NDCG@10, HR@10,
HR@50 and MRR of:
  beam           the run's own ranking: constrained beam search (re-ranked by the dense head when
                 the run has eval.rerank_weight > 0);
  beam alone     the beam's list without the re-ranker (runs with a re-ranker only);
  dense alone    the whole catalogue ranked by the dense head (eval.evaluator=full_ranking; runs
                 trained with loss.dense_weight > 0 only).
`--beam B --weights w1,w2 [--candidates n1,n2]` ranks instead by a beam of B (0: the run's)
re-ranked with each weight in turn (B > eval.k gives the re-ranker B candidates), with n of the
dense head's best unseen items added to the candidates (eval.dense_candidates; 0: none).
Validation is for choosing; read test once per checkpoint.
"""

from __future__ import annotations

import argparse

from onerec_jax import runs
from onerec_jax.evaluation.evaluator import make_evaluator

METRICS = ("ndcg@10", "hr@10", "hr@50", "mrr")


def rankings(
    run, beam: int = 0, weights: tuple[float, ...] = (), candidates: tuple[int, ...] = (0,)
) -> list[tuple[str, str, float, int]]:
    """(label, evaluator, rerank weight, dense candidates) of each ranking to measure for `run`."""
    model = run.model
    dense = getattr(model, "ranks_all_items", False)
    if beam or any(candidates):
        if any(weights) and not dense:
            raise SystemExit(f"{run.config.model.name}: no dense head to re-rank with (weights 0)")
        if any(candidates) and not all(weights):
            raise SystemExit("--candidates > 0 are re-ranked: every --weights must be > 0")
        width = beam or model.beam
        return [
            (
                f"beam {width}, weight {w:g}" + (f", {n} dense candidates" if n else ""),
                "topk_list",
                w,
                n,
            )
            for w in weights
            for n in candidates
        ]
    own = getattr(model, "dense_candidates", 0)
    out = [("beam", "topk_list", model.rerank_weight, own)]
    if model.rerank_weight:
        out.append(("beam alone", "topk_list", 0.0, 0))
    if dense:
        out.append(("dense alone", "full_ranking", model.rerank_weight, 0))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("workdirs", nargs="+", help="trained generative runs (folders with checkpoints)")
    p.add_argument("--splits", default="valid", help="comma-separated: valid, test")
    p.add_argument("--beam", type=int, default=0, help="beam width to re-rank (0: the run's)")
    p.add_argument("--weights", default="1", help="with --beam: comma-separated rerank weights")
    p.add_argument(
        "--candidates", default="0", help="comma-separated eval.dense_candidates to sweep"
    )
    args = p.parse_args(argv)
    weights = tuple(float(w) for w in args.weights.split(","))
    candidates = tuple(int(n) for n in args.candidates.split(","))
    print("| run | step | split | ranking | " + " | ".join(METRICS) + " |")
    print("|---|---|---|---|" + "---|" * len(METRICS))
    for workdir in args.workdirs:
        run = runs.load_run(workdir)
        if args.beam:
            run.model.beam = args.beam
        for label, evaluator, weight, n in rankings(run, args.beam, weights, candidates):
            config = run.config.copy_and_resolve_references()
            config.eval.evaluator = evaluator
            run.model.rerank_weight, run.model.dense_candidates = weight, n
            ev = make_evaluator(run.model, run.data, config, run.mesh, run.rules)
            for split in args.splits.split(","):
                m, _ = ev.evaluate(run.params, split)
                values = " | ".join(f"{m[k]:.4f}" for k in METRICS)
                print(f"| {workdir} | {run.best_step} | {split} | {label} | {values} |", flush=True)


if __name__ == "__main__":
    main()
