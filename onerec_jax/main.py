"""Command line: `python -m onerec_jax.main --config configs/X.py[:variant] --mode M`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from onerec_jax.data import dataset, sequences
from onerec_jax.errors import UserError

MODES = ("prepare", "train", "eval", "tokenize", "report", "recommend")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/ml25m.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where the run writes its outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_USER = flags.DEFINE_string("user", None, "--mode recommend: a user id of the trained data.")
_ITEMS = flags.DEFINE_multi_string(
    "items",
    [],
    "--mode recommend: movies watched, oldest first: titles or movieIds, ';'-separated and/or "
    "repeated, e.g. --items='Toy Story (1995); Heat' --items=260.",
)
_K = flags.DEFINE_integer("k", 10, "--mode recommend: how many movies to recommend.")


def prepare(config, workdir: str) -> sequences.SequenceData:
    """Downloads (if needed), builds or loads the sequence cache, and prints the stats table."""
    start = time.perf_counter()
    data, items = dataset.load_data(config.data)
    stats = data.stats()
    print(sequences.format_stats(stats))
    print(f"catalogue items with side information: {len(items):,}")
    print(f"prepared in {time.perf_counter() - start:.1f}s")
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_stats.json").write_text(json.dumps({**stats, "options": data.options}, indent=2))
    return data


def _line(name: str, m: dict) -> str:
    return (
        f"{name}: HR@10 {m['hr@10']:.4f} +- {m['hr@10_ci95']:.4f}  "
        f"NDCG@10 {m['ndcg@10']:.4f} +- {m['ndcg@10_ci95']:.4f}  "
        f"MRR {m['mrr']:.4f} +- {m['mrr_ci95']:.4f}  ({int(m['n_users']):,} users)"
    )


def _print_results(results: dict, workdir: Path) -> None:
    print(_line("validation (best step)", results["val"]))
    print(_line("test", results["test"]))
    print(
        f"best step {results['best_step']} of {results['steps']}; {results['params']:,} params; "
        f"train {results['train_seconds']:.0f}s; results in {workdir / 'results.json'}"
    )


def _print_eval(out: dict, workdir: Path) -> None:
    print(_line(f"test (step {out['best_step']})", out["test"]))
    recorded = workdir / "results.json"
    if recorded.exists():
        test = json.loads(recorded.read_text())["test"]
        same = all(test[k] == out["test"][k] for k in test if "@" in k or k == "mrr")
        print("matches the recorded results.json" if same else "DIFFERS from results.json")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every step at INFO
    config = _CONFIG.value
    if config is None and _MODE.value not in ("report", "recommend"):
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    workdir = Path(_WORKDIR.value)
    try:
        if _MODE.value == "report":  # reads the runs under --workdir; needs no config
            from onerec_jax.evaluation import report

            print(report.write_report(workdir).read_text())
            return
        if _MODE.value == "recommend":  # the trained run's own config.json, not --config
            from onerec_jax import recommend

            print(
                recommend.recommendations_text(
                    workdir, user=_USER.value, items=_ITEMS.value, k=_K.value
                )
            )
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if _MODE.value == "prepare":
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
            prepare(config, str(workdir))
        elif _MODE.value == "train":
            from onerec_jax.training import train  # JAX start-up only when training

            results = train.train_and_evaluate(config, workdir)
            _print_results(results, workdir)
        elif _MODE.value == "eval":
            from onerec_jax.training import train

            _print_eval(train.evaluate_checkpoint(config, workdir), workdir)
        elif _MODE.value == "tokenize":
            from onerec_jax.tokenize import quality, run

            report = run.tokenize(config, workdir)
            print(quality.format_report(report))
            print(
                f"features {report['features_seconds']:.1f}s, {config.tokenize.method} "
                f"{report['tokenizer_seconds']:.1f}s; ids in {workdir / run.IDS_FILE}, "
                f"readable in {workdir / run.CSV_FILE}"
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
