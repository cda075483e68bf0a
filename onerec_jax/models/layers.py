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


def dense_init(names: tuple[str | None, ...], scale: float = 1.0, fan_in_axes=(0,)):
    """Fan-in scaled normal init carrying logical axis names."""
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


class SelfAttention(nn.Module):
    """Multi-head self-attention; optional rotary positions on queries and keys."""

    num_heads: int
    dropout: float = 0.0
    use_rotary: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, *, train: bool):
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(
                f"model.dim={dim} is not divisible by model.num_heads={self.num_heads}"
            )
        head_dim = dim // self.num_heads
        shape = (dim, self.num_heads, head_dim)

        def proj(name):  # [B, L, D] -> [B, L, H, Dh]
            kernel = self.param(name, dense_init(("embed", "heads", "kv")), shape)
            return jnp.einsum("bld,dhk->blhk", x, kernel.astype(self.dtype))

        q, k, v = proj("query"), proj("key"), proj("value")
        if self.use_rotary:
            q, k = rotary(q, positions), rotary(k, positions)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        logits = jnp.where(mask, logits, _NEG)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # [B, H, L, L]
        weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, L, H, Dh]
        out_init = dense_init(("heads", "kv", "embed"), fan_in_axes=(0, 1))
        kernel = self.param("out", out_init, (self.num_heads, head_dim, dim))
        return jnp.einsum("blhk,hkd->bld", out, kernel.astype(self.dtype))


class FeedForward(nn.Module):
    """Position-wise MLP: "relu"/"gelu" (SASRec) or "swiglu" (OneRec, gated)."""

    hidden_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        dim = x.shape[-1]

        def dense(features, names, name):
            return nn.Dense(features, dtype=self.dtype, name=name, kernel_init=dense_init(names))

        if self.activation == "swiglu":
            gate = dense(self.hidden_dim, ("embed", "mlp"), "gate")(x)
            h = nn.silu(gate) * dense(self.hidden_dim, ("embed", "mlp"), "up")(x)
        else:
            act: Callable = {"relu": nn.relu, "gelu": nn.gelu}[self.activation]
            h = act(dense(self.hidden_dim, ("embed", "mlp"), "up")(x))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(dim, ("mlp", "embed"), "down")(h)


def make_norm(kind: str, dtype: Dtype, name: str) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dtype=dtype, name=name, epsilon=1e-6)
    return nn.LayerNorm(dtype=dtype, name=name, epsilon=1e-6)


class Block(nn.Module):
    """One Transformer block, pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x)))."""

    num_heads: int
    mlp_dim: int
    dropout: float
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    prenorm: bool = True
    activation: str = "gelu"
    use_rotary: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, positions, *, train: bool):
        drop = nn.Dropout(self.dropout)
        attn = SelfAttention(self.num_heads, self.dropout, self.use_rotary, self.dtype, name="attn")
        ffn = FeedForward(self.mlp_dim, self.activation, self.dropout, self.dtype, name="ffn")
        norm1 = make_norm(self.norm, self.dtype, "norm_attn")
        norm2 = make_norm(self.norm, self.dtype, "norm_ffn")
        if self.prenorm:
            x = x + drop(attn(norm1(x), mask, positions, train=train), deterministic=not train)
            x = x + drop(ffn(norm2(x), train=train), deterministic=not train)
        else:
            x = norm1(x + drop(attn(x, mask, positions, train=train), deterministic=not train))
            x = norm2(x + drop(ffn(x, train=train), deterministic=not train))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def positions_from_end(length: int) -> jax.Array:
    """[L] distance of each slot from the last (most recent) one: L-1, ..., 1, 0."""
    return jnp.arange(length - 1, -1, -1)
