"""Config variants: every dataset config offers every model and the OneRec ablations."""

import importlib.util
import json
from pathlib import Path

import pytest

from onerec_jax.defaults import (
    GENERATIVE_ABLATIONS,
    ONEREC_ABLATIONS,
    apply_variant,
    base_config,
    load_run_config,
    needs_semantic_ids,
)
from onerec_jax.errors import ConfigError
from onerec_jax.models import registry

REPO = Path(__file__).resolve().parents[1]
MODELS = ("sasrec", "onerec", "gru4rec", "bert4rec", "pop", "bpr", "ncf", "tiger", "onerec_sid")


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
    assert sid.model.name == "onerec_sid"
    assert sid.model.num_experts > 1
    feat = apply_variant(base_config(), "onerec_sidfeat")
    assert feat.model.name == "onerec" and "semantic_ids" in feat.model.side_features
    assert needs_semantic_ids(tiger) and needs_semantic_ids(sid) and needs_semantic_ids(feat)
    assert not needs_semantic_ids(apply_variant(base_config(), "onerec"))
    with pytest.raises(ValueError, match="onerec_sid_<"):
        apply_variant(base_config(), "onerec_sid_huge")


def test_each_model_declares_its_contract():
    specs = {name: registry.model_spec(_get_config("demo", name)) for name in MODELS}
    assert set(MODELS) <= set(registry.names())  # tests may register more
    generative = {n for n, s in specs.items() if s.kind == registry.GENERATIVE}
    assert generative == {"tiger", "onerec_sid"}
    assert {n for n, s in specs.items() if s.batches == registry.CODE_WINDOWS} == generative
    assert {n for n, s in specs.items() if s.reads_user_ids} == {"bpr", "ncf"}
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(registry.ModelSpec(name="sasrec2", build=None, variants={"onerec": None}))


def test_old_onerec_decoder_configs_are_read_as_onerec_sid(tmp_path):
    old = apply_variant(base_config(), "onerec_sid")
    old.model.name, old.model.head = "onerec", "semantic_ids"  # as runs saved it before
    assert registry.model_name(old.model) == "onerec_sid" and needs_semantic_ids(old)
    assert registry.model_spec(old).kind == registry.GENERATIVE
    saved = old.to_dict()
    del saved["model"]["user_tokens"]  # a key added since: filled with its default
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_run_config(tmp_path)
    assert loaded.model.name == "onerec_sid" and loaded.model.user_tokens == 0
    item_head = apply_variant(base_config(), "onerec")
    assert registry.model_name(item_head.model) == "onerec"
