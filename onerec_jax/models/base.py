"""The model objects the trainer and evaluator call: `Model`, and `ScoringModel` for models
that score every item.

A model object wraps a Flax module into pure functions, for every model (`Model`): `init(rng,
batch)`, `loss(params, batch, rng) -> (scalar, metrics)` and `topk(params, batch, history, k)
-> (items, scores)`, its best `k` items outside `history` (what `recommend.py` serves and the
"topk_list" evaluator ranks targets in). `evaluator` names how its targets are ranked
(evaluation/evaluator.py): "full_ranking" scores the whole catalogue through `user_state`, so
only scoring models have it. A scoring model's module has
`__call__(inputs, train) -> hidden [B, L, D]` and `item_table() -> [V, D]` (row 0 = padding);
`ScoringModel` adds `user_state(params, batch) -> [B, D]`, scored against `item_table(params)` by
the shared ranker. Generative models (models/generative.py) recommend by `generate` instead.

Scoring models that are not a sequence encoder override what differs: a user-item model (BPR,
NCF) reads `batch["user"]` (the dense user id, present in training and evaluation batches), a
model whose score is not a dot product (NCF) overrides `score_chunk`, and a model with nothing
to learn (popularity) sets `trainable = False`.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from onerec_jax.errors import ConfigError
from onerec_jax.models import full_ranking, losses, row_blocks
from onerec_jax.parallel import vocab_parallel


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What models may know about the data: sizes and per-item arrays (dense ids, row 0 = pad)."""

    n_items: int  # real items; vocabulary V = n_items + 1
    max_len: int
    item_counts: np.ndarray  # [V] training interactions per item (0 for the padding row)
    item_genres: np.ndarray | None = None  # [V, G] float32 multi-hot genres
    item_year_bucket: np.ndarray | None = None  # [V] int32 year bucket, 0 = unknown
    item_codes: np.ndarray | None = None  # [V, L] int32 semantic-id content codes, row 0 = 0
    code_sizes: tuple[int, ...] = ()  # [L] codebook size per level of item_codes
    n_users: int = 0  # dense user ids 0..n_users-1 (user-item models have a row per user)
    semantic_ids: Any = None  # tokenize.semantic_ids.SemanticIds (generative models), or None
    item_vectors: np.ndarray | None = None  # [V, d] float32 standardised own vectors, row 0 = 0
    rating_mean: float = 0.0  # mean training rating (the rating head's offset)

    @property
    def vocab_size(self) -> int:
        return self.n_items + 1


class Model(abc.ABC):
    """Pure functions over a Flax module: what the trainer calls for every model."""

    # False for a model with nothing to learn (popularity): the trainer then takes one step that
    # leaves the params unchanged, validates and tests, so its run looks like any other.
    trainable: bool = True
    ranking: str = "full"  # how evaluation ranks (results.json protocol.ranking)
    evaluator: str = "topk_list"  # evaluation/evaluator.py EVALUATORS; eval.evaluator overrides

    def __init__(self, module: nn.Module, config: ml_collections.ConfigDict, info: DataInfo):
        self.module, self.config, self.info = module, config, info

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: dict[str, Any]):
        """Boxed (logically partitioned) params for a training batch of this shape."""

    @abc.abstractmethod
    def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics incl. "loss" and "tokens") of a training batch."""

    # Attributes holding catalogue-sized arrays that `loss` reads. The trainer passes them to the
    # jitted step as arguments (`with_constants`): closed over, XLA folds them at compile time
    # (40 s for one 10M-entry array on CPU, against 0.4 s as an argument).
    constant_names: tuple[str, ...] = ()

    def constants(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name) for name in self.constant_names}

    def with_constants(self, constants: dict[str, jax.Array]) -> Model:
        """A shallow copy of this model reading `constants` (e.g. traced arguments) instead."""
        bound = copy.copy(self)
        for name, value in constants.items():
            setattr(bound, name, value)
        return bound

    @abc.abstractmethod
    def topk(self, params, batch, history, k: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(items [B, k] int32, scores [B, k] float32): the best `k` (default eval.k) items for
        the users of `batch` (its "inputs" and, if the model reads them, "user"), best first,
        none of them in `history` [B, H] (item ids, 0 = padding) or item 0; 0 (score -inf)
        fills the slots of a list that runs short. Jit with `static_argnames="k"`."""


def item_log_probs(info: DataInfo) -> jax.Array:
    """[V] float32 log training frequencies, add-one: the popularity sampler and logQ need a
    finite log-frequency for every item that can be a target (models/losses.py); -inf for the
    padding item."""
    counts = np.asarray(info.item_counts, np.float64) + 1.0
    counts[0] = 0.0
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(counts / counts.sum()), jnp.float32)


class ScoringModel(Model):
    """A model whose users are scored against every item; subclasses may add auxiliary losses."""

    evaluator = "full_ranking"  # the exact rank of every target over the whole catalogue
    constant_names = ("item_log_probs",)  # the popularity sampler and logQ

    def __init__(self, module: nn.Module, config: ml_collections.ConfigDict, info: DataInfo):
        super().__init__(module, config, info)
        self.item_log_probs = item_log_probs(info)  # [V]

    def init(self, rng: jax.Array, batch: dict[str, Any]):
        """Boxed (logically partitioned) params for a batch of this shape."""
        return self.module.init({"params": rng}, batch["inputs"], train=False)["params"]

    def apply(self, params, inputs, *, train: bool, rng=None, method=None):
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply({"params": params}, inputs, train=train, rngs=rngs, method=method)

    def item_table(self, params) -> jax.Array:
        """[V, D] output embeddings, row 0 = padding; rows >= V (only when the table is padded
        to split over the mesh, parallel/vocab_parallel.py) are not items."""
        return self.module.apply({"params": params}, method=self.module.item_table)

    def user_state(self, params, batch) -> jax.Array:
        """[B, D]: the hidden state at the last (most recent) position of left-padded inputs,
        the module's `last_state(inputs)` (every sequence module this default serves has one; a
        Transformer's last block then computes that one query: about half the encoder's work at
        2 blocks). Models with other user states override this method."""
        return self.module.apply({"params": params}, batch["inputs"], method="last_state")

    def score_chunk(self, params, state, item_ids: jax.Array) -> jax.Array:
        """[B, C] float32 scores of items `item_ids` [C] for users whose `user_state` is `state`.

        Default: the dot product `state [B, D] . item_table(params)[item_ids]`. A model whose
        score is not a dot product (NCF) overrides this; the evaluator then ranks the catalogue
        chunk by chunk through it (evaluation/ranking.py `rank_and_topk_with`), with history
        masking still done by the shared ranker.
        """
        rows = vocab_parallel.take_rows(self.ranking_table(params), item_ids)  # [C, D]
        return jnp.einsum(
            "bd,cd->bc",
            state,
            rows,
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )

    def topk(self, params, batch, history, k: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The top `k` (default eval.k) by `score_chunk`, the catalogue scored in chunks of
        eval.chunk_size (models/full_ranking.py; ties go to the lower id)."""
        k = int(k or self.config.eval.k)
        chunk = full_ranking.block_sizes(self.config.eval)["chunk_size"]
        state = self.ranking_state(params, batch)
        targets = jnp.zeros(history.shape[:1], jnp.int32)  # no target: only the list is used
        if self.dot_product_scores:
            table = self.ranking_table(params)
            out = full_ranking.rank_and_topk(
                state, table, targets, history, k=k, chunk_size=chunk, n_items=self.info.n_items
            )
        else:
            out = full_ranking.rank_and_topk_with(
                functools.partial(self.score_chunk, params),
                state,
                self.info.n_items,
                targets,
                history,
                target_scores=jnp.zeros(targets.shape, jnp.float32),  # skips [B, B] scoring
                k=k,
                chunk_size=chunk,
            )
        return out[1], out[2]

    @property
    def dot_product_scores(self) -> bool:
        """True unless `score_chunk` is overridden: the evaluator may rank with the item table."""
        return type(self).score_chunk is ScoringModel.score_chunk

    def encode(self, params, inputs: jax.Array, rng: jax.Array) -> jax.Array:
        """[B, L, D] training-mode hidden states of `inputs` [B, L], `train.encoder_rows`
        sequences at a time (models/row_blocks.py `encoder_rows`; each block its own dropout
        key), so a Transformer's attention stays in cache on a CPU."""
        b = inputs.shape[0]
        rows = row_blocks.encoder_rows(self.config.train.get("encoder_rows", 0))
        if not row_blocks.splits(b, rows):
            return self.apply(params, inputs, train=True, rng=rng)
        keys = jax.random.split(rng, b // rows)[jnp.arange(b) // rows]  # [B]: each its block's

        def block(params, rows_of):  # (inputs [r, L], keys [r]: all the block's key)
            return self.apply(params, rows_of[0], train=True, rng=rows_of[1][0])

        return row_blocks.in_row_blocks(block, rows)(params, (inputs, keys))

    def loss(self, params, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        drop_rng, loss_rng = jax.random.split(rng)
        hidden = self.encode(params, batch["inputs"], drop_rng)
        table = self.item_table(params)
        total, count = losses.next_item_loss(
            self.config.loss,
            hidden,
            table,
            batch["targets"],
            batch["mask"],
            loss_rng,
            self.item_log_probs,
            vocab_size=self.info.vocab_size,
        )
        loss = total / jnp.maximum(count, 1.0)
        if not self.has_rating_head:
            return loss, {"loss": loss, "tokens": count}
        # the second objective: squared error of the targets' predicted ratings (issue 16)
        predicted = self.target_ratings(params, hidden, table, batch["targets"])
        err = jnp.where(batch["mask"], (predicted - batch["target_ratings"]) ** 2, 0.0)
        rating_mse = jnp.sum(err) / jnp.maximum(count, 1.0)
        total_loss = loss + self.rating_weight * rating_mse
        return total_loss, {
            "loss": total_loss,
            "next_item_loss": loss,
            "rating_mse": rating_mse,
            "tokens": count,
        }

    # -------------------------------------------------------------- the rating head (issue 16)

    @property
    def rating_weight(self) -> float:
        return float(self.config.model.get("rating_weight", 0.0))

    @property
    def has_rating_head(self) -> bool:
        """model.rating_weight > 0 on a module with a rating head (SASRec, OneRec item head)."""
        return self.rating_weight > 0 and hasattr(self.module, "rating_parts")

    def rating_parts(self, params):
        """(P [D, D], b [rows]) of the module's layers.RatingHead."""
        return self.module.apply({"params": params}, method="rating_parts")

    def target_ratings(self, params, state, table, items) -> jax.Array:
        """[...] predicted ratings of `items` [...] for states `state` [..., D] (the item
        embeddings read from `table`): (state P) . e + b[item] + the training mean."""
        p, b = self.rating_parts(params)
        rows = vocab_parallel.take_rows(table, items).astype(jnp.float32)
        bias = vocab_parallel.take_rows(b[:, None], items)[..., 0]
        projected = jnp.einsum("...d,de->...e", state.astype(jnp.float32), p)
        return jnp.sum(projected * rows, axis=-1) + bias + self.info.rating_mean

    def predict_ratings(self, params, batch, items: jax.Array) -> jax.Array:
        """[B, C] predicted ratings of `items` [C] after each user's history in `batch`."""
        if not self.has_rating_head:
            raise ConfigError(
                "this model has no rating head: train it with --config.model.rating_weight > 0."
            )
        state = self.user_state(params, batch)  # [B, D]
        table = self.item_table(params)
        ids = jnp.broadcast_to(items, (state.shape[0], items.shape[0]))
        return self.target_ratings(params, state[:, None, :], table, ids)

    def _rating_alpha(self) -> float:
        return float(self.config.eval.get("rating_alpha", 0.0)) if self.has_rating_head else 0.0

    def ranking_state(self, params, batch) -> jax.Array:
        """The user state the catalogue is ranked by: `user_state`, or with eval.rating_alpha
        and a rating head [h + alpha h P, alpha], so that state . `ranking_table` rows =
        logit + alpha x (predicted rating - mean)."""
        state = self.user_state(params, batch)
        alpha = self._rating_alpha()
        if not alpha:
            return state
        p, _ = self.rating_parts(params)
        mixed = state + alpha * jnp.einsum("bd,de->be", state.astype(jnp.float32), p).astype(
            state.dtype
        )
        return jnp.concatenate([mixed, jnp.full((state.shape[0], 1), alpha, state.dtype)], -1)

    def ranking_table(self, params) -> jax.Array:
        """`item_table`, with eval.rating_alpha and a rating head its rows [e, b]."""
        table = self.item_table(params)
        if not self._rating_alpha():
            return table
        _, b = self.rating_parts(params)
        return jnp.concatenate([table, b[: table.shape[0], None].astype(table.dtype)], -1)


def check_user_item(config: ml_collections.ConfigDict, info: DataInfo) -> None:
    """A user-item model (BPR, NCF) needs the user count and >= 1 negative per training pair."""
    if info.n_users < 1:
        raise ConfigError(
            f"model.name={config.model.name!r} keeps a row per user, but DataInfo has n_users=0: "
            "build it with the dataset's user count."
        )
    if config.model.negatives_per_pair < 1:
        raise ConfigError(
            f"model.negatives_per_pair={config.model.negatives_per_pair}: use at least 1."
        )


def side_arrays(config: ml_collections.ConfigDict, info: DataInfo) -> dict:
    """The encoder's genre / year inputs named in model.side_features (module fields). A feature
    the dataset lacks (a `user item item ...` file has neither) is left out with a warning."""
    features = set(config.model.side_features) - {"semantic_ids"}
    unknown = features - {"genres", "year", "vectors"}
    if unknown:
        raise ConfigError(
            f"model.side_features has unknown {sorted(unknown)}: use genres, year, semantic_ids, "
            "vectors."
        )
    if "vectors" in features and info.item_vectors is None:
        raise ConfigError(
            "model.side_features has vectors but no item vectors were loaded: set "
            "features.vectors_path to your .parquet/.npz/.npy file (data/item_vectors.py)."
        )
    genres = info.item_genres if "genres" in features else None
    years = info.item_year_bucket if "year" in features else None
    lacking = [f for f, a in (("genres", genres), ("year", years)) if f in features and a is None]
    if lacking:
        logging.warning(
            "model.side_features: this dataset has no item %s; the model reads without them.",
            " or ".join(lacking),
        )
    out = dict(
        item_genres=None if genres is None else np.asarray(genres, np.float32),
        item_year_bucket=None if years is None else np.asarray(years, np.int32),
        n_year_buckets=1 if years is None else int(np.max(years)) + 1,
    )
    if "vectors" in features:  # only the OneRec item head reads them (a module field)
        out["item_vectors"] = info.item_vectors
    return out
