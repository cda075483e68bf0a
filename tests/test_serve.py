"""`--mode serve`: the real HTTP service on a free port, called with a real HTTP client.

The lists it serves must equal `Recommender.recommend_*` (themselves checked against the
model's own scores in test_recommend.py) for every request of a concurrent, batched load.
"""

import asyncio
import importlib.util
import re
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from test_recommend import TRAINED, _history, run  # noqa: F401 (fixture)

from onerec_jax import serve

REPO = Path(__file__).resolve().parents[1]


class Server:
    """`serve.make_app` on 127.0.0.1:<free port>, its event loop in a thread."""

    def __init__(self, rec, **kw):
        self.app = serve.make_app(rec, **kw)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app)
        started = threading.Event()

        def main():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)  # port 0: the OS picks a free one
            self.loop.run_until_complete(site.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert started.wait(30)
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture
def server(run):  # noqa: F811
    s = Server(run[1], max_batch=8, max_wait_ms=50.0)
    yield s
    s.close()


async def _post(session, url, body, raw=False):
    kw = {"data": body} if raw else {"json": body}
    async with session.post(url + "/recommend", **kw) as r:
        return r.status, await r.json()


def _calls(url, bodies, raw=False):
    """Every body POSTed at once (concurrent clients); [(status, json)] in order."""

    async def go():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(_post(session, url, b, raw) for b in bodies))

    return asyncio.run(go())


def _health(url):
    async def go():
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as r:
            return r.status, await r.json()

    return asyncio.run(go())


def test_health(server, run):  # noqa: F811
    status, body = _health(server.url)
    assert status == 200
    assert body["status"] == "ok" and body["model"] == "sasrec"
    assert (body["items"], body["users"], body["max_batch"]) == (28, 30, 8)


def test_concurrent_requests_are_batched_and_equal_recommend(server, run):  # noqa: F811
    _, rec = run
    bodies = [{"user": u, "k": 3 + u % 3} for u in range(1, 13)]
    bodies += [{"user": str(u)} for u in range(13, 16)]  # string ids, default k 10
    bodies += [{"items": ["Toy Story", 9, "Heat (1986)"], "k": 5}, {"items": "The Matrix"}]
    out = _calls(server.url, bodies)
    want = [serve.to_json(rec.recommend_for_user(u, k=3 + u % 3)) for u in range(1, 13)]
    want += [serve.to_json(rec.recommend_for_user(u, k=10)) for u in range(13, 16)]
    want += [
        serve.to_json(rec.recommend_for_items(["Toy Story", "9", "Heat (1986)"], k=5)),
        serve.to_json(rec.recommend_for_items(["The Matrix"], k=10)),
    ]
    for (status, body), rows, b in zip(out, want, bodies, strict=True):
        assert status == 200, body
        assert body["k"] == b.get("k", 10) and body["model"] == "sasrec"
        assert [r["movie_id"] for r in body["items"]] == [r["movie_id"] for r in rows]
        assert [r["title"] for r in body["items"]] == [r["title"] for r in rows]
        np.testing.assert_allclose(
            [r["score"] for r in body["items"]], [r["score"] for r in rows], rtol=1e-5, atol=1e-6
        )
    _, health = _health(server.url)
    assert health["requests"] == len(bodies)
    assert health["batches"] < len(bodies)  # 50 ms windows: requests shared model calls


def _unmasked_order(rec, movie_ids):
    """Trained movieIds by the model's float64 score after `movie_ids`, nothing excluded."""
    inputs = np.zeros((1, 6), np.int32)
    inputs[0] = [TRAINED.index(m) + 1 for m in movie_ids[-6:]]
    state = np.asarray(rec.model.user_state(rec.params, {"inputs": inputs}), np.float64)
    scores = (state @ np.asarray(rec.model.item_table(rec.params), np.float64).T)[0][1:]
    return [TRAINED[d] for d in np.argsort(-scores, kind="stable")]


def test_exclude_seen_false_lets_seen_movies_back(server, run):  # noqa: F811
    _, rec = run
    ((status, body),) = _calls(server.url, [{"user": 7, "k": 30, "exclude_seen": False}])
    assert status == 200
    assert [r["movie_id"] for r in body["items"]] == _unmasked_order(rec, _history(7))
    ((_, masked),) = _calls(server.url, [{"user": 7, "k": 30}])
    assert [r["movie_id"] for r in masked["items"]] == [
        m for m in _unmasked_order(rec, _history(7)) if m not in _history(7)
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("{not json", "the body is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"user": 999}, "user 999 is not among the 30 users"),
        ({"user": 1, "items": ["Heat"]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"items": ["Heat"]}, "'Heat' is ambiguous"),
        ({"items": ["Toy Storry"]}, "Did you mean: Toy Story"),
        ({"items": [[1]]}, '"items" must be a list of titles'),
        ({"user": 1, "k": 0}, '"k" must be an integer from 1'),
        ({"user": 1, "k": "5"}, '"k" must be an integer from 1'),
        ({"user": 1, "exclude_seen": "no"}, '"exclude_seen" must be true or false'),
        ({"user": 1, "count": 5}, r"unknown field\(s\) \['count'\]"),
    ],
)
def test_bad_requests_get_400_with_the_reason(server, body, message):
    raw = isinstance(body, str)
    ((status, out),) = _calls(server.url, [body], raw=raw)
    assert status == 400
    assert re.search(message, out["error"]), out
    assert _calls(server.url, [{"user": 1, "k": 2}])[0][0] == 200  # still serving


def test_model_failure_is_500_and_the_server_lives(server, monkeypatch):
    calls = []

    def broken(rec, queries):
        calls.append(len(queries))
        raise RuntimeError("device lost")

    monkeypatch.setattr(serve, "answer", broken)
    ((status, out),) = _calls(server.url, [{"user": 1}])
    assert (status, out["error"]) == (500, "RuntimeError: device lost") and calls == [1]
    monkeypatch.undo()
    assert _calls(server.url, [{"user": 1, "k": 2}])[0][0] == 200


def test_batch_of_users_equals_one_at_a_time(run):  # noqa: F811
    _, rec = run
    users = [3, 4, 5]
    histories = [rec.user_history(u)[1] for u in users]
    dense = [rec.user_history(u)[0] for u in users]
    batch = rec.recommend_batch(histories, 4, dense, exclude_seen=[True, False, True])
    for got, want in (
        (batch[0], rec.recommend_for_user(3, k=4)),
        (batch[2], rec.recommend_for_user(5, k=4)),
    ):
        assert [r[:5] for r in got] == [r[:5] for r in want]  # rank, movie, title, year, genres
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5)
    assert [r.movie_id for r in batch[1]] == _unmasked_order(rec, _history(4))[:4]


def test_load_benchmark_serves_through_main(run):  # noqa: F811
    """benchmarks/serve_load.py against `python -m onerec_jax.main --mode serve` (a process)."""
    spec = importlib.util.spec_from_file_location(
        "serve_load", REPO / "benchmarks" / "serve_load.py"
    )
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    out = serve_load.main(
        [
            f"--workdir={run[0]}",
            "--clients=1,4",
            "--seconds=1",
            "--warmup_seconds=1",
            "--max_batch=4",
            "--check=5",
            "--k=3",
        ]
    )
    assert [lv["clients"] for lv in out["levels"]] == [1, 4]
    for level in out["levels"]:
        assert level["requests"] > 0 and level["errors"] == 0
        assert 0 < level["p50_ms"] <= level["p99_ms"]
    assert (out["checked_users"], out["lists_equal"], out["items"]) == (5, 5, 28)


def test_fixed_history_width_keeps_the_lists(run, monkeypatch):  # noqa: F811
    _, rec = run
    want = [rec.recommend_for_user(u, k=5) for u in (2, 9)]
    monkeypatch.setattr(rec, "history_floor", 0)
    assert serve.fix_history_width(rec) == 8  # every user has 8 movies: a power of two already
    monkeypatch.setattr(rec, "history_floor", 64)  # wider than any history: padding only
    got = [rec.recommend_for_user(u, k=5) for u in (2, 9)]
    assert [[r.movie_id for r in g] for g in got] == [[r.movie_id for r in w] for w in want]
