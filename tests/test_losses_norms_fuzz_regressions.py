"""The minimal cases the losses / norms / activations fuzzer (``test_losses_norms_fuzz.py``)
found, kept as named regressions, with the fuzzer's reference checked against torch itself,
central differences of a few configurations, and the refusals of bad input (a library error
naming the block, the key or the argument)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import compare, run_mithril, scalar_loss
from losses_norms_fuzz_cases import CASES, cross_entropy_of_log_probs, name_of
from test_losses_norms_fuzz import _err, check_jax, check_numpy_torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import DTypeError, ShapeError

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")

#: each found by the fuzzer (the numbers before the fix in the comment)
REGRESSIONS = [
    # exact GELU of a 0-d input on NumPy: its VJP raised TypeError("return arrays must be of
    # ArrayType"): x·x of a 0-d array is a NumPy scalar, np.exp(out=) refused it
    {"approximate": "none", "op": "gelu", "scale": 1.0, "shape": [], "special": ""},
    # GroupNorm with N·C/G == 1 on torch: F.group_norm raised its unnamed "Expected more than
    # 1 value per channel when training" where NumPy and JAX (and torch.group_norm) normalise
    {"affine": False, "eps": 1e-05, "groups": 1, "op": "group_norm", "shape": [1, 1],
     "special": ""},
    {"affine": True, "eps": 1e-05, "groups": 3, "op": "group_norm", "shape": [1, 3],
     "special": "large"},
    # L1's gradient at a NaN input: NaN on NumPy and JAX, torch's 0 (sgn(NaN) = 0)
    {"op": "l1", "scale": 1.0, "shape": [1, 1, 3], "special": "nan"},
    # Hardswish at NaN inputs: torch's gradient there is NaN or 1 by position (compared
    # elsewhere; NumPy's and JAX's at NaN: test_hardswish_gradient_at_nan_is_one_everywhere)
    {"op": "hardswish", "scale": 30.0, "shape": [4, 3, 4], "special": "nan"},
    # reference checks: torch's nll_loss2d backward refuses a non-contiguous input (the
    # reference's moved class axis); all rows ignored with label smoothing on log-probs
    {"axis": -1, "ignore_index": 4, "input_type": "log_probs", "op": "cross_entropy",
     "reduction": "none", "scale": 1.0, "shape": [3, 3, 2, 4], "smoothing": 0.0,
     "target": "index", "weight": False},
    {"axis": -1, "ignore_index": 5, "input_type": "log_probs", "op": "cross_entropy",
     "reduction": "mean", "scale": 1.0, "shape": [5], "smoothing": 0.1, "target": "index",
     "weight": True},
    # ELU family at NaN: torch's own gradient depends on the element's position (vectorised
    # loop: NaN, scalar tail: the slope); the rest compared
    {"op": "selu", "scale": 4.0, "shape": [4, 4], "special": "nan"},
    {"alpha": 1.5, "op": "celu", "scale": 1.0, "shape": [2, 1, 4], "special": "nan"},
    # tiny variances with eps 1e-12: torch's rounding of the mean, amplified by 1/σ², is the
    # difference (ours is exact 0 where torch's is 1.2e-10)
    {"affine": True, "bias": True, "eps": 1e-12, "k": None, "op": "layer_norm", "shape": [1],
     "special": ""},
    {"affine": True, "eps": 1e-12, "groups": 2, "op": "group_norm", "shape": [3, 2],
     "special": "large"},
]
NAMES = [name_of(c) for c in REGRESSIONS]


@pytest.mark.parametrize("name", NAMES, ids=[c["op"] for c in REGRESSIONS])
def test_regression_numpy_and_torch(name: str) -> None:
    check_numpy_torch(name)


def test_regressions_jax_float64() -> None:
    check_jax(NAMES)


@pytest.mark.parametrize("backend_cls", [NumpyBackend, JaxBackend, TorchBackend])
def test_hardswish_gradient_at_nan_is_one_everywhere(backend_cls) -> None:
    """Hardswish's gradient at a NaN input is 1 (the x >= 3 branch, as torch's scalar loop)
    on NumPy and JAX (JAX's was NaN: where() multiplied the quadratic branch's NaN slope
    by 0), and torch's own on the torch backend (NaN in its vectorised loop, 1 in its
    tail: either); the output NaN everywhere."""
    model = ml.Model()
    model |= ml.Hardswish()(input="input", output="output")
    c = ml.compile(model, backend_cls(dtype="float32"), shapes={"input": [3]},
                   trainable_keys={"input"})
    x = np.array([np.nan, -1.0, 4.0], np.float32)
    out, grads = c.evaluate({"input": c.backend.array(x)}, {},
                            output_gradients={"output": c.backend.array(np.ones(3, np.float32))})
    g = np.asarray(c.backend.to_numpy(grads["input"]))
    assert np.isnan(np.asarray(c.backend.to_numpy(out["output"]))[0])
    np.testing.assert_allclose(g[1:], [1 / 6, 1.0], rtol=1e-6)
    assert g[0] == 1.0 or (backend_cls is TorchBackend and np.isnan(g[0]))


# -- the reference itself ----------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.3}, {"ignore_index": 1},
                                  {"weight": True, "label_smoothing": 0.2, "ignore_index": 0},
                                  {"probs": True, "label_smoothing": 0.4, "weight": True}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_log_probs_reference_is_torch_cross_entropy(opts: dict, reduction: str) -> None:
    """``cross_entropy_of_log_probs(log_softmax(x))`` == ``F.cross_entropy(x)``, values and
    gradients of x (the reference for log-probabilities is torch's own on logits)."""
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((4, 3, 2)), requires_grad=True)
    kw = dict(opts)
    probs = kw.pop("probs", False)
    if kw.pop("weight", False):
        kw["weight"] = torch.tensor(rng.uniform(0.2, 2.0, 3))
    t = torch.tensor(rng.dirichlet(np.ones(3), (4, 2)).transpose(0, 2, 1)) if probs \
        else torch.tensor(rng.integers(0, 3, (4, 2)))
    g = torch.tensor(rng.standard_normal(() if reduction != "none" else (4, 2)))
    want = F.cross_entropy(x, t, reduction=reduction, **kw)
    got = cross_entropy_of_log_probs(F.log_softmax(x, 1), t, reduction, **kw)
    gw, = torch.autograd.grad(want, x, g)
    gg, = torch.autograd.grad(got, x, g)
    np.testing.assert_allclose(got.detach(), want.detach(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gg, gw, rtol=1e-12, atol=1e-14)


# -- central differences -----------------------------------------------------------------------
FD_CONFIGS = [
    {"axis": 1, "ignore_index": -100, "input_type": "logits", "op": "cross_entropy",
     "reduction": "mean", "scale": 1.0, "shape": [3, 4, 2], "smoothing": 0.1,
     "target": "index", "weight": True},
    {"axis": -1, "input_type": "log_probs", "op": "cross_entropy", "reduction": "sum",
     "scale": 1.0, "shape": [3, 4], "smoothing": 0.5, "target": "probs", "weight": True},
    {"op": "bce_logits", "pos_weight": 3.0, "reduction": "mean", "scale": 1.0, "shape": [2, 3],
     "special": ""},
    {"op": "bce_probs", "pos_weight": 0.25, "reduction": "sum", "scale": 1.0, "shape": [5],
     "special": ""},
    {"delta": 0.1, "op": "huber", "reduction": "mean", "scale": 1.0, "shape": [2, 3],
     "special": ""},
    {"beta": 0.3, "op": "smooth_l1", "reduction": "none", "scale": 1.0, "shape": [4],
     "special": ""},
    {"op": "kl_div", "reduction": "mean", "scale": 1.0, "shape": [2, 3], "special": ""},
    {"affine": True, "bias": True, "eps": 1e-05, "k": 2, "op": "layer_norm",
     "shape": [2, 2, 3], "special": ""},
    {"affine": True, "eps": 0.1, "groups": 2, "op": "group_norm", "shape": [2, 4, 3],
     "special": ""},
    {"affine": True, "eps": 1e-05, "momentum": None, "nd": 2, "op": "batch_norm",
     "shape": [2, 2, 2, 2], "special": "", "track": True, "training": True},
    {"affine": True, "eps": None, "k": 1, "op": "rms_norm", "shape": [3, 4], "special": ""},
    {"alpha": -0.75, "op": "celu", "scale": 1.0, "shape": [6], "special": ""},
    {"beta": 2.0, "op": "softplus", "scale": 4.0, "shape": [6], "special": "",
     "threshold": 5.0},
    {"approximate": "tanh", "op": "gelu", "scale": 2.0, "shape": [6], "special": ""},
    {"axis": 0, "op": "softmax", "scale": 1.0, "shape": [3, 2], "special": ""},
]


@pytest.mark.parametrize("cfg", FD_CONFIGS, ids=lambda c: c["op"])
def test_numpy_gradients_equal_central_differences(cfg: dict) -> None:
    """Every gradient on NumPy (float64) against central differences of
    <output, cotangent>, and torch's, side by side."""
    name = name_of(cfg)
    case = CASES[name]
    params, cots, out, grads = run_mithril(name, case, "numpy")
    compare(name, case, params, cots, out, grads, what="numpy", err=_err(name))
    kw = {"training": case.training} if case.training is not None else {}
    f = scalar_loss(case, params, cots) if not kw else _training_loss(case, params, cots)
    fd = central_differences(f, params, 1e-6)
    for k, g in grads.items():
        np.testing.assert_allclose(g, fd[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _training_loss(case, params, cots):
    """:func:`scalar_loss` in training mode (batch statistics), with the initial state."""
    backend = NumpyBackend(dtype="float64")
    model = ml.Model()
    model |= case.block()(input="input", output="output")
    compiled = ml.compile(model, backend, shapes={"input": list(params["input"].shape)},
                          trainable_keys={"input"})

    def f(p):
        out = compiled.evaluate(p, {}, state=compiled.initial_state_dict, training=True)[0]
        return float(np.sum(np.asarray(out["output"]) * cots["output"]))
    return f


# -- bad input -------------------------------------------------------------------------------
def _compile(block, shapes, data=None, backend=NumpyBackend):
    model = ml.Model()
    model |= block(**{k: k for k in shapes}, output="output")
    c = ml.compile(model, backend(dtype="float64"), shapes=shapes, trainable_keys={"input"})
    if data is not None:
        p = {k: c.backend.array(np.ones(s)) for k, s in c.parameter_shapes.items()}
        kw = {"state": c.initial_state_dict, "training": True} if c.initial_state_dict else {}
        c.evaluate(p, {k: c.backend.array(v) for k, v in data.items()}, **kw)


BAD = [
    (lambda: _compile(ml.HuberLoss(), {"input": [2, 3], "target": [2, 4]}), ShapeError,
     r"HuberLoss.*'input' has shape \[2, 3\] but 'target' has shape \[2, 4\]"),
    (lambda: _compile(ml.BinaryCrossEntropy(), {"input": [2, 3], "target": [3]}), ShapeError,
     r"BinaryCrossEntropy.*'target' has shape \[3\]"),
    (lambda: _compile(ml.CrossEntropy(), {"input": [4, 3], "target": [4, 2]},
                      {"target": np.zeros((4, 2))}), ShapeError, r"'target' has shape \[4, 2\]"),
    (lambda: _compile(ml.CrossEntropy(), {"input": [4, 3], "target": [4]},
                      {"target": np.array([0, 1, 2, 3])}, TorchBackend), ValueError,
     r"input 'target': 1 of 4 class indices out of range .* labels must be in \[0, 2\]"),
    (lambda: _compile(ml.CrossEntropy(), {"input": [4, 3], "target": [4]},
                      {"target": np.array([0, 1, 2, 1.5])}), DTypeError,
     r"input 'target': class indices must have an integer dtype"),
    (lambda: _compile(ml.CrossEntropy(weight=np.ones(4)), {"input": [4, 3], "target": [4]}),
     ShapeError, r"weight has 4 entries .* 3 classes"),
    (lambda: _compile(ml.Softmax(axis=2), {"input": [4, 3]}), ShapeError,
     r"Softmax.*axis 2 is out of range for rank 2"),
    (lambda: _compile(ml.LayerNorm(normalized_shape=(3, 4)), {"input": [2, 4, 3]}), ShapeError,
     r"LayerNorm: 'input' of shape \[2, 4, 3\] does not end in normalized_shape \(3, 4\)"),
    (lambda: _compile(ml.RMSNorm(5), {"input": [2, 4]}), ShapeError, r"RMSNorm: 'input'"),
    (lambda: _compile(ml.GroupNorm(2), {"input": [2, 3, 4]}), ShapeError,
     r"GroupNorm: input channels \(3\) must be divisible by num_groups \(2\)"),
    (lambda: _compile(ml.BatchNorm1D(3), {"input": [2, 4]}), ShapeError,
     r"BatchNorm1D: 'input' has 4 channels"),
    (lambda: _compile(ml.BatchNorm1D(3), {"input": [1, 3]}, {}), ValueError,
     r"BatchNorm1D: the batch statistics .* more than one value per channel"),
    (lambda: ml.HuberLoss(delta=0), ValueError, r"HuberLoss: delta must be"),
    (lambda: ml.SmoothL1Loss(beta=-1), ValueError, r"SmoothL1Loss: beta must be"),
    (lambda: ml.BinaryCrossEntropy(pos_weight=-1), ValueError, r"pos_weight must be"),
    (lambda: ml.CrossEntropy(label_smoothing=1.5), ValueError, r"label_smoothing must be"),
    (lambda: ml.CrossEntropy(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    (lambda: ml.KLDivergence(reduction="batch"), ValueError, r"KLDivergence: reduction"),
    (lambda: ml.Softplus(beta=0), ValueError, r"Softplus: beta must be"),
    (lambda: ml.Gelu("fast"), ValueError, r"Gelu: approximate must be"),
    (lambda: ml.Celu(alpha=0), ValueError, r"Celu: alpha must be"),
    (lambda: ml.RMSNorm(5, eps=-1.0), ValueError, r"RMSNorm: eps must be"),
    (lambda: ml.BatchNorm1D(3, momentum=2.0), ValueError, r"BatchNorm1D: momentum must be"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_is_a_named_library_error(i: int) -> None:
    fn, kind, pattern = BAD[i]
    with pytest.raises(kind) as info:
        fn()
    assert re.search(pattern, str(info.value)), str(info.value)
    assert type(info.value).__module__.split(".")[0] in ("mithril", "builtins")
