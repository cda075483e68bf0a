"""The reward model of preference alignment (issue 16): the rating a user would give an item.

    r(u, i) = mu + b_u + b_i + p_u . q_i

biased matrix factorisation (Koren, Bell & Volinsky 2009), fit on the ratings of the training
split only (each user's validation and test targets are never read), by minibatch Adam on the
squared error plus `reward.l2` x the squared norm of the parameters each rating uses, and
stopped at the epoch of the best validation RMSE. A user's parameters come from their own
training history, the part a policy reads too; a user it has no row for gets mu + b_i.

Why not the rating head beside the next-item head (`model.rating_weight`): its bilinear
(h P) . e + b[item] has no user bias, and on the dev set it predicted validation ratings worse
than each user's mean training rating (RMSE 1.21 against 1.02, BENCHMARKS.md "Preferences").
The per-user bias is most of what a rating predictor gains over the global mean on MovieLens.

  python -m onerec_jax.main --mode reward --config configs/ml_latest_small.py --workdir runs/reward
  python -m onerec_jax.main --mode align --workdir runs/onerec --reward_workdir runs/reward
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import ConfigError, UserError

REWARD_FILE = "reward.npz"
RESULTS_FILE = "results.json"
_ARRAYS = ("user_bias", "item_bias", "user_vectors", "item_vectors", "item_ids")  # in reward.npz


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """Fitted parameters over the dense ids of the data it was fit on."""

    mu: float
    user_bias: np.ndarray  # [n_users]
    item_bias: np.ndarray  # [n_items + 1]; row 0 (padding) unused
    user_vectors: np.ndarray  # [n_users, dim]
    item_vectors: np.ndarray  # [n_items + 1, dim]
    item_ids: np.ndarray  # [n_items + 1] source item ids (a policy's data must match)

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[..., C] predicted ratings of `items` [..., C] for dense `users` [...] (ids past the
        fitted users, e.g. new ones, get mu + b_i)."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        known = users < len(self.user_bias)
        u = np.where(known, users, 0)
        dot = np.einsum("...d,...cd->...c", self.user_vectors[u], self.item_vectors[items])
        user_part = np.where(known[..., None], self.user_bias[u][..., None] + dot, 0.0)
        return (self.mu + self.item_bias[items] + user_part).astype(np.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the parameters to the .npz `path` atomically."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    mu=np.float64(self.mu),
                    **{k: getattr(self, k) for k in _ARRAYS},
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> RewardModel:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    mu=float(z["mu"]),
                    **{k: z[k] for k in _ARRAYS},
                )
        except (OSError, KeyError, ValueError) as e:
            raise UserError(
                f"{path}: not a reward model file ({e}). Fit one with --mode reward."
            ) from e


def training_triples(data: SequenceData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) of every training interaction (each user's last two left out)."""
    mask = data.train_mask()
    users = np.repeat(np.arange(data.n_users), np.diff(data.offsets))
    return users[mask], data.items[mask].astype(np.int64), data.ratings[mask].astype(np.float32)


def user_mean_baseline(data: SequenceData) -> np.ndarray:
    """[n_users] each user's mean training rating: the baseline a reward model must beat."""
    users, _, ratings = training_triples(data)
    sums = np.bincount(users, ratings, minlength=data.n_users)
    return sums / np.maximum(np.bincount(users, minlength=data.n_users), 1)


def rmse_report(model: RewardModel, data: SequenceData, split: str) -> dict[str, float]:
    """RMSE of the predicted ratings of every user's `split` target, beside the user-mean and
    the global-mean baselines."""
    users = np.arange(data.n_users)
    truth = data.target_ratings(split).astype(np.float64)
    targets = data.split(split).targets.astype(np.int64)
    predicted = model.predict(users, targets[:, None])[:, 0]
    rmse = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - truth) ** 2)))  # noqa: E731
    return {
        "rmse": rmse(predicted),
        "rmse_user_mean": rmse(user_mean_baseline(data)),
        "rmse_global_mean": rmse(np.full(len(truth), model.mu)),
        "n_users": int(len(users)),
    }


def _check(cfg: ml_collections.ConfigDict) -> None:
    problems = []
    if int(cfg.dim) < 0:
        problems.append(f"reward.dim={cfg.dim} (use >= 0; 0: biases only)")
    if float(cfg.l2) < 0 or float(cfg.learning_rate) <= 0:
        problems.append(f"reward.l2={cfg.l2} >= 0 and reward.learning_rate={cfg.learning_rate} > 0")
    if int(cfg.batch_size) < 1 or int(cfg.epochs) < 1 or int(cfg.patience) < 1:
        problems.append("reward.batch_size, reward.epochs and reward.patience must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems))


def fit(data: SequenceData, cfg: ml_collections.ConfigDict, seed: int = 0):
    """(RewardModel, history): the epoch with the best validation RMSE; history holds each
    epoch's (epoch, train MSE, validation RMSE)."""
    _check(cfg)
    if not data.has_ratings:
        raise UserError(
            "the reward model learns ratings; this data has none (a `user item` layout)."
        )
    users, items, ratings = training_triples(data)
    mu = float(ratings.mean())
    dim = int(cfg.dim)
    key = jax.random.key(seed)
    ku, ki = jax.random.split(key)
    std = float(cfg.init_std)
    params = {
        "bu": jnp.zeros(data.n_users),
        "bi": jnp.zeros(data.n_items + 1),
        "p": std * jax.random.normal(ku, (data.n_users, dim)),
        "q": std * jax.random.normal(ki, (data.n_items + 1, dim)),
    }
    tx = optax.adam(float(cfg.learning_rate))
    opt_state = tx.init(params)
    l2 = float(cfg.l2)

    def loss_fn(params, u, i, r, w):
        p, q = params["p"][u], params["q"][i]
        pred = mu + params["bu"][u] + params["bi"][i] + jnp.sum(p * q, -1)
        reg = params["bu"][u] ** 2 + params["bi"][i] ** 2 + jnp.sum(p * p + q * q, -1)
        return jnp.sum(w * ((pred - r) ** 2 + l2 * reg)) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(params, opt_state, u, i, r, w):
        loss, grads = jax.value_and_grad(loss_fn)(params, u, i, r, w)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def as_model(params) -> RewardModel:
        host = jax.device_get(params)
        return RewardModel(
            mu=mu,
            user_bias=np.asarray(host["bu"], np.float32),
            item_bias=np.asarray(host["bi"], np.float32),
            user_vectors=np.asarray(host["p"], np.float32),
            item_vectors=np.asarray(host["q"], np.float32),
            item_ids=np.asarray(data.item_ids),
        )

    rng = np.random.default_rng(seed)
    n, batch = len(ratings), min(int(cfg.batch_size), len(ratings))
    best, best_rmse, since, history = as_model(params), np.inf, 0, []
    for epoch in range(1, int(cfg.epochs) + 1):
        order = rng.permutation(n)
        losses = []
        for lo in range(0, n, batch):
            rows = order[lo : lo + batch]
            w = np.ones(batch, np.float32)
            if len(rows) < batch:  # one shape: pad the last batch with zero weight
                w[len(rows) :] = 0.0
                rows = np.pad(rows, (0, batch - len(rows)))
            params, opt_state, loss = step(
                params, opt_state, users[rows], items[rows], ratings[rows], w
            )
            losses.append(float(loss))
        model = as_model(params)
        val = rmse_report(model, data, "valid")["rmse"]
        history.append((epoch, float(np.mean(losses)), val))
        if val < best_rmse:
            best, best_rmse, since = model, val, 0
        else:
            since += 1
            if since >= int(cfg.patience):
                break
    return best, history


def is_reward_run(workdir: str | Path) -> bool:
    return (Path(workdir) / REWARD_FILE).is_file()
