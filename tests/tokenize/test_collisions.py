"""Collision-aware last-level codes against a brute-force search over assignments."""

import itertools

import numpy as np

from onerec_jax.tokenize import collisions


def _brute_force(codes, dist):
    """Minimum-cost distinct last codes for the clashing items of each prefix, by enumeration."""
    out = codes.copy()
    k = dist.shape[1]
    for prefix in {tuple(c[:-1]) for c in codes}:
        members = [i for i in range(len(codes)) if tuple(codes[i, :-1]) == prefix]
        last = [codes[i, -1] for i in members]
        clash = [i for i, c in zip(members, last, strict=True) if last.count(c) > 1]
        if not clash:
            continue
        taken = {codes[i, -1] for i in members if i not in clash}
        free = [c for c in range(k) if c not in taken]
        best = min(
            itertools.permutations(free, len(clash)),
            key=lambda p: sum(dist[i, c] for i, c in zip(clash, p, strict=True)),
        )
        for i, c in zip(clash, best, strict=True):
            out[i, -1] = c
    return out


def test_hand_case():
    # Items 0 and 1 share (0, 2); item 2 holds (0, 1) with prefix 0; item 3 is alone.
    codes = np.array([[0, 2], [0, 2], [0, 1], [1, 2]])
    dist = np.array(
        [
            [5.0, 3.0, 0.0, 1.0],  # item 0: nearest 2, then 3
            [5.0, 0.5, 0.1, 4.0],  # item 1: nearest 2, then 1 (taken by item 2), then 0
            [9.0, 0.0, 9.0, 9.0],
            [9.0, 9.0, 0.0, 9.0],
        ]
    )
    out = collisions.spread_last_level(codes, dist)
    # Options for (item 0, item 1) over free codes {0, 2, 3}: (2, 0) costs 5, (3, 2) costs 1.1.
    np.testing.assert_array_equal(out, [[0, 3], [0, 2], [0, 1], [1, 2]])


def _cost(dist, codes):
    return sum(dist[i, codes[i, -1]] for i in range(len(codes)))


def test_matches_brute_force_and_removes_collisions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, k = 20, 6
        codes = rng.integers(0, 3, (n, 3))
        codes[:, -1] = rng.integers(0, k, n)
        dist = rng.random((n, k))
        _, sizes = np.unique(codes[:, :-1], axis=0, return_counts=True)
        if sizes.max() > k:  # a prefix larger than the codebook cannot be separated
            continue
        out = collisions.spread_last_level(codes, dist)
        np.testing.assert_array_equal(out[:, :-1], codes[:, :-1])
        assert abs(_cost(dist, out) - _cost(dist, _brute_force(codes, dist))) < 1e-9
        assert len(np.unique(out, axis=0)) == n  # every full id distinct


def test_last_level_distances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    books = rng.normal(size=(3, 5, 4)).astype(np.float32)
    codes = rng.integers(0, 5, (50, 3))
    d = collisions.last_level_distances(x, codes, books, chunk=7)
    r = x - books[0][codes[:, 0]] - books[1][codes[:, 1]]
    ref = ((r[:, None, :] - books[2][None]) ** 2).sum(-1)
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-4)
