"""Optimizer schedule, decay mask and accumulation (models/optim.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onerec_jax.defaults import base_config
from onerec_jax.errors import ConfigError
from onerec_jax.models import optim


def _optim(**kw):
    c = base_config().optim
    c.update(**kw)
    return c


def test_warmup_then_cosine_and_linear():
    cos = optim.learning_rate_schedule(
        _optim(learning_rate=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1), 110
    )
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0)
    # Half way through the 100 decay steps: 0.1 + 0.9 * (1 + cos(pi/2)) / 2 = 0.55.
    assert float(cos(60)) == pytest.approx(0.55, abs=1e-6)
    assert float(cos(110)) == pytest.approx(0.1, abs=1e-6)
    lin = optim.learning_rate_schedule(
        _optim(learning_rate=2.0, warmup_steps=0, schedule="linear", end_lr_ratio=0.0), 100
    )
    assert float(lin(25)) == pytest.approx(1.5) and float(lin(100)) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="optim.schedule"):
        optim.learning_rate_schedule(_optim(schedule="step"), 10)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {
        "item_embedding": {"embedding": 1},
        "block_0": {"ffn": {"up": {"kernel": 1, "bias": 1}}, "norm_attn": {"scale": 1}},
        "position_embedding": 1,
    }
    off = optim.decay_mask(params, decay_embeddings=False)
    assert off == {
        "item_embedding": {"embedding": False},
        "block_0": {"ffn": {"up": {"kernel": True, "bias": False}}, "norm_attn": {"scale": False}},
        "position_embedding": False,
    }
    on = optim.decay_mask(params, decay_embeddings=True)
    assert on["item_embedding"]["embedding"] and on["position_embedding"]
    assert not on["block_0"]["ffn"]["up"]["bias"]


def test_weight_decay_is_applied_only_where_masked():
    params = {"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    tx, _ = optim.make_optimizer(
        _optim(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0), 10
    )
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients: Adam's step is 0, so the update is -lr * wd * param where decayed.
    np.testing.assert_allclose(updates["dense"]["kernel"], [-0.05, -0.05])
    np.testing.assert_allclose(updates["dense"]["bias"], [0.0, 0.0])


def test_accumulation_equals_one_update_on_the_mean_gradient():
    params = {"w": jnp.array([1.0, -2.0])}
    g1, g2 = {"w": jnp.array([0.3, 0.1])}, {"w": jnp.array([-0.1, 0.5])}
    acc, _ = optim.make_optimizer(_optim(warmup_steps=0, accumulate_steps=2), 10)
    one, _ = optim.make_optimizer(_optim(warmup_steps=0), 10)
    state = acc.init(params)
    u1, state = acc.update(g1, state, params)
    np.testing.assert_array_equal(u1["w"], [0.0, 0.0])  # no update until the 2nd micro-batch
    u2, _ = acc.update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = one.update(mean, one.init(params), params)
    np.testing.assert_allclose(u2["w"], ref["w"], rtol=1e-6)


def test_clipping_bounds_the_global_norm():
    tx = optax.chain(optax.clip_by_global_norm(1.0))
    g = {"a": jnp.array([3.0, 4.0])}
    out, _ = tx.update(g, tx.init(g))
    assert float(optax.tree.norm(out)) == pytest.approx(1.0)
