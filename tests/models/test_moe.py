"""MoEFeedForward against a slow numpy reference: routing, capacity, gradients, padding, mesh."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.models.moe import MoEFeedForward
from onerec_jax.parallel import sharding

DIM, HIDDEN = 8, 16


def _inputs(batch=2, length=8, seed=0, padding=()):
    x = np.random.default_rng(seed).normal(size=(batch, length, DIM)).astype(np.float32)
    mask = np.ones((batch, length), bool)
    for b, t in padding:
        mask[b, t] = False
    return jnp.asarray(x), jnp.asarray(mask)


def _init(model, x, mask, seed=0):
    return nn.meta.unbox(model.init(jax.random.key(seed), x, mask, train=False)["params"])


def _apply(model, params, x, mask):
    """(y, stats, expert_index [N, K], kept [N, K]) from one call."""
    (y, stats), state = model.apply(
        {"params": params}, x, mask, train=False, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    return y, stats, np.asarray(inter["expert_index"][0]), np.asarray(inter["kept"][0])


def _expert(p, e, v, activation):
    """One expert's FeedForward on one token, float64."""
    wi, wo = p["wi"][e], p["wo"][e]
    if activation == "swiglu":
        g = v @ p["wg"][e]
        h = g / (1 + np.exp(-g)) * (v @ wi)
    elif activation == "gelu":  # flax's default tanh approximation
        u = v @ wi
        h = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    else:
        h = np.maximum(v @ wi, 0)
    return h @ wo


def _reference(params, x, mask, *, top_k, capacity_factor, activation, order="choice"):
    """Token-by-token routing; assignments served choice-major (GShard) or token-major."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xf = np.asarray(x, np.float64).reshape(-1, DIM)
    real = np.asarray(mask).reshape(-1)
    n, n_exp = len(xf), p["wi"].shape[0]
    logits = xf @ p["router"]["kernel"] + p["router"].get("bias", 0.0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    index = np.zeros((n, top_k), int)
    gates = np.zeros((n, top_k))
    for t in range(n):
        ranked = sorted(range(n_exp), key=lambda e, t=t: (-probs[t, e], e))
        index[t] = ranked[:top_k]
        gates[t] = probs[t, index[t]]
        if top_k > 1:
            gates[t] /= gates[t].sum()
    n_real = int(real.sum())
    cap = math.ceil(capacity_factor * n_real * top_k / n_exp) if capacity_factor > 0 else n
    pairs = [(t, j) for j in range(top_k) for t in range(n)]
    if order == "token":
        pairs.sort()
    count, routed = np.zeros(n_exp), np.zeros(n_exp)
    kept = np.zeros((n, top_k), bool)
    for t, j in pairs:
        if real[t]:
            routed[index[t, j]] += 1
            if count[index[t, j]] < cap:
                kept[t, j] = True
                count[index[t, j]] += 1
    y = np.zeros_like(xf)
    for t in range(n):
        for j in range(top_k):
            if kept[t, j]:
                y[t] += gates[t, j] * _expert(p, index[t, j], xf[t], activation)
    lse = np.log(np.exp(logits).sum(-1))
    stats = {
        "load_balance_loss": n_exp * np.sum(routed / (n_real * top_k) * probs[real].mean(0)),
        "router_z_loss": np.mean(lse[real] ** 2),
        "tokens_per_expert": count,
        "dropped_share": 1 - count.sum() / (n_real * top_k),
    }
    return y.reshape(x.shape), stats, index, kept, probs, gates


def _assert_stats(stats, ref):
    for key, value in ref.items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("activation,top_k", [("swiglu", 2), ("gelu", 1), ("relu", 2)])
def test_top_k_routing_without_capacity_matches_reference(activation, top_k):
    model = MoEFeedForward(4, top_k, HIDDEN, capacity_factor=0.0, activation=activation)
    x, mask = _inputs()
    params = _init(model, x, mask)
    y, stats, index, kept = _apply(model, params, x, mask)
    ref_y, ref_stats, ref_index, _, probs, _ = _reference(
        params, x, mask, top_k=top_k, capacity_factor=0.0, activation=activation
    )
    ranked = -np.sort(-probs, -1)
    assert np.all(ranked[:, top_k - 1] - ranked[:, top_k] > 1e-4)  # no near-ties to flip
    np.testing.assert_array_equal(index, ref_index)  # each token's top-k by probability
    assert kept.all() and float(stats["dropped_share"]) == 0.0
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    _assert_stats(stats, ref_stats)


def test_capacity_drops_assignments_in_priority_order():
    # 16 tokens x 2 choices onto 4 experts, capacity ceil(0.5 * 16 * 2 / 4) = 4: >= half dropped.
    model = MoEFeedForward(4, 2, HIDDEN, capacity_factor=0.5)
    x, mask = _inputs()
    params = _init(model, x, mask)
    y, stats, index, kept = _apply(model, params, x, mask)
    ref = dict(top_k=2, capacity_factor=0.5, activation="swiglu")
    ref_y, ref_stats, ref_index, ref_kept, _, gates = _reference(params, x, mask, **ref)
    token_major = _reference(params, x, mask, **ref, order="token")[3]
    assert not np.array_equal(ref_kept, token_major)  # the fixture tells the two orders apart

    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(kept, ref_kept)
    assert np.all(np.asarray(stats["tokens_per_expert"]) <= 4)
    assert float(stats["dropped_share"]) >= 0.5  # 16 slots for 32 assignments
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    _assert_stats(stats, ref_stats)

    # Without a limit, each token gains exactly its dropped assignments' contributions.
    y_all = model.clone(capacity_factor=0.0).apply({"params": params}, x, mask, train=False)[0]
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xf = np.asarray(x, np.float64).reshape(-1, DIM)
    missing = np.zeros_like(xf)
    for t, j in zip(*np.nonzero(~kept), strict=True):
        missing[t] += gates[t, j] * _expert(p64, index[t, j], xf[t], "swiglu")
    np.testing.assert_allclose(
        np.asarray(y_all - y).reshape(-1, DIM), missing, rtol=1e-5, atol=1e-5
    )


def test_gradient_reaches_only_chosen_experts():
    model = MoEFeedForward(4, 2, HIDDEN, capacity_factor=0.0, router_bias=True)
    x, mask = _inputs()
    params = _init(model, x, mask)
    params["router"]["bias"] = jnp.array([0.0, 0.0, 0.0, -1e3])  # nobody picks expert 3
    _, _, index, _ = _apply(model, params, x, mask)
    assert set(index.ravel()) == {0, 1, 2}

    def loss(p):
        return jnp.sum(model.apply({"params": p}, x, mask, train=False)[0])

    grads = jax.grad(loss)(params)
    for name in ("wi", "wg", "wo"):
        for e in range(3):
            assert np.any(np.asarray(grads[name][e]) != 0), (name, e)
        np.testing.assert_array_equal(grads[name][3], 0.0)
    assert np.any(np.asarray(grads["router"]["kernel"]) != 0)  # through the gates


def test_padding_is_not_routed_counted_or_given_capacity():
    model = MoEFeedForward(4, 2, HIDDEN, capacity_factor=0.5)
    padding = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 5)]
    x, mask = _inputs(padding=padding)
    params = _init(model, x, mask)
    y, stats, _, kept = _apply(model, params, x, mask)
    assert not kept[~np.asarray(mask).reshape(-1)].any()
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0.0)

    # The same real tokens without padding, in the same order: identical routing and outputs.
    x_real, mask_real = x[mask][None], jnp.ones((1, int(mask.sum())), bool)
    y_real, stats_real, _, _ = _apply(model, params, x_real, mask_real)
    assert float(stats_real["dropped_share"]) > 0  # capacity binds, so padding would matter
    np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], y_real[0], rtol=1e-6, atol=1e-6)
    _assert_stats(stats, jax.tree.map(np.asarray, stats_real))

    ref_y, ref_stats, *_ = _reference(
        params, x, mask, top_k=2, capacity_factor=0.5, activation="swiglu"
    )
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    _assert_stats(stats, ref_stats)


def test_load_balance_and_z_loss_in_hand_worked_cases():
    x, mask = _inputs(padding=[(1, 7)])
    # Zero router kernel: every prob is 1/4, lax.top_k breaks the ties by lowest index, so every
    # token picks experts (0, 1) with gates 1/2. P is uniform: loss = 4 * sum_e f_e / 4 = 1.
    model = MoEFeedForward(4, 2, HIDDEN, capacity_factor=0.0)
    params = _init(model, x, mask)
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
    y, stats, index, _ = _apply(model, params, x, mask)
    np.testing.assert_array_equal(index, np.tile([0, 1], (16, 1)))
    assert float(stats["load_balance_loss"]) == pytest.approx(1.0, rel=1e-6)
    assert float(stats["router_z_loss"]) == pytest.approx(math.log(4) ** 2, rel=1e-6)
    np.testing.assert_array_equal(stats["tokens_per_expert"], [15, 15, 0, 0])

    # Two experts, top-1, bias (log 3, 0): probs (3/4, 1/4), all 15 real tokens pick expert 0.
    # f = (1, 0), P = (3/4, 1/4): loss = 2 * 3/4 = 1.5; z = log(3 + 1)^2. Capacity
    # ceil(1.0 * 15 / 2) = 8: the first 8 real tokens are kept with gate 3/4 (raw, Switch).
    model = MoEFeedForward(2, 1, HIDDEN, capacity_factor=1.0, router_bias=True)
    params = _init(model, x, mask)
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
    params["router"]["bias"] = jnp.array([math.log(3.0), 0.0])
    y, stats, _, kept = _apply(model, params, x, mask)
    assert float(stats["load_balance_loss"]) == pytest.approx(1.5, rel=1e-6)
    assert float(stats["router_z_loss"]) == pytest.approx(math.log(4) ** 2, rel=1e-6)
    np.testing.assert_array_equal(stats["tokens_per_expert"], [8, 0])
    assert float(stats["dropped_share"]) == pytest.approx(7 / 15)
    np.testing.assert_array_equal(kept[:, 0], np.arange(16) < 8)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xf = np.asarray(x, np.float64).reshape(-1, DIM)
    expected = np.array([0.75 * _expert(p64, 0, v, "swiglu") for v in xf[:8]])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, DIM)[:8], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y).reshape(-1, DIM)[8:], 0.0)


def test_experts_shard_over_the_model_axis_with_the_same_output():
    model = MoEFeedForward(4, 2, HIDDEN, capacity_factor=1.0)
    x, mask = _inputs(batch=4, length=4, padding=[(0, 0), (3, 1)])
    params = _init(model, x, mask)
    y_ref, stats_ref = model.apply({"params": params}, x, mask, train=False)

    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    mesh = sharding.make_mesh((2, 1, 4), jax.devices()[:8])
    rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
    jax.set_mesh(mesh)
    nn.set_logical_axis_rules(rules)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, mask, train=False))
    param_shardings = sharding.state_shardings(abstract, mesh, rules)["params"]
    sharded = jax.device_put(params, param_shardings)
    for name in ("wi", "wg", "wo"):
        assert tuple(sharded[name].sharding.spec)[0] == "model", name
        assert sharded[name].addressable_shards[0].data.shape[0] == 1  # 4 experts over 4
    x_sharded = jax.device_put(x, sharding.batch_sharding(mesh, rules, ndim=3))

    y, stats = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, train=False))(
        sharded, x_sharded, mask
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    _assert_stats(stats, jax.tree.map(np.asarray, stats_ref))


def test_groups_route_with_their_own_capacity():
    """group_size=8 over 3 x 8 tokens (one with padding) = each group of 8 routed on its own."""
    grouped = MoEFeedForward(4, 2, HIDDEN, capacity_factor=0.5, group_size=8)
    x, mask = _inputs(batch=3, length=8, seed=3, padding=((1, 2), (1, 5)))
    params = _init(grouped, x, mask)
    y, stats, _, kept = _apply(grouped, params, x, mask)
    kept_total = 0
    for g in range(3):
        ref_y, _, _, ref_kept, _, _ = _reference(
            params,
            x[g : g + 1],
            mask[g : g + 1],
            top_k=2,
            capacity_factor=0.5,
            activation="swiglu",
        )
        np.testing.assert_allclose(y[g], ref_y[0], atol=1e-5)
        np.testing.assert_array_equal(kept[8 * g : 8 * (g + 1)], ref_kept)
        kept_total += ref_kept.sum()
    assert float(stats["tokens_per_expert"].sum()) == kept_total
    # one group of all 24 tokens keeps a different set (capacity is pooled), so groups matter
    whole = MoEFeedForward(4, 2, HIDDEN, capacity_factor=0.5)
    assert not np.array_equal(_apply(whole, params, x, mask)[3], kept)
