"""SASRec's default block against a slow numpy forward of the public SASRec+ code's layout.

The reference (Klenitskiy & Vasilev 2023, after pmixer/SASRec.pytorch) reads right-padded
sequences with positions counted from the first item; each block normalises only the attention
query, adds the attention output to that normalised query, normalises again and adds a ReLU
feed-forward to the result; a final LayerNorm follows. Ours reads left-padded sequences, so the
same items at the same distance from the first item must give the same hidden states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from onerec_jax.defaults import apply_variant, base_config
from onerec_jax.models.base import DataInfo
from onerec_jax.models.registry import build_model

V, D, H, EPS = 20, 8, 2, 1e-8


def _layernorm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def _reference_forward(p, items):
    """Hidden states [n, D] of the n real `items`, as the reference computes them (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    n = len(items)
    x = p["item_embedding"]["embedding"][items] * np.sqrt(D) + p["position_embedding"][:n]
    causal = np.tril(np.ones((n, n), bool))
    for i in range(2):
        b = p[f"block_{i}"]
        a = b["attn"]
        q = _layernorm(x, b["norm_attn"])
        heads = []
        for h in range(H):
            qh = q @ a["query"][:, h] + a["query_bias"][h]
            kh = x @ a["key"][:, h] + a["key_bias"][h]  # keys and values: the un-normalised x
            vh = x @ a["value"][:, h] + a["value_bias"][h]
            logits = np.where(causal, qh @ kh.T / np.sqrt(D // H), -np.inf)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ vh @ a["out"][h])
        x = _layernorm(q + sum(heads) + a["out_bias"], b["norm_ffn"])
        f = b["ffn"]
        up = np.maximum(x @ f["up"]["kernel"] + f["up"]["bias"], 0)
        x = x + up @ f["down"]["kernel"] + f["down"]["bias"]
    return _layernorm(x, p["final_norm"])


def _model():
    c = apply_variant(base_config(), "sasrec")
    c.model.update(dim=D, num_heads=H, mlp_dim=12, dropout=0.0)
    info = DataInfo(n_items=V - 1, max_len=10, item_counts=np.ones(V))
    return build_model(c, info)


def _unboxed(params):
    return jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x,
        params,
        is_leaf=lambda x: hasattr(x, "value"),
    )


def test_default_block_matches_the_reference_forward():
    model = _model()
    inputs = jnp.array([[0, 0, 0, 0, 5, 7, 2, 9, 11, 3], [0, 0, 0, 0, 0, 0, 0, 0, 4, 17]])
    params = model.init(jax.random.key(1), {"inputs": inputs})
    # Random biases and norm parameters, so that every term of the reference is exercised.
    leaves, tree = jax.tree.flatten(_unboxed(params))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    params = jax.tree.unflatten(tree, leaves)
    hidden = np.asarray(model.apply(params, inputs, train=False))
    for row in range(len(inputs)):
        real = np.asarray(inputs[row]) > 0
        want = _reference_forward(params, np.asarray(inputs[row])[real])
        np.testing.assert_allclose(hidden[row][real], want, rtol=2e-4, atol=2e-4)


def test_init_is_normal_002_with_a_zero_padding_row():
    model = _model()
    params = _unboxed(model.init(jax.random.key(0), {"inputs": jnp.ones((2, 10), jnp.int32)}))
    table = np.asarray(params["item_embedding"]["embedding"])
    np.testing.assert_array_equal(table[0], 0.0)
    assert 0.015 < table[1:].std() < 0.025
    kernel = np.asarray(params["block_0"]["ffn"]["up"]["kernel"])
    assert 0.015 < kernel.std() < 0.025
    np.testing.assert_array_equal(params["block_0"]["attn"]["query_bias"], 0.0)


def test_qkv_init_torch_matches_multihead_attention_bounds():
    """model.qkv_init="torch": torch's MultiheadAttention initialises its packed [3 dim, dim]
    in-projection Xavier-uniform, bound sqrt(6 / (dim + 3 dim)) = sqrt(3 / (2 dim)); at dim 256
    that is 0.07655 and the std bound / sqrt(3) = 0.04419, whatever the head count."""
    from onerec_jax.models import layers

    x, mask = jnp.zeros((1, 3, 256)), jnp.ones((1, 1, 3, 3), bool)
    for heads in (1, 4):
        attn = layers.SelfAttention(heads, qkv_init="torch")
        params = attn.init(jax.random.key(0), x, mask, jnp.arange(3), train=False)["params"]
        for name in ("query", "key", "value"):
            kernel = np.asarray(jax.tree.leaves(params[name])[0])
            assert kernel.shape == (256, heads, 256 // heads)
            assert np.abs(kernel).max() <= (3 / 512) ** 0.5
            np.testing.assert_allclose(kernel.std(), (3 / 512) ** 0.5 / 3**0.5, rtol=0.02)
    with pytest.raises(ValueError, match="qkv_init='xavier'"):
        layers.SelfAttention(1, qkv_init="xavier").init(
            jax.random.key(0), x, mask, jnp.arange(3), train=False
        )
