"""Sequences with ML-25M's length profile over a catalogue of any size, built in memory.

`data.synthetic = "uniform"` (configs/scale.py): `data.synthetic_users` users with lognormal
lengths (median 71, sigma 1.243, clipped to 20..32,202, as ML-25M's users), each item drawn
uniformly from `data.synthetic_items`. Nothing is written and no per-user bitmap of the catalogue
is kept (data/synthetic.py's world model does both, too costly at 10M items); there is no item
content and no structure to learn: this source measures scale, not quality.
"""

from __future__ import annotations

import numpy as np

from onerec_jax.data.sequences import SequenceData

MEDIAN_LEN, SIGMA, MIN_LEN, MAX_LEN = 71, 1.243, 20, 32_202  # ML-25M's users


def uniform_sequences(n_users: int, n_items: int, seed: int) -> SequenceData:
    """`n_users` ML-25M-like sequences over items 1..n_items, timestamps 0 (order is kept)."""
    if n_users < 1 or n_items < 2:
        raise ValueError(f"need >= 1 user and >= 2 items, got {n_users} users, {n_items} items")
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(np.log(MEDIAN_LEN), SIGMA, n_users)), MIN_LEN, MAX_LEN)
    offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(lengths.astype(np.int64), out=offsets[1:])
    n = int(offsets[-1])
    return SequenceData(
        offsets=offsets,
        items=rng.integers(1, n_items + 1, n, dtype=np.int32),
        timestamps=np.zeros(n, np.int64),
        ratings=np.ones(n, np.float32),
        user_ids=np.arange(n_users, dtype=np.int64),
        item_ids=np.arange(-1, n_items, dtype=np.int64),  # [0] is the padding placeholder
        options={"source": "synthetic uniform"},
    )
