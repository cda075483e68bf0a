"""MovieLens ml-latest-small (downloaded and verified on first use), PROTOCOL.md defaults."""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: a model variant of `defaults.apply_variant` (default sasrec)."""
    c = base_config()
    c.data.release = "ml-latest-small"  # release fetched into <data.root>/ by data/download.py
    return apply_variant(c, arg)
