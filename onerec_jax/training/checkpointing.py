"""Orbax checkpoints of a training run: params, optimizer state, Grain iterator state and metadata.

The only module that imports orbax. One `Checkpointer` owns `workdir/checkpoints/`; each step
directory holds four items, so evaluation can restore params alone:

- `params`, `opt_state`: array trees (`StandardSave`), restorable onto any mesh;
- `data_iter`: this process's Grain iterator state (one JSON file per process, so resume with
  the same process count);
- `meta`: a small JSON dict the trainer needs to resume exactly (best validation so far,
  patience, wall time, ...: `state.LoopRecord.to_meta`).

Retention (verified on orbax-checkpoint 0.12.8 by tests/training/test_checkpointing.py): a step is
kept if it is the latest, or if it has the best `metric` among the steps saved WITH metrics. A
step saved without metrics (e.g. forced at a crash) is kept only while it is the latest. After
saving 10 (metric 0.3), 20 (0.5), 30 (0.4), 40 (no metrics): on disk 20 and 40,
`latest_step() == 40`, `best_step() == 20`. `best_step()` is None while no step has metrics.

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete
(on GCS: a `commit_success.txt` marker instead). Unfinished steps are never listed or restored,
and `cleanup_tmp_directories` deletes them before the next save; old steps are deleted only after
the new one is complete. On local disks a directory named by a bare step number counts as
finished, so copy checkpoints into place atomically (or to a fresh directory).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from onerec_jax.errors import UserError

PyTree = Any
_OTHER_MODEL = (
    "These checkpoints come from a different model or config: use a fresh --workdir, or the "
    "config that wrote them"
)
_OTHER_PROCESS_COUNT = (
    "The data iterator state is saved per process: resume with the process count that saved it"
)


class CheckpointError(UserError):
    """Checkpoints in the workdir cannot be restored into this run (other model, missing step)."""


def abstract_like(tree: PyTree, shardings: PyTree | jax.sharding.Sharding | None = None) -> PyTree:
    """A tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` to restore `tree` onto.

    Args:
      tree: concrete arrays, or `jax.eval_shape` output.
      shardings: one sharding for every leaf, a tree of shardings matching `tree`, or None to keep
        each leaf's own sharding (concrete `jax.Array`s); leaves without one go to the first local
        device.

    Returns:
      The abstract tree, same structure as `tree`.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x, sharding=None):
        sharding = sharding or getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(leaf, tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: leaf(x, shardings), tree)
    return jax.tree.map(leaf, tree, shardings)


def _json_default(x: Any) -> Any:
    """numpy / jax scalars as Python numbers, so metrics and meta can hold them."""
    if isinstance(x, np.generic) or (hasattr(x, "__array__") and np.ndim(x) == 0):
        return np.asarray(x).item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _to_json(d: Mapping[str, Any]) -> dict:
    """A plain-JSON deep copy of `d` (also protects it from the caller mutating it mid-save)."""
    return json.loads(json.dumps(dict(d), default=_json_default))


def _leaf_name(path: tuple) -> str:
    """A leaf's keys joined by '.', as orbax names it: `0.mu.w` for `opt_state[0].mu["w"]`.

    Orbax stores namedtuples and dataclasses as dicts and tuples as lists, so attribute, dict and
    index keys all reduce to their bare names.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
    """{leaf name: shape} of an abstract tree or of orbax's metadata tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        out[_leaf_name(path)] = None if shape is None else tuple(shape)
    return out


def _on_disk_shape(leaf, shape):
    """`leaf` (a ShapeDtypeStruct) with the checkpoint's `shape` (None: as it is), replicated
    over its mesh when that shape does not split like the leaf's (restored, then cut or padded
    by `_fit_rows`)."""
    if shape is None:
        return leaf
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and hasattr(sharding, "mesh"):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)


def _fit_rows(restored, abstract):
    """`restored` with `abstract`'s rows (padding rows cut, or added as zeros) and sharding."""
    rows = abstract.shape[0] if abstract.shape else None
    if rows is None or restored.shape == abstract.shape:
        return restored
    if restored.shape[0] > rows:
        out = restored[:rows]
    else:
        pad = [(0, rows - restored.shape[0])] + [(0, 0)] * (restored.ndim - 1)
        out = jnp.pad(restored, pad)
    sharding = getattr(abstract, "sharding", None)
    return jax.device_put(out, sharding) if sharding is not None else out


def _mismatches(stored: dict, wanted: dict, limit: int = 3) -> list[str]:
    """Up to `limit` human-readable differences between two {leaf name: shape} maps."""
    out = []
    for name in sorted(stored.keys() | wanted.keys()):
        if name not in wanted:
            out.append(f"{name} is in the checkpoint but not in the model")
        elif name not in stored:
            out.append(f"{name} is in the model but not in the checkpoint")
        elif stored[name] != wanted[name]:
            out.append(f"{name} has shape {stored[name]} in the checkpoint, {wanted[name]} here")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _array_args(trees: dict[str, PyTree], arg_cls: type) -> dict[str, Any]:
    """`arg_cls(tree)` per item, skipping trees without arrays (e.g. `optax.sgd`'s state): orbax
    rejects empty items, and an empty tree is its own restored value."""
    return {name: arg_cls(tree) for name, tree in trees.items() if jax.tree.leaves(tree)}


class Checkpointer:
    """Saves and restores training checkpoints under one directory (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 1,
        metric: str = "val/ndcg@10",
        async_save: bool = True,
    ):
        """Opens (or creates) `directory`; unfinished saves left by a crash are cleaned up.

        Args:
          directory: the checkpoint root, e.g. `workdir/checkpoints` (local path or gs://...).
          save_interval_steps: `save` writes only steps that are multiples of this (or forced).
          metric: the key of `save(metrics=...)` that ranks checkpoints; higher is better.
          async_save: write in a background thread; `save` returns once arrays are on the host.
        """
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.metric = metric
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocm.AnyPreservationPolicy(
                [
                    ocm.LatestN(1),
                    ocm.BestN(
                        get_metric_fn=self._metric_value,
                        reverse=False,
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
            best_fn=self._metric_value,  # without it orbax's best_step() is the latest step
            best_mode="max",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        # Explicit handlers, so a fresh manager can read item metadata before any save.
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "data_iter": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )

    def _metric_value(self, metrics: Mapping[str, float]) -> float:
        """The ranking value of a step's metrics; NaN ranks below everything."""
        value = float(metrics[self.metric])
        return -math.inf if math.isnan(value) else value

    def save(
        self,
        step: int,
        *,
        params: PyTree,
        opt_state: PyTree,
        data_iter: grain.DatasetIterator,
        meta: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `step` if it is on the save interval (or `force`); returns whether it saved.

        The iterator state and `meta` are captured before returning; so are the arrays (copied to
        host), so the caller may advance the iterator and donate the arrays right away. `metrics`
        (must contain `metric`) rank the step for retention; without them it is kept only while
        it is the latest. A step already on disk is never overwritten: `save` returns False.
        """
        if metrics is not None and self.metric not in metrics:
            raise ValueError(f"metrics must contain {self.metric!r}, got {sorted(metrics)}")
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **_array_args({"params": params, "opt_state": opt_state}, ocp.args.StandardSave),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(_to_json(meta)),
        )
        metrics = None if metrics is None else _to_json(metrics)
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    def latest_step(self) -> int | None:
        """The newest saved step, or None if there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the highest `metric`, or None if no step was saved with metrics."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Every step on disk, ascending."""
        return sorted(self._manager.all_steps())

    def restore(
        self,
        step: int,
        *,
        abstract_params: PyTree,
        abstract_opt_state: PyTree,
        data_iter: grain.DatasetIterator,
    ) -> tuple[PyTree, PyTree, dict]:
        """Resumes training from `step`: (params, opt_state, meta); `data_iter` is set in place.

        The abstract trees (see `abstract_like`) give each array's shape, dtype and sharding.
        Raises CheckpointError if the checkpoint does not match them or its iterator state.
        """
        abstract = {"params": abstract_params, "opt_state": abstract_opt_state}
        self._check_matches(step, abstract)
        arrays = _array_args(abstract, ocp.args.StandardRestore)
        args = ocp.args.Composite(
            **arrays,
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        )
        out = self._restore(step, args)
        params, opt_state = (out[k] if k in arrays else abstract[k] for k in abstract)
        return params, opt_state, dict(out["meta"])

    def restore_params(
        self,
        step: int,
        abstract_params: PyTree,
        vocab_size: int | None = None,
        n_users: int | None = None,
    ) -> PyTree:
        """The params of `step` alone, placed on `abstract_params`' shardings (any mesh).

        `vocab_size` (V = n_items + 1 of the data at hand) and `n_users`: when the checkpoint
        was written for that same V (and user count, where both are known; its meta says so),
        item and user tables may differ from it in their padding rows only (a table split n ways
        has its rows rounded up to a multiple of n, parallel/vocab_parallel.py), so a run
        trained on 8 vocab shards restores onto 1 device or 4: the padding rows are cut or added
        as zeros (no item or user reads them). Otherwise any shape difference is an error."""
        stored = self._stored_shapes(step, "params")
        resized = {}
        saved = self._saved_sizes(step)
        same_users = not n_users or saved.get("n_users") in (None, n_users)
        if vocab_size and saved.get("vocab_size") == vocab_size and same_users:
            # Every table holds at least its real rows on both sides, so cutting to the smaller
            # side never drops a real row; the smallest real count bounds where that holds.
            real = min(vocab_size, n_users or vocab_size)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
                name, shape = _leaf_name(path), tuple(leaf.shape)
                old = stored.get(name)
                if old and old != shape and old[1:] == shape[1:] and min(old[0], shape[0]) >= real:
                    resized[name] = old
        wanted = jax.tree_util.tree_map_with_path(
            lambda path, leaf: _on_disk_shape(leaf, resized.get(_leaf_name(path))),
            abstract_params,
        )
        self._check_matches(step, {"params": wanted})
        if not jax.tree.leaves(abstract_params):
            return abstract_params
        out = self._restore(step, ocp.args.Composite(params=ocp.args.StandardRestore(wanted)))
        return jax.tree.map(_fit_rows, out["params"], abstract_params)

    def _saved_sizes(self, step: int) -> dict:
        """The data sizes the trainer recorded in `step`'s meta ("vocab_size", "n_users"; {}:
        none recorded)."""
        if step not in self.all_steps():
            return {}
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (ValueError, FileNotFoundError, KeyError):
            return {}
        meta = dict(meta["meta"] or {})
        return {k: meta[k] for k in ("vocab_size", "n_users") if k in meta}

    def _stored_shapes(self, step: int, item: str) -> dict:
        if step not in self.all_steps():
            return {}
        stored = self._manager.item_metadata(step)
        return {} if stored.get(item) is None else _shapes(stored[item].tree)

    def wait(self) -> None:
        """Blocks until every started save is on disk (and old steps are deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        # orbax's close() does not wait for the clean-up of unfinished saves it starts on opening
        # (orbax-checkpoint 0.12.8): a process that exits right after (--mode eval with no
        # checkpoint) would get that thread's traceback at interpreter shutdown.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, step: int, problem: str, fix: str = _OTHER_MODEL) -> CheckpointError:
        return CheckpointError(
            f"cannot restore step {step} from {self.directory}: {problem}. {fix}"
        )

    def _check_matches(self, step: int, abstract: dict[str, PyTree]) -> None:
        """Raises CheckpointError naming the first leaves whose names or shapes differ."""
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory} (steps on disk: {steps})"
            )
        for item, tree in abstract.items():
            on_disk = self._stored_shapes(step, item)
            wanted = _shapes(tree)
            if wanted and not on_disk:  # e.g. a directory not written by a finished save
                raise self._error(step, f"it holds no {item}")
            problems = _mismatches(on_disk, wanted)
            if problems:
                raise self._error(step, f"{item}: " + "; ".join(problems))

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except (ValueError, FileNotFoundError) as e:  # anything _check_matches did not foresee
            first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
            # Grain names its per-process state files process_<i>-of-<n>.json.
            missing_iter_state = re.search(r"process_\d+-of-\d+\.json", first_line)
            fix = _OTHER_PROCESS_COUNT if missing_iter_state else _OTHER_MODEL
            raise self._error(step, first_line, fix) from e
