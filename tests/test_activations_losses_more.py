"""SiLU, LogSoftmax, GLU, Hardtanh (torch's ``F.silu`` / ``log_softmax`` / ``glu`` /
``hardtanh``), InstanceNorm1D/2D (``F.instance_norm``) and KLDivergence's ``log_target`` and
"batchmean" (``F.kl_div``) and BinaryCrossEntropy's per-class ``pos_weight`` side by side
with torch.

Fixed configurations of :mod:`losses_norms_fuzz_cases` (which also draws them at random):
the output and the input gradient on NumPy and torch in process and on JAX float64 in a
fresh process, within 1e-10 of torch autograd's; NumPy's gradient against central
differences; bad arguments refused with an error naming the block and the argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from layer_edges import nonfinite_error, parity_tests, run_mithril, scalar_loss
from losses_norms_fuzz_cases import CASES as FUZZ_CASES
from losses_norms_fuzz_cases import name_of

import mithril as ml
from mithril.backends import NumpyBackend


def _cfg(op: str, shape: list[int], special: str = "", scale: float = 4.0,
         **kw: Any) -> str:
    return name_of({"op": op, "shape": shape, "scale": scale, "special": special, **kw})


NAMES = [
    _cfg("silu", [3, 5]), _cfg("silu", [2, 7], "inf", 30.0), _cfg("silu", [4], "nan"),
    _cfg("silu", [3, 4], "", 1e3),
    _cfg("log_softmax", [3, 5], axis=-1), _cfg("log_softmax", [2, 3, 4], axis=1),
    _cfg("log_softmax", [2, 6], "", 1e3, axis=0), _cfg("log_softmax", [3, 4], "inf", axis=1),
    _cfg("glu", [3, 4], axis=-1), _cfg("glu", [2, 4, 3], axis=1),
    _cfg("glu", [2, 3, 2], "inf", 30.0, axis=0),
    _cfg("hardtanh", [4, 5], "kinks", min_val=-1.0, max_val=1.0),
    _cfg("hardtanh", [3, 6], "kinks", min_val=0.0, max_val=6.0),
    _cfg("hardtanh", [3, 3], "", min_val=1.0, max_val=1.0),
    _cfg("hardtanh", [2, 5], "inf", min_val=-2.5, max_val=0.5),
]


def _norm(nd: int, shape: list[int], affine: bool, eps: float = 1e-5,
          special: str = "") -> str:
    return name_of({"op": "instance_norm", "nd": nd, "shape": shape, "affine": affine,
                    "eps": eps, "special": special})


NAMES += [_norm(1, [2, 3, 5], False), _norm(1, [3, 2, 4], True, 0.1),
          _norm(2, [2, 3, 3, 2], True), _norm(2, [1, 2, 2, 3], False, 1e-5, "tiny_var")]


def _kl(shape: list[int], reduction: str, log_target: bool, special: str = "") -> str:
    return name_of({"op": "kl_div", "shape": shape, "reduction": reduction, "scale": 1.0,
                    "special": special, "log_target": log_target})


NAMES += [_kl([3, 4], "batchmean", False), _kl([3, 4], "batchmean", True),
          _kl([2, 3, 2], "none", True), _kl([4, 2], "mean", True, "hard"),
          _kl([5], "batchmean", True, "hard"), _kl([], "batchmean", False)]


def _bce(op: str, shape: list[int], reduction: str, pos_weight: list[float],
         special: str = "", scale: float = 4.0) -> str:
    return name_of({"op": op, "shape": shape, "reduction": reduction, "scale": scale,
                    "special": special, "pos_weight": pos_weight})


NAMES += [_bce("bce_logits", [4, 3], "mean", [3.0, 0.25, 1.0]),
          _bce("bce_logits", [2, 2, 3], "none", [0.5, 3.0, 3.0], "hard"),
          _bce("bce_probs", [3, 2], "sum", [3.0, 0.5], scale=1.0),  # p not near 0, 1: for
          _bce("bce_probs", [3, 2], "mean", [0.25, 3.0], "hard"),  # central differences
          _bce("bce_logits", [5, 1], "sum", [3.0])]
CASES = {n: FUZZ_CASES[n] for n in NAMES}

test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_activations_losses_more", CASES, err=nonfinite_error)


@pytest.mark.parametrize("name", [n for n in NAMES if '"special":""' in n and "1000" not in n])
def test_numpy_gradient_equals_central_differences(name: str) -> None:
    case = CASES[name]
    params, cots, _, grads = run_mithril(name, case, "numpy")
    f = scalar_loss(case, params, cots)
    h = 1e-6
    for key, x in params.items():  # the input and an affine norm's weight and bias
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            up, dn = x.copy(), x.copy()
            up[i] += h
            dn[i] -= h
            fd[i] = (f({**params, key: up}) - f({**params, key: dn})) / (2 * h)
        assert np.abs(grads[key] - fd).max() < 1e-6 * max(1.0, np.abs(fd).max()), key


def test_hardtanh_gradient_is_zero_at_the_bounds() -> None:
    """torch's convention: 0 at x == min_val and x == max_val, 1 strictly inside."""
    case = FUZZ_CASES[_cfg("hardtanh", [3], min_val=-1.0, max_val=1.0)]
    model = ml.Model()
    model |= case.block()(input="input", output="output")
    c = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [3]},
                   trainable_keys={"input"})
    out, grads = c.evaluate({"input": np.array([-1.0, 0.5, 1.0])}, {},
                            output_gradients={"output": np.ones(3)})[:2]
    np.testing.assert_array_equal(out["output"], [-1.0, 0.5, 1.0])
    np.testing.assert_array_equal(grads["input"], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("make, match", [
    (lambda: ml.Hardtanh(1.0, -1.0), r"Hardtanh: max_val .* must be >= min_val"),
    (lambda: ml.Hardtanh(min_val=float("nan")), r"Hardtanh: min_val must be a finite"),
    (lambda: ml.Hardtanh(max_val="1"), r"Hardtanh: max_val must be a finite"),
    (lambda: ml.Glu(axis=1.5), r"Glu: axis must be an int"),
    (lambda: ml.LogSoftmax(axis=True), r"LogSoftmax: axis must be an int"),
    (lambda: ml.KLDivergence(reduction="batch"), r"KLDivergence: reduction must be one of"),
    (lambda: ml.KLDivergence(log_target=1), r"KLDivergence: log_target must be a bool"),
    (lambda: ml.BinaryCrossEntropy(pos_weight=[1.0, -2.0]),
     r"BinaryCrossEntropy: pos_weight must be a positive number or a 1-d sequence"),
    (lambda: ml.BinaryCrossEntropy(pos_weight=[[1.0]]), r"BinaryCrossEntropy: pos_weight must"),
    (lambda: ml.BinaryCrossEntropy(pos_weight=[]), r"BinaryCrossEntropy: pos_weight must"),
    (lambda: ml.InstanceNorm1D(0), r"InstanceNorm1D: num_features must be a positive int"),
    (lambda: ml.InstanceNorm2D(3, eps=-1.0), r"InstanceNorm2D: eps must be"),
    (lambda: ml.InstanceNorm2D(3, affine="yes"), r"InstanceNorm2D: affine must be a bool"),
    (lambda: ml.InstanceNorm1D(3, track_running_stats=1),
     r"InstanceNorm1D: track_running_stats must be a bool"),
])
def test_bad_arguments_are_named(make: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("block, shape, match", [
    (lambda: ml.Glu(axis=1), [2, 3], r"Glu: the input's axis 1 must have an even length"),
    (lambda: ml.Glu(axis=2), [2, 4], r"Glu: axis 2 is out of range"),
    (lambda: ml.LogSoftmax(axis=-3), [2, 4], r"axis -3 is out of range"),
    (lambda: ml.InstanceNorm1D(3), [2, 3, 4, 4], r"InstanceNorm1D: 'input' must have rank 3"),
    (lambda: ml.InstanceNorm2D(3), [2, 4, 4, 4], r"InstanceNorm2D: input channels \(4\) must "
     r"equal num_features \(3\)"),
    (lambda: ml.InstanceNorm1D(3), [2, 3, 1], r"more than 1 spatial element"),
    (lambda: ml.BinaryCrossEntropy(pos_weight=[1.0, 2.0, 3.0]), [4, 2],
     r"BinaryCrossEntropy: pos_weight has 3 classes"),
])
def test_bad_shapes_are_refused_at_compile(block: Any, shape: list[int], match: str) -> None:
    model = ml.Model()
    b = block()
    ins = {k: k for k in b.inputs}  # a loss's target too, of the input's shape
    model |= b(**ins, output="output")
    with pytest.raises(ValueError, match=match):
        ml.compile(model, NumpyBackend(dtype="float64"), shapes={k: shape for k in ins})
