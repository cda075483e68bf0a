"""The optimizer: AdamW, warmup + decay schedule, clipping, weight-decay mask, accumulation.

It lives below tokenize/ and training/ (ARCHITECTURE.md layers) because both train with it: the
trainer (`config.optim`) and the RQ-VAE tokenizer (these defaults with its own learning rate).
`default_config()` is the `optim` section of `defaults.base_config()`.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from onerec_jax.errors import ConfigError

# Parameter names that never get weight decay: norm scales and biases. Embedding tables are
# decayed only with optim.decay_embeddings (decay on sparse rows mostly shrinks rare items).
_NO_DECAY = ("bias", "scale")
_EMBEDDING_MARKERS = ("embedding",)


def default_config() -> ml_collections.ConfigDict:
    """The `optim` config section's defaults."""
    o = ml_collections.ConfigDict()
    # Plain Adam as the public SASRec+ and BERT4Rec code (BENCHMARKS.md "SASRec at the
    # reference"): on MovieLens-sized data an epoch can be 5-10 steps, so a warmup counted in
    # steps would last many epochs. Large-catalogue configs (defaults.large_catalogue) warm up.
    o.learning_rate = 1e-3  # peak learning rate
    o.warmup_steps = 0  # linear warmup from 0, in optimizer updates
    o.schedule = "constant"  # after warmup: cosine, linear (to end_lr_ratio) or constant
    o.end_lr_ratio = 0.0  # final learning rate / peak, for cosine and linear
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.999  # Adam beta2
    o.eps = 1e-8  # Adam epsilon
    o.weight_decay = 0.0  # decoupled (AdamW) weight decay
    o.decay_embeddings = False  # also decay embedding tables
    o.clip_norm = 0.0  # global gradient-norm clip (0: off)
    o.accumulate_steps = 1  # micro-batches per optimizer update (optax.MultiSteps)
    return o


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.learning_rate`, then cosine, linear or constant."""
    peak, warmup = cfg.learning_rate, int(cfg.warmup_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.end_lr_ratio, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ConfigError(f"optim.schedule={cfg.schedule!r}: use 'cosine', 'linear' or 'constant'.")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params, decay_embeddings: bool):
    """True for parameters that get weight decay (not norms, biases, or embeddings if off)."""

    def keep(path, _):
        names = _path_names(path)
        leaf = next((n for n in reversed(names) if n != "value"), "")
        if leaf in _NO_DECAY:
            return False
        is_embedding = any(m in n for n in names for m in _EMBEDDING_MARKERS)
        return decay_embeddings or not is_embedding

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with clipping and the decay mask, wrapped in MultiSteps when accumulating.

    `total_steps` counts optimizer updates (after accumulation).
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.decay_embeddings),
        )
    )
    tx = optax.chain(*parts)
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.accumulate_steps))
    elif cfg.accumulate_steps < 1:
        raise ConfigError("optim.accumulate_steps must be >= 1.")
    return tx, schedule
