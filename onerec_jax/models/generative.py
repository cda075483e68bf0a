"""The contract of generative models: recommend by generating the next item's semantic id.

`GenerativeModel` wraps an `EncoderDecoder` (models/seq2seq.py) into the trainer's pure functions:
`init`, `loss(params, batch, rng)` (teacher-forced cross-entropy over the next M items' code
tokens, each position restricted to its level's codes, optional label smoothing, plus the MoE
load-balancing term) and, where a scoring model has `user_state`,
`generate(params, batch, history)`: the top-K distinct, valid, unseen items by constrained beam
search (models/beam_search.py). The evaluator ranks each target by its score within that list,
ties counting half as everywhere (evaluation/ranking.py `rank_in_list`; past the list: rank
n_items + 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from onerec_jax.errors import ConfigError
from onerec_jax.models import losses, seq2seq
from onerec_jax.models.base import DataInfo, Model, item_log_probs
from onerec_jax.models.beam_search import beam_search, seen_mask
from onerec_jax.models.precision import compute_dtype
from onerec_jax.models.registry import CODE_WINDOWS, GENERATIVE, ModelSpec


class GenerativeModel(Model):
    """An encoder-decoder over semantic ids: trained with teacher forcing, recommends by
    constrained beam search (`generate`). Registered with kind GENERATIVE and CODE_WINDOWS
    batches (models/registry.py); a new user is served from their items (TIGER hashes user 0)."""

    constant_names = ("valid", "next_prefix", "loss_valid", "item_log_probs")  # tables, logQ

    def __init__(self, module, config: ml_collections.ConfigDict, info: DataInfo):
        super().__init__(module, config, info)
        sem = info.semantic_ids
        self.code_sizes = tuple(int(s) for s in sem.codebook_sizes)  # [L+1]
        self.depth = len(self.code_sizes)
        self.offsets = seq2seq.code_offsets(self.code_sizes)
        valid, next_prefix = sem.prefix_tables().stacked()
        self.valid, self.next_prefix = jnp.asarray(valid), jnp.asarray(next_prefix)
        # Each item's prefix ids: beam search prunes prefixes whose items the user has all seen.
        self.item_prefixes = jnp.asarray(sem.item_prefixes())
        # Teacher-forced code scores (`code_log_probs`): each item's codes, and its prefix id
        # before each level (level 0: the empty prefix) [L+1, V]
        self.item_codes = jnp.asarray(np.maximum(sem.codes, 0), jnp.int32)  # [V, L+1]
        self.prefixes_before = jnp.concatenate(
            [jnp.zeros((1, len(sem.codes)), jnp.int32), self.item_prefixes]
        )
        self.session_items = int(config.model.session_items)
        # The decoder's training positions per window: the last model.decoder_slots (0: all)
        self.decoder_slots = int(config.model.get("decoder_slots", 0))
        if self.decoder_slots < 0:
            raise ConfigError(
                f"model.decoder_slots={self.decoder_slots}: use 0 (every target position of a "
                "window) or a count >= 1 (the decoder trains on the last that many)."
            )
        self.k = int(config.eval.k)
        self.beam = int(config.eval.beam) or self.k  # 0: as wide as the list
        if self.beam < 1 or self.k < 1:
            raise ConfigError(
                f"eval.beam={config.eval.beam}, eval.k={self.k}: use eval.k >= 1 and eval.beam "
                ">= 1 (0: eval.k, which fills every list)."
            )
        if self.beam < self.k:
            logging.warning(
                "eval.beam=%d < eval.k=%d: a user's list can hold fewer than %d items, and then "
                "HR/NDCG/MRR@K for K > %d undercount; set eval.beam >= eval.k (or 0) to fill it.",
                self.beam,
                self.k,
                self.k,
                self.beam,
            )
        self.ranking = f"beam search, width {self.beam}"
        # Train as we decode: each level's softmax over the codes valid after the prefix, and
        # beam search normalised the same way (loss.valid_codes_only).
        self.valid_only = bool(config.loss.valid_codes_only)
        # The valid codes the loss normalises over: every item's (the beam's tables), or, with
        # loss.untrained_negatives=False, only those of items with a training interaction.
        counts = np.asarray(info.item_counts)
        self.loss_valid = self.valid
        if not config.loss.get("untrained_negatives", True):
            self.loss_valid = jnp.asarray(trained_valid(sem, counts > 0))
        # Cold items (no training interaction) take at most eval.cold_share of each list, each
        # scored by its content codes (`_with_cold`).
        self.cold_share = float(config.eval.get("cold_share", 0.0))
        if not 0.0 <= self.cold_share <= 1.0:
            raise ConfigError(f"eval.cold_share={self.cold_share}: use a share in [0, 1].")
        self.cold_items = np.flatnonzero(counts[1:] == 0).astype(np.int32) + 1  # [N] dense ids
        # added to a cold item's log-probability before it competes with the beam's: a decoder
        # trained on warm items gives cold codes far lower log-probabilities than warm ones
        self.cold_bonus = float(config.eval.get("cold_bonus", 0.0))
        # A dense item head on the encoder's slot states, trained jointly (loss.dense_weight),
        # re-ranks the beam's items: score = code log-probability + rerank_weight x the dense
        # head's log-probability of the item (eval.rerank_weight; OneRec and LIGER both join a
        # generative and a dense signal).
        self.dense_weight = float(config.loss.get("dense_weight", 0.0))
        self.decoder_weight = float(config.loss.get("decoder_weight", 1.0))
        # The share of the decoder's gradient that reaches the encoder (0: the dense head alone
        # trains the encoder, and the decoder reads its states as they are)
        self.decoder_grad = float(config.loss.get("decoder_encoder_grad", 1.0))
        if not 0.0 <= self.decoder_grad <= 1.0:
            raise ConfigError(
                f"loss.decoder_encoder_grad={self.decoder_grad}: use a share in [0, 1]."
            )
        self.rerank_weight = float(config.eval.get("rerank_weight", 0.0))
        # The dense head's own best unseen items join the beam's as candidates of the re-ranker,
        # each scored by its codes' log-probability as the beam would have (eval.dense_candidates;
        # 0: the beam's items alone).
        self.dense_candidates = int(config.eval.get("dense_candidates", 0))
        self.item_log_probs = item_log_probs(info)  # a sampled dense loss's logQ
        # Beam search decodes incrementally, keeping each beam's decoder inputs per block (the
        # same scores as re-reading the whole prefix at every level, at a fraction of the work)
        self.decoder_cache = True
        if self.dense_weight < 0 or self.rerank_weight < 0 or self.decoder_weight < 0:
            raise ConfigError(
                f"loss.dense_weight={self.dense_weight}, eval.rerank_weight="
                f"{self.rerank_weight}, loss.decoder_weight={self.decoder_weight}: use weights "
                ">= 0."
            )
        if not (self.decoder_weight or self.dense_weight):
            raise ConfigError(
                "loss.decoder_weight=0 and loss.dense_weight=0: nothing is trained; set one > 0."
            )
        if self.dense_candidates < 0 or (self.dense_candidates and not self.rerank_weight):
            raise ConfigError(
                f"eval.dense_candidates={self.dense_candidates}: use 0, or a count >= 1 with "
                "eval.rerank_weight > 0 (the dense head's candidates are re-ranked with it)."
            )
        if self.rerank_weight and not self.dense_weight:
            raise ConfigError(
                "eval.rerank_weight > 0 re-ranks with a dense head that only loss.dense_weight > "
                "0 trains: set both (or neither)."
            )

    def _decoder_io(self, target_codes, mask):
        """[B, P, M, L+1] codes, [B, P, M] mask -> decoder tokens and token mask, each
        [B, P, M*(L+1)]: tokens are BOS then the targets' code tokens shifted right."""
        b, p = target_codes.shape[:2]
        columns = (target_codes + self.offsets).reshape(b, p, -1)  # code id over all levels
        real = jnp.repeat(mask, self.depth, axis=-1).reshape(b, p, -1)
        tokens = jnp.where(real, columns + seq2seq.FIRST_CODE, seq2seq.PAD)
        bos = jnp.full((b, p, 1), seq2seq.BOS, tokens.dtype)
        return jnp.concatenate([bos, tokens[..., :-1]], axis=-1), real

    def init(self, rng, batch):
        b = batch["inputs"].shape[0]
        tokens = jnp.full((b, 1, self.session_items * self.depth), seq2seq.BOS, jnp.int32)
        return self.module.init(
            {"params": rng}, batch["inputs"], batch["user"], tokens, train=False
        )["params"]

    def loss(self, params, batch, rng):
        # The decoder trains on the last model.decoder_slots target positions of each window
        # (0: all of them); the dense head on every position.
        slots = self.decoder_slots if 0 < self.decoder_slots < batch["mask"].shape[1] else 0
        target_codes, mask = batch["target_codes"], batch["mask"]  # [B, P, M, L+1], [B, P, M]
        tokens, real = self._decoder_io(target_codes, mask)
        if slots:  # the module decodes the last `slots` positions of `tokens`
            target_codes, mask, real = (x[:, -slots:] for x in (target_codes, mask, real))
        drop_rng, dense_rng = jax.random.split(rng)
        hidden, stats, states = self.module.apply(
            {"params": params},
            batch["inputs"],
            batch["user"],
            tokens,
            train=True,
            with_states=True,
            hidden=True,
            decoder_slots=slots,
            decoder_grad=self.decoder_grad,
            rngs={"dropout": drop_rng},
        )
        # Each decoder position reads its own level's codes only, so each level's logits are
        # computed over its C_l columns alone (the same numbers as slicing the full head).
        hidden = hidden.reshape(*target_codes.shape, hidden.shape[-1])  # [B, P, M, L+1, D]
        prefix = jnp.zeros(target_codes.shape[:-1], jnp.int32)  # [B, P, M] prefix ids
        smoothing = self.config.loss.label_smoothing
        nll = jnp.zeros(target_codes.shape[:-1], jnp.float32)  # summed over levels
        for level, size in enumerate(self.code_sizes):
            logits = self.module.apply(
                {"params": params}, hidden[..., level, :], level, method=self.module.level_logits
            )  # [B, P, M, C_l]
            code = jnp.clip(target_codes[..., level], 0, size - 1)
            if self.valid_only:  # only the codes that continue the target's prefix to some item
                allowed = self.loss_valid[level, :, :size][prefix]  # [B, P, M, C_l]
                prefix = jnp.maximum(self.next_prefix[level, :, :size][prefix, code], 0)
            else:  # each position sees its level's codes
                allowed = jnp.ones(logits.shape, bool)
            log_probs = jax.nn.log_softmax(jnp.where(allowed, logits, -1e9), axis=-1)
            level_nll = -jnp.take_along_axis(log_probs, code[..., None], axis=-1)[..., 0]
            if smoothing > 0:  # uniform over the level's codes
                uniform = -(log_probs * allowed).sum(-1) / jnp.maximum(allowed.sum(-1), 1)
                level_nll = (1 - smoothing) * level_nll + smoothing * uniform
            nll = nll + level_nll
        nll = nll * mask
        count = real.sum()  # code tokens of real targets
        xent = nll.sum() / jnp.maximum(count, 1)
        loss = self.decoder_weight * xent
        metrics = {"xent": xent, "tokens": mask.sum().astype(jnp.float32)}
        if stats:
            m = self.config.model
            loss = loss + m.moe_aux_weight * stats["load_balance_loss"]
            loss = loss + m.moe_z_weight * stats["router_z_loss"]
            share = stats["tokens_per_expert"] / jnp.maximum(stats["tokens_per_expert"].sum(), 1)
            metrics |= {
                "moe/load_balance": stats["load_balance_loss"],
                "moe/router_z": stats["router_z_loss"],
                "moe/dropped_share": stats["dropped_share"],
                "moe/max_expert_share": share.max(),
                **{f"moe/expert_{e}_share": share[e] for e in range(share.shape[0])},
            }
        if self.dense_weight:  # the next item of each target position, over every item
            table = self.module.apply({"params": params}, method=self.module.item_vectors)
            total, n = losses.next_item_loss(
                self.config.loss,
                states,
                table,
                batch["targets"][..., 0],
                batch["mask"][..., 0],
                dense_rng,
                self.item_log_probs,
            )
            dense = total / jnp.maximum(n, 1.0)
            loss = loss + self.dense_weight * dense
            metrics["dense_xent"] = dense
        metrics["loss"] = loss
        return loss, metrics

    def _encoded(self, params, batch):
        """(variables, search context): the encoder memory, its mask and the last slot's state."""
        variables = {"params": params}
        memory, valid = self.module.apply(
            variables, batch["inputs"], batch["user"], method=self.module.encode
        )
        context = self.module.apply(
            variables, memory, 1, batch["inputs"].shape[1], method=self.module.slot_states
        )  # [B, 1, D]
        return variables, (memory, valid[:, None, :], context)  # the last slot reads it all

    def _search(self, variables, context, chosen, history, *, beam: int, k: int):
        """Beam search for the next item after the decoder tokens `chosen` [B, J] (the codes of
        items already generated in this session; J = 0 for the next item)."""
        offsets = jnp.asarray(self.offsets)

        def decoder_input(tokens, level):  # tokens [B, W, level] codes so far
            b, w = tokens.shape[:2]
            before = jnp.broadcast_to(chosen[:, None, :], (b, w, chosen.shape[1]))
            current = (tokens + offsets[:level] + seq2seq.FIRST_CODE).astype(jnp.int32)
            bos = jnp.full((b, w, 1), seq2seq.BOS, jnp.int32)
            return jnp.concatenate([bos, before, current], axis=-1)

        def level_slice(logits, level):
            lo = int(self.offsets[level])
            return logits[..., lo : lo + self.code_sizes[level]]

        def step_fn(context, tokens, level, cache=None):
            dec = decoder_input(tokens, level)
            if cache is None:  # the whole decoder input again
                logits, _ = self.module.apply(variables, *context, dec, method=self.module.decode)
                return level_slice(logits[:, :, -1], level)
            # only the positions the cache lacks (the decoder's inputs per block are kept), and
            # only this level's columns of the head
            return self.module.apply(
                variables, *context, dec, cache, level, method=self.module.decode_step
            )

        cache = None
        if self.decoder_cache:  # [B, W, 0, D] per decoder block before the first level
            empty = jnp.zeros((history.shape[0], beam, 0, self.module.dim), self.module.dtype)
            cache = [empty] * self.module.decoder_layers

        return beam_search(
            step_fn,
            context,
            self.valid,
            self.next_prefix,
            self.code_sizes,
            history,
            n_items=self.info.n_items,
            beam=beam,
            k=k,
            renormalize=self.valid_only,
            item_prefixes=self.item_prefixes,
            cache=cache,
        )

    def generate(self, params, batch, history, k: int | None = None, beam: int | None = None):
        """(items [B, K], scores [B, K]): the top K (default eval.k) valid items outside
        `history` ([B, H] item ids or a [B, n_items + 1] seen mask) by the sum of code
        log-probabilities, from a beam of `beam` (default eval.beam) prefixes per level. Prefixes
        whose items the user has all seen take no beam slot, so `beam >= K` fills the K slots
        whenever the user has K unseen items; otherwise the rest is item 0, score -inf. With a
        re-ranker (eval.rerank_weight) the search's best max(K, beam) items are re-ranked and the
        first K kept. Jit with `static_argnames=("k", "beam")`."""
        k, beam = k or self.k, beam or self.beam
        # With a re-ranker, a beam wider than the list gives it `beam` candidates to choose from.
        n = max(k, beam) if self.rerank_weight else k
        variables, context = self._encoded(params, batch)
        chosen = jnp.zeros((batch["inputs"].shape[0], 0), jnp.int32)
        seen = history if history.dtype == jnp.bool_ else seen_mask(history, self.info.n_items)
        if not (self.cold_share and len(self.cold_items)):
            items, scores = self._search(variables, context, chosen, history, beam=beam, k=n)
        else:  # the beam fills the list with warm items; cold ones compete by their codes
            is_cold = np.zeros(self.info.n_items + 1, bool)
            is_cold[self.cold_items] = True
            seen_warm = seen | is_cold
            items, scores = self._search(variables, context, chosen, seen_warm, beam=beam, k=n)
            items, scores = self._with_cold(variables, context, seen, items, scores, k)
            seen = seen_warm  # the dense candidates leave cold items to their share too
        if self.rerank_weight:
            dense = self._dense_log_probs(variables, context[2][:, 0])  # [B, V]
            if self.dense_candidates:
                items, scores = self._with_dense(variables, context, seen, dense, items, scores)
            items, scores = self._rerank(dense, items, scores)
        return items[:, :k], scores[:, :k]

    def code_log_probs(self, variables, context, items, levels: int | None = None):
        """[B, N] the log-probability of each item's first `levels` codes (default all L + 1;
        items [B, N], or [N] for every user), each level normalised over the codes valid after
        the item's prefix as beam search does (`loss.valid_codes_only`): with every level, an
        item's beam-search score, teacher-forced in one decoder pass over [B, N, levels] tokens.
        Item 0 (padding) scores -inf."""
        levels = self.depth if levels is None else levels
        b = context[0].shape[0]
        items = jnp.broadcast_to(jnp.asarray(items, jnp.int32), (b, *np.shape(items)[-1:]))
        codes = self.item_codes[items][..., :levels]  # [B, N, levels]
        offsets = jnp.asarray(self.offsets[:levels], jnp.int32)
        bos = jnp.full((*items.shape, 1), seq2seq.BOS, jnp.int32)
        tokens = jnp.concatenate([bos, codes[..., :-1] + offsets[:-1] + seq2seq.FIRST_CODE], -1)
        hidden, _ = self.module.apply(
            variables, *context, tokens, hidden=True, method=self.module.decode
        )
        total = jnp.zeros(items.shape, jnp.float32)
        for level in range(levels):
            size = self.code_sizes[level]
            level_logits = self.module.apply(
                variables, hidden[:, :, level], level, method=self.module.level_logits
            )  # [B, N, C_l]
            if self.valid_only:  # over the codes valid after the item's prefix
                allowed = self.valid[level, :, :size][self.prefixes_before[level][items]]
                level_logits = jnp.where(allowed, level_logits, -1e30)
            logp = jax.nn.log_softmax(level_logits, axis=-1)
            total = total + jnp.take_along_axis(logp, codes[..., level, None], axis=-1)[..., 0]
        return jnp.where(items > 0, total, -jnp.inf)

    def _dense_log_probs(self, variables, state):
        """[B, V] the dense head's log-softmax over every item (state [B, D] the last slot's);
        item 0 (padding) -inf."""
        table = self.item_table(variables["params"])  # [V, D]
        logits = (state @ table.T).astype(jnp.float32).at[:, 0].set(-jnp.inf)
        return logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)

    def _with_dense(self, variables, context, seen, dense, items, scores):
        """The beam's candidates [B, N] plus the dense head's best eval.dense_candidates items
        that are neither `seen` ([B, n_items + 1]) nor already among them, each scored by
        `code_log_probs` (the score the beam gives a path): [B, N + dense_candidates]."""
        n = min(self.dense_candidates, self.info.n_items)
        rows = jnp.arange(items.shape[0])[:, None]
        taken = seen.at[rows, items].set(True)  # the beam's items (and item 0) are taken
        _, extra = jax.lax.top_k(jnp.where(taken, -jnp.inf, dense), n)  # [B, n]
        extra = jnp.where(jnp.take_along_axis(taken, extra, axis=1), 0, extra).astype(jnp.int32)
        extra_scores = self.code_log_probs(variables, context, extra)
        return (
            jnp.concatenate([items, extra], axis=1),
            jnp.concatenate([scores, extra_scores], axis=1),
        )

    def cold_scores(self, variables, context, seen, chunk: int = 128):
        """[B, N] the log-probability of each cold item's L content codes (`self.cold_items`;
        the collision token, which only numbers the items sharing them, left out), each level
        normalised as beam search does (`code_log_probs`); -inf where `seen` ([B, n_items + 1]
        bool). Teacher-forced over [B, chunk, L] decoder inputs at a time."""
        scores = jnp.concatenate(
            [
                self.code_log_probs(
                    variables, context, self.cold_items[start : start + chunk], self.depth - 1
                )
                for start in range(0, len(self.cold_items), chunk)
            ],
            axis=1,
        )
        return jnp.where(seen[:, self.cold_items], -jnp.inf, scores)

    def _with_cold(self, variables, context, seen, items, scores, k: int):
        """The beam's list of warm items [B, N] with the best cold items (by `cold_scores`)
        competing for at most ceil(cold_share x k) of its slots (k the list's length, N >= k
        with a re-ranker), merged by score + eval.cold_bonus (TIGER's cold-start retrieval, its
        epsilon = eval.cold_share)."""
        n = min(len(self.cold_items), max(1, int(np.ceil(self.cold_share * k))))
        cold_scores, pick = jax.lax.top_k(self.cold_scores(variables, context, seen), n)
        cold_scores = cold_scores + self.cold_bonus  # -inf (seen) stays -inf
        cold_items = jnp.asarray(self.cold_items)[pick]  # [B, n]
        merged, order = jax.lax.top_k(
            jnp.concatenate([scores, cold_scores], axis=1), items.shape[1]
        )
        chosen = jnp.take_along_axis(jnp.concatenate([items, cold_items], axis=1), order, axis=1)
        return jnp.where(merged > -jnp.inf, chosen, 0), merged

    def _rerank(self, dense, items, scores):
        """The candidates re-ordered by code log-probability + rerank_weight x the dense head's
        log-probability (`dense` [B, V], `_dense_log_probs`); empty slots last."""
        dense = jnp.take_along_axis(dense, items, axis=1)
        combined = jnp.where(items > 0, scores + self.rerank_weight * dense, -jnp.inf)
        combined, order = jax.lax.top_k(combined, items.shape[1])
        return jnp.where(
            combined > -jnp.inf, jnp.take_along_axis(items, order, axis=1), 0
        ), combined

    @property
    def ranks_all_items(self) -> bool:
        """True when a dense head is trained (loss.dense_weight > 0): `eval.evaluator=
        full_ranking` then ranks the whole catalogue by it alone (`user_state` . `item_table`),
        the encoder's quality without the beam's recall."""
        return self.dense_weight > 0

    dot_product_scores = True  # the dense head scores items by state . item vector

    def user_state(self, params, batch) -> jax.Array:
        """[B, D] the last slot's encoder state, which the dense head scores items with (a
        batch without "user", a new user, is hashed as user 0)."""
        if "user" not in batch:
            batch = {**batch, "user": jnp.zeros(batch["inputs"].shape[:1], jnp.int32)}
        return self._encoded(params, batch)[1][2][:, 0]

    ranking_state = user_state

    def item_table(self, params) -> jax.Array:
        """[V, D] the dense head's item vectors (`EncoderDecoder.item_vectors`)."""
        return self.module.apply({"params": params}, method=self.module.item_vectors)

    ranking_table = item_table

    def topk(self, params, batch, history, k: int | None = None):
        """`generate`: k=None gives the evaluation list (eval.k items from a beam of eval.beam);
        an explicit k searches with a beam of max(k, eval.beam) prefixes, enough to fill k.
        A batch without "user" (a new user) is hashed as user 0."""
        if "user" not in batch:
            batch = {**batch, "user": jnp.zeros(batch["inputs"].shape[:1], jnp.int32)}
        if k is None:
            return self.generate(params, batch, history)
        return self.generate(params, batch, history, k=k, beam=max(k, self.beam))

    def generate_session(self, params, batch, history, m: int | None = None):
        """(items [B, M], scores [B, M]): the next M (default model.session_items) items, one
        after another: item j is the best of a constrained beam search whose decoder prefix holds
        items 0..j-1's codes (session-wise generation, as trained); none repeats the history
        ([B, H] item ids) or an earlier pick. Jit with `static_argnames="m"`."""
        m = m or self.session_items
        if m > self.session_items:
            raise ConfigError(
                f"a session of {m} items needs a model trained with model.session_items >= {m} "
                f"(this one: {self.session_items})."
            )
        variables, context = self._encoded(params, batch)
        code_tokens = jnp.asarray(
            np.maximum(self.info.semantic_ids.codes, 0) + self.offsets + seq2seq.FIRST_CODE,
            jnp.int32,
        )  # [V, L+1] an item's decoder tokens
        chosen = jnp.zeros((history.shape[0], 0), jnp.int32)
        items, scores = [], []
        for _ in range(m):
            top, score = self._search(variables, context, chosen, history, beam=self.beam, k=1)
            items.append(top[:, 0])
            scores.append(score[:, 0])
            chosen = jnp.concatenate([chosen, code_tokens[top[:, 0]]], axis=1)
            history = jnp.concatenate([history, top], axis=1)
        return jnp.stack(items, 1), jnp.stack(scores, 1)


def trained_valid(sem, trained: np.ndarray) -> np.ndarray:
    """The stacked `valid` table of `sem.prefix_tables()` (same prefix ids) keeping only the
    codes that lead to items with `trained` [V] True: the loss's softmax with
    loss.untrained_negatives=False."""
    valid, _ = sem.prefix_tables().stacked()
    out = np.zeros_like(valid)
    rows = np.flatnonzero(np.asarray(trained)[1:])  # rows of item_codes (item = row + 1)
    codes = sem.item_codes[rows]
    prefixes = sem.item_prefixes()[:, rows + 1]  # [L, n]
    for level in range(codes.shape[1]):
        prefix = np.zeros(len(rows), np.int64) if level == 0 else prefixes[level - 1]
        out[level, prefix, codes[:, level]] = True
    return out


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """What the generative variants (`:tiger`, `:onerec_sid`) share: size, optimiser, data."""
    m = c.model
    m.dim, m.num_heads, m.num_layers, m.decoder_layers, m.dropout = 64, 2, 2, 2, 0.1
    # Semantic ids from each item's training users (TF-IDF + SVD, BENCHMARKS.md "codes from the
    # items' training users": 3 seeds above the content codes on validation and test); items
    # without a training interaction get their row predicted from the dataset's content blocks.
    f = c.features
    if "interactions" not in f.blocks:
        f.cold_blocks = tuple(b for b in f.blocks if b not in ("collab", "interactions"))
        f.blocks = ("interactions",)
    # The optimiser is the base config's plain Adam (no warmup, b2 0.999, no clipping), as every
    # other model: on the dev set it learns faster early and ends level with the former 100
    # warmup steps, b2 0.98, eps 1e-9, clipping at 1 (BENCHMARKS.md).
    c.data.max_len = 50  # TIGER reads 20 items; code tokens make the encoder 4x longer
    c.data.bucket_boundaries = (8, 16, 32)
    c.eval.batch_size = 128  # users x beam hypotheses are decoded at once
    # Their validation is noise for the first epochs (TIGER on ml-latest-small: 0.002-0.005 for
    # seven epochs, BENCHMARKS.md), so early stopping waits this long whatever the patience.
    c.train.min_epochs = 10


def check_semantic_ids(config: ml_collections.ConfigDict, info: DataInfo) -> None:
    if info.semantic_ids is None:
        raise ConfigError(
            f"model.name={config.model.name!r} generates semantic ids but none are loaded: run "
            "`--mode tokenize --workdir DIR` and set --config.model.semantic_ids=DIR (or leave "
            "it empty and let --mode train tokenize into the run's workdir)."
        )
    if config.model.session_items < 1:
        raise ConfigError(f"model.session_items={config.model.session_items}: use >= 1.")


def build(config: ml_collections.ConfigDict, info: DataInfo, **module_fields) -> GenerativeModel:
    """A GenerativeModel over `EncoderDecoder(config.model ..., **module_fields)`; the model
    files pass what differs (encoder input, activation, item-id and side-feature inputs)."""
    check_semantic_ids(config, info)
    m = config.model
    module = seq2seq.EncoderDecoder(
        vocab_size=info.vocab_size,
        item_codes=np.maximum(info.semantic_ids.codes, 0),
        code_sizes=tuple(info.semantic_ids.codebook_sizes),
        max_len=info.max_len,
        session_items=m.session_items,
        causal=m.encoder_causal,
        dim=m.dim,
        num_layers=m.num_layers,
        decoder_layers=m.decoder_layers,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        num_experts=m.num_experts,
        experts_per_token=m.experts_per_token,
        expert_capacity=m.expert_capacity,
        expert_group_size=m.expert_group_size,
        positions=m.get("encoder_positions", "learned"),
        separate_item_codes=bool(m.get("separate_item_codes", False)),
        table_side_features=bool(m.get("table_side_features", False)),
        tie_code_head=bool(m.get("tie_code_head", False)),
        dtype=compute_dtype(config.train.compute_dtype),
        **module_fields,
    )
    return GenerativeModel(module, config, info)


def spec(name: str, build, variants: dict, **fields) -> ModelSpec:
    """The `ModelSpec` of a generative model: kind GENERATIVE, CODE_WINDOWS batches, and the
    semantic ids it reads; `fields` adds the rest (e.g. `legacy`)."""
    return ModelSpec(
        name=name,
        build=build,
        kind=GENERATIVE,
        batches=CODE_WINDOWS,
        variants=variants,
        reads_semantic_ids=True,
        **fields,
    )
