"""The activation dtype models compute in (`train.compute_dtype`); parameters stay float32."""

from __future__ import annotations

import jax.numpy as jnp

from onerec_jax.errors import ConfigError


def compute_dtype(name: str):
    """Activation dtype for `train.compute_dtype` (float32 or bfloat16); params stay fp32."""
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"train.compute_dtype={name!r}: use one of {tuple(dtypes)}.")
    return dtypes[name]
