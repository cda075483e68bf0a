"""`python -m onerec_jax.main --mode prepare` end to end, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "onerec_jax.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture
def ml_dir(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    rows = [(u, 10 + k, 3.0, 100 * u + k) for u in (1, 2, 3) for k in range(3 + u)]
    rows.append((4, 10, 5.0, 1))  # users 1, 2, 3 have 4, 5, 6 ratings; user 4 has 1
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)
    )
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        + "".join(f'{m},"Film {m}, The (2000)",Drama\n' for m in range(10, 17))
    )
    return d


def test_prepare_builds_then_reuses_the_cache(tmp_path, ml_dir):
    args = [
        "--config",
        "configs/custom.py",
        "--mode",
        "prepare",
        f"--workdir={tmp_path / 'wd'}",
        f"--config.data.path={ml_dir}",
        f"--config.data.root={tmp_path / 'root'}",
        "--config.data.min_user_interactions=4",
    ]
    first = _run(*args, cwd=REPO)
    assert first.returncode == 0, first.stderr
    # With min_user_interactions=4, user 4 goes: 15 ratings of items 10..15 remain.
    stats = json.loads((tmp_path / "wd" / "data_stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 6, 15)
    assert "interactions" in first.stdout and "15" in first.stdout
    assert len(list((tmp_path / "root" / "cache").glob("sequences-*.npz"))) == 1
    config = json.loads((tmp_path / "wd" / "config.json").read_text())
    assert config["data"]["min_user_interactions"] == 4
    second = _run(*args, cwd=REPO)
    assert second.returncode == 0
    assert second.stdout.splitlines()[:3] == first.stdout.splitlines()[:3]
    assert len(list((tmp_path / "root" / "cache").glob("sequences-*.npz"))) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.data.path=/no/such/dir"], "/no/such/dir: no such file or directory"),
        (["--config.data.min_user_interactions=2"], "at least 3 interactions"),
        (["--config.data.on_bad_rows=ignore"], "data.on_bad_rows='ignore' is not one of"),
    ],
)
def test_user_errors_are_one_line(tmp_path, ml_dir, extra, message):
    args = [
        "--config",
        "configs/custom.py",
        f"--workdir={tmp_path / 'wd'}",
        f"--config.data.path={ml_dir}",
        f"--config.data.root={tmp_path}",
    ]
    out = _run(*args, *extra, cwd=REPO)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr


def _assert_one_line_error(out, *fragments):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], out.stderr


def _bad_path(tmp_path, kind):
    if kind == "binary":
        (tmp_path / "garbage.bin").write_bytes(bytes(range(256)) * 12)
        return tmp_path / "garbage.bin"
    if kind == "prose":
        (tmp_path / "notes.txt").write_text("hello world\nthis is not ratings\n")
        return tmp_path / "notes.txt"
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("binary", "garbage.bin: a binary file"),
        ("prose", "notes.txt, line 1: 'hello world' is not 'user item item ...'"),
        ("folder", "empty: unknown layout"),
    ],
)
def test_unreadable_data_path_is_one_line_naming_the_layouts(tmp_path, kind, message):
    path = _bad_path(tmp_path, kind)
    args = ["--config", "configs/custom.py", "--mode", "prepare", f"--workdir={tmp_path / 'wd'}"]
    out = _run(*args, f"--config.data.path={path}", f"--config.data.root={tmp_path}", cwd=REPO)
    _assert_one_line_error(out, message, "a folder with ratings.csv (movielens_csv)", "data.format")


@pytest.mark.parametrize("with_config_json", [False, True])
def test_eval_without_checkpoints_is_one_line(tmp_path, ml_dir, with_config_json):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    if with_config_json:
        (workdir / "config.json").write_text("{}")
    args = ["--config", "configs/custom.py", "--mode", "eval", f"--workdir={workdir}"]
    data = [f"--config.data.path={ml_dir}", f"--config.data.root={tmp_path}"]
    out = _run(*args, *data, "--config.data.min_user_interactions=4", cwd=REPO)
    _assert_one_line_error(out, "checkpoints: no checkpoint. Train first (--mode train).")


@pytest.mark.parametrize(
    "config, message",
    [
        ("configs/ml_latest_small.py:nosuch", "--config: unknown config variant 'nosuch': use"),
        ("configs/nosuch.py", "--config=configs/nosuch.py: no such config file"),
        ("configs/demo.py --config.model.dimm=3", "--config.model.dimm: the config has no field"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, config, message):
    out = _run("--config", *config.split(), "--mode", "prepare", f"--workdir={tmp_path}", cwd=REPO)
    _assert_one_line_error(out, message)
