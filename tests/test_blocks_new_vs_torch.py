"""RMSNorm, the torch activations (Softplus, ELU, SELU, CELU, Mish, Hardswish, Hardsigmoid)
and the Huber / smooth-L1 losses side by side with ``torch.nn.functional`` in float64 on
NumPy, JAX and torch: the output and every gradient within 1e-10 (relative to
max(1, |torch|)), at the edges: inputs at and around each threshold or kink, tiny and huge
values, and the arguments' edge values (eps from torch's finfo default, beta = 0, ...)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, compare, jax_column, run_mithril

import mithril as ml
from mithril.backends import NumpyBackend


def unary(fn):
    """A torch reference of a block on ``input`` whose parameters are named by their role."""
    def ref(t, d):
        roles = {k.rsplit(".", 1)[-1]: v for k, v in t.items() if k != "input"}
        return {"output": fn(t["input"], **roles)}
    return ref


_RNG = np.random.default_rng(95)
_SMALL = 1e-8 * _RNG.standard_normal((3, 4, 6))  # mean(x²) ~ 1e-16: torch's float64 eps matters

CASES: dict[str, Case] = {
    # -- RMSNorm -------------------------------------------------------------------------
    "rms_norm_last_axis": Case(lambda: ml.RMSNorm(6), {"input": (3, 4, 6)},
                               unary(lambda x, weight: F.rms_norm(x, (6,), weight))),
    "rms_norm_two_axes_eps": Case(lambda: ml.RMSNorm((4, 6), eps=1e-3), {"input": (3, 4, 6)},
                                  unary(lambda x, weight: F.rms_norm(x, (4, 6), weight, 1e-3))),
    "rms_norm_all_axes_no_affine": Case(lambda: ml.RMSNorm([3, 4, 6], elementwise_affine=False),
                                        {"input": (3, 4, 6)}, unary(lambda x: F.rms_norm(x, (3, 4, 6)))),
    "rms_norm_tiny_inputs_default_eps": Case(lambda: ml.RMSNorm(6), {"input": _SMALL},
                                             unary(lambda x, weight: F.rms_norm(x, (6,), weight))),
    "rms_norm_tiny_inputs_eps_0": Case(lambda: ml.RMSNorm(6, eps=0.0), {"input": _SMALL},
                                       unary(lambda x, weight: F.rms_norm(x, (6,), weight, 0.0))),
    "rms_norm_large_eps": Case(lambda: ml.RMSNorm(6, eps=10.0), {"input": (3, 4, 6)},
                               unary(lambda x, weight: F.rms_norm(x, (6,), weight, 10.0))),
    "rms_norm_huge_inputs": Case(lambda: ml.RMSNorm(6), {"input": 1e100 * _RNG.standard_normal((2, 6))},
                                 unary(lambda x, weight: F.rms_norm(x, (6,), weight))),
    "rms_norm_one_feature": Case(lambda: ml.RMSNorm(1), {"input": (5, 1)},
                                 unary(lambda x, weight: F.rms_norm(x, (1,), weight))),
}


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_equals_torch(name, backend_name):
    case = CASES[name]
    compare(name, case, *run_mithril(name, case, backend_name), what=backend_name)


@pytest.fixture(scope="module")
def jax_results():
    return jax_column("test_blocks_new_vs_torch", list(CASES), os.path.dirname(__file__))


@pytest.mark.parametrize("name", list(CASES))
def test_jax_equals_torch(name, jax_results):
    compare(name, CASES[name], *jax_results[name], what="jax")


# -- RMSNorm: defaults, shapes and arguments -------------------------------------------------

def test_rms_norm_default_eps_is_torchs_finfo():
    """eps=None: finfo(float64).eps for float64, finfo(float32).eps otherwise (torch's
    opmath convention), visible where mean(x²) is of eps's size."""
    norm = ml.RMSNorm(4)
    assert norm.eps_for(np.float64) == torch.finfo(torch.float64).eps
    for dt in (np.float32, np.float16):
        assert norm.eps_for(dt) == torch.finfo(torch.float32).eps
    assert ml.RMSNorm(4, eps=0.5).eps_for(np.float64) == 0.5
    x = np.full((2, 4), 3e-4, np.float32)  # mean(x²) = 9e-8, eps 1.19e-7
    model = ml.Model()
    model |= ml.RMSNorm(4, elementwise_affine=False)(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float32"), shapes={"input": [2, 4]})
    got = compiled.evaluate({}, {"input": x})["output"]
    want = F.rms_norm(torch.tensor(x), (4,)).numpy()
    assert abs(float(got[0, 0]) - float(want[0, 0])) <= 1e-6
    assert abs(float(want[0, 0]) - 3e-4 / np.sqrt(9e-8 + 1.1920929e-07)) <= 1e-6


def test_rms_norm_shape_and_argument_errors():
    model = ml.Model()
    model |= ml.RMSNorm((3, 5))(input="input")
    with pytest.raises(ml.ShapeError, match=r"RMSNorm: 'input' of shape \[2, 4, 5\] does not end "
                                            r"in normalized_shape \(3, 5\)"):
        ml.compile(model, NumpyBackend(), shapes={"input": [2, 4, 5]})
    for bad in (0, (), (2.0,), "4", True, None):
        with pytest.raises(ValueError, match="RMSNorm: normalized_shape must be a positive int"):
            ml.RMSNorm(bad)
    for bad in (-1e-6, float("nan"), float("inf"), "1e-5", True):
        with pytest.raises(ValueError, match="RMSNorm: eps must be a finite float >= 0"):
            ml.RMSNorm(4, eps=bad)
    with pytest.raises(ValueError, match="RMSNorm: elementwise_affine must be a bool"):
        ml.RMSNorm(4, elementwise_affine="no")
    model = ml.Model()
    model |= ml.RMSNorm((4, 5))(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [None, 4, 5]})
    assert compiled.parameter_shapes == {"rmsnorm.weight": (4, 5)}
    assert np.array_equal(compiled.get_parameters()["rmsnorm.weight"], np.ones((4, 5)))
    assert repr(ml.RMSNorm(5)) == "RMSNorm((5,), eps=None, elementwise_affine=True)"
