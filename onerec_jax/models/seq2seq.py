"""Encoder-decoder over semantic ids, shared by TIGER (models/tiger.py) and the OneRec
semantic-id decoder (models/onerec_sid.py).

The encoder reads the user's history, either as code tokens (TIGER: each item spelled as its
L+1 codes, optionally after a hashed user token) or as items (OneRec: each item embedded as the
sum of its code embeddings, plus optional item-id and side-feature embeddings). The decoder
generates the next items' codes, level by level, attending to the encoder's output; its
feed-forward layers are dense or a sparse mixture of experts (models/moe.py).

One token vocabulary serves both sides: 0 = padding, 1 = BOS, `2 + offset[l] + c` = code `c` of
level `l` (offset = cumulative codebook sizes). Decoder position `p` predicts a code of level
`p % (L+1)`; its logits cover the code columns of every level and the loss and the beam search
read only that level's slice (`level_columns`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax.errors import ConfigError
from onerec_jax.models import layers
from onerec_jax.models.moe import MoEFeedForward

PAD, BOS, FIRST_CODE = 0, 1, 2


def code_offsets(code_sizes: tuple[int, ...]) -> np.ndarray:
    """[L+1] first column of each level's codes in the decoder's output."""
    return np.cumsum((0, *code_sizes[:-1])).astype(np.int32)


def level_columns(code_sizes: tuple[int, ...], length: int) -> np.ndarray:
    """[length, sum(code_sizes)] bool: decoder position p may emit the codes of level p % (L+1)."""
    offsets, depth = code_offsets(code_sizes), len(code_sizes)
    out = np.zeros((length, sum(code_sizes)), bool)
    for p in range(length):
        level = p % depth
        out[p, offsets[level] : offsets[level] + code_sizes[level]] = True
    return out


class CrossAttention(nn.Module):
    """Queries [B, P, Q, D] (P target positions or beams) attend to one memory [B, S, D] per
    row, under a mask [B, P or 1, S]."""

    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, memory, memory_mask, *, train: bool):
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        shape = (dim, self.num_heads, head_dim)
        kernel = lambda name: self.param(  # noqa: E731
            name, layers.dense_init(("embed", "heads", "kv")), shape
        ).astype(self.dtype)
        q = jnp.einsum("bwqd,dhk->bwqhk", x, kernel("query"))
        k = jnp.einsum("bsd,dhk->bshk", memory, kernel("key"))
        v = jnp.einsum("bsd,dhk->bshk", memory, kernel("value"))
        logits = jnp.einsum("bwqhk,bshk->bwhqs", q, k).astype(jnp.float32) / np.sqrt(head_dim)
        logits = jnp.where(memory_mask[:, :, None, None, :], logits, -1e9)  # [B, W|1, S]
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
        out = jnp.einsum("bwhqs,bshk->bwqhk", weights, v)
        out_init = layers.dense_init(("heads", "kv", "embed"), fan_in_axes=(0, 1))
        w_out = self.param("out", out_init, (self.num_heads, head_dim, dim)).astype(self.dtype)
        return jnp.einsum("bwqhk,hkd->bwqd", out, w_out)


class DecoderBlock(nn.Module):
    """Pre-RMSNorm: causal self-attention, cross-attention, dense or mixture-of-experts FFN."""

    num_heads: int
    mlp_dim: int
    dropout: float
    activation: str = "swiglu"
    num_experts: int = 0  # 0: dense feed-forward
    experts_per_token: int = 2
    expert_capacity: float = 1.25
    expert_group_size: int = 1024
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, tokens, memory, memory_mask, *, train: bool, prev=None):
        """x [B, W, Q, D], tokens [B, W, Q] (PAD = masked) -> (x, MoE statistics or {}).

        `prev` [B, W, P, D]: this block's inputs at P earlier positions (a decoding cache): x
        and tokens are then only the Q new positions, which attend to the earlier ones too."""
        b, w, q, d = x.shape
        drop = nn.Dropout(self.dropout)
        norm = lambda name: nn.RMSNorm(dtype=self.dtype, epsilon=1e-6, name=name)  # noqa: E731
        attn = layers.SelfAttention(self.num_heads, self.dropout, False, self.dtype, name="attn")
        normed = norm("norm_attn")
        if prev is None:
            causal = jnp.tril(jnp.ones((q, q), bool))[None, None]  # [1, 1, Q, Q]
            h = attn(normed(x).reshape(b * w, q, d), causal, None, train=train)
        else:  # queries: the new positions; keys: every position so far
            p = prev.shape[2]
            kv = normed(jnp.concatenate([prev, x], axis=2)).reshape(b * w, p + q, d)
            causal = jnp.tril(jnp.ones((q, p + q), bool), k=p)[None, None]  # [1, 1, Q, P+Q]
            h = attn(kv[:, p:], causal, None, train=train, kv=kv)
        x = x + drop(h.reshape(b, w, q, d), deterministic=not train)
        cross = CrossAttention(self.num_heads, self.dropout, self.dtype, name="cross")
        h = cross(norm("norm_cross")(x), memory, memory_mask, train=train)
        x = x + drop(h, deterministic=not train)
        h = norm("norm_ffn")(x).reshape(b * w, q, d)
        stats = {}
        if self.num_experts:
            moe = MoEFeedForward(
                num_experts=self.num_experts,
                top_k=self.experts_per_token,
                hidden_dim=self.mlp_dim,
                # Capacity in training only: inference is dropless, so a user's recommendations
                # do not depend on who else is in the batch.
                capacity_factor=self.expert_capacity if train else 0.0,
                group_size=self.expert_group_size,
                activation=self.activation,
                dropout=self.dropout,
                dtype=self.dtype,
                name="moe",
            )
            h, stats = moe(h, (tokens > PAD).reshape(b * w, q), train=train)
        else:
            ffn = layers.FeedForward(
                self.mlp_dim, self.activation, self.dropout, self.dtype, name="ffn"
            )
            h = ffn(h, train=train)
        x = x + drop(h.reshape(b, w, q, d), deterministic=not train)
        return x, stats


class EncoderDecoder(nn.Module):
    """History -> memory (`encode`); memory + decoder tokens -> code logits (`decode`)."""

    vocab_size: int  # items + padding
    item_codes: np.ndarray  # [V, L+1] int32 codes >= 0 (row 0 unused)
    code_sizes: tuple[int, ...]  # [L+1] codebook size per level, collision level last
    max_len: int  # history items the encoder sees
    encoder_input: str = "codes"  # "codes" (TIGER) or "items" (OneRec)
    session_items: int = 1  # M: next items the decoder is trained to generate
    dim: int = 64
    num_layers: int = 2  # encoder blocks
    decoder_layers: int = 2
    num_heads: int = 2
    mlp_dim: int = 128
    dropout: float = 0.1
    activation: str = "swiglu"
    num_experts: int = 0
    experts_per_token: int = 2
    expert_capacity: float = 1.25
    expert_group_size: int = 1024
    item_ids: bool = False  # "items": add an item-id embedding to the code embeddings
    item_genres: np.ndarray | None = None  # "items": [V, G] multi-hot genres
    item_year_bucket: np.ndarray | None = None  # "items": [V] year bucket
    n_year_buckets: int = 1
    user_buckets: int = 0  # "codes": hashed user tokens (TIGER), 0 = none
    causal: bool = True  # encoder attends to earlier items only (every slot trains a target)
    positions: str = "learned"  # the encoder's: "learned" (added to the inputs) or "rotary"
    # "items": the encoder's and the dense head's code embeddings are a table of their own, not
    # the decoder's input tokens (False: one table for both)
    separate_item_codes: bool = False
    # "items": the dense head's item vectors hold the genre and year embeddings too, as the
    # encoder's inputs do (False: codes and id embedding only)
    table_side_features: bool = False
    # the decoder's code logits are its state . the code's input-token embedding (+ a bias per
    # code), the output table tied to the input one as in the item models (False: a head of its
    # own)
    tie_code_head: bool = False
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        if self.encoder_input not in ("codes", "items"):
            raise ConfigError(f"encoder_input={self.encoder_input!r}: use 'codes' or 'items'.")
        n_codes = int(sum(self.code_sizes))
        embed_init = nn.with_logical_partitioning(
            nn.initializers.normal(self.dim**-0.5), ("vocab", "embed")
        )
        self.token_embedding = nn.Embed(
            FIRST_CODE + n_codes, self.dim, dtype=self.dtype, embedding_init=embed_init
        )
        if self.separate_item_codes and self.encoder_input == "items":
            self.item_code_embedding = nn.Embed(
                FIRST_CODE + n_codes, self.dim, dtype=self.dtype, embedding_init=embed_init
            )
        depth = len(self.code_sizes)
        enc_len = self.max_len * depth + 1 if self.encoder_input == "codes" else self.max_len
        pos_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed"))
        if self.positions == "learned":
            self.encoder_positions = self.param("encoder_positions", pos_init, (enc_len, self.dim))
        elif self.positions != "rotary":
            raise ConfigError(
                f"model.encoder_positions={self.positions!r}: use 'learned' or 'rotary'."
            )
        self.decoder_positions = self.param(
            "decoder_positions", pos_init, (self.session_items * depth, self.dim)
        )
        side = nn.with_logical_partitioning(nn.initializers.normal(self.dim**-0.5), (None, "embed"))
        if self.item_ids:
            self.id_embedding = nn.Embed(
                self.vocab_size, self.dim, dtype=self.dtype, embedding_init=embed_init
            )
        if self.item_genres is not None:
            self.genre_embedding = self.param(
                "genre_embedding", side, (self.item_genres.shape[1], self.dim)
            )
        if self.item_year_bucket is not None:
            self.year_embedding = self.param(
                "year_embedding", side, (self.n_year_buckets, self.dim)
            )
        if self.user_buckets:
            self.user_embedding = self.param("user_embedding", side, (self.user_buckets, self.dim))
        self.encoder_blocks = [
            layers.Block(
                self.num_heads,
                self.mlp_dim,
                self.dropout,
                "rmsnorm",
                True,
                self.activation,
                self.positions == "rotary",
                self.dtype,
                name=f"encoder_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.decoder_blocks = [
            DecoderBlock(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout=self.dropout,
                activation=self.activation,
                num_experts=self.num_experts,
                experts_per_token=self.experts_per_token,
                expert_capacity=self.expert_capacity,
                expert_group_size=self.expert_group_size,
                dtype=self.dtype,
                name=f"decoder_{i}",
            )
            for i in range(self.decoder_layers)
        ]
        self.encoder_norm = nn.RMSNorm(dtype=self.dtype, epsilon=1e-6)
        self.decoder_norm = nn.RMSNorm(dtype=self.dtype, epsilon=1e-6)
        self.context_projection = nn.Dense(
            self.dim, dtype=self.dtype, kernel_init=layers.dense_init(("embed", None))
        )
        if self.tie_code_head:
            self.head_bias = self.param(
                "head_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                (n_codes,),
            )
        else:
            self.head = nn.Dense(
                n_codes, dtype=self.dtype, kernel_init=layers.dense_init(("embed", "vocab"))
            )
        self.dropout_layer = nn.Dropout(self.dropout)

    def _code_tokens(self, items: jax.Array) -> jax.Array:
        """[...] item ids -> [..., L+1] token ids (PAD for the padding item)."""
        offsets = code_offsets(self.code_sizes)
        tokens = jnp.asarray(self.item_codes + offsets + FIRST_CODE, jnp.int32)[items]
        return jnp.where((items > 0)[..., None], tokens, PAD)

    def memory_slots(self, length: int) -> np.ndarray:
        """[S] the history slot (0..T-1) of each memory token; -1 for the user token."""
        if self.encoder_input == "items":
            return np.arange(length)
        slots = np.arange(length * len(self.code_sizes)) // len(self.code_sizes)
        return np.concatenate([[-1], slots]) if self.user_buckets else slots

    def slot_states(self, memory, positions: int, length: int):
        """[B, P, D] the encoder state of each of the last P history slots (P = 1: the last
        slot, the whole history; P = T: every slot of a causal encoder): the decoder's query
        context, which tells it where "now" is in the window. With code tokens, the mean of the
        slot's L+1 token states, whose residual streams hold the item's code embeddings."""
        if self.encoder_input == "codes":
            depth = len(self.code_sizes)
            per_slot = memory[:, memory.shape[1] - length * depth :]  # without the user token
            memory = per_slot.reshape(memory.shape[0], length, depth, -1).mean(2)  # [B, T, D]
        return memory[:, length - positions : length]

    def memory_mask(self, valid, positions: int, length: int):
        """[B, P, S]: what the decoder position of each of the last P history slots reads:
        slot p reads the memory of slots <= p (P = 1: the last slot reads every real token)."""
        if positions == 1:
            return valid[:, None, :]
        slots = self.memory_slots(length)
        rows = np.arange(length - positions, length)[:, None]
        return valid[:, None, :] & jnp.asarray(slots[None, :] <= rows)

    def encode(self, inputs, user, *, train: bool = False):
        """inputs [B, T] left-padded item ids, user [B] -> (memory [B, S, D], mask [B, S])."""
        b, t = inputs.shape
        if self.encoder_input == "codes":
            tokens = self._code_tokens(inputs).reshape(b, -1)  # [B, T*(L+1)]
            x = self.token_embedding(tokens)
            valid = tokens > PAD
            if self.user_buckets:  # the paper's hashed user id, one token before the history
                u = self.user_embedding[user % self.user_buckets].astype(self.dtype)
                x = jnp.concatenate([u[:, None], x], axis=1)
                valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        else:
            x = self.embed_items(inputs, side=True)  # [B, T, D]
            x, valid = x * (inputs > 0)[..., None], inputs > 0
        length = x.shape[1]
        # Positions count back from the most recent token, as in the item models.
        if self.positions == "learned":
            x = x + self.encoder_positions[layers.positions_from_end(length)].astype(self.dtype)
        x = self.dropout_layer(x, deterministic=not train) * valid[..., None]
        mask = valid[:, None, None, :]  # [B, 1, 1, S] real keys
        if self.causal:  # a token reads the tokens of its own and earlier history slots
            slots = self.memory_slots(t)
            mask = mask & jnp.asarray(slots[None, :] <= slots[:, None])[None, None]
        positions = layers.positions_from_end(length)
        for block in self.encoder_blocks:
            x = block(x, mask, positions, train=train)
        return self.encoder_norm(x), valid

    def level_logits(self, hidden, level: int):
        """hidden [..., D] (`decode(..., hidden=True)`) -> [..., C_level] float32: the head's
        logits of one level's codes only, `self.head(hidden)[..., lo:lo + C_level]` computed
        without the other levels' columns (a decoder position only ever reads its own level)."""
        lo, size = int(code_offsets(self.code_sizes)[level]), int(self.code_sizes[level])
        kernel, bias = self._head_weights()
        kernel, bias = kernel[:, lo : lo + size], bias[lo : lo + size]
        return (jnp.dot(hidden.astype(self.dtype), kernel) + bias).astype(jnp.float32)

    def _head_weights(self):
        """(kernel [D, sum(code_sizes)], bias [sum(code_sizes)]) of the code head: the input
        tokens' code rows, transposed, with `tie_code_head`; else the head's own Dense."""
        if self.tie_code_head:
            n_codes = int(sum(self.code_sizes))
            table = self.token_embedding.embedding[FIRST_CODE : FIRST_CODE + n_codes]
            return table.T.astype(self.dtype), self.head_bias.astype(self.dtype)
        params = self.head.variables["params"]
        kernel = nn.meta.unbox(params["kernel"]).astype(self.dtype)
        return kernel, nn.meta.unbox(params["bias"]).astype(self.dtype)

    def _code_head(self, x):
        """[..., D] -> [..., sum(code_sizes)] float32 logits of every level's codes."""
        if not self.tie_code_head:  # called, not read: this creates the head's parameters
            return self.head(x).astype(jnp.float32)
        kernel, bias = self._head_weights()
        return (jnp.dot(x.astype(self.dtype), kernel) + bias).astype(jnp.float32)

    def decode(self, memory, memory_mask, context, tokens, *, train: bool = False, hidden=False):
        """memory [B, S, D], memory_mask [B, P|1, S], context [B, P|1, D] (`slot_states`),
        tokens [B, P, Q] (BOS first) -> (logits [B, P, Q, sum(code_sizes)] float32, MoE stats);
        with `hidden`, the normalised states [B, P, Q, D] the head reads instead of logits
        (`level_logits` then computes each level's columns alone)."""
        q = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.decoder_positions[:q].astype(self.dtype)
        x = x + self.context_projection(context)[:, :, None, :]
        x = self.dropout_layer(x, deterministic=not train)
        stats = []
        for block in self.decoder_blocks:
            x, s = block(x, tokens, memory, memory_mask, train=train)
            stats.append(s)
        if hidden:
            return self.decoder_norm(x), merge_stats(stats)
        return self._code_head(self.decoder_norm(x)), merge_stats(stats)

    def decode_step(self, memory, memory_mask, context, tokens, cache, level=None):
        """Incremental `decode` (inference): tokens [B, W, Q] the decoder input so far, of which
        `cache` (one [B, W, P, D] array per decoder block: its inputs at the first P positions,
        P < Q) holds the first P -> (logits [B, W, sum(code_sizes)] of the last position, or
        [B, W, C_level] of that level's codes alone with `level`, the cache extended to all Q
        positions)."""
        p, q = cache[0].shape[2], tokens.shape[-1]
        new = tokens[..., p:]
        x = self.token_embedding(new) + self.decoder_positions[p:q].astype(self.dtype)
        x = x + self.context_projection(context)[:, :, None, :]
        extended = []
        for block, prev in zip(self.decoder_blocks, cache, strict=True):
            extended.append(jnp.concatenate([prev, x], axis=2))
            x, _ = block(x, new, memory, memory_mask, train=False, prev=prev)
        last = self.decoder_norm(x[:, :, -1])
        if level is not None:
            return self.level_logits(last, level), extended
        return self._code_head(last), extended

    def __call__(
        self,
        inputs,
        user,
        tokens,
        *,
        train: bool,
        with_states: bool = False,
        hidden=False,
        decoder_slots: int = 0,
        decoder_grad: float = 1.0,
    ):
        """tokens [B, P, Q]: P = 1 (the whole history) or T (causal: slot p reads slots <= p).
        Returns (logits, MoE stats), plus the slot states [B, P, D] with `with_states`; with
        `hidden`, the decoder's normalised states in place of the logits (`decode`). With
        0 < `decoder_slots` < P, the decoder runs on the last `decoder_slots` positions only
        (logits [B, decoder_slots, Q, ...]); the states are still every position's.
        `decoder_grad`: the share of the decoder's gradient that reaches the encoder through the
        memory and slot states (values unchanged; 0: the encoder learns from other losses only)."""
        memory, valid = self.encode(inputs, user, train=train)
        p, t = tokens.shape[1], inputs.shape[1]
        states = self.slot_states(memory, p, t)
        k = decoder_slots if 0 < decoder_slots < p else p
        mask = self.memory_mask(valid, k, t)
        read = lambda x: scale_grad(x, decoder_grad)  # noqa: E731
        logits, stats = self.decode(
            read(memory),
            mask,
            read(states[:, p - k :]),
            tokens[:, p - k :],
            train=train,
            hidden=hidden,
        )
        return (logits, stats, states) if with_states else (logits, stats)

    def embed_items(self, items, side: bool):
        """[...] item ids -> [..., D]: the sum of the item's code embeddings, plus its id
        embedding (`item_ids`), plus (`side`) its genre and year embeddings: an "items" encoder's
        input. The code embeddings are the decoder's input tokens unless
        `separate_item_codes`."""
        table = self.item_code_embedding if self.separate_item_codes else self.token_embedding
        x = table(self._code_tokens(items)).sum(-2)
        if self.item_ids:
            x = x + self.id_embedding(items)
        if side and self.item_genres is not None:
            genres = jnp.asarray(self.item_genres)[items]
            genres = genres / jnp.maximum(genres.sum(-1, keepdims=True), 1.0)
            x = x + (genres @ self.genre_embedding).astype(self.dtype)
        if side and self.item_year_bucket is not None:
            years = jnp.asarray(self.item_year_bucket)[items]
            x = x + self.year_embedding[years].astype(self.dtype)
        return x

    def item_vectors(self):
        """[V, D] every item as the encoder reads it (`embed_items`; its genre and year only
        with `table_side_features`); row 0 (padding) zero: the dense head's item table."""
        items = jnp.arange(self.vocab_size)
        return self.embed_items(items, side=self.table_side_features).at[0].set(0.0)


def scale_grad(x: jax.Array, share: float) -> jax.Array:
    """x in the forward pass; its gradient times `share` in the backward pass."""
    if share == 1.0:
        return x
    frozen = jax.lax.stop_gradient(x)
    return frozen if share == 0.0 else frozen + share * (x - frozen)


def merge_stats(per_layer: list[dict]) -> dict:
    """Mean of the MoE layers' losses and statistics ({} for dense decoders)."""
    per_layer = [s for s in per_layer if s]
    if not per_layer:
        return {}
    return {k: sum(s[k] for s in per_layer) / len(per_layer) for k in per_layer[0]}
