"""Leave-one-out user sequences (PROTOCOL.md steps 1-6) in CSR form, with an on-disk cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import logging

from onerec_jax.data.records import Interactions
from onerec_jax.errors import ConfigError, DataFormatError

CACHE_VERSION = 1  # bump when the build or the cache layout changes


@dataclasses.dataclass(frozen=True)
class Split:
    """One leave-one-out view: per user, a history slice of `SequenceData.items` and a target.

    The history of dense user `u` is `data.items[starts[u]:ends[u]]` (chronological). For the
    training split `targets` is all zeros: training windows are cut from the history itself.
    """

    name: str  # "train", "valid" or "test"
    starts: np.ndarray  # [n_users] int64, index into SequenceData.items
    ends: np.ndarray  # [n_users] int64, exclusive
    targets: np.ndarray  # [n_users] int32 dense item ids (0 for "train")

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """Every user's chronological item sequence, CSR, dense ids (item 0 = padding).

    Dense user `u` owns rows `offsets[u]:offsets[u+1]` of `items`, `timestamps`, `ratings`,
    sorted by timestamp with ties in source-file order. `user_ids[u]` and `item_ids[i]` map
    dense ids back to the source ids (`item_ids[0]` is a padding placeholder).
    """

    offsets: np.ndarray  # [n_users + 1] int64
    items: np.ndarray  # [n_interactions] int32, dense item ids in 1..n_items
    timestamps: np.ndarray  # [n_interactions] int64, seconds (or file position if none)
    ratings: np.ndarray  # [n_interactions] float32 (1.0 where the source has none)
    user_ids: np.ndarray  # [n_users] source user ids (int64 or str)
    item_ids: np.ndarray  # [n_items + 1] source item ids (int64 or str); [0] is padding
    options: dict  # the preprocessing options that built this data (recorded in results)

    def __post_init__(self):
        if len(self.offsets) > 1 and np.diff(self.offsets).min() < 3:
            raise ValueError("every user needs >= 3 interactions for leave-one-out")

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        """Number of real items; valid dense ids are 1..n_items (0 is padding)."""
        return len(self.item_ids) - 1

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    def sequence(self, user: int) -> np.ndarray:
        """The full chronological item sequence of dense user `user`."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def split(self, name: str) -> Split:
        """Leave-one-out view: "train" (all but the last two), "valid" or "test"."""
        starts, ends = self.offsets[:-1], self.offsets[1:]
        if name == "train":
            return Split(name, starts, ends - 2, np.zeros(self.n_users, np.int32))
        if name == "valid":
            return Split(name, starts, ends - 2, self.items[ends - 2])
        if name == "test":
            return Split(name, starts, ends - 1, self.items[ends - 1])
        raise ValueError(f"unknown split {name!r}: use 'train', 'valid' or 'test'")

    def prefix_items(self, name: str, users: np.ndarray | None = None):
        """(rows [N], items [N]): every item of the `name` split's prefix of `users` (default:
        all), flattened in order; rows index into `users`."""
        part = self.split(name)
        users = np.arange(self.n_users) if users is None else np.asarray(users, np.int64)
        starts, lengths = part.starts[users], part.ends[users] - part.starts[users]
        rows = np.repeat(np.arange(len(users)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return rows, self.items[np.repeat(starts, lengths) + offsets]

    def train_mask(self) -> np.ndarray:
        """[n_interactions] bool: the interaction is in its user's training part (all but the
        last two)."""
        ends = np.repeat(self.offsets[1:], np.diff(self.offsets))
        return np.arange(len(self.items)) < ends - 2

    @property
    def has_ratings(self) -> bool:
        """Whether the source rates its interactions: readers without ratings (the `user item
        ...` layouts) store 1.0 everywhere, and one value everywhere says nothing either."""
        return bool(len(self.ratings)) and bool((self.ratings != self.ratings[0]).any())

    def target_ratings(self, name: str) -> np.ndarray:
        """[n_users] rating of each user's `name` ("valid" or "test") target."""
        back = {"valid": 2, "test": 1}
        if name not in back:
            raise ValueError(f"target_ratings: split {name!r} has no target; use valid or test")
        return self.ratings[self.offsets[1:] - back[name]]

    @property
    def train(self) -> Split:
        return self.split("train")

    @property
    def valid(self) -> Split:
        return self.split("valid")

    @property
    def test(self) -> Split:
        return self.split("test")

    def stats(self) -> dict[str, float]:
        """Users, items, interactions, density and sequence-length percentiles."""
        lengths = np.diff(self.offsets)
        out = {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "density": self.n_interactions / max(self.n_users * self.n_items, 1),
            "length_mean": float(lengths.mean()) if len(lengths) else 0.0,
        }
        for q in (0, 25, 50, 75, 90, 99, 100):
            out[f"length_p{q}"] = float(np.percentile(lengths, q)) if len(lengths) else 0.0
        return out


def format_stats(stats: dict[str, float]) -> str:
    """The `SequenceData.stats()` dict as an aligned two-column text table."""
    rows = [
        ("users", f"{stats['users']:,}"),
        ("items", f"{stats['items']:,}"),
        ("interactions", f"{stats['interactions']:,}"),
        ("density", f"{stats['density']:.6f}"),
        ("length mean", f"{stats['length_mean']:.1f}"),
    ]
    names = {0: "min", 100: "max"}
    for q in (0, 25, 50, 75, 90, 99, 100):
        rows.append((f"length {names.get(q, f'p{q}')}", f"{stats[f'length_p{q}']:,.0f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>14}" for k, v in rows)


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """Every preprocessing choice of PROTOCOL.md steps 1-2; part of the cache key."""

    min_rating: float | None = None  # keep ratings >= this; None keeps all (implicit feedback)
    min_user_interactions: int = 5  # k-core threshold for users (>= 3 for leave-one-out)
    min_item_interactions: int = 0  # k-core threshold for items (0: no item filter)

    def __post_init__(self):
        if self.min_user_interactions < 3:
            raise ConfigError(
                f"data.min_user_interactions={self.min_user_interactions}: leave-one-out needs "
                "at least 3 interactions per user (train, validation, test); set it to 3 or more."
            )
        if self.min_item_interactions < 0:
            raise ConfigError("data.min_item_interactions must be >= 0: set 0 for no item filter.")


def _dense(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, sorted uniques) with codes[k] = index of ids[k] in uniques."""
    if len(ids) and ids.dtype.kind in "iu" and ids.min() >= 0 and ids.max() < 4 * len(ids) + 2**20:
        present = np.bincount(ids) > 0  # O(n), no sort, for MovieLens-sized integer ids
        lookup = np.cumsum(present, dtype=np.int32) - 1
        return lookup[ids], np.flatnonzero(present)
    uniques, codes = np.unique(ids, return_inverse=True)
    return codes.astype(np.int32), uniques


def _sorted_codes(codes: np.ndarray, vocab: np.ndarray | None) -> np.ndarray:
    """Codes into `vocab` -> codes into the sorted vocab, so dense ids follow source order."""
    if vocab is None:
        return codes
    rank = np.empty(len(vocab), np.int64)
    rank[np.argsort(vocab, kind="stable")] = np.arange(len(vocab))
    return rank[codes]


def _kcore(users, items, keep, min_user: int, min_item: int) -> np.ndarray | None:
    """Iterative k-core over dense codes: drops users and items below their threshold until
    nothing changes. Returns the mask of kept rows, or None when every row is kept."""
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    while True:
        user_count = np.bincount(users if keep is None else users[keep], minlength=n_users)
        drop = (user_count < min_user)[users]
        if min_item > 0:
            item_count = np.bincount(items if keep is None else items[keep], minlength=n_items)
            drop |= (item_count < min_item)[items]
        new_keep = ~drop if keep is None else keep & ~drop
        if new_keep.all():
            return None
        if keep is not None and np.array_equal(new_keep, keep):
            return keep
        keep = new_keep


def build_sequences(inter: Interactions, options: SequenceOptions) -> SequenceData:
    """PROTOCOL.md steps 1-5: threshold, k-core, dense ids, stable chronological order.

    Written for ML-25M on small machines: int32 codes, in-place arithmetic, and no second pass
    over the rows when no filter removes anything.
    """
    if len(inter) == 0:
        raise DataFormatError(f"{inter.files}: no interactions were read. Is the file empty?")
    # Dense ids in ascending source-id order (item 0 = padding comes later).
    user_codes, user_ids = _dense(_sorted_codes(inter.users, inter.user_vocab))
    item_codes, item_ids = _dense(_sorted_codes(inter.items, inter.item_vocab))
    ts, ratings = inter.timestamps, inter.ratings
    keep = None if options.min_rating is None else inter.ratings >= options.min_rating
    keep = _kcore(
        user_codes, item_codes, keep, options.min_user_interactions, options.min_item_interactions
    )
    if keep is not None:
        if not keep.any():
            raise DataFormatError(
                f"{inter.files}: no user keeps >= {options.min_user_interactions} interactions "
                "after filtering. Lower data.min_user_interactions, min_item_interactions "
                "or min_rating."
            )
        rows = np.flatnonzero(keep)
        user_codes, kept = _dense(user_codes[rows])
        user_ids = user_ids[kept]
        item_codes, kept = _dense(item_codes[rows])
        item_ids = item_ids[kept]
        ts, ratings = ts[rows], ratings[rows]
    n_users = len(user_ids)
    # Stable sort by (user, timestamp) on one int64 key: ties keep source-file order.
    ts_min, ts_span = int(ts.min()), int(ts.max()) - int(ts.min()) + 1
    if ts_span * (n_users + 1) < 2**62:
        key = user_codes.astype(np.int64)
        key *= ts_span
        key += ts
        key -= ts_min
        order = np.argsort(key, kind="stable")
        del key
    else:
        order = np.lexsort((ts, user_codes))
    offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(user_codes, minlength=n_users), out=offsets[1:])
    items = item_codes[order]
    items += 1
    if inter.user_vocab is not None:
        user_ids = np.sort(inter.user_vocab)[user_ids]
    if inter.item_vocab is not None:
        item_ids = np.sort(inter.item_vocab)[item_ids]
    pad = np.array([""] if item_ids.dtype.kind == "U" else [-1], dtype=item_ids.dtype)
    return SequenceData(
        offsets=offsets,
        items=items,
        timestamps=ts[order].astype(np.int64, copy=False),
        ratings=ratings[order].astype(np.float32, copy=False),
        user_ids=user_ids,
        item_ids=np.concatenate([pad, item_ids]),
        options=dataclasses.asdict(options),
    )


def cache_key(files: tuple[str, ...], options: SequenceOptions) -> str:
    """Hash of the source files' identity (path, size, mtime) and every option."""
    identity = []
    for f in files:
        st = os.stat(f)
        identity.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"version": CACHE_VERSION, "files": identity, "options": dataclasses.asdict(options)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_ARRAYS = ("offsets", "items", "timestamps", "ratings", "user_ids", "item_ids")


def save_sequences(data: SequenceData, path: str | os.PathLike, key: str) -> None:
    """Writes `data` to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"key": key, "options": data.options, "version": CACHE_VERSION})
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(meta), **{k: getattr(data, k) for k in _ARRAYS})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_sequences(path: str | os.PathLike, key: str | None = None) -> SequenceData:
    """Reads a cache file; ValueError if it is corrupt, inconsistent or for another key."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in _ARRAYS}
    except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt: rebuild"
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    if key is not None and meta.get("key") != key:
        raise ValueError(f"built for key {meta.get('key')}, not {key}")
    data = SequenceData(**arrays, options=meta["options"])
    o, n = data.offsets, len(data.items)
    if not (
        len(o) >= 2
        and o[0] == 0
        and o[-1] == n
        and np.all(np.diff(o) >= 3)
        and len(data.timestamps) == n == len(data.ratings)
        and len(data.user_ids) == len(o) - 1
        and n
        and data.items.min() >= 1
        and data.items.max() <= data.n_items
    ):
        raise ValueError("arrays are inconsistent")
    return data


def load_or_build(
    read_interactions, files: tuple[str, ...], options: SequenceOptions, cache_dir: str | None
) -> SequenceData:
    """The cached SequenceData for `files` + `options`, built with `read_interactions()` if absent.

    A changed file or option gives another key (a rebuild); a corrupt cache file is rebuilt
    with a warning. `cache_dir=None` disables caching.
    """
    if cache_dir is None:
        return build_sequences(read_interactions(), options)
    key = cache_key(files, options)
    path = Path(cache_dir) / f"sequences-{key}.npz"
    if path.exists():
        start = time.perf_counter()
        try:
            data = load_sequences(path, key)
            logging.info("loaded %s in %.2fs", path, time.perf_counter() - start)
            return data
        except ValueError as e:
            logging.warning("sequence cache %s is corrupt (%s): rebuilding it", path, e)
    data = build_sequences(read_interactions(), options)
    save_sequences(data, path, key)
    return data
