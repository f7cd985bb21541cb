"""Attention edge cases found in review, against torch side by side (float64, NumPy, torch
and JAX): outputs and the gradient of every input.

* ``ScaledDotProduct`` over features of size 0 (E = 0): torch gives uniform weights (the
  mean of the values); the default scale 1/√0 raised ZeroDivisionError here.
* ``ScaledDotProduct(enable_gqa=True)`` with 0 query and key heads: empty, as torch (the
  heads check's 0 % 0 raised ZeroDivisionError); 0 key heads for 4 query heads (0 does not
  divide 4): the named ShapeError (torch returns zeros).
* ``MultiHeadAttention`` / ``AttentionWeights`` with a query of 0 features: a ShapeError
  naming the query (torch refuses embed_dim=0); was a bare ZeroDivisionError.
* ``PositionalEmbedding`` over an empty sequence (L = 0): its NumPy VJP raised.
* ``AttentionWeights`` in float16 on NumPy / JAX: within one ulp of torch's float64 weights
  (computed in float32, rounded once, as ``MultiHeadAttention``); was ~11 ulps.
* ``ScaledDotProduct(scale=np.float32(...))``: NumPy scalars accepted, as torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, jax_float64, to_np

import mithril as ml
from mithril.errors import ShapeError
from mithril.models import AttentionWeights

TOL = 1e-12


def _sdpa_case(backend_name, shapes, **options):
    """Our output and input gradients, and torch's, for ``ScaledDotProduct(**options)``."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(ml.ScaledDotProduct(**options), backend, shapes=shapes,
                          trainable_keys=list(shapes))
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(s) for k, s in shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in arrays.items()}, {},
                                   output_gradients={"output": backend.array(cot)})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    want = F.scaled_dot_product_attention(t["query"], t["key"], t["value"], **options)
    want_grads = torch.autograd.grad(want, list(t.values()), torch.tensor(cot))
    got = {"output": to_np(backend, out["output"]),
           **{k: to_np(backend, grads[k]) for k in t}}
    ref = {"output": want.detach().numpy(), **{k: g.numpy() for k, g in zip(t, want_grads)}}
    return got, ref


ZERO_SIZED = {
    "default_scale": ({"query": (2, 4, 0), "key": (2, 5, 0), "value": (2, 5, 3)}, {}),
    "causal": ({"query": (2, 4, 0), "key": (2, 5, 0), "value": (2, 5, 3)}, {"is_causal": True}),
    "gqa": ({"query": (2, 4, 3, 0), "key": (2, 2, 5, 0), "value": (2, 2, 5, 3)},
            {"enable_gqa": True}),
    "gqa_no_heads": ({"query": (2, 0, 3, 2), "key": (2, 0, 5, 2), "value": (2, 0, 5, 3)},
                     {"enable_gqa": True}),
}


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", list(ZERO_SIZED))
def test_sdpa_zero_sized_equals_torch(case, backend_name):
    shapes, options = ZERO_SIZED[case]
    if backend_name == "jax":
        with jax_float64():
            got, ref = _sdpa_case(backend_name, shapes, **options)
    else:
        got, ref = _sdpa_case(backend_name, shapes, **options)
    for name, want in ref.items():
        assert got[name].shape == want.shape, name
        assert np.isfinite(got[name]).all(), name
        np.testing.assert_allclose(got[name], want, rtol=0, atol=TOL, err_msg=name)
    if not options:  # uniform weights: every query reads the mean of the values
        rng = np.random.default_rng(0)  # the draws of _sdpa_case
        v = [rng.standard_normal(s) for s in shapes.values()][2]
        np.testing.assert_allclose(got["output"], np.broadcast_to(v.mean(-2, keepdims=True),
                                                                  (2, 4, 3)), atol=TOL)


def test_sdpa_gqa_zero_key_heads_is_a_named_shape_error():
    with pytest.raises(ShapeError, match=r"heads of 'key' / 'value' \(0, axis -3\) must divide"):
        ml.compile(ml.ScaledDotProduct(enable_gqa=True), ml.NumpyBackend(dtype="float64"),
                   shapes={"query": [2, 4, 3, 2], "key": [2, 0, 5, 2], "value": [2, 0, 5, 3]})


@pytest.mark.parametrize("block", [lambda: ml.MultiHeadAttention(1),
                                   lambda: AttentionWeights(1)])
def test_attention_zero_embed_dim_is_a_named_shape_error(block):
    model = ml.Model()
    model |= block()(query="x", key="x", **({} if isinstance(block(), AttentionWeights)
                                             else {"value": "x"}), output="output")
    with pytest.raises(ShapeError, match=r"'query' must have embed_dim > 0 .*\[2, 3, 0\]"):
        ml.compile(model, ml.NumpyBackend(dtype="float64"), shapes={"x": [2, 3, 0]})
    with pytest.raises(ValueError, match="embed_dim"):  # torch refuses it too
        torch.nn.MultiheadAttention(0, 1)


def _run(factory, shapes, ref, backend_name):
    """Our output and the gradient of every parameter and input of ``factory()`` (inputs
    ``shapes``, all trainable), and torch's of ``ref(tensors)``; float64."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(factory(), backend, shapes=shapes, trainable_keys=list(shapes))
    rng = np.random.default_rng(1)
    arrays = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in arrays.items()}, {},
                                   output_gradients={"output": backend.array(cot)})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    want = ref(t)
    want_grads = torch.autograd.grad(want, list(t.values()), torch.tensor(cot))
    got = {"output": to_np(backend, out["output"]),
           **{k: to_np(backend, grads[k]) for k in t}}
    return got, {"output": want.detach().numpy(), **{k: g.numpy() for k, g in zip(t, want_grads)}}


def _assert_equal_torch(factory, shapes, ref, backend_name):
    if backend_name == "jax":
        with jax_float64():
            got, want = _run(factory, shapes, ref, backend_name)
    else:
        got, want = _run(factory, shapes, ref, backend_name)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        np.testing.assert_allclose(got[name], w, rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("shape", [(2, 0, 6), (0, 6)])
def test_positional_embedding_empty_sequence_equals_torch(shape, backend_name):
    """L = 0: the NumPy VJP's reshape(-1, 0, 6) of the empty cotangent raised."""
    _assert_equal_torch(lambda: ml.PositionalEmbedding(7, 6), {"input": shape},
                        lambda t: t["input"] + t["positional_embedding.weight"][:0],
                        backend_name)


@pytest.mark.parametrize("backend_name", ["numpy", "jax"])
@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_half_precision_rounds_once(average, backend_name):
    """AttentionWeights in float16 over 4096 keys computes its projections and softmax in
    float32 and rounds once, as MultiHeadAttention (the half-precision rule): within one ulp
    of torch's float64 need_weights=True weights of the same float16 numbers (was ~11 ulps,
    the projections and exponentials rounded to float16 on NumPy / JAX)."""
    e, heads, n_query, n_key = 16, 2, 8, 4096
    rng = np.random.default_rng(0)
    half = {"query": (2, n_query, e), "key": (2, n_key, e),
            "attention_weights.in_proj_weight": (3 * e, e),
            "attention_weights.in_proj_bias": (3 * e,)}
    arrays = {k: (rng.standard_normal(s) * (0.3 if "." in k else 1.0)).astype(np.float16)
              for k, s in half.items()}
    model = ml.Model()
    model |= AttentionWeights(heads, average)(query="query", key="key", output="output")
    backend = BACKENDS[backend_name](dtype="float16")
    compiled = ml.compile(model, backend, shapes={"query": half["query"], "key": half["key"]})
    params = {k: backend.array(v) for k, v in arrays.items() if "." in k}
    out = compiled.evaluate(params, {k: backend.array(arrays[k]) for k in ("query", "key")})
    got = np.asarray(out["output"]).astype(np.float64)

    mha = torch.nn.MultiheadAttention(e, heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.tensor(arrays["attention_weights.in_proj_weight"]))
        mha.in_proj_bias.copy_(torch.tensor(arrays["attention_weights.in_proj_bias"]))
        q, k = (torch.tensor(arrays[n].astype(np.float64)) for n in ("query", "key"))
        want = mha(q, k, k, need_weights=True, average_attn_weights=average)[1].numpy()
    ulp = np.spacing(np.abs(want.astype(np.float16))).astype(np.float64)
    assert got.shape == want.shape
    assert float((np.abs(got - want) / ulp).max()) <= 1.0


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("scale", [np.float32(0.75), np.int64(2), np.float16(0.5)])
def test_sdpa_numpy_scalar_scale_equals_torch(scale, backend_name):
    """``scale`` as a NumPy scalar (``np.float32``, ``np.int64``), which torch's
    ``F.scaled_dot_product_attention`` takes, was refused ('must be a number')."""
    shapes = {"query": (2, 4, 3), "key": (2, 5, 3), "value": (2, 5, 2)}
    _assert_equal_torch(lambda: ml.ScaledDotProduct(is_causal=True, scale=scale), shapes,
                        lambda t: F.scaled_dot_product_attention(
                            t["query"], t["key"], t["value"], is_causal=True, scale=scale),
                        backend_name)


@pytest.mark.parametrize("scale", [True, np.bool_(True), "0.5", np.array([0.5])])
def test_sdpa_scale_that_is_not_a_number_is_refused(scale):
    with pytest.raises(ValueError, match="scale must be a number or None"):
        ml.ScaledDotProduct(scale=scale)
