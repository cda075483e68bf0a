"""Small synthetic data (built in, no download): the newcomer's first run and the smoke test."""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: a model variant of `defaults.apply_variant` (default sasrec)."""
    c = base_config()
    c.data.synthetic = "demo"  # 2,000 users x 1,000 items written by data/synthetic.py
    c.data.max_len = 50  # demo sequences are short; fewer padded positions
    c.train.batch_size = 64
    c.train.num_epochs = 20  # 34 steps each; about 2 minutes on 2 CPU cores
    c.train.patience = 5  # validations (one per epoch) without improvement before stopping
    return apply_variant(c, arg)
