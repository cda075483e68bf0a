"""Why a movie was recommended: `--mode recommend --explain` and `--explain_png`.

Scoring models (SASRec, the OneRec item head, GRU4Rec, BERT4Rec): **leave-one-out
occlusion**. For each watched movie of the model's input window, the history is scored again
without it (the older movie before the window shifts in, as it would had the movie never been
watched); the movie's weight for a recommendation is how much that recommendation's score
falls without it. All the shortened histories go through the model in one batched call. Why
occlusion and not the alternatives:
- attention weights of the last position are one set of weights for the whole list (they do not
  depend on the recommended movie), mix several blocks and heads, and are known not to be
  faithful to what drives a prediction (Jain and Wallace 2019);
- a gradient x input attribution is a first-order approximation of exactly this removal, needs
  the model's embedding inputs opened up, and does not exist for every model;
- occlusion is exact for what it states ("without Heat, this score falls by 1.2"), reads only
  the model contract (`user_state`, `score_chunk`) so every sequence model gets it, and costs one
  pass over at most max_len + 1 histories.
A model whose user state is a learned per-user row (BPR, NCF) or ignores the history
(popularity) has nothing to explain this way, and says so.

Generative models (TIGER, the OneRec semantic-id decoder): the recommended movie's semantic id
shares a prefix with some watched movies; the explanation lists the watched movies with the
longest shared prefix and describes the prefix by the most common genres of the catalogue's
movies under it (what that region of the code space holds).

`--explain_png` draws, for Transformer models, the attention of the user's recent history
(flax `sow` of `SelfAttention`'s weights, mean over heads): one panel per block, the last block's
single query row being the position whose state is scored.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from onerec_jax.data.training_examples import power_of_two_width
from onerec_jax.errors import UserError


class Reason(NamedTuple):
    item: int  # dense id of a watched movie
    weight: float  # score drop without it (scoring models) or shared prefix length (generative)


def occlusion_inputs(history: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs [1 + n, max_len] int32, positions [n]): row 0 the model's left-padded input of
    `history` (dense ids, oldest first), row 1 + j the input of `history` without the j-th of its
    last n = min(len, max_len) movies (`positions[j]` its index in `history`)."""
    history = np.asarray(history, np.int32)
    n = min(len(history), max_len)
    positions = np.arange(len(history) - n, len(history))
    rows = [history] + [np.delete(history, p) for p in positions]
    inputs = np.zeros((len(rows), max_len), np.int32)
    for i, row in enumerate(rows):
        recent = row[-max_len:]
        if len(recent):
            inputs[i, max_len - len(recent) :] = recent
    return inputs, positions


def occlusion_drops(scores_fn, history: np.ndarray, items: np.ndarray, max_len: int):
    """([len(items), n] score drops, positions [n]): `scores_fn(inputs [R, max_len]) -> [R, C]`
    scores of `items` [C] after each input row; drop[c, j] = score of item c after the whole
    history minus after the history without movie `positions[j]`."""
    inputs, positions = occlusion_inputs(history, max_len)
    rows = power_of_two_width(len(inputs))  # few distinct shapes, few compilations
    padded = np.concatenate([inputs, np.repeat(inputs[:1], rows - len(inputs), axis=0)])
    scores = np.asarray(jax.device_get(scores_fn(padded)), np.float64)[: len(inputs)]
    return (scores[0][None, :] - scores[1:]).T, positions


def top_reasons(drops: np.ndarray, positions: np.ndarray, history: np.ndarray, top: int):
    """Per item (row of `drops`), up to `top` watched movies with the largest positive drop,
    largest first; a movie watched twice counts once (its larger drop)."""
    out = []
    for row in drops:
        best: dict[int, float] = {}
        for j in np.argsort(-row, kind="stable"):
            if row[j] <= 0 or len(best) >= top:
                break
            best.setdefault(int(history[positions[j]]), float(row[j]))
        out.append([Reason(i, w) for i, w in best.items()])
    return out


def prefix_reasons(codes: np.ndarray, history: np.ndarray, item: int, top: int) -> list[Reason]:
    """Watched movies sharing the longest semantic-id prefix with `item` (`codes` [V, L] dense
    rows), longest first, at most `top`; a shared prefix of 0 codes is no reason."""
    target = codes[item]
    shared = []
    for h in dict.fromkeys(int(x) for x in history[::-1]):  # most recent first, once each
        same = codes[h] == target
        length = int(np.argmin(same)) if not same.all() else len(target)
        if length:
            shared.append(Reason(h, float(length)))
    return sorted(shared, key=lambda r: -r.weight)[:top]


def prefix_genres(codes: np.ndarray, genres: list[tuple[str, ...]], item: int, length: int):
    """The most common genres (up to 3, with their share) of the catalogue's items whose first
    `length` codes are `item`'s."""
    under = np.flatnonzero((codes[1:, :length] == codes[item, :length]).all(axis=1)) + 1
    counts = collections.Counter(g for i in under for g in genres[i])
    return len(under), [(g, c / len(under)) for g, c in counts.most_common(3)]


def attention_maps(model, params, inputs: np.ndarray) -> list[np.ndarray]:
    """Per block, the [queries, keys] attention (mean over heads) of one input row [max_len]
    through the model's `last_state`; [] when the model has no attention to show."""
    module = getattr(model, "module", None)
    if module is None or not hasattr(module, "last_state"):
        return []
    _, state = module.apply(
        {"params": params},
        np.asarray(inputs, np.int32)[None],
        method="last_state",
        mutable=["intermediates"],
    )
    maps = []
    flat = jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
    for _, weights in flat:  # sow order: block by block
        maps.append(np.asarray(weights, np.float32)[0].mean(axis=0))  # [Lq, Lk]
    return maps


def attention_png(maps: list[np.ndarray], labels: list[str], path: str | Path, recent: int = 20):
    """A heatmap per block of the attention among the last `recent` watched movies (the last
    block: the scored position's row only); `labels` the movies of the input, oldest first."""
    if not maps:
        raise UserError(
            "--explain_png: this model has no attention layers (a Transformer model such as "
            "sasrec or onerec has)."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(recent, len(labels))
    names = [lb if len(lb) <= 28 else lb[:25] + "..." for lb in labels[-n:]]
    heights = [min(n, m.shape[0]) for m in maps]  # the last block: one row (the scored query)
    fig, axes = plt.subplots(
        len(maps),
        1,
        figsize=(max(6, 0.45 * n + 3), 2.2 * len(maps) + 0.3 * sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": [h + 4 for h in heights]},
    )
    for b, (ax, m) in enumerate(zip(axes[:, 0], maps, strict=True)):
        block = m[-min(n, m.shape[0]) :, -n:]  # queries that are watched movies, recent keys
        im = ax.imshow(block, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xticks(range(n), names, rotation=70, ha="right", fontsize=7)
        rows = names[-block.shape[0] :] if block.shape[0] > 1 else ["(scored position)"]
        ax.set_yticks(range(block.shape[0]), rows, fontsize=7)
        ax.set_title(f"block {b + 1}: attention over the {n} most recent movies (mean of heads)")
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
