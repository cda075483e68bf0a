"""Sparse mixture-of-experts feed-forward layer (Switch/GShard routing), a drop-in for FeedForward.

Each real token picks its `top_k` experts by router probability; assignments are served in
GShard's priority order (every token's 1st choice before any 2nd choice, then by token order)
until an expert holds `capacity` of them, and the rest are dropped: those tokens get no
contribution from that expert (0 output if all their choices drop), so the caller's residual
passes them through. Tokens are routed in groups of `group_size` (GShard), each group with its
own capacity. Dispatch and combine are gathers into and out of fixed-size expert buffers
[E, groups * C, D] (fixed shapes under jit, O(N * k * D) work rather than the O(N * E * C * D)
of one-hot einsums); the expert axis of the weights and buffers is named "expert", which the
default rules shard over the "model" mesh axis. With `capacity_factor <= 0` (dropless, used at
inference) every expert runs on every token and the gates pick: exact, E times the FFN work.

Gates: with top_k > 1, the chosen experts' probabilities renormalised to sum 1 over the chosen k
(before capacity; a dropped assignment just loses its term). With top_k == 1 the raw
probability is kept, as in Switch: a renormalised single gate would be 1 and the router would
get no gradient from the task loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from onerec_jax.errors import ConfigError

_ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "gelu": nn.gelu}


def expert_init(names: tuple[str | None, ...]):
    """Fan-in scaled normal init for [E, in, out] weights: each expert's slice as a Dense."""
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=1, out_axis=2, batch_axis=(0,)
    )
    return nn.with_logical_partitioning(init, names)


def buffer_capacity(capacity_factor: float, n_tokens: int, top_k: int, num_experts: int) -> int:
    """Static slots per expert for a call of `n_tokens` (real or padding) tokens.

    The capacity limit proper depends on the number of real tokens, known only at run time; it
    never exceeds this buffer, nor `n_tokens` (a token picks an expert at most once).
    """
    if capacity_factor <= 0:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / num_experts)))


class MoEFeedForward(nn.Module):
    """Top-k routed experts, each a FeedForward of width `hidden_dim`; returns (y, stats)."""

    num_experts: int  # E
    top_k: int  # experts per token
    hidden_dim: int  # each expert's hidden width
    # Slots per expert = ceil(capacity_factor * N_real * top_k / E); <= 0: no limit.
    capacity_factor: float = 1.25
    activation: str = "swiglu"  # "swiglu" (gated), "gelu" or "relu"
    dropout: float = 0.0  # on the experts' hidden activations
    router_bias: bool = False  # learned per-expert router bias
    # Tokens are routed in groups of this many (GShard), each with its own capacity, so the
    # dispatch tensors grow as N * group_size rather than N^2; 0: one group of all tokens.
    group_size: int = 0
    dtype: jnp.dtype = jnp.float32  # expert compute dtype; the router is always float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        """Route and run the experts.

        Args:
          x: [B, T, D] token features.
          mask: [B, T] bool, True for real tokens; padding is never routed and takes no capacity.
          train: enables dropout (needs a "dropout" rng when dropout > 0).

        Returns:
          y: [B, T, D], 0 for padding and for tokens whose every assignment was dropped.
          stats: "load_balance_loss" (E * sum_e f_e * P_e over real tokens; f_e = share of the
            N_real * top_k routed assignments, before capacity, that go to e; P_e = mean router
            probability; 1.0 when either is uniform), "router_z_loss" (mean over real tokens of
            logsumexp(router logits)^2), "tokens_per_expert" [E] float32 (assignments kept),
            "dropped_share" (share of the N_real * top_k assignments dropped by capacity).
        """
        n_exp, k = self.num_experts, self.top_k
        if not 1 <= k <= n_exp:
            raise ConfigError(f"moe top_k={k} must be between 1 and num_experts={n_exp}")
        if self.activation not in ("swiglu", *_ACTIVATIONS):
            raise ConfigError(
                f"unknown moe activation {self.activation!r}: use swiglu, gelu or relu"
            )
        batch, length, dim = x.shape
        n = batch * length
        xf = x.reshape(n, dim)  # [N, D]
        real = mask.reshape(n).astype(jnp.float32)  # [N]
        n_real = jnp.sum(real)

        # Router, in float32 whatever the compute dtype: top-k and softmax are precision-sensitive.
        logits = nn.Dense(
            n_exp,
            use_bias=self.router_bias,
            dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal"), ("embed", None)
            ),
            name="router",
        )(xf.astype(jnp.float32))  # [N, E]
        probs = jax.nn.softmax(logits, axis=-1)
        top_probs, expert_index = jax.lax.top_k(probs, k)  # [N, K]; ties: lowest expert first
        gates = top_probs / jnp.sum(top_probs, -1, keepdims=True) if k > 1 else top_probs
        self.sow("intermediates", "expert_index", expert_index)

        if self.capacity_factor <= 0:  # dropless: every expert on every token, gated
            h = jnp.broadcast_to(xf.astype(self.dtype), (n_exp, n, dim))
            expert_out = self._experts(h, train=train)  # [E, N, D]
            chosen_f = jax.nn.one_hot(expert_index, n_exp) * real[:, None, None]  # [N, K, E]
            weight = jnp.einsum("nke,nk->ne", chosen_f, gates)
            y = jnp.einsum("ne,end->nd", weight.astype(self.dtype), expert_out)
            kept = real[:, None] > 0  # [N, K]
            self.sow("intermediates", "kept", kept)
        else:
            y, kept, chosen_f = self._dispatch(xf, real, expert_index, gates, train=train)

        assignments = n_real * k
        routed_share = jnp.sum(chosen_f, axis=(0, 1)) / jnp.maximum(assignments, 1.0)  # [E] f_e
        mean_prob = jnp.sum(probs * real[:, None], 0) / jnp.maximum(n_real, 1.0)  # [E] P_e
        z = jax.nn.logsumexp(logits, axis=-1)  # [N]
        tokens_per_expert = jnp.einsum("nke,nk->e", chosen_f, kept.astype(jnp.float32))
        stats = {
            "load_balance_loss": n_exp * jnp.sum(routed_share * mean_prob),
            "router_z_loss": jnp.sum(real * z**2) / jnp.maximum(n_real, 1.0),
            "tokens_per_expert": tokens_per_expert,
            "dropped_share": (assignments - jnp.sum(tokens_per_expert))
            / jnp.maximum(assignments, 1.0),
        }
        return y.reshape(batch, length, dim).astype(x.dtype), stats

    def _dispatch(self, xf, real, expert_index, gates, *, train: bool):
        """Capacity-limited routing in groups of `group_size` tokens: (y [N, D], kept [N, K],
        chosen [N, K, E] one-hot of real tokens' choices)."""
        n_exp, k, (n, dim) = self.num_experts, self.top_k, xf.shape
        size = n if self.group_size <= 0 else min(self.group_size, n)
        groups = -(-n // size)
        pad = groups * size - n
        if pad:  # padding tokens: not real, never routed
            xf = jnp.concatenate([xf, jnp.zeros((pad, dim), xf.dtype)])
            real = jnp.concatenate([real, jnp.zeros((pad,), real.dtype)])
            expert_index = jnp.concatenate([expert_index, jnp.zeros((pad, k), expert_index.dtype)])
            gates = jnp.concatenate([gates, jnp.zeros((pad, k), gates.dtype)])
        rg = real.reshape(groups, size)
        # Position of each assignment in its expert's queue within its group, in priority order
        # (choice, then token).
        chosen = jax.nn.one_hot(expert_index, n_exp, dtype=jnp.int32) * (real > 0)[:, None, None]
        chosen = chosen.reshape(groups, size, k, n_exp)  # [G, S, K, E]
        order = chosen.transpose(0, 2, 1, 3).reshape(groups, k * size, n_exp)
        queue = jnp.cumsum(order, axis=1) - 1
        queue = queue.reshape(groups, k, size, n_exp).transpose(0, 2, 1, 3)
        position = jnp.sum(queue * chosen, -1)  # [G, S, K]
        slots = buffer_capacity(self.capacity_factor, size, k, n_exp)
        n_real = jnp.sum(rg, axis=1)[:, None, None]  # [G, 1, 1] real tokens per group
        limit = jnp.ceil(self.capacity_factor * n_real * k / n_exp)  # over real tokens only
        kept = (rg[..., None] > 0) & (position < jnp.minimum(limit, slots))  # [G, S, K]

        # Each kept assignment owns slot g * C + position of its expert's buffer [E, G * C]:
        # gather the tokens into the buffers, run the experts, gather the outputs back. O(N * K
        # * D) work, where one-hot [N, E, C] dispatch einsums cost O(N * E * C * D).
        kept = kept.reshape(groups * size, k)  # [N', K]
        slot = (jnp.arange(groups)[:, None, None] * slots + position).reshape(groups * size, k)
        slot = jnp.where(kept, slot, groups * slots)  # dropped: out of range
        token = jnp.broadcast_to(jnp.arange(groups * size)[:, None], (groups * size, k))
        owner = jnp.full((n_exp, groups * slots), groups * size, jnp.int32)  # empty: zero row
        owner = owner.at[expert_index, slot].set(token, mode="drop")  # [E, G * C]
        x_rows = jnp.concatenate([xf, jnp.zeros((1, dim), xf.dtype)]).astype(self.dtype)
        expert_in = nn.with_logical_constraint(x_rows[owner], ("expert", None, "embed"))
        expert_out = self._experts(expert_in, train=train)  # [E, G * C, D]
        picked = expert_out[expert_index, jnp.minimum(slot, groups * slots - 1)]  # [N', K, D]
        weight = (gates * kept).astype(self.dtype)  # [N', K]
        y = jnp.einsum("nk,nkd->nd", weight, picked)[:n]
        chosen_f = chosen.astype(jnp.float32).reshape(groups * size, k, n_exp)[:n]
        self.sow("intermediates", "kept", kept[:n])
        return y, kept[:n], chosen_f

    def _experts(self, h: jax.Array, *, train: bool) -> jax.Array:
        """All experts' FeedForward on their slots: [E, C, D] -> [E, C, D]."""
        n_exp, dim = self.num_experts, h.shape[-1]
        up_shape, down_shape = (n_exp, dim, self.hidden_dim), (n_exp, self.hidden_dim, dim)
        up_names, down_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")

        def up(name):  # [E, C, D] -> [E, C, H]
            kernel = self.param(name, expert_init(up_names), up_shape)
            return jnp.einsum("ecd,edh->ech", h, kernel.astype(self.dtype))

        if self.activation == "swiglu":
            hidden = nn.silu(up("wg")) * up("wi")
        else:
            hidden = _ACTIVATIONS[self.activation](up("wi"))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=not train)
        wo = self.param("wo", expert_init(down_names), down_shape)
        out = jnp.einsum("ech,ehd->ecd", hidden, wo.astype(self.dtype))
        return nn.with_logical_constraint(out, ("expert", None, "embed"))
