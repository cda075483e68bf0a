"""GRU4Rec (Hidasi et al. 2016): a recurrent encoder over the item sequence, tied output table.

Item embedding -> dropout -> GRU layer(s) -> a dense projection back to the embedding space,
scored against the input embeddings with the shared next-item loss (full or sampled softmax,
the cross-entropy variant of Hidasi & Karatzoglou 2018), as in RecBole's GRU4Rec. Sequences are
left-padded: the recurrent state is held through padding slots (so it stays at its zero start), and
a window padded to any width gives the same states at its real positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from onerec_jax.models import layers
from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.models.precision import compute_dtype
from onerec_jax.models.registry import ModelSpec, register
from onerec_jax.parallel import vocab_parallel

# The recurrent weights are tiny next to the item table and are used at every time step, so
# they stay replicated: sharding them would put collectives inside the sequential scan.
_REPLICATED = (None, None)


class HeldGRUCell(nn.Module):
    """A GRU step that keeps its previous state where the input slot is padding."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, xs):
        x, valid = xs  # [B, D_in], [B] bool
        cell = nn.GRUCell(
            self.features,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _REPLICATED),
            recurrent_kernel_init=nn.with_logical_partitioning(
                nn.initializers.orthogonal(), _REPLICATED
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)),
            name="cell",
        )
        new, _ = cell(carry, x)
        carry = jnp.where(valid[:, None], new.astype(carry.dtype), carry)  # [B, H]
        return carry, carry


# Scanned over the length axis (1) of [B, L, ...]; one set of weights for every step.
ScannedGRU = nn.scan(
    HeldGRUCell,
    variable_broadcast="params",
    split_rngs={"params": False},
    in_axes=1,
    out_axes=1,
)


class GRU4Rec(nn.Module):
    vocab_size: int
    dim: int = 64  # embedding width = GRU hidden width
    num_layers: int = 1
    dropout: float = 0.2
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=self.dim**-0.5)
        self.item_embedding = nn.Embed(
            vocab_parallel.padded_rows(self.vocab_size),  # splits evenly over the mesh
            self.dim,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
        )
        self.grus = [
            ScannedGRU(self.dim, dtype=self.dtype, name=f"gru_{i}") for i in range(self.num_layers)
        ]
        self.dropout_layer = nn.Dropout(self.dropout)
        # GRU states lie in (-1, 1); the projection lets the logits take any scale.
        self.output = nn.Dense(
            self.dim, dtype=self.dtype, kernel_init=layers.dense_init((None, "embed"))
        )

    def __call__(self, inputs, *, train: bool):
        """inputs [B, L] left-padded item ids -> hidden [B, L, D]."""
        valid = inputs > 0  # [B, L]
        x = vocab_parallel.embed(self.item_embedding, inputs)  # [B, L, D]
        carry0 = jnp.zeros((inputs.shape[0], self.dim), x.dtype)  # [B, D]
        for gru in self.grus:
            x = self.dropout_layer(x, deterministic=not train)
            _, x = gru(carry0, (x, valid))  # [B, L, D]; zeros on leading padding
        x = self.dropout_layer(x, deterministic=not train)
        x = self.output(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def last_state(self, inputs):
        """[B, D]: the state at the last slot of left-padded inputs (`ScoringModel.user_state`)."""
        return self(inputs, train=False)[:, -1]

    def item_table(self):
        return self.item_embedding.embedding  # [V (padded), D], shared with the input


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    m = config.model
    module = GRU4Rec(
        vocab_size=info.vocab_size,
        dim=m.dim,
        num_layers=m.num_layers,
        dropout=m.dropout,
        dtype=compute_dtype(config.train.compute_dtype),
    )
    return ScoringModel(module, config, info)


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:gru4rec`."""
    c.model.num_layers = 1


register(ModelSpec(name="gru4rec", build=build, variants={"gru4rec": config_defaults}))
