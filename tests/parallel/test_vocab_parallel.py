"""Vocab-split item tables (parallel/vocab_parallel.py): losses and gradients equal the unsplit
ones, and the compiled step never holds a whole table on one device."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from onerec_jax.models import losses
from onerec_jax.parallel import sharding, vocab_parallel

V, D, N = 803, 16, 48  # items + padding; the split tables have a few extra rows
MESHES = [(1, 1, 8), (2, 1, 4)]


@pytest.fixture
def on_mesh():
    """Sets a global mesh of `shape` and the default rules (conftest undoes both)."""

    def use(shape):
        mesh = sharding.make_mesh(shape)
        jax.set_mesh(mesh)
        nn.set_logical_axis_rules(sharding.DEFAULT_RULES)
        jax.clear_caches()
        return mesh

    return use


def case(seed=0, rows=V):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(N, D)).astype(np.float32)
    table = rng.normal(size=(rows, D)).astype(np.float32)
    targets = rng.integers(1, V, N).astype(np.int32)
    mask = jnp.asarray(rng.random(N) < 0.8)
    return hidden, table, jnp.asarray(targets), mask


def split(mesh, hidden, table, targets, mask):
    batch = ("data", "fsdp")
    return (
        jax.device_put(hidden, NamedSharding(mesh, P(batch, None))),
        jax.device_put(table, NamedSharding(mesh, P("model", None))),
        jax.device_put(targets, NamedSharding(mesh, P(batch))),
        jax.device_put(mask, NamedSharding(mesh, P(batch))),
    )


def loss_and_grads(loss_fn, hidden, table, targets, mask, **kw):
    def f(h, t):
        total, count = loss_fn(h, t, targets, mask, **kw)
        return total / count

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, table)


def assert_same(sharded, plain, rows):
    (loss_s, (gh_s, gt_s)), (loss_p, (gh_p, gt_p)) = sharded, plain
    np.testing.assert_allclose(loss_s, loss_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gh_s, gh_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gt_s)[:V], gt_p, rtol=1e-5, atol=1e-6)
    assert gt_s.shape[0] == rows and not np.asarray(gt_s)[V:].any()  # padding rows: no gradient


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("chunk_size, smoothing", [(8192, 0.0), (37, 0.0), (50, 0.1)])
def test_full_softmax_on_a_split_table_equals_the_plain_one(on_mesh, shape, chunk_size, smoothing):
    hidden, table, targets, mask = case(0)
    kw = dict(chunk_size=chunk_size, label_smoothing=smoothing)
    plain = loss_and_grads(losses.full_softmax_xent, hidden, table, targets, mask, **kw)
    mesh = on_mesh(shape)
    rows = vocab_parallel.padded_rows(V)
    assert rows % shape[2] == 0 and rows > V
    big = np.concatenate([table, np.full((rows - V, D), 50.0, np.float32)])  # would dominate
    args = split(mesh, hidden, big, targets, mask)
    assert vocab_parallel.split_axes(args[1]) == ("model",)
    sharded = loss_and_grads(losses.full_softmax_xent, *args, vocab_size=V, **kw)
    assert_same(sharded, plain, rows)


@pytest.mark.parametrize("shape", MESHES)
def test_sampled_softmax_and_bce_on_a_split_table_equal_the_plain_ones(on_mesh, shape):
    hidden, table, targets, mask = case(1)
    negatives = jnp.asarray(np.random.default_rng(2).integers(1, V, 64), jnp.int32)
    pool = jnp.asarray(np.random.default_rng(3).integers(1, V, 40), jnp.int32)
    rng = jax.random.key(4)
    sampled = dict(
        rng=rng, negatives=negatives, in_batch_negatives=16, hard_negatives=3, hard_pool=pool
    )
    plain = [
        loss_and_grads(losses.sampled_softmax_xent, hidden, table, targets, mask, **sampled),
        loss_and_grads(losses.bce_one_negative, hidden, table, targets, mask, rng=rng),
    ]
    mesh = on_mesh(shape)
    rows = vocab_parallel.padded_rows(V)
    big = np.concatenate([table, np.ones((rows - V, D), np.float32)])
    args = split(mesh, hidden, big, targets, mask)
    got = [
        loss_and_grads(losses.sampled_softmax_xent, *args, vocab_size=V, **sampled),
        loss_and_grads(losses.bce_one_negative, *args, vocab_size=V, rng=rng),
    ]
    for g, p in zip(got, plain, strict=True):
        assert_same(g, p, rows)


def test_take_rows_is_plain_indexing_without_a_split(on_mesh):
    table = jnp.arange(12.0).reshape(6, 2)
    ids = jnp.array([[5, 0], [2, 2]])
    np.testing.assert_array_equal(vocab_parallel.take_rows(table, ids), table[ids])
    on_mesh((1, 1, 8))
    assert vocab_parallel.padded_rows(6) == 8
    assert vocab_parallel.split_axes(table) == ()  # 6 rows do not split over 8: plain path
    np.testing.assert_array_equal(vocab_parallel.take_rows(table, ids), table[ids])
    big = jnp.arange(16.0).reshape(8, 2)
    np.testing.assert_array_equal(jax.jit(vocab_parallel.take_rows)(big, ids), big[ids])


@pytest.mark.parametrize("loss", ["full_softmax", "sampled_softmax"])
def test_compiled_loss_step_never_holds_the_whole_table(on_mesh, loss):
    rows, dim = 8 * 4096, 32  # 4 MB table, 512 KB per device
    mesh = on_mesh((2, 1, 4))
    hidden, _, targets, mask = case(5)
    hidden = np.random.default_rng(5).normal(size=(N, dim)).astype(np.float32)
    table = np.random.default_rng(6).normal(size=(rows, dim)).astype(np.float32)
    args = split(mesh, hidden, table, targets, mask)
    kw = dict(chunk_size=1024) if loss == "full_softmax" else dict(rng=jax.random.key(0))
    fn = losses.full_softmax_xent if loss == "full_softmax" else losses.sampled_softmax_xent

    def step(h, t):
        grads = jax.grad(
            lambda t: (
                fn(h, t, args[2], args[3], n_negatives=64, **kw)[0]
                if loss != "full_softmax"
                else fn(h, t, args[2], args[3], **kw)[0]
            )
        )(t)
        return t - 0.1 * grads

    compiled = jax.jit(step, out_shardings=args[1].sharding).lower(args[0], args[1]).compile()
    assert vocab_parallel.whole_table_collectives(compiled.as_text(), rows // 4 + 1) == []
    stats = compiled.memory_analysis()
    table_bytes = rows * dim * 4
    assert stats.argument_size_in_bytes < table_bytes / 3  # the table arrives split 4 ways
    assert stats.temp_size_in_bytes < table_bytes / 3  # and no whole-table temporary
