"""Popularity: every user gets the training catalogue ranked by log(1 + interaction count).

Nothing is learned. The scores are a one-column item table, `log(1 + count)` per item, against
a user state of 1, so the shared dot-product ranker ranks them and masks each user's history.
The model sets `trainable = False`: the trainer takes one step that leaves the table unchanged,
validates and tests, so a popularity run writes the same checkpoints and results.json as any
other model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.models.registry import ModelSpec, register


class Popularity(nn.Module):
    item_counts: np.ndarray  # [V] training interactions per item (row 0 = padding)

    def setup(self):
        counts = np.asarray(self.item_counts, np.float32)

        def init(rng, shape):
            del rng  # the table is the data's, not random
            return jnp.log1p(jnp.asarray(counts)).reshape(shape)

        self.log_counts = self.param(
            "log_counts", nn.with_logical_partitioning(init, ("vocab", None)), (len(counts), 1)
        )  # [V, 1]

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
    return PopularityModel(Popularity(item_counts=np.asarray(info.item_counts)), config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:pop`: nothing to learn: one no-op step, then validation and test."""
    del c


register(ModelSpec(name="pop", build=build, variants={"pop": config_defaults}))
