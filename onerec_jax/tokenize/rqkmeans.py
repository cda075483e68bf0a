"""Residual k-means (RQ-KMeans): k-means per level on what the previous levels left over.

`kmeans` runs greedy k-means++ seeding and Lloyd iterations in one jitted function. With
`balanced=True` every assignment step gives each cluster exactly floor(n/k) or ceil(n/k) points:
a few warm-started Sinkhorn iterations price the clusters (dual potentials), then points propose
to their cheapest cluster with room left and each cluster keeps its closest proposers up to its
capacity, until every point is placed (at most k + 1 rounds: each round fills a cluster or ends).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from onerec_jax.errors import ConfigError, DataFormatError

_SINKHORN_ITERS = 10  # per Lloyd iteration; the duals carry over, so few are needed
_SINKHORN_EPS = 0.05  # entropic regularisation, relative to the mean point-centroid distance


class ResidualKMeans(NamedTuple):
    """Codes [n, levels] int32, codebooks [levels, k, d], mean residual L2 norm after each level."""

    codes: np.ndarray
    codebooks: np.ndarray
    residual_norms: np.ndarray


def check_points(x, k: int, what: str = "tokenize.codebook_size") -> np.ndarray:
    """x as float32 [n, d]; raises on NaN/inf or on fewer points than clusters."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DataFormatError(f"Item features must be a 2-d [items, dims] matrix, got {x.shape}.")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataFormatError(
            f"Item features hold NaN or inf (first at row {bad}): fix or impute the features."
        )
    if x.shape[0] < k:
        raise ConfigError(
            f"{what}={k} is larger than the number of items ({x.shape[0]}): "
            f"use a codebook size of at most {x.shape[0]}."
        )
    return x


def _as_key(rng) -> jax.Array:
    return jax.random.PRNGKey(rng) if isinstance(rng, int | np.integer) else rng


def squared_distances(x: jax.Array, c: jax.Array) -> jax.Array:
    """[n, k] squared Euclidean distances, clipped at 0 against cancellation."""
    d = jnp.sum(x * x, 1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, 1)[None, :]
    return jnp.maximum(d, 0.0)


@partial(jax.jit, static_argnames="k")
def kmeans_plus_plus(x: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """Greedy k-means++ seeding (as scikit-learn): each next centroid is the best of 2 + log k
    points drawn with probability ~ D(x)^2, best meaning the lowest total D(x)^2 after adding it.
    """
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    key0, key = jax.random.split(rng)
    first = jax.random.randint(key0, (), 0, n)
    centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    min_d2 = jnp.sum((x - x[first]) ** 2, 1)  # [n]

    def body(j, carry):
        centroids, min_d2 = carry
        # All points coincide with centroids (duplicates): fall back to uniform draws.
        logits = jnp.where(min_d2.sum() > 0, jnp.log(min_d2), 0.0)
        picks = jax.random.categorical(jax.random.fold_in(key, j), logits, shape=(trials,))
        d2 = jnp.minimum(min_d2[None, :], squared_distances(x[picks], x))  # [trials, n]
        best = jnp.argmin(d2.sum(1))
        return centroids.at[j].set(x[picks[best]]), d2[best]

    centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_d2))
    return centroids


def _capacities(n: int, k: int) -> jax.Array:
    return n // k + (jnp.arange(k) < n % k).astype(jnp.int32)  # [k], sums to n


def _sinkhorn_duals(cost: jax.Array, g: jax.Array, iters: int) -> jax.Array:
    """Cluster potentials g [k] of entropic OT between uniform points and uniform clusters."""
    eps = _SINKHORN_EPS * jnp.maximum(jnp.mean(jnp.min(cost, 1)), 1e-12)

    def body(_, g):
        f = -eps * jax.nn.logsumexp((g[None, :] - cost) / eps, axis=1)  # [n]
        return -eps * jax.nn.logsumexp((f[:, None] - cost) / eps, axis=0)  # [k]

    g = jax.lax.fori_loop(0, iters, body, g)
    return g - g.mean()


def balanced_assign(cost: jax.Array) -> jax.Array:
    """[n] cluster per point with sizes floor/ceil(n/k), greedy on the [n, k] cost.

    Points propose to their cheapest cluster with room left; each cluster accepts its cheapest
    proposers up to its remaining capacity. Every round either places all remaining points or
    fills at least one more cluster, so the loop ends after at most k + 1 rounds.
    """
    n, k = cost.shape
    rows = jnp.arange(n)

    def cond(carry):
        assign, _ = carry
        return jnp.any(assign < 0)

    def body(carry):
        assign, room = carry
        open_cost = jnp.where(room[None, :] > 0, cost, jnp.inf)
        choice = jnp.argmin(open_cost, axis=1)
        choice = jnp.where(assign < 0, choice, k)  # placed points do not propose: sentinel k
        own = jnp.where(assign < 0, open_cost[rows, jnp.minimum(choice, k - 1)], jnp.inf)
        order = jnp.lexsort((own, choice))  # grouped by cluster, cheapest first
        sorted_choice = choice[order]
        first = jnp.searchsorted(sorted_choice, sorted_choice, side="left")
        rank = jnp.arange(n) - first  # position among this cluster's proposers
        room_ext = jnp.concatenate([room, jnp.zeros((1,), room.dtype)])
        accept = rank < room_ext[sorted_choice]
        assign = assign.at[order].set(jnp.where(accept, sorted_choice, assign[order]))
        taken = jnp.zeros(k + 1, room.dtype).at[sorted_choice].add(accept.astype(room.dtype))
        return assign, room - taken[:k]

    assign0 = jnp.full((n,), -1, jnp.int32)
    assign, _ = jax.lax.while_loop(cond, body, (assign0, _capacities(n, k)))
    return assign


def _assign(x, centroids, g, balanced: bool):
    d2 = squared_distances(x, centroids)  # [n, k]
    if not balanced:
        return jnp.argmin(d2, axis=1).astype(jnp.int32), d2, g
    g = _sinkhorn_duals(d2, g, _SINKHORN_ITERS)
    return balanced_assign(d2 - g[None, :]), d2, g


def update_centroids(x: jax.Array, assign: jax.Array, d2: jax.Array, k: int) -> jax.Array:
    """Cluster means; empty clusters restart at the points farthest from their centroid."""
    counts = jnp.zeros(k, x.dtype).at[assign].add(1.0)
    sums = jnp.zeros((k, x.shape[1]), x.dtype).at[assign].add(x)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    own_d2 = jnp.take_along_axis(d2, assign[:, None], axis=1)[:, 0]  # [n]
    _, farthest = jax.lax.top_k(own_d2, k)  # the k worst-served points, farthest first
    empty = counts == 0
    slot = jnp.cumsum(empty) - 1  # the i-th empty cluster takes the i-th farthest point
    return jnp.where(empty[:, None], x[farthest[jnp.clip(slot, 0, k - 1)]], means)


@partial(jax.jit, static_argnames=("k", "iters", "balanced"))
def _kmeans(x, k: int, iters: int, rng, balanced: bool):
    centroids = kmeans_plus_plus(x, k, rng)
    g = jnp.zeros(k, x.dtype)

    def body(_, carry):
        centroids, g = carry
        assign, d2, g = _assign(x, centroids, g, balanced)
        return update_centroids(x, assign, d2, k), g

    centroids, g = jax.lax.fori_loop(0, iters, body, (centroids, g))
    assign, _, _ = _assign(x, centroids, g, balanced)
    return centroids, assign


def kmeans(x, k: int, *, iters: int, rng, balanced: bool = False) -> tuple[jax.Array, jax.Array]:
    """k-means++ seeding, then `iters` Lloyd iterations (assign, update), then a final assignment.

    Args:
      x: [n, d] points.
      k: clusters; n >= k.
      iters: Lloyd iterations.
      rng: a JAX PRNG key or an int seed.
      balanced: every cluster gets floor(n/k) or ceil(n/k) points.

    Returns:
      centroids [k, d] float32 and assignment [n] int32 (to those centroids).
    """
    x = check_points(x, k)
    return _kmeans(jnp.asarray(x), k, int(iters), _as_key(rng), bool(balanced))


def residual_kmeans(
    x, levels: int, k: int, *, iters: int, rng, balanced: bool = False
) -> ResidualKMeans:
    """`levels` rounds of k-means, round l on the residual x - sum of the chosen centroids < l."""
    x = check_points(x, k)
    if levels < 1:
        raise ConfigError(f"tokenize.levels={levels}: use at least 1 level.")
    residual = jnp.asarray(x)
    codes, codebooks, norms = [], [], []
    for key in jax.random.split(_as_key(rng), levels):
        centroids, assign = _kmeans(residual, k, int(iters), key, bool(balanced))
        residual = residual - centroids[assign]
        codes.append(assign)
        codebooks.append(centroids)
        norms.append(jnp.mean(jnp.linalg.norm(residual, axis=1)))
    return ResidualKMeans(
        codes=np.asarray(jnp.stack(codes, 1), dtype=np.int32),
        codebooks=np.asarray(jnp.stack(codebooks)),
        residual_norms=np.asarray(jnp.stack(norms)),
    )


@jax.jit
def _encode(x, codebooks):
    def level(residual, codebook):
        code = jnp.argmin(squared_distances(residual, codebook), axis=1).astype(jnp.int32)
        return residual - codebook[code], code

    _, codes = jax.lax.scan(level, x, codebooks)
    return codes.T  # [n, levels]


def encode_residual(x, codebooks) -> np.ndarray:
    """Codes [n, levels] of new points: the nearest centroid per level, greedily (unbalanced)."""
    x = check_points(x, 1)
    return np.asarray(_encode(jnp.asarray(x), jnp.asarray(codebooks, jnp.float32)))
