"""BPR-MF (Rendle et al. 2009): user and item embeddings, trained on sampled pairwise rankings.

score(u, i) = p_u . q_i + b_i. Training uses every (window owner, target item) pair of the
training windows (the inputs only delimit the window): per pair, `model.negatives_per_pair`
items drawn uniformly from the catalogue other than the positive, and the loss

  mean over negatives j of  -log sigmoid(score(u, i) - score(u, j))
  + model.l2 * (|p_u|^2 + |q_i|^2 + mean_j |q_j|^2)     (the rows the pair uses)

averaged over the valid pairs. The score is a dot product of [p_u, 1] with [q_i, b_i], so
evaluation uses the shared table ranker.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from onerec_jax.models import losses
from onerec_jax.models.base import DataInfo, ScoringModel, check_user_item
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel


class MatrixFactorization(nn.Module):
    n_users: int
    vocab_size: int
    dim: int = 64
    item_bias: bool = True

    def setup(self):
        init = nn.initializers.normal(stddev=self.dim**-0.5)
        # User ids form a vocabulary too: both tables (and the bias) are split over the mesh's
        # vocab axes like the item vocabulary, padded to split evenly (vocab_parallel).
        self.user_embedding = nn.Embed(
            vocab_parallel.padded_rows(self.n_users),
            self.dim,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
        )
        self.item_embedding = nn.Embed(
            vocab_parallel.padded_rows(self.vocab_size),
            self.dim,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
        )
        if self.item_bias:
            self.bias = self.param(
                "item_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                (vocab_parallel.padded_rows(self.vocab_size),),
            )

    def __call__(self, users, items):
        """users [...] and items [...] (broadcastable) -> (scores, |p_u|^2, |q_i|^2)."""
        p = vocab_parallel.embed(self.user_embedding, users)  # [..., D]
        q = vocab_parallel.embed(self.item_embedding, items)  # [..., D]
        scores = jnp.sum(p * q, axis=-1)
        if self.item_bias:
            scores = scores + vocab_parallel.take_rows(self.bias[:, None], items)[..., 0]
        return scores, jnp.sum(p * p, axis=-1), jnp.sum(q * q, axis=-1)

    def user_vectors(self, users):
        """users [B] -> [B, D (+1)]: p_u, with a trailing 1 that picks up the item bias."""
        p = vocab_parallel.embed(self.user_embedding, users)
        if self.item_bias:
            p = jnp.concatenate([p, jnp.ones((*p.shape[:-1], 1), p.dtype)], axis=-1)
        return p

    def item_table(self):
        """[V, D (+1)]: q_i, with the item bias as the last column (rows >= V: padding)."""
        q = self.item_embedding.embedding
        if self.item_bias:
            q = jnp.concatenate([q, self.bias[:, None]], axis=-1)
        return q


class BPR(ScoringModel):
    """Matrix factorisation with the BPR loss; user-item pairs from the training windows."""

    def init(self, rng: jax.Array, batch):
        ids = jnp.zeros_like(batch["user"])
        return self.module.init({"params": rng}, ids, ids)["params"]

    def user_state(self, params, batch) -> jax.Array:
        return self.module.apply({"params": params}, batch["user"], method="user_vectors")

    def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        targets, mask = batch["targets"], batch["mask"]  # [B, L]
        n = self.config.model.negatives_per_pair
        negatives = losses.negatives_avoiding(rng, targets, n, self.info.vocab_size)  # [B, L, n]
        users = batch["user"][:, None]  # [B, 1]: the window's owner for every position

        def score(users, items):
            return self.module.apply({"params": params}, users, items)

        pos, user_sq, pos_sq = score(users, targets)  # [B, L]
        neg, _, neg_sq = score(users[..., None], negatives)  # [B, L, n]
        # -log sigmoid(x) = softplus(-x), stable for any x.
        ranking = jnp.mean(jax.nn.softplus(neg - pos[..., None]), axis=-1)  # [B, L]
        penalty = user_sq + pos_sq + jnp.mean(neg_sq, axis=-1)  # [B, L]
        row = ranking + self.config.model.l2 * penalty
        count = jnp.sum(mask).astype(jnp.float32)
        denominator = jnp.maximum(count, 1.0)
        loss = jnp.sum(jnp.where(mask, row, 0.0)) / denominator
        bpr = jnp.sum(jnp.where(mask, ranking, 0.0)) / denominator
        return loss, {"loss": loss, "bpr": bpr, "tokens": count}


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    check_user_item(config, info)
    m = config.model
    module = MatrixFactorization(
        n_users=info.n_users, vocab_size=info.vocab_size, dim=m.dim, item_bias=m.item_bias
    )
    return BPR(module, config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:bpr`."""
    c.data.windows = "all"  # a user-item model: every training interaction is a pair
    c.model.negatives_per_pair = 4
    c.model.l2 = 1e-2  # weaker penalties overfit on the demo and ml-latest-small
    c.optim.learning_rate = 1e-2  # a user's row gets one update per epoch (one window)


register(ModelSpec(name="bpr", build=build, variants={"bpr": config_defaults}, reads_user_ids=True))
