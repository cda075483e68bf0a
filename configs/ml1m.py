"""MovieLens ml-1m (downloaded and verified on first use), PROTOCOL.md defaults."""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: the model variant, sasrec (default) or onerec."""
    c = base_config()
    c.data.release = "ml-1m"  # release fetched into <data.root>/ by data/download.py
    return apply_variant(c, arg)
