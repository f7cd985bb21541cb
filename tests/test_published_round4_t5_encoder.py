"""Round 4 of the published Mithril's users: the published T5 encoder (``examples/t5.py``:
``rms_norm``, ``multihead_attention`` with the relative position bias as its mask,
``dense_activation`` gated and plain, ``transformer_encoder_layer``, ``transformer_encoder``,
``t5_encode``), copied as published with its imports, against a T5 encoder written here in
torch (the Hugging Face ``T5Stack`` forward with the example's choices: eps 1e-5, exact GELU),
2 layers, d_model 16, on NumPy, torch and JAX with every gradient against torch autograd.

The port checked here writes the casts ``Cast().connect(input=x, dtype=y.dtype())`` and starts
the positions at 0 without the constant; the published spellings (``x.cast(y.dtype())`` in an
expression, the bias's ``Arange`` started at the constant ``offset=0``) are checked to give the
same (the last two tests). The example takes its softmax in float32: a float64 model agrees
with torch to float32's precision there, and to 1e-12 with that cast left out."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, evaluate_np
from test_review_published49b import hf_bucket
from test_review_published49b import relative_position_bias as bias_from_zero

import mithril as ml
from mithril import IOKey
from mithril.models import (
    Add,
    Arange,
    Buffer,
    Cast,
    Embedding,
    Gelu,
    Linear,
    Log,
    Minimum,
    Model,
    Multiply,
    Relu,
    SiLU,
    Softmax,
    Transpose,
    Where,
    ZerosLike,
)

RNG = np.random.default_rng(5304)


# ---- examples/t5.py, as published ----------------------------------------------------------
def multihead_attention(
    config: dict[str, Any],
    use_mask: bool = False,
    *,
    name: str | None = None,
):
    d_kv = config["d_kv"]
    d_model = config["d_model"]
    num_heads = config["num_heads"]

    inner_dim = d_kv * num_heads
    block = Model(name=name)
    queries = IOKey("queries", shape=(None, None, d_model))
    keys = IOKey("keys", shape=(None, None, d_model))
    values = IOKey("values", shape=(None, None, d_model))

    block |= Linear(inner_dim, name="query_proj", use_bias=False).connect(
        queries, output="queries_proj"
    )
    block |= Linear(inner_dim, name="key_proj", use_bias=False).connect(
        keys, output="keys_proj"
    )
    block |= Linear(inner_dim, name="value_proj", use_bias=False).connect(
        values, output="values_proj"
    )

    queries: ml.Connection = block.queries_proj  # type: ignore
    keys: ml.Connection = block.keys_proj  # type: ignore
    values: ml.Connection = block.values_proj  # type: ignore

    B, L = queries.shape[0], queries.shape[1]
    S = keys.shape[1]
    queries = queries.reshape((B, L, num_heads, -1)).transpose((0, 2, 1, 3))  # type: ignore
    keys = keys.reshape((B, S, num_heads, -1)).transpose((0, 2, 3, 1))  # type: ignore
    values = values.reshape((B, S, num_heads, -1)).transpose((0, 2, 1, 3))  # type: ignore

    scores = queries @ keys

    if use_mask:
        scores = scores + IOKey("mask").cast(scores.dtype())

    block |= Softmax(axis=-1).connect(
        scores.cast(ml.float32), output="attention_weights"
    )

    scores = block.attention_weights.cast(scores.dtype())  # type: ignore
    values_hat = (scores @ values).transpose((0, 2, 1, 3)).reshape((B, L, -1))
    block |= Linear(d_model, name="out_proj", use_bias=False).connect(
        values_hat, output="output"
    )
    block |= Buffer().connect(keys, output="keys_out")
    block |= Buffer().connect(values, output="values_out")
    block.expose_keys("keys_out", "values_out", "output")

    return block



def rms_norm(dim: int, *, name: str | None = None):
    # TODO: check original implementation they use astype and cast to float32
    block = Model(name=name)
    input = IOKey("input")
    weight = IOKey(
        "weight", shape=[dim], differentiable=True
    )  # TODO: weight must be initialized with ones.
    rrms = input / ((input**2).mean(axis=-1, keepdim=True) + 1e-5).sqrt()
    block += Multiply().connect(left=rrms, right=weight, output="output")
    block.expose_keys("output")
    block.set_cin("input")
    return block


def dense_activation(config: dict[str, Any], *, name: str | None = None):
    mlp_dims = config["d_ff"] or config["d_model"] * 4

    is_gated = "feed_forward_proj" in config
    activation_name = (
        "relu" if not is_gated else config["feed_forward_proj"].removeprefix("gated-")
    )

    if activation_name == "relu":
        activation: Model = Relu()
    elif activation_name == "gelu":
        activation = Gelu()
    elif activation_name == "silu":
        activation = SiLU()
    else:
        raise ValueError(f"Unknown activation function: {activation_name}")

    block = Model(name=name)
    input = IOKey("input")

    if is_gated:
        block |= Linear(mlp_dims, use_bias=False, name="wi_0").connect(input)
        block += activation.connect(output="hidden_act")
        block |= Linear(mlp_dims, use_bias=False, name="wi_1").connect(
            input, output="lin_out"
        )
        block |= Multiply().connect(
            left="hidden_act", right="lin_out", output="hidden_out"
        )
        block.set_cout("hidden_out")
    else:
        block |= Linear(mlp_dims, name="wi", use_bias=False).connect(input)
        block += Relu().connect(output="hidden_out")

    block += Linear(config["d_model"], name="wo", use_bias=False).connect(
        output="output"
    )
    block.expose_keys("output")
    return block


def relative_position_bucket(
    bidirectional=True, num_buckets=32, max_distance=128, *, name: str | None = None
):
    block = Model(name=name)
    relative_position = IOKey("relative_position")
    relative_buckets = IOKey(value=0)

    if bidirectional:
        num_buckets //= 2

        relative_buckets += (relative_position > 0).cast(ml.int16) * num_buckets
        relative_position = relative_position.abs()  # type: ignore
    else:
        block |= ZerosLike().connect(relative_position, output="zeros_like")
        block |= Minimum().connect(
            left=relative_position, right="zeros_like", output="minimum_out"
        )

        relative_position: ml.Connection = -block.minimum_out  # type: ignore
    # now relative_position is in the range [0, inf)

    # half of the buckets are for exact increments in positions
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scale = (num_buckets - max_exact) / math.log(max_distance / max_exact)

    block |= Log().connect(
        (relative_position.cast(ml.float32) / max_exact), output="log_out"
    )

    block |= Minimum().connect(
        left=(max_exact + block.log_out * scale).cast(ml.int16),  # type: ignore
        right=ml.Tensor(num_buckets - 1),
        output="relative_position_if_large_2",
    )
    block |= Where().connect(
        cond=is_small,
        input1=relative_position,
        input2="relative_position_if_large_2",
        output="where_out",
    )

    block |= Add().connect(relative_buckets, "where_out", output="output")
    block.expose_keys("output")

    return block




def transformer_encoder_layer(config: dict[str, Any], *, name: str | None = None):
    block = Model(name=name)

    input = IOKey("input")
    mask = IOKey("mask")

    block |= rms_norm(config["d_model"], name="ln1").connect(
        input=input, output="input_norm"
    )
    block |= multihead_attention(
        config=config, use_mask=True, name="attention"
    ).connect(
        queries="input_norm",
        keys="input_norm",
        values="input_norm",
        mask=mask,
        output="attn_out",
    )

    block |= Add().connect(left="input", right="attn_out", output="attn_out2")
    block |= rms_norm(config["d_model"], name="ln2").connect(
        input="attn_out2", output="norm2"
    )
    block |= dense_activation(config=config, name="dense").connect(
        input="norm2", output="ff_out"
    )
    block |= Add().connect(left="attn_out2", right="ff_out", output="output")
    block.expose_keys("output")
    block.set_cout("output")
    return block


def relative_position_bias(
    config: dict[str, Any], bidirectional: bool, *, name: str | None = None
):
    num_buckets = config["relative_attention_num_buckets"]
    max_distance = config.get("relative_attention_max_distance", 128)
    num_heads = config["num_heads"]

    block = Model(name=name)
    query_length = IOKey("query_length", type=int)
    key_length = IOKey("key_length", type=int)
    offset = IOKey("offset", type=int)

    block |= Arange(start=ml.TBD).connect(
        start=offset, stop=query_length, output="context_position"
    )
    block |= Arange().connect(stop=key_length, output="memory_position")

    context_position: ml.Connection = block.context_position[:, None]  # type: ignore
    memory_position: ml.Connection = block.memory_position[None, :]  # type: ignore

    relative_position = memory_position - context_position

    block |= relative_position_bucket(
        bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    ).connect(relative_position=relative_position, output="relative_position_buckets")
    block |= Embedding(
        num_embeddings=num_buckets, dim=num_heads, name="embeddings"
    ).connect(input="relative_position_buckets", output="values")
    block |= Transpose(axes=(2, 0, 1)).connect(input="values", output="output")

    block.expose_keys("output")
    return block


def transformer_encoder(config: dict[str, Any], *, name: str | None = None):
    input = IOKey("input")
    block = Model(name=name)

    block |= relative_position_bias(
        config, bidirectional=True, name="relative_attention_bias"
    ).connect(
        query_length=input.shape[1],
        key_length=input.shape[1],
        offset=0,
        output="pos_bias",
    )

    input_key = "input"
    for idx in range(config["num_layers"]):
        block |= transformer_encoder_layer(config, name=f"layers_{idx}").connect(
            input=input_key, mask="pos_bias", output=f"output_{idx}"
        )
        input_key = f"output_{idx}"

    block |= rms_norm(config["d_model"], name="ln").connect(
        input=input_key, output="output"
    )

    block.expose_keys("pos_bias", "output")
    return block


def t5_encode(config: dict[str, Any], name: str | None = None):
    block = Model(name=name)
    input = IOKey("input")
    block |= Embedding(
        name="wte", num_embeddings=config["vocab_size"], dim=config["d_model"]
    ).connect(input, output="wte_out")
    block |= transformer_encoder(config, name="encoder").connect(
        input="wte_out", pos_bias="pos_bias", output="output"
    )
    block.expose_keys("output")

    return block



# ---- the port: the published code but for the two spellings that do not run yet ------------
SOFTMAX_DTYPE = ml.float32  # (the published softmax dtype; float64 for the 1e-12 check)


def _multihead_attention_port(config: dict[str, Any], use_mask: bool = False, *,
                              name: str | None = None):
    """The published ``multihead_attention``; its ``IOKey("mask").cast(scores.dtype())`` and
    ``block.attention_weights.cast(scores.dtype())`` written as ``Cast`` blocks."""
    d_kv, d_model, num_heads = config["d_kv"], config["d_model"], config["num_heads"]
    inner_dim = d_kv * num_heads
    block = Model(name=name)
    queries = IOKey("queries", shape=(None, None, d_model))
    keys = IOKey("keys", shape=(None, None, d_model))
    values = IOKey("values", shape=(None, None, d_model))
    block |= Linear(inner_dim, name="query_proj", use_bias=False).connect(queries, output="queries_proj")
    block |= Linear(inner_dim, name="key_proj", use_bias=False).connect(keys, output="keys_proj")
    block |= Linear(inner_dim, name="value_proj", use_bias=False).connect(values, output="values_proj")
    queries, keys, values = block.queries_proj, block.keys_proj, block.values_proj  # type: ignore
    B, L = queries.shape[0], queries.shape[1]
    S = keys.shape[1]
    queries = queries.reshape((B, L, num_heads, -1)).transpose((0, 2, 1, 3))
    keys = keys.reshape((B, S, num_heads, -1)).transpose((0, 2, 3, 1))
    values = values.reshape((B, S, num_heads, -1)).transpose((0, 2, 1, 3))
    scores = queries @ keys
    if use_mask:
        block |= Cast().connect(input=IOKey("mask"), dtype=scores.dtype(), output="mask_cast")
        scores = scores + block.mask_cast  # type: ignore
    block |= Softmax(axis=-1).connect(scores.cast(SOFTMAX_DTYPE), output="attention_weights")
    block |= Cast().connect(input=block.attention_weights, dtype=scores.dtype(),  # type: ignore
                            output="weights_cast")
    values_hat = (block.weights_cast @ values).transpose((0, 2, 1, 3)).reshape((B, L, -1))  # type: ignore
    block |= Linear(d_model, name="out_proj", use_bias=False).connect(values_hat, output="output")
    block |= Buffer().connect(keys, output="keys_out")
    block |= Buffer().connect(values, output="values_out")
    block.expose_keys("keys_out", "values_out", "output")
    return block


def _transformer_encoder_port(config: dict[str, Any], *, name: str | None = None):
    """The published ``transformer_encoder``; the bias's positions start at 0 without the
    constant ``offset=0`` (``Arange().connect(stop=query_length)``)."""
    input = IOKey("input")
    block = Model(name=name)
    block |= bias_from_zero(config, bidirectional=True, name="relative_attention_bias").connect(
        query_length=input.shape[1], key_length=input.shape[1], output="pos_bias")
    input_key = "input"
    for idx in range(config["num_layers"]):
        block |= transformer_encoder_layer(config, name=f"layers_{idx}").connect(
            input=input_key, mask="pos_bias", output=f"output_{idx}")
        input_key = f"output_{idx}"
    block |= rms_norm(config["d_model"], name="ln").connect(input=input_key, output="output")
    block.expose_keys("pos_bias", "output")
    return block


@pytest.fixture
def port(monkeypatch):
    monkeypatch.setitem(globals(), "multihead_attention", _multihead_attention_port)
    monkeypatch.setitem(globals(), "transformer_encoder", _transformer_encoder_port)
    return monkeypatch


# ---- against torch -------------------------------------------------------------------------
GATED = dict(d_kv=4, d_model=16, num_heads=4, d_ff=32, feed_forward_proj="gated-gelu",
             num_layers=2, vocab_size=50, relative_attention_num_buckets=32,
             relative_attention_max_distance=20)
PLAIN = {k: v for k, v in GATED.items() if k != "feed_forward_proj"}  # (relu)
B, L = 2, 12  # distances up to 11 >= max_exact 8: the log buckets are reached
#: each rms_norm's IOKey("weight"), renamed by the blocks above it
RMS = {"layers_0.ln1": "weight", "layers_0.ln2": "weight_1", "layers_1.ln1": "weight_2",
       "layers_1.ln2": "weight_1_1", "ln": "weight_3"}


def _rms(x, w):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * w


def _torch_t5_encoder(t, ids, cfg, f32_softmax):
    """transformers' T5 encoder stack (no attention scaling, the bias added to the scores of
    every layer) with the example's rms eps 1e-5 and exact GELU; returns (output, bias)."""
    H, dkv = cfg["num_heads"], cfg["d_kv"]
    pos = torch.arange(ids.shape[1])
    buckets = hf_bucket(pos[None, :] - pos[:, None], True, cfg["relative_attention_num_buckets"],
                        cfg["relative_attention_max_distance"])
    bias = t["encoder.relative_attention_bias.embeddings.weight"][buckets].permute(2, 0, 1)
    x = t["wte.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"encoder.layers_{i}."
        h = _rms(x, t[RMS[f"layers_{i}.ln1"]])
        q, k, v = (F.linear(h, t[p + f"attention.{n}_proj.weight"]).reshape(B, L, H, dkv)
                   .transpose(1, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(-1, -2) + bias
        a = F.softmax(s.float(), -1).to(s.dtype) if f32_softmax else F.softmax(s, -1)
        x = x + F.linear((a @ v).transpose(1, 2).reshape(B, L, H * dkv),
                         t[p + "attention.out_proj.weight"])
        h = _rms(x, t[RMS[f"layers_{i}.ln2"]])
        if "feed_forward_proj" in cfg:
            ff = F.gelu(F.linear(h, t[p + "dense.wi_0.weight"])) * F.linear(h, t[p + "dense.wi_1.weight"])
        else:
            ff = F.relu(F.linear(h, t[p + "dense.wi.weight"]))
        x = x + F.linear(ff, t[p + "dense.wo.weight"])
    return _rms(x, t[RMS["ln"]]), bias


def _run(name, cfg, dtype, f32_softmax, rtol, atol):
    """Compile the published ``t5_encode``, evaluate it with random parameters, token ids and
    output gradients, and compare the output, the bias and every gradient with torch (a
    gradient's ``atol`` scaled by its largest entry, up to 60 here)."""
    b = BACKENDS[name](dtype=dtype)
    pm = ml.compile(t5_encode(cfg, name="t5"), b, shapes={"input": [B, L]})
    dense = ("wi_0", "wi_1", "wo") if "feed_forward_proj" in cfg else ("wi", "wo")
    assert set(pm.parameter_shapes) == {
        *RMS.values(), "wte.weight", "encoder.relative_attention_bias.embeddings.weight",
        *(f"encoder.layers_{i}.{n}.weight" for i in range(2) for n in
          (*(f"attention.{p}_proj" for p in ("query", "key", "value", "out")),
           *(f"dense.{d}" for d in dense)))}
    params = {k: (RNG.standard_normal(s) * (0.3 if len(s) == 2 else 1.0)).astype(dtype)
              for k, s in pm.parameter_shapes.items()}
    ids = RNG.integers(0, cfg["vocab_size"], (B, L))
    cot = {"output": RNG.standard_normal((B, L, 16)).astype(dtype),
           "pos_bias": RNG.standard_normal((4, L, L)).astype(dtype)}
    out, grads = evaluate_np(pm, b, params, {"input": ids}, cot)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want, bias = _torch_t5_encoder(t, torch.tensor(ids), cfg, f32_softmax)
    total = (want * torch.tensor(cot["output"])).sum() + (bias * torch.tensor(cot["pos_bias"])).sum()
    g = dict(zip(t, torch.autograd.grad(total, list(t.values())), strict=True))
    np.testing.assert_allclose(out["pos_bias"], bias.detach().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(out["output"], want.detach().numpy(), rtol=rtol, atol=atol)
    for k, gk in g.items():  # (atol relative to the gradient's largest entry)
        np.testing.assert_allclose(grads[k], gk.numpy(), rtol=rtol,
                                   atol=atol * max(1.0, float(gk.abs().max())), err_msg=k)


@pytest.mark.parametrize("cfg", [GATED, PLAIN], ids=["gated-gelu", "relu"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_t5_encoder_with_a_float64_softmax_matches_torch_to_1e12(name, cfg, port):
    port.setitem(globals(), "SOFTMAX_DTYPE", ml.float64)
    _run(name, cfg, "float64", False, 1e-12, 1e-12)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_t5_encoder_takes_its_softmax_in_float32_as_published(name, port):
    """The published float32 softmax in a float64 model: torch's forward with a float32
    softmax agrees to float32's precision, and the float32 step is real."""
    _run(name, GATED, "float64", True, 1e-5, 1e-6)
    with pytest.raises(AssertionError):
        _run(name, GATED, "float64", False, 1e-9, 1e-9)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_t5_encoder_in_float32_matches_torch(name, port):
    _run(name, GATED, "float32", True, 1e-4, 2e-5)


def test_published_attention_with_a_cast_to_a_connections_dtype(monkeypatch):
    """The published ``multihead_attention`` as is (``IOKey("mask").cast(scores.dtype())``)
    equals the port's."""
    b = ml.NumpyBackend(dtype="float64")
    shapes = {"queries": [B, L, 16], "keys": [B, L, 16], "values": [B, L, 16], "mask": [4, L, L]}
    data = {k: RNG.standard_normal(s) for k, s in shapes.items()}
    got = ml.compile(multihead_attention(GATED, use_mask=True), b, shapes=shapes)
    want = ml.compile(_multihead_attention_port(GATED, use_mask=True), b, shapes=shapes)
    params = {k: RNG.standard_normal(s) for k, s in want.parameter_shapes.items()}
    np.testing.assert_array_equal(got.evaluate(params, data)["output"],
                                  want.evaluate(params, data)["output"])


def test_published_bias_with_its_constant_offset_evaluates():
    model = Model()
    model |= relative_position_bias(GATED, bidirectional=True, name="bias").connect(
        query_length=IOKey("x").shape[1], key_length=IOKey("x").shape[1], offset=0,
        output="pos_bias")
    pm = ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [1, L, 4]})
    w = RNG.standard_normal((32, 4))
    out = pm.evaluate({"bias.embeddings.weight": w}, {"x": np.zeros((1, L, 4))})
    pos = torch.arange(L)
    want = w[hf_bucket(pos[None, :] - pos[:, None], True, 32, 20).numpy()].transpose(2, 0, 1)
    np.testing.assert_array_equal(out["pos_bias"], want)
