"""`--mode tokenize` (modes.py) end to end on the synthetic demo: files, unique ids, codes follow
content; the ids' model-side checks; a model trained on them."""

import csv
import json

import numpy as np
import pytest

from onerec_jax import modes
from onerec_jax.data import dataset
from onerec_jax.defaults import base_config
from onerec_jax.errors import ConfigError
from onerec_jax.tokenize import quality, run, semantic_ids


def _config(root, method):
    c = base_config()
    c.data.synthetic = "demo"
    c.data.root = str(root)
    c.data.progress = False
    c.features.blocks = ("genres", "tags", "genome")
    c.tokenize.update(
        method=method,
        levels=2,
        codebook_size=16,
        steps=200,
        batch_size=256,
        hidden_dims=(64,),
        latent_dim=8,
        kmeans_iters=20,
    )
    return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae", "random"])
def test_tokenize_writes_unique_ids_and_quality(root, tmp_path, method):
    config = _config(root, method)
    report = modes.tokenize(config, tmp_path)
    data, items = dataset.load_data(config.data)
    sem = semantic_ids.load(tmp_path / semantic_ids.IDS_FILE)
    assert sem.n_items == data.n_items and sem.levels == 2
    assert len(np.unique(sem.item_codes, axis=0)) == data.n_items  # ids unique
    saved = json.loads((tmp_path / run.QUALITY_FILE).read_text())
    assert saved["collision_fraction"] == report["collision_fraction"]
    # The report's numbers are the ids' own, recomputed here.
    assert report["level0_usage"] == quality.code_usage(sem.item_codes[:, 0], 16)
    with open(tmp_path / run.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == data.n_items
    assert int(rows[4]["movieId"]) == int(data.item_ids[5])
    assert [int(rows[4][f"code_{i}"]) for i in range(3)] == sem.codes[5].tolist()
    assert (tmp_path / run.PLOT_FILE).stat().st_size > 1000
    # The demo generator's 8 clusters drive genres, tags and genome: learned first-level codes
    # follow them (purity well above the permuted-code chance, 0.23); random codes do not.
    if method == "random":
        assert report["label_purity"] < 0.3
    else:
        assert report["label_purity"] > max(0.6, 2 * report["label_purity_chance"])
        assert report["collision_fraction"] <= report["collision_fraction_nearest"]


def test_model_side_checks(root, tmp_path):
    config = _config(root, "random")
    modes.tokenize(config, tmp_path)
    with pytest.raises(ConfigError, match="codes 1,000 items but the data has 5"):
        semantic_ids.load_semantic_ids(str(tmp_path), 5)
    with pytest.raises(ConfigError, match="run `--mode tokenize"):
        semantic_ids.load_semantic_ids(str(tmp_path / "missing"), 5)
    config.tokenize.method = "vq"
    with pytest.raises(ConfigError, match="tokenize.method='vq'"):
        modes.tokenize(config, tmp_path)


def test_onerec_trains_with_semantic_id_inputs(root, tmp_path):
    from onerec_jax.defaults import apply_variant
    from onerec_jax.training import train

    modes.tokenize(_config(root, "rqkmeans"), tmp_path / "tok")
    c = apply_variant(_config(root, "rqkmeans"), "onerec")
    c.data.max_len = 20
    c.model.update(
        dim=16, num_layers=1, num_heads=2, mlp_dim=32, semantic_ids=str(tmp_path / "tok")
    )
    c.model.side_features = ("genres", "semantic_ids")
    c.train.update(batch_size=16, num_steps=4, eval_every_steps=4, progress=False)
    c.eval.update(batch_size=512, chunk_size=256)
    results = train.train_and_evaluate(c, tmp_path / "run")
    data, items = dataset.load_data(c.data)
    info = train.data_info(data, items, 20, str(tmp_path / "tok"))
    sem = semantic_ids.load(tmp_path / "tok" / semantic_ids.IDS_FILE)
    np.testing.assert_array_equal(info.item_codes[1:], sem.codes[1:, :2])
    assert info.code_sizes == (16, 16)
    # The code table is a parameter of the run: 32 rows of dim 16 beyond the plain model.
    assert results["params"] > 32 * 16
