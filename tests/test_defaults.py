"""Config variants: every dataset config offers every model and the OneRec ablations."""

import importlib.util
from pathlib import Path

import pytest

from onerec_jax.defaults import ONEREC_ABLATIONS, apply_variant, base_config

REPO = Path(__file__).resolve().parents[1]
MODELS = ("sasrec", "onerec", "gru4rec", "bert4rec", "pop", "bpr", "ncf")


def _get_config(name, arg):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("dataset", ["demo", "ml100k", "ml1m", "ml20m", "ml25m", "ml_latest_small"])
def test_every_config_offers_every_model(dataset):
    for name in MODELS:
        assert _get_config(dataset, name).model.name == name
        assert (REPO / "onerec_jax" / "models" / f"{name}.py").is_file()


def test_ablations_change_one_thing_of_onerec():
    plain = apply_variant(base_config(), "onerec").to_dict()
    expected = {
        "nopos": ("model", "positions", "none"),
        "noside": ("model", "side_features", ()),
        "aux": ("model", "aux_weight", 0.5),
        "1layer": ("model", "num_layers", 1),
        "4layers": ("model", "num_layers", 4),
        "len50": ("data", "max_len", 50),
        "len200": ("data", "max_len", 200),
    }
    assert set(ONEREC_ABLATIONS) == set(expected)
    for name, (section, field, value) in expected.items():
        c = apply_variant(base_config(), f"onerec_{name}").to_dict()
        assert c[section][field] == value
        c[section][field] = plain[section][field]
        assert c == plain  # nothing else differs
    with pytest.raises(ValueError, match="onerec_<nopos"):
        apply_variant(base_config(), "onerec_deep")
