"""Top-K recommendations from a trained run: for a known user, or for a list of movies.

`Recommender.from_run(workdir)` restores the best checkpoint of a `--mode train` run with the
run's own config and data. A user is served with their whole history (train, valid and test
items: they are being served now), the last `max_len` items as the model's input; everything
the input user has seen is excluded from the list. `recommendations_text` is `--mode recommend`.

What the model declares in its file, so that new models need no change here:
- `topk(params, batch, history, k)` (models/base.py): the list itself (a scoring model's by its
  scores over the catalogue, a generative model's by constrained beam search);
- `reads_user_ids` (models/registry.py `ModelSpec`; BPR, NCF: a per-user embedding): the model
  needs the dense user id (`batch["user"]`, [B] int32), so it cannot serve a new user given as
  a list of movies, and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from onerec_jax import explain
from onerec_jax.data.catalogue import Catalogue, parse_queries
from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import UserError
from onerec_jax.evaluation import ranking
from onerec_jax.models import registry
from onerec_jax.models.base import ScoringModel
from onerec_jax.runs import load_run


class Recommendation(NamedTuple):
    rank: int  # 1 = best
    movie_id: int | str  # source item id (movieId)
    title: str  # without "(year)"; "" when the dataset has no titles
    year: int  # 0 when unknown
    genres: tuple[str, ...]
    score: float  # the model's score (a logit; generative models: the id's log-probability)


class Recommender:
    """A trained model's params with its data: top-K lists for known or new users."""

    def __init__(self, model, params, data: SequenceData, items, config: ml_collections.ConfigDict):
        self.model, self.params, self.data, self.config = model, params, data, config
        self.catalogue = Catalogue(data, items)
        self.max_len = int(config.data.max_len)
        self.spec = registry.model_spec(config)
        self._topk = jax.jit(model.topk, static_argnames="k")
        self._scores = None  # jitted on first use by `explain`
        # The least width seen-item histories are padded to (`--mode serve`: the longest user's,
        # so that only the batch size varies between calls and every shape compiles at start).
        self.history_floor = 0

    @classmethod
    def from_run(cls, workdir: str | Path) -> Recommender:
        """The best (validated) checkpoint of the run in `workdir`, on one device (runs.py)."""
        run = load_run(workdir)
        return cls(run.model, run.params, run.data, run.items, run.config)

    def user_history(self, source_user_id) -> tuple[int, np.ndarray]:
        """(dense user id, every item of that user, oldest first) for a source user id."""
        ids = self.data.user_ids
        try:
            key = int(source_user_id) if ids.dtype.kind in "iu" else str(source_user_id)
        except ValueError:
            key = None
        pos = 0 if key is None else int(np.searchsorted(ids, key))  # dense ids: ascending
        if key is None or pos >= len(ids) or ids[pos] != key:
            examples = ", ".join(str(u) for u in ids[:3])
            raise UserError(
                f"user {source_user_id} is not among the {len(ids):,} users of the trained "
                f"data (ids {ids[0]} to {ids[-1]}, e.g. {examples}; users with too few ratings "
                "are filtered out)."
            )
        return pos, self.data.sequence(pos)

    def resolve_items(self, queries: list[str]) -> np.ndarray:
        """[n] dense ids of movieIds or titles (see data/catalogue.py), in the order given."""
        queries = [q for q in queries if q.strip()]
        if not queries:
            raise UserError("no movies given: list at least one title or movieId.")
        return np.asarray([self.catalogue.resolve(q) for q in queries], np.int32)

    def recommend(
        self, history: np.ndarray, k: int, user: int | None = None
    ) -> list[Recommendation]:
        """Top-`k` after `history` (dense item ids, oldest first), excluding `history`.

        `user` (dense id) is passed to the model as `batch["user"]` when given.
        """
        return self.recommend_batch([history], k, None if user is None else [user])[0]

    def recommend_batch(
        self,
        histories: list[np.ndarray],
        k: int,
        users: list[int] | None = None,
        exclude_seen: bool | list[bool] = True,
    ) -> list[list[Recommendation]]:
        """Top-`k` lists for several users in one jitted call (`--mode serve` batches requests
        through here); row i equals `recommend(histories[i], k, users[i])`.

        The batch is padded to a power of two (rows repeating the first) and the seen-item
        histories to `ranking.history_width`, so few distinct shapes reach jit. `exclude_seen`
        False for a row lets its seen items back into its list.
        """
        if k < 1:
            raise UserError(f"k={k}: ask for at least one recommendation.")
        n = len(histories)
        if n == 0:
            return []
        if isinstance(exclude_seen, bool):
            exclude_seen = [exclude_seen] * n
        rows = ranking.history_width(n)  # a power of two >= n
        inputs = np.zeros((rows, self.max_len), np.int32)  # left-padded, as the eval pipeline
        seen = [
            np.unique(np.asarray(h, np.int32)) if ex else np.zeros(0, np.int32)
            for h, ex in zip(histories, exclude_seen, strict=True)
        ]
        width = max(ranking.history_width(max(len(s) for s in seen)), self.history_floor)
        masked = np.zeros((rows, width), np.int32)
        for i, (history, s) in enumerate(zip(histories, seen, strict=True)):
            recent = np.asarray(history, np.int32)[-self.max_len :]
            inputs[i, self.max_len - len(recent) :] = recent
            masked[i, : len(s)] = s
        inputs[n:], masked[n:] = inputs[0], masked[0]
        batch = {"inputs": inputs}
        if users is not None:
            user = np.zeros(rows, np.int32)
            user[:n] = users
            user[n:] = users[0]
            batch["user"] = user
        k = min(k, self.data.n_items)
        items, scores = jax.device_get(self._topk(self.params, batch, masked, k=k))
        out = []
        for row_items, row_scores in zip(items[:n], scores[:n], strict=True):
            row = []
            for dense, score in zip(row_items, row_scores, strict=True):
                if dense > 0:  # 0: fewer than k unseen items
                    info = self.catalogue.info(int(dense))
                    row.append(Recommendation(len(row) + 1, *info, float(score)))
            out.append(row)
        return out

    def recommend_for_user(self, source_user_id, k: int = 10) -> list[Recommendation]:
        """Top-`k` for a user of the trained data, from their whole history; seen items excluded."""
        user, history = self.user_history(source_user_id)
        return self.recommend(history, k, user=user)

    def explain(
        self, history: np.ndarray, rows: list[Recommendation], top: int = 3
    ) -> list[list[explain.Reason]]:
        """Per recommendation, up to `top` watched movies (dense ids) that drove it, strongest
        first (explain.py): for a scoring model the score drop without each movie, for a
        generative model the watched movies sharing the longest semantic-id prefix."""
        history = np.asarray(history, np.int32)
        dense = np.asarray([self.catalogue.dense_id(r.movie_id) for r in rows], np.int32)
        codes = self._semantic_codes()
        if codes is not None:
            return [explain.prefix_reasons(codes, history, int(d), top) for d in dense]
        if self.needs_user_ids() or not isinstance(self.model, ScoringModel):
            raise UserError(
                f"--explain: model {self.config.model.name!r} does not read the watched movies "
                "(a per-user embedding), so no watched movie explains its list. Use a sequence "
                "model (sasrec, onerec, gru4rec, bert4rec) or a generative one (tiger, onerec_sid)."
            )
        if self._scores is None:
            model = self.model

            def scores(params, inputs, items):
                return model.score_chunk(
                    params, model.ranking_state(params, {"inputs": inputs}), items
                )

            self._scores = jax.jit(scores)
        drops, positions = explain.occlusion_drops(
            lambda inputs: self._scores(self.params, inputs, dense), history, dense, self.max_len
        )
        return explain.top_reasons(drops, positions, history, top)

    def _semantic_codes(self) -> np.ndarray | None:
        """[V, L] content codes of a generative model's items (collision token dropped)."""
        ids = getattr(getattr(self.model, "info", None), "semantic_ids", None)
        if ids is None or isinstance(self.model, ScoringModel):
            return None
        return np.asarray(ids.codes)[:, : ids.levels]

    def prefix_meaning(self, item: int, length: int) -> str:
        """'N movies: Drama 60%, Comedy 30%' for the items under `item`'s first `length` codes."""
        codes = self._semantic_codes()
        genres = [self.catalogue.info(i)[3] for i in range(self.data.n_items + 1)]
        n, top = explain.prefix_genres(codes, genres, item, length)
        shares = ", ".join(f"{g} {100 * f:.0f}%" for g, f in top) or "no genres"
        return f"{n} movies: {shares}"

    def attention_png(self, history: np.ndarray, path: str | Path) -> Path:
        """`--explain_png`: the attention heatmap of `history`'s recent movies (explain.py)."""
        inputs, _ = explain.occlusion_inputs(
            np.asarray(history, np.int32)[-self.max_len :], self.max_len
        )
        maps = explain.attention_maps(self.model, self.params, inputs[0])
        recent = np.asarray(history)[-self.max_len :]
        return explain.attention_png(maps, [self.catalogue.label(int(d)) for d in recent], path)

    def needs_user_ids(self) -> bool:
        """Whether the model's user state needs `batch["user"]` (its spec's `reads_user_ids`)."""
        return self.spec.reads_user_ids

    def recommend_for_items(self, queries: list[str], k: int = 10) -> list[Recommendation]:
        """Top-`k` for a new user who watched `queries` (titles or movieIds), oldest first."""
        self.check_new_users()
        return self.recommend(self.resolve_items(queries), k)

    def check_new_users(self) -> None:
        """UserError unless the model can serve a user given as a list of movies."""
        if self.needs_user_ids():
            raise UserError(
                f"model {self.config.model.name!r} scores users by a learned per-user embedding, "
                "so it cannot serve a new user from a list of movies. Use --user ID, or a "
                "sequence model (e.g. sasrec, onerec)."
            )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_recommendations(rows: list[Recommendation]) -> str:
    """An aligned text table: rank, title (year), genres, movieId, score."""
    if not rows:
        return "(no recommendations: every item of the catalogue is already seen)"
    titles = [_clip(f"{r.title} ({r.year})" if r.year else r.title or "?", 60) for r in rows]
    genres = [_clip("|".join(r.genres) or "-", 40) for r in rows]
    tw, gw = max(len("title"), *map(len, titles)), max(len("genres"), *map(len, genres))
    ids = [str(r.movie_id) for r in rows]
    iw = max(len("movieId"), *map(len, ids))
    lines = [f"{'rank':>4}  {'title':<{tw}}  {'genres':<{gw}}  {'movieId':>{iw}}  {'score':>8}"]
    for r, t, g, i in zip(rows, titles, genres, ids, strict=True):
        lines.append(f"{r.rank:>4}  {t:<{tw}}  {g:<{gw}}  {i:>{iw}}  {r.score:>8.3f}")
    return "\n".join(lines)


def explanation_lines(rec: Recommender, history: np.ndarray, rows: list[Recommendation]):
    """'because you watched ...' per recommendation (`--explain`)."""
    reasons = rec.explain(history, rows)
    generative = rec._semantic_codes() is not None
    head = (
        "why (watched movies sharing the longest semantic-id prefix; what the prefix holds):"
        if generative
        else "why (the watched movies without which its score falls most, by how much):"
    )
    lines = [head]
    for r, why in zip(rows, reasons, strict=True):
        title = f"{r.title} ({r.year})" if r.year else r.title or str(r.movie_id)
        if not why:
            lines.append(
                f"{r.rank:>4}  {title}: no watched movie "
                + ("shares its first code" if generative else "raises its score on its own")
            )
            continue
        if generative:
            length = int(why[0].weight)
            meaning = rec.prefix_meaning(rec.catalogue.dense_id(r.movie_id), length)
            watched = "; ".join(rec.catalogue.label(x.item) for x in why)
            lines.append(
                f"{r.rank:>4}  {title}: because you watched {watched} (the same first "
                f"{length} code{'s' if length > 1 else ''}: {meaning})"
            )
        else:
            watched = "; ".join(f"{rec.catalogue.label(x.item)} (-{x.weight:.2f})" for x in why)
            lines.append(f"{r.rank:>4}  {title}: because you watched {watched}")
    return lines


def recommendations_text(
    workdir: str | Path,
    *,
    user: str | None = None,
    items: list[str] = (),
    k: int = 10,
    explain: bool = False,
    explain_png: str | Path | None = None,
) -> str:
    """`--mode recommend`: what the run in `workdir` recommends to `user` or after `items`.

    Args:
      workdir: a run trained with `--mode train`.
      user: a source user id of the trained data (`--user`); or
      items: `--items` values, split by `parse_queries` (titles or movieIds, oldest first).
      k: list length.
      explain: add why each movie was recommended (explain.py).
      explain_png: write the attention heatmap of the user's recent movies there.
    """
    queries = parse_queries(list(items))
    if (user is None) == (not queries):
        raise UserError(
            "--mode recommend needs --user ID or --items 'Title (year); Title; movieId' "
            "(exactly one of them)."
        )
    rec = Recommender.from_run(workdir)
    if user is not None:
        _, history = rec.user_history(user)
        recent = "; ".join(rec.catalogue.label(d) for d in history[-3:][::-1])
        head = f"user {user}: {len(history)} movies seen, most recent: {recent}"
        rows = rec.recommend_for_user(user, k)
    else:
        rows = rec.recommend_for_items(queries, k)
        history = rec.resolve_items(queries)
        watched = "; ".join(rec.catalogue.label(d) for d in history)
        head = f"a new user who watched (oldest first): {watched}"
    lines = [
        head,
        f"top {len(rows)} of model {rec.config.model.name!r}:",
        format_recommendations(rows),
    ]
    if explain and rows:
        lines += explanation_lines(rec, history, rows)
    if explain_png:
        lines.append(f"attention heatmap: {rec.attention_png(history, explain_png)}")
    return "\n".join(lines)
