"""Rank by next-item logit + alpha x predicted rating: the alpha study of a run with a rating head.

    python benchmarks/rating_alpha.py --workdir runs/sasrec_rating --alphas 0,0.25,0.5,1,2,4 \
        --out runs/sasrec_rating/alpha.json --png runs/sasrec_rating/alpha.png

For every alpha the run's best checkpoint is validated (all-target NDCG@10, liked- and
disliked-target NDCG@10, graded NDCG@10). The alpha kept is the one with the highest
validation graded NDCG@10 whose all-target NDCG@10 stays within 5% of alpha 0's (issue 16's
bar); the test split is read twice: alpha 0 and the alpha kept. The PNG is the validation Pareto
curve (all-target NDCG@10 against liked-target NDCG@10, one point per alpha).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("ndcg@10", "liked/ndcg@10", "disliked/ndcg@10", "graded_ndcg@10", "rating_rmse")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--alphas", default="0,0.25,0.5,1,2,4")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args(argv)
    from onerec_jax.evaluation.evaluator import make_evaluator
    from onerec_jax.runs import load_run

    run = load_run(args.workdir)
    if not run.model.has_rating_head:
        raise SystemExit(f"{args.workdir}: no rating head (train with model.rating_weight > 0)")
    alphas = [float(a) for a in args.alphas.split(",")]
    if 0.0 not in alphas:
        alphas = [0.0, *alphas]
    rows = {}

    def evaluate(alpha, split):
        run.config.eval.rating_alpha = alpha  # the model reads it at trace time
        evaluator = make_evaluator(run.model, run.data, run.config, run.mesh, run.rules)
        metrics, _ = evaluator.evaluate(run.params, split)
        return {k: metrics[k] for k in KEYS if k in metrics}

    print("| alpha | " + " | ".join(f"val {k}" for k in KEYS) + " |", flush=True)
    print("|---|" + "---|" * len(KEYS), flush=True)
    for alpha in alphas:
        rows[alpha] = evaluate(alpha, "valid")
        cells = " | ".join(f"{rows[alpha].get(k, float('nan')):.4f}" for k in KEYS)
        print(f"| {alpha:g} | {cells} |", flush=True)
    base = rows[0.0]["ndcg@10"]
    allowed = [a for a in alphas if rows[a]["ndcg@10"] >= 0.95 * base]
    kept = max(allowed, key=lambda a: rows[a]["graded_ndcg@10"])
    test = {a: evaluate(a, "test") for a in sorted({0.0, kept})}
    for a, m in test.items():
        print(f"test alpha {a:g}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)
    result = {"workdir": str(args.workdir), "valid": rows, "kept_alpha": kept, "test": test}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        xs = [rows[a]["liked/ndcg@10"] for a in alphas]
        ys = [rows[a]["ndcg@10"] for a in alphas]
        ax.plot(xs, ys, "o-")
        for a, x, y in zip(alphas, xs, ys, strict=True):
            ax.annotate(f"alpha {a:g}", (x, y), fontsize=7)
        ax.set_xlabel("validation liked-target NDCG@10")
        ax.set_ylabel("validation NDCG@10 (all targets)")
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
    return result


if __name__ == "__main__":
    main()
