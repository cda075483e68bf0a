"""Your own data: any supported layout, no code needed.

  python -m onerec_jax.main --config configs/custom.py --mode prepare \
      --config.data.path=/path/to/ratings_dir_or_file --config.data.format=recbole
Formats: movielens_csv, movielens_dat, movielens_100k, recbole (NAME.inter + NAME.item with
typed headers) and user_sequence (one "user item item ..." line per user, in order).
"""

from onerec_jax.defaults import apply_variant, base_config


def get_config(arg: str | None = None):
    """`arg`: a model variant of `defaults.apply_variant` (default sasrec)."""
    c = base_config()
    c.data.path = ""  # REQUIRED: the directory or file to read (--config.data.path=...)
    c.data.format = "auto"  # set explicitly for files: recbole or user_sequence
    return apply_variant(c, arg)
