"""BERT4Rec (Sun et al. 2019): a bidirectional Transformer trained to fill in masked items.

Training (cloze): the window's full sequence (inputs plus the last target) has a share
`model.mask_prob` of its real items replaced by a [MASK] token (at least one per sequence, never
padding), and the model predicts the original items there with the shared full or sampled
softmax, scored at the hidden slots only. A share `model.last_item_share` of the sequences
instead has only its last item masked, the situation evaluation asks about. Evaluation appends
[MASK] after the history and scores the hidden state there. [MASK] is an extra embedding row,
id `vocab_size`; the item table the scorer sees has the usual V rows, so [MASK] is never ranked.

Sequences are up to max_len + 1 wide (a full window, or a max_len history plus [MASK]), so the
learned position table has max_len + 1 rows, counted back from the last slot.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from onerec_jax.errors import ConfigError
from onerec_jax.models import layers
from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.models.losses import next_item_loss
from onerec_jax.models.precision import compute_dtype
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel


class BERT4Rec(nn.Module):
    vocab_size: int  # items + padding; the [MASK] token is id vocab_size
    max_len: int
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 256
    dropout: float = 0.1
    prenorm: bool = True  # pre-LN (stabler) or post-LN (BERT's original)
    init_std: float = 0.02  # normal(std) embeddings and kernels, as BERT (0: dim**-0.5 / fan-in)
    norm_eps: float = 1e-8  # LayerNorm epsilon
    # BERT's embedding layer: LayerNorm(item + position), unscaled; False: sqrt(dim) * item
    embedding_norm: bool = True
    mlm_head: bool = False  # BERT's masked-LM transform (dense, GELU, LayerNorm) before the table
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=self.init_std if self.init_std > 0 else self.dim**-0.5)
        self.item_embedding = nn.Embed(
            # + the [MASK] row (id V), then rows to split evenly over the mesh
            vocab_parallel.padded_rows(self.vocab_size + 1),
            self.dim,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
        )
        self.position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (self.max_len + 1, self.dim),
        )
        self.blocks = [
            layers.Block(
                self.num_heads,
                self.mlp_dim,
                self.dropout,
                "layernorm",
                self.prenorm,
                "gelu",
                dtype=self.dtype,
                norm_eps=self.norm_eps,
                attn_bias=self.init_std > 0,  # BERT's projections have biases
                init_std=self.init_std,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.final_norm = nn.LayerNorm(dtype=self.dtype, epsilon=self.norm_eps)
        self.embedding_layernorm = nn.LayerNorm(dtype=self.dtype, epsilon=self.norm_eps)
        self.dropout_layer = nn.Dropout(self.dropout)
        if self.mlm_head:  # BERT's masked-LM transform: dense + GELU + LayerNorm
            kernel_init = layers.dense_init(("embed", None), std=self.init_std)
            self.head = nn.Dense(self.dim, dtype=self.dtype, kernel_init=kernel_init)
            self.head_norm = nn.LayerNorm(dtype=self.dtype, epsilon=self.norm_eps)

    def __call__(self, inputs, *, train: bool, last_only: bool = False):
        """inputs [B, W] left-padded ids, [MASK] allowed, W <= max_len + 1 -> hidden [B, W, D]
        ([B, 1, D] with `last_only`: the last slot alone, one query in the last block)."""
        width = inputs.shape[1]
        if width > self.max_len + 1:
            raise ValueError(f"BERT4Rec sees at most max_len + 1 = {self.max_len + 1} slots")
        positions = layers.positions_from_end(width)
        x = vocab_parallel.embed(self.item_embedding, inputs)  # [B, W, D]
        if not self.embedding_norm:
            x = x * jnp.sqrt(self.dim).astype(self.dtype)
        x = x + self.position_embedding[positions].astype(self.dtype)
        if self.embedding_norm:
            x = self.embedding_layernorm(x)
        x = self.dropout_layer(x, deterministic=not train)
        x = x * (inputs > 0)[..., None]  # padding slots carry nothing
        mask = layers.attention_mask(inputs, causal=False)  # every real slot sees every other
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, positions, train=train, last_only=last)
        x = self.final_norm(x) if self.prenorm else x
        return self.head_norm(nn.gelu(self.head(x))) if self.mlm_head else x

    def item_table(self):
        # [rows >= V + 1, D]: rows >= V ([MASK], then padding) are no items; the loss and the
        # ranker read the first V (the whole table stays split over the mesh)
        return self.item_embedding.embedding


def cloze_positions(
    rng: jax.Array, items: jax.Array, mask_prob: float, last_share: float
) -> tuple[jax.Array, jax.Array]:
    """The real slots of left-padded `items` [B, W] that the cloze task hides, as in BERT.

    A row of n real items hides k = max(1, round(mask_prob * n)) of them, drawn uniformly
    without replacement (never padding); with probability `last_share` a row instead hides
    only its last slot (always real in a training window). Rows are returned as K =
    max(1, round(mask_prob * W)) >= k slot indices, so the loss scores B * K positions rather
    than B * W: the full softmax over the catalogue, the costly part, shrinks by ~1/mask_prob.

    Returns:
      slots [B, K] int32 positions in 0..W-1 and valid [B, K] bool (the first k of a row).
    """
    batch, width = items.shape
    draw_rng, last_rng = jax.random.split(rng)
    real = items > 0
    n_real = jnp.sum(real, axis=1)  # [B]
    cap = max(1, math.floor(mask_prob * width + 0.5))  # >= k, as n_real <= width
    k = jnp.maximum(1, jnp.floor(mask_prob * n_real + 0.5).astype(jnp.int32))  # [B]
    k = jnp.minimum(k, jnp.minimum(n_real, cap))  # cap: float32 vs float64 rounding
    draws = jnp.where(real, jax.random.uniform(draw_rng, items.shape), -1.0)  # [B, W]
    _, slots = jax.lax.top_k(draws, cap)  # [B, K]: real slots in random order, then padding
    valid = jnp.arange(cap)[None, :] < k[:, None]
    last_only = jax.random.bernoulli(last_rng, last_share, (batch, 1))  # [B, 1]
    slots = jnp.where(last_only, width - 1, slots).astype(jnp.int32)
    only_first = (jnp.arange(cap) == 0)[None, :] & real[:, -1:]
    return slots, jnp.where(last_only, only_first, valid)


def slot_mask(slots: jax.Array, valid: jax.Array, width: int) -> jax.Array:
    """[B, W] bool: True at the valid `slots` [B, K]."""
    rows = jnp.arange(slots.shape[0])[:, None]
    return jnp.zeros((slots.shape[0], width), jnp.int32).at[rows, slots].max(valid) > 0


def full_sequence(batch) -> jax.Array:
    """[B, L + 1]: a training window's items, inputs followed by the last target."""
    last = jnp.where(batch["mask"][:, -1:], batch["targets"][:, -1:], 0)
    return jnp.concatenate([batch["inputs"], last.astype(batch["inputs"].dtype)], axis=1)


class BERT4RecModel(ScoringModel):
    """Cloze loss for training; [MASK] appended to the history for the user state."""

    def user_state(self, params, batch) -> jax.Array:
        """[B, D]: the hidden state at a [MASK] appended after the left-padded history."""
        inputs = batch["inputs"]  # [B, L]
        mask = jnp.full((inputs.shape[0], 1), self.info.vocab_size, inputs.dtype)
        inputs = jnp.concatenate([inputs, mask], axis=1)
        hidden = self.module.apply({"params": params}, inputs, train=False, last_only=True)
        return hidden[:, -1]

    def loss(self, params, batch, rng):
        m = self.config.model
        mask_rng, rng = jax.random.split(rng)
        items = full_sequence(batch)  # [B, L + 1]
        slots, valid = cloze_positions(mask_rng, items, m.mask_prob, m.last_item_share)
        return self.cloze_loss(params, items, slots, valid, rng)

    def cloze_loss(self, params, items, slots, valid, rng):
        """Mean loss of predicting `items` [B, W] at the valid `slots` [B, K], [MASK]ed."""
        drop_rng, loss_rng = jax.random.split(rng)
        masked = slot_mask(slots, valid, items.shape[1])  # [B, W]
        corrupted = jnp.where(masked, self.info.vocab_size, items)
        hidden = self.apply(params, corrupted, train=True, rng=drop_rng)  # [B, W, D]
        picked = jnp.take_along_axis(hidden, slots[..., None], axis=1)  # [B, K, D]
        total, count = next_item_loss(
            self.config.loss,
            picked,
            self.item_table(params),
            jnp.take_along_axis(items, slots, axis=1),  # [B, K]
            valid,
            loss_rng,
            self.item_log_probs,
            vocab_size=self.info.vocab_size,  # never the [MASK] row
        )
        loss = total / jnp.maximum(count, 1.0)
        return loss, {"loss": loss, "tokens": count}


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    m = config.model
    if not 0.0 < m.mask_prob <= 1.0 or not 0.0 <= m.last_item_share <= 1.0:
        raise ConfigError(
            f"model.mask_prob={m.mask_prob} must be in (0, 1] and model.last_item_share="
            f"{m.last_item_share} in [0, 1]."
        )
    module = BERT4Rec(
        vocab_size=info.vocab_size,
        max_len=info.max_len,
        dim=m.dim,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        prenorm=m.prenorm,
        init_std=m.init_std,
        norm_eps=m.norm_eps,
        embedding_norm=m.embedding_norm,
        mlm_head=m.mlm_head,
        dtype=compute_dtype(config.train.compute_dtype),
    )
    return BERT4RecModel(module, config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:bert4rec`."""
    c.model.num_heads = 2
    c.model.mlp_dim = 4 * c.model.dim
    c.model.dropout = 0.1
    c.model.prenorm = False  # BERT's post-LN, as the published replications (HF BertModel)
    c.model.mask_prob = 0.2
    c.loss.name = "full_softmax"  # the cloze task needs the full softmax to be strong


register(ModelSpec(name="bert4rec", build=build, variants={"bert4rec": config_defaults}))
