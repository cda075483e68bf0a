"""The reward model (models/reward.py): predictions and baselines by hand, a planted rating
rule recovered, its file, and `--mode align` reading it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from onerec_jax.data.sequences import SequenceData
from onerec_jax.defaults import base_config
from onerec_jax.errors import UserError
from onerec_jax.models import reward


def _data(items: np.ndarray, ratings: np.ndarray) -> SequenceData:
    n_users, length = items.shape
    return SequenceData(
        offsets=np.arange(0, n_users * length + 1, length),
        items=items.ravel().astype(np.int32),
        timestamps=np.arange(items.size),
        ratings=ratings.ravel().astype(np.float32),
        user_ids=np.arange(n_users),
        item_ids=np.arange(int(items.max()) + 1),
        options={},
    )


def test_predict_and_baselines_by_hand(tmp_path):
    # 2 users x 4 interactions: the last two of each are validation and test targets
    data = _data(np.array([[1, 2, 3, 1], [2, 3, 1, 2]]), np.array([[4, 2, 5, 1], [3, 5, 2, 4]]))
    np.testing.assert_allclose(reward.user_mean_baseline(data), [3.0, 4.0])
    users, items, ratings = reward.training_triples(data)
    assert users.tolist() == [0, 0, 1, 1] and items.tolist() == [1, 2, 2, 3]
    assert ratings.tolist() == [4, 2, 3, 5]
    model = reward.RewardModel(
        mu=3.5,
        user_bias=np.array([0.5, -1.0], np.float32),
        item_bias=np.array([0.0, 0.25, -0.5, 1.0], np.float32),
        user_vectors=np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
        item_vectors=np.array([[0, 0], [1.0, 1.0], [0.5, -1.0], [2.0, 0.0]], np.float32),
        item_ids=data.item_ids,
    )
    got = model.predict(np.array([0, 1, 7]), np.array([[1, 3], [2, 1], [3, 2]]))
    want = [
        [3.5 + 0.5 + 0.25 + 1.0, 3.5 + 0.5 + 1.0 + 2.0],
        [3.5 - 1.0 - 0.5 - 2.0, 3.5 - 1.0 + 0.25 + 2.0],
        [3.5 + 1.0, 3.5 - 0.5],  # user 7 is unknown: mu + item bias
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    report = reward.rmse_report(
        model, data, "valid"
    )  # targets: user 0 item 3 (5), user 1 item 1 (2)
    pred = [3.5 + 0.5 + 1.0 + 2.0, 3.5 - 1.0 + 0.25 + 2.0]
    assert report["rmse"] == pytest.approx(np.sqrt(((pred[0] - 5) ** 2 + (pred[1] - 2) ** 2) / 2))
    assert report["rmse_user_mean"] == pytest.approx(np.sqrt(((3 - 5) ** 2 + (4 - 2) ** 2) / 2))
    assert report["rmse_global_mean"] == pytest.approx(np.sqrt((1.5**2 + 1.5**2) / 2))
    model.save(tmp_path / "r.npz")
    back = reward.RewardModel.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(
        back.predict([0, 1], [[1, 2], [3, 1]]), model.predict([0, 1], [[1, 2], [3, 1]])
    )
    (tmp_path / "bad.npz").write_bytes(b"not a file")
    with pytest.raises(UserError, match="--mode reward"):
        reward.RewardModel.load(tmp_path / "bad.npz")


def _planted(seed=0, n_users=300, n_items=60, length=40, noise=0.3):
    """Ratings = 3.5 + user bias + item bias + a rank-2 taste term + noise: a user's mean
    rating misses the item and taste parts, which the model can learn from other users."""
    rng = np.random.default_rng(seed)
    bu, bi = rng.normal(0, 0.5, n_users), rng.normal(0, 0.6, n_items + 1)
    pu, qi = rng.normal(0, 0.6, (n_users, 2)), rng.normal(0, 0.6, (n_items + 1, 2))
    items = np.stack([rng.permutation(np.arange(1, n_items + 1))[:length] for _ in range(n_users)])
    users = np.arange(n_users)[:, None]
    truth = 3.5 + bu[users] + bi[items] + np.einsum("ud,uld->ul", pu, qi[items])
    return _data(items, truth + rng.normal(0, noise, truth.shape)), noise


def test_a_planted_rating_rule_is_recovered():
    data, noise = _planted()
    cfg = base_config().reward
    cfg.update(dim=8, l2=0.02, learning_rate=0.02, batch_size=1024, epochs=60, patience=10)
    model, history = reward.fit(data, cfg)
    val, test = reward.rmse_report(model, data, "valid"), reward.rmse_report(model, data, "test")
    assert history[0][2] > val["rmse"]  # validation improved from the first epoch
    for r in (val, test):
        # the user mean misses item biases and taste (0.73 / 0.87 here); the fit nears the
        # noise (0.32 / 0.35)
        assert r["rmse_user_mean"] > 0.7
        assert r["rmse"] < noise + 0.1
        assert r["rmse"] < r["rmse_user_mean"] - 0.3


def test_fit_refuses_unrated_data_and_bad_settings():
    items = np.tile(np.arange(1, 6), (4, 1))
    with pytest.raises(UserError, match="no ratings|has none"):
        reward.fit(_data(items, np.ones(items.shape)), base_config().reward)
    cfg = base_config().reward
    cfg.l2 = -1.0
    with pytest.raises(Exception, match="reward.l2"):
        reward.fit(_data(items, np.arange(20).reshape(4, 5) % 5 + 1.0), cfg)


def test_mode_reward_writes_the_model_and_its_results(tmp_path):
    """`--mode reward` (main.py -> modes.reward) on a ratings.csv: reward.npz and a
    results.json with validation and test RMSE beside the baselines."""
    data, _ = _planted(n_users=120, n_items=30, length=12)
    users = np.repeat(np.arange(1, data.n_users + 1), 12)
    lines = ["userId,movieId,rating,timestamp"] + [
        f"{u},{10 * i},{min(5.0, max(0.5, round(r * 2) / 2))},{t}"
        for u, i, r, t in zip(users, data.items, data.ratings, range(len(users)), strict=True)
    ]
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    movies = [f"{10 * i},Movie {i} (1999),Drama" for i in np.unique(data.items)]
    (tmp_path / "movies.csv").write_text("\n".join(["movieId,title,genres", *movies]) + "\n")
    proc = subprocess.run(
        [
            sys.executable, "-m", "onerec_jax.main", "--mode", "reward",
            "--config", "configs/custom.py", f"--config.data.path={tmp_path}",
            "--config.data.cache_dir=none", "--config.reward.epochs=5",
            f"--workdir={tmp_path / 'run'}",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reward model: validation RMSE" in proc.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val"]["n_users"] == data.n_users and results["epochs"] <= 5
    assert results["val"]["rmse"] < results["val"]["rmse_global_mean"]
    fitted = reward.RewardModel.load(tmp_path / "run" / reward.REWARD_FILE)
    assert fitted.item_ids[1:].astype(int).tolist() == sorted(10 * np.unique(data.items))
