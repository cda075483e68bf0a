"""Adding a model is one file: a toy scoring model defined and registered here, through the public
registry only, trains, validates, checkpoints, evaluates and recommends like the built-in ones."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onerec_jax import modes, runs
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError
from onerec_jax.evaluation.evaluator import FullRanking, TopKList, make_evaluator
from onerec_jax.models import registry
from onerec_jax.models.base import DataInfo, ScoringModel
from onerec_jax.recommend import Recommender
from onerec_jax.training import train


class LastItemPopularity(nn.Module):
    """score(user, i) = e_last . f_i + b_i: the user's last item and a learned popularity bias."""

    vocab_size: int
    dim: int

    def setup(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("vocab", "embed"))
        self.last = self.param("last", init, (self.vocab_size, self.dim))  # [V, D] input side
        self.out = self.param("out", init, (self.vocab_size, self.dim))  # [V, D] output side
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",))
        self.bias = self.param("bias", zeros, (self.vocab_size,))  # [V]

    def __call__(self, inputs, *, train: bool):
        """inputs [B, L] -> [B, L, D + 1]: each slot's item row and a 1 for the bias."""
        del train
        rows = self.last[inputs]
        return jnp.concatenate([rows, jnp.ones((*rows.shape[:-1], 1), rows.dtype)], axis=-1)

    def last_state(self, inputs):  # [B, D + 1]: the user state (the last slot's)
        return self(inputs, train=False)[:, -1]

    def item_table(self):
        return jnp.concatenate([self.out, self.bias[:, None]], axis=-1)  # [V, D + 1]


def build(config: ml_collections.ConfigDict, info: DataInfo) -> ScoringModel:
    module = LastItemPopularity(vocab_size=info.vocab_size, dim=config.model.dim)
    return ScoringModel(module, config, info)  # the shared next-item loss and ranker


def config_defaults(c: ml_collections.ConfigDict) -> None:
    c.model.dim = 8


registry.register(
    registry.ModelSpec(
        name="toy_last_item", build=build, variants={"toy_last_item": config_defaults}
    )
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = apply_variant(base_config(), "toy_last_item")
    root = tmp_path_factory.getbasetemp() / "demo_data"  # shared with tests/models/test_generative
    c.data.update(synthetic="demo", root=str(root), max_len=20, progress=False)
    c.train.update(batch_size=16, num_steps=8, eval_every_steps=4, log_every_steps=1)
    c.train.update(progress=False, patience=100)
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=512, chunk_size=256)
    c.mesh.num_devices = 1
    workdir = tmp_path_factory.mktemp("toy") / "run"
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    results = train.train_and_evaluate(c, workdir)
    return c, workdir, results


def test_toy_model_trains_checkpoints_and_evaluates(run):
    config, workdir, results = run
    assert results["model"] == "toy_last_item" and results["protocol"]["ranking"] == "full"
    n_items = results["data"]["items"]
    assert results["params"] == (n_items + 1) * (2 * 8 + 1)  # last, out [V, 8] and bias [V]
    assert [h[0] for h in results["history"]] == [4, 8] and results["best_step"] in (4, 8)
    assert (workdir / "checkpoints" / str(results["best_step"])).is_dir()
    losses = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in losses if "train/loss" in row]
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    assert results["test"]["n_users"] == 2000 and 0 < results["test"]["ndcg@10"] <= 1
    # --mode eval restores the best checkpoint and reproduces the test metrics exactly.
    again = modes.evaluate(config, workdir)
    assert again["best_step"] == results["best_step"]
    for key in ("hr@10", "ndcg@10", "mrr"):
        assert again["test"][key] == results["test"][key]


def test_toy_model_recommends_from_its_run(run):
    _, workdir, _ = run
    rec = Recommender.from_run(workdir)
    assert not rec.needs_user_ids() and rec.config.model.name == "toy_last_item"
    params = jax.device_get(rec.params)
    last, out, bias = (np.asarray(params[k], np.float64) for k in ("last", "out", "bias"))
    watched = [5, 17, 3]  # dense ids, oldest first
    rows = rec.recommend_for_items([str(rec.data.item_ids[i]) for i in watched], k=5)
    scores = out @ last[watched[-1]] + bias  # [V]: the last item's row against every item
    scores[[0, *watched]] = -np.inf
    want = np.argsort(-scores, kind="stable")[:5]
    assert [rec.catalogue.resolve(str(r.movie_id)) for r in rows] == want.tolist()
    np.testing.assert_allclose([r.score for r in rows], scores[want], rtol=1e-5, atol=1e-6)


def test_topk_list_evaluator_agrees_with_full_ranking(run):
    """eval.evaluator="topk_list" ranks a scoring model's targets within its own `topk` list (as
    generative models are ranked): inside the top eval.k the rank is the full ranking's; outside
    it is n_items + 1, so HR/NDCG@K agree for K <= eval.k and MRR can only fall."""
    _, workdir, _ = run
    trained = runs.load_run(workdir)
    full = make_evaluator(trained.model, trained.data, trained.config, trained.mesh, trained.rules)
    config = trained.config.copy_and_resolve_references()
    config.eval.evaluator = "topk_list"
    listed = make_evaluator(trained.model, trained.data, config, trained.mesh, trained.rules)
    assert isinstance(full, FullRanking) and isinstance(listed, TopKList)
    assert (full.protocol, listed.protocol) == ("full", "top-50 list")
    m_full, u_full = full.evaluate(trained.params, "test")
    m_list, u_list = listed.evaluate(trained.params, "test")
    np.testing.assert_array_equal(u_list["users"], u_full["users"])
    np.testing.assert_array_equal(u_list["top_items"], u_full["top_items"])
    inside = u_full["ranks"] <= config.eval.k
    assert 0 < inside.sum() < len(inside)
    np.testing.assert_array_equal(u_list["ranks"][inside], u_full["ranks"][inside])
    assert np.all(u_list["ranks"][~inside] == trained.data.n_items + 1)
    for key in ("hr@10", "ndcg@10", "hr@50", "ndcg@50"):
        assert m_list[key] == m_full[key]
    assert m_list["mrr"] < m_full["mrr"]
    config.eval.evaluator = "nope"
    with pytest.raises(ConfigError, match="eval.evaluator='nope'"):
        make_evaluator(trained.model, trained.data, config, trained.mesh, trained.rules)
