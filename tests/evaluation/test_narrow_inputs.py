"""Full-ranking evaluation reads each batch's inputs only as wide as its longest history (a
power of two, <= max_len): the narrow batches are the right-most columns of the max_len ones, and
every scoring model's user state is the same at either width, so ranks do not change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.data.pipeline import eval_dataset
from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.models import registry
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.parallel import sharding

N_ITEMS = 30


def random_data(seed: int = 0, n_users: int = 23) -> SequenceData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, n_users)
    n = int(lengths.sum())
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=rng.integers(1, N_ITEMS + 1, n).astype(np.int32),
        timestamps=np.arange(n, dtype=np.int64),
        ratings=np.ones(n, np.float32),
        user_ids=np.arange(n_users, dtype=np.int64),
        item_ids=np.arange(N_ITEMS + 1, dtype=np.int64),
        options={},
    )


def test_narrow_batches_are_the_right_columns_of_the_max_len_ones():
    data, max_len = random_data(), 20
    kwargs = dict(max_len=max_len, batch_size=4, by_length=True)
    wide = list(eval_dataset(data, "test", **kwargs))
    narrow = list(eval_dataset(data, "test", narrow=True, **kwargs))
    lengths = np.minimum(data.split("test").lengths, max_len)
    widths = []
    for w, n in zip(wide, narrow, strict=True):
        width = n["inputs"].shape[1]
        longest = int(lengths[n["user"][n["weight"] > 0]].max())
        assert width == min(max_len, 1 << (longest - 1).bit_length()) >= longest
        np.testing.assert_array_equal(n["inputs"], w["inputs"][:, max_len - width :])
        assert not w["inputs"][:, : max_len - width].any()  # only padding was cut
        for key in ("user", "target", "weight"):
            np.testing.assert_array_equal(n[key], w[key])
        widths.append(width)
    assert widths == sorted(widths) and widths[0] < max_len == widths[-1]  # by length


SCORING = [
    name
    for name in registry.variant_names()
    if registry.variant(name)[0].kind == registry.SCORING and name != "onerec_sidfeat"
]


@pytest.mark.parametrize("name", SCORING)
def test_user_state_does_not_depend_on_the_left_padding(name):
    c = apply_variant(base_config(), name)
    c.model.dim, c.model.mlp_dim, c.model.num_layers, c.model.dropout = 16, 32, 2, 0.0
    info = DataInfo(n_items=N_ITEMS, max_len=32, item_counts=np.ones(N_ITEMS + 1), n_users=5)
    model = build_model(c, info)
    rng = np.random.default_rng(1)
    items = rng.integers(1, N_ITEMS + 1, (5, 8)).astype(np.int32)
    items[:, :3] *= np.arange(5)[:, None] % 2  # some rows shorter (left padding)
    narrow = {"inputs": jnp.asarray(items), "user": jnp.arange(5, dtype=jnp.int32)}
    wide = {**narrow, "inputs": jnp.pad(narrow["inputs"], ((0, 0), (24, 0)))}
    params = model.init(jax.random.key(0), {**wide, "targets": wide["inputs"]})
    params = jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )
    want = model.user_state(params, wide)
    got = model.user_state(params, narrow)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_full_ranking_ranks_equal_at_max_len_width():
    data = random_data(3, n_users=40)
    c = apply_variant(base_config(), "sasrec")
    c.model.dim, c.model.num_layers = 16, 1
    c.data.max_len = 64
    c.eval.update(batch_size=8, valid_users=0, k=10)
    info = DataInfo(n_items=N_ITEMS, max_len=64, item_counts=np.ones(N_ITEMS + 1), n_users=40)
    model = build_model(c, info)
    mesh = sharding.make_mesh(c.mesh.shape, jax.devices()[:1])
    rules = sharding.rules_from_config(c.mesh.rules)
    with sharding.use_mesh(mesh, rules):
        params = model.init(jax.random.key(0), {"inputs": jnp.ones((2, 8), jnp.int32)})
        params = jax.tree.map(
            lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
        )
        evaluator = make_evaluator(model, data, c, mesh, rules)
        assert evaluator.narrow_inputs
        narrow, per_user = evaluator.evaluate(params, "test")
        evaluator.narrow_inputs = False
        wide, wide_user = evaluator.evaluate(params, "test")
    np.testing.assert_allclose(per_user["ranks"], wide_user["ranks"])
    np.testing.assert_array_equal(per_user["top_items"], wide_user["top_items"])
    assert narrow["ndcg@10"] == pytest.approx(wide["ndcg@10"])


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("sasrec", {}),  # the public SASRec block layout
        ("sasrec", {"block": "", "prenorm": True}),  # pre-LN
        ("sasrec", {"block": "", "prenorm": False}),  # post-LN
        ("onerec", {}),  # pre-RMSNorm, rotary positions, SwiGLU
        ("bert4rec", {}),  # bidirectional, post-LN, a [MASK] appended
    ],
)
def test_user_state_computes_the_last_query_alone_and_equals_the_full_pass(name, changes):
    """The last block computes one query (`last_only`); its state equals the last row of the
    full forward pass."""
    c = apply_variant(base_config(), name)
    c.model.dim, c.model.mlp_dim, c.model.num_layers, c.model.dropout = 16, 32, 2, 0.0
    c.model.update(changes)
    info = DataInfo(n_items=N_ITEMS, max_len=32, item_counts=np.ones(N_ITEMS + 1), n_users=5)
    model = build_model(c, info)
    rng = np.random.default_rng(2)
    inputs = rng.integers(1, N_ITEMS + 1, (5, 12)).astype(np.int32)
    inputs[:, :5] *= np.arange(5)[:, None] % 2
    batch = {"inputs": jnp.asarray(inputs), "user": jnp.arange(5, dtype=jnp.int32)}
    params = model.init(jax.random.key(0), {**batch, "targets": batch["inputs"]})
    params = jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )
    full_inputs = batch["inputs"]
    if name == "bert4rec":  # its state is read at a [MASK] after the history
        full_inputs = jnp.concatenate([full_inputs, jnp.full((5, 1), N_ITEMS + 1)], axis=1)
    want = model.module.apply({"params": params}, full_inputs, train=False)[:, -1]
    np.testing.assert_allclose(model.user_state(params, batch), want, rtol=1e-5, atol=1e-6)

    # and it does less work than the full pass (XLA's own FLOP count of each program)
    def flops(fn):
        return jax.jit(fn).lower(params).compile().cost_analysis()["flops"]

    full = flops(lambda p: model.module.apply({"params": p}, full_inputs, train=False)[:, -1])
    assert flops(lambda p: model.user_state(p, batch)) < 0.85 * full
