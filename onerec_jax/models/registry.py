"""Which models exist and what each declares: the one place the rest of the package asks.

Every model file registers a `ModelSpec` at import (`register(ModelSpec(...))`): its name
(`config.model.name`), how to build it, its config variants (`configs/<dataset>.py:<variant>`),
the training batches it needs, whether it reads user ids or semantic ids, and its kind. The
trainer, the evaluator, the recommender, `defaults.apply_variant` / `needs_semantic_ids` and
`--mode train` read the spec; none compares model names. Every module of `onerec_jax/models/` is
imported the first time a name is looked up, so a new model is one new file; a model defined
elsewhere (a test, a notebook) registers itself the same way before its config is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from onerec_jax.errors import ConfigError

# Kinds: how a model recommends.
SCORING = "scoring"  # user_state [B, D] scored against every item in chunks (the shared ranker)
GENERATIVE = "generative"  # generate(params, batch, history): constrained beam search over codes
# Training batches (data/pipeline.py): what `model.loss` reads.
WINDOWS = "windows"  # next-item windows: inputs, targets, mask, user
CODE_WINDOWS = "code_windows"  # the same windows with the targets' semantic-id codes (target_codes)

Variant = Callable[[ml_collections.ConfigDict], None]


def _never(config: ml_collections.ConfigDict) -> bool:
    del config
    return False


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model declares in its own file.

    Attributes:
      name: `config.model.name`.
      build: `(config, DataInfo) -> model object` (models/base.py `ScoringModel`, or
        models/generative.py `GenerativeModel` for the generative kind).
      kind: SCORING or GENERATIVE.
      batches: WINDOWS or CODE_WINDOWS, the training batches `loss` reads.
      variants: `:<variant>` name -> a function that sets the model's config defaults on a
        base config (the registry sets `model.name` first).
      reads_user_ids: the user state is a learned per-user row (BPR, NCF): `batch["user"]` is
        required, and a new user given as a list of movies cannot be served.
      reads_semantic_ids: `config -> bool`, or a bool: whether `model.semantic_ids` must name
        ids (`--mode train` tokenizes first when it names none).
      legacy: `config.model -> bool`: an old config that named this model otherwise (e.g. in a
        saved run's config.json); such configs are read as this model.
    """

    name: str
    build: Callable[[ml_collections.ConfigDict, Any], Any]
    kind: str = SCORING
    batches: str = WINDOWS
    variants: Mapping[str, Variant] = dataclasses.field(default_factory=dict)
    reads_user_ids: bool = False
    reads_semantic_ids: bool | Callable[[ml_collections.ConfigDict], bool] = False
    legacy: Callable[[ml_collections.ConfigDict], bool] = _never

    def __post_init__(self):
        if self.kind not in (SCORING, GENERATIVE):
            kinds = f"{SCORING!r} or {GENERATIVE!r}"
            raise ConfigError(f"model {self.name!r}: kind={self.kind!r}; use {kinds}.")
        if self.batches not in (WINDOWS, CODE_WINDOWS):
            batches = f"{WINDOWS!r} or {CODE_WINDOWS!r}"
            raise ConfigError(f"model {self.name!r}: batches={self.batches!r}; use {batches}.")

    def needs_semantic_ids(self, config: ml_collections.ConfigDict) -> bool:
        """Whether `config` (a config of this model) reads semantic ids."""
        flag = self.reads_semantic_ids
        return bool(flag(config) if callable(flag) else flag)


_SPECS: dict[str, ModelSpec] = {}
_VARIANTS: dict[str, tuple[ModelSpec, Variant]] = {}
_loaded = False


def register(spec: ModelSpec) -> ModelSpec:
    """Adds `spec` under its name and its variants' names; returns it. A name taken by another
    model raises ConfigError."""
    _load_models()  # the built-in names first, so that a clash is found here
    if _SPECS.get(spec.name) is spec:
        return spec
    taken = [n for n in (spec.name, *spec.variants) if n in _SPECS or n in _VARIANTS]
    if taken:
        raise ConfigError(f"model {spec.name!r}: the name(s) {taken} are already registered.")
    _SPECS[spec.name] = spec
    for variant, fn in spec.variants.items():
        _VARIANTS[variant] = (spec, fn)
    return spec


def _load_models() -> None:
    """Imports every module of onerec_jax/models/ once: each model file registers itself."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before the imports: each model file's `register` calls back here
    package = importlib.import_module("onerec_jax.models")
    try:
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"onerec_jax.models.{module.name}")
    except BaseException:
        _loaded = False  # a later lookup tries again and raises the same error
        raise


def names() -> list[str]:
    """The registered model names."""
    _load_models()
    return list(_SPECS)


def variant_names() -> list[str]:
    """The `:<variant>` names the models offer."""
    _load_models()
    return list(_VARIANTS)


def model_name(model: ml_collections.ConfigDict) -> str:
    """The registered name of `config.model`: its `name`, or the model whose `legacy` test an
    old config passes (e.g. name "onerec" with head "semantic_ids": "onerec_sid")."""
    _load_models()
    for spec in _SPECS.values():
        if spec.legacy(model):
            return spec.name
    return model.name


def model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
    """The spec of `config.model` (old names mapped, see `model_name`)."""
    name = model_name(config.model)
    if name not in _SPECS:
        raise ConfigError(
            f"model.name={name!r}: no such model. Pick one of {', '.join(names())}, or add a "
            "file onerec_jax/models/<name>.py that registers it (models/registry.py)."
        )
    return _SPECS[name]


def variant(name: str) -> tuple[ModelSpec, Variant] | None:
    """(spec, config function) of the `:<name>` variant, or None when no model offers it."""
    _load_models()
    return _VARIANTS.get(name)


def build_model(config: ml_collections.ConfigDict, info):
    """The model object of `config.model` on data described by `info` (models/base.py DataInfo)."""
    return model_spec(config).build(config, info)
