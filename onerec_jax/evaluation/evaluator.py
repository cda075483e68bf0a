"""Evaluation of a model on the validation or test split (PROTOCOL.md scoring), built from config.

An evaluator ranks each user's target and keeps the top `eval.k` list; `evaluate(params, split)`
returns the metrics of those ranks and the per-user arrays. The batch loop (users sharded over the
mesh, the seen-item history of each user masked) is `Evaluator`'s; a subclass says only how a
batch is ranked (`_prepare`, `_rank`), and `EVALUATORS` names them for `make_evaluator`:

- "full_ranking": the exact rank of the target among every item (scoring models: `user_state`
  against the item table or `score_chunk`; evaluation/ranking.py, the table may stay split).
- "topk_list": the rank of the target within the model's own `topk` list (any model; what
  generative models use, their beam search scoring no item outside it): listed ties count half
  as everywhere (`ranking.rank_in_list`); a target outside the list ranks n_items + 1, so
  HR/NDCG/MRR@K are exact for K <= eval.k and full MRR is a lower bound.

The model names its evaluator (`Model.evaluator`); `eval.evaluator` overrides it, e.g.
"topk_list" to score a SASRec by its list as a generative model is scored.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from onerec_jax.data import item_arrays, pipeline
from onerec_jax.data.sequences import SequenceData
from onerec_jax.data.training_examples import prefix_inputs
from onerec_jax.errors import ConfigError
from onerec_jax.evaluation import metrics, ranking
from onerec_jax.parallel import sharding


class Evaluator:
    """The loop: every user of a split (validation: the eval.valid_users sample) in batches of
    eval.batch_size, split over the mesh; `_rank` gives each batch's ranks and top-k items."""

    name = ""
    protocol = ""  # results.json protocol.ranking
    # Inputs as wide as each batch's longest (power of two) instead of data.max_len: batches go
    # by history length, so most are narrow; the encoder compiles once per width.
    narrow_inputs = False

    def __init__(self, model, data: SequenceData, config: ml_collections.ConfigDict, mesh, rules):
        self.model, self.data, self.config, self.mesh, self.rules = model, data, config, mesh, rules
        self._valid_users = pipeline.sample_users(
            data.n_users, config.eval.valid_users, config.seed
        )
        self._train_counts = None  # [V] training interactions per item (segment_metrics)
        self._predict_target = None  # jitted rating-head prediction (`_rating_metrics`)

    def _prepare(self, params):
        """What `_rank` needs from the params, computed once per evaluation."""
        return params

    def _rating_metrics(self, params, split: str, users: np.ndarray) -> dict[str, float]:
        """The rating head as a reward model: RMSE of the predicted rating of each user's
        `split` target against the true one, beside the baseline that predicts each user's mean
        training rating (the training mean for a user without one)."""
        if self._predict_target is None:
            model = self.model

            def predict(params, inputs, targets):
                state = model.user_state(params, {"inputs": inputs})
                return model.target_ratings(params, state, model.item_table(params), targets)

            self._predict_target = jax.jit(predict)
        data, max_len = self.data, self.config.data.max_len
        part = data.split(split)
        predicted = []
        for lo in range(0, len(users), 256):
            rows = users[lo : lo + 256]
            n = len(rows)
            rows = np.pad(rows, (0, 256 - n), mode="edge")  # one shape: one compilation
            inputs = prefix_inputs(data, split, rows, max_len)
            out = self._predict_target(params, inputs, part.targets[rows].astype(np.int32))
            predicted.append(np.asarray(out)[:n])
        predicted = np.concatenate(predicted)
        truth = data.target_ratings(split)[users]
        train = data.split("train")
        sums = (
            np.add.reduceat(data.ratings, data.offsets[:-1])
            - data.ratings[data.offsets[1:] - 1]
            - data.ratings[data.offsets[1:] - 2]
        )  # each user's training ratings
        user_mean = sums[users] / np.maximum(train.lengths[users], 1)
        rmse = lambda x: float(np.sqrt(np.mean((x - truth) ** 2)))  # noqa: E731
        return {"rating_rmse": rmse(predicted), "rating_rmse_user_mean": rmse(user_mean)}

    def _history_width(self, split: str, longest: int) -> int:
        """The width of a batch's seen-item histories ([B, H]) given its longest history."""
        return ranking.history_width(longest)

    def _rank(self, prepared, inputs, targets, history) -> tuple[jax.Array, jax.Array]:
        """(ranks [B] float32, top_items [B, eval.k] int32) of one global batch."""
        raise NotImplementedError

    def evaluate(self, params, split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(metrics, per-user arrays: users, ranks (float32: ties count half, PROTOCOL.md),
        top_items) for `split` ("valid" or "test")."""
        start = time.perf_counter()
        e = self.config.eval
        prepared = self._prepare(params)
        sample = self._valid_users if split == "valid" else None
        ds = pipeline.eval_dataset(
            self.data,
            split,
            max_len=self.config.data.max_len,
            batch_size=e.batch_size,
            by_length=True,
            users=sample,
            narrow=self.narrow_inputs,
        )
        order = pipeline.eval_user_order(self.data, split, by_length=True, users=sample)
        users, ranks, weights, tops = [], [], [], []
        lengths = self.data.split(split).lengths  # [n_users] prefix lengths
        for g, batch in enumerate(ds):
            # One history width per GLOBAL batch, so every process pads its rows alike.
            longest = int(lengths[order[g * e.batch_size : (g + 1) * e.batch_size]].max())
            width = self._history_width(split, longest)
            history = ranking.history_batch(self.data, split, batch["user"], width=width)
            local = {
                "inputs": batch["inputs"],
                "user": batch["user"],
                "target": batch["target"],
                "history": history,
            }
            glob = sharding.global_batch(local, self.mesh, self.rules)
            inputs = {"inputs": glob["inputs"], "user": glob["user"]}
            r, top_items = self._rank(prepared, inputs, glob["target"], glob["history"])
            ranks.append(_to_host(r))
            tops.append(_to_host(top_items))
            users.append(_to_host(glob["user"]))
            weights.append(
                _to_host(sharding.global_batch({"w": batch["weight"]}, self.mesh, self.rules)["w"])
            )
        real = np.concatenate(weights) > 0
        users = np.concatenate(users)[real]
        by_user = np.argsort(users, kind="stable")  # metrics independent of the visiting order
        per_user = {
            "users": users[by_user],
            "ranks": np.concatenate(ranks)[real][by_user],
            "top_items": np.concatenate(tops)[real][by_user],
        }
        result = metrics.metrics_from_ranks(per_user["ranks"])
        if self._train_counts is None:
            self._train_counts = item_arrays.train_counts(self.data)
        result.update(segment_metrics(self.data, split, per_user, self.config, self._train_counts))
        if getattr(self.model, "has_rating_head", False):
            result.update(self._rating_metrics(params, split, per_user["users"]))
        result["seconds"] = time.perf_counter() - start
        return result, per_user


class FullRanking(Evaluator):
    """The exact rank of each target among all items, by the model's `user_state` scored
    against its item table (split over the mesh where the table is) or by its `score_chunk`."""

    name = "full_ranking"
    protocol = "full"
    narrow_inputs = True  # `user_state` reads left-padded inputs of any width alike

    def __init__(self, model, data, config, mesh, rules):
        super().__init__(model, data, config, mesh, rules)
        if not getattr(model, "ranks_all_items", hasattr(model, "user_state")):
            raise ConfigError(
                f"eval.evaluator='full_ranking' scores every item through a user state, which "
                f"model {config.model.name!r} does not have (a generative model has one only "
                "with a dense head, loss.dense_weight > 0): use eval.evaluator='topk_list'."
            )
        e = config.eval
        sizes = ranking.cpu_block_sizes(config, mesh)
        options = dict(
            k=e.k,
            chunk_size=sizes["chunk_size"],
            mask_history=e.mask_history,
            block_rows=sizes["rank_rows"],
        )
        if model.dot_product_scores:  # states [B, D] against the item table, computed once
            # The table may carry padding rows (split over the mesh): rank the real items only.
            self._ranker = ranking.make_ranker(mesh, n_items=data.n_items, rules=rules, **options)
            self._scorer_params = jax.jit(model.ranking_table)
        else:  # the model scores item chunks itself (e.g. NCF's MLP)
            self._ranker = ranking.make_ranker_with(
                model.score_chunk, data.n_items, mesh, **options
            )
            self._scorer_params = lambda params: params
        self._user_state = jax.jit(ranking.in_row_blocks(model.ranking_state, sizes["state_rows"]))

    def _prepare(self, params):
        return params, self._scorer_params(params)

    def _rank(self, prepared, inputs, targets, history):
        params, scorer_params = prepared
        states = self._user_state(params, inputs)
        r, top_items, _ = self._ranker(states, scorer_params, targets, history)
        return r, top_items


class TopKList(Evaluator):
    """The rank of each target within the model's `topk` list of eval.k items (beam search for
    generative models). Histories are padded to one width per split, so `topk` compiles once."""

    name = "topk_list"

    def __init__(self, model, data, config, mesh, rules):
        super().__init__(model, data, config, mesh, rules)
        if not config.eval.mask_history:
            raise ConfigError(
                "eval.evaluator='topk_list' ranks within lists that never hold a seen item: "
                "keep eval.mask_history=True or use eval.evaluator='full_ranking'."
            )
        self._topk = jax.jit(model.topk)  # k=None: the model's evaluation list (eval.k)
        self._widths = {}
        self.protocol = (
            model.ranking if model.evaluator == self.name else f"top-{config.eval.k} list"
        )

    def _history_width(self, split, longest):
        if split not in self._widths:
            self._widths[split] = ranking.history_width(int(self.data.split(split).lengths.max()))
        return self._widths[split]

    def _rank(self, params, inputs, targets, history):
        top_items, top_scores = self._topk(params, inputs, history)
        return _rank_in_list(top_items, top_scores, targets, self.data.n_items), top_items

    def evaluate(self, params, split):
        """`Evaluator.evaluate`, plus the lists' own counts (`list_checks`) in the metrics:
        lists_invalid and lists_duplicate must be 0; lists_short counts lists with fewer than
        eval.k items although the user has that many unseen items."""
        result, per_user = super().evaluate(params, split)
        checks = list_checks(per_user["top_items"], self.data, split, per_user["users"])
        result |= checks
        if checks["lists_invalid"] or checks["lists_duplicate"]:
            logging.error("%s lists hold items they must not: %s", split, checks)
        elif checks["lists_short"]:
            logging.warning(
                "%s: %d of %d lists hold fewer than eval.k=%d items (eval.beam too narrow?); "
                "HR/NDCG/MRR@K near K undercount.",
                split,
                checks["lists_short"],
                len(per_user["users"]),
                self.config.eval.k,
            )
        return result, per_user


EVALUATORS = {cls.name: cls for cls in (FullRanking, TopKList)}


# Segment metrics (`<segment>/<metric>`): the headline ones, with n_users and the 95% half-width.
SEGMENT_METRICS = ("hr@10", "ndcg@10", "mrr")
LIKED, DISLIKED = 4.0, 2.5  # target ratings of the "liked" and "disliked" segments


def segments(
    data: SequenceData,
    split: str,
    users: np.ndarray,
    config: ml_collections.ConfigDict,
    counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Boolean masks over `users` (dense ids) of the cold-start segments (data/cold_start.py):
    "cold" (the target has no training interaction: held out by data.cold_items, or absent from
    training anyway) and "warm" (the rest), when the split has a cold target; "new_users" (at
    most data.new_user_items training interactions) when data.new_users is set; "liked" (the
    target rated >= 4) and "disliked" (<= 2.5) when the data has ratings. `counts`: the
    items' training interactions ([V], item_arrays.train_counts), computed when not given."""
    out = {}
    if counts is None:
        counts = item_arrays.train_counts(data)
    cold = counts[data.split(split).targets[users]] == 0
    if cold.any():
        out["cold"], out["warm"] = cold, ~cold
    if config.data.get("new_users", 0.0):
        train_lengths = data.split("train").lengths[users]
        out["new_users"] = train_lengths <= int(config.data.get("new_user_items", 3))
    if data.has_ratings:  # preference: was the target liked (>= 4 stars) or disliked (<= 2.5)?
        rating = data.target_ratings(split)[users]
        out["liked"], out["disliked"] = rating >= LIKED, rating <= DISLIKED
    return out


def graded_ndcg(ranks: np.ndarray, ratings: np.ndarray, top: float, k: int = 10) -> float:
    """Mean over users of (rating / top) / log2(1 + rank) for targets ranked in the top k, else
    0: NDCG@k with the target's rating as its gain, normalised by the highest rating `top` (a
    target rated `top` at rank 1 scores 1, one rated top / 2 at rank 1 scores 0.5)."""
    ranks = np.asarray(ranks, np.float64)
    hit = ranks <= k
    return float(np.mean(np.where(hit, ratings / top / np.log2(1.0 + ranks), 0.0)))


def segment_metrics(
    data: SequenceData,
    split: str,
    per_user: dict,
    config: ml_collections.ConfigDict,
    counts: np.ndarray | None = None,
) -> dict[str, float]:
    """`{"cold/ndcg@10": ..., "cold/n_users": ...}` for every non-empty segment of `segments`,
    and `graded_ndcg@10` (the target's rating as gain) on rated data."""
    out = {}
    if data.has_ratings:
        ratings = data.target_ratings(split)[per_user["users"]]
        top = float(data.ratings.max())
        out["graded_ndcg@10"] = graded_ndcg(per_user["ranks"], ratings, top)
    for name, mask in segments(data, split, per_user["users"], config, counts).items():
        out[f"{name}/n_users"] = int(mask.sum())
        if not mask.any():
            continue
        m = metrics.metrics_from_ranks(per_user["ranks"][mask])
        for key in SEGMENT_METRICS:
            out[f"{name}/{key}"] = m[key]
            out[f"{name}/{key}_ci95"] = m[f"{key}_ci95"]
    return out


def make_evaluator(model, data: SequenceData, config: ml_collections.ConfigDict, mesh, rules):
    """The evaluator eval.evaluator names, by default the model's own (`Model.evaluator`)."""
    name = config.eval.get("evaluator", "") or model.evaluator
    if name not in EVALUATORS:
        raise ConfigError(f"eval.evaluator={name!r}: use one of {sorted(EVALUATORS)} or ''.")
    return EVALUATORS[name](model, data, config, mesh, rules)


def list_checks(
    top_items: np.ndarray, data: SequenceData, split: str, users: np.ndarray
) -> dict[str, int]:
    """Counts over the users' top-K lists `top_items [U, K]` (item 0: an empty slot):
    lists_invalid, slots holding an item outside 1..n_items or one in the user's `split`
    prefix; lists_duplicate, repeats of an item within a list; lists_short, lists with empty
    slots although the user has K or more unseen items."""
    top_items = np.asarray(top_items, np.int64)
    users = np.asarray(users, np.int64)
    n, k = data.n_items, top_items.shape[1]
    filled = top_items != 0
    invalid = filled & ((top_items < 0) | (top_items > n))
    # (user, item) keys of every prefix item, against those of the listed items
    rows, seen = data.prefix_items(split, users)
    seen_keys = rows * (n + 1) + seen
    listed_keys = np.arange(len(users))[:, None] * (n + 1) + np.clip(top_items, 0, n)
    invalid |= filled & np.isin(listed_keys, seen_keys)
    ordered = np.sort(np.where(filled, top_items, -np.arange(1, k + 1)), axis=1)
    duplicate = int((ordered[:, 1:] == ordered[:, :-1]).sum())
    distinct_seen = np.bincount(np.unique(seen_keys) // (n + 1), minlength=len(users))
    short = (filled.sum(1) < k) & (n - distinct_seen >= k)
    return {
        "lists_invalid": int(invalid.sum()),
        "lists_duplicate": duplicate,
        "lists_short": int(short.sum()),
    }


_rank_in_list = jax.jit(ranking.rank_in_list)  # [B] float32 ranks of targets in a top-K list


def _to_host(x: jax.Array) -> np.ndarray:
    """A global array on the host of every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
