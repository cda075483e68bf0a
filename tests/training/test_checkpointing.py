"""Tests for onerec_jax.training.checkpointing: real orbax on tmp_path, no mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onerec_jax.data.pipeline import train_dataset
from onerec_jax.data.sequences import SequenceData
from onerec_jax.training.checkpointing import Checkpointer, CheckpointError, abstract_like

TMP = ".orbax-checkpoint-tmp"


def make_data(sequences: list[list[int]]) -> SequenceData:
    lengths = [len(s) for s in sequences]
    n = sum(lengths)
    items = np.array([i for s in sequences for i in s], np.int32)
    return SequenceData(
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items,
        timestamps=np.arange(n, dtype=np.int64),
        ratings=np.ones(n, np.float32),
        user_ids=np.arange(100, 100 + len(sequences)),
        item_ids=np.arange(int(items.max()) + 1),
        options={},
    )


# 6 users, 5..10 interactions each, every interaction its own item: 11 windows (max_len 3).
DATA = make_data([list(range(1 + 10 * u, 6 + u + 10 * u)) for u in range(6)])


def train_iter():
    """A fresh training iterator: 2 batches of 4 per epoch, reshuffled every epoch, forever."""
    return iter(train_dataset(DATA, max_len=3, batch_size=4, seed=7))


def params_and_opt_state():
    """Small params and an adamw state after one update (so mu, nu and count are non-trivial)."""
    params = {
        "embed": jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 7,
        "block": {"w": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(3, 2)},
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def step_dirs(directory) -> list[str]:
    """Every entry of the checkpoint directory (step dirs and leftovers), sorted."""
    return sorted(os.listdir(directory))


def test_save_restore_roundtrip_resumes_iterator_exactly(tmp_path):
    params, opt_state = params_and_opt_state()
    it = train_iter()
    for _ in range(3):
        next(it)
    meta = {"best_ndcg": np.float32(0.25), "patience": 2, "wall_time_s": 12.5}
    ckpt = Checkpointer(tmp_path / "ckpt")  # async saves
    assert ckpt.save(
        3,
        params=params,
        opt_state=opt_state,
        data_iter=it,
        meta=meta,
        metrics={"val/ndcg@10": 0.25},
    )
    # The state is captured by save(): advancing right away (mid async write) changes nothing.
    expected = [next(it) for _ in range(6)]  # epochs 1 to 4: every epoch reshuffles
    ckpt.close()

    ckpt = Checkpointer(tmp_path / "ckpt")  # as a restarted process would
    assert ckpt.latest_step() == 3
    fresh = train_iter()
    first_of_fresh = next(train_iter())
    got_params, got_opt, got_meta = ckpt.restore(
        3,
        abstract_params=abstract_like(params),
        abstract_opt_state=abstract_like(opt_state),
        data_iter=fresh,
    )
    assert_trees_equal(got_params, params)
    assert_trees_equal(got_opt, opt_state)
    assert type(got_opt[0]) is type(opt_state[0])  # ScaleByAdamState, not a dict
    assert got_meta == {"best_ndcg": 0.25, "patience": 2, "wall_time_s": 12.5}
    resumed = [next(fresh) for _ in range(6)]
    assert_batches_equal(resumed, expected)
    # ... and a fresh iterator really starts elsewhere, so the check above has teeth.
    assert not np.array_equal(first_of_fresh["inputs"], expected[0]["inputs"])
    ckpt.close()


def test_optimizer_state_without_arrays_roundtrips(tmp_path):
    """optax.sgd's state has no arrays; orbax refuses empty items, so it is not written."""
    params, _ = params_and_opt_state()
    opt_state = optax.sgd(0.1).init(params)  # (EmptyState(), EmptyState())
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params=params, opt_state=opt_state, data_iter=train_iter(), meta={})
    got_params, got_opt, _ = ckpt.restore(
        1,
        abstract_params=abstract_like(params),
        abstract_opt_state=abstract_like(opt_state),
        data_iter=train_iter(),
    )
    assert_trees_equal(got_params, params)
    assert got_opt == opt_state
    ckpt.close()


def save_step(ckpt, step, metric=None, **kw):
    params, opt_state = params_and_opt_state()
    metrics = None if metric is None else {"val/ndcg@10": metric, "val/hr@10": 0.9}
    return ckpt.save(
        step,
        params=params,
        opt_state=opt_state,
        data_iter=train_iter(),
        meta={"step": step},
        metrics=metrics,
        **kw,
    )


def test_retention_keeps_latest_and_best(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory)
    on_disk = []
    for step, metric in [(10, 0.3), (20, 0.5), (30, 0.4), (40, None)]:
        assert save_step(ckpt, step, metric)
        ckpt.wait()
        on_disk.append(step_dirs(directory))
    assert on_disk == [["10"], ["20"], ["20", "30"], ["20", "40"]]
    assert (ckpt.latest_step(), ckpt.best_step(), ckpt.all_steps()) == (40, 20, [20, 40])
    # A later step with metrics retires the metric-less one: it was kept only as the latest.
    assert save_step(ckpt, 50, 0.1)
    ckpt.close()
    assert step_dirs(directory) == ["20", "50"]
    reopened = Checkpointer(directory)  # the ranking survives a restart (metrics are on disk)
    assert (reopened.latest_step(), reopened.best_step()) == (50, 20)
    reopened.close()


def test_best_step_is_none_without_metrics(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    assert (ckpt.latest_step(), ckpt.best_step()) == (None, None)
    save_step(ckpt, 5)
    assert (ckpt.latest_step(), ckpt.best_step()) == (5, None)
    save_step(ckpt, 6)
    assert ckpt.all_steps() == [6]
    with pytest.raises(ValueError, match="val/ndcg@10"):
        ckpt.save(7, params={}, opt_state={}, data_iter=train_iter(), meta={}, metrics={"x": 1})
    ckpt.close()


def test_nan_metric_ranks_last(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    save_step(ckpt, 1, 0.1)
    save_step(ckpt, 2, float("nan"))  # e.g. a diverged run
    save_step(ckpt, 3)
    assert (ckpt.all_steps(), ckpt.best_step()) == ([1, 3], 1)
    ckpt.close()


def test_save_interval_and_force(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", save_interval_steps=10, async_save=False)
    assert save_step(ckpt, 10, 0.1)
    assert not save_step(ckpt, 15, 0.9)  # off the interval
    assert save_step(ckpt, 15, force=True)  # e.g. at a crash
    assert not save_step(ckpt, 15, force=True)  # never overwrites a step on disk
    assert save_step(ckpt, 20, 0.2)  # latest and best: 10 and 15 go
    assert ckpt.all_steps() == [20]
    ckpt.close()


@pytest.mark.parametrize(
    ("wanted", "needle"),
    [
        ({"w": (3, 3), "b": (3,)}, r"w has shape \(2, 3\) in the checkpoint, \(3, 3\) here"),
        ({"w": (2, 3)}, "b is in the checkpoint but not in the model"),
        (
            {"w": (2, 3), "b": (3,), "extra": (1,)},
            "extra is in the model but not in the checkpoint",
        ),
    ],
)
def test_mismatched_model_raises_checkpoint_error(tmp_path, wanted, needle):
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, async_save=False)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    opt_state = optax.adam(1e-3).init(params)
    ckpt.save(1, params=params, opt_state=opt_state, data_iter=train_iter(), meta={})
    abstract = abstract_like({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in wanted.items()})
    with pytest.raises(CheckpointError, match=needle) as err:
        ckpt.restore_params(1, abstract)
    assert str(directory) in str(err.value) and "--workdir" in str(err.value)
    # restore() checks the optimizer state too (adam's mu/nu follow the params' structure).
    with pytest.raises(CheckpointError, match=f"params: {needle}"):
        ckpt.restore(
            1,
            abstract_params=abstract,
            abstract_opt_state=abstract_like(optax.adam(1e-3).init(abstract)),
            data_iter=train_iter(),
        )
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 2 .*\[1\]"):
        ckpt.restore_params(2, abstract_like(params))
    ckpt.close()


def test_restore_params_cuts_or_adds_the_padding_rows_of_item_and_user_tables(tmp_path):
    """Saved with vocab 7 padded to 8 rows and 10 users padded to 12 (a 4-way split): one
    device reads 7 and 10 rows, the real ones; an 8-way split reads 8 and 16 rows, zeros added.
    Without the checkpoint's sizes (or with other data) a difference stays an error."""
    items = np.arange(32, dtype=np.float32).reshape(8, 4)
    users = np.arange(48, dtype=np.float32).reshape(12, 4) + 100
    bias = np.arange(8, dtype=np.float32)
    params = {"items": jnp.asarray(items), "users": jnp.asarray(users), "bias": jnp.asarray(bias)}
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    meta = {"vocab_size": 7, "n_users": 10}
    ckpt.save(1, params=params, opt_state={}, data_iter=train_iter(), meta=meta)

    def abstract(n_items, n_users):
        shapes = {"items": (n_items, 4), "users": (n_users, 4), "bias": (n_items,)}
        return abstract_like({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})

    got = ckpt.restore_params(1, abstract(7, 10), vocab_size=7, n_users=10)
    np.testing.assert_array_equal(got["items"], items[:7])
    np.testing.assert_array_equal(got["users"], users[:10])
    np.testing.assert_array_equal(got["bias"], bias[:7])
    got = ckpt.restore_params(1, abstract(8, 16), vocab_size=7, n_users=10)
    np.testing.assert_array_equal(got["items"], items)
    np.testing.assert_array_equal(got["users"][:12], users)
    assert not np.asarray(got["users"][12:]).any()
    # other data (another user or item count): nothing is resized
    with pytest.raises(CheckpointError, match=r"users has shape \(12, 4\) in the checkpoint"):
        ckpt.restore_params(1, abstract(8, 10), vocab_size=7, n_users=11)
    with pytest.raises(CheckpointError, match=r"items has shape \(8, 4\) in the checkpoint"):
        ckpt.restore_params(1, abstract(7, 12), vocab_size=6, n_users=10)
    ckpt.close()


def test_unfinished_save_is_ignored_and_cleaned_up(tmp_path):
    """A crash mid-save leaves `<step>.orbax-checkpoint-tmp`: never listed, restored or kept."""
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory)
    save_step(ckpt, 10, 0.3)
    save_step(ckpt, 20, 0.2)
    ckpt.close()
    # Leftovers of two interrupted saves: a half-copied step 30 and an empty step 40.
    shutil.copytree(directory / "20", directory / f"30{TMP}")
    shutil.rmtree(directory / f"30{TMP}" / "params")
    (directory / f"40{TMP}-1712345678").mkdir()

    ckpt = Checkpointer(directory)
    assert (ckpt.all_steps(), ckpt.latest_step(), ckpt.best_step()) == ([10, 20], 20, 10)
    params, _ = params_and_opt_state()
    assert_trees_equal(ckpt.restore_params(ckpt.latest_step(), abstract_like(params)), params)
    assert save_step(ckpt, 30, 0.1)  # the next save first deletes the leftovers
    ckpt.wait()
    assert step_dirs(directory) == ["10", "30"]
    ckpt.close()


def test_step_directory_not_written_by_orbax_gives_clear_error(tmp_path):
    """On local disks orbax trusts a bare step name; restoring it must still fail clearly."""
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, async_save=False)
    save_step(ckpt, 10, 0.3)
    ckpt.close()
    (directory / "30").mkdir()
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 30
    params, _ = params_and_opt_state()
    with pytest.raises(CheckpointError, match=f"step 30 from {directory}: it holds no params"):
        ckpt.restore_params(30, abstract_like(params))
    ckpt.close()


CRASH_MID_SAVE = """
import os, sys
import jax.numpy as jnp
from onerec_jax.training.checkpointing import Checkpointer

class DiesWhileSaved:  # the process dies while orbax is writing step 20
    def get_state(self):
        os._exit(3)

params = {"w": jnp.arange(6.0)}
ckpt = Checkpointer(sys.argv[1])
ckpt.save(10, params=params, opt_state={}, data_iter=DATA_ITER, meta={"step": 10})
ckpt.wait()
ckpt.save(20, params=params, opt_state={}, data_iter=DiesWhileSaved(), meta={"step": 20})
"""


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = "import grain\nDATA_ITER = iter(grain.MapDataset.range(5).to_iter_dataset())\n"
    script += textwrap.dedent(CRASH_MID_SAVE)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(directory)], capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert step_dirs(directory) == ["10", f"20{TMP}"]

    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 10
    restored = ckpt.restore_params(10, abstract_like({"w": jnp.zeros(6)}))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))
    save_step(ckpt, 20, 0.5)
    ckpt.close()
    assert step_dirs(directory) == ["20"]


RESHARD = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from onerec_jax.training.checkpointing import Checkpointer, abstract_like

assert jax.device_count() == 8
mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
shardings = {"table": NamedSharding(mesh, P("data", "model")), "bias": NamedSharding(mesh, P())}
shapes = {"table": jax.ShapeDtypeStruct((16, 6), np.float32),
          "bias": jax.ShapeDtypeStruct((6,), np.float32)}
ckpt = Checkpointer(sys.argv[1])
params = ckpt.restore_params(int(sys.argv[2]), abstract_like(shapes, shardings))
print(json.dumps({
    name: {
        "values": np.asarray(x).tolist(),
        "spec": list(x.sharding.spec),
        "same_sharding": x.sharding == shardings[name],
        "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "n_devices": len(x.sharding.device_set),
    }
    for name, x in params.items()
}))
ckpt.close()
"""


def test_restore_params_onto_another_mesh(tmp_path):
    """Saved unsharded by this process; restored in an 8-device process onto a (4, 2) mesh."""
    params = {
        "table": jnp.arange(96, dtype=jnp.float32).reshape(16, 6),
        "bias": jnp.arange(6, dtype=jnp.float32) - 2.5,
    }
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(7, params=params, opt_state={}, data_iter=train_iter(), meta={})
    ckpt.close()

    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RESHARD, str(tmp_path / "ckpt"), "7"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(got["table"]["values"], np.arange(96).reshape(16, 6))
    np.testing.assert_array_equal(got["bias"]["values"], np.arange(6) - 2.5)
    assert (got["table"]["spec"], got["bias"]["spec"]) == (["data", "model"], [])
    assert got["table"]["shard_shapes"] == [[4, 3]]  # 16 rows / 4, 6 columns / 2
    assert got["bias"]["shard_shapes"] == [[6]]  # replicated
    assert all(got[k]["same_sharding"] and got[k]["n_devices"] == 8 for k in got)


def test_abstract_like_from_eval_shape_and_sharding_tree():
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: {"a": jnp.zeros((2, 3), jnp.bfloat16), "b": jnp.zeros(4)})
    one = abstract_like(shapes, device)
    tree = abstract_like(shapes, {"a": device, "b": device})
    for out in (one, tree):
        assert out["a"] == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=device)
        assert out["b"].shape == (4,) and out["b"].sharding == device
    concrete = abstract_like({"x": jnp.ones(3, jnp.int32)})
    assert concrete["x"].dtype == jnp.int32 and concrete["x"].sharding is not None
