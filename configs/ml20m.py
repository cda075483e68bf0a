"""MovieLens ml-20m (downloaded and verified on first use), PROTOCOL.md defaults."""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: a model variant of `defaults.apply_variant` (default sasrec)."""
    c = base_config()
    c.data.release = "ml-20m"  # release fetched into <data.root>/ by data/download.py
    # The tag genome (1,128 relevance scores for ~14k movies) is this release's richest content.
    c.features.blocks = ("genres", "year", "title", "tags", "genome")
    return apply_variant(c, arg)
