"""Command line: `python -m onerec_jax.main --config configs/X.py[:variant] --mode M`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from onerec_jax.data import dataset, sequences
from onerec_jax.errors import UserError

MODES = ("prepare",)  # train, eval, tokenize, recommend and report arrive with later issues

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/ml25m.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where the run writes its outputs.")
_MODE = flags.DEFINE_enum("mode", "prepare", MODES, "What to run.")


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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    try:
        if _MODE.value == "prepare":
            prepare(config, str(workdir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
