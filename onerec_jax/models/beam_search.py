"""Constrained beam search over semantic-id levels: the top-k unseen items of a generative model.

A generative recommender names an item by its `L + 1` code tokens (see
`onerec_jax.tokenize.semantic_ids`). `beam_search` decodes them level by level from the prefix
tables (`PrefixTables.stacked()`), so every returned path is a real item:

- at every level a code whose prefix + code starts no item's id scores -inf;
- at the last level the user's history items (and item 0, the padding) score -inf too;
- with `item_prefixes` (`SemanticIds.item_prefixes()`), a prefix under which the user has seen
  every item scores -inf at every level too, so it never takes a beam slot that a prefix still
  leading to unseen items could use. Every live beam then ends in at least one unseen item, and
  a search with `beam >= k` returns k items whenever the user has k unseen ones;
- the first level is one `step_fn` call per row (W = 1: every beam holds the empty prefix),
  broadcast to the beam;
- intermediate levels keep the `beam` best prefixes over `beam x C_l` expansions; the last level
  takes the top `k` over all `beam x C_L` expansions, so `k` may exceed `beam`. Full paths map to
  distinct items, so the result never repeats an item.

A path's score is the sum of its per-level log-probabilities, `log_softmax` of the model's
logits over the level's full vocabulary (not renormalised after masking). Beams that are dead
(score -inf: fewer live prefixes than `beam`, or at the start, where only the empty prefix is
live) never produce a live child; returned slots that no item fills are item 0 with score -inf.
NaN log-probabilities count as -inf, so a model emitting NaN returns nothing rather than garbage.

Everything is per batch row (no cross-row operation) and fixed-shape: under `jax.jit` with the
batch dimension of `context` and `history` sharded over a mesh's "data" axis, the search runs
sharded. The largest intermediates are [B, beam, C_l] and the [B, n_items + 1] seen-item mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# (context, tokens [B, W, level] int32, level: int) -> logits [B, W, C_level] (unnormalised).
StepFn = Callable[[Any, jax.Array, int], jax.Array]

STATIC_ARGNAMES = ("step_fn", "code_sizes", "n_items", "beam", "k", "renormalize")  # for jax.jit


def _check_static(
    valid, next_prefix, code_sizes: Sequence[int], n_items, beam, k, item_prefixes
) -> None:
    depth = len(code_sizes)
    if depth < 1 or min(code_sizes) < 1:
        raise ValueError(f"code_sizes={tuple(code_sizes)} needs >= 1 level, each size >= 1")
    if valid.ndim != 3 or valid.shape != next_prefix.shape:
        raise ValueError(
            f"valid {valid.shape} and next_prefix {next_prefix.shape} must both be "
            "[L + 1, P, C], as PrefixTables.stacked() returns them"
        )
    if valid.shape[0] != depth or max(code_sizes) > valid.shape[2]:
        raise ValueError(
            f"prefix tables {valid.shape} do not fit code_sizes={tuple(code_sizes)}: "
            "build both from the same SemanticIds"
        )
    if n_items < 1:
        raise ValueError(f"the catalogue has no item (n_items={n_items})")
    if beam < 1 or k < 1:
        raise ValueError(f"beam={beam} and k={k} must be >= 1")
    if item_prefixes is not None and item_prefixes.shape != (depth - 1, n_items + 1):
        raise ValueError(
            f"item_prefixes {item_prefixes.shape} must be [L, n_items + 1] = "
            f"{(depth - 1, n_items + 1)}, as SemanticIds.item_prefixes() returns it"
        )


def _level_logprobs(
    step_fn: StepFn, context, tokens, level: int, size: int, allowed=None, cache=None
) -> tuple[jax.Array, Any]:
    """([B, W, size] float32 log-probabilities of the next code, NaN as -inf; the step's new
    cache, or None without one). With `allowed` [B, W, size], normalised over the allowed
    codes only."""
    if cache is None:
        logits = step_fn(context, tokens, level)
    else:
        logits, cache = step_fn(context, tokens, level, cache)
    expected = (*tokens.shape[:2], size)
    if logits.shape != expected:
        raise ValueError(
            f"step_fn returned logits {logits.shape} at level {level}; expected "
            f"[B, W, C_{level}] = {expected}"
        )
    logits = logits.astype(jnp.float32)
    if allowed is not None:  # finite, so a row with no allowed code stays finite (and dead)
        logits = jnp.where(allowed, logits, -1e30)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.where(jnp.isnan(logp), -jnp.inf, logp), cache


def seen_mask(history: jax.Array, n_items: int) -> jax.Array:
    """[B, n_items + 1] bool: True for the items in `history [B, H]` and for item 0."""
    batch = history.shape[0]
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1]
    # Ids outside 0..n_items are dropped (map them past the end: a negative index would wrap).
    ids = jnp.where((history >= 0) & (history <= n_items), history, n_items + 1)
    seen = jnp.zeros((batch, n_items + 1), bool).at[rows, ids].set(True, mode="drop")
    return seen.at[:, 0].set(True)


def unseen_counts(
    seen: jax.Array, item_prefixes: jax.Array, n_prefixes: int, history: jax.Array | None = None
) -> jax.Array:
    """[L, B, n_prefixes] int32: per level 1..L, how many unseen items each prefix leads to,
    from the [B, n_items + 1] seen mask and `SemanticIds.item_prefixes()` [L, n_items + 1].

    With the seen items' ids `history` [B, H] (0-padded, repeats allowed), the count is each
    prefix's catalogue size minus the user's distinct seen items under it: a scatter of B x H
    entries. Without, from the mask: prefix ids number prefixes in lexicographic order, so in
    the items' lexicographic order each prefix owns a contiguous run, counted as a difference of
    running sums (a cumulative sum over [B, n_items + 1], several times slower on CPU)."""
    if history is not None:
        n_items = seen.shape[1] - 1
        ids = jnp.sort(jnp.where((history > 0) & (history <= n_items), history, 0), axis=1)
        first = jnp.concatenate([ids[:, :1] > 0, ids[:, 1:] != ids[:, :-1]], axis=1)
        weight = (first & (ids > 0)).astype(jnp.int32)  # [B, H] each distinct seen item once
        rows = jnp.arange(ids.shape[0])[:, None]

        def count(level_ids):  # [n_items + 1] prefix ids of one level -> [B, n_prefixes]
            total = jnp.zeros(n_prefixes, jnp.int32).at[level_ids[1:]].add(1)
            seen_here = jnp.zeros((ids.shape[0], n_prefixes), jnp.int32)
            return total[None, :] - seen_here.at[rows, level_ids[ids]].add(weight)

        return jax.vmap(count)(item_prefixes)
    order = jnp.argsort(item_prefixes[-1], stable=True)  # items in lexicographic code order
    unseen = (~seen[:, order]).astype(jnp.int32)  # [B, n_items + 1]; item 0 is always seen
    running = jnp.pad(jnp.cumsum(unseen, axis=1), ((0, 0), (1, 0)))  # [B, n_items + 2]
    bounds_at = jnp.arange(n_prefixes + 1, dtype=jnp.int32)

    def count_sorted(level_ids):  # [n_items + 1] prefix ids of one level -> [B, n_prefixes]
        bounds = jnp.searchsorted(level_ids[order], bounds_at, side="left")  # run starts, end
        ends = jnp.take(running, bounds, axis=1)  # [B, n_prefixes + 1]
        return ends[:, 1:] - ends[:, :-1]

    return jax.vmap(count_sorted)(item_prefixes)


def beam_search(
    step_fn: StepFn,
    context: Any,
    valid: jax.Array,
    next_prefix: jax.Array,
    code_sizes: tuple[int, ...],
    history: jax.Array,
    *,
    n_items: int,
    beam: int,
    k: int,
    renormalize: bool = False,
    item_prefixes: jax.Array | None = None,
    cache: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Constrained beam search over the L + 1 code levels; the top-k distinct unseen items.

    Jit it with the callable and the sizes static: `make_beam_search(step_fn, code_sizes, ...)`
    binds them, or `jax.jit(beam_search, static_argnames=STATIC_ARGNAMES)` takes them per call
    (`step_fn` must then be the same object each call, or it recompiles). The loop over levels
    is unrolled (L + 1 is small).

    Args:
      step_fn: `(context, tokens [B, W, level] int32, level) -> logits [B, W, C_level]`, where
        W = beam and `level` is a Python int (level 0: tokens is [B, 1, 0], W = 1). Tokens of dead
        beams are arbitrary in-range codes; their logits are ignored.
      context: any pytree (e.g. encoder memory), passed to `step_fn` untouched.
      valid: [L + 1, P, C] bool, `PrefixTables.stacked()[0]` (jnp or np).
      next_prefix: [L + 1, P, C] int32, `PrefixTables.stacked()[1]`: the next prefix id, at the
        last level the item id (1..n_items); -1 where invalid.
      code_sizes: static, C_l per level (`SemanticIds.codebook_sizes`).
      history: [B, H] int32 items the user has seen (0 = padding), never returned; or their
        [B, n_items + 1] bool mask (`seen_mask`), whose fixed shape spares recompilations.
      n_items: static, number of real items (ids 1..n_items).
      beam: static, prefixes kept at each intermediate level.
      k: static, items returned; may exceed `beam`.
      renormalize: static; True: each level's log-probabilities are normalised over the codes
        valid after the beam's prefix (for models trained that way, `loss.valid_codes_only`).
      item_prefixes: [L, n_items + 1] int32, `SemanticIds.item_prefixes()`, or None. Given, a
        prefix whose items the user has all seen is pruned at every level (it frees its slot);
        None: seen items are masked at the last level only.
      cache: None, or the initial state of an incremental `step_fn`, a pytree of [B, W, ...]
        arrays: `step_fn(context, tokens, level, cache)` then returns (logits, new cache) and
        reads only what the last code adds (e.g. a decoder's key/value cache); the search keeps
        each surviving beam's cache (reordered by parent beam after every level).

    Returns:
      items [B, k] int32 and scores [B, k] float32 (summed log-probabilities), best first,
      ties by lower (beam, code) position; slots no item fills are item 0 with score -inf.
    """
    code_sizes = tuple(int(c) for c in code_sizes)
    valid, next_prefix = jnp.asarray(valid), jnp.asarray(next_prefix, jnp.int32)
    if item_prefixes is not None:
        item_prefixes = jnp.asarray(item_prefixes, jnp.int32)
    _check_static(valid, next_prefix, code_sizes, n_items, beam, k, item_prefixes)
    history = jnp.asarray(history)
    ids = None  # the seen items' ids, when given as such
    if history.dtype == jnp.bool_:
        if history.shape[1] != n_items + 1:
            raise ValueError(
                f"a seen mask is [B, n_items + 1 = {n_items + 1}], got {history.shape}"
            )
        seen_all = history.at[:, 0].set(True)
    else:
        ids = history.astype(jnp.int32)
        seen_all = seen_mask(ids, n_items)
    batch, depth = history.shape[0], len(code_sizes)
    neg_inf = jnp.float32(-jnp.inf)
    live = None  # [L, B, P] unseen items under each prefix of levels 1..L
    if item_prefixes is not None and depth > 1:
        live = unseen_counts(seen_all, item_prefixes, valid.shape[1], ids)

    # Only the empty prefix (id 0) is live at the start: one live beam, the others -inf.
    scores = jnp.full((batch, beam), neg_inf).at[:, 0].set(0.0)  # [B, W]
    prefix = jnp.zeros((batch, beam), jnp.int32)  # [B, W] prefix ids at the current level
    tokens = jnp.zeros((batch, beam, 0), jnp.int32)  # [B, W, level]

    def expand(level, scores, prefix, tokens):
        """Candidate scores and children [B, W * C_level], flat index = beam_index * C + code."""
        size = code_sizes[level]
        allowed = valid[level, :, :size][prefix]  # [B, W, C]
        width = 1 if level == 0 else beam  # level 0: every beam holds the empty prefix
        logp, new_cache = _level_logprobs(
            step_fn,
            context,
            tokens[:, :width],
            level,
            size,
            allowed[:, :width] if renormalize else None,
            jax.tree.map(lambda x: x[:, :width], cache),
        )
        logp = jnp.broadcast_to(logp, (batch, beam, size))  # one step per row, for every beam
        new_cache = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (batch, beam, *x.shape[2:])), new_cache
        )
        children = next_prefix[level, :, :size][prefix]  # [B, W, C]
        if live is not None and level < depth - 1:  # children that still lead to unseen items
            # (after the log-probabilities: a user's history never renormalises the model)
            flat = jnp.maximum(children, 0).reshape(batch, -1)  # [B, W * C]
            alive = jnp.take_along_axis(live[level], flat, axis=1).reshape(children.shape) > 0
            allowed = allowed & alive
        cand = jnp.where(allowed, scores[..., None] + logp, neg_inf)  # [B, W, C]
        flat = (cand.reshape(batch, beam * size), children.reshape(batch, beam * size))
        return *flat, new_cache

    def by_parent(x, parent):  # [B, W, ...] rows of the parent beams
        return jnp.take_along_axis(x, parent.reshape(*parent.shape, *[1] * (x.ndim - 2)), axis=1)

    for level in range(depth - 1):
        cand, children, cache = expand(level, scores, prefix, tokens)
        scores, pos = jax.lax.top_k(cand, beam)  # [B, W]
        parent, code = pos // code_sizes[level], pos % code_sizes[level]  # [B, W]
        cache = jax.tree.map(lambda x, p=parent: by_parent(x, p), cache)
        # Dead beams (-inf) restart from prefix 0; their -inf score keeps their children dead.
        prefix = jnp.where(scores > neg_inf, jnp.take_along_axis(children, pos, axis=1), 0)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)  # [B, W, level]
        tokens = jnp.concatenate([tokens, code[..., None].astype(jnp.int32)], axis=-1)

    # Last level: children are item ids (-1 where invalid, read as item 0, always masked).
    cand, children, _ = expand(depth - 1, scores, prefix, tokens)
    items = jnp.maximum(children, 0)  # [B, W * C_L]
    seen = jnp.take_along_axis(seen_all, items, axis=1)  # [B, W * C_L]
    cand = jnp.where(seen, neg_inf, cand)
    if k > cand.shape[1]:  # fewer expansions than slots: the rest is padding
        extra = k - cand.shape[1]
        cand = jnp.concatenate([cand, jnp.full((batch, extra), neg_inf)], axis=1)
        items = jnp.concatenate([items, jnp.zeros((batch, extra), jnp.int32)], axis=1)
    top_scores, pos = jax.lax.top_k(cand, k)  # [B, k]
    top_items = jnp.where(top_scores > neg_inf, jnp.take_along_axis(items, pos, axis=1), 0)
    return top_items.astype(jnp.int32), top_scores


def make_beam_search(
    step_fn: StepFn, code_sizes: Sequence[int], *, n_items: int, beam: int, k: int
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted `search(context, valid, next_prefix, history, item_prefixes=None) -> (items
    [B, k], scores [B, k])`.

    The static options are bound here; the arrays are traced, so one compilation serves every
    batch of the same shapes. To run sharded, pass `context` and `history` split over the
    mesh's "data" axis along their batch dimension (and the tables replicated).
    """
    sizes = tuple(int(c) for c in code_sizes)

    def search(context, valid, next_prefix, history, item_prefixes=None):
        return beam_search(
            step_fn,
            context,
            valid,
            next_prefix,
            sizes,
            history,
            n_items=n_items,
            beam=beam,
            k=k,
            item_prefixes=item_prefixes,
        )

    return jax.jit(search)
