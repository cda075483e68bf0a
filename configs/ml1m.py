"""MovieLens ml-1m (downloaded and verified on first use), PROTOCOL.md defaults."""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: a model variant of `defaults.apply_variant` (default sasrec)."""
    c = base_config()
    c.data.release = "ml-1m"  # release fetched into <data.root>/ by data/download.py
    # The item content this release ships (no user tags): the tokenizers' feature blocks.
    c.features.blocks = ("genres", "year", "title")
    return apply_variant(c, arg)
