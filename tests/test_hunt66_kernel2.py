"""CosineSimilarity, RBFKernel and PairwiseDistance at the edges of float64, side by side
with torch autograd on NumPy, torch and JAX:

* CosineSimilarity of vectors near 1e200, whose norms overflow float64: the cosine and its
  gradient as torch's on the same vectors divided by 1e200 (Mithril gave NaN on NumPy and
  JAX and 0 on torch, which is what F.cosine_similarity itself gives there);
* RBFKernel with σ in (1e-162, 1e-154), σ² subnormal: the input gradients 0 as torch's
  (NaN on NumPy and JAX: 0·inf, and XLA flushing σ² to 0);
* PairwiseDistance with p < 0 and p = -inf, as F.pairwise_distance (Mithril refused them):
  a zero component gives distance 0 and gradient 0, -inf's ties split the gradient evenly;
* EncoderDistanceMatrix in float16 / bfloat16: computed in float32 and rounded once (D of
  p = 2 over 1024 features of 10 passed 65504: an inf distance of 320 on every backend),
  the robust line's cutoff c still the input dtype's smallest normal number.
"""

from __future__ import annotations

import warnings

import half_precision_cases as hp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_hunt66_kernel_models import _assert_close, _run, _torch

import mithril as ml


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_cosine_similarity_of_huge_vectors(backend_name: str) -> None:
    x1 = np.array([[3.0, 4.0], [1.0, -2.0], [-2.0, 1.0]])
    x2 = np.array([[4.0, 3.0], [0.5, 1.0], [1.0, 2.0]])
    cots = {"output": np.array([1.0, 0.5, -2.0])}
    big = 1e200
    # torch's own F.cosine_similarity overflows there (0 for 0.96): the reference takes the
    # scaled vectors, whose cosine is the same and whose gradient is 1e200 times larger
    assert F.cosine_similarity(torch.tensor(x1 * big), torch.tensor(x2 * big))[0] == 0.0
    want, wgrad = _torch(lambda t: {"output": F.cosine_similarity(t["input1"], t["input2"])},
                         {"input1": x1, "input2": x2}, cots)
    assert np.allclose(want["output"], [0.96, -0.6, 0.0])
    out, grads = _run(ml.CosineSimilarity(), {"input1": x1 * big, "input2": x2 * big}, cots,
                      backend_name)
    _assert_close(out, want, backend_name)
    _assert_close({k: g * big for k, g in grads.items()}, wgrad, backend_name)
    # and at ordinary sizes, eps clamping a small norm, as torch's
    small = {"input1": np.array([[3e-9, 4e-9], [1.0, 2.0]]), "input2": np.array([[1.0, 2.0],
                                                                                [2e-9, 0.0]])}
    cots = {"output": np.array([1.0, -0.5])}
    want, wgrad = _torch(lambda t: {"output": F.cosine_similarity(t["input1"], t["input2"])},
                         small, cots)
    out, grads = _run(ml.CosineSimilarity(), small, cots, backend_name)
    _assert_close(out, want, backend_name)
    _assert_close(grads, wgrad, backend_name)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("sigma", [1e-158, 1e-155])
def test_rbf_kernel_with_subnormal_sigma_squared(backend_name: str, sigma: float) -> None:
    rng = np.random.default_rng(0)
    ins = {"input1": rng.normal(size=(2, 3)), "input2": rng.normal(size=(3, 3)),
           "l_scale": np.array([1.5]), "sigma": np.array([sigma])}
    cots = {"output": rng.normal(size=(2, 3))}

    def rbf(t: dict) -> dict:
        d = t["input1"][:, None, :] - t["input2"][None]
        s = (d * d).sum(-1)
        return {"output": t["l_scale"][0] ** 2 * torch.exp(s * -0.5 / (t["sigma"][0] ** 2))}

    want, wgrad = _torch(rbf, ins, cots)
    assert np.isfinite(wgrad["input1"]).all()
    out, grads = _run(ml.RBFKernel(), ins, cots, backend_name)
    _assert_close(out, want, backend_name)
    # (σ's own gradient is torch's NaN there: 0·e/σ³ with σ³ = 0)
    _assert_close({k: grads[k] for k in ("input1", "input2", "l_scale")},
                  {k: wgrad[k] for k in ("input1", "input2", "l_scale")}, backend_name)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("p", [-1.0, -0.5, -2.5, -np.inf])
def test_pairwise_distance_negative_p(backend_name: str, p: float) -> None:
    # rows: plain, a zero component (distance 0, gradient 0), all zero, a tie of the
    # smallest |d| (p = -inf: the gradient split evenly), an inf component (|inf|^p = 0)
    x1 = np.array([[1.0, -2.0, 3.0], [0.0, 2.0, -1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 2.0],
                   [np.inf, 1.0, 2.0]])
    x2 = np.array([[0.5, 0.5, -0.5]])  # (broadcast against x1)
    x1 = x1 + x2
    ins = {"input1": x1, "input2": x2}
    cots = {"output": np.array([1.0, -2.0, 0.5, 1.5, 2.0])}
    want, wgrad = _torch(lambda t: {"output": F.pairwise_distance(t["input1"], t["input2"], p,
                                                                  0.0)}, ins, cots)
    assert want["output"][1] == want["output"][2] == 0.0
    out, grads = _run(ml.PairwiseDistance(p=p, eps=0.0), ins, cots, backend_name)
    _assert_close(out, want, backend_name)
    _assert_close(grads, wgrad, backend_name)


def _edm(t: dict, d: dict) -> torch.Tensor:
    """EncoderDistanceMatrix (robust, final distance) in torch, c float16's smallest normal."""
    n = t["norm"][0]
    p = 4.0 * (1.0 - 2.0 * torch.abs(((n - 1.0) % 8) / 8 - 0.5)) + 1.0
    dist = (torch.abs(t["input1"][:, None] - t["input2"][None]) ** p).sum(-1)
    c = float(np.finfo(np.float16).tiny)
    lin = (1 / p < 1 - np.log(c) / torch.log(dist)) & (dist < c)
    return torch.where(lin, dist / c, dist ** (1 / p))


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("name,scale,norm,features", [
    ("edm_big", 10.0, 2.0, 1024),  # (D ≈ 1e5 > 65504: inf before)
    ("edm_line", 0.05, 5.0, 2)])  # (D ≈ 1e-6: the robust line D/c, float16's c)
def test_encoder_distance_matrix_half(backend_name: str, name: str, scale: float, norm: float,
                                      features: int) -> None:
    dtype = "float16"
    case = hp.Case(lambda: ml.EncoderDistanceMatrix(),
                   {"input1": ((5, features), scale, 0.0), "input2": ((6, features), scale, 0.0),
                    "norm": ((1,), 0.0, norm)}, _edm)
    ins = hp.values(name, case, dtype)
    cot = np.random.default_rng(7).standard_normal((5, 6)).astype(np.float16).astype(np.float64)
    want, want_grads = hp.run_torch(case, ins, cot, torch.float64)
    assert np.isfinite(want).all()
    if name == "edm_line":
        assert (want < 1).all() and (want > 1e-3).any()  # (the line: D^(1/p) would be ~0.06)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, grads, dtypes = hp.run_mithril(case, ins, cot, backend_name, dtype)
    assert dtypes == {dtype}
    assert hp.ulps(y, want, dtype) <= 1, (y, want)
    for k, g in grads.items():
        assert hp.ulps(g, want_grads[k], dtype, at=np.abs(want_grads[k]).max()) <= 2, k
