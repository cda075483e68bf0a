"""OneRec, item head: behaviour sequence -> fused item embeddings -> causal Transformer -> items.

Item embedding layer: an id embedding plus optional side-feature embeddings (genres as a mean of
genre embeddings, release year as a bucket embedding, semantic ids as the sum of one embedding
per code level: the seed's "RQ-VAE as feature encoder" scheme), fused by sum or by concatenation
and a projection. Encoder: pre-RMSNorm blocks with
SwiGLU feed-forward and rotary or learned positions. The prediction layer scores the same fused
item embeddings, so side features reach items with few interactions. An optional auxiliary loss
reconstructs masked input items from the encoder (`model.aux_weight`, `model.aux_mask_prob`).

The other OneRec scheme, a semantic-id decoder recommending by beam search, is its own model:
models/onerec_sid.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from onerec_jax.errors import ConfigError
from onerec_jax.models import layers
from onerec_jax.models.base import DataInfo, ScoringModel, side_arrays
from onerec_jax.models.losses import next_item_loss
from onerec_jax.models.precision import compute_dtype
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel


class OneRecItemHead(nn.Module):
    vocab_size: int  # items + padding; the reconstruction mask token is id vocab_size
    max_len: int
    item_genres: np.ndarray | None = None  # [V, G] multi-hot, or None without genre features
    item_year_bucket: np.ndarray | None = None  # [V] int32, or None without year features
    n_year_buckets: int = 1
    item_codes: np.ndarray | None = None  # [V, L] int32 semantic-id codes, or None without them
    code_sizes: tuple[int, ...] = ()  # [L] codebook size per level
    item_vectors: np.ndarray | None = None  # [V, d] own item vectors (standardised), or None
    fusion: str = "sum"  # "sum" or "concat" (concatenate, then project to dim)
    positions: str = "rotary"  # "rotary", "learned" or "none"
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 128
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32
    rating_head: bool = False  # a RatingHead beside the next-item head (model.rating_weight > 0)

    def setup(self):
        init = nn.with_logical_partitioning(
            nn.initializers.normal(self.dim**-0.5), ("vocab", "embed")
        )
        # Row vocab_size is the [MASK] token of the reconstruction loss, never scored; rows past
        # it pad the table to split evenly over the mesh (parallel/vocab_parallel.py).
        self.id_embedding = nn.Embed(
            vocab_parallel.padded_rows(self.vocab_size + 1),
            self.dim,
            dtype=self.dtype,
            embedding_init=init,
        )
        side = nn.with_logical_partitioning(nn.initializers.normal(self.dim**-0.5), (None, "embed"))
        if self.item_genres is not None:
            self.genre_embedding = self.param(
                "genre_embedding", side, (self.item_genres.shape[1], self.dim)
            )
        if self.item_year_bucket is not None:
            self.year_embedding = self.param(
                "year_embedding", side, (self.n_year_buckets, self.dim)
            )
        if self.item_codes is not None:  # one table, level l's codes at rows offset[l]...
            self.code_embedding = self.param(
                "code_embedding", side, (sum(self.code_sizes), self.dim)
            )
        if self.item_vectors is not None:  # a linear map of the item's own vector
            self.vector_projection = self.param(
                "vector_projection", side, (self.item_vectors.shape[1], self.dim)
            )
        if self.rating_head:  # rows as the id table's: every row item_table can return
            self.rating = layers.RatingHead(vocab_parallel.padded_rows(self.vocab_size + 1))
        if self.fusion == "concat":
            self.fuse = nn.Dense(
                self.dim,
                dtype=self.dtype,
                name="fuse",
                kernel_init=layers.dense_init((None, "embed")),
            )
        elif self.fusion != "sum":
            raise ConfigError(f"model.fusion={self.fusion!r}: use 'sum' or 'concat'.")
        if self.positions == "learned":
            self.position_embedding = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
                (self.max_len, self.dim),
            )
        elif self.positions not in ("rotary", "none"):
            raise ConfigError(f"model.positions={self.positions!r}: use rotary, learned or none.")
        self.blocks = [
            layers.Block(
                self.num_heads,
                self.mlp_dim,
                self.dropout,
                "rmsnorm",
                True,
                "swiglu",
                self.positions == "rotary",
                self.dtype,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.final_norm = nn.RMSNorm(dtype=self.dtype, epsilon=1e-6)
        self.dropout_layer = nn.Dropout(self.dropout)

    def embed_items(self, ids: jax.Array) -> jax.Array:
        """[...] item ids (incl. padding 0 and the mask token) -> fused embeddings [..., D]."""
        return self._fuse([vocab_parallel.embed(self.id_embedding, ids)], ids)

    def _fuse(self, parts: list[jax.Array], ids: jax.Array) -> jax.Array:
        """The id embeddings `parts[0]` of `ids` fused with the items' side features."""
        real = ids < self.vocab_size  # the mask token (and table padding) has no side features
        safe = jnp.where(real, ids, 0)
        if self.item_genres is not None:
            genres = jnp.asarray(self.item_genres)[safe]  # [..., G]
            genres = genres / jnp.maximum(genres.sum(-1, keepdims=True), 1.0)
            parts.append((genres @ self.genre_embedding).astype(self.dtype) * real[..., None])
        if self.item_year_bucket is not None:
            year = jnp.asarray(self.item_year_bucket)[safe]
            parts.append(self.year_embedding[year].astype(self.dtype) * real[..., None])
        if self.item_codes is not None:
            offsets = np.cumsum((0, *self.code_sizes[:-1]))  # [L]
            rows = jnp.asarray(self.item_codes + offsets)[safe]  # [..., L]
            codes = self.code_embedding[rows].sum(-2)  # [..., D]
            parts.append(codes.astype(self.dtype) * (real & (ids > 0))[..., None])
        if self.item_vectors is not None:
            vectors = jnp.asarray(self.item_vectors)[safe]  # [..., d]; row 0 (padding) is 0
            parts.append((vectors @ self.vector_projection).astype(self.dtype) * real[..., None])
        if self.fusion == "concat":
            return self.fuse(jnp.concatenate(parts, axis=-1))
        return sum(parts[1:], parts[0])

    def __call__(self, inputs, *, train: bool, last_only: bool = False):
        """inputs [B, L] left-padded item ids (may hold the mask token) -> hidden [B, L, D]
        ([B, 1, D] with `last_only`: the last slot alone, one query in the last block)."""
        if self.rating_head and self.is_initializing():
            self.rating(self.dim)  # creates the rating head's params with the rest
        length = inputs.shape[1]
        positions = layers.positions_from_end(length)
        x = self.embed_items(inputs)  # [B, L, D]
        if self.positions == "learned":
            x = x + self.position_embedding[positions].astype(self.dtype)
        x = self.dropout_layer(x, deterministic=not train)
        x = x * (inputs > 0)[..., None]
        mask = layers.attention_mask(inputs, causal=True)
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            x = block(x, mask, positions, train=train, last_only=last)
        return self.final_norm(x)

    def last_state(self, inputs):
        """[B, D]: the state at the last slot of left-padded inputs (`ScoringModel.user_state`)."""
        return self(inputs, train=False, last_only=True)[:, -1]

    def item_table(self):
        """[V, D] fused embeddings of every item (row 0 = padding): the prediction layer.

        On a vocab-split table: all its rows, fused row by row on their own devices (rows >= V,
        the mask token and padding, are not items).
        """
        table = self.id_embedding.embedding
        if not vocab_parallel.split_axes(table):
            return self.embed_items(jnp.arange(self.vocab_size))
        fused = self._fuse([table.astype(self.dtype)], jnp.arange(table.shape[0]))
        return nn.with_logical_constraint(fused, ("vocab", "embed"))

    def rating_parts(self):
        """(P [D, D], b [id-table rows]) of the rating head (layers.RatingHead)."""
        return self.rating(self.dim)


class OneRecItemModel(ScoringModel):
    """Next-item loss plus the optional masked-input reconstruction loss."""

    def ranking_table(self, params):
        """`ScoringModel.ranking_table`; with model.cold_content_only (and sum fusion) the rows
        of items no training interaction reached are their side features alone: such an id row
        was only ever a softmax negative, pushed down, and would bury the item's content."""
        table = super().ranking_table(params)
        if not self.config.model.get("cold_content_only", False) or self.module.fusion != "sum":
            return table
        rows, dim = table.shape[0], self.module.dim
        untrained = np.zeros(rows, np.float32)
        counts = np.asarray(self.info.item_counts)[:rows]
        untrained[1 : len(counts)] = counts[1:] == 0
        ids = params["id_embedding"]["embedding"][:rows].astype(table.dtype)
        return table.at[:, :dim].add(-jnp.asarray(untrained)[:, None] * ids)

    def loss(self, params, batch, rng):
        loss, metrics = super().loss(params, batch, rng)
        m = self.config.model
        if m.aux_weight <= 0:
            return loss, metrics
        mask_rng, drop_rng, loss_rng = jax.random.split(jax.random.fold_in(rng, 1), 3)
        inputs = batch["inputs"]
        masked = (jax.random.uniform(mask_rng, inputs.shape) < m.aux_mask_prob) & (inputs > 0)
        corrupted = jnp.where(masked, self.info.vocab_size, inputs)  # the [MASK] token
        hidden = self.encode(params, corrupted, drop_rng)
        table = self.item_table(params)
        total, count = next_item_loss(
            self.config.loss,
            hidden,
            table,
            inputs,
            masked,
            loss_rng,
            self.item_log_probs,
            vocab_size=self.info.vocab_size,
        )
        aux = total / jnp.maximum(count, 1.0)
        metrics = {**metrics, "next_item_loss": loss, "aux_loss": aux}
        total_loss = loss + m.aux_weight * aux
        metrics["loss"] = total_loss
        return total_loss, metrics


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    m = config.model
    if m.head != "items":
        raise ConfigError(f"model.head={m.head!r}: use 'items' or 'semantic_ids'.")
    side = side_arrays(config, info)  # checks the names; skips what the dataset lacks
    codes = info.item_codes if "semantic_ids" in m.side_features else None
    if "semantic_ids" in m.side_features and codes is None:
        raise ConfigError(
            "model.side_features has semantic_ids but model.semantic_ids names no ids: run "
            "`--mode tokenize --workdir DIR` and set --config.model.semantic_ids=DIR."
        )
    module = OneRecItemHead(
        vocab_size=info.vocab_size,
        max_len=info.max_len,
        **side,
        item_codes=None if codes is None else np.asarray(codes, np.int32),
        code_sizes=info.code_sizes if codes is not None else (),
        fusion=m.fusion,
        positions=m.positions,
        dim=m.dim,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        dtype=compute_dtype(config.train.compute_dtype),
        rating_head=m.get("rating_weight", 0.0) > 0,
    )
    return OneRecItemModel(module, config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:onerec`: the item head."""
    c.model.num_heads = 2
    c.model.mlp_dim = 2 * c.model.dim
    # Every window, not only the latest: ml-latest-small validation NDCG@10 0.0845 +- 0.0009
    # (2 seeds) against 0.0733 (1 seed); not yet measured on ML-100K (BENCHMARKS.md).
    c.data.windows = "all"


def with_semantic_id_features(c: ml_collections.ConfigDict) -> None:
    """`:onerec_sidfeat`: the item head with semantic-id inputs."""
    config_defaults(c)
    c.model.side_features = (*c.model.side_features, "semantic_ids")


def reads_semantic_ids(config: ml_collections.ConfigDict) -> bool:
    return "semantic_ids" in tuple(config.model.side_features)


register(
    ModelSpec(
        name="onerec",
        build=build,
        variants={"onerec": config_defaults, "onerec_sidfeat": with_semantic_id_features},
        reads_semantic_ids=reads_semantic_ids,
    )
)
