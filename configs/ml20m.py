"""MovieLens ml-20m (downloaded and verified on first use), PROTOCOL.md defaults.

  configs/ml20m.py           the OneRec item head at the seed's scale, for one GPU/TPU (bfloat16)
  configs/ml20m.py:cpu       the OneRec item head sized for a CPU (sampled softmax)
  configs/ml20m.py:sasrec    any other model variant, with the accelerator's training settings
See defaults.large_catalogue and README.md ("Which command for which hardware").
"""

from onerec_jax.defaults import base_config, large_catalogue


def get_config(arg: str | None = None):
    """`arg`: "cpu", or a model variant of `defaults.apply_variant` (default onerec)."""
    c = base_config()
    c.data.release = "ml-20m"  # release fetched into <data.root>/ by data/download.py
    # The tag genome (1,128 relevance scores for ~14k movies) is this release's richest content.
    c.features.blocks = ("genres", "year", "title", "tags", "genome")
    return large_catalogue(c, arg)
