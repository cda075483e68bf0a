"""Cold-start metrics of a trained run, re-evaluated under other ranking settings on its best
checkpoint: `eval.cold_share` for generative models (cold items by their content codes) and
`model.cold_content_only` for the OneRec item head (BENCHMARKS.md "Cold start").

  python benchmarks/cold_start_eval.py --workdir runs/cold_sid --cold_share 0.1,0.2 \
      --cold_bonus 0,4,8,16
  python benchmarks/cold_start_eval.py --workdir runs/cold_onerec --cold_content_only
  python benchmarks/cold_start_eval.py --workdir runs/cold_sid --cold_share 0 --among_cold

All / cold / warm targets of every setting on validation (writes
<workdir>/cold_start_eval.json). Choose the setting on validation, then read test once for it:
`--cold_share 0.1 --splits valid,test`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from onerec_jax.data.training_examples import prefix_inputs
from onerec_jax.evaluation import metrics
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.models.full_ranking import tie_rank
from onerec_jax.runs import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (with data.cold_items set).")
_SHARES = flags.DEFINE_list("cold_share", [], "eval.cold_share values (generative models).")
_BONUS = flags.DEFINE_list("cold_bonus", ["0"], "eval.cold_bonus values, with each cold_share.")
_SPLITS = flags.DEFINE_list("splits", ["valid"], "Splits to evaluate (test: once, when chosen).")
_CONTENT = flags.DEFINE_bool(
    "cold_content_only", False, "Also evaluate with model.cold_content_only=True (item head)."
)
_AMONG = flags.DEFINE_bool(
    "among_cold", False, "Generative runs: also rank cold targets among the cold items alone."
)
KEYS = ("ndcg@10", "hr@10", "mrr", "cold/n_users", "cold/ndcg@10", "cold/hr@10", "cold/mrr")
KEYS += ("warm/ndcg@10", "lists_short", "lists_invalid", "lists_duplicate")


def among_cold(run, split: str, batch: int = 64) -> dict:
    """A generative run's cold targets ranked among the cold items alone by their content-code
    log-probability (`cold_scores`), seen items left out, ties half: do the codes carry the
    signal, whatever their scale against the warm items? Beside random's metrics over as many."""
    model, data = run.model, run.data
    part = data.split(split)
    column = {int(c): j for j, c in enumerate(model.cold_items)}
    users = np.array([u for u in range(data.n_users) if int(part.targets[u]) in column])

    def scores(params, batch, seen):
        variables, context = model._encoded(params, batch)
        return model.cold_scores(variables, context, seen)

    scores = jax.jit(scores)
    ranks = []
    for lo in range(0, len(users), batch):
        rows = users[lo : lo + batch]
        inputs = prefix_inputs(data, split, rows, run.config.data.max_len)
        seen = np.zeros((len(rows), data.n_items + 1), bool)
        seen[:, 0] = True
        seen[data.prefix_items(split, rows)] = True
        out = np.asarray(scores(run.params, {"inputs": inputs, "user": rows}, seen))
        for i, u in enumerate(rows):
            target = out[i, column[int(part.targets[u])]]
            rest = out[i][np.isfinite(out[i])]
            ranks.append(tie_rank((rest > target).sum(), (rest == target).sum() - 1))
    found = metrics.metrics_from_ranks(np.asarray(ranks, np.float64))
    chance = metrics.metrics_from_ranks(np.arange(1, len(column) + 1, dtype=np.float64))
    return {"n_users": len(users), "n_cold": len(column)} | {
        f"{who}/{k}": float(m[k])
        for who, m in (("codes", found), ("random", chance))
        for k in ("ndcg@10", "hr@10", "mrr")
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run = load_run(_WORKDIR.value)
    settings = [] if _SHARES.value else [("as trained", {})]
    settings += [
        (f"cold_share={s} cold_bonus={b}", {"cold_share": float(s), "cold_bonus": float(b)})
        for s in _SHARES.value
        for b in _BONUS.value
    ]
    if _CONTENT.value:
        settings.append(("cold_content_only", {"cold_content_only": True}))
    out = {}
    for name, change in settings:
        if "cold_share" in change:  # read when generating
            run.model.cold_share, run.model.cold_bonus = change["cold_share"], change["cold_bonus"]
        if "cold_content_only" in change:
            run.config.model.cold_content_only = True  # read when ranking
        evaluator = make_evaluator(run.model, run.data, run.config, run.mesh, run.rules)
        for split in _SPLITS.value:
            start = time.perf_counter()
            metrics, _ = evaluator.evaluate(run.params, split)
            row = {k: float(metrics[k]) for k in KEYS if k in metrics}
            row["seconds"] = time.perf_counter() - start
            out[f"{name}/{split}"] = row
            cells = ", ".join(f"{k} {v:.4f}" for k, v in row.items())
            print(f"{name} {split}: {cells}", flush=True)
    if _AMONG.value:
        for split in _SPLITS.value:
            row = among_cold(run, split)
            out[f"among_cold/{split}"] = row
            print(f"among cold items {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    (Path(_WORKDIR.value) / "cold_start_eval.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
