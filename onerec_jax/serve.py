"""`--mode serve`: an HTTP JSON recommendation service over a trained run.

    python -m onerec_jax.main --mode serve --workdir runs/sasrec --port 8000
    curl -s localhost:8000/recommend -d '{"user": 42, "k": 5}'
    curl -s localhost:8000/recommend -d '{"items": ["Toy Story (1995)", 260], "k": 5}'

Routes:
- `POST /recommend` with a JSON object: `user` (a source user id of the trained data) or
  `items` (movies watched, oldest first: titles or movieIds, as `--mode recommend --items`
  takes them), `k` (default 10), `exclude_seen` (default true). Answers
  `{"model", "k", "items": [{"rank", "movie_id", "title", "year", "genres", "score"}]}`,
  the list `--mode recommend` prints for the same query.
- `GET /health`: `{"status": "ok", "model", "items", "users", "best_step", ...}`.

A request that cannot be served (malformed JSON, an unknown user or title, a bad `k`) is
answered 400 with `{"error": reason}`; an unexpected failure inside the model is answered 500
and the service keeps running.

Requests are batched: `Batcher` takes what arrives within `max_wait_ms` of the first waiting
request (or `max_batch` requests) and answers it with one jitted call per (k, user-or-items)
group (`Recommender.recommend_batch`), in one worker thread, so the event loop keeps accepting
requests while the model runs. Every batch is padded to a power of two; the first request of a
new shape compiles, which takes seconds: the seen items of every request are padded to the
longest user's history (`fix_history_width`), so the shapes are the batch sizes 1, 2, 4 ..
max_batch for each k, and `--serve_warmup` (on by default) compiles them for k = 10 at start.

Server library: aiohttp. It is asyncio (the batching above is a queue and a timer on the
event loop, not threads and locks), production-grade, maintained, one dependency that is also
the client of the tests and `benchmarks/serve_load.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from aiohttp import web

from onerec_jax.errors import UserError
from onerec_jax.evaluation import ranking
from onerec_jax.recommend import Recommendation, Recommender

MAX_K = 1000  # the longest list one request may ask for


@dataclasses.dataclass(frozen=True)
class Query:
    """One parsed request: dense ids, ready for `Recommender.recommend_batch`."""

    history: np.ndarray  # [n] dense item ids, oldest first
    k: int
    user: int | None  # dense user id, for a `user` request
    exclude_seen: bool


def parse_query(rec: Recommender, body) -> Query:
    """The `Query` of a `/recommend` JSON body; UserError (answered 400) naming what is wrong."""
    if not isinstance(body, dict):
        raise UserError('the body must be a JSON object, e.g. {"user": 42, "k": 10}.')
    unknown = sorted(set(body) - {"user", "items", "k", "exclude_seen"})
    if unknown:
        raise UserError(f"unknown field(s) {unknown}: use user or items, k, exclude_seen.")
    has_user, has_items = body.get("user") is not None, body.get("items") is not None
    if has_user == has_items:
        raise UserError('give exactly one of "user" (a user id) or "items" (a list of movies).')
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise UserError(f'"k" must be an integer from 1 to {MAX_K}, got {k!r}.')
    exclude_seen = body.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise UserError(f'"exclude_seen" must be true or false, got {exclude_seen!r}.')
    if has_user:
        user = body["user"]
        if isinstance(user, bool) or not isinstance(user, int | str):
            raise UserError(f'"user" must be a user id (a number or a string), got {user!r}.')
        dense, history = rec.user_history(user)
        return Query(history, k, dense, exclude_seen)
    items = body["items"]
    if isinstance(items, str | int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, list) or not all(
        isinstance(q, int | str) and not isinstance(q, bool) for q in items
    ):
        raise UserError('"items" must be a list of titles (strings) or movieIds, oldest first.')
    rec.check_new_users()
    return Query(rec.resolve_items([str(q) for q in items]), k, None, exclude_seen)


def to_json(rows: list[Recommendation]) -> list[dict]:
    return [
        {
            "rank": r.rank,
            "movie_id": r.movie_id,
            "title": r.title,
            "year": r.year,
            "genres": list(r.genres),
            "score": r.score,
        }
        for r in rows
    ]


def answer(rec: Recommender, queries: list[Query]) -> list[list[Recommendation]]:
    """Lists for `queries`, in their order: one `recommend_batch` call per (k, has-user) group
    (a generative model's beam width follows k, and a user id is only passed where every row
    has one, so each row equals its own `--mode recommend`)."""
    out: list[list[Recommendation] | None] = [None] * len(queries)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault((q.k, q.user is not None), []).append(i)
    for (k, has_user), rows in groups.items():
        lists = rec.recommend_batch(
            [queries[i].history for i in rows],
            k,
            [queries[i].user for i in rows] if has_user else None,
            [queries[i].exclude_seen for i in rows],
        )
        for i, row in zip(rows, lists, strict=True):
            out[i] = row
    return out


class Batcher:
    """Collects queries on the event loop and answers each batch with one model pass.

    The first waiting query opens a batch; it closes after `max_wait_ms` or at `max_batch`
    queries, and runs in the one worker thread while the next batch collects.
    """

    def __init__(self, rec: Recommender, max_batch: int = 32, max_wait_ms: float = 2.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise UserError(
                f"--serve_max_batch={max_batch} / --serve_max_wait_ms={max_wait_ms}: the batch "
                "needs at least 1 request and the wait must be >= 0 ms."
            )
        self.rec, self.max_batch, self.max_wait = rec, max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batches = 0  # batches run, and the requests they held (GET /health)
        self.requests = 0

    async def start(self, _app=None) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self, _app=None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def submit(self, query: Query) -> list[Recommendation]:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((query, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    while len(batch) < self.max_batch and not self._queue.empty():
                        batch.append(self._queue.get_nowait())  # already waiting: take it
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            batch = [(q, f) for q, f in batch if not f.cancelled()]  # clients that left
            if not batch:
                continue
            try:
                lists = await loop.run_in_executor(
                    self._pool, answer, self.rec, [q for q, _ in batch]
                )
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(batch)
            for (_, f), rows in zip(batch, lists, strict=True):
                if not f.done():
                    f.set_result(rows)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_app(rec: Recommender, *, max_batch: int = 32, max_wait_ms: float = 2.0) -> web.Application:
    """The aiohttp application of the service (tests and `serve` run it)."""
    batcher = Batcher(rec, max_batch, max_wait_ms)
    started = time.time()

    async def recommend(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f'the body is not JSON ({e}); send e.g. {{"user": 42}}.')
        try:
            query = parse_query(rec, body)
        except UserError as e:
            return _error(400, str(e))
        try:
            rows = await batcher.submit(query)
        except UserError as e:
            return _error(400, str(e))
        except Exception as e:  # noqa: BLE001 - answered, logged by aiohttp; the server lives
            return _error(500, f"{type(e).__name__}: {e}")
        return web.json_response(
            {"model": rec.config.model.name, "k": query.k, "items": to_json(rows)}
        )

    async def health(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "model": rec.config.model.name,
                "items": int(rec.data.n_items),
                "users": int(rec.data.n_users),
                "max_batch": batcher.max_batch,
                "max_wait_ms": batcher.max_wait * 1000.0,
                "batches": batcher.batches,
                "requests": batcher.requests,
                "uptime_s": round(time.time() - started, 3),
            }
        )

    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/recommend", recommend)
    app.router.add_get("/health", health)
    app.on_startup.append(batcher.start)
    app.on_cleanup.append(batcher.stop)
    return app


def fix_history_width(rec: Recommender) -> int:
    """Pads every request's seen items to the longest user's history (a power of two), so a
    request's shape depends on the batch size alone: masking a few thousand ids costs little
    beside scoring the catalogue, and a new width would compile mid-service (seconds)."""
    rec.history_floor = ranking.history_width(int(np.diff(rec.data.offsets).max()))
    return rec.history_floor


def warm_up(rec: Recommender, max_batch: int, k: int = 10) -> float:
    """Compiles the batch sizes 1, 2, 4 .. max_batch at `k` (the shapes of `k` requests once
    `fix_history_width` has run); returns the seconds it took."""
    start = time.perf_counter()
    _, history = rec.user_history(rec.data.user_ids[0])
    n = 1
    while True:
        rec.recommend_batch([history] * n, k)
        if n >= max_batch:
            break
        n = min(2 * n, max_batch)
    return time.perf_counter() - start


def serve(
    workdir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    warmup: bool = True,
) -> None:
    """`--mode serve`: runs the service until interrupted (Ctrl-C)."""
    rec = Recommender.from_run(workdir)
    fix_history_width(rec)
    if warmup:
        print(f"warm-up: {warm_up(rec, max_batch):.1f}s", flush=True)
    app = make_app(rec, max_batch=max_batch, max_wait_ms=max_wait_ms)
    print(
        f"serving model {rec.config.model.name!r} of {workdir} on http://{host}:{port} "
        "(POST /recommend, GET /health; Ctrl-C stops)",
        flush=True,
    )
    web.run_app(app, host=host, port=port, print=None)
