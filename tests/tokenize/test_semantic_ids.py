"""Collision tokens, prefix tables against a brute-force scan, and the .npz / .csv files."""

import csv
import itertools

import numpy as np
import pytest

from onerec_jax.errors import DataFormatError
from onerec_jax.tokenize import semantic_ids
from onerec_jax.tokenize.semantic_ids import (
    PAD_CODE,
    SemanticIds,
    add_collision_tokens,
    from_codes,
    random_codes,
    write_csv,
)

# Items 1..6; items 1, 3, 5 share (1, 2) and items 2, 6 share (0, 0).
HAND_CODES = np.array([[1, 2], [0, 0], [1, 2], [3, 1], [1, 2], [0, 0]])


def test_collision_tokens_number_groups_in_dense_id_order():
    full = add_collision_tokens(HAND_CODES)
    np.testing.assert_array_equal(full[:, :2], HAND_CODES)
    np.testing.assert_array_equal(full[:, 2], [0, 0, 1, 0, 2, 1])
    assert full.dtype == np.int32


def test_from_codes_pads_row_zero_and_sizes_the_collision_token():
    ids = from_codes(HAND_CODES, 4)
    assert ids.codes.shape == (7, 3)
    assert (ids.codes[0] == PAD_CODE).all()
    assert ids.codebook_sizes == (4, 4, 3)  # largest collision group has 3 items
    assert (ids.levels, ids.id_length, ids.n_items) == (2, 3, 6)
    assert len({tuple(r) for r in ids.item_codes.tolist()}) == 6
    assert ids.lookup((1, 2, 2)) == 5
    assert ids.lookup((0, 0, 1)) == 6
    for missing in [(1, 2, 3), (2, 0, 0), (0, 0), (-1, 0, 0), (4, 0, 0)]:
        with pytest.raises(KeyError):
            ids.lookup(missing)


def _brute_force_tables(full: np.ndarray, sizes):
    """Per level: sorted distinct prefixes, and the expected valid / next arrays."""
    rows = [tuple(r) for r in full.tolist()]
    item_of = {r: k + 1 for k, r in enumerate(rows)}
    prefixes = [sorted({r[:level] for r in rows}) for level in range(full.shape[1] + 1)]
    ids = [{p: k for k, p in enumerate(ps)} for ps in prefixes]
    valid, nxt = [], []
    for level, size in enumerate(sizes):
        v = np.zeros((len(prefixes[level]), size), bool)
        n = np.full(v.shape, -1, np.int64)
        for pid, prefix in enumerate(prefixes[level]):
            for code in range(size):
                longer = (*prefix, code)
                if longer in ids[level + 1]:
                    v[pid, code] = True
                    last = level == full.shape[1] - 1
                    n[pid, code] = item_of[longer] if last else ids[level + 1][longer]
        valid.append(v)
        nxt.append(n)
    return valid, nxt


@pytest.mark.parametrize(("seed", "sizes"), [(0, (5, 5, 5)), (1, (5, 5, 5)), (2, (5, 3, 4))])
def test_prefix_tables_match_brute_force(seed, sizes):
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, 200) for k in sizes], axis=1)  # 200 items, <= 125 tuples
    ids = from_codes(codes, sizes)
    assert ids.codebook_sizes[-1] > 1  # collisions occur
    tables = ids.prefix_tables()
    assert ids.prefix_tables() is tables  # cached
    valid, nxt = _brute_force_tables(ids.item_codes, ids.codebook_sizes)
    assert len(tables.valid) == len(tables.next_prefix) == ids.id_length
    for level in range(ids.id_length):
        np.testing.assert_array_equal(tables.valid[level], valid[level])
        np.testing.assert_array_equal(tables.next_prefix[level], nxt[level])
        assert tables.next_prefix[level].dtype == np.int32
    # Following next_prefix along each item's full id reaches that item.
    for item, row in enumerate(ids.item_codes.tolist(), start=1):
        node = 0
        for level, code in enumerate(row):
            assert tables.valid[level][node, code]
            node = tables.next_prefix[level][node, code]
        assert node == item
    np.testing.assert_array_equal(ids.code_to_item(ids.item_codes), np.arange(1, 201))
    # Every possible tuple: an item exactly where some item has it.
    all_tuples = np.array(list(itertools.product(*map(range, ids.codebook_sizes))))
    known = {tuple(r): k + 1 for k, r in enumerate(ids.item_codes.tolist())}
    expected = [known.get(tuple(t), 0) for t in all_tuples.tolist()]
    np.testing.assert_array_equal(ids.code_to_item(all_tuples), expected)
    # The stacked form holds the same tables, padded.
    sv, sn = tables.stacked()
    assert sv.shape == sn.shape == (ids.id_length, max(tables.n_prefixes), max(ids.codebook_sizes))
    for level in range(ids.id_length):
        p, k = tables.valid[level].shape
        np.testing.assert_array_equal(sv[level, :p, :k], tables.valid[level])
        np.testing.assert_array_equal(sn[level, :p, :k], tables.next_prefix[level])
        assert not sv[level, p:].any() and not sv[level, :, k:].any()
        assert (sn[level, p:] == -1).all() and (sn[level, :, k:] == -1).all()


@pytest.mark.parametrize(
    ("codes", "size", "match"),
    [
        ([[0, 4]], 4, "code 4 of item row 0 at level 1"),
        ([[0, 1], [-1, 0]], 4, "code -1 of item row 1 at level 0"),
        ([[0, 3]], (4, 3), "outside 0..2"),
        ([[0.0, 1.0]], 4, "integers"),
        ([0, 1], 4, "shape"),
        ([[0, 1]], (4, 4, 4), "does not fit"),
    ],
)
def test_from_codes_rejects_bad_codes(codes, size, match):
    with pytest.raises(ValueError, match=match):
        from_codes(np.array(codes), size)


def test_random_codes_is_the_seeded_uniform_control():
    a, b = random_codes(500, 3, 8, 0), random_codes(500, 3, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.codes.shape == (501, 4) and a.codebook_sizes[:3] == (8, 8, 8)
    assert a.item_codes[:, :3].min() == 0 and a.item_codes[:, :3].max() == 7
    assert not np.array_equal(a.codes, random_codes(500, 3, 8, 1).codes)


def test_save_load_round_trip_and_csv(tmp_path):
    ids = from_codes(HAND_CODES, (4, 5))
    path = tmp_path / "sub" / "semantic_ids.npz"
    ids.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["semantic_ids.npz"]  # no temp file left
    loaded = semantic_ids.load(path)
    np.testing.assert_array_equal(loaded.codes, ids.codes)
    assert loaded.codes.dtype == np.int32
    assert loaded.codebook_sizes == (4, 5, 3)
    assert loaded.lookup((3, 1, 0)) == 4

    source = np.array([-1, 10, 20, 30, 40, 50, 60])  # SequenceData.item_ids: row 0 is padding
    titles = ["Toy Story", 'Heat, "the"', "Jumanji", "Casino", "Sabrina", "Balto"]
    years = np.array([1995, 1995, 0, 1995, 1995, 1995], np.int32)
    write_csv(tmp_path / "ids.csv", ids, source, titles, years)
    with open(tmp_path / "ids.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["item_id", "movieId", "title", "year", "code_0", "code_1", "code_2"]
    assert [r["title"] for r in rows] == titles
    assert [r["movieId"] for r in rows] == ["10", "20", "30", "40", "50", "60"]
    assert rows[2]["year"] == "" and rows[1]["year"] == "1995"
    assert [(r["item_id"], r["code_0"], r["code_1"], r["code_2"]) for r in rows[4:]] == [
        ("5", "1", "2", "2"),
        ("6", "0", "0", "1"),
    ]
    with pytest.raises(ValueError, match="titles has 2 rows"):
        write_csv(tmp_path / "bad.csv", ids, source, titles[:2], years)


def test_load_rejects_missing_corrupt_and_wrong_files(tmp_path):
    ids = from_codes(HAND_CODES, 4)
    good = tmp_path / "good.npz"
    ids.save(good)
    data = good.read_bytes()

    cases = {"missing.npz": None, "truncated.npz": data[: len(data) // 2], "junk.npz": b"xyz"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(DataFormatError, match=str(path)):
            semantic_ids.load(path)

    other = tmp_path / "other.npz"
    np.savez(other, items=np.arange(3))
    with pytest.raises(DataFormatError, match=r"other\.npz: not a semantic-id file"):
        semantic_ids.load(other)

    # A well-formed file whose ids are not unique (collision token dropped to 0).
    dup_codes = ids.codes.copy()
    dup_codes[1:, 2] = 0
    SemanticIds(dup_codes, (4, 4, 3)).save(tmp_path / "dup.npz")
    with pytest.raises(DataFormatError, match="share a semantic id"):
        semantic_ids.load(tmp_path / "dup.npz")

    out_of_range = SemanticIds(ids.codes, (4, 2, 3))  # level-1 code 2 and 3 exceed size 2
    out_of_range.save(tmp_path / "range.npz")
    with pytest.raises(DataFormatError, match="outside 0..1"):
        semantic_ids.load(tmp_path / "range.npz")
