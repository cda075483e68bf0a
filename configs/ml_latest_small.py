"""MovieLens ml-latest-small (downloaded and verified on first use), PROTOCOL.md defaults."""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: a model variant of `defaults.apply_variant` (default sasrec)."""
    c = base_config()
    c.data.release = "ml-latest-small"  # release fetched into <data.root>/ by data/download.py
    # 671 users: an epoch is ~7 steps of 128, and models sit near popularity for 15-20 epochs
    # before learning (PROTOCOL.md), so patience is counted in many cheap validations.
    c.train.patience = 15  # validations (one per epoch) without improvement
    c.train.num_epochs = 400
    return apply_variant(c, arg)
