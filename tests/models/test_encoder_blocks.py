"""The encoder's training pass in row blocks (`train.encoder_rows`, `ScoringModel.encode`): the
same hidden states, loss and gradients as the whole batch without dropout; with dropout each
block draws its own mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.models import row_blocks
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model

N_ITEMS, B, L = 40, 8, 12


def tiny(name: str, rows: int, dropout: float = 0.0):
    c = apply_variant(base_config(), name)
    c.model.dim, c.model.mlp_dim, c.model.num_layers, c.model.dropout = 16, 32, 2, dropout
    c.model.side_features = ()
    c.train.encoder_rows = rows
    c.loss.row_block = 0
    info = DataInfo(n_items=N_ITEMS, max_len=L, item_counts=np.ones(N_ITEMS + 1), n_users=B)
    return build_model(c, info)


def batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, N_ITEMS + 1, (B, L)).astype(np.int32)
    inputs[::2, :5] = 0  # left padding on half the rows
    targets = rng.integers(1, N_ITEMS + 1, (B, L)).astype(np.int32)
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "mask": inputs > 0}


def unboxed(params):
    return jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )


@pytest.mark.parametrize("name", ["sasrec", "onerec", "gru4rec"])
def test_blocks_give_the_whole_batchs_loss_and_gradients(name):
    data = batch()
    whole, blocked = tiny(name, rows=B), tiny(name, rows=2)
    params = unboxed(whole.init(jax.random.key(0), data))
    rng = jax.random.key(1)
    for got, want in zip(
        jax.value_and_grad(lambda p: blocked.loss(p, data, rng)[0])(params),
        jax.value_and_grad(lambda p: whole.loss(p, data, rng)[0])(params),
        strict=True,
    ):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, want)
    hidden = blocked.encode(params, data["inputs"], rng)
    # atol 1e-5: float32 round-off of hidden values up to ~3 differs with the batch's shape by
    # CPU (an AMD EPYC VM gave 1.1e-6 at one element of 1,536 for onerec; a wrong block would
    # be off by O(0.1))
    np.testing.assert_allclose(
        hidden, whole.apply(params, data["inputs"], train=True, rng=rng), rtol=1e-5, atol=1e-5
    )


def test_each_block_draws_its_own_dropout_mask():
    """Block i is the module's training pass over its rows with the i-th of the step key's
    splits: four blocks of the same two rows get four different masks."""
    data = batch()
    model = tiny("sasrec", rows=2, dropout=0.5)
    params = unboxed(model.init(jax.random.key(0), data))
    same = jnp.tile(data["inputs"][:2], (B // 2, 1))
    rng = jax.random.key(2)
    hidden = np.asarray(model.encode(params, same, rng)).reshape(B // 2, 2, L, -1)
    for i, key in enumerate(jax.random.split(rng, B // 2)):
        want = model.apply(params, same[2 * i : 2 * i + 2], train=True, rng=key)
        np.testing.assert_allclose(hidden[i], want, rtol=1e-5, atol=1e-6)
    assert all(not np.allclose(hidden[0], hidden[i]) for i in range(1, B // 2))


def test_auto_is_four_rows_on_one_cpu_device_only():
    assert jax.default_backend() == "cpu"
    assert row_blocks.encoder_rows(0) == 4 and row_blocks.encoder_rows(16) == 16
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        assert row_blocks.encoder_rows(0) == 0 and row_blocks.encoder_rows(16) == 0
