"""Full-ranking evaluation of a model on the validation or test split (PROTOCOL.md scoring)."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from onerec_jax.data import pipeline
from onerec_jax.data.sequences import SequenceData
from onerec_jax.evaluation import metrics, ranking
from onerec_jax.models import beam_search, registry
from onerec_jax.parallel import sharding


class Evaluator:
    """Scores every user of a split against the whole catalogue, users sharded over the mesh."""

    def __init__(self, model, data: SequenceData, config: ml_collections.ConfigDict, mesh, rules):
        self.model, self.data, self.config, self.mesh, self.rules = model, data, config, mesh, rules
        e = config.eval
        options = dict(k=e.k, chunk_size=e.chunk_size, mask_history=e.mask_history)
        # Generative models return their top-K by beam search; a target is ranked by its score
        # within it (ranking.rank_in_list, ties as everywhere) and outside it gets rank
        # n_items + 1 (so HR/NDCG/MRR@K are exact for K <= eval.k and full MRR is a lower bound).
        self.generative = registry.model_spec(config).kind == registry.GENERATIVE
        self._valid_users = pipeline.sample_users(data.n_users, e.valid_users, config.seed)
        if self.generative:
            self._generate = jax.jit(model.generate)
            # histories of any width -> one [B, n_items + 1] mask: generate compiles once
            self._seen = jax.jit(beam_search.seen_mask, static_argnums=1)
            self._scorer_params = lambda params: params
        elif model.dot_product_scores:  # states [B, D] against the item table, computed once
            # The table may carry padding rows (split over the mesh): rank the real items only.
            self._ranker = ranking.make_ranker(mesh, n_items=data.n_items, rules=rules, **options)
            self._scorer_params = jax.jit(model.item_table)
        else:  # the model scores item chunks itself (e.g. NCF's MLP)
            self._ranker = ranking.make_ranker_with(
                model.score_chunk, data.n_items, mesh, **options
            )
            self._scorer_params = lambda params: params
        if not self.generative:
            self._user_state = jax.jit(model.user_state)

    def evaluate(self, params, split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(metrics, per-user arrays: users, ranks (float32: ties count half, PROTOCOL.md),
        top_items) for `split` ("valid" or "test")."""
        start = time.perf_counter()
        e = self.config.eval
        scorer_params = self._scorer_params(params)
        sample = self._valid_users if split == "valid" else None
        ds = pipeline.eval_dataset(
            self.data,
            split,
            max_len=self.config.data.max_len,
            batch_size=e.batch_size,
            by_length=True,
            users=sample,
        )
        order = pipeline.eval_user_order(self.data, split, by_length=True, users=sample)
        users, ranks, weights, tops = [], [], [], []
        lengths = self.data.split(split).lengths  # [n_users] prefix lengths
        for g, batch in enumerate(ds):
            # One history width per GLOBAL batch, so every process pads its rows alike.
            longest = int(lengths[order[g * e.batch_size : (g + 1) * e.batch_size]].max())
            width = ranking.history_width(longest)
            history = ranking.history_batch(self.data, split, batch["user"], width=width)
            local = {
                "inputs": batch["inputs"],
                "user": batch["user"],
                "target": batch["target"],
                "history": history,
            }
            glob = sharding.global_batch(local, self.mesh, self.rules)
            inputs = {"inputs": glob["inputs"], "user": glob["user"]}
            if self.generative:
                seen = self._seen(glob["history"], self.data.n_items)
                top_items, top_scores = self._generate(params, inputs, seen)
                r = _rank_in_list(top_items, top_scores, glob["target"], self.data.n_items)
            else:
                states = self._user_state(params, inputs)
                r, top_items, _ = self._ranker(
                    states, scorer_params, glob["target"], glob["history"]
                )
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
        result["seconds"] = time.perf_counter() - start
        return result, per_user


_rank_in_list = jax.jit(ranking.rank_in_list)  # [B] float32 ranks of targets in a top-K list


def _to_host(x: jax.Array) -> np.ndarray:
    """A global array on the host of every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
