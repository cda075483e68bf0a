"""TIGER and the OneRec semantic-id decoder: loss by hand, a planted rule learned, end to end."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from onerec_jax import modes
from onerec_jax.data.pipeline import generative_train_dataset
from onerec_jax.data.training_examples import prefix_inputs
from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.errors import ConfigError
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model
from onerec_jax.models.seq2seq import level_columns
from onerec_jax.parallel import sharding
from onerec_jax.recommend import Recommender, recommendations_text
from onerec_jax.tokenize.semantic_ids import random_codes
from tests.data.test_pipeline import make_data

N_ITEMS, CYCLE_LEN = 20, 14


def planted(seed: int = 0, n_users: int = 96):
    """Each user walks the cycle 1 -> 2 -> ... -> 20 -> 1 from a random start (the planted rule:
    next = last % 20 + 1), so the test target is never in the user's history."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, N_ITEMS, n_users)
    seqs = [[(s + t) % N_ITEMS + 1 for t in range(CYCLE_LEN)] for s in starts]
    return make_data(seqs)


def tiny(variant: str, **model):
    c = apply_variant(base_config(), variant)
    c.data.max_len = 5
    c.model.update(
        dim=32,
        num_heads=2,
        num_layers=1,
        decoder_layers=1,
        mlp_dim=64,
        dropout=0.0,
        side_features=(),
        **model,
    )
    c.eval.update(beam=8, k=10)
    return c


def info_for(data, sem, max_len) -> DataInfo:
    return DataInfo(
        n_items=data.n_items,
        max_len=max_len,
        item_counts=np.ones(data.n_items + 1),
        n_users=data.n_users,
        semantic_ids=sem,
    )


def unboxed(params):
    return jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        params,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )


@pytest.mark.parametrize(
    "per_target,valid_only,slots", [(False, True, 0), (True, False, 0), (False, True, 2)]
)
def test_loss_is_the_level_restricted_cross_entropy(per_target, valid_only, slots):
    """`slots` (model.decoder_slots): the decoder trains on the last 2 of the 5 positions only;
    the reference is the decoder run over every position, its earlier positions left out."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny("tiger", session_items=2, encoder_causal=not per_target, decoder_slots=slots)
    c.loss.update(label_smoothing=0.1, valid_codes_only=valid_only)
    model = build_model(c, info_for(data, sem, 5))
    ds = generative_train_dataset(
        data, sem.codes, max_len=5, batch_size=8, seed=0, session_items=2, per_target=per_target
    )
    batch = next(iter(ds))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    params = unboxed(model.init(jax.random.key(0), batch))
    loss, metrics = model.loss(params, batch, jax.random.key(1))

    # numpy reference: decoder input = BOS + targets' code tokens shifted; per position, the
    # softmax over its level's codes only; smoothing uniform over those codes; masked targets out.
    sizes, depth = sem.codebook_sizes, len(sem.codebook_sizes)
    offsets = np.cumsum((0, *sizes[:-1]))
    codes, mask = np.asarray(batch["target_codes"]), np.asarray(batch["mask"])
    b_, p_ = codes.shape[:2]
    cols = (codes + offsets).reshape(b_, p_, -1)
    real = np.repeat(mask, depth, axis=-1)
    dec = np.concatenate([np.ones((b_, p_, 1), int), np.where(real, cols + 2, 0)[..., :-1]], -1)
    logits, _ = model.module.apply(
        {"params": params}, batch["inputs"], batch["user"], jnp.asarray(dec), train=False
    )
    logits = np.asarray(logits, np.float64)
    allowed = level_columns(sizes, dec.shape[-1])
    total, count = 0.0, 0
    first = p_ - slots if slots else 0  # the decoder's first training position
    for b in range(b_):
        for p in range(first, p_):
            for q in range(dec.shape[-1]):
                if not real[b, p, q]:
                    continue
                level = q % depth
                cols_q = np.flatnonzero(allowed[q])
                if valid_only:  # the codes that continue this target's prefix to some item
                    item_codes = codes[b, p, q // depth]
                    same = (sem.codes[1:, :level] == item_codes[:level]).all(1)
                    cols_q = np.unique(sem.codes[1:][same, level]) + offsets[level]
                z = logits[b, p, q][cols_q]
                logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
                target = list(cols_q).index(cols[b, p, q])
                total += 0.9 * -logp[target] + 0.1 * -logp.mean()
                count += 1
    assert count == depth * mask[:, first:].sum() and count > 0
    assert float(metrics["tokens"]) == mask[:, first:].sum()
    assert float(metrics["xent"]) == pytest.approx(total / count, rel=1e-5)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)  # dense decoder: no MoE term


@pytest.mark.parametrize(
    ("variant", "positions"),
    [("tiger", "learned"), ("onerec_sid", "learned"), ("onerec_sid", "rotary")],
)
def test_causal_slots_never_read_later_items(variant, positions):
    """Window training: slot p's target is the input at p + 1, so slot p must not see it."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny(variant, user_tokens=7, num_experts=0, encoder_positions=positions)
    model = build_model(c, info_for(data, sem, 6))
    inputs = jnp.array([[0, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]], jnp.int32)
    user = jnp.array([0, 1], jnp.int32)
    tokens = jnp.ones((2, 6, 3), jnp.int32)  # BOS + two codes at every slot
    params = unboxed(
        model.module.init(jax.random.key(0), inputs, user, tokens, train=False)["params"]
    )
    run = lambda x: np.asarray(  # noqa: E731
        model.module.apply({"params": params}, x, user, tokens, train=False)[0]
    )
    base = run(inputs)
    for j in range(2, 6):  # change the item at slot j: slots < j are unchanged, slot j is not
        changed = run(inputs.at[:, j].set(inputs[:, j] % N_ITEMS + 9))
        real = np.asarray(inputs[:, :j] > 0)  # padding slots have no target (and no keys)
        np.testing.assert_allclose(changed[:, :j][real], base[:, :j][real], atol=1e-5)
        assert np.abs(changed[:, j] - base[:, j]).max() > 1e-4


def fit_planted(variant: str, steps: int, **model) -> float:
    """Trains a tiny model on the planted cycle; HR@1 of generated test items."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 1)
    c = tiny(variant, **model)
    model_ = build_model(c, info_for(data, sem, 5))
    ds = iter(
        generative_train_dataset(
            data, sem.codes, max_len=5, batch_size=64, seed=0, session_items=c.model.session_items
        )
    )
    first = {k: jnp.asarray(v) for k, v in next(ds).items()}
    params = unboxed(model_.init(jax.random.key(0), first))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(model_.loss, has_aux=True)(params, batch, rng)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, metrics

    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in next(ds).items()}
        params, opt, metrics = step(params, opt, batch, jax.random.key(i))
    # test: history = the user's items before the test target (the last one)
    hist = np.stack([data.sequence(u)[:-1] for u in range(data.n_users)])
    if model_.session_items > 1:  # session-wise: the next M items of the cycle, one by one
        session, _ = jax.jit(model_.generate_session)(
            params,
            {"inputs": jnp.asarray(hist[:, -5:]), "user": jnp.zeros(len(hist), int)},
            jnp.asarray(hist),
        )
        want = (hist[:, -1:] + np.arange(model_.session_items)) % N_ITEMS + 1
        metrics = {**metrics, "session_accuracy": float((np.asarray(session) == want).mean())}
    inputs = jnp.asarray(hist[:, -5:], jnp.int32)
    user = jnp.arange(data.n_users, dtype=jnp.int32)
    items, scores = jax.jit(model_.generate)(
        params, {"inputs": inputs, "user": user}, jnp.asarray(hist, jnp.int32)
    )
    items = np.asarray(items)
    target = np.array([data.sequence(u)[-1] for u in range(data.n_users)])
    assert not (items[:, :, None] == hist[:, None, :]).any()  # nothing the user has seen
    return float((items[:, 0] == target).mean()), metrics


def test_tiny_tiger_learns_the_planted_rule_and_generates_sessions():
    hr1, metrics = fit_planted("tiger", 150, session_items=3)
    assert hr1 >= 0.95
    assert metrics["session_accuracy"] >= 0.9  # items 2 and 3 come from the decoder's prefix


def test_tiny_onerec_decoder_learns_the_planted_rule_and_logs_experts():
    hr1, metrics = fit_planted("onerec_sid", 120, num_experts=4, experts_per_token=2)
    assert hr1 >= 0.95
    shares = [float(metrics[f"moe/expert_{e}_share"]) for e in range(4)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert 0 <= float(metrics["moe/dropped_share"]) < 1


# The OneRec decoder only: TIGER shares every step of this path (GenerativeModel, the evaluator's
# beam branch, the report) and learns its planted rule above (suite time).
@pytest.mark.parametrize("variant", ["onerec_sid"])
def test_end_to_end_tokenizes_trains_and_reports_beam_ranking(variant, tmp_path, tmp_path_factory):
    c = apply_variant(base_config(), variant)
    c.data.synthetic = "demo"
    c.data.root = str(tmp_path_factory.getbasetemp() / "demo_data")
    c.data.max_len = 8
    c.data.progress = False
    c.model.update(dim=16, mlp_dim=32, num_layers=1, decoder_layers=1)
    c.tokenize.update(method="rqkmeans", codebook_size=8, kmeans_iters=5)
    c.features.blocks = ("genres", "year")
    c.train.update(
        batch_size=64,
        num_steps=6,
        eval_every_steps=3,
        log_every_steps=3,
        progress=False,
        patience=100,
    )
    c.optim.warmup_steps = 2
    c.eval.update(batch_size=2048, beam=5, k=10, valid_users=300)  # one batch: few compilations
    # validation during training by the dense head's full ranking; the kept checkpoint is then
    # validated and tested by the beam
    c.eval.select_evaluator = "full_ranking"
    c.mesh.num_devices = 1
    jax.clear_caches()
    results = modes.train(c, tmp_path / "run")  # tokenizes first: model.semantic_ids is empty
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["semantic_ids"] == str(tmp_path / "run" / "semantic_ids")
    assert (tmp_path / "run" / "semantic_ids" / "semantic_ids.npz").is_file()
    assert results["protocol"]["ranking"] == "beam search, width 5"
    assert results["protocol"]["selected_by"] == "full"
    assert results["val"]["n_users"] == 300 and results["test"]["n_users"] == 2000
    assert 0.0 <= results["test"]["ndcg@10"] <= results["test"]["hr@10"] <= 1.0
    best = max(results["history"], key=lambda h: h[2])  # (step, seconds, val NDCG@10, CPU-s)
    assert results["select_val"]["ndcg@10"] == best[2]
    assert "lists_short" in results["val"] and "lists_short" not in results["select_val"]
    # the test numbers are the beam's on the kept checkpoint: --mode eval recomputes them
    again = modes.evaluate(c, tmp_path / "run")
    assert again["best_step"] == results["best_step"]
    assert again["test"]["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"], abs=1e-6)

    # --mode recommend from the same run: valid unseen items, best first, the model's top list
    rec = Recommender.from_run(tmp_path / "run")
    user = rec.data.user_ids[3]
    rows = rec.recommend_for_user(user, k=7)
    _, history = rec.user_history(user)
    items = [rec.catalogue.resolve(str(r.movie_id)) for r in rows]
    assert len(rows) == 7 and len(set(items)) == 7 and not set(items) & set(history.tolist())
    scores = [r.score for r in rows]
    assert scores == sorted(scores, reverse=True) and max(scores) <= 0.0  # log-probabilities
    new = rec.recommend_for_items([str(rec.data.item_ids[i]) for i in history[:5]], k=3)
    assert len(new) == 3

    # --explain: the watched movies sharing the longest semantic-id prefix, checked by hand
    codes = rec.model.info.semantic_ids.codes[:, :-1]  # content codes, collision token dropped
    for row, why in zip(rows, rec.explain(history, rows, top=2), strict=True):
        item = rec.catalogue.dense_id(row.movie_id)
        shared = {
            h: next((n for n in range(codes.shape[1]) if codes[h, n] != codes[item, n]), 3)
            for h in history.tolist()
        }
        best = sorted((n for n in shared.values() if n), reverse=True)[:2]
        assert [int(r.weight) for r in why] == best
        assert all(shared[r.item] == r.weight for r in why)
    text = recommendations_text(tmp_path / "run", user=str(user), k=7, explain=True)
    assert "semantic-id prefix" in text
    for row, why in zip(rows, rec.explain(history, rows, top=3), strict=True):
        line = next(t for t in text.splitlines() if t.startswith(f"{row.rank:>4}  ") and ": " in t)
        if why:  # "because you watched A; B (the same first n codes: N movies: Drama 40%, ...)"
            assert f"the same first {int(why[0].weight)} code" in line and " movies: " in line
            assert all(rec.catalogue.label(r.item) in line for r in why)
        else:
            assert line.endswith("no watched movie shares its first code")


def test_dense_head_loss_and_rerank_by_hand():
    """loss.dense_weight adds w x the next-item softmax cross-entropy of the slot states against
    the items as the encoder reads them; eval.rerank_weight re-orders the beam's items by code
    log-probability + weight x that head's log-probability."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny("onerec_sid_dense", num_experts=0)
    c.loss.dense_weight, c.eval.rerank_weight = 0.5, 2.0
    model = build_model(c, info_for(data, sem, 5))
    ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
    params = unboxed(model.init(jax.random.key(0), batch))
    loss, metrics = model.loss(params, batch, jax.random.key(1))
    variables = {"params": params}
    _, _, states = model.module.apply(
        variables, batch["inputs"], batch["user"], _bos(batch), train=False, with_states=True
    )
    table = np.asarray(model.module.apply(variables, method=model.module.item_vectors), float)
    # the table by hand: each item's code embeddings summed plus its id embedding
    emb = np.asarray(params["token_embedding"]["embedding"], float)
    offsets = np.cumsum((0, *sem.codebook_sizes[:-1]))
    ids = np.asarray(params["id_embedding"]["embedding"], float)
    for item in (1, 7, N_ITEMS):
        want = emb[sem.codes[item] + offsets + 2].sum(0) + ids[item]
        np.testing.assert_allclose(table[item], want, rtol=1e-5, atol=1e-6)
    assert not table[0].any()
    h = np.asarray(states, float).reshape(-1, table.shape[1])
    targets = np.asarray(batch["targets"])[..., 0].reshape(-1)
    real = np.asarray(batch["mask"])[..., 0].reshape(-1)
    logits = h @ table.T
    logits[:, 0] = -np.inf
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    xent = (logz - logits[np.arange(len(h)), targets])[real].mean()
    assert float(metrics["dense_xent"]) == pytest.approx(xent, rel=1e-5)
    assert float(loss) == pytest.approx(float(metrics["xent"]) + 0.5 * xent, rel=1e-5)
    model.decoder_weight = 0.25  # loss.decoder_weight scales the code cross-entropy alone
    weighted, _ = model.loss(params, batch, jax.random.key(1))
    assert float(weighted) == pytest.approx(0.25 * float(metrics["xent"]) + 0.5 * xent, rel=1e-5)
    model.decoder_weight = 1.0
    # model.decoder_slots narrows the decoder's positions, never the dense head's
    model.decoder_slots = 2
    _, narrow = model.loss(params, batch, jax.random.key(1))
    assert float(narrow["dense_xent"]) == pytest.approx(xent, rel=1e-5)
    assert float(narrow["tokens"]) < float(metrics["tokens"])
    model.decoder_slots = 0

    hist = jnp.zeros((batch["inputs"].shape[0], 1), jnp.int32)
    items, scores = jax.jit(model.generate)(params, batch, hist)
    model.rerank_weight = 0.0
    raw_items, raw_scores = jax.jit(model.generate)(params, batch, hist)
    last = np.asarray(_last_state(model, params, batch), float)  # [B, D]
    dense = last @ table.T
    dense[:, 0] = -np.inf
    dense = (
        dense - (np.log(np.exp(dense - dense.max(1, keepdims=True)).sum(1)) + dense.max(1))[:, None]
    )
    for b in range(len(last)):
        ri, rs = np.asarray(raw_items[b]), np.asarray(raw_scores[b], float)
        combined = rs + 2.0 * dense[b, ri]
        order = np.argsort(-combined, kind="stable")
        np.testing.assert_array_equal(np.asarray(items[b]), ri[order])
        np.testing.assert_allclose(np.asarray(scores[b]), combined[order], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(np.asarray(items), np.asarray(raw_items))  # the order did change
    # A beam wider than the list: the search's best 16 items are re-ranked, the first 5 kept.
    generate = jax.jit(model.generate, static_argnames=("k", "beam"))
    wide_items, wide_scores = generate(params, batch, hist, k=16, beam=16)  # weight 0 here
    model.rerank_weight = 2.0  # another k: a new trace, which reads the weight
    top, top_scores = generate(params, batch, hist, k=5, beam=16)
    assert top.shape == (len(last), 5)
    for b in range(len(last)):
        wi, ws = np.asarray(wide_items[b]), np.asarray(wide_scores[b], float)
        assert (wi > 0).all()
        combined = ws + 2.0 * dense[b, wi]
        order = np.argsort(-combined, kind="stable")[:5]
        np.testing.assert_array_equal(np.asarray(top[b]), wi[order])
        np.testing.assert_allclose(np.asarray(top_scores[b]), combined[order], rtol=1e-5, atol=1e-5)


def test_item_table_options_by_hand():
    """model.table_side_features puts each item's genre and year embeddings in the dense head's
    table, as in the encoder's inputs; model.separate_item_codes gives the encoder and that table
    code embeddings of their own, which the decoder's input tokens never change; with
    model.encoder_positions="rotary" the encoder has no learned position table."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny(
        "onerec_sid",
        num_experts=0,
        separate_item_codes=True,
        table_side_features=True,
        encoder_positions="rotary",
    )
    genres = (np.arange((N_ITEMS + 1) * 3).reshape(-1, 3) % 4 == 0).astype(np.float32)
    years = np.arange(N_ITEMS + 1, dtype=np.int32) % 3
    info = dataclasses.replace(info_for(data, sem, 5), item_genres=genres, item_year_bucket=years)
    c.model.side_features = ("genres", "year")
    model = build_model(c, info)
    ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
    params = unboxed(model.init(jax.random.key(0), batch))
    assert "encoder_positions" not in params
    table = np.asarray(model.item_table(params), float)
    emb = np.asarray(params["item_code_embedding"]["embedding"], float)
    ids = np.asarray(params["id_embedding"]["embedding"], float)
    genre_emb, year_emb = (
        np.asarray(params[k], float) for k in ("genre_embedding", "year_embedding")
    )
    offsets = np.cumsum((0, *sem.codebook_sizes[:-1]))
    for item in range(1, N_ITEMS + 1):
        g = genres[item] / max(genres[item].sum(), 1.0)
        want = emb[sem.codes[item] + offsets + 2].sum(0) + ids[item] + g @ genre_emb
        want = want + year_emb[years[item]]
        np.testing.assert_allclose(table[item], want, rtol=1e-5, atol=1e-5)
    assert not table[0].any()

    # The decoder's token table moves neither the encoder nor the item table.
    def moved(params):  # every decoder input token's embedding shifted
        tokens = params["token_embedding"]["embedding"]
        return {**params, "token_embedding": {"embedding": tokens + 1.0}}

    base = np.asarray(_last_state(model, params, batch))
    np.testing.assert_allclose(np.asarray(_last_state(model, moved(params), batch)), base, 1e-6)
    np.testing.assert_allclose(np.asarray(model.item_table(moved(params))), table, 1e-6)
    # ... while with one table for both (the default) the same shift moves the encoder.
    c.model.separate_item_codes = False
    shared = build_model(c, info)
    params = unboxed(shared.init(jax.random.key(0), batch))
    change = _last_state(shared, moved(params), batch) - _last_state(shared, params, batch)
    assert np.abs(np.asarray(change)).max() > 1e-3


def test_tied_code_head_by_hand():
    """model.tie_code_head: the decoder's logits are its normalised state . the code's input-
    token embedding + a bias per code (no head of its own), in training (`decode`), per level
    (`level_logits`) and in the beam's incremental steps (`decode_step`); the loss's gradient
    reaches the token table through the output side."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny("onerec_sid_nodense", num_experts=0)
    c.model.tie_code_head = True
    model = build_model(c, info_for(data, sem, 5))
    ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
    params = unboxed(model.init(jax.random.key(0), batch))
    assert "head" not in params
    params["head_bias"] = jnp.arange(params["head_bias"].shape[0], dtype=jnp.float32) / 10
    module = model.module
    tokens, _ = model._decoder_io(batch["target_codes"], batch["mask"])
    logits, _ = module.apply(
        {"params": params}, batch["inputs"], batch["user"], tokens, train=False
    )
    hidden, _ = module.apply(
        {"params": params}, batch["inputs"], batch["user"], tokens, train=False, hidden=True
    )
    n_codes = sum(sem.codebook_sizes)
    table = np.asarray(params["token_embedding"]["embedding"], np.float64)[2 : 2 + n_codes]
    want = np.asarray(hidden, np.float64) @ table.T + np.arange(n_codes) / 10
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
    lo = sem.codebook_sizes[0]
    level1 = module.apply({"params": params}, hidden, 1, method=module.level_logits)
    np.testing.assert_allclose(
        np.asarray(level1), want[..., lo : lo + sem.codebook_sizes[1]], rtol=1e-4, atol=1e-4
    )
    grads = jax.grad(lambda p: model.loss(p, batch, jax.random.key(1))[0])(params)
    assert np.abs(np.asarray(grads["head_bias"])).max() > 0
    # Untied (the default): a head of its own.
    c.model.tie_code_head = False
    untied = build_model(c, info_for(data, sem, 5))
    assert "head" in unboxed(untied.init(jax.random.key(0), batch))


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_decoder_encoder_grad_scales_what_the_decoder_teaches_the_encoder(share):
    """loss.decoder_encoder_grad: the decoder's loss is unchanged, and its gradient reaches the
    encoder's parameters times the share (0: none); the decoder's own gradient is unchanged."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    grads, losses = {}, {}
    for value in (1.0, share):
        c = tiny("onerec_sid_nodense", num_experts=0, separate_item_codes=True)
        c.loss.decoder_encoder_grad = value
        model = build_model(c, info_for(data, sem, 5))
        ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
        batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
        params = unboxed(model.init(jax.random.key(0), batch))
        losses[value], grads[value] = jax.value_and_grad(
            lambda p, m=model, b=batch: m.loss(p, b, jax.random.key(1))[0]
        )(params)
    assert float(losses[share]) == pytest.approx(float(losses[1.0]), rel=1e-6)
    for name in ("encoder_0", "id_embedding", "item_code_embedding", "encoder_norm"):
        for full, scaled in zip(
            jax.tree.leaves(grads[1.0][name]), jax.tree.leaves(grads[share][name]), strict=True
        ):
            assert np.abs(np.asarray(full)).max() > 0
            np.testing.assert_allclose(np.asarray(scaled), share * np.asarray(full), atol=1e-7)
    for name in ("decoder_0", "token_embedding", "head"):
        for full, scaled in zip(
            jax.tree.leaves(grads[1.0][name]), jax.tree.leaves(grads[share][name]), strict=True
        ):
            np.testing.assert_allclose(np.asarray(scaled), np.asarray(full), rtol=1e-5, atol=1e-7)


def test_dense_candidates_join_the_beam_by_hand():
    """eval.dense_candidates: the dense head's best unseen items that the beam missed join its
    candidates, each scored by its codes' log-probability exactly as the beam scores a path (an
    exhaustive beam is the reference), then all are re-ranked by code + weight x dense."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny("onerec_sid_dense", num_experts=0)
    c.eval.update(beam=2, k=6, rerank_weight=2.0, dense_candidates=4)
    model = build_model(c, info_for(data, sem, 5))
    ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
    params = unboxed(model.init(jax.random.key(3), batch))
    inputs = {"inputs": batch["inputs"], "user": batch["user"]}
    hist = jnp.asarray(np.stack([data.sequence(u)[:4] for u in range(8)]), jnp.int32)
    items, scores = jax.jit(model.generate)(params, inputs, hist)

    generate = jax.jit(model.generate, static_argnames=("k", "beam"))
    model.rerank_weight, model.dense_candidates = 0.0, 0
    every, every_scores = generate(params, inputs, hist, k=N_ITEMS, beam=N_ITEMS)  # exhaustive
    narrow, _ = generate(params, inputs, hist, k=6, beam=2)  # the beam's own 6 candidates
    variables, context = model._encoded(params, inputs)
    direct = model.code_log_probs(variables, context, every)  # teacher-forced, same items
    live = np.asarray(every) > 0
    np.testing.assert_allclose(
        np.asarray(direct)[live], np.asarray(every_scores)[live], rtol=1e-5, atol=1e-5
    )
    table = np.asarray(model.module.apply(variables, method=model.module.item_vectors), float)
    dense = np.asarray(_last_state(model, params, inputs), float) @ table.T
    dense[:, 0] = -np.inf
    dense -= (np.log(np.exp(dense - dense.max(1, keepdims=True)).sum(1)) + dense.max(1))[:, None]
    n_added = 0
    for b in range(8):
        code = {
            int(i): float(s)
            for i, s in zip(np.asarray(every[b]), np.asarray(every_scores[b]), strict=True)
            if i > 0
        }
        beam_items = [int(i) for i in np.asarray(narrow[b]) if i > 0]
        rest = [i for i in np.argsort(-dense[b], kind="stable") if i in code]
        extra = [int(i) for i in rest if i not in beam_items][:4]
        want = sorted(
            ((i, code[i] + 2.0 * dense[b, i]) for i in beam_items + extra), key=lambda kv: -kv[1]
        )[:6]
        np.testing.assert_array_equal(np.asarray(items[b]), [i for i, _ in want])
        np.testing.assert_allclose(
            np.asarray(scores[b], float), [s for _, s in want], rtol=1e-5, atol=1e-5
        )
        assert not set(np.asarray(hist[b]).tolist()) & set(np.asarray(items[b]).tolist())
        n_added += bool(set(np.asarray(items[b]).tolist()) - set(beam_items))
    assert n_added > 0  # the dense candidates made some list
    with pytest.raises(ConfigError, match="dense_candidates"):
        c.eval.rerank_weight = 0.0
        build_model(c, info_for(data, sem, 5))


def test_dense_head_ranks_the_whole_catalogue_by_hand():
    """eval.evaluator=full_ranking on a model with a dense head ranks every unseen item by the
    last slot's state . the item vectors: rank = 1 + #unseen items scoring higher, by hand."""
    data = planted(n_users=24)
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny("onerec_sid_dense", num_experts=0)
    c.eval.update(evaluator="full_ranking", batch_size=8, valid_users=0)
    model = build_model(c, info_for(data, sem, 5))
    mesh = sharding.make_mesh(c.mesh.shape, jax.devices()[:1])
    rules = sharding.rules_from_config(c.mesh.rules)
    with sharding.use_mesh(mesh, rules):
        ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
        batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
        params = unboxed(model.init(jax.random.key(0), batch))
        result, per_user = make_evaluator(model, data, c, mesh, rules).evaluate(params, "test")
    users = np.arange(data.n_users)
    inputs = prefix_inputs(data, "test", users, 5)
    state = np.asarray(
        _last_state(model, params, {"inputs": jnp.asarray(inputs), "user": jnp.asarray(users)}),
        float,
    )
    table = np.asarray(model.module.apply({"params": params}, method=model.module.item_vectors))
    scores = state @ table.T  # [U, V]
    rows, seen = data.prefix_items("test", users)
    scores[rows, seen] = -np.inf
    scores[:, 0] = -np.inf
    targets = data.split("test").targets
    want = 1 + (scores > scores[users, targets][:, None]).sum(1)
    np.testing.assert_array_equal(per_user["users"], users)
    np.testing.assert_allclose(per_user["ranks"], want)
    assert result["ndcg@10"] == pytest.approx(
        np.mean(np.where(want <= 10, 1 / np.log2(want + 1), 0.0)), rel=1e-6
    )
    # Without a dense head there is nothing to rank the catalogue with.
    c = tiny("onerec_sid_nodense")
    c.eval.evaluator = "full_ranking"
    with pytest.raises(ConfigError, match="loss.dense_weight"):
        make_evaluator(build_model(c, info_for(data, sem, 5)), data, c, mesh, rules)


def _bos(batch):
    """Decoder input of BOS only, one per target position."""
    b, p = batch["targets"].shape[:2]
    return jnp.ones((b, p, 1), jnp.int32)


def _last_state(model, params, batch):
    memory, _ = model.module.apply(
        {"params": params}, batch["inputs"], batch["user"], method=model.module.encode
    )
    return memory[:, -1]


def test_rerank_needs_a_trained_dense_head():
    data = planted()
    c = tiny("onerec_sid_nodense")
    c.eval.rerank_weight = 1.0
    with pytest.raises(ConfigError, match="loss.dense_weight"):
        build_model(c, info_for(data, random_codes(N_ITEMS, 2, 4, 0), 5))


@pytest.mark.parametrize(
    ("variant", "model_fields"),
    [("tiger", {"session_items": 2}), ("onerec_sid", {"num_experts": 4})],
)
def test_incremental_decoding_equals_rereading_the_prefix(variant, model_fields):
    """Beam search with the decoder cache returns the items and scores of the search that
    re-decodes the whole prefix at every level (and so does session generation)."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    c = tiny(variant, **model_fields)
    c.model.decoder_layers = 2  # a cache per block
    model = build_model(c, info_for(data, sem, 5))
    ds = generative_train_dataset(
        data, sem.codes, max_len=5, batch_size=8, seed=0, session_items=model.session_items
    )
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
    params = unboxed(model.init(jax.random.key(3), batch))
    inputs = {"inputs": batch["inputs"][:, -1] if batch["inputs"].ndim == 3 else batch["inputs"]}
    inputs["user"] = batch["user"]
    hist = jnp.asarray(np.stack([data.sequence(u)[:3] for u in range(8)]), jnp.int32)
    out = {}
    for cached in (True, False):
        model.decoder_cache = cached
        out[cached] = jax.jit(model.generate, static_argnames=("k", "beam"))(
            params, inputs, hist, k=12, beam=12
        )
        if model.session_items > 1:
            out[cached, "session"] = jax.jit(model.generate_session)(params, inputs, hist)
    np.testing.assert_array_equal(np.asarray(out[True][0]), np.asarray(out[False][0]))
    np.testing.assert_allclose(
        np.asarray(out[True][1]), np.asarray(out[False][1]), rtol=1e-5, atol=1e-5
    )
    assert np.isfinite(np.asarray(out[True][1])).all()
    if model.session_items > 1:
        np.testing.assert_array_equal(
            np.asarray(out[True, "session"][0]), np.asarray(out[False, "session"][0])
        )


def _with_cold(info: DataInfo, cold) -> DataInfo:
    counts = np.ones(info.n_items + 1)
    counts[0], counts[np.asarray(cold)] = 0, 0
    return dataclasses.replace(info, item_counts=counts)


@pytest.mark.parametrize("valid_only,bonus", [(True, 0.0), (False, 0.0), (True, 1.5)])
def test_cold_items_compete_by_their_content_codes(valid_only, bonus):
    """eval.cold_share: items without a training interaction are scored by the log-probability
    of their L content codes (by hand below: one decoder pass per item, each level's softmax
    over the codes valid after its prefix, or the whole level), and take at most ceil(share x K)
    slots, their scores raised by eval.cold_bonus; the other slots hold the best unseen warm
    items (an exhaustive beam here)."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)  # 2 levels of 4 codes: <= 16 prefixes, beam 20
    cold = np.array([2, 5, 9, 13, 17, 20])
    c = tiny("tiger")
    c.loss.valid_codes_only = valid_only
    c.eval.update(beam=N_ITEMS, k=10, cold_share=0.25, cold_bonus=bonus)  # <= 3 cold slots
    model = build_model(c, _with_cold(info_for(data, sem, 5), cold))
    np.testing.assert_array_equal(model.cold_items, cold)
    ds = generative_train_dataset(data, sem.codes, max_len=5, batch_size=8, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
    params = unboxed(model.init(jax.random.key(2), batch))
    inputs = {"inputs": batch["inputs"], "user": batch["user"]}
    hist = jnp.asarray(np.stack([data.sequence(u)[:4] for u in range(8)]), jnp.int32)
    items, scores = jax.jit(model.generate)(params, inputs, hist)

    # every unseen item's full-id log-probability from an exhaustive beam without cold slots
    model.cold_share = 0.0
    all_items, all_scores = jax.jit(model.generate, static_argnames=("k", "beam"))(
        params, inputs, hist, k=N_ITEMS, beam=N_ITEMS
    )
    variables, context = model._encoded(params, inputs)
    sizes, offsets = sem.codebook_sizes, np.cumsum((0, *sem.codebook_sizes[:-1]))
    n_cold_lists = 0
    for b in range(8):
        seen = set(np.asarray(hist[b]).tolist())
        warm = {
            int(i): float(s)
            for i, s in zip(np.asarray(all_items[b]), np.asarray(all_scores[b]), strict=True)
            if i > 0 and i not in cold
        }
        by_hand = {}
        for item in cold:
            if item in seen:
                continue
            codes = sem.codes[item]
            dec = jnp.asarray([[[1, codes[0] + offsets[0] + 2]]], jnp.int32)  # BOS, code 0
            ctx = jax.tree.map(lambda x, b=b: x[b : b + 1], context)
            logits, _ = model.module.apply(variables, *ctx, dec, method=model.module.decode)
            logits = np.asarray(logits[0, 0], np.float64)
            total = 0.0
            for level in range(2):
                cols = np.arange(sizes[level])
                if valid_only:
                    same = (sem.codes[1:, :level] == codes[:level]).all(1)
                    cols = np.unique(sem.codes[1:][same, level])
                z = logits[level, offsets[level] + cols]
                logz = z.max() + np.log(np.exp(z - z.max()).sum())
                total += z[list(cols).index(codes[level])] - logz
            by_hand[int(item)] = total + bonus
        best_cold = sorted(by_hand.items(), key=lambda kv: -kv[1])[:3]
        want = sorted([*warm.items(), *best_cold], key=lambda kv: -kv[1])[:10]
        got_items, got_scores = np.asarray(items[b]), np.asarray(scores[b], np.float64)
        np.testing.assert_array_equal(got_items, [i for i, _ in want])
        np.testing.assert_allclose(got_scores, [s for _, s in want], rtol=1e-5, atol=1e-5)
        assert not seen & set(got_items.tolist())
        n_cold_lists += bool(set(got_items.tolist()) & set(cold.tolist()))
    assert n_cold_lists > 0  # the cold slots were used somewhere


def test_untrained_items_leave_the_loss_softmax():
    """loss.untrained_negatives=False: the loss's valid codes after each prefix are those of the
    items with a training interaction (brute force over every code tuple)."""
    data = planted()
    sem = random_codes(N_ITEMS, 2, 4, 0)
    cold = np.array([1, 4, 8, 11, 16])
    c = tiny("tiger")
    c.loss.untrained_negatives = False
    model = build_model(c, _with_cold(info_for(data, sem, 5), cold))
    loss_valid, valid = np.asarray(model.loss_valid), np.asarray(model.valid)
    tables = sem.prefix_tables()
    warm_codes = np.delete(sem.codes, np.concatenate([[0], cold]), axis=0)
    checked = 0
    for level, size in enumerate(sem.codebook_sizes):
        for prefix_codes in itertools.product(*[range(s) for s in sem.codebook_sizes[:level]]):
            node = 0
            for lvl, code in enumerate(prefix_codes):  # the prefix's id in the full tables
                node = tables.next_prefix[lvl][node, code] if node >= 0 else -1
            if node < 0:
                continue
            for code in range(size):
                want = (
                    (warm_codes[:, :level] == prefix_codes).all(1) & (warm_codes[:, level] == code)
                ).any()
                assert loss_valid[level, node, code] == want
                checked += 1
    assert checked > 0 and (loss_valid <= valid).all() and (loss_valid != valid).any()
    c.loss.untrained_negatives = True  # the default: every item's codes
    same = build_model(c, _with_cold(info_for(data, sem, 5), cold))
    np.testing.assert_array_equal(np.asarray(same.loss_valid), valid)
