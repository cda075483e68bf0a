"""A synthetic MovieLens folder: written atomically, loaded back, and its command line.

The world (clusters, Markov chain, oracle) is data/synthetic_world.py; the CSV files it gives,
data/synthetic_csv.py.

CLI: `python -m onerec_jax.data.synthetic --preset ml25m|demo --out DIR [--seed N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

from onerec_jax.data import synthetic_csv
from onerec_jax.data.synthetic_world import Synthetic, SyntheticConfig, build_planted_model
from onerec_jax.errors import ConfigError

META_FILE = "synthetic.json"
_FORMAT_VERSION = 1  # bump when the generator changes, so cached directories are rewritten


def _meta(config: SyntheticConfig) -> dict:
    return {"format_version": _FORMAT_VERSION, "config": dataclasses.asdict(config)}


def _is_complete(out_dir: str, config: SyntheticConfig) -> bool:
    try:
        with open(os.path.join(out_dir, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    files_there = all(os.path.isfile(os.path.join(out_dir, name)) for name in synthetic_csv.FILES)
    return meta == _meta(config) and files_there


def write_synthetic(config: SyntheticConfig, out_dir: str | os.PathLike) -> Synthetic:
    """Write the ML-25M-layout CSV files and `synthetic.json` to `out_dir`, atomically.

    The files are written into a temporary directory next to `out_dir` and renamed into place.
    If `out_dir` already holds every file and a `synthetic.json` for the same config, nothing is
    rewritten. A directory holding a different synthetic dataset is replaced; any other non-empty
    directory is refused.

    Returns:
        The planted model, with `path` set to `out_dir`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    model = build_planted_model(config, out_dir)
    if _is_complete(out_dir, config):
        return model
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConfigError(f"{out_dir} exists and is not a directory: choose another out_dir")
        if os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, META_FILE)):
            raise ConfigError(
                f"{out_dir} is a non-empty directory without {META_FILE}: refusing to replace "
                "it; choose another out_dir or empty it"
            )
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        synthetic_csv.write_tables(model, tmp)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(_meta(config), f, indent=2)
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model


def load_synthetic(out_dir: str | os.PathLike) -> Synthetic:
    """The planted model of a directory written by `write_synthetic` (from its synthetic.json)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    meta_path = os.path.join(out_dir, META_FILE)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {META_FILE} in {out_dir}: write the dataset first with write_synthetic() or "
            "`python -m onerec_jax.data.synthetic --preset demo --out DIR`"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{meta_path} is not valid JSON ({e}): delete the directory") from None
    if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
        raise ConfigError(
            f"{meta_path} was written by another generator version: regenerate it with "
            "write_synthetic()"
        )
    try:
        config = SyntheticConfig(**meta["config"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{meta_path} holds no valid config ({e}): regenerate it") from None
    return build_planted_model(config, out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write a preset dataset (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("ml25m", "demo"), required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = getattr(SyntheticConfig, args.preset)(seed=args.seed)
    model = write_synthetic(config, args.out)
    print(f"wrote {config.n_ratings:,} ratings of {config.n_users:,} users to {model.path}")


if __name__ == "__main__":
    main()
