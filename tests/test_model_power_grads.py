"""``Power``'s gradients are torch's on every backend, also at base 0 (where NumPy's VJP and
JAX's autodiff gave NaN / -inf: 0·0⁻¹ for exponent 0, 0·log 0 for the exponent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Power

BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float32"), id="jax")]

BASE, EXP = np.meshgrid([0.0, 2.0, 0.5, -2.0], [0.0, 2.0, 0.5, -1.0, 3.0, 1.0])
BASE, EXP = BASE.ravel(), EXP.ravel()


def _torch(base: np.ndarray, exp: np.ndarray | float, g: np.ndarray) -> tuple:
    bt = torch.tensor(base, requires_grad=True)
    et = torch.tensor(exp, requires_grad=True) if isinstance(exp, np.ndarray) else exp
    out = bt ** et
    out.backward(torch.tensor(g))
    ge = et.grad.numpy() if isinstance(exp, np.ndarray) else None
    return out.detach().numpy(), bt.grad.numpy(), ge


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.filterwarnings("ignore:.*encountered in power:RuntimeWarning")  # NumPy's 0 ** -1
@pytest.mark.parametrize("make", BACKENDS)
def test_power_gradients_are_torch_s_at_base_zero(make):
    b = make()
    g = np.linspace(0.5, 1.5, BASE.size)
    c = ml.compile(Power(), b, shapes={"base": [BASE.size], "exponent": [EXP.size]},
                   trainable_keys=["base", "exponent"])
    out, grads = c.evaluate({"base": b.array(BASE), "exponent": b.array(EXP)}, {},
                            output_gradients={"output": b.array(g)})
    want, want_b, want_e = _torch(BASE, EXP, g)
    _close(b.to_numpy(out["output"]), want)
    _close(b.to_numpy(grads["base"]), want_b)
    _close(b.to_numpy(grads["exponent"]), want_e)
    zero = BASE == 0
    assert np.isfinite(b.to_numpy(grads["exponent"])[zero & (EXP >= 0)]).all()


@pytest.mark.parametrize("make", BACKENDS)
@pytest.mark.parametrize("exponent", [0.0, 2.0, 0.5, 3.0])
def test_fixed_exponent_gradient_is_torch_s(make, exponent):
    b = make()
    x = np.array([0.0, 1.5, 2.0, 0.25])
    g = np.array([1.0, -2.0, 0.5, 1.0])
    c = ml.compile(Power(exponent=exponent), b, shapes={"base": [4]}, trainable_keys=["base"])
    out, grads = c.evaluate({"base": b.array(x)}, {}, output_gradients={"output": b.array(g)})
    want, want_b, _ = _torch(x, exponent, g)
    _close(b.to_numpy(out["output"]), want)
    _close(b.to_numpy(grads["base"]), want_b)
