"""Quality numbers of semantic ids on hand-worked examples."""

import math

import numpy as np
import pytest

from onerec_jax.tokenize import quality
from onerec_jax.tokenize.semantic_ids import SemanticIds, from_codes


def test_usage_and_perplexity_by_hand():
    codes = np.array([0, 0, 1, 2])
    assert quality.code_usage(codes, 4) == 0.75
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # = 1.5 ln 2
    assert quality.perplexity(codes) == pytest.approx(math.exp(h))
    assert quality.perplexity(codes) == pytest.approx(2**1.5)
    assert quality.perplexity(np.zeros(5, int)) == pytest.approx(1.0)
    assert quality.perplexity(np.arange(8)) == pytest.approx(8.0)


def test_collision_stats_by_hand():
    content = np.array([[0, 1], [0, 1], [0, 1], [2, 2], [3, 3], [3, 3]])
    stats = quality.collision_stats(content)
    assert stats == {
        "collision_fraction": pytest.approx(5 / 6),
        "largest_collision_group": 3,
        "distinct_content_ids": 3,
    }
    assert quality.collision_stats(np.array([[0, 1], [1, 0]]))["collision_fraction"] == 0.0


def test_quality_report_levels_and_collisions():
    # Level 0 codes 0,0,0,1,2,2 (K=4); level 1 codes 1,1,1,2,3,3 (K=4).
    ids = from_codes(np.array([[0, 1], [0, 1], [0, 1], [1, 2], [2, 3], [2, 3]]), 4)
    r = quality.quality_report(ids, recon_error=0.25)
    assert r["n_items"] == 6 and r["levels"] == 2
    assert r["level0_used_codes"] == 3 and r["level0_usage"] == 0.75
    h0 = -(0.5 * math.log(0.5) + 1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3))
    assert r["level0_perplexity"] == pytest.approx(math.exp(h0))
    assert r["level0_branching"] == 3  # the empty prefix has 3 children
    assert r["level1_branching"] == 1  # 3 two-code prefixes over 3 parents
    assert r["collision_fraction"] == pytest.approx(5 / 6)
    assert r["largest_collision_group"] == 3 == r["collision_token_size"]
    assert r["duplicate_ids"] == 0 and r["recon_error"] == 0.25
    assert all(isinstance(v, int | float) for v in r.values())
    text = quality.format_report(r)
    assert text.splitlines()[0].split() == [
        "level",
        "codebook_size",
        "used_codes",
        "usage",
        "perplexity",
        "branching",
    ]
    assert text.splitlines()[1].split()[:4] == ["0", "4", "3", "0.7500"]
    assert "collision_fraction" in text and "0.8333" in text


def test_quality_report_rejects_duplicate_ids():
    codes = np.array([[-1, -1], [0, 0], [0, 0]], np.int32)
    with pytest.raises(ValueError, match="1 items share a full semantic id"):
        quality.quality_report(SemanticIds(codes, (2, 1)))


def test_purity_and_chance_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    codes = np.array([0, 0, 0, 1, 1, 1])  # code 0: labels 0,0,1; code 1: labels 1,1,2
    assert quality.purity(labels, codes) == pytest.approx(4 / 6)
    # One code for everything: purity is the majority share, whatever the permutation.
    assert quality.chance_purity(labels, np.zeros(6, int)) == pytest.approx(3 / 6)
    # One code per item: every permutation is perfectly pure.
    assert quality.chance_purity(labels, np.arange(6)) == 1.0


def test_nmi_by_hand():
    assert quality.nmi([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert quality.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)
    assert quality.nmi([3, 3, 3], [1, 1, 1]) == 1.0
    # labels 0,0,1,1 vs codes 0,0,0,1: joint (c0,l0)=1/2, (c0,l1)=1/4, (c1,l1)=1/4.
    mi = 0.5 * math.log(0.5 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.75 * 0.5))
    mi += 0.25 * math.log(0.25 / (0.25 * 0.5))
    h_codes = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mi / ((h_codes + math.log(2)) / 2)
    assert quality.nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected)


def test_nmi_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels, codes = rng.integers(0, 5, 300), rng.integers(0, 9, 300)
    codes[:100] = labels[:100]  # some dependence
    assert quality.nmi(labels, codes) == pytest.approx(
        metrics.normalized_mutual_info_score(labels, codes)
    )


def test_dominant_genre_and_agreement_by_hand():
    # Catalogue counts: Comedy 3, Drama 2, Action 1; "Western" and "Noir" 1 each (a tie).
    genres = [
        ("Drama",),
        ("Comedy", "Drama"),  # Comedy: more frequent
        ("Comedy",),
        ("Action", "Comedy"),  # Comedy
        (),  # no genre: left out
        ("Western", "Noir"),  # tie: first listed
    ]
    labels, names = quality.dominant_genres(genres)
    assert [names[k] if k >= 0 else None for k in labels] == [
        "Drama",
        "Comedy",
        "Comedy",
        "Comedy",
        None,
        "Western",
    ]
    # Level-0 codes: item 1,2 -> 0 (Drama, Comedy); items 3,4,5 -> 1 (Comedy x2, none); 6 -> 2.
    ids = from_codes(np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [2, 0]]), 3)
    r = quality.quality_report(ids, genres=[(), *genres])  # padding row first is accepted
    assert r["genre_items"] == 5
    assert r["genre_purity"] == pytest.approx(4 / 5)  # 1 of 2 + 2 of 2 + 1 of 1
    assert 0 < r["genre_purity_chance"] <= 1
    assert r["genre_nmi"] == pytest.approx(quality.nmi([1, 0, 0, 0, 2], [0, 0, 1, 1, 2]))
    r = quality.quality_report(ids, labels=np.array([0, 0, 1, 1, -1, 2]))
    assert (
        r["label_purity"] == 1.0 and r["label_items"] == 5 and r["label_nmi"] == pytest.approx(1.0)
    )
    with pytest.raises(ValueError, match="genres has 2 rows"):
        quality.quality_report(ids, genres=genres[:2])


def test_plot_usage_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    ids = from_codes(np.random.default_rng(0).integers(0, 16, (300, 3)), 16)
    path = tmp_path / "plots" / "usage.png"
    quality.plot_usage(ids, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
