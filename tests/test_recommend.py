"""Recommendations from a tiny trained SASRec run: history assembly, exclusion, title lookup."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import UserError
from onerec_jax.recommend import Recommender, format_recommendations, recommendations_text
from onerec_jax.training import train

MOVIES = {
    1: ("Toy Story (1995)", "Adventure|Animation"),
    2: ("Heat (1995)", "Action|Crime"),
    3: ("Heat (1986)", "Action"),
    4: ("Matrix, The (1999)", "Action|Sci-Fi"),
    5: ("Seven (a.k.a. Se7en) (1995)", "Mystery|Thriller"),
    6: ("Lonely Movie (2001)", "Drama"),  # rated once: dropped by min_item_interactions=2
    7: ("Never Rated (2002)", "Drama"),  # in movies.csv, never rated
    **{m: (f"Film {m} (2000)", "Drama") for m in range(8, 31)},
}
TRAINED = [1, 2, 3, 4, 5, *range(8, 31)]  # the 28 movies of the trained catalogue
N_USERS = 30


def _history(user: int) -> list[int]:
    """Movies of source user `user` (1..30), oldest first."""
    return [TRAINED[(3 * user + j) % len(TRAINED)] for j in range(8)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    src = root / "ml"
    src.mkdir()
    rows = [
        (u, m, 4.0, 1000 * u + t) for u in range(1, N_USERS + 1) for t, m in enumerate(_history(u))
    ]
    rows.append((1, 6, 4.0, 999_999))
    (src / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)
    )
    (src / "movies.csv").write_text(
        "movieId,title,genres\n" + "".join(f'{m},"{t}",{g}\n' for m, (t, g) in MOVIES.items())
    )
    c = apply_variant(base_config(), "sasrec")
    c.data.update(
        path=str(src),
        root=str(root),
        max_len=6,
        min_user_interactions=3,
        min_item_interactions=2,
        progress=False,
    )
    c.model.update(dim=16, num_layers=1, num_heads=1, mlp_dim=16, dropout=0.1)
    c.train.update(
        batch_size=16,
        num_steps=2,
        eval_every_steps=2,
        log_every_steps=1,
        progress=False,
        patience=100,
    )
    c.optim.warmup_steps = 1
    c.eval.update(batch_size=32, chunk_size=16, k=10)  # 29 item rows: two chunks
    c.mesh.num_devices = 1
    workdir = root / "run"
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    train.train_and_evaluate(c, workdir)
    return workdir, Recommender.from_run(workdir)


def _reference_scores(rec: Recommender, movie_ids: list[int]) -> np.ndarray:
    """[V] user_state . item_table with `movie_ids` (oldest first) as input; seen and pad -inf."""
    dense = [TRAINED.index(m) + 1 for m in movie_ids]  # dense ids follow ascending movieIds
    inputs = np.zeros((1, 6), np.int32)
    inputs[0, 6 - len(dense[-6:]) :] = dense[-6:]
    state = np.asarray(rec.model.user_state(rec.params, {"inputs": inputs}), np.float64)
    table = np.asarray(rec.model.item_table(rec.params), np.float64)
    scores = (state @ table.T)[0]
    scores[[0, *dense]] = -np.inf
    return scores


def _check_against_reference(rec, rows, movie_ids):
    scores = _reference_scores(rec, movie_ids)
    unseen = len(TRAINED) - len(set(movie_ids))
    assert [r.rank for r in rows] == list(range(1, unseen + 1))  # every unseen item, nothing else
    assert not {r.movie_id for r in rows} & set(movie_ids)
    order = np.argsort(-scores, kind="stable")[:unseen]
    assert [r.movie_id for r in rows] == [TRAINED[d - 1] for d in order]
    assert rows[0].movie_id == TRAINED[int(np.argmax(scores)) - 1]
    np.testing.assert_allclose([r.score for r in rows], scores[order], rtol=1e-4, atol=1e-5)


def test_known_user_gets_unseen_items_ranked_by_the_model(run):
    _, rec = run
    rows = rec.recommend_for_user(7, k=100)  # more than the catalogue: every unseen item
    _check_against_reference(rec, rows, _history(7))  # whole history: train + valid + test
    assert rec.user_history("1")[1].tolist() == [TRAINED.index(m) + 1 for m in _history(1)]
    top = rec.recommend_for_user(7, k=3)
    assert top == rows[:3]
    assert rows[0].title == MOVIES[rows[0].movie_id][0].rsplit(" (", 1)[0]


def test_new_user_from_titles_and_ids(run):
    _, rec = run
    queries = ["toy story", " Heat (1986)", "9", "The Matrix", "se7en", "MATRIX, THE (1999)"]
    want = [1, 3, 9, 4, 5, 4]  # in the order given; a repeat stays a repeat
    assert rec.resolve_items(queries).tolist() == [TRAINED.index(m) + 1 for m in want]
    rows = rec.recommend_for_items(queries, k=50)
    _check_against_reference(rec, rows, want)


@pytest.mark.parametrize(
    "query, message",
    [
        ("Toy Storry", r"no movie titled 'Toy Storry'\. Did you mean: Toy Story \(1995\)"),
        ("Heat", r"'Heat' is ambiguous: Heat \(1995\) \[movieId 2\]; Heat \(1986\) \[movieId 3\]"),
        ("7", r"Never Rated \(2002\) \(movieId 7\) is not in the trained catalogue of 28 items"),
    ],
)
def test_bad_movie_queries_say_what_is_wrong(run, query, message):
    with pytest.raises(UserError, match=message):  # more cases: tests/data/test_catalogue.py
        run[1].recommend_for_items(["Toy Story", query], k=5)


def test_unknown_user_and_user_id_models(run, monkeypatch):
    _, rec = run
    for user in (999, "abc"):
        with pytest.raises(UserError, match=rf"user {user} is not among the 30 users .*1 to 30"):
            rec.recommend_for_user(user, k=5)
    assert not rec.needs_user_ids()  # SASRec's spec: a new user is served from their movies
    monkeypatch.setattr(rec, "spec", dataclasses.replace(rec.spec, reads_user_ids=True))
    with pytest.raises(UserError, match="cannot serve a new user .* sequence model"):
        rec.recommend_for_items(["Toy Story"], k=5)

    class ById(type(rec.model)):  # its user state reads batch["user"] (as BPR's does)
        def user_state(self, params, batch):
            table = self.item_table(params)  # [V, D]: the user's "embedding" is a row
            return table[batch["user"] + 1]

    model = ById(rec.model.module, rec.config, rec.model.info)
    by_id = Recommender(model, rec.params, rec.data, None, rec.config)
    by_id.spec = dataclasses.replace(by_id.spec, reads_user_ids=True)  # as it would declare
    assert by_id.needs_user_ids()
    with pytest.raises(UserError, match="cannot serve a new user"):
        by_id.recommend_for_items(["1"], k=5)
    # User 4 (dense 3) gets state = row 4 of the table, an unseen item: the best score is at
    # least that item's own |row|^2 > 0, so the user id reached the model.
    assert by_id.user_history(4)[0] == 3 and 4 not in _history(4)
    assert by_id.recommend_for_user(4, k=1)[0].score > 0


def test_model_score_chunk_hook_is_used(run):
    _, rec = run

    class Doubled(type(rec.model)):  # a model whose own scorer doubles the dot product
        def score_chunk(self, params, state, ids):
            return 2.0 * state @ self.item_table(params)[ids].T

    model = Doubled(rec.model.module, rec.config, rec.model.info)
    assert not model.dot_product_scores
    doubled = Recommender(model, rec.params, rec.data, None, rec.config)
    want = rec.recommend_for_user(3, k=5)
    got = doubled.recommend_for_user(3, k=5)
    assert [r.movie_id for r in got] == [r.movie_id for r in want]
    np.testing.assert_allclose([r.score for r in got], [2 * r.score for r in want], rtol=1e-5)
    assert got[0].title == "" and "item " in doubled.catalogue.label(1)  # no ItemInfo given


def test_missing_run_pieces_are_user_errors(run, tmp_path):
    workdir, _ = run
    with pytest.raises(UserError, match="no such directory"):
        Recommender.from_run(tmp_path / "nope")
    with pytest.raises(UserError, match="config.json: not found"):
        Recommender.from_run(tmp_path)
    (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(UserError, match="no checkpoints/"):
        Recommender.from_run(tmp_path)
    # A run from before a config key existed: that key takes its default.
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    config = json.loads((workdir / "config.json").read_text())
    del config["model"]["semantic_ids"], config["eval"]
    (old / "config.json").write_text(json.dumps(config))
    again = Recommender.from_run(old)
    assert again.config.eval.k == 50 and again.config.model.semantic_ids == ""
    got, want = again.recommend_for_user(2, k=28), run[1].recommend_for_user(2, k=28)
    assert [r.movie_id for r in got] == [r.movie_id for r in want]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        Recommender.from_run(tmp_path)


def test_format_recommendations(run):
    rows = run[1].recommend_for_items(["Film 8"], k=3)
    table = format_recommendations(rows).splitlines()
    assert table[0].split() == ["rank", "title", "genres", "movieId", "score"]
    first = rows[0]
    assert table[1].split()[0] == "1" and f"{first.score:.3f}" in table[1]
    assert f"{first.title} ({first.year})" in table[1] and str(first.movie_id) in table[1]
    assert len(table) == 4
    assert "already seen" in format_recommendations([])


def test_recommendations_text_is_the_recommend_mode(run):
    workdir, rec = run
    text = recommendations_text(workdir, items=["Toy Story (1995); 9", "Matrix, The"], k=2)
    lines = text.splitlines()
    assert lines[0] == (
        "a new user who watched (oldest first): Toy Story (1995); Film 9 (2000); Matrix, The (1999)"
    )
    table = format_recommendations(rec.recommend_for_items(["1", "9", "4"], k=2))
    assert lines[1] == "top 2 of model 'sasrec':" and "\n".join(lines[2:]) == table
    with pytest.raises(UserError, match="exactly one of them"):
        recommendations_text(workdir, user="1", items=["Heat (1995)"])
    with pytest.raises(UserError, match="exactly one of them"):
        recommendations_text(workdir)
