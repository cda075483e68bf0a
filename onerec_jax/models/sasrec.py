"""SASRec (Kang & McAuley 2018): causal self-attention over the item sequence, tied output."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from onerec_jax.models import layers
from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.training import vocab_parallel
from onerec_jax.training.optim import compute_dtype


class SASRec(nn.Module):
    vocab_size: int
    max_len: int
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    mlp_dim: int = 64
    dropout: float = 0.1
    prenorm: bool = True  # pre-LN (the public SASRec code) or post-LN (the paper's figure)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=self.dim**-0.5)
        self.item_embedding = nn.Embed(
            vocab_parallel.padded_rows(self.vocab_size),  # splits evenly over the mesh
            self.dim,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
        )
        self.position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (self.max_len, self.dim),
        )
        self.blocks = [
            layers.Block(
                self.num_heads,
                self.mlp_dim,
                self.dropout,
                "layernorm",
                self.prenorm,
                "relu",
                dtype=self.dtype,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.final_norm = nn.LayerNorm(dtype=self.dtype, epsilon=1e-6)
        self.dropout_layer = nn.Dropout(self.dropout)

    def __call__(self, inputs, *, train: bool):
        """inputs [B, L] left-padded item ids -> hidden [B, L, D]."""
        length = inputs.shape[1]
        positions = layers.positions_from_end(length)
        x = vocab_parallel.embed(self.item_embedding, inputs)  # [B, L, D]
        x = x * jnp.sqrt(self.dim).astype(self.dtype)
        x = x + self.position_embedding[positions].astype(self.dtype)
        x = self.dropout_layer(x, deterministic=not train)
        x = x * (inputs > 0)[..., None]  # padding slots carry nothing
        mask = layers.attention_mask(inputs, causal=True)
        for block in self.blocks:
            x = block(x, mask, positions, train=train)
        x = self.final_norm(x) if self.prenorm else x
        return x

    def item_table(self):
        return self.item_embedding.embedding  # [V (+ padding rows), D], shared with the input


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    m = config.model
    module = SASRec(
        vocab_size=info.vocab_size,
        max_len=info.max_len,
        dim=m.dim,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        prenorm=m.prenorm,
        dtype=compute_dtype(config.train.compute_dtype),
    )
    return ScoringModel(module, config, info)
