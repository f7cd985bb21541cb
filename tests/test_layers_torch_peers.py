"""Network layers side by side with torch at their edges, forward values and gradients, on
NumPy, torch and JAX (float32 and float64; JAX float32 in process, its x64 being
process-wide): cases the per-layer test files do not reach.

1. Max pooling whose dilated windows read padding only (kernel 2, dilation 3, padding 1 over
   an input of 2): torch gives −inf there, and its backward writes the cotangent through a
   garbage index (out of bounds: a heap corruption), so the reference pads with −inf
   explicitly, where the maximum is a padding element whose gradient the pad drops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, to_np

import mithril as ml

DTYPES = {"float32": 1e-5, "float64": 1e-12}
CASES = [(bk, dt) for bk in BACKENDS for dt in DTYPES if not (bk == "jax" and dt == "float64")]


def _evaluate(block, backend, inputs: dict, cots: dict, params: dict | None = None,
              data: dict | None = None) -> tuple[dict, dict]:
    """Outputs and gradients (float64 NumPy) of ``block`` with ``inputs`` trainable."""
    shapes = {k: v.shape for k, v in {**inputs, **(data or {})}.items()}
    c = ml.compile(block, backend, shapes=shapes, trainable_keys=list(inputs))
    p = {k: backend.array(v) for k, v in {**(params or {}), **inputs}.items()}
    d = {k: backend.array(v) for k, v in (data or {}).items()}
    out, grads = c.evaluate(p, d, output_gradients={k: backend.array(v) for k, v in cots.items()})
    return {k: to_np(backend, v) for k, v in out.items()}, {k: to_np(backend, v) for k, v in grads.items()}


# -- 1. max pooling: windows of padding only ---------------------------------------------------
@pytest.mark.parametrize("backend_name, dtype", CASES)
@pytest.mark.parametrize("nd, stride", [(1, 2), (2, 2), (2, 1)])
def test_max_pool_windows_of_padding_only_are_minus_inf_without_gradient(backend_name, dtype, nd,
                                                                         stride):
    backend = BACKENDS[backend_name](dtype=dtype)
    shape = (3, 5, 2) if nd == 1 else (3, 5, 2, 5)
    rng = np.random.default_rng(nd * 10 + stride)
    x = rng.standard_normal(shape).astype(dtype)
    block = (ml.MaxPool1D if nd == 1 else ml.MaxPool2D)(2, stride=stride, padding=1, dilation=3)
    model = ml.Model()
    model |= block(input="input", output="output")
    tx = torch.tensor(x, requires_grad=True)
    pool = F.max_pool1d if nd == 1 else F.max_pool2d
    want = pool(F.pad(tx, [1] * 2 * nd, value=-np.inf), 2, stride, 0, 3)
    cot = rng.standard_normal(tuple(want.shape)).astype(dtype)
    (want_g,) = torch.autograd.grad(want, tx, torch.tensor(cot))
    assert np.isneginf(want.detach().numpy()).any()  # the case is the one described
    out, grads = _evaluate(model, backend, {"input": x}, {"output": cot})
    # (assert_allclose: equal infinities agree)
    np.testing.assert_allclose(out["output"], want.detach().double().numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(grads["input"], want_g.double().numpy(), rtol=0, atol=0)
