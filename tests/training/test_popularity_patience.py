"""Early stopping below popularity: popularity's validation NDCG@10 by hand, and the patience
that applies on either side of it."""

import math

import numpy as np
import pytest

from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.parallel import sharding
from onerec_jax.training import train


def _data() -> SequenceData:
    """4 users over items 1..5. Training prefixes (all but the last two): [1, 2], [1, 3], [2],
    [1], so training counts are item 1: 3, item 2: 2, item 3: 1, items 4 and 5: 0; validation
    targets 3, 5, 1, 4."""
    seqs = [[1, 2, 3, 4], [1, 3, 5, 2], [2, 1, 4], [1, 4, 5]]
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    items = np.concatenate(seqs).astype(np.int32)
    return SequenceData(
        offsets=offsets,
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64),
        ratings=np.ones(len(items), np.float32),
        user_ids=np.arange(4),
        item_ids=np.arange(6),
        options={},
    )


def _config(**train):
    c = apply_variant(base_config(), "sasrec")
    c.data.max_len = 4
    c.model.update(dim=8, num_layers=1, num_heads=1, mlp_dim=8)
    c.mesh.num_devices = 1
    c.train.update(batch_size=4, progress=False, **train)
    c.eval.update(batch_size=8, chunk_size=8, k=5)
    return c


def _popularity_validation(c):
    mesh, rules = train.make_mesh(c)
    with sharding.use_mesh(mesh, rules):
        setup = train.make_setup(c, _data(), None, mesh, rules)
        return train.popularity_validation(setup, mesh, rules)


def test_popularity_validation_by_hand():
    """Scores log(1 + count), each user's validation prefix masked, ties count half:
    user 0 (seen 1, 2): target 3 is first of 3, 4, 5 -> rank 1;
    user 1 (seen 1, 3): target 5 is below 2 and tied with 4 -> rank 1 + 1 + 1/2 = 2.5;
    user 2 (seen 2): target 1 is first -> rank 1;
    user 3 (seen 1): target 4 is below 2 and 3, tied with 5 -> rank 3.5.
    NDCG@10 = mean(1 / log2(1 + rank))."""
    got = _popularity_validation(_config())
    want = np.mean([1.0, 1 / math.log2(3.5), 1.0, 1 / math.log2(4.5)])
    assert got == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.75353, abs=1e-5)


def test_popularity_validation_off():
    assert _popularity_validation(_config(patience_below_popularity=0)) is None


@pytest.mark.parametrize(
    ("best", "pop_val", "below", "want"),
    [
        (0.019, 0.021, 100, 100),  # still below popularity: the longer patience
        (0.021, 0.021, 100, 100),  # level with it is not above it
        (0.030, 0.021, 100, 20),  # above it: train.patience
        (0.019, None, 100, 20),  # no popularity figure: train.patience
        (0.019, 0.021, 5, 20),  # never shorter than train.patience
        (-math.inf, 0.021, 100, 100),  # before any validation
    ],
)
def test_stop_patience(best, pop_val, below, want):
    c = _config(patience=20, patience_below_popularity=below)
    assert train.stop_patience(c, best, pop_val) == want
