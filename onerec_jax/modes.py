"""What `--mode train`, `eval` and `tokenize` do: orchestration across the layers, nothing else.

Training a model that reads semantic ids tokenizes first (`ensure_semantic_ids`); tokenizing
builds the item features, whose collaborative block reads a trained run (runs.py). Library
modules below never start a mode.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from onerec_jax import defaults, runs
from onerec_jax.data import dataset
from onerec_jax.errors import UserError
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.models import reward as reward_lib
from onerec_jax.tokenize import semantic_ids
from onerec_jax.training import train as training


def tokenize(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """`--mode tokenize`: builds features, runs the tokenizer, writes the ids and their quality
    (tokenize/run.py lists the files); returns the report."""
    from onerec_jax.data import features  # scikit-learn, only when tokenizing
    from onerec_jax.tokenize import run as tokenize_run

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenize_run.check_method(config.tokenize)
    start = time.perf_counter()
    data, items = dataset.load_data(config.data, with_items=True)
    feats = features.build_features(
        config.features, data, items, collab_table=runs.collab_item_table
    )
    t_features = time.perf_counter() - start
    return tokenize_run.tokenize_items(config, data, items, feats, workdir, t_features)


def ensure_semantic_ids(config: ml_collections.ConfigDict, workdir: Path):
    """A config whose model.semantic_ids names ids: for a model that reads them with the path
    left empty, `--mode tokenize` runs into `workdir/semantic_ids` first (once; a rerun reuses
    them), with the run's `tokenize` and `features` settings."""
    if not defaults.needs_semantic_ids(config) or config.model.semantic_ids:
        return config
    target = workdir / "semantic_ids"
    if not (target / semantic_ids.IDS_FILE).is_file():
        if jax.process_index() == 0:
            logging.info("model reads semantic ids: tokenizing into %s", target)
            tokenize(config, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("semantic ids written")
    config = copy.deepcopy(config)
    config.model.semantic_ids = str(target)
    return config


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """`--mode train`: tokenizes first where the model needs it, then
    `training.train.train_and_evaluate`; returns results.json."""
    workdir = Path(workdir)
    config = ensure_semantic_ids(config, workdir)
    return training.train_and_evaluate(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """`--mode eval`: best params onto the devices present, test metrics recomputed."""
    workdir = Path(workdir)
    config = ensure_semantic_ids(config, workdir)  # the run's own ids when none are named
    data, items = training.load_data(config)
    run = runs.restore_best(config, data, items, workdir)
    if run.best_step is None:
        raise UserError(f"{workdir / 'checkpoints'}: no checkpoint. Train first (--mode train).")
    evaluator = make_evaluator(run.model, data, config, run.mesh, run.rules)
    test, _ = evaluator.evaluate(run.params, "test")
    return {"best_step": run.best_step, "test": test}


def reward(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """`--mode reward`: fit models/reward.py on the config's data, write `reward.npz` and
    `results.json` (validation and test RMSE against the baselines) into `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, _ = training.load_data(config)
    start = time.perf_counter()
    model, history = reward_lib.fit(data, config.reward, seed=int(config.seed))
    seconds = time.perf_counter() - start
    model.save(workdir / reward_lib.REWARD_FILE)
    results = {
        "model": "reward",
        "reward": config.reward.to_dict(),
        "seed": int(config.seed),
        "best_epoch": int(min(history, key=lambda h: h[2])[0]),
        "epochs": len(history),
        "train_seconds": seconds,
        "history": history,
        "val": reward_lib.rmse_report(model, data, "valid"),
        "test": reward_lib.rmse_report(model, data, "test"),
    }
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / reward_lib.RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results
