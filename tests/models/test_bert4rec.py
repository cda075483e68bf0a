"""BERT4Rec: cloze masking statistics, the cloze loss, the appended-[MASK] user state, a run."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError
from onerec_jax.evaluation import ranking
from onerec_jax.models import bert4rec
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.training import train

V, D, MAX_LEN = 13, 8, 8
MASK = V  # the [MASK] token id


def _model(**model):
    c = apply_variant(base_config(), "bert4rec")
    c.model.update(dim=D, num_layers=2, num_heads=2, mlp_dim=16, dropout=0.0, **model)
    return build_model(c, DataInfo(n_items=V - 1, max_len=MAX_LEN, item_counts=np.arange(V)))


def _batch():
    inputs = jnp.array([[0, 0, 0, 5, 7, 2, 9, 11], [0, 0, 0, 0, 0, 0, 3, 4]], jnp.int32)
    targets = jnp.array([[0, 0, 0, 7, 2, 9, 11, 6], [0, 0, 0, 0, 0, 0, 4, 12]], jnp.int32)
    return {"inputs": inputs, "targets": targets, "mask": targets > 0}


def _hidden(model, params, inputs):
    """model.apply at inference, jitted (eager Flax is slow on a busy CPU)."""
    return jax.jit(model.apply, static_argnames="train")(params, inputs, train=False)


@pytest.fixture(scope="module")
def model_and_params():
    model = _model()
    params = jax.jit(lambda rng: model.init(rng, _batch()))(jax.random.key(0))
    return model, nn.meta.unbox(params)


def test_full_sequence_appends_the_last_target():
    np.testing.assert_array_equal(
        bert4rec.full_sequence(_batch()),
        [[0, 0, 0, 5, 7, 2, 9, 11, 6], [0, 0, 0, 0, 0, 0, 3, 4, 12]],
    )


def _masks(rng, items, p, share):
    slots, valid = bert4rec.cloze_positions(rng, items, p, share)
    return np.asarray(slots), np.asarray(valid), np.asarray(bert4rec.slot_mask(slots, valid, 12))


def test_cloze_positions_statistics():
    lengths = np.array([1, 2, 3, 5, 9, 12] * 100)
    width, p, draws = 12, 0.2, 40
    items = jnp.asarray(np.where(np.arange(width) >= width - lengths[:, None], 7, 0), jnp.int32)
    real = np.asarray(items > 0)
    k = np.maximum(1, np.floor(p * lengths + 0.5))  # BERT: round(p * n), at least one
    assert list(k[:6]) == [1, 1, 1, 1, 2, 2]
    freq = np.zeros(items.shape)
    for i in range(draws):
        slots, valid, masked = _masks(jax.random.key(i), items, p, 0.0)
        assert slots.shape == (len(lengths), 2)  # K = round(0.2 * 12) slots per row
        assert not (masked & ~real).any()  # never padding
        np.testing.assert_array_equal(masked.sum(1), k)  # valid slots are distinct
        np.testing.assert_array_equal(valid.sum(1), k)
        freq += masked
    # Uniform over a row's real slots: each is hidden with frequency k / n.
    for n in (5, 9, 12):
        rows = lengths == n
        got = freq[rows][:, -n:].mean(0) / draws  # [n] per slot
        np.testing.assert_allclose(got, np.full(n, k[rows][0] / n), atol=0.06)
    # Long rows: about mask_prob of the real slots.
    long = lengths == 12
    assert freq[long].sum() / (draws * real[long].sum()) == pytest.approx(2 / 12)


def test_last_item_share_masks_only_the_last_item():
    items = jnp.asarray(np.tile([0, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3], (4000, 1)), jnp.int32)
    _, _, only_last = _masks(jax.random.key(0), items, 0.2, 1.0)
    assert only_last[:, -1].all() and not only_last[:, :-1].any()
    _, _, mixed = _masks(jax.random.key(1), items, 0.2, 0.25)
    # A row of 10 items hides round(2.0) = 2 of them, or only the last one in 25% of rows.
    assert mixed.sum(1).mean() == pytest.approx(0.25 * 1 + 0.75 * 2, abs=0.03)


def test_cloze_loss_matches_numpy_on_a_fixed_mask(model_and_params):
    model, params = model_and_params
    items = bert4rec.full_sequence(_batch())  # [2, 9]
    slots = jnp.array([[4, 6, 8], [7, 0, 0]], jnp.int32)
    valid = jnp.array([[True, True, True], [True, False, False]])
    cloze_loss = jax.jit(model.cloze_loss)
    loss, metrics = cloze_loss(params, items, slots, valid, jax.random.key(0))
    masked = np.zeros(items.shape, bool)
    masked[0, [4, 6, 8]] = True
    masked[1, 7] = True
    corrupted = np.where(masked, MASK, np.asarray(items))
    hidden = np.asarray(_hidden(model, params, jnp.asarray(corrupted)))
    table = np.asarray(params["item_embedding"]["embedding"])[:V]
    logits = hidden[masked] @ table.T  # [4, V]
    logits[:, 0] = -np.inf  # padding is never a candidate
    top = logits.max(1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    want = -log_probs[np.arange(4), np.asarray(items)[masked]].mean()  # targets 7, 9, 6, 4
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["tokens"]) == 4
    # The training loss is the cloze loss on drawn slots: with only last items masked, the
    # slots are fixed and the two agree.
    last_only = _model(last_item_share=1.0)
    loss_last, _ = jax.jit(last_only.loss)(params, _batch(), jax.random.key(5))
    want_last, _ = cloze_loss(
        params, items, jnp.array([[8], [8]]), jnp.array([[True], [True]]), jax.random.key(0)
    )
    np.testing.assert_allclose(loss_last, want_last, rtol=1e-6)


def test_user_state_is_the_hidden_at_an_appended_mask(model_and_params):
    model, params = model_and_params
    inputs = _batch()["inputs"]  # [2, 8], max_len wide: the whole history is kept
    state = jax.jit(model.user_state)(params, {"inputs": inputs})
    by_hand = jnp.array([[0, 0, 0, 5, 7, 2, 9, 11, MASK], [0, 0, 0, 0, 0, 0, 3, 4, MASK]])
    np.testing.assert_allclose(state, _hidden(model, params, by_hand)[:, -1], atol=1e-6)
    assert not np.allclose(state, _hidden(model, params, inputs)[:, -1])
    # Narrower left padding gives the same state (positions count from the end).
    narrow = jax.jit(model.user_state)(params, {"inputs": inputs[:, 3:]})
    np.testing.assert_allclose(narrow[0], state[0], atol=1e-5)


def test_attention_is_bidirectional(model_and_params):
    model, params = model_and_params
    inputs = _batch()["inputs"]
    hidden = _hidden(model, params, inputs)
    later_changed = _hidden(model, params, inputs.at[0, 7].set(1))
    assert not np.allclose(later_changed[0, 3], hidden[0, 3])  # an earlier slot sees it


def test_mask_row_follows_the_items_and_is_never_ranked(model_and_params):
    model, params = model_and_params
    table = model.item_table(params)
    assert table.shape == (V + 1, D)  # items, then [MASK] (and, split over a mesh, padding)
    # Make [MASK] the best match of every user: the ranking must still ignore it.
    states = jax.jit(model.user_state)(params, {"inputs": _batch()["inputs"]})
    emb = params["item_embedding"]["embedding"]
    boosted = {**params, "item_embedding": {"embedding": emb.at[MASK].set(100 * states[0])}}
    np.testing.assert_array_equal(model.item_table(boosted)[:V], table[:V])
    ranks, top, _ = ranking.rank_and_topk(
        states,
        model.item_table(boosted),
        jnp.array([3, 5]),
        jnp.zeros((2, 1), jnp.int32),
        k=V - 1,
        n_items=V - 1,
    )
    assert top.min() >= 1 and top.max() <= V - 1 and sorted(np.asarray(top[0])) == list(range(1, V))
    items, _ = jax.jit(model.topk, static_argnames="k")(
        boosted, {"inputs": _batch()["inputs"]}, jnp.zeros((2, 1), jnp.int32), k=V - 1
    )
    assert np.asarray(items).max() <= V - 1  # the model's own list never holds [MASK]


def test_variant_and_bad_config():
    c = apply_variant(base_config(), "bert4rec")
    assert (c.model.name, c.model.num_heads, c.model.mask_prob, c.loss.name) == (
        "bert4rec",
        2,
        0.2,
        "full_softmax",
    )
    with pytest.raises(ConfigError, match="mask_prob"):
        _model(mask_prob=0.0)


def test_end_to_end_writes_results(tmp_path, tmp_path_factory):
    c = apply_variant(base_config(), "bert4rec")
    c.data.synthetic = "demo"
    c.data.root = str(tmp_path_factory.getbasetemp() / "demo_data")  # shared by both models
    c.data.max_len = 20
    c.data.progress = False
    c.model.update(dim=16, num_layers=1, mlp_dim=32)
    c.train.update(
        batch_size=16,
        num_steps=8,
        eval_every_steps=4,
        log_every_steps=4,
        progress=False,
        patience=100,
    )
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=512, chunk_size=256)
    c.mesh.num_devices = 1
    jax.clear_caches()  # logical-axis rules are not part of jit's cache key (JAX_GUIDE.md)
    results = train.train_and_evaluate(c, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["model"] == "bert4rec"
    assert [h[0] for h in saved["history"]] == [4, 8]
    assert saved["test"]["n_users"] == 2000
    assert saved["test"]["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"])
    assert 0.0 <= saved["test"]["ndcg@10"] <= saved["test"]["hr@10"] <= 1.0
