"""The planted world of synthetic MovieLens: clusters, a Markov chain over them, the oracle.

Every rated item belongs to one latent cluster. A user's first item is drawn from the stationary
distribution of a cluster Markov chain; each next item `i` is drawn with probability

    q(i) ∝ T[cluster(last item), cluster(i)] * p(i | cluster(i))   over items not yet rated,

where `T` is a sticky transition matrix and `p(. | c)` a Zipf popularity inside cluster `c`.
Sampling is by rejection (redraw the (cluster, item) pair from the same state when the item was
already rated); users stuck after a few rounds switch to an exact draw from the same renormalised
distribution, so the law is unchanged. Genres, tags and genome vectors all follow the cluster.
`Synthetic.next_item_probs` is the true next-item distribution; `oracle_ndcg_at_k` is the NDCG a
model ranking by it would get. data/synthetic_csv.py writes a drawn dataset as CSV files and
data/synthetic.py a whole dataset folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onerec_jax.errors import ConfigError

GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)  # one word per line would take 19 lines
_MAX_MOVIE_ID_RATIO = 209_171 / 62_423  # ML-25M's largest movieId over its number of movies
_CHUNK_USERS = 16_384  # users generated together; bounds the seen-bitmap memory
_ITEM_ROUNDS = 2  # full (cluster, item) rejection rounds before the exact cluster draw
_CLUSTER_ROUNDS = 8  # within-cluster rejection rounds before the exact item draw


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes, seed and structure knobs of one synthetic dataset."""

    n_users: int  # users, ids 1..n_users
    n_items: int  # rated movies (every one gets at least one rating)
    n_ratings: int  # exact number of rows of ratings.csv
    n_movies: int  # rows of movies.csv and links.csv, >= n_items
    n_clusters: int  # latent clusters of the Markov chain
    n_genome_items: int  # movies (all rated) with genome scores
    n_genome_tags: int  # rows of genome-tags.csv
    n_tags_rows: int  # rows of tags.csv
    seed: int = 0  # everything is a function of the config, this included
    stay_prob: float = 0.5  # mass of T's diagonal on top of the uniform floor
    n_neighbours: int = 3  # preferred neighbour clusters per cluster
    neighbour_prob: float = 0.3  # mass shared by the neighbours; the rest is spread uniformly
    zipf_exponent: float = 1.0  # p(item | cluster) ∝ (rank + 1) ** -zipf_exponent
    min_user_ratings: int = 20  # every user rates at least this many movies
    max_user_ratings: int = 32_202  # cap on one user's ratings (ML-25M's largest user)
    length_sigma: float = 1.4  # log-normal sigma of the per-user extra ratings (heavy tail)

    def __post_init__(self) -> None:
        problems = []
        if min(self.n_users, self.n_items, self.n_clusters) < 1:
            problems.append("n_users, n_items and n_clusters must be >= 1")
        if self.n_movies < self.n_items:
            problems.append(f"n_movies={self.n_movies} must be >= n_items={self.n_items}")
        if self.n_clusters > self.n_items:
            problems.append(f"n_clusters={self.n_clusters} exceeds n_items={self.n_items}")
        cap = min(self.max_user_ratings, self.n_items)
        if not 1 <= self.min_user_ratings <= cap:
            problems.append(f"min_user_ratings must be in 1..min(max_user_ratings, n_items)={cap}")
        lo, hi = self.n_users * self.min_user_ratings, self.n_users * cap
        if not lo <= self.n_ratings <= hi:
            problems.append(f"n_ratings={self.n_ratings} must be in [{lo}, {hi}] for these users")
        if not 0 <= self.n_genome_items <= self.n_items:
            problems.append("n_genome_items must be in 0..n_items")
        if self.n_genome_tags < self.n_clusters:
            problems.append("n_genome_tags must be >= n_clusters (each cluster owns tag words)")
        if self.n_tags_rows < 0:
            problems.append("n_tags_rows must be >= 0")
        if not 0 <= self.n_neighbours <= self.n_clusters - 1:
            problems.append("n_neighbours must be in 0..n_clusters - 1")
        if (
            self.stay_prob < 0
            or self.neighbour_prob < 0
            or self.stay_prob + self.neighbour_prob >= 1
        ):
            problems.append("stay_prob, neighbour_prob must be >= 0 with a sum < 1")
        if self.zipf_exponent < 0 or self.length_sigma < 0:
            problems.append("zipf_exponent and length_sigma must be >= 0")
        if problems:
            raise ConfigError("invalid SyntheticConfig: " + "; ".join(problems))

    @classmethod
    def ml25m(cls, seed: int = 0) -> SyntheticConfig:
        """ML-25M's exact sizes: 25,000,095 ratings, 162,541 users, 59,047 rated movies."""
        return cls(
            n_users=162_541,
            n_items=59_047,
            n_ratings=25_000_095,
            n_movies=62_423,
            n_clusters=20,
            n_genome_items=13_816,
            n_genome_tags=1_128,
            n_tags_rows=1_093_360,
            seed=seed,
        )

    @classmethod
    def demo(cls, seed: int = 0) -> SyntheticConfig:
        """A small dataset (2,000 users, 1,000 items, 60,000 ratings) for tests and demos."""
        return cls(
            n_users=2_000,
            n_items=1_000,
            n_ratings=60_000,
            n_movies=1_060,
            n_clusters=8,
            n_genome_items=400,
            n_genome_tags=64,
            n_tags_rows=2_000,
            seed=seed,
            max_user_ratings=500,
            zipf_exponent=0.7,  # flatter: every item must get a rating
        )


def stream_rng(config: SyntheticConfig, stream: int) -> np.random.Generator:
    """Independent generator per purpose, so the model never depends on how ratings are drawn."""
    return np.random.default_rng([config.seed, stream])


@dataclasses.dataclass(frozen=True, eq=False)
class Synthetic:
    """The planted model of a synthetic dataset: clusters, Markov chain, popularity, features.

    Dense item `j` is movieId `item_movie_ids[j]` (sorted); oracle outputs are aligned with it.
    """

    config: SyntheticConfig
    item_movie_ids: np.ndarray  # [n_items] int64, sorted rated movieIds
    item_cluster: np.ndarray  # [n_items] int64 cluster of each rated item
    item_popularity: np.ndarray  # [n_items] float64 p(item | its cluster); sums to 1 per cluster
    transition: np.ndarray  # [C, C] float64 row-stochastic T, all entries > 0
    start: np.ndarray  # [C] float64 stationary distribution of T (first item's cluster)
    movie_ids: np.ndarray  # [n_movies] int64 sorted movieIds of movies.csv
    movie_cluster: np.ndarray  # [n_movies] int64 cluster of every movie, rated or not
    cluster_genres: tuple[tuple[str, ...], ...]  # [C] the 1-3 characteristic genres
    genome_tags: tuple[str, ...]  # [n_genome_tags] tag words; tagId = index + 1
    tag_cluster: np.ndarray  # [n_genome_tags] int64 cluster owning each tag word
    genome_centroids: np.ndarray  # [C, n_genome_tags] float64 mean genome vector per cluster
    path: str | None = None  # directory holding the CSV files, when written

    @property
    def n_items(self) -> int:
        return len(self.item_movie_ids)

    def dense_items(self, movie_ids: np.ndarray) -> np.ndarray:
        """Dense item ids (0..n_items-1) of rated movieIds; raises ValueError for unknown ids."""
        movie_ids = np.asarray(movie_ids, dtype=np.int64).reshape(-1)
        dense = np.searchsorted(self.item_movie_ids, movie_ids)
        dense = np.minimum(dense, self.n_items - 1)
        bad = self.item_movie_ids[dense] != movie_ids
        if bad.any():
            raise ValueError(f"movieId {movie_ids[bad][0]} is not a rated item of this dataset")
        return dense

    def _score_row(self, row: int) -> np.ndarray:
        """Unnormalised q over all items from state `row` (a cluster, or C for the start)."""
        weights = self.start if row == len(self.start) else self.transition[row]
        return weights[self.item_cluster] * self.item_popularity

    def next_item_probs(self, history_movie_ids: np.ndarray) -> np.ndarray:
        """True distribution of the next movie given a chronological history of movieIds.

        Returns:
            [n_items] float64 aligned with `item_movie_ids`, zero on the history, summing to 1.
        """
        history = self.dense_items(history_movie_ids)
        row = self.item_cluster[history[-1]] if history.size else len(self.start)
        probs = self._score_row(row)
        probs[history] = 0.0
        total = probs.sum()
        if total == 0:
            raise ValueError("the history holds every item: there is no next item to predict")
        return probs / total

    def oracle_ndcg_at_k(
        self, histories: Sequence[np.ndarray], targets: np.ndarray, k: int = 10
    ) -> float:
        """Mean NDCG@k of ranking all items by `next_item_probs` (one target per user).

        As PROTOCOL.md ranks models: rank = 1 + number of non-history items whose probability
        is strictly higher than the target's + half the other non-history items of exactly the
        target's probability; the gain is 1 / log2(rank + 1) when rank <= k, and 0 when the
        target is in the history.
        """
        targets = self.dense_items(targets)
        if len(histories) != len(targets):
            raise ValueError(f"{len(histories)} histories but {len(targets)} targets")
        n_users, n_states = len(targets), len(self.start) + 1
        scores = np.stack([self._score_row(r) for r in range(n_states)])  # [C + 1, n_items]
        sorted_scores = np.sort(scores, axis=1)
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = self.dense_items(np.concatenate([np.asarray(h) for h in histories] + [[]]))
        rows = np.full(n_users, n_states - 1)  # the start state for empty histories
        has = lengths > 0
        rows[has] = self.item_cluster[flat[np.cumsum(lengths)[has] - 1]]
        target_score = scores[rows, targets]
        n_gt = np.zeros(n_users, np.int64)  # items (history included) scoring > the target
        n_eq = np.zeros(n_users, np.int64)  # items (target and history included) scoring ==
        for r in np.unique(rows):
            sel = rows == r
            above = np.searchsorted(sorted_scores[r], target_score[sel], side="right")
            n_gt[sel] = self.n_items - above
            n_eq[sel] = above - np.searchsorted(sorted_scores[r], target_score[sel], side="left")
        keys = np.sort(np.repeat(np.arange(n_users), lengths) * self.n_items + flat)
        keys = keys[np.concatenate([[True], np.diff(keys) > 0])]  # (user, item), deduplicated
        users, items = keys // self.n_items, keys % self.n_items
        hist_scores = scores[rows[users], items]
        hist_gt = np.bincount(users, hist_scores > target_score[users], minlength=n_users)
        hist_eq = np.bincount(users, hist_scores == target_score[users], minlength=n_users)
        # The target is one of the n_eq (its own score); in the history its gain is 0 anyway.
        rank = 1 + (n_gt - hist_gt) + (n_eq - 1 - hist_eq) / 2
        gain = np.where(rank <= k, 1.0 / np.log2(rank + 1.0), 0.0)
        target_keys = np.arange(n_users) * self.n_items + targets
        found = np.minimum(np.searchsorted(keys, target_keys), max(len(keys) - 1, 0))
        if len(keys):
            gain[keys[found] == target_keys] = 0.0  # the target is in the history
        return float(gain.mean()) if n_users else 0.0


def build_planted_model(config: SyntheticConfig, path: str | None = None) -> Synthetic:
    """The planted model, regenerated deterministically from the config (no ratings)."""
    rng, c_num = stream_rng(config, 0), config.n_clusters
    max_id = max(config.n_movies, round(config.n_movies * _MAX_MOVIE_ID_RATIO))
    movie_ids = np.sort(rng.choice(max_id, config.n_movies, replace=False) + 1).astype(np.int64)
    rated = np.sort(rng.choice(config.n_movies, config.n_items, replace=False))
    floor = (1.0 - config.stay_prob - config.neighbour_prob) / c_num
    transition = np.full((c_num, c_num), floor) + config.stay_prob * np.eye(c_num)
    for c in range(c_num):
        if config.n_neighbours:
            others = np.delete(np.arange(c_num), c)
            near = rng.choice(others, config.n_neighbours, replace=False)
            transition[c, near] += config.neighbour_prob * rng.dirichlet(np.ones(len(near)))
    transition /= transition.sum(axis=1, keepdims=True)
    start = np.full(c_num, 1.0 / c_num)
    for _ in range(10_000):  # power iteration; T > 0 everywhere, so this converges fast
        start = start @ transition
    start /= start.sum()
    # Cluster sizes ∝ the chain's stationary mass, so ratings per item do not depend on the cluster.
    counts = np.maximum(np.floor(start * (config.n_items - c_num)).astype(np.int64), 0) + 1
    deficit_first = np.argsort(counts - start * config.n_items, kind="stable")
    counts[deficit_first[: config.n_items - counts.sum()]] += 1
    item_cluster = rng.permutation(np.repeat(np.arange(c_num), counts))
    movie_cluster = rng.choice(c_num, config.n_movies, p=start)
    movie_cluster[rated] = item_cluster
    # Popularity rank inside the cluster, in random order so it is unrelated to movieId.
    by_cluster = np.lexsort((rng.random(config.n_items), item_cluster))
    seg = np.searchsorted(item_cluster[by_cluster], np.arange(c_num + 1))
    rank = np.empty(config.n_items, np.int64)
    rank[by_cluster] = np.arange(config.n_items) - np.repeat(seg[:-1], np.diff(seg))
    pop = (rank + 1.0) ** -config.zipf_exponent
    pop /= np.bincount(item_cluster, pop, minlength=c_num)[item_cluster]
    cluster_genres = tuple(
        tuple(GENRES[g] for g in sorted(rng.choice(len(GENRES), rng.integers(1, 4), replace=False)))
        for _ in range(c_num)
    )
    tag_cluster = rng.permutation(config.n_genome_tags) % c_num
    centroids = rng.uniform(0.02, 0.3, (c_num, config.n_genome_tags))
    own = tag_cluster[None, :] == np.arange(c_num)[:, None]
    centroids[own] = rng.uniform(0.6, 0.95, own.sum())
    return Synthetic(
        config=config,
        item_movie_ids=movie_ids[rated],
        item_cluster=item_cluster,
        item_popularity=pop,
        transition=transition,
        start=start,
        movie_ids=movie_ids,
        movie_cluster=movie_cluster,
        cluster_genres=cluster_genres,
        genome_tags=_tag_words(rng, config.n_genome_tags),
        tag_cluster=tag_cluster,
        genome_centroids=centroids,
        path=path,
    )


def _tag_words(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    """`n` distinct pronounceable pseudo-words (no commas or quotes)."""
    syllables = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]  # 70
    picks = rng.choice(len(syllables) ** 3, n, replace=False)
    s = len(syllables)
    return tuple(syllables[p // s**2] + syllables[p // s % s] + syllables[p % s] for p in picks)


def user_lengths(config: SyntheticConfig) -> np.ndarray:
    """[n_users] int64 ratings per user: >= min, <= cap, log-normal tail, summing to n_ratings."""
    rng = stream_rng(config, 1)
    weights = rng.lognormal(0.0, config.length_sigma, config.n_users)
    cap = min(config.max_user_ratings, config.n_items) - config.min_user_ratings
    extra = np.zeros(config.n_users)
    free = np.ones(config.n_users, bool)
    left = config.n_ratings - config.n_users * config.min_user_ratings
    while left > 0:  # proportional shares; users over the cap are capped and the rest re-shared
        share = left * weights[free] / weights[free].sum()
        over = share > cap
        if not over.any():
            extra[free] = share
            break
        idx = np.flatnonzero(free)[over]
        extra[idx], free[idx] = cap, False
        left -= cap * len(idx)
    whole = np.floor(extra).astype(np.int64)
    missing = config.n_ratings - config.n_users * config.min_user_ratings - whole.sum()
    whole[np.argsort(whole - extra, kind="stable")[:missing]] += 1  # largest remainders
    return whole + config.min_user_ratings


def generate_sequences(model: Synthetic, lengths: np.ndarray) -> np.ndarray:
    """[n_ratings] int32 dense items, CSR by user (offsets = cumsum(lengths)), generation order."""
    config, c_num, n_items = model.config, len(model.start), model.n_items
    rng = stream_rng(config, 2)
    trans = np.vstack([model.transition, model.start[None]])  # [C + 1, C]; row C = first item
    trans_key = np.arange(c_num + 1)[:, None] + np.cumsum(trans, axis=1)
    trans_key[:, -1] = np.arange(1, c_num + 2)
    trans_key = trans_key.ravel()  # row r lives in (r, r + 1]: one searchsorted for all rows
    by_cluster = np.lexsort((-model.item_popularity, model.item_cluster))
    seg = np.searchsorted(model.item_cluster[by_cluster], np.arange(c_num + 1))
    sorted_pop = model.item_popularity[by_cluster]
    item_key = np.empty(n_items)
    for c in range(c_num):  # cluster c lives in (c, c + 1]
        item_key[seg[c] : seg[c + 1]] = c + np.cumsum(sorted_pop[seg[c] : seg[c + 1]])
        item_key[seg[c + 1] - 1] = c + 1
    cluster_size = np.diff(seg)
    n_bytes = (n_items + 7) // 8

    def draw_item(cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(item_key, cluster + u, side="right")
        return by_cluster[np.minimum(pos, seg[cluster + 1] - 1)]

    def draw(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = rng.random((2, len(state)))
        pos = np.searchsorted(trans_key, state + u[0], side="right")
        cluster = np.minimum(pos - state * c_num, c_num - 1)
        return cluster, draw_item(cluster, u[1])

    out = np.empty(int(lengths.sum()), np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    order = np.argsort(-lengths, kind="stable")
    for lo in range(0, config.n_users, _CHUNK_USERS):
        users = order[lo : lo + _CHUNK_USERS]
        neg_len, base, rows = -lengths[users], offsets[users], np.arange(len(users))
        seen = np.zeros(len(users) * n_bytes, np.uint8)  # flat [users, n_bytes] bitmap
        unseen_mass = np.ones((len(users), c_num))  # sum of p over unseen items per cluster
        unseen_count = np.tile(cluster_size, (len(users), 1))
        state = np.full(len(users), c_num)

        def is_seen(r: np.ndarray, it: np.ndarray, seen=seen) -> np.ndarray:
            return (seen[r * n_bytes + (it >> 3)] >> (it & 7)) & 1 == 1

        for t in range(-neg_len[0]):
            n_act = np.searchsorted(neg_len, -t, side="left")
            act, st = rows[:n_act], state[:n_act]
            cluster, item = draw(st)
            todo = np.flatnonzero(is_seen(act, item)) if t else np.zeros(0, np.int64)
            for _ in range(_ITEM_ROUNDS):
                if not todo.size:
                    break
                c2, i2 = draw(st[todo])
                ok = ~is_seen(todo, i2)
                cluster[todo[ok]], item[todo[ok]] = c2[ok], i2[ok]
                todo = todo[~ok]
            if todo.size:  # exact cluster from T * (unseen mass), then the item inside it
                w = trans[st[todo]] * np.maximum(unseen_mass[todo], 0) * (unseen_count[todo] > 0)
                cum = np.cumsum(w, axis=1)
                x = rng.random(len(todo)) * cum[:, -1]
                last_ok = c_num - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
                c2 = np.minimum((cum <= x[:, None]).sum(axis=1), last_ok)
                cluster[todo] = c2
                pending, pc = todo, c2
                for _ in range(_CLUSTER_ROUNDS):
                    i2 = draw_item(pc, rng.random(len(pending)))
                    ok = ~is_seen(pending, i2)
                    item[pending[ok]] = i2[ok]
                    pending, pc = pending[~ok], pc[~ok]
                    if not pending.size:
                        break
                for r, c, u in zip(pending, pc, rng.random(len(pending)), strict=True):
                    cand = by_cluster[seg[c] : seg[c + 1]]
                    w1 = sorted_pop[seg[c] : seg[c + 1]] * ~is_seen(np.full_like(cand, r), cand)
                    cum1 = np.cumsum(w1)
                    j = min(
                        np.searchsorted(cum1, u * cum1[-1], side="right"), np.flatnonzero(w1)[-1]
                    )
                    item[r] = cand[j]
            seen[act * n_bytes + (item >> 3)] |= (1 << (item & 7)).astype(np.uint8)
            unseen_mass[act, cluster] -= model.item_popularity[item]
            unseen_count[act, cluster] -= 1
            state[:n_act] = cluster
            out[base[:n_act] + t] = item
    return out
