"""Load test of `--mode serve`: p50/p99 latency and requests/s at 1, 8, 64 concurrent clients.

    python benchmarks/serve_load.py --build dev --data.path ../shared/data/ml-latest-small
    python benchmarks/serve_load.py --build ml25m       # a 59,047-item synthetic catalogue
    python benchmarks/serve_load.py --workdir runs/sasrec   # any trained run

`--build` first trains a short run (`--steps`, quality irrelevant: the latency depends on the
model's shapes, not its weights) into `--root`: `dev` the OneRec item head of
`configs/ml_latest_small.py:onerec`, `ml25m` the same model (dim 64, 2 blocks, max_len 200: the
shapes of `configs/ml25m.py:cpu`) on the in-memory synthetic data of `configs/scale.py` with
ML-25M's 59,047 items. The service runs as its own process (`python -m onerec_jax.main
--mode serve`); each client is a coroutine of this process that sends `{"user": u, "k": k}`
for random users of the run, one request after another, for `--seconds` per level after a
warm-up that compiles the service's batch shapes. Afterwards `--check` users' served lists are
compared with `Recommender.recommend_for_user` of this process (the `--mode recommend` lists).
Prints one table line per level as soon as it is measured; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_run(kind: str, root: Path, steps: int, data_path: str | None) -> Path:
    """Trains a `steps`-step run of `kind` (dev or ml25m) into `root/<kind>` (kept if there)."""
    workdir = root / kind
    if (workdir / "results.json").is_file():
        return workdir
    common = [
        f"--config.train.num_steps={steps}",
        f"--config.train.eval_every_steps={steps}",
        "--config.train.progress=False",
        "--config.data.progress=False",
    ]
    if kind == "dev":
        if not data_path:
            raise SystemExit("--build dev needs --data.path (ml-latest-small)")
        args = ["--config", "configs/ml_latest_small.py:onerec", f"--config.data.path={data_path}"]
    else:
        args = [
            "--config",
            "configs/scale.py:onerec",
            "--config.scale.n_items=59047",
            "--config.scale.n_users=2048",
            "--config.scale.eval_users=256",
            "--config.data.max_len=200",
            "--config.model.dim=64",
            "--config.model.mlp_dim=128",
            "--config.model.num_heads=2",
            "--config.eval.chunk_size=0",
            "--config.mesh.shape=(-1,1,1)",
        ]
    cmd = [sys.executable, "-m", "onerec_jax.main", *args, *common, f"--workdir={workdir}"]
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return workdir


class Service:
    """`python -m onerec_jax.main --mode serve` in a subprocess, ready when /health answers."""

    def __init__(self, workdir: Path, max_batch: int, max_wait_ms: float, timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "onerec_jax.main",
            "--mode=serve",
            f"--workdir={workdir}",
            f"--port={self.port}",
            f"--serve_max_batch={max_batch}",
            f"--serve_max_wait_ms={max_wait_ms}",
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO)
        asyncio.run(self._wait(timeout))

    async def _wait(self, timeout: float) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the service exited with code {self.proc.returncode}")
                try:
                    async with session.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the service did not answer /health within {timeout:.0f}s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, users: np.ndarray, clients: int, seconds: float, k: int, seed: int):
    """(latencies in seconds, requests answered, errors, wall seconds) of `clients` coroutines
    sending requests back to back for `seconds`."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    rng = np.random.default_rng(seed)
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)

    async def client(session):
        nonlocal errors
        while time.perf_counter() < stop_at:
            user = users[rng.integers(len(users))]
            body = {"user": user.item() if hasattr(user, "item") else user, "k": k}
            start = time.perf_counter()
            async with session.post(url + "/recommend", json=body) as r:
                await r.read()
                ok = r.status == 200
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
    return np.asarray(latencies), len(latencies), errors, wall


async def served_lists(url: str, users, k: int) -> list[list]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        out = []
        for u in users:
            body = {"user": u.item() if hasattr(u, "item") else u, "k": k}
            async with session.post(url + "/recommend", json=body) as r:
                out.append([row["movie_id"] for row in (await r.json())["items"]])
        return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="a trained run to serve")
    p.add_argument("--build", choices=("dev", "ml25m"), default=None)
    p.add_argument("--data.path", dest="data_path", default=None, help="--build dev: the data")
    p.add_argument("--root", type=Path, default=Path("runs/serve_load"), help="--build: runs")
    p.add_argument("--steps", type=int, default=20, help="--build: training steps")
    p.add_argument("--clients", default="1,8,64", help="concurrency levels")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    p.add_argument("--warmup_seconds", type=float, default=10.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max_batch", type=int, default=32)
    p.add_argument("--max_wait_ms", type=float, default=2.0)
    p.add_argument("--check", type=int, default=20, help="users compared with --mode recommend")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    if (args.workdir is None) == (args.build is None):
        p.error("give --workdir RUN or --build dev|ml25m")
    workdir = args.workdir or build_run(args.build, args.root, args.steps, args.data_path)
    from onerec_jax.recommend import Recommender

    rec = Recommender.from_run(workdir)  # the reference lists, and the run's user ids
    users = rec.data.user_ids
    service = Service(workdir, args.max_batch, args.max_wait_ms)
    result = {
        "workdir": str(workdir),
        "model": rec.config.model.name,
        "items": int(rec.data.n_items),
        "users": int(rec.data.n_users),
        "max_len": int(rec.config.data.max_len),
        "k": args.k,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "cpus": os.cpu_count(),
        "levels": [],
    }
    try:
        levels = [int(c) for c in args.clients.split(",")]
        for clients in sorted(set(levels)):  # compiles the batch shapes each level reaches
            asyncio.run(
                load(service.url, users, clients, args.warmup_seconds / len(levels), args.k, 1)
            )
        print("| clients | requests | errors | req/s | p50 ms | p99 ms |", flush=True)
        print("|---|---|---|---|---|---|", flush=True)
        for clients in levels:
            lat, n, errors, wall = asyncio.run(
                load(service.url, users, clients, args.seconds, args.k, 2)
            )
            row = {
                "clients": clients,
                "requests": n,
                "errors": errors,
                "requests_per_s": n / wall,
                "p50_ms": float(np.percentile(lat, 50) * 1000) if n else float("nan"),
                "p99_ms": float(np.percentile(lat, 99) * 1000) if n else float("nan"),
            }
            result["levels"].append(row)
            print(
                f"| {clients} | {n} | {errors} | {row['requests_per_s']:.1f} | "
                f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |",
                flush=True,
            )
        check = users[np.random.default_rng(3).permutation(len(users))[: args.check]]
        served = asyncio.run(served_lists(service.url, check, args.k))
        want = [[r.movie_id for r in rec.recommend_for_user(u, args.k)] for u in check]
        result["checked_users"] = len(check)
        result["lists_equal"] = sum(s == w for s, w in zip(served, want, strict=True))
        print(f"lists equal to --mode recommend: {result['lists_equal']}/{len(check)}", flush=True)
    finally:
        service.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
