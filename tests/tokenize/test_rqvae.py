"""RQ-VAE: training on clustered vectors, the rotation trick, dead-code restarts, errors."""

from collections import Counter
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import base_config
from onerec_jax.errors import ConfigError, DataFormatError
from onerec_jax.models.optim import make_optimizer
from onerec_jax.tokenize import rqvae


def clustered(n_per: int = 50, n_clusters: int = 8, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 5.0
    labels = np.repeat(np.arange(n_clusters), n_per)
    x = centers[labels] + rng.normal(size=(labels.size, dim)) * 0.5
    return x.astype(np.float32), labels


def small_config(**overrides):
    cfg = base_config().tokenize
    cfg.update(
        dict(
            levels=3,
            codebook_size=8,
            latent_dim=8,
            hidden_dims=(32,),
            steps=600,
            batch_size=128,
            kmeans_iters=10,
            dead_code_steps=50,
        )
    )
    cfg.update(overrides)
    return cfg


def purity(codes: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose code's most common label is their own."""
    hits = sum(Counter(labels[codes == c].tolist()).most_common(1)[0][1] for c in np.unique(codes))
    return hits / len(codes)


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.fixture(scope="module", params=["ste", "rotation"])
def trained(request, data):
    x, _ = data
    logged = []
    result = rqvae.train_rqvae(
        x, small_config(gradient=request.param), log_fn=lambda s, m: logged.append((s, m))
    )
    return request.param, result, logged


def test_training_finds_clusters_and_shrinks_residuals(trained, data):
    x, labels = data
    gradient, result, logged = trained
    assert result.codes.shape == (400, 3) and result.codes.dtype == np.int32
    assert purity(result.codes[:, 0], labels) > 0.8, gradient  # chance: 1/8
    norms = result.residual_norms
    assert norms.shape == (3,) and norms[0] > norms[1] > norms[2], norms
    history = result.loss_history
    assert history.shape == (600,) and np.isfinite(history).all()
    assert history[-50:].mean() < 0.3 * history[:50].mean(), gradient
    # MSE per feature, well below the data's variance (about 25 per feature).
    assert result.reconstruction_error < 2.0
    assert [s for s, _ in logged] == [100, 200, 300, 400, 500, 600]
    names = ("loss", "recon", "codebook", "commitment")
    assert set(logged[0][1]) == {f"tokenize/{k}" for k in names}


def test_encode_reproduces_training_codes(trained, data):
    x, _ = data
    gradient, result, _ = trained
    cfg = small_config(gradient=gradient)
    np.testing.assert_array_equal(rqvae.encode_rqvae(result.params, x, cfg), result.codes)
    np.testing.assert_array_equal(rqvae.encode_rqvae(result.params, x[:5], cfg), result.codes[:5])


def test_rotation_trick_hand_case():
    z, zq = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
    np.testing.assert_allclose(rqvae.rotation_trick(z, zq), [0.0, 2.0], atol=1e-6)
    # R rotates e1 onto e2 (90 degrees), scale |zq|/|z| = 2: d out / dz = 2 [[0, -1], [1, 0]].
    jac_rot = jax.jacobian(rqvae.rotation_trick)(z, zq)
    np.testing.assert_allclose(jac_rot, [[0.0, -2.0], [2.0, 0.0]], atol=1e-6)
    jac_ste = jax.jacobian(rqvae.straight_through)(z, zq)
    np.testing.assert_allclose(jac_ste, np.eye(2), atol=1e-6)


def test_rotation_trick_is_scaled_rotation_onto_zq():
    rng = np.random.default_rng(0)
    z, zq = (jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(rqvae.rotation_trick(z, zq), zq, rtol=1e-5, atol=1e-6)
    scale = float(jnp.linalg.norm(zq) / jnp.linalg.norm(z))
    rotation = np.asarray(jax.jacobian(rqvae.rotation_trick)(z, zq)) / scale
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-5)
    np.testing.assert_allclose(rotation @ np.asarray(z) * scale, zq, rtol=1e-5, atol=1e-5)
    # No gradient reaches zq: the rotation and the scale are constants.
    np.testing.assert_allclose(jax.grad(lambda q: rqvae.rotation_trick(z, q).sum())(zq), 0.0)


def test_dead_codes_restart_at_batch_residuals(data):
    x, _ = data
    cfg = small_config(steps=10, batch_size=64)
    window = 3
    model = rqvae.build_rqvae(cfg, x.shape[1])
    tx, _ = make_optimizer(rqvae.optimizer_config(cfg), 10)
    xs = jnp.asarray(x)
    state = rqvae.init_state(model, tx, xs, cfg, jax.random.PRNGKey(0))
    far = state.params["codebooks"].at[:, :2].set(1e3)  # codes 0 and 1 of every level: unused
    state = state._replace(params={**state.params, "codebooks": far})
    step = jax.jit(
        partial(rqvae.train_step, model=model, tx=tx, beta=0.25, batch_size=64, dead_steps=window)
    )
    perm = jnp.arange(400)
    for i in range(window - 1):
        state, _ = step(state, xs, perm, i * 64)
    assert (state.params["codebooks"][:, :2] > 100).all()  # not yet: unused for 2 < 3 steps
    before = state.params
    state, _ = step(state, xs, perm, (window - 1) * 64)
    codebooks = np.asarray(state.params["codebooks"])
    # What each level quantised for this step's batch, under the params before the update.
    _, quantized = model.apply({"params": before}, xs[(window - 1) * 64 : window * 64])
    for level in range(3):
        residuals = np.asarray(quantized.residuals[level])  # [64, d]
        for code in (0, 1):
            gap = np.abs(residuals - codebooks[level, code]).max(1).min()
            assert gap < 1e-5, (level, code)
    np.testing.assert_array_equal(np.asarray(state.last_used)[:, :2], window - 1)
    assert (np.asarray(state.last_used) >= 0).all()  # every code was used or restarted
    # The restarted codes now win items of the catalogue again.
    codes = rqvae.encode_rqvae(state.params, x, cfg)
    assert np.isin([0, 1], codes[:, 0]).all()


def test_restart_dead_codes_hand_case():
    codebooks = jnp.zeros((1, 3, 2))
    last_used = jnp.array([[4, -1, 1]])
    codes = jnp.array([[0, 0]])  # this step's batch (2 items) uses code 0 only
    residuals = jnp.array([[[1.0, 2.0], [1.0, 2.0]]])  # identical rows: the pick is known
    new, used = rqvae.restart_dead_codes(
        codebooks, last_used, codes, residuals, 5, jax.random.PRNGKey(0), dead_code_steps=4
    )
    # Code 1 (never used) and code 2 (unused in steps 2..5) restart; code 0 was just used.
    np.testing.assert_array_equal(np.asarray(used), [[5, 5, 5]])
    np.testing.assert_allclose(np.asarray(new), [[[0.0, 0.0], [1.0, 2.0], [1.0, 2.0]]])
    new, used = rqvae.restart_dead_codes(
        codebooks, last_used, codes, residuals, 4, jax.random.PRNGKey(0), dead_code_steps=4
    )
    # One step earlier, code 2 was unused for 3 steps only (2, 3, 4): it stays.
    np.testing.assert_array_equal(np.asarray(used), [[4, 4, 1]])
    np.testing.assert_allclose(np.asarray(new), [[[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]]])


def test_bad_inputs_raise(data):
    x, _ = data
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(DataFormatError, match="NaN"):
        rqvae.train_rqvae(bad, small_config(steps=1))
    with pytest.raises(ConfigError, match=r"tokenize\.codebook_size=512.*\(400\)"):
        rqvae.train_rqvae(x, small_config(codebook_size=512, steps=1))
    with pytest.raises(ConfigError, match=r"tokenize\.gradient='gumbel'"):
        rqvae.train_rqvae(x, small_config(gradient="gumbel", steps=1))
