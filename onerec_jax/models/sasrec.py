"""SASRec (Kang & McAuley 2018): causal self-attention over the item sequence, tied output."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from onerec_jax.models import layers
from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.models.precision import compute_dtype
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel


class SASRec(nn.Module):
    vocab_size: int
    max_len: int
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    mlp_dim: int = 64
    dropout: float = 0.1
    prenorm: bool = True  # pre-LN or post-LN (the paper's figure); layout "" only
    layout: str = "sasrec"  # "sasrec": the public SASRec code's block (layers.Block); "": prenorm
    init_std: float = 0.02  # normal(std) embeddings and kernels (0: dim**-0.5 / fan-in)
    norm_eps: float = 1e-8  # LayerNorm epsilon
    attn_bias: bool = True  # biases on the attention projections
    qkv_init: str = "fan_in"  # query/key/value kernels: fan-in normal or "torch" (Xavier-uniform)
    positions: str = "start"  # learned positions counted from the first item or from the "end"
    dtype: jnp.dtype = jnp.float32
    rating_head: bool = False  # a RatingHead beside the next-item head (model.rating_weight > 0)

    def setup(self):
        std = self.init_std if self.init_std > 0 else self.dim**-0.5
        init = _zero_padding_row(nn.initializers.normal(stddev=std))
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
                layout=self.layout,
                norm_eps=self.norm_eps,
                attn_bias=self.attn_bias,
                init_std=self.init_std,
                qkv_init=self.qkv_init,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.final_norm = nn.LayerNorm(dtype=self.dtype, epsilon=self.norm_eps)
        self.dropout_layer = nn.Dropout(self.dropout)
        if self.rating_head:
            self.rating = layers.RatingHead(vocab_parallel.padded_rows(self.vocab_size))

    def __call__(self, inputs, *, train: bool, last_only: bool = False):
        """inputs [B, L] left-padded item ids -> hidden [B, L, D] ([B, 1, D] with `last_only`:
        the last slot's state alone, its last block computing that one query)."""
        if self.rating_head and self.is_initializing():
            self.rating(self.dim)  # creates the rating head's params with the rest
        length = inputs.shape[1]
        positions = layers.positions_from_end(length)  # [L]; rotary-free blocks ignore them
        if self.positions == "start":  # [B, L]: 0 at each row's first real item
            first = length - jnp.sum(inputs > 0, axis=1, keepdims=True)
            learned = jnp.maximum(jnp.arange(length)[None, :] - first, 0)
        elif self.positions == "end":
            learned = positions
        else:
            raise ValueError(f"model.positions={self.positions!r}: use 'start' or 'end' (SASRec)")
        x = vocab_parallel.embed(self.item_embedding, inputs)  # [B, L, D]
        x = x * jnp.sqrt(self.dim).astype(self.dtype)
        x = x + self.position_embedding[learned].astype(self.dtype)
        x = self.dropout_layer(x, deterministic=not train)
        x = x * (inputs > 0)[..., None]  # padding slots carry nothing
        mask = layers.attention_mask(inputs, causal=True)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, positions, train=train, last_only=last)
        x = self.final_norm(x) if self.prenorm or self.layout else x
        return x

    def last_state(self, inputs):
        """[B, D]: the state at the last slot of left-padded inputs (`ScoringModel.user_state`)."""
        return self(inputs, train=False, last_only=True)[:, -1]

    def item_table(self):
        return self.item_embedding.embedding  # [V (+ padding rows), D], shared with the input

    def rating_parts(self):
        """(P [D, D], b [V (+ padding rows)]) of the rating head (layers.RatingHead)."""
        return self.rating(self.dim)


def _zero_padding_row(init):
    """`init` with row 0 (the padding item) set to zero, as torch's `padding_idx` does."""

    def zeroed(rng, shape, dtype=jnp.float32):
        return init(rng, shape, dtype).at[0].set(0)

    return zeroed


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
        layout=m.block,
        init_std=m.init_std,
        norm_eps=m.norm_eps,
        attn_bias=m.attn_bias,
        qkv_init=m.get("qkv_init", "fan_in"),
        positions=m.position_origin,
        dtype=compute_dtype(config.train.compute_dtype),
        rating_head=m.get("rating_weight", 0.0) > 0,
    )
    return ScoringModel(module, config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:sasrec` (the default variant): the base config's model fields are SASRec's."""
    del c


register(ModelSpec(name="sasrec", build=build, variants={"sasrec": config_defaults}))
