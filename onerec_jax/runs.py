"""A trained run: its config, data, model and best validated params; no optimizer state.

The one place that restores a `--mode train` run's best checkpoint for use: `--mode eval`
(modes.py), `Recommender.from_run` (recommend.py) and the collaborative item features
(`collab_item_table`, passed to `data.features.build_features`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from onerec_jax.data import dataset
from onerec_jax.data.records import ItemInfo
from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import load_run_config
from onerec_jax.errors import ConfigError, UserError
from onerec_jax.training import checkpointing, train


class TrainedRun(NamedTuple):
    config: ml_collections.ConfigDict
    data: SequenceData
    items: ItemInfo | None
    model: Any  # the model object of models/ (loss, user_state, item_table, ...)
    params: Any  # the best validated params; None when no step has been validated
    best_step: int | None
    mesh: jax.sharding.Mesh
    rules: tuple


def restore_best(
    config: ml_collections.ConfigDict, data: SequenceData, items, workdir: str | Path
) -> TrainedRun:
    """The model of `config` on `data` with the best validated params of the run in `workdir`
    (params and best_step None when no step has been validated), laid out on `config`'s mesh.
    Sets `config`'s mesh and logical axis rules globally. A layout mismatch raises
    CheckpointError."""
    mesh, rules = train.make_mesh(config)
    # Global, not a context: the caller traces the returned model's functions afterwards.
    jax.set_mesh(mesh)
    nn.set_logical_axis_rules(rules)  # before any trace (JAX_GUIDE.md)
    _, model = train.build_model(config, data, items)
    abstract = train.abstract_params(config, model, mesh, rules)
    ckpt = checkpointing.Checkpointer(Path(workdir) / "checkpoints", metric=train.SELECT_METRIC)
    try:
        best = ckpt.best_step()
        params = (
            None
            if best is None
            else ckpt.restore_params(
                best, abstract, vocab_size=data.n_items + 1, n_users=data.n_users
            )
        )
    finally:
        ckpt.close()
    return TrainedRun(config, data, items, model, params, best, mesh, rules)


def _on_one_device(config: ml_collections.ConfigDict) -> None:
    config.mesh.shape, config.mesh.num_devices = [-1, 1, 1], 1  # any saved mesh restores here


def load_run(workdir: str | Path) -> TrainedRun:
    """The run in `workdir` with its own config.json and data, on one device."""
    workdir = Path(workdir).expanduser()
    config = load_run_config(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise UserError(f"{workdir}: no checkpoints/. Train first (--mode train).")
    data, items = dataset.load_data(config.data)
    _on_one_device(config)
    run = restore_best(config, data, items, workdir)
    if run.best_step is None:
        raise UserError(
            f"{workdir / 'checkpoints'}: no validated checkpoint. Train until the run "
            "has validated once (--mode train)."
        )
    return run


def derived_run_dir(workdir: Path, out, suffix: str, flag: str, kind: str) -> Path:
    """The folder of a run made from the trained run in `workdir` (`--mode update`, `align`):
    `out`, or `<workdir><suffix>`; never `workdir` itself nor a folder holding such a run."""
    out = Path(out).expanduser() if out else workdir.with_name(workdir.name + suffix)
    if out.resolve() == workdir.resolve():
        raise UserError(f"{flag} must differ from --workdir: the trained run is kept.")
    if (out / "results.json").exists():
        raise UserError(f"{out} already holds an {kind} run; pass another {flag}.")
    return out


def collab_item_table(collab_workdir: str, data: SequenceData, items: ItemInfo) -> np.ndarray:
    """Rows 1..n_items of the item table of `collab_workdir`'s best checkpoint: the features'
    'collab' block (`features.collab_workdir`), for a run trained on this same `data`."""
    workdir = Path(collab_workdir).expanduser()
    if not (workdir / "config.json").is_file() or not (workdir / "checkpoints").is_dir():
        raise ConfigError(
            f"features.collab_workdir={workdir}: config.json or checkpoints/ is missing. Point "
            "it at the --workdir of a run trained with --mode train."
        )
    config = load_run_config(workdir)

    def mismatch(detail: str) -> ConfigError:
        return ConfigError(
            f"features.collab_workdir={workdir}: that run was trained on other data ({detail}); "
            f"this data has {data.n_items} items. Train it on the same data and filters."
        )

    results = workdir / "results.json"
    if results.is_file():
        trained_items = json.loads(results.read_text()).get("data", {}).get("items")
        if trained_items is not None and trained_items != data.n_items:
            raise mismatch(f"{trained_items} items")
    _on_one_device(config)
    try:  # the model and params layout of that run, on this data
        run = restore_best(config, data, items, workdir)
    except checkpointing.CheckpointError as e:
        raise mismatch(str(e)) from e
    if run.best_step is None:
        raise ConfigError(
            f"features.collab_workdir={workdir}: no validated checkpoint in checkpoints/. "
            "Train that run until it has validated once."
        )
    table = np.asarray(jax.device_get(run.model.item_table(run.params)))  # [V, dim]
    return table[1:]
