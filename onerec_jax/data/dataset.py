"""From `config.data` to (SequenceData, ItemInfo): download or generate, read, cache."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections
import numpy as np

from onerec_jax.data import cold_start, download, movielens, records, sequences
from onerec_jax.errors import ConfigError, DataFormatError

# Which file of each layout holds the interactions (its identity keys the sequence cache).
_INTERACTION_FILES = {
    "movielens_csv": "ratings.csv",
    "movielens_dat": "ratings.dat",
    "movielens_100k": "u.data",
}


def resolve_source(cfg: ml_collections.ConfigDict) -> Path:
    """The directory (or file) to read: `data.path`, a synthetic preset, or a release."""
    root = Path(cfg.root).expanduser()
    if cfg.path:
        return Path(cfg.path).expanduser()
    if cfg.synthetic:
        from onerec_jax.data import synthetic  # numpy-heavy generator, only when asked

        presets = {"demo": synthetic.SyntheticConfig.demo, "ml25m": synthetic.SyntheticConfig.ml25m}
        if cfg.synthetic not in presets:
            raise ConfigError(
                f"data.synthetic={cfg.synthetic!r} is not a preset: use one of "
                f"{(*presets, 'uniform')}."
            )
        syn_cfg = dataclasses.replace(presets[cfg.synthetic](), seed=cfg.synthetic_seed)
        out = root / f"synthetic-{cfg.synthetic}-seed{cfg.synthetic_seed}"
        synthetic.write_synthetic(syn_cfg, out)
        return out
    if cfg.release:
        return download.fetch(cfg.release, root, progress=cfg.progress)
    raise ConfigError(
        "config.data names no data: set data.release (e.g. ml-25m), data.synthetic (demo) or "
        "data.path (a directory or file of your own, with data.format)."
    )


def sequence_options(cfg: ml_collections.ConfigDict) -> sequences.SequenceOptions:
    return sequences.SequenceOptions(
        min_rating=cfg.min_rating,
        min_user_interactions=cfg.min_user_interactions,
        min_item_interactions=cfg.min_item_interactions,
    )


def interaction_files(source: Path, fmt: str) -> tuple[str, ...]:
    """The files whose identity (path, size, mtime) keys the cache, without parsing them."""
    if fmt == "auto":
        fmt = movielens.detect_format(source)
    if fmt in _INTERACTION_FILES:
        return (os.fspath(source / _INTERACTION_FILES[fmt]),)
    if fmt == "recbole" and source.is_dir():
        return tuple(os.fspath(p) for p in sorted(source.glob("*.inter")))
    return (os.fspath(source),)


def load_data(
    cfg: ml_collections.ConfigDict, with_items: bool = True
) -> tuple[sequences.SequenceData, records.ItemInfo | None]:
    """SequenceData (from the cache when valid) and, if asked, the ItemInfo of `cfg` (data)."""
    if cfg.synthetic == "uniform" and not cfg.path:  # in memory, any catalogue size, no items
        from onerec_jax.data.synthetic_uniform import uniform_sequences

        users, n_items = int(cfg.get("synthetic_users", 0)), int(cfg.get("synthetic_items", 0))
        if users < 1 or n_items < 2:
            raise ConfigError(
                f"data.synthetic='uniform' needs data.synthetic_users >= 1 and "
                f"data.synthetic_items >= 2 (got {users}, {n_items})."
            )
        return uniform_sequences(users, n_items, cfg.synthetic_seed), None
    source = resolve_source(cfg)
    fmt = cfg.format
    if fmt == "auto":
        fmt = movielens.detect_format(source)
    items = None

    def read():
        nonlocal items
        if fmt == "movielens_csv":  # the item side (genome: 15.6M rows) is read after the build
            return movielens.read_ratings_csv(source / "ratings.csv", cfg.on_bad_rows)
        raw = movielens.read_dataset(source, fmt, cfg.on_bad_rows, cfg.encoding)
        items = raw.items  # keep the item side; the raw interactions go once built
        return raw.interactions

    files = interaction_files(source, fmt)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataFormatError(f"{missing[0]}: file not found. Check --config.data.path.")
    cache_dir = None if cfg.cache_dir == "none" else (cfg.cache_dir or Path(cfg.root) / "cache")
    data = sequences.load_or_build(read, files, sequence_options(cfg), cache_dir)
    updates = tuple(Path(p).expanduser() for p in cfg.get("update_paths", ()))
    if updates:  # `--mode update`: interactions that arrived after `data`
        data = with_updates(cfg, data, fmt, files, updates, cache_dir)
    data = cold_start.apply(cfg, data)  # a no-op unless data.cold_items / data.new_users is set
    if with_items and items is None:
        newest = updates[-1] if updates and _has_items(updates[-1], fmt) else source
        items = movielens.read_dataset(
            newest, fmt, cfg.on_bad_rows, cfg.encoding, with_interactions=False
        ).items
    return data, (items if with_items else None)


def _has_items(source: Path, fmt: str) -> bool:
    """Whether an update folder brings its own item file (then it is the newer catalogue)."""
    names = {
        "movielens_csv": "movies.csv",
        "movielens_dat": "movies.dat",
        "movielens_100k": "u.item",
    }
    return fmt in names and (source / names[fmt]).is_file()


def with_updates(
    cfg: ml_collections.ConfigDict,
    data: sequences.SequenceData,
    fmt: str,
    files: tuple[str, ...],
    updates: tuple[Path, ...],
    cache_dir,
) -> sequences.SequenceData:
    """`data` (already built and cached) with the interactions of the `updates` folders (the
    source's layout) appended, rebuilt from arrays and cached under every file's identity.

    Only the update files are parsed: the base interactions come back from `data` itself, so
    users and items the base's filters removed do not return with their old interactions (a
    user with 3 old and 2 new ratings has 2 here, where a rebuild from every file has 5).
    """
    if data.user_ids.dtype.kind not in "iu" or data.item_ids.dtype.kind not in "iu":
        raise ConfigError(
            "data.update_paths: updates need integer user and item ids (MovieLens layouts); "
            "for string ids, append the new rows to the source file and train again."
        )
    extra_files = []
    for source in updates:
        if not source.is_dir():
            raise ConfigError(
                f"{source}: not a directory. --new_data must be a folder in the layout of the "
                f"trained source ({fmt}), e.g. holding ratings.csv."
            )
        extra_files += interaction_files(source, fmt)
    missing = [f for f in extra_files if not os.path.isfile(f)]
    if missing:
        raise DataFormatError(f"{missing[0]}: file not found in the update folder.")

    def read():
        lengths = np.diff(data.offsets)
        parts = [
            records.Interactions(
                users=np.repeat(data.user_ids.astype(np.int64), lengths),
                items=data.item_ids[data.items].astype(np.int64),
                ratings=data.ratings,
                timestamps=data.timestamps,
                files=files,
            )
        ]
        for source in updates:
            if fmt == "movielens_csv":
                parts.append(movielens.read_ratings_csv(source / "ratings.csv", cfg.on_bad_rows))
            else:
                raw = movielens.read_dataset(source, fmt, cfg.on_bad_rows, cfg.encoding)
                parts.append(raw.interactions)
        if any(p.user_vocab is not None or p.item_vocab is not None for p in parts):
            raise ConfigError("data.update_paths: the update files hold string ids.")
        return records.Interactions(
            users=np.concatenate([p.users for p in parts]),
            items=np.concatenate([p.items for p in parts]),
            ratings=np.concatenate([p.ratings for p in parts]).astype(np.float32),
            timestamps=np.concatenate([p.timestamps for p in parts]).astype(np.int64),
            files=(*files, *extra_files),
        )

    return sequences.load_or_build(read, (*files, *extra_files), sequence_options(cfg), cache_dir)
