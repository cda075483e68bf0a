"""TIGER (Rajput et al. 2023): generative retrieval with RQ-VAE semantic ids.

The user's history is spelled as code tokens (each item its L+1 codes, the most recent last),
optionally after a hashed user token (`model.user_tokens` buckets; the paper uses 2,000); a
pre-RMSNorm Transformer encoder-decoder with learned positions (the paper's T5 has relative
position biases) is trained with teacher-forced cross-entropy over the next item's codes and
recommends by constrained beam search (models/generative.py, models/seq2seq.py).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from onerec_jax.models.base import DataInfo
from onerec_jax.models.generative import GenerativeModel, check_semantic_ids
from onerec_jax.models.seq2seq import EncoderDecoder
from onerec_jax.training.optim import compute_dtype


def build(config: ml_collections.ConfigDict, info: DataInfo) -> GenerativeModel:
    check_semantic_ids(config, info)
    m = config.model
    module = EncoderDecoder(
        vocab_size=info.vocab_size,
        item_codes=np.maximum(info.semantic_ids.codes, 0),
        code_sizes=tuple(info.semantic_ids.codebook_sizes),
        max_len=info.max_len,
        encoder_input="codes",
        session_items=m.session_items,
        causal=m.encoder_causal,
        dim=m.dim,
        num_layers=m.num_layers,
        decoder_layers=m.decoder_layers,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        activation="relu",  # T5
        num_experts=m.num_experts,
        experts_per_token=m.experts_per_token,
        expert_capacity=m.expert_capacity,
        expert_group_size=m.expert_group_size,
        user_buckets=m.user_tokens,
        dtype=compute_dtype(config.train.compute_dtype),
    )
    return GenerativeModel(module, config, info)
