"""Round 3 of the published Mithril's users: the published CLIP text model
(``examples/clip/model_mlx.py``: ``clip_text_model`` and what it builds on), copied as
published with its imports, against a hand-written Hugging Face ``CLIPTextModel`` forward in
torch autograd, float64, on NumPy, torch and JAX. Its pooling,
``last_hidden_state[arange_output, argmax_output]``, indexes by connections
(``GatherIndexer``), also checked alone against torch's advanced indexing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, evaluate_np

import mithril as ml
from mithril import IOKey
from mithril.models import (
    Arange,
    ArgMax,
    Buffer,
    Embedding,
    LayerNorm,
    Linear,
    Model,
    ScaledDotProduct,
    Sigmoid,
    Tensor,
    Where,
)

RNG = np.random.default_rng(5031)


# ---- examples/clip/model_mlx.py, as published ----------------------------------------------
def quick_gelu(name: str | None = None):
    block = Model(name=name)
    input = IOKey("input")
    block |= Sigmoid().connect((1.702 * input), output="sigmoid")
    block |= Buffer().connect(input * block.sigmoid, output="output")
    block.expose_keys("output")
    return block


def attention(
    dims: int,
    num_heads: int,
    query_input_dims: int | None = None,
    key_input_dims: int | None = None,
    value_input_dims: int | None = None,
    value_dims: int | None = None,
    value_output_dims: int | None = None,
    bias: bool = False,
    use_mask: bool = False,
    name: str | None = None,
):
    block = Model(name=name)
    query_input_dims = query_input_dims or dims
    key_input_dims = key_input_dims or dims
    value_input_dims = value_input_dims or key_input_dims
    value_dims = value_dims or dims
    value_output_dims = value_output_dims or dims

    queries = IOKey("queries")
    keys = IOKey("keys")
    values = IOKey("values")

    block |= Linear(dims, name="q_proj", use_bias=bias).connect(
        queries, output="queries_proj"
    )
    block |= Linear(dims, name="k_proj", use_bias=bias).connect(
        keys, output="keys_proj"
    )
    block |= Linear(value_dims, name="v_proj", use_bias=bias).connect(
        values, output="values_proj"
    )

    queries: ml.Connection = block.queries_proj
    keys: ml.Connection = block.keys_proj
    values: ml.Connection = block.values_proj

    B, L = queries.shape[0], queries.shape[1]
    S = keys.shape[1]
    queries = queries.reshape((B, L, num_heads, -1)).transpose((0, 2, 1, 3))
    keys = keys.reshape((B, S, num_heads, -1)).transpose((0, 2, 1, 3))
    values = values.reshape((B, S, num_heads, -1)).transpose((0, 2, 1, 3))

    if use_mask:
        block |= (mask_model := build_attention_mask())
        block |= ScaledDotProduct(is_causal=False, use_attn_mask=True).connect(
            query=queries,
            key=keys,
            value=values,
            attn_mask=mask_model.cout,
            output="scores",
        )
    else:
        block |= ScaledDotProduct(is_causal=False, use_attn_mask=False).connect(
            query=queries, key=keys, value=values, output="scores"
        )

    values_hat = block.scores.transpose((0, 2, 1, 3)).reshape((B, L, -1))
    block |= Linear(value_output_dims, name="out_proj").connect(
        values_hat, output="output"
    )
    block.expose_keys("output")
    # block |= Buffer().connect(input=block.out, output=IOKey("output"))
    return block


def mlp(config: dict[str, Any], name: str | None = None):
    block = Model(name=name)
    block |= Linear(config["intermediate_size"], name="fc1").connect(
        input="input", output="fc1_output"
    )
    block |= quick_gelu(name="activation_fn").connect(
        input=block.fc1_output,
        output="gelu_output",
    )
    block |= Linear(config["hidden_size"], name="fc2").connect(
        input=block.gelu_output,
        output="output",
    )
    block.expose_keys("output")
    return block


def encode_layer(
    config: dict[str, Any], use_mask: bool = False, name: str | None = None
):
    block = Model(name=name)
    input = IOKey("input")
    block |= LayerNorm(eps=config["layer_norm_eps"], name="layer_norm1").connect(
        input=input, output="ln_1_output"
    )
    block |= attention(
        config["hidden_size"],
        config["num_attention_heads"],
        bias=True,
        use_mask=use_mask,
        name="self_attn",
    ).connect(
        queries=block.ln_1_output,
        keys=block.ln_1_output,
        values=block.ln_1_output,
        output="attn_output",
    )
    block |= LayerNorm(eps=config["layer_norm_eps"], name="layer_norm2").connect(
        input=input + block.attn_output,
        output="ln_2_output",
    )
    block |= mlp(config, name="mlp").connect(
        input=block.ln_2_output,
        output="mlp_output",
    )
    block |= Buffer().connect(
        input + block.attn_output + block.mlp_output,
        output="output",
    )
    block.expose_keys("output")
    return block


def encoder(
    config: dict[str, Any],
    use_mask: bool = False,
    name: str | None = None,
):
    block = Model(name=name)
    input_key = "input"
    for idx in range(config["num_hidden_layers"]):
        block |= encode_layer(config, use_mask=use_mask, name=f"layers_{idx}").connect(
            input=input_key, output=f"attn_output_{idx}"
        )
        input_key = f"attn_output_{idx}"
    block |= Buffer().connect(input=f"attn_output_{idx}", output="output")
    block.expose_keys("output")
    return block


def text_embeddings(
    config: dict[str, Any],
    name: str | None = None,
):
    block = Model(name=name)
    input = IOKey("input")
    embed_dim = config["hidden_size"]
    block |= Embedding(config["vocab_size"], embed_dim, name="token_embedding").connect(
        input=input, output="token_embedding_output"
    )
    block |= Embedding(
        config["max_position_embeddings"], embed_dim, name="position_embedding"
    ).connect(
        input=input,
        weight="position_embedding_weight",
        output="position_embedding_output",
    )
    block |= Buffer().connect(
        input=block.token_embedding_output
        + block.position_embedding_weight[: input.shape[1]],
        output="output",
    )
    block.expose_keys("output")
    return block


def clip_text_model(config: dict[str, Any], name: str | None = None):
    block = Model(name=name)
    input = IOKey("input")
    B, _ = input.shape[0], input.shape[1]

    block |= text_embeddings(config, name="embeddings").connect(
        input=input, output="embeddings_output"
    )

    block |= encoder(config, use_mask=True, name="encoder").connect(
        input=block.embeddings_output,
        output="t_encoder_output",
    )

    block |= LayerNorm(name="final_layer_norm").connect(
        input=block.t_encoder_output,
        output="last_hidden_state",
    )
    block |= Arange(dtype=ml.int64).connect(stop=B, output="arange_output")
    block |= ArgMax(axis=-1).connect(input=input, output="argmax_output")

    # TODO: Add block.argmax_output
    block |= Buffer().connect(
        input=block.last_hidden_state[block.arange_output, block.argmax_output],
        output="output",
    )
    block.expose_keys("output")
    return block


def build_attention_mask() -> Model:
    block = Model()
    block |= Arange(stop=77).connect(output="arange_out_1")
    block |= Arange(stop=77).connect(output="arange_out_2")
    upper_bool_triu = block.arange_out_1[..., None] >= block.arange_out_2[None, ...]
    block |= Where().connect(
        cond=upper_bool_triu,
        input1=Tensor(0.0),
        input2=Tensor(float("-inf")),
        output="output",
    )
    block.expose_keys("output")
    return block


# ---- against torch -------------------------------------------------------------------------
def _lin(t, name, v):
    return v @ t[name + ".weight"].T + t[name + ".bias"]


def _torch_clip_text(t, ids, cfg):
    """Hugging Face CLIPTextModel's forward (quick_gelu, causal mask, pre-norm layers)."""
    B, L = ids.shape
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    x = t["embeddings.token_embedding.weight"][ids] + t["position_embedding_weight"][:L]
    mask = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers_{i}."
        h = F.layer_norm(x, (D,), t[p + "layer_norm1.weight"], t[p + "layer_norm1.bias"], 1e-5)
        q, k, v = (_lin(t, p + f"self_attn.{n}_proj", h).reshape(B, L, H, -1).transpose(1, 2) for n in "qkv")
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D)
        x = x + _lin(t, p + "self_attn.out_proj", a)
        h = F.layer_norm(x, (D,), t[p + "layer_norm2.weight"], t[p + "layer_norm2.bias"], 1e-5)
        h = _lin(t, p + "mlp.fc1", h)
        x = x + _lin(t, p + "mlp.fc2", h * torch.sigmoid(1.702 * h))
    x = F.layer_norm(x, (D,), t["final_layer_norm.weight"], t["final_layer_norm.bias"], 1e-5)
    return x, x[torch.arange(B), ids.argmax(-1)]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_clip_text_model_matches_a_torch_clip_text_model(name):
    b = BACKENDS[name](dtype="float64")
    cfg: dict[str, Any] = dict(hidden_size=8, num_attention_heads=2, intermediate_size=16,
                               num_hidden_layers=2, layer_norm_eps=1e-5, vocab_size=50,
                               max_position_embeddings=77)
    compiled = ml.compile(clip_text_model(cfg, name="text_model"), b, shapes={"input": [2, 77]})
    params = {k: RNG.standard_normal(s) * (0.3 if k.endswith("weight") and len(s) == 2 else 1.0)
              for k, s in compiled.parameter_shapes.items()}
    ids = RNG.integers(0, 50, (2, 77))
    cot = {"output": RNG.standard_normal((2, 8)), "last_hidden_state": RNG.standard_normal((2, 77, 8))}
    out, grads = evaluate_np(compiled, b, params, {"input": ids}, cot)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    hidden, pooled = _torch_clip_text(t, torch.tensor(ids), cfg)
    total = (pooled * torch.tensor(cot["output"])).sum() + \
        (hidden * torch.tensor(cot["last_hidden_state"])).sum()
    want = dict(zip(t, torch.autograd.grad(total, list(t.values())), strict=True))
    np.testing.assert_array_equal(out["argmax_output"], ids.argmax(-1))
    np.testing.assert_allclose(out["output"], pooled.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["last_hidden_state"], hidden.detach().numpy(), rtol=1e-12, atol=1e-12)
    for key, g in want.items():
        np.testing.assert_allclose(grads[key], g.numpy(), rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_indexing_by_connections_matches_torch_advanced_indexing(name):
    """``x[i, :, j]`` (not adjacent: the index shape first), ``x[..., i]``, ``x[0, i]`` (an
    int with an index array: adjacent) and a lone ``x[k]``, with repeated indices, against
    torch."""
    b = BACKENDS[name](dtype="float64")
    model = Model()
    x = IOKey("x")
    model |= Buffer().connect(input=x[IOKey("i"), :, IOKey("j")], output="a")
    model |= Buffer().connect(input=x[..., IOKey("j")], output="c")
    model |= Buffer().connect(input=x[0, IOKey("i")], output="d")
    model |= Buffer().connect(input=x[IOKey("k")], output="e")  # (a lone index: x[k, ...])
    compiled = ml.compile(model, b, shapes={"x": [3, 4, 5], "i": [2, 2], "j": [2], "k": [3]},
                          trainable_keys={"x"})
    xv = RNG.standard_normal((3, 4, 5))
    iv, jv = np.array([[0, 2], [2, 2]]), np.array([4, 4])
    kv = np.array([2, 0, 2])
    shapes = {"a": (2, 2, 4), "c": (3, 4, 2), "d": (2, 2, 5), "e": (3, 4, 5)}
    cot = {k: RNG.standard_normal(s) for k, s in shapes.items()}
    out, grads = evaluate_np(compiled, b, {"x": xv}, {"i": iv, "j": jv, "k": kv}, cot)
    tx = torch.tensor(xv, requires_grad=True)
    ti, tj = torch.tensor(iv), torch.tensor(jv)
    want = {"a": tx[ti, :, tj], "c": tx[..., tj], "d": tx[0, ti],
            "e": tx[torch.tensor(kv)]}
    total = sum((w * torch.tensor(cot[k])).sum() for k, w in want.items())
    (gx,) = torch.autograd.grad(total, [tx])
    for k, w in want.items():
        assert out[k].shape == shapes[k]
        np.testing.assert_array_equal(out[k], w.detach().numpy())
    np.testing.assert_allclose(grads["x"], gx.numpy(), rtol=1e-12, atol=1e-14)


def test_indexing_by_connections_refusals():
    x, i = IOKey("x"), IOKey("i")
    with pytest.raises(TypeError, match=r"besides them, ints, full slices \(:\) and one \.\.\., got slice\(1, None"):
        x[i, 1:]
    with pytest.raises(TypeError, match="besides them"):
        x[i, None]
    model = Model()
    model |= Buffer().connect(input=x[i, IOKey("j")], output="y")
    b = ml.NumpyBackend(dtype="float64")
    with pytest.raises(ml.ShapeError, match="do not broadcast"):
        ml.compile(model, b, shapes={"x": [3, 4], "i": [2], "j": [3]})
    with pytest.raises(ml.ShapeError, match="3 indices for an input of rank 2"):
        m2 = Model()
        m2 |= Buffer().connect(input=x[i, 0, 1], output="y")
        ml.compile(m2, b, shapes={"x": [3, 4], "i": [2]})
