"""The tokenizer on an item feature matrix -> SemanticIds files and their measured quality.

`--mode tokenize` (onerec_jax/modes.py) builds the features and calls `tokenize_items`, which
writes into the workdir:
  semantic_ids.npz        the ids (tokenize/semantic_ids.py; `model.semantic_ids` reads it)
  semantic_ids.csv        item_id, movieId, title, year, code_0..code_L, one row per item
  tokenize_quality.json   every number of tokenize/quality.py plus timings and the config used
  tokenize_usage.png      items per code at every level
  tokenize_log.jsonl      RQ-VAE training losses every 100 steps
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from onerec_jax.data import dataset
from onerec_jax.data.features import ItemFeatures
from onerec_jax.data.records import ItemInfo
from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import ConfigError
from onerec_jax.tokenize import collisions, quality, semantic_ids

METHODS = ("rqvae", "rqkmeans", "random")
CSV_FILE = "semantic_ids.csv"  # the ids file itself: semantic_ids.IDS_FILE
QUALITY_FILE, PLOT_FILE, LOG_FILE = (
    "tokenize_quality.json",
    "tokenize_usage.png",
    "tokenize_log.jsonl",
)


def _item_rows(data: SequenceData, items: ItemInfo) -> np.ndarray:
    """Row of ItemInfo for every dense item 1..n_items (-1 where the catalogue lacks it)."""
    return items.rows(data.item_ids[1:])


def synthetic_clusters(
    cfg_data: ml_collections.ConfigDict, data: SequenceData
) -> np.ndarray | None:
    """The generator's cluster of every dense item when the data is synthetic, else None."""
    source = dataset.resolve_source(cfg_data)
    from onerec_jax.data import synthetic  # numpy-heavy generator, only for synthetic data

    if not (source.is_dir() and (source / synthetic.META_FILE).is_file()):
        return None
    planted = synthetic.load_synthetic(source)
    return planted.item_cluster[planted.dense_items(data.item_ids[1:])]


def _spread(codes, vectors, codebooks, cfg, numbers: dict) -> np.ndarray:
    """Codes after the collision-aware last level (tokenize/collisions.py), if configured."""
    codes = np.asarray(codes, np.int32)
    numbers["collision_fraction_nearest"] = quality.collision_stats(codes)["collision_fraction"]
    if not cfg.spread_last_level or codes.shape[1] < 2:
        return codes
    distances = collisions.last_level_distances(vectors, codes, codebooks)
    return collisions.spread_last_level(codes, distances)


def encode(
    x: np.ndarray, cfg: ml_collections.ConfigDict, log_path: Path | None = None
) -> tuple[np.ndarray, dict]:
    """(codes [n, L], numbers) of `tokenize.method` on the feature rows x [n, D]."""
    levels, size = int(cfg.levels), int(cfg.codebook_size)
    if cfg.method == "random":
        codes = np.random.default_rng(int(cfg.seed)).integers(0, size, (len(x), levels))
        return codes.astype(np.int32), {}
    if cfg.method == "rqkmeans":
        from onerec_jax.tokenize import rqkmeans

        out = rqkmeans.residual_kmeans(
            x,
            levels,
            size,
            iters=int(cfg.kmeans_iters),
            rng=int(cfg.seed),
            balanced=bool(cfg.balanced),
        )
        codes, codebooks = np.asarray(out.codes), np.asarray(out.codebooks)
        recon = x - codebooks[np.arange(levels), codes].sum(1)
        numbers = {
            "recon_error": float(np.mean(recon**2)),
            "residual_norms": np.asarray(out.residual_norms).tolist(),
        }
        return _spread(codes, x, codebooks, cfg, numbers), numbers
    if cfg.method == "rqvae":
        from onerec_jax.tokenize import rqvae

        log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)

        def log_fn(step, metrics):
            logging.info("tokenize step %d: %s", step, metrics)
            if log:
                log.write(json.dumps({"step": step, **metrics}) + "\n")

        try:
            out = rqvae.train_rqvae(x, cfg, log_fn=log_fn)
        finally:
            if log:
                log.close()
        numbers = {
            "recon_error": float(out.reconstruction_error),
            "residual_norms": np.asarray(out.residual_norms).tolist(),
            "final_loss": float(out.loss_history[-1]),
        }
        model = rqvae.build_rqvae(cfg, x.shape[1])
        latents = model.apply({"params": out.params}, x, method=rqvae.RQVAE.encode)
        codebooks = np.asarray(out.params["codebooks"])
        return _spread(out.codes, np.asarray(latents), codebooks, cfg, numbers), numbers
    raise ConfigError(f"tokenize.method={cfg.method!r}: use one of {METHODS}.")


def check_method(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless `cfg.method` (the config's `tokenize` section) is known."""
    if cfg.method not in METHODS:
        raise ConfigError(f"tokenize.method={cfg.method!r}: use one of {METHODS}.")


def tokenize_items(
    config: ml_collections.ConfigDict,
    data: SequenceData,
    items: ItemInfo,
    feats: ItemFeatures,
    workdir: str | Path,
    features_seconds: float,
) -> dict:
    """Runs the tokenizer on `feats`, writes the ids and their quality; returns the report.

    `features_seconds`: how long building `feats` took (reported beside the tokenizer's time).
    """
    workdir = Path(workdir)
    cfg = config.tokenize
    x = feats.matrix[1:]  # [n_items, D]; row 0 of the matrix is the padding item
    start = time.perf_counter()
    codes, numbers = encode(x, cfg, workdir / LOG_FILE if cfg.method == "rqvae" else None)
    t_tokenizer = time.perf_counter() - start
    sem = semantic_ids.from_codes(codes, int(cfg.codebook_size))

    rows = _item_rows(data, items)
    genres = [items.genres[r] if r >= 0 else () for r in rows]
    titles = [items.titles[r] if r >= 0 else "" for r in rows]
    years = [int(items.years[r]) if r >= 0 else 0 for r in rows]
    report = quality.quality_report(
        sem,
        genres=genres,
        labels=synthetic_clusters(config.data, data),
        recon_error=numbers.get("recon_error"),
    )
    report.update(
        method=cfg.method,
        feature_dim=int(x.shape[1]),
        feature_blocks=[list(b) for b in feats.blocks],
        features_seconds=round(features_seconds, 2),
        tokenizer_seconds=round(t_tokenizer, 2),
        **{k: v for k, v in numbers.items() if k != "recon_error"},
    )
    sem.save(workdir / semantic_ids.IDS_FILE)
    semantic_ids.write_csv(workdir / CSV_FILE, sem, data.item_ids, titles, years)
    quality.plot_usage(sem, workdir / PLOT_FILE)
    (workdir / QUALITY_FILE).write_text(json.dumps(report, indent=2))
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return report
