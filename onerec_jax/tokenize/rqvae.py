"""RQ-VAE tokenizer as in TIGER (Rajput et al. 2023): MLP encoder, residual VQ, MLP decoder.

Loss per item: ||decoder(zq) - x||^2 + sum over levels l of ||sg[r_l] - e_l||^2 (codebook loss,
the only gradient the codebooks get) + beta * ||r_l - sg[e_l]||^2 (commitment), with r_0 = z and
r_{l+1} = r_l - sg[e_l], so level l's commitment pulls z towards the partial sum e_0 + ... + e_l.
The decoder sees zq through a straight-through estimator or the rotation trick (Fifty et al.
2024). Codebooks start from residual k-means on the first batch of latents; codes unused for
`dead_code_steps` steps restart at random residuals of the current batch at their level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from onerec_jax.errors import ConfigError
from onerec_jax.models.optim import default_config, make_optimizer
from onerec_jax.tokenize.rqkmeans import check_points, residual_kmeans, squared_distances

sg = jax.lax.stop_gradient
GRADIENTS = ("ste", "rotation")
_EVAL_CHUNK = 8192  # items per forward pass when encoding the whole catalogue


def straight_through(z: jax.Array, zq: jax.Array) -> jax.Array:
    """Forward value zq, gradient the identity on z."""
    return z + sg(zq - z)


def rotation_trick(z: jax.Array, zq: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Forward value zq, written as (|zq|/|z|) R z with the rotation R and the scale constant.

    R = I - 2 r r^T + 2 q u^T rotates u = z/|z| onto q = zq/|zq| in their plane, with
    r = (u + q)/|u + q|; the gradient on z is therefore (|zq|/|z|) R^T times the upstream one.
    """
    z_norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
    zq_norm = jnp.linalg.norm(zq, axis=-1, keepdims=True)
    u = sg(z / (z_norm + eps))
    q = sg(zq / (zq_norm + eps))
    w = u + q
    r = sg(w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + eps))
    scale = sg(zq_norm / (z_norm + eps))
    dot = partial(jnp.sum, axis=-1, keepdims=True)
    out = scale * (z - 2.0 * r * dot(r * z) + 2.0 * q * dot(u * z))
    return out + sg(zq - out)  # exact forward value even where the rotation is ill-conditioned


class Quantized(NamedTuple):
    """Residual VQ of a batch: zq [B, d], codes [L, B], residuals r_l [L, B, d], losses."""

    zq: jax.Array
    codes: jax.Array
    residuals: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array


def residual_quantize(z: jax.Array, codebooks: jax.Array) -> Quantized:
    """Nearest code per level on the residual of the levels before (codebooks [L, K, d])."""
    r = z
    chosen, codes, residuals = [], [], []
    codebook_loss = commitment_loss = 0.0
    for cb in codebooks:  # L is small: unrolled
        code = jnp.argmin(squared_distances(sg(r), sg(cb)), axis=1).astype(jnp.int32)
        e = cb[code]  # [B, d]
        codebook_loss += jnp.mean(jnp.sum((sg(r) - e) ** 2, -1))
        commitment_loss += jnp.mean(jnp.sum((r - sg(e)) ** 2, -1))
        residuals.append(r)
        codes.append(code)
        chosen.append(e)
        r = r - sg(e)
    return Quantized(
        zq=sum(chosen),
        codes=jnp.stack(codes),
        residuals=jnp.stack(residuals),
        codebook_loss=codebook_loss,
        commitment_loss=commitment_loss,
    )


class MLP(nn.Module):
    """Dense layers with an activation between them (none after the last)."""

    features: tuple[int, ...]
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width)(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return x


class RQVAE(nn.Module):
    """x [B, D] -> z [B, latent] -> L levels of K codes -> reconstruction [B, D]."""

    input_dim: int
    hidden_dims: tuple[int, ...]
    latent_dim: int
    levels: int
    codebook_size: int
    gradient: str = "ste"
    activation: Callable = nn.relu

    def setup(self):
        self.encoder = MLP((*self.hidden_dims, self.latent_dim), self.activation)
        self.decoder = MLP((*reversed(self.hidden_dims), self.input_dim), self.activation)
        shape = (self.levels, self.codebook_size, self.latent_dim)
        self.codebooks = self.param("codebooks", nn.initializers.normal(1.0), shape)

    def encode(self, x):
        return self.encoder(x)

    def __call__(self, x) -> tuple[jax.Array, Quantized]:
        z = self.encoder(x)
        quantized = residual_quantize(z, self.codebooks)
        through = rotation_trick if self.gradient == "rotation" else straight_through
        return self.decoder(through(z, quantized.zq)), quantized


def build_rqvae(cfg: ml_collections.ConfigDict, input_dim: int) -> RQVAE:
    """The RQ-VAE of a `tokenize` config section, for features of width input_dim."""
    if cfg.gradient not in GRADIENTS:
        raise ConfigError(f"tokenize.gradient={cfg.gradient!r}: use one of {GRADIENTS}.")
    for name in ("levels", "codebook_size", "latent_dim", "steps", "batch_size"):
        if int(cfg[name]) < 1:
            raise ConfigError(f"tokenize.{name}={cfg[name]}: must be at least 1.")
    return RQVAE(
        input_dim=int(input_dim),
        hidden_dims=tuple(int(h) for h in cfg.hidden_dims),
        latent_dim=int(cfg.latent_dim),
        levels=int(cfg.levels),
        codebook_size=int(cfg.codebook_size),
        gradient=cfg.gradient,
    )


def optimizer_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `optim` defaults with the tokenizer's learning rate (warmup at most 10% of steps)."""
    optim = default_config()
    optim.learning_rate = float(cfg.learning_rate)
    optim.warmup_steps = min(int(optim.warmup_steps), int(cfg.steps) // 10)
    return optim


class RQVAEState(NamedTuple):
    """Training state; last_used [L, K] is the last step each code was chosen (-1: never)."""

    params: Any
    opt_state: Any
    last_used: jax.Array
    step: jax.Array
    rng: jax.Array


def loss_fn(params, model: RQVAE, x: jax.Array, beta: float):
    recon, q = model.apply({"params": params}, x)
    recon_loss = jnp.mean(jnp.sum((recon - x) ** 2, -1))
    loss = recon_loss + q.codebook_loss + beta * q.commitment_loss
    metrics = dict(
        loss=loss, recon=recon_loss, codebook=q.codebook_loss, commitment=q.commitment_loss
    )
    return loss, (metrics, q)


def restart_dead_codes(
    codebooks, last_used, codes, residuals, step, rng, dead_code_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Mark the batch's codes used at `step`; codes unused for dead_code_steps restart.

    Args:
      codebooks: [L, K, d]. last_used: [L, K]. codes: [L, B]. residuals: [L, B, d] (what each
        level quantised). step: this step's index. dead_code_steps: window (0: never restart).

    Returns:
      New codebooks (dead rows replaced by random residual rows of their level) and last_used.
    """
    levels, k = last_used.shape
    level_idx = jnp.arange(levels)[:, None]
    used = jnp.zeros((levels, k), bool).at[level_idx, codes].set(True)
    last_used = jnp.where(used, step, last_used)
    if dead_code_steps <= 0:
        return codebooks, last_used
    dead = step - last_used >= dead_code_steps  # unused in steps step-window+1 .. step
    pick = jax.random.randint(rng, (levels, k), 0, residuals.shape[1])
    fresh = sg(residuals)[level_idx, pick]  # [L, K, d]
    codebooks = jnp.where(dead[..., None], fresh, codebooks)
    return codebooks, jnp.where(dead, step, last_used)


def train_step(state: RQVAEState, xs, perm, offset, *, model, tx, beta, batch_size, dead_steps):
    """One update on the batch xs[perm[offset : offset + batch_size]]; returns (state, metrics)."""
    rng, restart_rng = jax.random.split(state.rng)
    x = xs[jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)]
    grads, (metrics, q) = jax.grad(loss_fn, has_aux=True)(state.params, model, x, beta)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    codebooks, last_used = restart_dead_codes(
        params["codebooks"],
        state.last_used,
        q.codes,
        q.residuals,
        state.step,
        restart_rng,
        dead_steps,
    )
    params = {**params, "codebooks": codebooks}
    return RQVAEState(params, opt_state, last_used, state.step + 1, rng), metrics


def init_state(model: RQVAE, tx, xs, cfg: ml_collections.ConfigDict, rng) -> RQVAEState:
    """Random encoder/decoder; codebooks from residual k-means on a first batch of latents."""
    init_rng, data_rng, kmeans_rng, rng = jax.random.split(rng, 4)
    params = dict(model.init(init_rng, xs[:1])["params"])
    n_init = min(max(int(cfg.batch_size), model.codebook_size), xs.shape[0])
    first = xs[jax.random.permutation(data_rng, xs.shape[0])[:n_init]]
    z = model.apply({"params": params}, first, method=RQVAE.encode)
    kmeans = residual_kmeans(
        z, model.levels, model.codebook_size, iters=int(cfg.kmeans_iters), rng=kmeans_rng
    )
    params["codebooks"] = jnp.asarray(kmeans.codebooks)
    last_used = jnp.full((model.levels, model.codebook_size), -1, jnp.int32)
    return RQVAEState(params, tx.init(params), last_used, jnp.zeros((), jnp.int32), rng)


@partial(jax.jit, static_argnames="model")
def _evaluate(model: RQVAE, params, x):
    recon, q = model.apply({"params": params}, x)
    after = jnp.concatenate([q.residuals[1:], (q.residuals[0] - q.zq)[None]])  # r_1..r_L
    residual_norm_sums = jnp.sum(jnp.linalg.norm(after, axis=-1), axis=1)  # [L]
    return q.codes.T, jnp.sum((recon - x) ** 2), residual_norm_sums


def _evaluate_all(model: RQVAE, params, xs) -> tuple[np.ndarray, float, np.ndarray]:
    """Codes [n, L], reconstruction MSE and mean residual norm per level over all items."""
    codes, sq_error, norms = [], 0.0, 0.0
    for start in range(0, xs.shape[0], _EVAL_CHUNK):
        c, e, r = _evaluate(model, params, xs[start : start + _EVAL_CHUNK])
        codes.append(c)
        sq_error, norms = sq_error + e, norms + r
    n = xs.shape[0]
    codes = np.asarray(jnp.concatenate(codes), dtype=np.int32)
    return codes, float(sq_error) / xs.size, np.asarray(norms) / n


def encode_rqvae(params, features, cfg_tokenize: ml_collections.ConfigDict) -> np.ndarray:
    """Codes [n, L] int32 of (new) items' features under trained params: nearest code per level."""
    x = check_points(features, 1)
    model = build_rqvae(cfg_tokenize, x.shape[1])
    return _evaluate_all(model, params, jnp.asarray(x))[0]


@dataclasses.dataclass
class RQVAEResult:
    """A trained RQ-VAE and the semantic codes of every item."""

    params: Any  # the RQVAE module's params (codebooks [L, K, latent] included)
    codes: np.ndarray  # [n, L] int32: nearest code per level after training
    reconstruction_error: float  # MSE per feature over all items
    residual_norms: np.ndarray  # [L]: mean latent residual L2 norm after each level
    loss_history: np.ndarray  # [steps]: training loss per step
    codebook_usage: np.ndarray  # [L]: share of each level's K codes some item uses


def train_rqvae(
    features: np.ndarray,
    cfg_tokenize: ml_collections.ConfigDict,
    *,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 100,
) -> RQVAEResult:
    """Trains an RQ-VAE on features [n, D] with the `tokenize` config section; codes all items.

    Args:
      features: [n, D] item feature matrix (finite; n >= tokenize.codebook_size).
      cfg_tokenize: `config.tokenize` (levels, codebook_size, latent_dim, hidden_dims, beta,
        gradient, dead_code_steps, steps, batch_size, learning_rate, kmeans_iters, seed).
      log_fn: called as log_fn(step, metrics) every `log_every` steps and after the last.
    """
    cfg = cfg_tokenize
    x = check_points(features, int(cfg.codebook_size))
    model = build_rqvae(cfg, x.shape[1])
    n, steps = x.shape[0], int(cfg.steps)
    batch_size = min(int(cfg.batch_size), n)
    tx, _ = make_optimizer(optimizer_config(cfg), steps)
    xs = jnp.asarray(x)  # [n, D], on device for the whole run

    rng = jax.random.PRNGKey(int(cfg.seed))
    rng, init_rng = jax.random.split(rng)
    state = init_state(model, tx, xs, cfg, init_rng)
    hyper = dict(beta=float(cfg.beta), batch_size=batch_size, dead_steps=int(cfg.dead_code_steps))
    step_fn = jax.jit(partial(train_step, model=model, tx=tx, **hyper), donate_argnums=0)
    per_epoch = n // batch_size
    losses = []
    for step in range(steps):
        if step % per_epoch == 0:
            rng, epoch_rng = jax.random.split(rng)
            perm = jax.random.permutation(epoch_rng, n)
        state, metrics = step_fn(state, xs, perm, (step % per_epoch) * batch_size)
        losses.append(metrics["loss"])
        if log_fn is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            log_fn(step + 1, {f"tokenize/{k}": float(v) for k, v in metrics.items()})

    codes, mse, norms = _evaluate_all(model, state.params, xs)
    usage = np.array([np.unique(codes[:, lvl]).size for lvl in range(model.levels)])
    return RQVAEResult(
        params=jax.device_get(state.params),
        codes=codes,
        reconstruction_error=mse,
        residual_norms=norms,
        loss_history=np.asarray(jnp.stack(losses)),
        codebook_usage=usage / model.codebook_size,
    )
