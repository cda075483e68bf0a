"""OneRec, semantic-id decoder: generative retrieval with a mixture-of-experts decoder.

An encoder over the history's items (each the sum of its code embeddings, plus optional item-id
and genre/year embeddings) and a decoder whose feed-forward layers are a sparse mixture of
experts (`model.num_experts`, `experts_per_token`, `expert_capacity`), generating the next
`model.session_items` items' semantic ids; it recommends by constrained beam search
(models/generative.py, models/seq2seq.py). OneRec's item head is models/onerec.py.

Runs saved before this model had its own name say model.name "onerec" with model.head
"semantic_ids"; such configs are read as this model (`legacy_config`).
"""

from __future__ import annotations

import ml_collections

from onerec_jax.errors import ConfigError
from onerec_jax.models import generative
from onerec_jax.models.base import DataInfo, side_arrays
from onerec_jax.models.registry import register


def build(config: ml_collections.ConfigDict, info: DataInfo) -> generative.GenerativeModel:
    if "vectors" in tuple(config.model.side_features):
        raise ConfigError(
            "model.side_features 'vectors' is read by the OneRec item head (:onerec) only; for "
            "the decoder, put your vectors in the tokenizer's features (features.blocks)."
        )
    return generative.build(
        config,
        info,
        encoder_input="items",
        activation="swiglu",
        item_ids=config.model.item_id_embedding,
        **side_arrays(config, info),
    )


def config_defaults(c: ml_collections.ConfigDict) -> None:
    """`:onerec_sid`: items as code-embedding sums, a mixture-of-experts decoder, and a dense
    item head on the same encoder, trained jointly, that re-ranks the beam's items (OneRec and
    LIGER both join a generative and a dense signal). On the dev set the re-ranked beam is far
    above the plain decoder (`:onerec_sid_nodense`; BENCHMARKS.md "`:onerec_sid` re-ranks its
    beam by default")."""
    generative.config_defaults(c)
    c.model.mlp_dim = 128
    c.model.num_experts, c.model.experts_per_token = 4, 2
    c.loss.dense_weight, c.eval.rerank_weight = 1.0, 1.0


def legacy_config(model: ml_collections.ConfigDict) -> bool:
    """An old config of this model: name "onerec" with head "semantic_ids"."""
    return model.get("name") == "onerec" and model.get("head") == "semantic_ids"


register(
    generative.spec("onerec_sid", build, {"onerec_sid": config_defaults}, legacy=legacy_config)
)
