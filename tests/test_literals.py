"""Literals in a user's optimizer math take the parameters' float in the numba kernels
(``engines/literals.py``), as they do on JAX, torch and NumPy 2: ``(1 - b1) * g`` of float32
values is float32, not float64."""

import inspect

import numba
import numpy as np

from mithril.utils.optimizers import Optimizer
from mithril.utils.optimizers.elementwise import sqrt
from mithril.utils.optimizers.engines import kernels
from mithril.utils.optimizers.engines.literals import typed_literals


def belief(p, g, m, s, lr, b1, b2, eps):
    """AdaBelief as a user writes it (docs/optimizers.md): ints and floats beside float32s."""
    m = b1 * m + (1 - b1) * g
    d = g - m
    s = b2 * s + (1 - b2) * d * d + 0.5 * eps
    return p - lr * m / (sqrt(s) + eps) + 0 * -2.0 * p ** 2, m, s


def _types(fn, dtype) -> list:
    jitted = numba.njit(fn)
    jitted(*[dtype(0.5)] * len(inspect.signature(fn).parameters))
    return list(jitted.nopython_signatures[0].return_type.types)


def test_literals_take_the_first_arguments_type_under_numba():
    assert _types(belief, np.float32) != [numba.float32] * 3  # numba's own rule: float64
    typed = typed_literals(belief)
    assert typed is not belief and typed is typed_literals(belief)  # one per math
    assert _types(typed, np.float32) == [numba.float32] * 3
    assert _types(typed, np.float64) == [numba.float64] * 3
    src = inspect.getsource(typed)
    assert "p ** 2" in src and "(1, p)" in src and "-_mithril_literal(2.0, p)" in src


def test_from_python_the_typed_math_computes_what_the_math_does():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(64).astype(np.float32) for _ in range(4)]
    arrays[3] = np.abs(arrays[3])
    scal = [np.float32(x) for x in (1e-3, 0.9, 0.999, 1e-8)]
    for a, b in zip(typed_literals(belief)(*arrays, *scal), belief(*arrays, *scal), strict=True):
        np.testing.assert_array_equal(a, b)


def test_what_is_not_rewritten_is_returned_as_it_is():
    def plain(p, g, lr):
        return p - lr * g
    scale = 2.0

    def closure(p, g, lr):
        return p - scale * lr * g

    namespace: dict = {}
    exec("def unread(p, g, lr):\n    return p - 0.5 * lr * g\n", namespace)
    for fn in (plain, closure, namespace["unread"], lambda p, g, lr: p - 0.5 * g):
        assert typed_literals(fn) is fn


class _Belief(Optimizer):
    slots = ("m", "s")

    def scalars(self, step):
        return (self.learning_rate, 0.9, 0.999, 1e-8)

    math = staticmethod(belief)


def test_a_custom_optimizers_float32_kernel_runs_the_typed_math():
    """The fused kernel calls the rewritten math (float32 throughout), and its update is
    the math's on NumPy float32 arrays (to the kernel's fast-math rounding)."""
    opt = _Belief(learning_rate=1e-2)
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal(1000).astype(np.float32)}
    grads = {"w": rng.standard_normal(1000).astype(np.float32)}
    state = opt.init(params)
    new, state = opt.update({"w": params["w"].copy()}, grads, state)
    zeros = np.zeros(1000, np.float32)
    want = belief(params["w"], grads["w"], zeros, zeros, *map(np.float32, opt.scalars(1)))
    np.testing.assert_allclose(new["w"] - params["w"], want[0] - params["w"], rtol=1e-4, atol=2e-6)
    kernel = kernels.update_kernel(opt.full_kernel_math(4), 2, 4, "float32")
    math = kernel.py_func.__globals__["MATH"].py_func
    assert math is typed_literals(belief) and _types(math, np.float32) == [numba.float32] * 3


def test_a_helpers_literals_take_its_first_arguments_type():
    """``elementwise.helper``: a function a math calls, typed as its first argument."""
    from mithril.utils.optimizers.elementwise import helper

    def direction(g, m, b1):
        return b1 * m + (1 - b1) * g

    typed = helper(direction)
    assert typed is not direction

    def math(p, g, m, lr, b1):
        m = typed(g, m, b1)
        return p - lr * m, m

    jitted = numba.njit(math)
    jitted(*[np.float32(0.5)] * 5)
    assert list(jitted.nopython_signatures[0].return_type.types) == [numba.float32] * 2
    g, m = np.float32([0.5, -1.0]), np.float32([0.25, 2.0])
    np.testing.assert_array_equal(typed(g, m, np.float32(0.9)), direction(g, m, np.float32(0.9)))
