"""End to end on the real ml-latest-small in ../shared (skipped where it is absent)."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from onerec_jax.data import movielens, sequences

# ../shared beside the checkout, or wherever $ONEREC_ML_LATEST_SMALL points.
ML_LATEST_SMALL = Path(
    os.environ.get("ONEREC_ML_LATEST_SMALL")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-latest-small"
)
pytestmark = pytest.mark.skipif(
    not (ML_LATEST_SMALL / "ratings.csv").exists(),
    reason=f"{ML_LATEST_SMALL} absent (set ONEREC_ML_LATEST_SMALL)",
)


def test_ml_latest_small_end_to_end(tmp_path):
    raw = movielens.read_dataset(ML_LATEST_SMALL)
    data = sequences.build_sequences(raw.interactions, sequences.SequenceOptions())
    assert (data.n_interactions, data.n_users, data.n_items) == (100_004, 671, 9_066)
    # Independent reference with the csv module: per user, the ratings ordered by
    # (timestamp, line in the file); test = last, validation = second to last.
    per_user = {}
    with open(ML_LATEST_SMALL / "ratings.csv", newline="") as f:
        for line, row in enumerate(csv.DictReader(f)):
            key = (int(row["timestamp"]), line)
            per_user.setdefault(int(row["userId"]), []).append((key, int(row["movieId"])))
    for rated in per_user.values():
        rated.sort()
    users = [int(u) for u in data.user_ids]
    assert users == sorted(per_user)
    test_movies = data.item_ids[data.test.targets]
    valid_movies = data.item_ids[data.valid.targets]
    assert [int(m) for m in test_movies] == [per_user[u][-1][1] for u in users]
    assert [int(m) for m in valid_movies] == [per_user[u][-2][1] for u in users]
    full = [[int(m) for m in data.item_ids[data.sequence(k)]] for k in range(data.n_users)]
    assert full == [[m for _, m in per_user[u]] for u in users]
    # Ties are common in MovieLens; the test above only means something if some exist.
    ties = sum(len(r) - len({k[0] for k, _ in r}) for r in per_user.values())
    assert ties > 1000
    # Titles round-trip, quoted commas and years included.
    row = raw.items.rows(np.array([2571]))[0]
    assert (raw.items.titles[row], int(raw.items.years[row])) == ("Matrix, The", 1999)
