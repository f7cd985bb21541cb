"""The classical models and distance blocks (EncoderDistanceMatrix, MDS, PolynomialKernel,
CosineSimilarity, GaussProcessRegressionCore) at their edges, side by side with torch
autograd (and scikit-learn / NumPy closed forms) in float64 on NumPy, torch and JAX:

* the norm modifier's gradient at its peak n = 5 (EncoderDistanceMatrix and MDS): 0 on
  every backend as torch's |·| (JAX's abs gave 1 there);
* PolynomialKernel's robust line at a zero base (degree < 1): gradient 0 on every backend
  (JAX's abs gave the slope 1/c ≈ 4.5e307);
* CosineSimilarity of two numbers (0-d, dim 0), as F.cosine_similarity (JAX raised);
* GPRLoss / GaussProcessRegressionCore with an indefinite K: refused by name on NumPy and
  torch as torch's Cholesky and scikit-learn refuse it, a NaN loss on JAX (a finite loss
  of log |det K| before);
* a NaN difference in PairwiseDistance, TripletMarginLoss, EncoderDistanceMatrix and
  PolynomialKernel: a NaN distance as torch's (NumPy and JAX read it as 0: the masks tested
  > 0), and PairwiseDistance(p=0) counting an inf difference as 1 (0·inf gave NaN).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import InputValueError

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
TOL = 1e-10


def _run(block: Any, ins: dict[str, np.ndarray], cots: dict[str, np.ndarray],
         backend_name: str) -> tuple[dict, dict]:
    """Outputs and the gradients of every input on ``backend_name`` (float64)."""
    def go() -> tuple[dict, dict]:
        be = BACKENDS[backend_name](dtype="float64")
        m = ml.Model()
        m |= block(**{k: k for k in ins}, **{o: o for o in cots})
        c = ml.compile(m, be, shapes={k: list(v.shape) for k, v in ins.items()},
                       trainable_keys=set(ins))
        out, grads = c.evaluate({k: be.array(v) for k, v in ins.items()}, {},
                                output_gradients={o: be.array(v) for o, v in cots.items()})[:2]
        host = lambda a: np.asarray(be.to_numpy(a))  # noqa: E731
        return {o: host(out[o]) for o in cots}, {k: host(g) for k, g in grads.items()}
    if backend_name == "jax":
        with jax_float64():
            return go()
    return go()


def _torch(fn: Any, ins: dict[str, np.ndarray], cots: dict[str, np.ndarray]) -> tuple[dict, dict]:
    t = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    y = fn(t)
    g = torch.autograd.grad([y[o] for o in cots], list(t.values()),
                            [torch.tensor(v) for v in cots.values()], allow_unused=True)
    return ({o: y[o].detach().numpy() for o in cots},
            {k: np.zeros_like(ins[k]) if gg is None else gg.numpy() for k, gg in zip(t, g)})


def _assert_close(got: dict, want: dict, what: str) -> None:
    for k, w in want.items():
        assert got[k].shape == w.shape, (what, k, got[k].shape, w.shape)
        assert np.isfinite(got[k]).all(), (what, k, got[k])
        err = np.abs(got[k] - w).max(initial=0.0) / max(1.0, np.abs(w).max(initial=0.0))
        assert err <= TOL, (what, k, err, got[k], w)


def _safe_pow(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """a^e for a >= 0, 0 with gradient 0 at a = 0 (the blocks' convention there)."""
    pos = a > 0
    return torch.where(pos, torch.where(pos, a, torch.ones_like(a)) ** e, torch.zeros_like(a))


def _order(n: torch.Tensor) -> torch.Tensor:
    return 4.0 * (1.0 - 2.0 * torch.abs(((n - 1.0) % 8) / 8 - 0.5)) + 1.0


_RNG = np.random.default_rng(66)


# -- the norm modifier's peak: n = 5 (p = 5) -------------------------------------------------
def _edm_ref(t: dict) -> dict:
    p = _order(t["norm"].reshape(()))
    a = t["input1"][:, None] - t["input2"][None]
    d = _safe_pow(a * torch.sign(a), p).sum(-1)
    return {"output": _safe_pow(d, 1 / p)}


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("norm", [5.0, -3.0, 2.7])
def test_encoder_distance_matrix_norm_gradient_at_the_peak(backend_name: str, norm: float) -> None:
    x, y = _RNG.standard_normal((4, 3)), _RNG.standard_normal((5, 3))
    x[1] = y[2]  # a zero distance too: gradient 0 there, as torch.cdist's
    ins = {"input1": x, "input2": y, "norm": np.array([norm])}
    cots = {"output": _RNG.standard_normal((4, 5))}
    out, grads = _run(ml.EncoderDistanceMatrix(), ins, cots, backend_name)
    want_out, want_grads = _torch(_edm_ref, ins, cots)
    _assert_close(out, want_out, backend_name)
    _assert_close(grads, want_grads, backend_name)
    if norm == 5.0:  # p = 5 is torch.cdist(p=5); the peak's gradient in norm is 0
        cd = torch.cdist(torch.tensor(x), torch.tensor(y), p=5.0).numpy()
        np.testing.assert_allclose(out["output"], cd, rtol=1e-12, atol=1e-12)
        assert grads["norm"][0] == 0.0


def _mds_ref(t: dict) -> dict:
    p = _order(t["norm"].reshape(()))
    c = t["coords"]
    a = c[:, None] - c[None]
    pd = _safe_pow(a * torch.sign(a), p).sum(-1)
    d = t["input"]
    stress = (_safe_pow(torch.abs(d - _safe_pow(pd, 1 / p)), p).sum() / (d ** p).sum()) ** (1 / p)
    return {"output": stress.reshape(1)}


@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_mds_norm_gradient_at_the_peak(backend_name: str) -> None:
    ins = {"coords": _RNG.standard_normal((4, 2)), "norm": np.array([5.0]),
           "input": np.abs(_RNG.standard_normal((4, 4))) + 0.1}
    cots = {"output": np.array([1.3])}
    out, grads = _run(ml.MDS(2), ins, cots, backend_name)
    want_out, want_grads = _torch(_mds_ref, ins, cots)
    _assert_close(out, want_out, backend_name)
    _assert_close(grads, want_grads, backend_name)


# -- PolynomialKernel: a zero base in the robust line -----------------------------------------
def _poly_ref(t: dict) -> dict:
    b = t["input1"] @ t["input2"].T + t["poly_coef"].reshape(())
    return {"output": _safe_pow(b * torch.sign(b), t["degree"].reshape(()))}


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("degree", [0.0, 0.5, 2.0])
def test_polynomial_kernel_zero_base_gradient(backend_name: str, degree: float) -> None:
    ins = {"input1": np.array([[1.0, 0.0], [0.0, 1.0]]), "input2": np.array([[1.0, 0.0], [-2.0, 0.0]]),
           "poly_coef": np.array([0.0]), "degree": np.array([degree])}
    cots = {"output": np.array([[0.7, -1.1], [0.4, 1.9]])}
    out, grads = _run(ml.PolynomialKernel(), ins, cots, backend_name)
    want_out, want_grads = _torch(_poly_ref, ins, cots)
    _assert_close(out, want_out, backend_name)
    _assert_close(grads, want_grads, backend_name)


# -- CosineSimilarity of two numbers -----------------------------------------------------------
@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("pair", [(2.0, -3.0), (0.0, 3.0), (1e-9, 4.0)])
def test_cosine_similarity_of_two_numbers(backend_name: str, dim: int, pair: tuple) -> None:
    ins = {"input1": np.array(pair[0]), "input2": np.array(pair[1])}
    cots = {"output": np.array(0.8)}
    out, grads = _run(ml.CosineSimilarity(dim), ins, cots, backend_name)
    want_out, want_grads = _torch(
        lambda t: {"output": F.cosine_similarity(t["input1"], t["input2"], dim)}, ins, cots)
    _assert_close(out, want_out, backend_name)
    _assert_close(grads, want_grads, backend_name)


# -- Gaussian-process regression: K must be positive definite ---------------------------------
def _gp_data(k: np.ndarray, s: float) -> dict[str, np.ndarray]:
    n = k.shape[0]
    return {"k": k, "s": np.array([s]), "label": np.linspace(-1, 1, n)[:, None],
            "mu": np.zeros((n, 1)), "k_star": k.copy()}


def _gp_compiled(backend: Any, n: int) -> Any:
    return ml.compile(ml.GaussProcessRegressionCore(), backend,
                      shapes={"k": [n, n], "label": [n, 1], "mu": [n, 1], "s": [1],
                              "k_star": [n, n]})


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("k", [np.diag([1.0, -1.0, -1.0]), np.diag([1.0, 1.0, -1.0]),
                               np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])])
def test_gp_indefinite_kernel_refused(backend_name: str, k: np.ndarray) -> None:
    # torch's Cholesky (the published loss's) and scikit-learn refuse such a K
    with pytest.raises(RuntimeError, match="positive"):
        torch.linalg.cholesky(torch.tensor(k))
    be = BACKENDS[backend_name](dtype="float64")
    gp = _gp_compiled(be, 3)
    data = {key: be.array(v) for key, v in _gp_data(k, 0.0).items()}
    with pytest.raises(InputValueError, match="GPRLoss: .*'K_term'.*positive definite"):
        gp.evaluate({}, data)
    # a negative noise s turning a positive definite k indefinite: the same
    data = {key: be.array(v) for key, v in _gp_data(np.eye(3), -2.0).items()}
    with pytest.raises(InputValueError, match="'K_term'"):
        gp.evaluate({}, data)


def test_gp_indefinite_kernel_jax_nan() -> None:
    with jax_float64():
        be = JaxBackend(dtype="float64")
        gp = _gp_compiled(be, 3)
        out = gp.evaluate({}, {key: be.array(v) for key, v in
                               _gp_data(np.diag([1.0, -1.0, -1.0]), 0.0).items()})
        assert np.isnan(np.asarray(out["loss"])).all()


def _gp_ref(t: dict) -> dict:
    k, s = t["k"], t["s"].reshape(())
    n = k.shape[0]
    chol = torch.linalg.cholesky(0.5 * (k + k.T) + s * torch.eye(n, dtype=k.dtype))
    d = t["label"] - t["mu"]
    alpha = torch.cholesky_solve(d, chol)
    loss = 0.5 * (d * alpha).sum() + torch.log(torch.diagonal(chol)).sum() \
        + n / 2 * np.log(2 * np.pi)
    v = torch.cholesky_solve(k, chol)
    return {"loss": loss.reshape(1), "predictions": t["mu"] + k.T @ alpha,
            "confidence": s + torch.abs(torch.diagonal(t["k_star"] - k.T @ v))[:, None]}


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("n", [1, 5])
def test_gp_positive_definite_equals_torch_cholesky(backend_name: str, n: int) -> None:
    x = _RNG.standard_normal((n, 2))
    k = np.exp(-0.5 * ((x[:, None] - x[None]) ** 2).sum(-1))
    ins = {"k": k, "s": np.array([0.3]), "label": _RNG.standard_normal((n, 1)),
           "mu": _RNG.standard_normal((n, 1)), "k_star": k + 0.1 * _RNG.standard_normal((n, n))}
    cots = {"loss": np.array([1.2]), "predictions": _RNG.standard_normal((n, 1)),
            "confidence": _RNG.standard_normal((n, 1))}

    def block(**kw: str) -> Any:
        return ml.GaussProcessRegressionCore()(**kw)

    out, grads = _run(block, ins, cots, backend_name)
    want_out, want_grads = _torch(_gp_ref, ins, cots)
    _assert_close(out, want_out, backend_name)
    _assert_close(grads, want_grads, backend_name)


def test_gp_loss_equals_scikit_learn() -> None:
    sk_gp = pytest.importorskip("sklearn.gaussian_process")
    x, y = _RNG.standard_normal((6, 2)), _RNG.standard_normal(6)
    kernel = sk_gp.kernels.RBF(1.0)
    gpr = sk_gp.GaussianProcessRegressor(kernel, alpha=0.1, optimizer=None).fit(x, y)
    k = kernel(x)
    be = NumpyBackend(dtype="float64")
    out = _gp_compiled(be, 6).evaluate({}, {"k": k, "label": y[:, None], "mu": np.zeros((6, 1)),
                                            "s": np.array([0.1]), "k_star": k})
    np.testing.assert_allclose(out["loss"], [-gpr.log_marginal_likelihood_value_], rtol=1e-12)
    np.testing.assert_allclose(out["predictions"][:, 0], gpr.predict(x), atol=1e-12)


# -- a NaN or inf difference: distances as torch's (NaN was read as a zero difference) --------
_NAN_X = np.array([[1.0, np.inf, 0.0], [np.nan, 1.0, 2.0], [1.0, 2.0, 3.0]])
_NAN_Y = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [1.0, -np.inf, 3.0]])


def _values(block: Any, ins: dict[str, np.ndarray], backend_name: str) -> np.ndarray:
    def go() -> np.ndarray:
        be = BACKENDS[backend_name](dtype="float64")
        m = ml.Model()
        m |= block(**{k: k for k in ins}, output="output")
        c = ml.compile(m, be, shapes={k: list(v.shape) for k, v in ins.items()})
        return np.asarray(be.to_numpy(c.evaluate({}, {k: be.array(v) for k, v in ins.items()})["output"]))
    if backend_name == "jax":
        with jax_float64():
            return go()
    return go()


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 2.0, 3.0, float("inf")])
def test_pairwise_distance_nan_and_inf(backend_name: str, p: float) -> None:
    ins = {"input1": _NAN_X, "input2": _NAN_Y}
    got = _values(ml.PairwiseDistance(p=p, eps=0.0), ins, backend_name)
    want = F.pairwise_distance(torch.tensor(_NAN_X), torch.tensor(_NAN_Y), p, 0.0).numpy()
    np.testing.assert_array_equal(got, want)  # p = 0: [1, 1, 1]; else [inf, nan, inf]


@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_triplet_margin_loss_nan(backend_name: str) -> None:
    ins = {"anchor": _NAN_X[1:], "positive": _NAN_Y[1:], "negative": np.zeros((2, 3))}
    got = _values(ml.TripletMarginLoss(reduction="none"), ins, backend_name)
    want = F.triplet_margin_loss(*(torch.tensor(v) for v in ins.values()), reduction="none").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)  # NaN first, as torch
    assert np.isnan(got[0])


_X_NAN = np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 2.0]])
_Y = np.array([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("backend_name", list(BACKENDS))
def test_distance_matrix_and_polynomial_kernel_nan(backend_name: str) -> None:
    x, y = torch.tensor(_X_NAN), torch.tensor(_Y)
    cases = [(ml.EncoderDistanceMatrix(), {"norm": np.array([2.0])}, torch.cdist(x, y)),
             (ml.EncoderDistanceMatrix(get_final_distance=False), {"norm": np.array([3.0])},
              torch.cdist(x, y, 3.0) ** 3),
             (ml.PolynomialKernel(), {"poly_coef": np.array([1.0]), "degree": np.array([2.5])},
              torch.abs(x @ y.T + 1) ** 2.5)]
    for block, extra, want in cases:
        got = _values(block, {"input1": _X_NAN, "input2": _Y, **extra}, backend_name)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, err_msg=repr(block))
        assert np.isnan(got[0]).all()


# -- a constant prior mean (or label) of shape (1, 1), broadcast against the N points ---------
@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("which", ["mu", "label"])
def test_gp_broadcast_mean_or_label(backend_name: str, which: str) -> None:
    # NumPy's gradient for a (1, 1) mu was (N, 1); a (1, 1) label made the loss's
    # (N/2)·log 2π read N = 1 on every backend
    n = 4
    x = _RNG.standard_normal((n, 2))
    k = np.exp(-0.5 * ((x[:, None] - x[None]) ** 2).sum(-1))
    ins = {"k": k, "s": np.array([0.3]), "label": _RNG.standard_normal((n, 1)),
           "mu": _RNG.standard_normal((n, 1)), "k_star": k.copy()}
    ins[which] = np.array([[0.7]])
    cots = {"loss": np.array([1.2]), "predictions": _RNG.standard_normal((n, 1)),
            "confidence": _RNG.standard_normal((n, 1))}

    def block(**kw: str) -> Any:
        return ml.GaussProcessRegressionCore()(**kw)

    out, grads = _run(block, ins, cots, backend_name)
    want_out, want_grads = _torch(_gp_ref, ins, cots)
    _assert_close(out, want_out, backend_name)
    _assert_close(grads, want_grads, backend_name)


def test_cosine_similarity_negative_eps_refused() -> None:
    # torch refuses it ('eps must be non-negative'); here a zero vector gave 0/0 = NaN
    with pytest.raises(RuntimeError, match="eps must be non-negative"):
        F.cosine_similarity(torch.ones(2, 3), torch.zeros(2, 3), eps=-1.0)
    with pytest.raises(ValueError, match="CosineSimilarity: eps must be a finite number >= 0"):
        ml.CosineSimilarity(eps=-1.0)
    assert ml.CosineSimilarity(eps=0).eps == 0.0  # (0 is torch's too)
