"""`--mode update`: params re-indexed by source item id by hand, and a trained run continued on
new interactions (a new user, a movie the run never trained on) end to end."""

import json
import shutil

import flax.linen as nn
import numpy as np
import pytest
from test_recommend import run  # noqa: F401 (fixture)

from onerec_jax import update
from onerec_jax.errors import UserError
from onerec_jax.recommend import Recommender


def test_item_rows_follow_their_source_ids():
    old_ids = np.array([-1, 10, 20, 30, 40])
    new_ids = np.array([-1, 10, 15, 30, 40, 50])  # 20 gone (filtered), 15 and 50 new
    src, dst = update.item_row_map(old_ids, new_ids)
    assert src.tolist() == [0, 1, 3, 4] and dst.tolist() == [0, 1, 3, 4]
    old_ids = np.array([-1, 10, 20])
    new_ids = np.array([-1, 5, 10, 20])  # a new item before the others shifts their dense ids
    assert [x.tolist() for x in update.item_row_map(old_ids, new_ids)] == [[0, 1, 2], [0, 2, 3]]


def test_remap_params_by_hand():
    old_ids, new_ids = np.array([-1, 10, 20]), np.array([-1, 5, 10, 20])
    # an item table with a [MASK] row after the items (old: rows 0..2 items, 3 mask; new: 0..3,
    # 4 mask), a table with the vocabulary on axis 1, and a dense kernel
    old = {
        "table": np.arange(8.0).reshape(4, 2),
        "bias": np.array([[0.0, 1.0, 2.0]]),
        "kernel": np.full((2, 2), 7.0),
    }
    fresh = {"table": -np.ones((5, 2)), "bias": -np.ones((1, 4)), "kernel": np.zeros((2, 2))}
    boxed = {
        "table": nn.LogicallyPartitioned(fresh["table"], ("vocab", "embed")),
        "bias": nn.LogicallyPartitioned(fresh["bias"], (None, "vocab")),
        "kernel": nn.LogicallyPartitioned(fresh["kernel"], ("embed", "mlp")),
    }
    out = update.remap_params(old, fresh, boxed, old_ids, new_ids)
    np.testing.assert_array_equal(
        out["table"], [[0, 1], [-1, -1], [2, 3], [4, 5], [6, 7]]
    )  # new item 5 keeps its fresh row; 10, 20 move down one; the mask row follows
    np.testing.assert_array_equal(out["bias"], [[0, -1, 1, 2]])
    np.testing.assert_array_equal(out["kernel"], old["kernel"])
    with pytest.raises(UserError, match="without an item axis"):
        update.remap_params(
            {"k": np.zeros((2, 2))},
            {"k": np.zeros((3, 2))},
            {"k": nn.LogicallyPartitioned(np.zeros((3, 2)), ("embed", "mlp"))},
            old_ids,
            new_ids,
        )


def _new_data(folder, src):
    folder.mkdir()
    # movie 7 ("Never Rated (2002)") was never trained on: users 2 and 3 rate it now; a new user
    # 99 arrives with four movies
    rows = [(2, 7, 5.0, 2_000_000), (3, 7, 4.0, 2_000_001)]
    rows += [(99, m, 4.0, 2_000_100 + i) for i, m in enumerate([1, 2, 3, 7])]
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)
    )
    shutil.copy(src / "movies.csv", folder / "movies.csv")  # the newer catalogue (the same here)
    return folder


def test_update_continues_the_run_on_new_interactions(run, tmp_path):  # noqa: F811
    workdir, rec = run
    source = workdir.parent / "ml"
    before = (workdir / "results.json").read_text()
    new = _new_data(tmp_path / "new", source)
    out = tmp_path / "updated"
    results = update.update(workdir, new, out=out, steps=2)
    assert results["update"]["items_before"] == 28 and results["steps"] == 2
    assert json.loads((out / "results.json").read_text())["update"]["from"] == str(workdir)
    assert (workdir / "results.json").read_text() == before  # the trained run is untouched

    updated = Recommender.from_run(out)
    assert updated.data.n_items == 29 and updated.data.n_users == 31
    assert updated.catalogue.resolve("Never Rated") == 6  # dense id of movie 7 (ids ascending)
    rows = updated.recommend_for_user(99, k=3)
    assert len(rows) == 3 and not {r.movie_id for r in rows} & {1, 2, 3, 7}
    # two steps move a row a little: an old item's row is still its trained one, near enough,
    # and under its new dense id (movie 8 was dense 6, now 7)
    old_row = np.asarray(rec.model.item_table(rec.params))[6]
    new_table = np.asarray(updated.model.item_table(updated.params))
    assert np.abs(new_table[7] - old_row).max() < 0.05
    assert np.abs(new_table[7] - old_row).max() < np.abs(new_table[6] - old_row).max()

    with pytest.raises(UserError, match="already holds an updated run"):
        update.update(workdir, new, out=out, steps=1)
    with pytest.raises(UserError, match="must differ from --workdir"):
        update.update(workdir, new, out=workdir, steps=1)
    with pytest.raises(UserError, match="not a directory"):
        update.update(workdir, tmp_path / "none", out=tmp_path / "u2", steps=1)
