"""k-means, balanced k-means and residual k-means against hand cases and a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.errors import ConfigError, DataFormatError
from onerec_jax.tokenize import rqkmeans


def blobs(n_per: int = 50, n_blobs: int = 8, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_blobs, dim)) * 5.0
    labels = np.repeat(np.arange(n_blobs), n_per)
    x = centers[labels] + rng.normal(size=(labels.size, dim)) * 0.5
    return x.astype(np.float32), labels


def matches_labels(assign: np.ndarray, labels: np.ndarray) -> bool:
    """Each cluster holds one blob and each blob one cluster (a bijection)."""
    pairs = set(zip(assign.tolist(), labels.tolist(), strict=True))
    return len(pairs) == len(set(labels.tolist())) == len(set(assign.tolist()))


def numpy_lloyd_step(x, centroids):
    """One assignment + mean update + final assignment, in float64 (no empty clusters)."""
    d2 = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    assign = d2.argmin(1)
    new = np.stack([x[assign == j].mean(0) for j in range(len(centroids))])
    final = ((x[:, None, :] - new[None, :, :]) ** 2).sum(-1).argmin(1)
    return new, final


def test_kmeans_recovers_blobs():
    x, labels = blobs()
    centroids, assign = rqkmeans.kmeans(x, 8, iters=10, rng=0)
    assert centroids.shape == (8, 16) and assign.dtype == jnp.int32
    assert matches_labels(np.asarray(assign), labels)


def test_one_lloyd_iteration_matches_numpy_reference():
    x, _ = blobs(n_per=20, n_blobs=4, dim=5, seed=3)
    x = x + np.random.default_rng(1).normal(size=x.shape).astype(np.float32) * 3.0  # overlap
    key = jax.random.PRNGKey(7)
    init = np.asarray(rqkmeans.kmeans_plus_plus(jnp.asarray(x), 6, key), np.float64)
    ref_centroids, ref_assign = numpy_lloyd_step(x.astype(np.float64), init)
    centroids, assign = rqkmeans.kmeans(x, 6, iters=1, rng=key)
    np.testing.assert_array_equal(np.asarray(assign), ref_assign)
    np.testing.assert_allclose(np.asarray(centroids), ref_centroids, rtol=1e-5, atol=1e-5)


def test_kmeans_plus_plus_picks_data_points():
    x, _ = blobs(n_per=10)
    init = np.asarray(rqkmeans.kmeans_plus_plus(jnp.asarray(x), 8, jax.random.PRNGKey(0)))
    dist = ((init[:, None, :] - x[None, :, :]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(dist, 0.0, atol=1e-4)


def test_empty_cluster_restarts_at_farthest_point():
    x = jnp.array([[0.0], [1.0], [10.0]])
    old = jnp.array([[0.0], [100.0]])
    d2 = rqkmeans.squared_distances(x, old)
    assign = jnp.argmin(d2, 1)  # all three points go to cluster 0; cluster 1 is empty
    new = rqkmeans.update_centroids(x, assign, d2, 2)
    # Cluster 0 is the mean 11/3; cluster 1 restarts at 10, the point farthest from centroid 0.
    np.testing.assert_allclose(np.asarray(new), [[11 / 3], [10.0]], rtol=1e-6)


def test_balanced_assign_hand_case():
    # Every point prefers cluster 0, which has room for two: its two cheapest points.
    cost = jnp.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    np.testing.assert_array_equal(np.asarray(rqkmeans.balanced_assign(cost)), [0, 0, 1, 1])


def test_balanced_kmeans_sizes_differ_by_at_most_one():
    x = np.random.default_rng(0).normal(size=(103, 4)).astype(np.float32)
    x[:60] += 10.0  # lopsided data: unbalanced k-means would give very unequal clusters
    _, assign = rqkmeans.kmeans(x, 10, iters=5, rng=1, balanced=True)
    sizes = np.bincount(np.asarray(assign), minlength=10)
    assert sizes.sum() == 103 and set(sizes.tolist()) <= {10, 11}


def test_balanced_kmeans_recovers_balanced_blobs():
    x, labels = blobs()
    _, assign = rqkmeans.kmeans(x, 8, iters=10, rng=0, balanced=True)
    assert matches_labels(np.asarray(assign), labels)


def test_residual_kmeans_norms_shrink_and_reconstruct():
    x, _ = blobs(n_per=25)
    out = rqkmeans.residual_kmeans(x, 3, 8, iters=10, rng=0)
    assert out.codes.shape == (200, 3) and out.codes.dtype == np.int32
    assert out.codebooks.shape == (3, 8, 16)
    norms = out.residual_norms
    assert np.mean(np.linalg.norm(x, axis=1)) > norms[0] > norms[1] > norms[2]
    recon = sum(out.codebooks[lvl][out.codes[:, lvl]] for lvl in range(3))
    final_residual = x - recon
    np.testing.assert_allclose(np.linalg.norm(final_residual, axis=1).mean(), norms[-1], rtol=1e-4)
    # Greedy nearest-centroid encoding reproduces the codes k-means ended with.
    np.testing.assert_array_equal(rqkmeans.encode_residual(x, out.codebooks), out.codes)


def test_nan_features_raise():
    x, _ = blobs(n_per=5)
    x[7, 3] = np.nan
    with pytest.raises(DataFormatError, match="row 7"):
        rqkmeans.kmeans(x, 4, iters=2, rng=0)
    with pytest.raises(DataFormatError):
        rqkmeans.residual_kmeans(np.where(np.isnan(x), np.inf, x), 2, 4, iters=2, rng=0)


def test_more_clusters_than_points_raises():
    x, _ = blobs(n_per=1)  # 8 points
    with pytest.raises(ConfigError, match=r"tokenize\.codebook_size=16.*\(8\)"):
        rqkmeans.residual_kmeans(x, 2, 16, iters=2, rng=0)
