"""Popularity: every user gets the training catalogue ranked by log(1 + interaction count).

Nothing is learned. The scores are a one-column item table, `log(1 + count)` per item, against
a user state of 1, so the shared dot-product ranker ranks them and masks each user's history.
The model sets `trainable = False`: the trainer takes one step that leaves the table unchanged,
validates and tests, so a popularity run writes the same checkpoints and results.json as any
other model.

`:popcontent` (popularity by content, the cold-start baseline, data/cold_start.py): items with
no training interaction get the log-popularity their content predicts, a ridge regression of
log(1 + count) on the genre multi-hot and release-year bucket one-hot, fitted on the items that
have training interactions; the others keep their own. Without content the prediction is the
mean over those items.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel


class Popularity(nn.Module):
    item_counts: np.ndarray  # [V] training interactions per item (row 0 = padding)

    def setup(self):
        counts = np.asarray(self.item_counts, np.float32)
        rows = vocab_parallel.padded_rows(len(counts))  # splits evenly over the mesh

        def init(rng, shape):
            del rng  # the table is the data's, not random; rows past V are never ranked
            padded = np.zeros(shape[0], np.float32)
            padded[: len(counts)] = counts
            return jnp.log1p(jnp.asarray(padded)).reshape(shape)

        self.log_counts = self.param(
            "log_counts", nn.with_logical_partitioning(init, ("vocab", None)), (rows, 1)
        )  # [V rounded up to the vocab shards, 1]

    def __call__(self, inputs, *, train: bool):
        """inputs [B, L] -> [B, 1] ones: every user's state is the same."""
        del train
        return jnp.ones((inputs.shape[0], 1), jnp.float32)

    def item_table(self):
        return self.log_counts  # [V, 1]


class PopularityModel(ScoringModel):
    trainable = False

    def user_state(self, params, batch) -> jax.Array:
        return self.apply(params, batch["inputs"], train=False)  # [B, 1]

    def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        del params, rng
        loss = jnp.float32(0.0)
        return loss, {"loss": loss, "tokens": jnp.sum(batch["mask"]).astype(jnp.float32)}


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    counts = np.asarray(info.item_counts, np.float64)
    if config.model.get("pop_content", False):
        counts = np.expm1(content_log_counts(info))  # the module takes log1p again
    return PopularityModel(Popularity(item_counts=counts), config, info)


def content_features(info: DataInfo) -> np.ndarray | None:
    """[V, F] genre multi-hot and year-bucket one-hot of every item, or None without content."""
    parts = []
    if info.item_genres is not None:
        parts.append(np.asarray(info.item_genres, np.float64))
    if info.item_year_bucket is not None:
        years = np.asarray(info.item_year_bucket, np.int64)
        parts.append(np.eye(int(years.max()) + 1)[years])
    return np.concatenate(parts, axis=1) if parts else None


def content_log_counts(info: DataInfo, alpha: float = 1.0) -> np.ndarray:
    """[V] log(1 + count) of items with training interactions; for the rest, the ridge
    prediction from content (fitted on the former), floored at 0. Row 0 (padding) is 0."""
    from sklearn.linear_model import Ridge

    counts = np.asarray(info.item_counts, np.float64)
    out = np.log1p(counts)
    warm = counts > 0
    warm[0] = False
    cold = ~warm
    cold[0] = False
    if not cold.any() or not warm.any():
        return out
    x = content_features(info)
    if x is None:
        out[cold] = out[warm].mean()
    else:
        ridge = Ridge(alpha=alpha).fit(x[warm], out[warm])
        out[cold] = np.maximum(ridge.predict(x[cold]), 0.0)
    return out


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:pop`: nothing to learn: one no-op step, then validation and test."""
    del c


def content_defaults(c: ml_collections.ConfigDict) -> None:
    """`:popcontent`: popularity, with content-predicted popularity for items never trained on."""
    c.model.pop_content = True


register(
    ModelSpec(
        name="pop", build=build, variants={"pop": config_defaults, "popcontent": content_defaults}
    )
)
