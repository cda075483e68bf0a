"""The base configuration every `configs/<dataset>.py` starts from; each field says its unit."""

from __future__ import annotations

import os

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by all dataset configs (PROTOCOL.md defaults)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # global seed: data order, initialisation, sampling

    c.data = d = ml_collections.ConfigDict()
    d.release = ""  # a MovieLens release of data/download.py's registry, e.g. "ml-25m"
    d.synthetic = ""  # or a synthetic preset of data/synthetic.py: "demo" or "ml25m"
    d.synthetic_seed = 0  # seed of the synthetic generator (another seed = another dataset)
    d.path = ""  # or a directory/file of your own (then set data.format); overrides the above
    d.format = "auto"  # auto, movielens_csv|_dat|_100k, recbole, user_sequence
    d.encoding = ""  # text encoding override ("" = the layout's default: utf8, latin-1 for .dat)
    d.root = os.environ.get("ONEREC_DATA", "data")  # downloads, synthetic data, cache/ live here
    d.cache_dir = ""  # sequence cache folder ("" = <root>/cache, "none" = no cache)
    d.progress = True  # show download progress bars
    d.on_bad_rows = "error"  # malformed rows: "error" (name the line) or "skip" (count them)
    d.min_rating = ml_collections.config_dict.placeholder(float)  # keep ratings >= this; None: all
    d.min_user_interactions = 5  # k-core threshold per user (>= 3 for leave-one-out)
    d.min_item_interactions = 0  # k-core threshold per item (0: no item filter, as ML-25M)
    d.max_len = 200  # the model sees at most this many most recent items
    d.window_stride = 0  # items between training windows of long sequences (0: max_len)
    d.bucket_boundaries = ()  # length buckets for padding-saving batches, e.g. (32, 64, 128, 200)
    d.worker_count = 0  # Grain worker processes for the training pipeline (0: in-process)

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global batch size (sequences per step, over all processes)
    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 256  # users per evaluation batch (global)
    e.mask_history = True  # mask every item of the user's prefix before ranking (PROTOCOL.md)
    return c
