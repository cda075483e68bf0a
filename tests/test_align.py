"""Preference alignment (align.py): DPO and the pairs by hand, a frozen reference, a planted
preference raised by alignment, and `--mode align` end to end."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import pytest

from onerec_jax import align
from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import UserError
from onerec_jax.models import reward as reward_lib
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.runs import TrainedRun


def test_dpo_loss_by_hand():
    loss, margin = align.dpo_loss(
        np.array([-1.0, -3.0]),
        np.array([-2.0, -1.0]),
        np.array([-1.5, -2.0]),
        np.array([-1.5, -2.0]),
        beta=0.5,
    )
    # margins: (-1 + 1.5) - (-2 + 1.5) = 1; (-3 + 2) - (-1 + 2) = -2
    assert float(margin) == pytest.approx(-0.5)
    want = (np.log1p(np.exp(-0.5)) + np.log1p(np.exp(1.0))) / 2  # -log sigmoid(0.5 m)
    assert float(loss) == pytest.approx(want, rel=1e-6)


def test_pairs_from_known_rewards():
    candidates = np.array([[5, 6, 7], [8, 9, 0], [3, 4, 0]])
    rewards = np.array([[3.0, 4.5, 1.0], [2.0, 2.0, 9.0], [1.0, 5.0, 9.0]])
    valid = candidates > 0
    chosen, rejected, keep = align.make_pairs(candidates, rewards, valid)
    assert chosen.tolist()[::2] == [6, 4] and rejected.tolist()[::2] == [7, 3]
    assert keep.tolist() == [True, False, True]  # user 2's two candidates tie; slot 3 is empty


N_ITEMS, LIKED = 40, 20  # items 1..20 are liked (rated 5), 21..40 disliked (rated 1)


def _model(rating_weight):
    c = apply_variant(base_config(), "sasrec")
    c.model.update(dim=16, num_layers=1, num_heads=1, mlp_dim=16, dropout=0.0)
    c.model.rating_weight = rating_weight
    c.loss.name = "full_softmax"
    c.data.max_len = 6
    c.align.update(candidates=10, beta=0.5, learning_rate=3e-3, next_item_weight=0.0)
    info = DataInfo(n_items=N_ITEMS, max_len=6, item_counts=np.ones(N_ITEMS + 1), rating_mean=3.0)
    model = build_model(c, info)
    params = nn.meta.unbox(model.init(jax.random.key(1), {"inputs": np.zeros((1, 6), np.int32)}))
    return c, model, params


def _planted_data(rng, n_users=200):
    """Histories of 8 random items (liked and disliked alike): the next-item signal is uniform,
    the ratings alone say which items are liked."""
    items = rng.integers(1, N_ITEMS + 1, size=(n_users, 8)).astype(np.int32)
    ratings = np.where(items <= LIKED, 5.0, 1.0).astype(np.float32)
    return SequenceData(
        offsets=np.arange(0, 8 * n_users + 1, 8),
        items=items.ravel(),
        timestamps=np.arange(8 * n_users),
        ratings=ratings.ravel(),
        user_ids=np.arange(n_users),
        item_ids=np.arange(N_ITEMS + 1),
        options={},
    )


def _train_reward(model, params, data, steps=200):
    opt = optax.adam(3e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        (_, m), g = jax.value_and_grad(model.loss, has_aux=True)(params, batch, jax.random.key(0))
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, m

    seq = data.items.reshape(-1, 8)
    rat = data.ratings.reshape(-1, 8)
    for i in range(steps):
        rows = np.arange(i * 16, i * 16 + 16) % len(seq)
        batch = {
            "inputs": seq[rows, :5],
            "targets": seq[rows, 1:6],
            "mask": np.ones((16, 5), bool),
            "target_ratings": rat[rows, 1:6],
        }
        params, state, m = step(params, state, batch)
    assert float(m["rating_mse"]) < 0.2
    return params


def test_alignment_raises_the_liked_share_and_keeps_the_reference():
    rng = np.random.default_rng(0)
    data = _planted_data(rng)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model")
    )
    rc, rmodel, rparams = _model(1.0)
    rparams = _train_reward(rmodel, rparams, data)
    pc, pmodel, pparams = _model(0.0)
    reward = TrainedRun(rc, data, None, rmodel, rparams, 1, mesh, ())
    policy = TrainedRun(pc, data, None, pmodel, pparams, 1, mesh, ())
    aligner = align.Aligner(policy, reward, pc.align)
    users = np.arange(data.n_users)
    ref = jax.device_get(pparams)
    ref_before = np.asarray(aligner._log_probs(ref, align._inputs(data, users[:8], 6)))
    _, before = aligner.pairs(pparams, ref, users)
    params, opt_state = pparams, aligner.tx.init(pparams)
    for _ in range(3):  # iterations: fresh candidates from the current policy each time
        pairs, _ = aligner.pairs(params, ref, users)
        for s in range(15):
            rows = np.arange(s * 64, s * 64 + 64) % len(pairs["chosen"])
            batch = {k: v[rows] for k, v in pairs.items()}
            params, opt_state, metrics = aligner.step(
                params, opt_state, batch, {}, jax.random.key(s)
            )
    _, after = aligner.pairs(params, ref, users)
    # the reward model sees liked items as >= 4 stars: the policy's candidates turn liked
    assert 0.3 < before["liked_share"] < 0.7
    assert after["liked_share"] > 0.85
    assert after["reward_chosen"] >= before["reward_chosen"]
    assert float(aligner.kl(params, ref, align._inputs(data, users[:64], 6))) > 0
    ref_after = np.asarray(aligner._log_probs(ref, align._inputs(data, users[:8], 6)))
    np.testing.assert_array_equal(ref_before, ref_after)  # the reference never moved


def test_align_needs_a_reward_model(tmp_path):
    with pytest.raises(UserError, match="must differ"):
        align.align(tmp_path, out=tmp_path)
    assert isinstance(base_config().align, ml_collections.ConfigDict)


def test_pairs_from_a_fitted_reward_model(tmp_path):
    """A `--mode reward` model (models/reward.py) rewards the candidates: fit on the planted
    ratings, it prefers the liked items; `load_reward` reads its file and refuses other data."""
    rng = np.random.default_rng(0)
    data = _planted_data(rng)
    cfg = base_config().reward
    cfg.update(dim=4, epochs=40, patience=40, learning_rate=0.05)
    fitted, _ = reward_lib.fit(data, cfg)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model")
    )
    pc, pmodel, pparams = _model(0.0)
    policy = TrainedRun(pc, data, None, pmodel, pparams, 1, mesh, ())
    fitted.save(tmp_path / reward_lib.REWARD_FILE)
    loaded = align.load_reward(policy, tmp_path, tmp_path)
    aligner = align.Aligner(policy, loaded, pc.align)
    pairs, stats = aligner.pairs(pparams, jax.device_get(pparams), np.arange(data.n_users))
    assert (pairs["chosen"] <= LIKED).mean() > 0.95
    assert (pairs["rejected"] > LIKED).mean() > 0.95
    assert stats["reward_chosen"] > 4.0 and stats["reward_rejected"] < 2.0
    other = _planted_data(rng, n_users=150)  # other users: the reward's rows do not match
    stranger = TrainedRun(pc, other, None, pmodel, pparams, 1, mesh, ())
    with pytest.raises(UserError, match="other data"):
        align.load_reward(stranger, tmp_path, tmp_path)
