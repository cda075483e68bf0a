"""benchmarks/scale_catalogue.py on a tiny catalogue: the table is split, never gathered."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "scale_catalogue", REPO / "benchmarks" / "scale_catalogue.py"
)
scale_catalogue = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_catalogue)


def test_tiny_catalogue_split_eight_ways():
    config = scale_catalogue.load_config("configs/scale.py")
    assert config.scale.n_items == 10_000_000 and config.loss.name == "sampled_softmax"
    config.scale.n_items, config.scale.n_users = 40_000, 64  # shards > batch rows
    config.model.dim = config.model.mlp_dim = 8
    config.loss.n_negatives, config.eval.batch_size, config.eval.chunk_size = 16, 32, 256
    result = scale_catalogue.run(config, steps=1, warmup=0, eval_users=32)
    assert result["vocab_shards"] == 8 and result["table_rows"] == 40_008  # 40,001 rounded up
    names = sorted(r["leaf"] for r in result["leaves"])
    assert len(names) == 3 and "mu" in names[0] and "nu" in names[1] and "params" in names[2]
    for r in result["leaves"]:  # the table and its two Adam moments, an eighth on each device
        assert r["shape"] == (40_008, 8) and r["device_max"] * 8 == r["bytes"] == 40_008 * 8 * 4
    for key in ("train_step", "ranker"):
        assert result[key]["table_collectives"] == 0
    assert len(result["losses"]) == 1 and result["eval"]["users"] == 32
    text = scale_catalogue.report(result, config, "test", markdown=True)
    assert "| train step |" in text and "vocab split 8 ways" in text


def test_scale_config_trains_and_evaluates_through_the_entry_point(tmp_path):
    """`python -m onerec_jax.main --config configs/scale.py` (in process, on the suite's 8 CPU
    devices): the in-memory uniform source at a tiny size, the table split 8 ways."""
    import jax
    import numpy as np

    from onerec_jax import modes
    from onerec_jax.data import dataset

    config = scale_catalogue.load_config("configs/scale.py")
    assert config.data.synthetic == "uniform" and config.data.synthetic_items == 10_000_000
    config.scale.n_items, config.scale.n_users, config.scale.eval_users = 4_000, 48, 16
    assert (config.data.synthetic_items, config.data.synthetic_users) == (4_000, 48)  # follow
    config.model.dim = config.model.mlp_dim = 8
    config.loss.n_negatives, config.loss.in_batch_negatives = 16, 64
    config.train.update(num_steps=2, batch_size=16, progress=False, log_every_steps=1)
    config.eval.update(batch_size=16, chunk_size=512)
    config.data.update(root=str(tmp_path / "data"), progress=False)
    jax.clear_caches()
    results = modes.train(config, tmp_path / "run")
    assert results["data"]["source"] == "uniform" and results["data"]["users"] == 48
    assert results["steps"] == 2 and results["val"]["n_users"] == 16
    assert results["test"]["n_users"] == 48 and 0 <= results["test"]["ndcg@10"] <= 1
    data, items = dataset.load_data(config.data)  # the same users again: seeded, in memory
    assert items is None and data.n_items == 4_000 and data.n_users == 48
    lengths = np.diff(data.offsets)
    assert lengths.min() >= 20 and data.items.min() >= 1 and data.items.max() <= 4_000
