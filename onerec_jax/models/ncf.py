"""NeuMF (He et al. 2017): a GMF tower and an MLP tower over user and item ids, fused linearly.

  gmf(u, i) = p_u * q_i                                  [Dg]   (element-wise)
  mlp(u, i) = MLP(concat(p'_u, q'_i))                    [H_last], ReLU layers `model.mlp_layers`
  score     = w_g . gmf + w_m . mlp + b                   one logit

Trained like the paper, with binary cross-entropy on every (window owner, target item) pair of
the training windows and `model.negatives_per_pair` items drawn uniformly from the rest of the
catalogue as its negatives (`model.ncf_loss="bce"`):

  softplus(-score(u, i)) + sum_j softplus(score(u, j))
  or, with `model.ncf_loss="bpr"`, BPR's pairwise  mean_j softplus(score(u, j) - score(u, i))
  + model.l2 * (|u|^2 + |i|^2 + mean_j |j|^2)      (both towers' embedding rows the pair uses)

averaged over the valid pairs.

The score is not a dot product, so the model overrides `score_chunk` and the evaluator ranks the
catalogue chunk by chunk through it. Both towers are split at the user/item boundary (the first
MLP layer on a concatenation is a user part plus an item part), so a user's half is computed once
per evaluation batch and a chunk costs one broadcast add and the MLP's upper layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from onerec_jax.errors import ConfigError
from onerec_jax.models import losses
from onerec_jax.models.base import DataInfo, ScoringModel, check_user_item
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel


class NeuMF(nn.Module):
    n_users: int
    vocab_size: int
    gmf_dim: int = 32  # GMF embedding width Dg
    mlp_dim: int = 32  # MLP-tower embedding width (each of user and item)
    mlp_layers: Sequence[int] = (64, 32, 16)  # widths of the MLP's ReLU layers
    towers: str = "both"  # "both" (NeuMF), "gmf" (GMF alone) or "mlp" (the MLP tower alone)

    def setup(self):
        # N(0, 0.1), not the paper's N(0, 0.01): at 0.01 the GMF product starts near zero and
        # learned more slowly on ml-latest-small.
        # The user and item tables are split over the mesh's vocab axes, padded to split evenly
        # (parallel/vocab_parallel.py); every lookup goes through `vocab_parallel.embed`.
        init = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("vocab", "embed"))
        users, items = (vocab_parallel.padded_rows(n) for n in (self.n_users, self.vocab_size))
        self.user_gmf = nn.Embed(users, self.gmf_dim, embedding_init=init)
        self.item_gmf = nn.Embed(items, self.gmf_dim, embedding_init=init)
        self.user_mlp = nn.Embed(users, self.mlp_dim, embedding_init=init)
        self.item_mlp = nn.Embed(items, self.mlp_dim, embedding_init=init)
        width = self.mlp_layers[0]
        # The first MLP layer on concat(p'_u, q'_i) = p'_u W_user + q'_i W_item + bias.
        self.first_user = nn.Dense(width, name="first_user")
        self.first_item = nn.Dense(width, use_bias=False, name="first_item")
        self.hidden = [nn.Dense(w, name=f"hidden_{k}") for k, w in enumerate(self.mlp_layers[1:])]
        self.out_gmf = self.param("out_gmf", nn.initializers.lecun_normal(), (self.gmf_dim, 1))
        self.out_mlp = self.param(
            "out_mlp", nn.initializers.lecun_normal(), (self.mlp_layers[-1], 1)
        )
        self.out_bias = self.param("out_bias", nn.initializers.zeros, ())

    def user_vectors(self, users):
        """users [...] -> {"gmf": [..., Dg], "mlp": [..., H0]}, the user halves of both towers."""
        return {
            # w_g folded into the user side
            "gmf": vocab_parallel.embed(self.user_gmf, users) * self.out_gmf[:, 0],
            "mlp": self.first_user(vocab_parallel.embed(self.user_mlp, users)),
        }

    def item_vectors(self, items):
        """items [...] -> {"gmf": [..., Dg], "mlp": [..., H0]}, the item halves of both towers."""
        return {
            "gmf": vocab_parallel.embed(self.item_gmf, items),
            "mlp": self.first_item(vocab_parallel.embed(self.item_mlp, items)),
        }

    def combine(self, user, item):
        """Logits of user and item halves with broadcastable leading shapes."""
        logits = self.out_bias
        if self.towers in ("both", "gmf"):
            logits = logits + jnp.sum(user["gmf"] * item["gmf"], axis=-1)
        if self.towers in ("both", "mlp"):
            h = nn.relu(user["mlp"] + item["mlp"])
            for layer in self.hidden:
                h = nn.relu(layer(h))
            logits = logits + (h @ self.out_mlp)[..., 0]
        return logits

    def __call__(self, users, items):
        """users [...] and items [...] (broadcastable) -> logits."""
        return self.combine(self.user_vectors(users), self.item_vectors(items))

    def embedding_sq_norms(self, users, items):
        """(|p_u|^2 + |p'_u|^2 [...], |q_i|^2 + |q'_i|^2 [...]): both towers' embedding rows."""

        def sq(x):
            return jnp.sum(x * x, axis=-1)

        def rows(table, ids):
            return vocab_parallel.embed(table, ids)

        user_sq = sq(rows(self.user_gmf, users)) + sq(rows(self.user_mlp, users))
        return user_sq, sq(rows(self.item_gmf, items)) + sq(rows(self.item_mlp, items))

    def score_items(self, user, item_ids):
        """user halves {[B, *]} x item_ids [C] -> logits [B, C]."""
        user = jax.tree.map(lambda x: x[:, None, :], user)  # [B, 1, *]
        item = jax.tree.map(lambda x: x[None], self.item_vectors(item_ids))  # [1, C, *]
        return self.combine(user, item)


class NCF(ScoringModel):
    """NeuMF with sampled-negative BCE; scores item chunks itself (`score_chunk`)."""

    def init(self, rng: jax.Array, batch):
        ids = jnp.zeros_like(batch["user"])
        return self.module.init({"params": rng}, ids, ids)["params"]

    def user_state(self, params, batch):
        """{"gmf": [B, Dg], "mlp": [B, H0]}: the users' halves of the two towers."""
        return self.module.apply({"params": params}, batch["user"], method="user_vectors")

    def score_chunk(self, params, state, item_ids: jax.Array) -> jax.Array:
        scores = self.module.apply({"params": params}, state, item_ids, method="score_items")
        return scores.astype(jnp.float32)  # [B, C]

    def item_table(self, params) -> jax.Array:
        raise ConfigError(
            "model ncf scores (user, item) pairs with an MLP and has no item table; use "
            "score_chunk, or a dot-product model's run (e.g. bpr, sasrec) where a table is needed."
        )

    def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        targets, mask = batch["targets"], batch["mask"]  # [B, L]
        n = self.config.model.negatives_per_pair
        negatives = losses.negatives_avoiding(rng, targets, n, self.info.vocab_size)  # [B, L, n]
        items = jnp.concatenate([targets[..., None], negatives], axis=-1)  # [B, L, 1 + n]
        users = batch["user"][:, None, None]  # [B, 1, 1]: the window's owner at every position
        logits = self.module.apply({"params": params}, users, items)  # [B, L, 1 + n]
        if self.config.model.ncf_loss == "bpr":  # mean_j -log sigmoid(s_i - s_j), as BPR
            row = jnp.mean(jax.nn.softplus(logits[..., 1:] - logits[..., :1]), axis=-1)
        else:  # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), stable
            row = jax.nn.softplus(-logits[..., 0]) + jnp.sum(jax.nn.softplus(logits[..., 1:]), -1)
        if self.config.model.l2:
            user_sq, item_sq = self.module.apply(
                {"params": params}, users[..., 0], items, method="embedding_sq_norms"
            )  # [B, 1], [B, L, 1 + n]
            penalty = user_sq + item_sq[..., 0] + jnp.mean(item_sq[..., 1:], axis=-1)
            row = row + self.config.model.l2 * penalty
        count = jnp.sum(mask).astype(jnp.float32)
        loss = jnp.sum(jnp.where(mask, row, 0.0)) / jnp.maximum(count, 1.0)
        return loss, {"loss": loss, "tokens": count}


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    check_user_item(config, info)
    m = config.model
    if m.ncf_towers not in ("both", "gmf", "mlp"):
        raise ConfigError(f"model.ncf_towers={m.ncf_towers!r}: use 'both', 'gmf' or 'mlp'.")
    if m.ncf_loss not in ("bce", "bpr"):
        raise ConfigError(f"model.ncf_loss={m.ncf_loss!r}: use 'bce' (the paper's) or 'bpr'.")
    module = NeuMF(
        n_users=info.n_users,
        vocab_size=info.vocab_size,
        gmf_dim=m.dim,
        mlp_dim=m.dim,
        mlp_layers=tuple(m.mlp_layers),
        towers=m.ncf_towers,
    )
    return NCF(module, config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:ncf`."""
    c.data.windows = "all"  # a user-item model: every training interaction is a pair
    # BPR's width (the base 64) and penalty: ml-latest-small validation NDCG@10 0.0381 +- 0.0027
    # against 0.0264 +- 0.0041 at dim 32, l2 1e-3 (3 seeds each; BPR 0.0375 +- 0.0036; test
    # unchanged at 0.0233; BENCHMARKS.md "NeuMF against BPR")
    c.model.l2 = 1e-2
    c.model.negatives_per_pair = 4  # the paper's best range is 3-6
    c.optim.learning_rate = 1e-2  # as BPR: sparse user rows
    c.eval.chunk_size = 2048  # each chunk holds [eval batch, chunk, mlp_layers[0]] floats


register(ModelSpec(name="ncf", build=build, variants={"ncf": config_defaults}, reads_user_ids=True))
