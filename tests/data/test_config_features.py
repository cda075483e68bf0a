"""Every dataset config x generative variant resolves its item features on a fixture of its layout.

The generative variants' codes come from the `interactions` block; the content blocks a config
names (its `cold_blocks`, which predict the rows of items without training users) must exist in
its release (ML-100K and ML-1M have no user tags, a `user item item ...` file has no content).
Each fixture is a few users in the layout the config reads, written here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from onerec_jax.data import dataset, features
from onerec_jax.tokenize.semantic_ids import random_codes
from onerec_jax.training import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
N_USERS, N_ITEMS, PER_USER = 8, 12, 7
GENRES = ["Action", "Comedy", "Drama", "Sci-Fi"]


def _events():
    """(user, item, timestamp) rows: user u rates items u, u+1, ... (mod N_ITEMS), 1-based."""
    return [
        (u, (u + j) % N_ITEMS + 1, 1000 * u + j)
        for u in range(1, N_USERS + 1)
        for j in range(PER_USER)
    ]


def _write(path: Path, text: str, encoding: str = "utf8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def _csv_layout(d: Path) -> Path:  # ml-latest-small, ML-20M, ML-25M
    _write(
        d / "ratings.csv",
        "userId,movieId,rating,timestamp\n"
        + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in _events()),
    )
    _write(
        d / "movies.csv",
        "movieId,title,genres\n"
        + "".join(
            f'{i},"Film number {i} part {i % 3} ({1980 + i})",'
            f"{GENRES[i % 4]}|{GENRES[(i + 1) % 4]}\n"
            for i in range(1, N_ITEMS + 1)
        ),
    )
    _write(
        d / "tags.csv",
        "userId,movieId,tag,timestamp\n"
        + "".join(f"{u},{i},tag{i % 3},5\n" for u, i, _ in _events()[::3]),
    )
    _write(d / "genome-tags.csv", "tagId,tag\n1,dark\n2,funny\n3,long\n")
    _write(
        d / "genome-scores.csv",
        "movieId,tagId,relevance\n"
        + "".join(
            f"{i},{t},{((i * t) % 7) / 7:.3f}\n" for i in range(1, N_ITEMS + 1) for t in (1, 2, 3)
        ),
    )
    return d


def _dat_layout(d: Path) -> Path:  # ML-1M
    _write(d / "ratings.dat", "".join(f"{u}::{i}::4::{t}\n" for u, i, t in _events()))
    _write(
        d / "movies.dat",
        "".join(
            f"{i}::Film number {i} ({1980 + i})::{GENRES[i % 4]}|{GENRES[(i + 2) % 4]}\n"
            for i in range(1, N_ITEMS + 1)
        ),
        encoding="latin-1",
    )
    return d


def _100k_layout(d: Path) -> Path:  # ML-100K
    _write(d / "u.data", "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in _events()))
    rows = []
    for i in range(1, N_ITEMS + 1):
        flags = ["0"] * 19
        flags[1 + i % 18] = "1"
        rows.append(
            f"{i}|Film number {i} ({1980 + i})|01-Jan-{1980 + i}||http://x|" + "|".join(flags)
        )
    _write(d / "u.item", "\n".join(rows) + "\n", encoding="latin-1")
    return d


def _sequence_layout(d: Path) -> Path:  # configs/custom.py on a `user item item ...` file
    lines = {}
    for u, i, _ in _events():
        lines.setdefault(u, []).append(str(i))
    f = d / "sequences.txt"
    _write(f, "".join(f"{u} {' '.join(items)}\n" for u, items in lines.items()))
    return f


BASE = ("genres", "year", "title")
CONTENT = {  # what each release ships
    "ml100k": BASE,
    "ml1m": BASE,
    "ml20m": BASE + ("tags", "genome"),
    "ml25m": BASE + ("tags", "genome"),
    "ml_latest_small": BASE + ("tags",),
}
LAYOUTS = {
    "custom": (_sequence_layout, "user_sequence"),
    "ml100k": (_100k_layout, "auto"),
    "ml1m": (_dat_layout, "auto"),
    "ml20m": (_csv_layout, "auto"),
    "ml25m": (_csv_layout, "auto"),
    "ml_latest_small": (_csv_layout, "auto"),
}


def _config(name: str, variant: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def test_every_dataset_config_has_a_layout_here():
    names = {p.stem for p in CONFIGS.glob("*.py")}
    # demo: synthetic, with every block; scale: item ids only and no generative variant
    assert names - {"demo", "scale"} == set(LAYOUTS)


@pytest.mark.parametrize("variant", ["tiger", "onerec_sid"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_config_features_resolve_on_its_layout(name, variant, tmp_path, caplog):
    write, fmt = LAYOUTS[name]
    c = _config(name, variant)
    c.data.update(path=str(write(tmp_path / name)), format=fmt, cache_dir="none", progress=False)
    data, items = dataset.load_data(c.data)
    out = features.build_features(c.features, data, items)
    built = [b for b, _, _ in out.blocks]
    assert out.matrix.shape[0] == data.n_items + 1 == N_ITEMS + 1
    assert np.isfinite(out.matrix).all() and out.matrix[1:].any()
    # codes from the items' training users; cold items' rows from the content the config names
    assert built == ["interactions"] and "skipped" not in caplog.text
    cold = c.features.cold_blocks
    if name == "custom":  # no content at all: no cold block resolves
        for block in cold:
            with pytest.raises(features.MissingContent):
                features.raw_block(block, c.features, data, items)
    else:  # the config names what its release ships: every cold block resolves
        assert cold == CONTENT[name]
        for block in cold:
            assert np.isfinite(features.raw_block(block, c.features, data, items)).all()
    # the model's side features resolve too (a sequence file has none: read without them)
    ids = tmp_path / "ids.npz"
    random_codes(data.n_items, 2, 4, 0).save(ids)
    c.model.semantic_ids = str(ids)
    _, model = train.build_model(c, data, items)
    assert model.code_sizes[:2] == (4, 4)
