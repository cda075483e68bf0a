"""Cold-start protocols: items no model trained on, and users with almost no history.

`data.cold_items` = X > 0 holds X of the catalogue out of training: the newest X by first
appearance (`data.cold_items_by="newest"`, the default: new releases, as in production) or a
random X ("random", `seed`). A held-out item is removed from every user's training part (all but
the last two interactions) and kept where it is a validation or test target, or in a test input
(the validation item); so no training window, item count or popularity sees it, and the targets
it is in measure how a model ranks an item it never trained on. Users left with no training
interaction are dropped (counted in `options["cold_users_dropped"]`).

`data.new_users` = Y > 0 turns a random Y of the users into new users: only their last
`data.new_user_items` training interactions are kept (then the validation and test ones), as if
they had just signed up.

The evaluator reports, beside the metrics over every user, the metrics over users whose target
is a cold item (no training interaction: held out, or naturally absent from training) and a warm
one, and over users with at most `data.new_user_items` training interactions
(evaluation/evaluator.py `segments`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from absl import logging

from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import ConfigError

BY = ("newest", "random")


def cold_item_mask(data: SequenceData, fraction: float, by: str = "newest", seed: int = 0):
    """[V] bool: the round(fraction x n_items) items held out (row 0, padding, never)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.cold_items={fraction}: a fraction of the items in [0, 1).")
    if by not in BY:
        raise ConfigError(f"data.cold_items_by={by!r}: use one of {BY}.")
    n = int(round(fraction * data.n_items))
    cold = np.zeros(data.n_items + 1, bool)
    if n == 0:
        return cold
    if by == "random":
        cold[1 + np.random.default_rng(seed).choice(data.n_items, n, replace=False)] = True
        return cold
    first = np.full(data.n_items + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, data.items, np.asarray(data.timestamps, np.int64))
    # newest first appearance first; ties: the higher dense id (a later source id) first
    order = np.lexsort((-np.arange(1, data.n_items + 1), -first[1:]))
    cold[1 + order[:n]] = True
    return cold


def _select(data: SequenceData, keep: np.ndarray, options: dict, dropped_key: str):
    """`data` with only the interactions in `keep`; users left with < 3 (no training
    interaction) are dropped and counted in `options[dropped_key]`."""
    counts = np.add.reduceat(keep.astype(np.int64), data.offsets[:-1])  # every user has >= 3
    users = np.flatnonzero(counts >= 3)
    kept_user = np.zeros(data.n_users, bool)
    kept_user[users] = True
    keep = keep & np.repeat(kept_user, np.diff(data.offsets))
    offsets = np.zeros(len(users) + 1, np.int64)
    np.cumsum(counts[users], out=offsets[1:])
    dropped = int(data.n_users - len(users))
    return dataclasses.replace(
        data,
        offsets=offsets,
        items=data.items[keep],
        timestamps=data.timestamps[keep],
        ratings=data.ratings[keep],
        user_ids=data.user_ids[users],
        options={**data.options, **options, dropped_key: dropped},
    )


def hold_out_items(data: SequenceData, cold: np.ndarray) -> SequenceData:
    """`data` without the `cold` [V] items in any training part."""
    keep = ~(cold[data.items] & data.train_mask())
    return _select(data, keep, {"cold_items_held_out": int(cold.sum())}, "cold_users_dropped")


def truncate_users(data: SequenceData, fraction: float, n_items: int, seed: int = 0):
    """`data` where a random `fraction` of the users keep only their last `n_items` training
    interactions (and their validation and test ones)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"data.new_users={fraction}: a fraction of the users in [0, 1].")
    if n_items < 1:
        raise ConfigError(f"data.new_user_items={n_items}: keep at least 1 training item.")
    chosen = np.zeros(data.n_users, bool)
    n = int(round(fraction * data.n_users))
    chosen[np.random.default_rng(seed + 1).choice(data.n_users, n, replace=False)] = True
    ends = np.repeat(data.offsets[1:], np.diff(data.offsets))
    position = np.arange(len(data.items))
    too_old = position < ends - 2 - n_items  # before the last n_items training interactions
    keep = ~(too_old & np.repeat(chosen, np.diff(data.offsets)))
    return _select(data, keep, {"new_users": n}, "new_users_dropped")


def apply(cfg: ml_collections.ConfigDict, data: SequenceData, seed: int = 0) -> SequenceData:
    """The cold-start protocol of `cfg` (the config's `data` section) applied to `data`."""
    fraction = float(cfg.get("cold_items", 0.0))
    new_users = float(cfg.get("new_users", 0.0))
    if fraction:
        cold = cold_item_mask(data, fraction, cfg.get("cold_items_by", "newest"), seed)
        data = hold_out_items(data, cold)
        logging.warning(
            "data.cold_items=%s: %d items held out of training (%s); %d users left without a "
            "training interaction dropped.",
            fraction,
            int(cold.sum()),
            cfg.get("cold_items_by", "newest"),
            data.options["cold_users_dropped"],
        )
    if new_users:
        data = truncate_users(data, new_users, int(cfg.get("new_user_items", 3)), seed)
    return data
