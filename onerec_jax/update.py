"""`--mode update`: a trained run continued on interactions that arrived after it was trained.

    python -m onerec_jax.main --mode update --workdir runs/sasrec --new_data new_ratings/ \
        [--update_workdir runs/sasrec_update] [--update_steps N | --update_epochs 1]

`--new_data` is a folder in the trained source's layout (a `ratings.csv` for MovieLens CSV; a
`movies.csv` beside it, when present, is the newer catalogue). The update:
1. appends the new interactions to the run's data without parsing the old files again
   (data/dataset.py `with_updates`: the old sequences come from the run's cache; the combined
   sequences are cached too), the same filters applied;
2. builds the model on the combined data and starts it from the run's best checkpoint: every
   param is copied, and tables over the item vocabulary (logical axis "vocab") are re-indexed
   by source item id: an item keeps its trained row under its new dense id, a new item gets the
   fresh initialisation's row (its side features and semantic-id codes, where the model reads
   them, are the new data's);
3. trains `--update_steps` steps (default: `--update_epochs` epochs of the combined data's
   windows, rounded to whole epochs, at least 1) with a fresh optimizer state, no warmup, and
   the run's own schedule shape over those steps, validating at the end, then tests; the
   result is a normal run in `--update_workdir`
   (default: `<workdir>_update`) that `--mode eval / recommend / serve` read like any other.
The trained run is never written to. New users need no table (sequence models read the history);
models with a per-user table (BPR, NCF) are refused: train them again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from onerec_jax.errors import UserError
from onerec_jax.models import registry
from onerec_jax.runs import derived_run_dir, load_run
from onerec_jax.training import train


def item_row_map(old_ids: np.ndarray, new_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(old rows, new rows): dense ids of the items both catalogues hold (matched by source id
    `old_ids` / `new_ids`, [V] with [0] padding), plus row 0 -> 0."""
    old_src, new_src = old_ids[1:], new_ids[1:]
    pos = np.searchsorted(new_src, old_src)  # dense ids follow ascending source ids
    pos = np.minimum(pos, len(new_src) - 1)
    found = new_src[pos] == old_src
    old_rows = np.flatnonzero(found) + 1
    return np.r_[0, old_rows], np.r_[0, pos[found] + 1]


def remap_params(old_params, fresh_params, boxed, old_ids: np.ndarray, new_ids: np.ndarray):
    """`fresh_params` (the new model's initialisation, host arrays) with every leaf taken from
    `old_params`: leaves with a "vocab" logical axis (in `boxed`, the new model's boxed abstract
    params) row by row through `item_row_map`, rows past the real items (the [MASK] token,
    split padding) by their offset from the vocabulary's end; the rest whole (same shape)."""
    old_vocab, new_vocab = len(old_ids), len(new_ids)
    src, dst = item_row_map(old_ids, new_ids)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    names = jax.tree.leaves(
        jax.tree.map(lambda b: b.names if is_box(b) else None, boxed, is_leaf=is_box),
        is_leaf=lambda x: x is None or isinstance(x, tuple),
    )
    old_leaves, treedef = jax.tree.flatten(old_params)
    fresh_leaves = jax.tree.leaves(fresh_params)
    if len(old_leaves) != len(fresh_leaves) or len(names) != len(fresh_leaves):
        raise UserError("the updated model's params differ in structure from the trained run's.")
    out = []
    for old, fresh, axes in zip(old_leaves, fresh_leaves, names, strict=True):
        old, new = np.asarray(old), np.array(fresh, copy=True)
        if axes and "vocab" in axes:
            a = axes.index("vocab")
            old_m, new_m = np.moveaxis(old, a, 0), np.moveaxis(new, a, 0)
            new_m[dst] = old_m[src]
            extra = np.arange(old_vocab, old_m.shape[0])  # [MASK] row, split padding
            target = extra - old_vocab + new_vocab
            keep = target < new_m.shape[0]
            new_m[target[keep]] = old_m[extra[keep]]
            out.append(np.moveaxis(new_m, 0, a))
        elif old.shape == new.shape:
            out.append(old)
        else:
            raise UserError(
                f"a param of shape {old.shape} became {new.shape} on the new data without an item "
                "axis: this model cannot be updated; train it again."
            )
    return jax.tree.unflatten(treedef, out)


def update(
    workdir: str | Path,
    new_data: str | Path,
    *,
    out: str | Path | None = None,
    steps: int = 0,
    epochs: float = 1.0,
) -> dict:
    """`--mode update` (the module docstring); returns the updated run's results.json."""
    workdir = Path(workdir).expanduser()
    out = derived_run_dir(workdir, out, "_update", "--update_workdir", "updated")
    new_data = Path(new_data).expanduser()
    if not new_data.is_dir():
        raise UserError(f"--new_data={new_data}: not a directory of new interactions.")
    if steps < 0 or epochs <= 0:
        raise UserError(f"--update_steps={steps} / --update_epochs={epochs}: use positive values.")
    run = load_run(workdir)
    if registry.model_spec(run.config).reads_user_ids:
        raise UserError(
            f"model {run.config.model.name!r} keeps a learned row per user: --mode update serves "
            "sequence models (a new user is their history). Train this model again instead."
        )
    old_params = jax.device_get(run.params)
    old_ids = np.asarray(run.data.item_ids)
    config = ml_collections.ConfigDict(run.config.to_dict())
    config.data.update_paths = (*tuple(config.data.get("update_paths", ())), str(new_data))
    config.optim.warmup_steps = 0
    config.train.patience = max(int(config.train.patience), 1_000_000)  # train every step
    if steps:
        config.train.num_steps = steps
    else:
        config.train.num_steps = 0
        config.train.num_epochs = max(1, int(round(epochs)))
    config.train.eval_every_steps = 0  # once an epoch and at the end

    start = time.perf_counter()

    def init_params(setup):
        fresh = jax.device_get(train.initial_state(setup, config.seed).params)
        boxed = jax.eval_shape(setup.init_fn, jax.random.key(0)).params
        return remap_params(old_params, fresh, boxed, old_ids, np.asarray(setup.data.item_ids))

    results = train.train_and_evaluate(config, out, init_params=init_params)
    results["update"] = {
        "from": str(workdir),
        "workdir": str(out),
        "from_best_step": run.best_step,
        "new_data": str(new_data),
        "items_before": int(run.data.n_items),
        "users_before": int(run.data.n_users),
        "wall_seconds": time.perf_counter() - start,
    }
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results
