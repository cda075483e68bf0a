"""Ranking a catalogue split over the mesh's vocab axes (`rank_and_topk_split` via `make_ranker`)
against the slow numpy reference of test_ranking.py, and without gathering the table."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_ranking import assert_same, random_case, reference

from onerec_jax.evaluation.ranking import make_ranker
from onerec_jax.parallel import sharding, vocab_parallel

RULES = sharding.DEFAULT_RULES


def padded(table, rows, fill):
    """The table with rows up to `rows` of `fill` (scores that would win if ever ranked)."""
    extra = np.full((rows - len(table), table.shape[1]), fill, table.dtype)
    return np.concatenate([table, extra])


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 1, 4)])
@pytest.mark.parametrize(
    "chunk_size, k, mask_history", [(96, 20, True), (8192, 50, False), (7, 5, True)]
)
def test_split_ranking_matches_reference(shape, chunk_size, k, mask_history):
    users, table, targets, history = random_case(11, batch=16)
    targets[-2:] = 0  # padding rows of an eval batch
    want = reference(users, table, targets, history, k, mask_history)
    mesh = sharding.make_mesh(shape)
    rows = -(-len(table) // shape[2]) * shape[2] + shape[2]  # a few padding rows
    big = padded(table, rows, 3.0)
    split_table = np.asarray(big)
    ranker = make_ranker(
        mesh,
        k=k,
        chunk_size=chunk_size,
        mask_history=mask_history,
        n_items=len(table) - 1,
        rules=RULES,
    )
    table_on_mesh = jax.device_put(split_table, NamedSharding(mesh, P("model", None)))
    assert vocab_parallel.split_axes(table_on_mesh, mesh, RULES) == ("model",)
    got = [np.asarray(x) for x in ranker(users, table_on_mesh, targets, history)]
    assert_same(got, want)
    assert got[0].shape == (16,) and (got[1] < len(table)).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_split_ranking_counts_ties_across_shards_as_one_table(chunk_size):
    """Items tied with the target on every one of 8 shards (5 rows each) count half, masked
    ones not at all: the same ranks as unsplit, worked out by hand."""
    mesh = sharding.make_mesh((1, 1, 8))
    users = np.ones((4, 1), np.float32)
    targets = np.array([1, 7, 20, 39], np.int32)
    history = np.array([[0, 0, 0], [2, 3, 0], [5, 11, 38], [0, 0, 0]], np.int32)
    flat = np.full((40, 1), 2.0, np.float32)  # every item alike
    cycle = (np.arange(40) % 3).astype(np.float32)[:, None]  # item i scores i % 3: 13 of each
    want = {
        # (unmasked others) / 2 + 1: 38, 36, 35 and 38 others.
        "flat": [20.0, 19.0, 18.5, 20.0],
        # item 1 (score 1): 13 higher (2s), 12 tied -> 20; item 7: 2 and 3 masked, 12 higher,
        # 12 tied -> 19; item 20 (a 2): none higher, 12 tied of which 3 masked -> 5.5; item 39
        # (a 0): 26 higher, 12 tied -> 33.
        "cycle": [20.0, 19.0, 5.5, 33.0],
    }
    ranker = make_ranker(mesh, k=5, chunk_size=chunk_size, n_items=39, rules=RULES)
    plain = make_ranker(k=5, chunk_size=chunk_size)
    for name, table in (("flat", flat), ("cycle", cycle)):
        table_on_mesh = jax.device_put(table, NamedSharding(mesh, P("model", None)))
        assert vocab_parallel.split_axes(table_on_mesh, mesh, RULES) == ("model",)
        got = [np.asarray(x) for x in ranker(users, table_on_mesh, targets, history)]
        assert got[0].dtype == np.float32 and got[0].tolist() == want[name], name
        for g, p in zip(got, plain(users, table, targets, history), strict=True):
            np.testing.assert_array_equal(g, np.asarray(p))


def test_split_ranking_of_non_finite_target_and_short_catalogue():
    """k equal to the whole catalogue, a NaN target score (worst rank), all items masked."""
    users, table, targets, history = random_case(12, batch=8, n_rows=40)
    users[0] = np.nan
    mesh = sharding.make_mesh((2, 1, 4))
    ranker = make_ranker(mesh, k=39, chunk_size=4, n_items=39, rules=RULES)
    got = [np.asarray(x) for x in ranker(users, table, targets, history)]
    plain = [np.asarray(x) for x in make_ranker(k=39, chunk_size=4)(users, table, targets, history)]
    for g, p in zip(got, plain, strict=True):
        np.testing.assert_array_equal(g, p)
    assert got[0][0] == 39


def test_split_ranker_never_gathers_the_table():
    rows, dim = 8 * 8192, 32  # 8 MB table, 1 MB per device
    mesh = sharding.make_mesh((2, 1, 4))
    users, _, targets, history = random_case(13, batch=16, n_rows=rows, dim=dim)
    table = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    table = jax.device_put(table, NamedSharding(mesh, P("model", None)))
    ranker = make_ranker(mesh, k=50, chunk_size=2048, rules=RULES)
    compiled = ranker.lower(users, table, targets, history).compile()
    assert vocab_parallel.whole_table_collectives(compiled.as_text(), rows // 4 + 1) == []
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes < rows * dim * 4 / 3
    assert stats.temp_size_in_bytes < rows * dim * 4 / 3
