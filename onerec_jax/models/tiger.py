"""TIGER (Rajput et al. 2023): generative retrieval with RQ-VAE semantic ids.

The user's history is spelled as code tokens (each item its L+1 codes, the most recent last),
optionally after a hashed user token (`model.user_tokens` buckets; the paper uses 2,000); a
pre-RMSNorm Transformer encoder-decoder with learned positions (the paper's T5 has relative
position biases) is trained with teacher-forced cross-entropy over the next item's codes and
recommends by constrained beam search (models/generative.py, models/seq2seq.py).
"""

from __future__ import annotations

import ml_collections

from onerec_jax.models import generative
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import register


def build(config: ml_collections.ConfigDict, info: DataInfo) -> generative.GenerativeModel:
    return generative.build(
        config,
        info,
        encoder_input="codes",
        activation="relu",
        user_buckets=config.model.user_tokens,
    )


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:tiger`."""
    generative.config_defaults(c)
    c.model.mlp_dim, c.model.num_experts = 256, 0


register(generative.spec("tiger", build, {"tiger": config_defaults}))
