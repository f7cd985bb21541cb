"""``Log``, ``Sqrt`` and ``Power`` with ``robust=True``: the published Mithril's robust forms.

With c the threshold (default: the dtype's smallest normal number), x the input, b the
base and e the exponent:

    Log:    log(c) + |x|/c − 1   where |x| < c,                          log|x| elsewhere
    Sqrt:   |x|/√c               where |x| < c,                          √|x| elsewhere
    Power:  |b|/c                where |b| < c and e < 1 − log c / log|b|, |b|^e elsewhere

Gradients are those of the branch taken, |x| having gradient 0 at 0 (torch's). Checked:

1. outputs and gradients on NumPy, torch and JAX (a subprocess: x64 is process-wide), float64,
   against the formula written directly in torch and differentiated by torch's autograd, at
   1e-12 (relative and absolute);
2. the NumPy VJPs against central finite differences, away from the branch boundaries;
3. the default (``robust=False``) unchanged: torch's log, sqrt and pow, NaN for a negative
   input, the same repr.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import jax_float64

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

TOL = 1e-12
TINY = float(np.finfo(np.float64).tiny)


def _t_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs()  # gradient sign(x): 0 at 0


def t_log(c: float) -> Callable:
    def f(t):
        a = _t_abs(t["input"])
        below = a < c
        return torch.where(below, math.log(c) + torch.where(below, a, 0.0) / c - 1,
                           torch.log(torch.where(below, 1.0, a)))
    return f


def t_sqrt(c: float) -> Callable:
    def f(t):
        a = _t_abs(t["input"])
        below = a < c
        return torch.where(below, torch.where(below, a, 0.0) / math.sqrt(c),
                           torch.sqrt(torch.where(below, 1.0, a)))
    return f


def t_power(c: float, exponent: float | None = None) -> Callable:
    def f(t):
        a = _t_abs(t["base"])
        e = t["exponent"] if exponent is None else torch.tensor(exponent, dtype=a.dtype)
        lin = (e < 1 - math.log(c) / torch.log(a.detach())) & (a < c)
        return torch.where(lin, torch.where(lin, a, 0.0) / c, a ** torch.where(lin, 1.0, e))
    return f


def _x(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


# zero, below and above the threshold, both signs
X_HALF = _x([[-2.0, -0.3, 0.0, 0.2], [0.7, 3.0, -1e-3, 1.5]])
X_TINY = _x([[0.0, -3.0, 1e-300, 5.0], [-1e-300, 2e-307, 0.25, -7.0]])
#: |b| below 0.5 on both sides of e = 1 − log 0.5 / log|b| (0.5 at |b| = 0.25, 0.699 at 0.1)
BASES = _x([[-0.25, 0.1, 0.0, 0.4, 2.0, -1.5]])
EXPS = _x([[0.2], [0.9], [2.0]])

# name: (block factory, inputs, torch reference of the formula)
CASES: dict[str, tuple[Callable, dict, Callable]] = {
    "log_threshold": (lambda: ml.Log(robust=True, threshold=0.5), {"input": X_HALF}, t_log(0.5)),
    "log_default": (lambda: ml.Log(robust=True), {"input": X_TINY}, t_log(TINY)),
    "sqrt_threshold": (lambda: ml.Sqrt(robust=True, threshold=0.5), {"input": X_HALF}, t_sqrt(0.5)),
    "sqrt_default": (lambda: ml.Sqrt(robust=True), {"input": X_TINY}, t_sqrt(TINY)),
    "power_threshold": (lambda: ml.Power(robust=True, threshold=0.5),
                        {"base": BASES, "exponent": EXPS}, t_power(0.5)),
    "power_default": (lambda: ml.Power(robust=True),
                      {"base": _x([0.0, 2.0, -3.0, 0.5, 0.0, 1e-300]),
                       "exponent": _x([0.5, 2.0, 3.0, -1.0, 2.0, 0.5])}, t_power(TINY)),
    "power_fixed_exponent": (lambda: ml.Power(exponent=0.3, robust=True, threshold=0.5),
                             {"base": _x([[-0.25, 0.1, 0.0], [0.4, 2.0, -1.5]])}, t_power(0.5, 0.3)),
}


def _cotangent(shape) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(shape)


def reference(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The formula in torch, float64: output and autograd gradients of Σ output·cotangent."""
    _, inputs, f = CASES[name]
    t = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    out = f(t)
    (out * torch.tensor(_cotangent(tuple(out.shape)))).sum().backward()
    return out.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


def run_case(backend, name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    factory, inputs, _ = CASES[name]
    c = ml.compile(factory(), backend, shapes={k: v.shape for k, v in inputs.items()},
                   trainable_keys=list(inputs))
    out, grads = c.evaluate({k: backend.array(v) for k, v in inputs.items()}, {},
                            output_gradients={"output": backend.array(_cotangent(c.shapes["output"]))})
    return (np.asarray(backend.to_numpy(out["output"]), np.float64),
            {k: np.asarray(backend.to_numpy(v), np.float64) for k, v in grads.items()})


def _assert_close(got, want) -> None:
    np.testing.assert_allclose(got[0], want[0], rtol=TOL, atol=TOL, err_msg="output")
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=TOL, atol=TOL, err_msg=k)


def test_the_cases_take_both_branches():
    """Each threshold case has entries on the linear branch and on the other one."""
    _, inputs, _ = CASES["power_threshold"]
    a, e = np.abs(inputs["base"]), inputs["exponent"]
    with np.errstate(divide="ignore"):
        lin = (e < 1 - math.log(0.5) / np.log(a)) & (a < 0.5)
    assert 0 < lin.sum() < lin.size and (lin & (a > 0)).any() and (~lin & (a < 0.5) & (a > 0)).any()
    assert ((np.abs(X_HALF) < 0.5) & (X_HALF != 0)).any() and (np.abs(X_HALF) > 0.5).any()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend], ids=["numpy", "torch"])
def test_robust_matches_the_torch_formula(backend_cls, name):
    _assert_close(run_case(backend_cls(dtype="float64"), name), reference(name))


@pytest.fixture(scope="module")
def jax_results():
    res = {}
    with jax_float64():  # (x64 for the block only)
        b = JaxBackend(dtype="float64")
        for name in CASES:
            o, g = run_case(b, name)
            res[name] = [np.asarray(o).tolist(), {k: np.asarray(v).tolist() for k, v in g.items()}]
    return res


@pytest.mark.parametrize("name", list(CASES))
def test_robust_matches_the_torch_formula_on_jax(jax_results, name):
    o, g = jax_results[name]
    _assert_close((np.asarray(o), {k: np.asarray(v) for k, v in g.items()}), reference(name))


# away from 0 and from the branch boundaries (|x| = 0.5; e = 1 − log 0.5 / log|b|)
FD_CASES = {
    "log": (lambda: ml.Log(robust=True, threshold=0.5), {"input": _x([[-2.0, -0.3, 0.2], [0.7, 0.05, -0.45]])}),
    "sqrt": (lambda: ml.Sqrt(robust=True, threshold=0.5), {"input": _x([[-2.0, -0.3, 0.2], [0.7, 0.05, -0.45]])}),
    "power": (lambda: ml.Power(robust=True, threshold=0.5),
              {"base": _x([[-0.25, 0.1, 0.4, 2.0, -1.5]]), "exponent": _x([[0.2], [0.9], [2.0]])}),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_numpy_vjp_against_finite_differences(name):
    factory, inputs = FD_CASES[name]
    b = NumpyBackend(dtype="float64")
    c = ml.compile(factory(), b, shapes={k: v.shape for k, v in inputs.items()}, trainable_keys=list(inputs))
    cot = _cotangent(c.shapes["output"])

    def loss(p):
        return float(np.sum(c.evaluate(p, {})["output"] * cot))

    _, grads = c.evaluate(dict(inputs), {}, output_gradients={"output": cot})
    eps = 1e-6
    for k, v in inputs.items():
        fd = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            plus, minus = v.copy(), v.copy()
            plus[i] += eps
            minus[i] -= eps
            fd[i] = (loss({**inputs, k: plus}) - loss({**inputs, k: minus})) / (2 * eps)
        np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-7, err_msg=k)


TORCH_DEFAULT = {"Log": lambda t: t["input"].log(), "Sqrt": lambda t: t["input"].sqrt(),
                 "Power": lambda t: torch.pow(t["base"], t["exponent"])}


@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend], ids=["numpy", "torch"])
def test_default_is_unchanged(backend_cls):
    """``robust=False`` (the default): torch's log, sqrt and pow, NaN for a negative input."""
    b = backend_cls(dtype="float64")
    x = _x([[0.3, 2.0, 5.0], [1.5, 0.7, 9.0]])
    e = _x([[1.5, -0.5, 2.0], [0.0, 3.0, 0.5]])
    for block, refs in ((ml.Log(), {"input": x}), (ml.Log(robust=False), {"input": x}),
                        (ml.Sqrt(), {"input": x}), (ml.Power(), {"base": x, "exponent": e})):
        c = ml.compile(block, b, shapes={k: v.shape for k, v in refs.items()}, trainable_keys=list(refs))
        out, g = c.evaluate({k: b.array(v) for k, v in refs.items()}, {},
                            output_gradients={"output": b.ones(2, 3)})
        t = {k: torch.tensor(v, requires_grad=True) for k, v in refs.items()}
        want = TORCH_DEFAULT[type(block).__name__](t)
        want.sum().backward()
        np.testing.assert_allclose(b.to_numpy(out["output"]), want.detach().numpy(), rtol=TOL, atol=0)
        for k in refs:
            np.testing.assert_allclose(b.to_numpy(g[k]), t[k].grad.numpy(), rtol=TOL, atol=0)
    for block in (ml.Log(), ml.Sqrt()):
        c = ml.compile(block, b, shapes={"input": [2]})
        with np.errstate(invalid="ignore"):
            assert np.isnan(b.to_numpy(c.evaluate({}, {"input": b.array(_x([-1.0, -4.0]))})["output"])).all()
    assert [repr(m) for m in (ml.Log(), ml.Sqrt(), ml.Power(), ml.Power(exponent=2.0))] == \
        ["Log()", "Sqrt()", "Power()", "Power(exponent=2.0)"]
    assert repr(ml.Power(robust=True, threshold=0.5)) == "Power(robust=True, threshold=0.5)"


@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend], ids=["numpy", "torch"])
def test_float32_default_threshold(backend_cls):
    """In float32 the default threshold is float32's smallest normal number (1.1755e-38)."""
    b = backend_cls(dtype="float32")
    c32 = float(np.finfo(np.float32).tiny)
    c = ml.compile(ml.Log(robust=True), b, shapes={"input": [2]}, trainable_keys=["input"])
    out, g = c.evaluate({"input": b.array(np.array([0.0, 2.0], np.float32))}, {},
                        output_gradients={"output": b.ones(2)})
    np.testing.assert_allclose(b.to_numpy(out["output"]), [math.log(c32) - 1, math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(b.to_numpy(g["input"]), [0.0, 0.5], rtol=1e-6)


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="robust must be a bool"):
        ml.Log(robust=1)
    with pytest.raises(ValueError, match="threshold is read only with robust=True"):
        ml.Sqrt(threshold=0.5)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold must be a positive finite number"):
            ml.Power(robust=True, threshold=bad)
