"""Tests for the synthetic MovieLens generator: layout, determinism, oracle, planted structure."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pyarrow.csv as pacsv
import pytest

from onerec_jax.data.synthetic import load_synthetic, main, write_synthetic
from onerec_jax.data.synthetic_world import (
    GENRES,
    SyntheticConfig,
    build_planted_model,
    generate_sequences,
    user_lengths,
)

HEADERS = {
    "ratings.csv": "userId,movieId,rating,timestamp",
    "movies.csv": "movieId,title,genres",
    "tags.csv": "userId,movieId,tag,timestamp",
    "links.csv": "movieId,imdbId,tmdbId",
    "genome-tags.csv": "tagId,tag",
    "genome-scores.csv": "movieId,tagId,relevance",
}
# Small enough for pure-Python loops; users rate a third of the items on average, so the
# renormalisation over unseen items matters.
SMALL = SyntheticConfig(
    n_users=400,
    n_items=120,
    n_ratings=16_000,
    n_movies=130,
    n_clusters=4,
    n_genome_items=60,
    n_genome_tags=16,
    n_tags_rows=300,
    max_user_ratings=80,
    zipf_exponent=0.7,
    seed=3,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "demo"
    model = write_synthetic(SyntheticConfig.demo(), out)
    tables = {name: pacsv.read_csv(out / name) for name in HEADERS}
    return model, out, tables


def _sequences(model, config):
    """Every user's generated movieIds in generation order (a list of arrays)."""
    lengths = user_lengths(config)
    items = generate_sequences(model, lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [items[offsets[u] : offsets[u + 1]] for u in range(config.n_users)]


def test_presets_have_ml25m_sizes():
    config = SyntheticConfig.ml25m()
    assert (config.n_ratings, config.n_users, config.n_items) == (25_000_095, 162_541, 59_047)
    assert (config.n_movies, config.n_genome_items, config.n_genome_tags) == (62_423, 13_816, 1_128)
    lengths = user_lengths(config)
    assert lengths.sum() == 25_000_095 and lengths.min() == 20
    assert lengths.max() <= config.max_user_ratings
    assert lengths.max() > 100 * np.median(lengths)  # heavy tail (ML-25M: 32,202 vs 71)


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="n_ratings=100"):
        dataclasses.replace(SMALL, n_ratings=100)  # < 400 users * 20
    with pytest.raises(ValueError, match="n_movies"):
        dataclasses.replace(SMALL, n_movies=10)


def test_too_sparse_config_fails_cleanly(tmp_path):
    # 400 ratings over 400 Zipf-popular items leave many items unrated.
    sparse = dataclasses.replace(SMALL, n_users=20, n_items=400, n_ratings=400, n_movies=400)
    with pytest.raises(ValueError, match="got no rating"):
        write_synthetic(sparse, tmp_path / "sparse")
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone


def test_files_have_exact_counts_and_layout(demo):
    model, out, tables = demo
    for name, header in HEADERS.items():
        with open(out / name, encoding="utf-8") as f:
            assert f.readline().rstrip("\n") == header
    ratings = tables["ratings.csv"]
    users, movies = ratings["userId"].to_numpy(), ratings["movieId"].to_numpy()
    assert ratings.num_rows == 60_000
    assert np.array_equal(np.unique(users), np.arange(1, 2_001))
    assert (
        np.array_equal(np.unique(movies), model.item_movie_ids)
        and len(model.item_movie_ids) == 1000
    )
    assert np.bincount(users)[1:].min() >= 20
    key = users * 1_000_000 + movies
    assert np.all(np.diff(key) > 0)  # sorted by (userId, movieId), hence no duplicate pair
    assert set(np.unique(ratings["rating"].to_numpy())) == set(np.arange(1, 11) / 2)
    text = (out / "ratings.csv").read_text()
    assert '"' not in text
    assert all(re.fullmatch(r"\d+,\d+,\d\.\d,\d+", line) for line in text.splitlines()[1:200])
    movies_table = tables["movies.csv"]
    assert np.array_equal(movies_table["movieId"].to_numpy(), model.movie_ids)
    assert movies_table.num_rows == 1060 and model.movie_ids[-1] > 2 * 1060  # sparse ids
    titles = movies_table["title"].to_pylist()
    with_comma = [t for t in titles if ", The (" in t]
    assert with_comma and all(
        re.fullmatch(r"Synthetic Movie \d+(, The)? \(\d{4}\)", t) for t in titles
    )
    quoted = [line for line in (out / "movies.csv").read_text().splitlines() if '"' in line]
    assert len(quoted) == len(with_comma)
    assert tables["links.csv"].num_rows == 1060 and tables["tags.csv"].num_rows == 2000
    assert tables["genome-tags.csv"]["tagId"].to_pylist() == list(range(1, 65))
    genome = tables["genome-scores.csv"]
    assert genome.num_rows == 400 * 64
    g_key = genome["movieId"].to_numpy() * 100 + genome["tagId"].to_numpy()
    assert np.all(np.diff(g_key) > 0)
    relevance = genome["relevance"].to_numpy()
    assert relevance.min() >= 0 and relevance.max() <= 1
    assert set(np.unique(genome["movieId"].to_numpy())) <= set(model.item_movie_ids)


def test_same_seed_same_bytes_and_cache(demo, tmp_path):
    model, out, _ = demo
    again = write_synthetic(SyntheticConfig.demo(), tmp_path / "again")
    other = write_synthetic(SyntheticConfig.demo(seed=1), tmp_path / "other")
    for name in HEADERS:
        first = (out / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first
        assert (tmp_path / "other" / name).read_bytes() != first
    assert np.array_equal(again.transition, model.transition)
    stamp = os.stat(tmp_path / "again" / "ratings.csv").st_mtime_ns
    write_synthetic(SyntheticConfig.demo(), tmp_path / "again")  # same config: not rewritten
    assert os.stat(tmp_path / "again" / "ratings.csv").st_mtime_ns == stamp
    assert other.config.seed == 1 and load_synthetic(tmp_path / "other").config.seed == 1
    main(["--preset", "demo", "--out", str(tmp_path / "other"), "--seed", "2"])  # replaces it
    assert load_synthetic(tmp_path / "other").config.seed == 2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        write_synthetic(SMALL, tmp_path / "foreign")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "foreign", "other"]


def test_sorting_by_time_recovers_generation_order(demo):
    model, _, tables = demo
    ratings = tables["ratings.csv"]
    users = ratings["userId"].to_numpy()
    movies, stamps = ratings["movieId"].to_numpy(), ratings["timestamp"].to_numpy()
    by_time = np.lexsort((stamps, users))
    same_user = np.diff(users[by_time]) == 0
    assert np.all(np.diff(stamps[by_time])[same_user] > 0)  # strictly increasing, no ties
    generated = np.concatenate(_sequences(model, model.config))
    assert np.array_equal(movies[by_time], model.item_movie_ids[generated])
    assert not np.array_equal(by_time, np.arange(len(users)))  # file order is not time order


def _reference_probs(model, history):
    """Slow loop version of q(i) ∝ T[c(last), c(i)] p(i | c(i)) over items not in the history."""
    seen = set(int(h) for h in history)
    weights = []
    for j, movie in enumerate(model.item_movie_ids):
        if int(movie) in seen:
            weights.append(0.0)
            continue
        c = int(model.item_cluster[j])
        if len(history):
            last = int(np.flatnonzero(model.item_movie_ids == history[-1])[0])
            t = model.transition[int(model.item_cluster[last]), c]
        else:
            t = model.start[c]
        weights.append(t * model.item_popularity[j])
    total = sum(weights)
    return np.array([w / total for w in weights])


def test_oracle_matches_slow_reference():
    model = build_planted_model(SMALL)
    # p(. | c) is Zipf: sums to 1 per cluster, ratio of ranks 1 and 2 is 2 ** 0.7.
    assert np.allclose(np.bincount(model.item_cluster, model.item_popularity), 1.0)
    top2 = np.sort(model.item_popularity[model.item_cluster == 0])[::-1][:2]
    assert top2[0] / top2[1] == pytest.approx(2**0.7)
    assert np.allclose(model.transition.sum(axis=1), 1) and model.transition.min() > 0
    assert np.allclose(model.start @ model.transition, model.start)
    seqs = _sequences(model, SMALL)
    for history in ([], model.item_movie_ids[seqs[0][:1]], model.item_movie_ids[seqs[5][:30]]):
        history = np.asarray(history, dtype=np.int64)
        probs = model.next_item_probs(history)
        assert probs.sum() == pytest.approx(1.0)
        assert np.all(probs[np.isin(model.item_movie_ids, history)] == 0)
        np.testing.assert_allclose(probs, _reference_probs(model, history), rtol=1e-12)
    with pytest.raises(ValueError, match="movieId 999999"):
        model.next_item_probs(np.array([999_999]))


@pytest.mark.parametrize("tied", [False, True])
def test_oracle_ndcg_matches_brute_force(tied):
    model = build_planted_model(SMALL)
    if tied:  # popularity on a coarse grid (never 0): many items tie with the target
        coarse = np.ceil(model.item_popularity * 50) / 50
        model = dataclasses.replace(model, item_popularity=coarse)
    seqs = [model.item_movie_ids[s] for s in _sequences(model, SMALL)[:50]]
    histories = [s[:-1] for s in seqs] + [np.array([], np.int64), seqs[0][:-1]]
    targets = np.array([s[-1] for s in seqs] + [seqs[1][0], seqs[0][0]])  # last: in history
    gains, n_tied = [], 0
    for history, target in zip(histories, targets, strict=True):
        probs = model.next_item_probs(history)
        p_t = probs[model.item_movie_ids == target][0]
        # PROTOCOL.md: 1 + strictly higher + half the other items of the same probability.
        n_tied += np.count_nonzero(probs == p_t) - 1 if p_t > 0 else 0
        rank = 1 + np.count_nonzero(probs > p_t) + (np.count_nonzero(probs == p_t) - 1) / 2
        gains.append(1 / np.log2(rank + 1) if p_t > 0 and rank <= 10 else 0.0)
    assert gains[-1] == 0.0
    assert (n_tied > 50) == tied  # the tied case exercises ties, the other has none or few
    assert model.oracle_ndcg_at_k(histories, targets, k=10) == pytest.approx(np.mean(gains), 1e-12)


def test_generated_steps_follow_the_oracle():
    """Counts of (previous cluster -> next cluster) and of next items match the oracle's sums.

    Each step's next cluster is a Bernoulli draw from the oracle's probabilities, so a count N has
    mean E = sum of those probabilities and variance <= E; with 16 cells we allow 5 sigma per cell
    and a chi-square below df + 6 sqrt(2 df) (chi-square mean df, sd sqrt(2 df)). The same holds
    for the next items' counts; there, the raw rule (T * p, no renormalisation over unseen items)
    must fail the bound threefold, showing the test tells the two rules apart.
    """
    model = build_planted_model(SMALL)
    c_num, n_items = SMALL.n_clusters, SMALL.n_items
    observed, expected = np.zeros((c_num, c_num)), np.zeros((c_num, c_num))
    item_obs, item_exp, item_raw = np.zeros(n_items), np.zeros(n_items), np.zeros(n_items)
    for seq in _sequences(model, SMALL):
        movies = model.item_movie_ids[seq]
        for t in range(1, len(seq)):
            probs = model.next_item_probs(movies[:t])
            prev = model.item_cluster[seq[t - 1]]
            expected[prev] += np.bincount(model.item_cluster, probs, minlength=c_num)
            observed[prev, model.item_cluster[seq[t]]] += 1
            item_exp += probs
            item_raw += model.transition[prev][model.item_cluster] * model.item_popularity
            item_obs[seq[t]] += 1
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected) + 1)
    df = c_num * (c_num - 1)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < df + 6 * np.sqrt(2 * df)
    item_df = n_items - c_num
    item_bound = item_df + 6 * np.sqrt(2 * item_df)
    assert ((item_obs - item_exp) ** 2 / item_exp).sum() < item_bound
    assert ((item_obs - item_raw) ** 2 / item_raw).sum() > 3 * item_bound


def _ndcg(score_rows, histories, targets):
    gains = []
    for scores, history, target in zip(score_rows, histories, targets, strict=True):
        scores = scores.astype(float)
        scores[history] = -np.inf
        rank = 1 + np.count_nonzero(scores > scores[target])  # PROTOCOL.md rank
        gains.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    return float(np.mean(gains))


def test_cluster_markov_beats_popularity(demo):
    """A first-order Markov chain on clusters, fit on the training prefix, learns the structure."""
    model, _, _ = demo
    seqs = _sequences(model, model.config)
    histories, targets = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])
    c_num, cluster = model.config.n_clusters, model.item_cluster
    counts = np.bincount(np.concatenate(histories), minlength=model.n_items).astype(float)
    pairs = np.ones((c_num, c_num))
    for h in histories:
        np.add.at(pairs, (cluster[h[:-1]], cluster[h[1:]]), 1)
    t_hat = pairs / pairs.sum(axis=1, keepdims=True)
    within = counts / np.bincount(cluster, counts)[cluster]
    popularity = _ndcg([counts] * len(seqs), histories, targets)
    markov = _ndcg([t_hat[cluster[h[-1]], cluster] * within for h in histories], histories, targets)
    movie = model.item_movie_ids
    oracle = model.oracle_ndcg_at_k([movie[h] for h in histories], movie[targets])
    assert markov > 1.6 * popularity
    assert oracle > 1.6 * popularity and markov < oracle + 0.01


def test_features_carry_the_cluster(demo):
    model, _, tables = demo
    genome = tables["genome-scores.csv"]
    n_tags = model.config.n_genome_tags
    vectors = genome["relevance"].to_numpy().reshape(-1, n_tags)  # [n_genome_items, n_tags]
    clusters = model.item_cluster[model.dense_items(genome["movieId"].to_numpy()[::n_tags])]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = clusters[:, None] == clusters[None, :]
    off_diagonal = ~np.eye(len(clusters), dtype=bool)
    margin = cosine[same & off_diagonal].mean() - cosine[~same].mean()
    assert margin > 0.3
    # The cluster whose own tag words score highest is the item's cluster, for every item.
    own = np.stack([vectors[:, model.tag_cluster == c].mean(axis=1) for c in range(8)], axis=1)
    assert np.array_equal(own.argmax(axis=1), clusters)
    movies = tables["movies.csv"]
    n_listed = 0
    for movie_cluster, genres in zip(
        model.movie_cluster, movies["genres"].to_pylist(), strict=True
    ):
        if genres == "(no genres listed)":
            continue
        n_listed += 1
        assert set(genres.split("|")) & set(model.cluster_genres[movie_cluster])
        assert set(genres.split("|")) <= set(GENRES)
    assert 0.95 * len(model.movie_cluster) <= n_listed < len(model.movie_cluster)
    tags = tables["tags.csv"]
    word_cluster = dict(zip(model.genome_tags, model.tag_cluster, strict=True))
    tag_clusters = np.array([word_cluster[w] for w in tags["tag"].to_pylist()])
    item_clusters = model.item_cluster[model.dense_items(tags["movieId"].to_numpy())]
    assert np.mean(tag_clusters == item_clusters) > 0.85  # 0.9 + 0.1 / 8 by construction


def test_load_synthetic_gives_the_same_oracle(demo, tmp_path):
    model, out, _ = demo
    loaded = load_synthetic(out)
    assert loaded.config == model.config and loaded.path == model.path
    for field in ("item_movie_ids", "item_cluster", "item_popularity", "transition", "start"):
        assert np.array_equal(getattr(loaded, field), getattr(model, field))
    history = model.item_movie_ids[[3, 50, 7]]
    assert np.array_equal(loaded.next_item_probs(history), model.next_item_probs(history))
    with pytest.raises(FileNotFoundError, match="synthetic.json"):
        load_synthetic(tmp_path)
