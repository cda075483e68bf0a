"""Config variants: every dataset config offers every model and the OneRec ablations."""

import importlib.util
from pathlib import Path

import pytest

from onerec_jax.defaults import (
    GENERATIVE_ABLATIONS,
    ONEREC_ABLATIONS,
    apply_variant,
    base_config,
    needs_semantic_ids,
)

REPO = Path(__file__).resolve().parents[1]
MODELS = ("sasrec", "onerec", "gru4rec", "bert4rec", "pop", "bpr", "ncf", "tiger")


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


@pytest.mark.parametrize("base", ["tiger", "onerec_sid"])
def test_generative_studies_change_one_thing(base):
    plain = apply_variant(base_config(), base).to_dict()
    for name, changes in GENERATIVE_ABLATIONS.items():
        c = apply_variant(base_config(), f"{base}_{name}").to_dict()
        for key, value in changes.items():
            section, field = key.split(".")
            assert c[section][field] == value
            c[section][field] = plain[section][field]
        assert c == plain, name


def test_generative_variants_and_who_reads_semantic_ids():
    tiger, sid = apply_variant(base_config(), "tiger"), apply_variant(base_config(), "onerec_sid")
    assert (tiger.model.name, tiger.model.num_experts) == ("tiger", 0)
    assert (sid.model.name, sid.model.head) == ("onerec", "semantic_ids")
    assert sid.model.num_experts > 1
    feat = apply_variant(base_config(), "onerec_sidfeat")
    assert feat.model.head == "items" and "semantic_ids" in feat.model.side_features
    assert needs_semantic_ids(tiger) and needs_semantic_ids(sid) and needs_semantic_ids(feat)
    assert not needs_semantic_ids(apply_variant(base_config(), "onerec"))
    with pytest.raises(ValueError, match="onerec_sid_<"):
        apply_variant(base_config(), "onerec_sid_huge")
