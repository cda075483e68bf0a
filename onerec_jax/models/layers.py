"""Transformer building blocks shared by the sequence models, with logical axis names.

Sequences are left-padded (item 0); positions count back from the most recent item, so a batch
padded to a bucket narrower than max_len sees the same position for the same item.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
_NEG = -1e9  # attention logit for masked keys: finite, so fully masked rows (padding) stay finite


def dense_init(
    names: tuple[str | None, ...], scale: float = 1.0, fan_in_axes=(0,), std: float = 0.0
):
    """Fan-in scaled normal init (`std` 0) or normal(`std`), carrying logical axis names."""
    if std > 0:
        init = nn.initializers.normal(std)
    else:
        init = nn.initializers.variance_scaling(
            scale, "fan_in", "normal", in_axis=fan_in_axes, out_axis=-1
        )
    return nn.with_logical_partitioning(init, names)


def attention_mask(inputs: jax.Array, causal: bool = True) -> jax.Array:
    """[B, 1, L, L] bool: key is a real item (and not in the future when causal)."""
    valid = inputs > 0  # [B, L]
    mask = valid[:, None, None, :]  # keys
    if causal:
        length = inputs.shape[1]
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    return mask


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding on the last dim of x [B, L, H, Dh] for positions [L]."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [L, Dh/2]
    sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half : 2 * half].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


class RatingHead(nn.Module):
    """The rating a user would give an item (issue 16's second objective), bilinear in the user
    state h [..., D] and the item's embedding e [..., D]: r = (h P) . e + b[item] + mean.

    Bilinear so that ranking by `logit + alpha x rating` stays one dot product per item:
    h . e + alpha ((h P) . e + b) = [h + alpha h P, alpha] . [e, b] (ScoringModel.ranking_state).
    `P` starts at zero and `b` at zero: the first prediction is the training mean.
    """

    vocab_rows: int  # item-table rows (padding rows included)

    @nn.compact
    def __call__(self, dim: int):
        """(P [D, D], b [vocab_rows])."""
        zeros = nn.initializers.zeros
        p = self.param(
            "projection", nn.with_logical_partitioning(zeros, ("embed", "mlp")), (dim, dim)
        )
        b = self.param("bias", nn.with_logical_partitioning(zeros, ("vocab",)), (self.vocab_rows,))
        return p, b


class SelfAttention(nn.Module):
    """Multi-head self-attention; optional rotary positions on queries and keys.

    `kv`: keys and values from another sequence of the same length (default: `x`), as the
    public SASRec's block, whose queries alone are normalised. `use_bias`: biases on the four
    projections (torch's MultiheadAttention has them). `out_init_std` > 0: normal(std) output
    projection instead of fan-in scaling. `qkv_init`: "fan_in" (normal, std dim**-0.5) or
    "torch" (MultiheadAttention's Xavier-uniform over its packed [3 dim, dim] in-projection:
    uniform, std (2 dim)**-0.5).
    """

    num_heads: int
    dropout: float = 0.0
    use_rotary: bool = False
    dtype: Dtype = jnp.float32
    use_bias: bool = False
    out_init_std: float = 0.0
    qkv_init: str = "fan_in"

    @nn.compact
    def __call__(self, x, mask, positions, *, train: bool, kv=None, kv_positions=None):
        """Queries from x [B, Lq, D] at `positions` [Lq]; keys and values from `kv` [B, Lk, D]
        (default x) at `kv_positions` [Lk] (default `positions`); mask [B, 1, Lq, Lk]."""
        kv = x if kv is None else kv
        kv_positions = positions if kv_positions is None else kv_positions
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(
                f"model.dim={dim} is not divisible by model.num_heads={self.num_heads}"
            )
        head_dim = dim // self.num_heads
        shape = (dim, self.num_heads, head_dim)

        names = ("embed", "heads", "kv")
        if self.qkv_init == "torch":  # fan_avg over (dim, 3 dim): variance 1 / (2 dim)
            init = nn.initializers.variance_scaling(
                0.5, "fan_in", "uniform", in_axis=0, out_axis=(1, 2)
            )
            qkv_init = nn.with_logical_partitioning(init, names)
        elif self.qkv_init == "fan_in":
            qkv_init = dense_init(names)
        else:
            raise ValueError(f"model.qkv_init={self.qkv_init!r}: use 'fan_in' or 'torch'")

        def proj(name, inputs):  # [B, L, D] -> [B, L, H, Dh]
            kernel = self.param(name, qkv_init, shape)
            out = jnp.einsum("bld,dhk->blhk", inputs, kernel.astype(self.dtype))
            if self.use_bias:
                bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))
                out = out + self.param(f"{name}_bias", bias_init, shape[1:]).astype(self.dtype)
            return out

        q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
        if self.use_rotary:
            q, k = rotary(q, positions), rotary(k, kv_positions)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        logits = jnp.where(mask, logits, _NEG)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, H, L, L]
        self.sow("intermediates", "attention", weights)  # explain.py; free unless mutable
        weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, L, H, Dh]
        out_init = dense_init(("heads", "kv", "embed"), fan_in_axes=(0, 1), std=self.out_init_std)
        kernel = self.param("out", out_init, (self.num_heads, head_dim, dim))
        out = jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype))
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
            out = out + self.param("out_bias", bias_init, (dim,)).astype(self.dtype)
        return out


class FeedForward(nn.Module):
    """Position-wise MLP: "relu"/"gelu" (SASRec) or "swiglu" (OneRec, gated)."""

    hidden_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    init_std: float = 0.0  # > 0: normal(std) kernels instead of fan-in scaling

    @nn.compact
    def __call__(self, x, *, train: bool):
        dim = x.shape[-1]

        def dense(features, names, name):
            init = dense_init(names, std=self.init_std)
            return nn.Dense(features, dtype=self.dtype, name=name, kernel_init=init)

        if self.activation == "swiglu":
            gate = dense(self.hidden_dim, ("embed", "mlp"), "gate")(x)
            h = nn.silu(gate) * dense(self.hidden_dim, ("embed", "mlp"), "up")(x)
        else:
            act: Callable = {"relu": nn.relu, "gelu": nn.gelu}[self.activation]
            h = act(dense(self.hidden_dim, ("embed", "mlp"), "up")(x))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(dim, ("mlp", "embed"), "down")(h)


def make_norm(kind: str, dtype: Dtype, name: str, epsilon: float = 1e-6) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dtype=dtype, name=name, epsilon=epsilon)
    return nn.LayerNorm(dtype=dtype, name=name, epsilon=epsilon)


class Block(nn.Module):
    """One Transformer block: pre-norm (x + f(norm(x))), post-norm (norm(x + f(x))), or the
    public SASRec code's layout (`layout="sasrec"`): q = norm(x); h = q + attn(q, keys x);
    out = n + ffn(n) with n = norm(h), no dropout on the attention output."""

    num_heads: int
    mlp_dim: int
    dropout: float
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    prenorm: bool = True
    activation: str = "gelu"
    use_rotary: bool = False
    dtype: Dtype = jnp.float32
    layout: str = ""  # "" (prenorm decides) or "sasrec"
    norm_eps: float = 1e-6
    attn_bias: bool = False
    init_std: float = 0.0  # > 0: normal(std) feed-forward and attention-output kernels
    qkv_init: str = "fan_in"  # SelfAttention's query/key/value kernels: "fan_in" or "torch"

    @nn.compact
    def __call__(self, x, mask, positions, *, train: bool, last_only: bool = False):
        """x [B, L, D] -> [B, L, D]; with `last_only`, [B, 1, D]: the last slot's output alone
        (its query attends to every slot; what a user state needs from the last block)."""
        drop = nn.Dropout(self.dropout)
        attn = SelfAttention(
            self.num_heads,
            self.dropout,
            self.use_rotary,
            self.dtype,
            use_bias=self.attn_bias,
            out_init_std=self.init_std,
            qkv_init=self.qkv_init,
            name="attn",
        )
        ffn = FeedForward(
            self.mlp_dim,
            self.activation,
            self.dropout,
            self.dtype,
            init_std=self.init_std,
            name="ffn",
        )
        norm1 = make_norm(self.norm, self.dtype, "norm_attn", self.norm_eps)
        norm2 = make_norm(self.norm, self.dtype, "norm_ffn", self.norm_eps)

        def last(a):  # the query side: every slot, or the last one
            return a[:, -1:] if last_only else a

        q_mask, q_positions = (mask[:, :, -1:], positions[-1:]) if last_only else (mask, positions)

        def attend(q, kv):
            return attn(q, q_mask, q_positions, train=train, kv=kv, kv_positions=positions)

        if self.layout == "sasrec":
            q = norm1(x)
            x = norm2(last(q) + attend(last(q), x))
            x = x + drop(ffn(x, train=train), deterministic=not train)
        elif self.layout:
            raise ValueError(f"Block layout={self.layout!r}: use '' or 'sasrec'")
        elif self.prenorm:
            h = norm1(x)
            x = last(x) + drop(attend(last(h), h), deterministic=not train)
            x = x + drop(ffn(norm2(x), train=train), deterministic=not train)
        else:
            x = norm1(last(x) + drop(attend(last(x), x), deterministic=not train))
            x = norm2(x + drop(ffn(x, train=train), deterministic=not train))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def positions_from_end(length: int) -> jax.Array:
    """[L] distance of each slot from the last (most recent) one: L-1, ..., 1, 0."""
    return jnp.arange(length - 1, -1, -1)
