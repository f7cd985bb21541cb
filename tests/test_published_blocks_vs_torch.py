"""The published Mithril's blocks added for its test cases (the losses AbsoluteError,
QuantileLoss, HingeLoss, QuadHingeLoss, BinaryCrossEntropy and KLDivergence; Variance, Sine,
Cosine, StopGradient, StableReciprocal, PermuteTensor; PolynomialFeatures,
PolynomialRegression, LogisticRegression, EncoderDistanceMatrix, RBFKernel and PolynomialKernel) side by side
with torch in float64 on NumPy, JAX and torch: outputs and every gradient (input and target)
within 1e-12 relative to max(1, |torch|), against ``torch.nn.functional`` where torch has
the loss and a direct torch expression with autograd where it has none; the NumPy gradients
against central differences; bad arguments refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import Case, arrays, error, parity_tests, run_mithril, scalar_loss

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend

_RNG = np.random.default_rng(119)


def _tight(got: np.ndarray, want: np.ndarray) -> float:
    """:func:`layer_edges.error` scaled so that the harness's 1e-10 bound reads 1e-12."""
    return error(got, want) * 100


def pair(fn):
    """A torch reference of a loss of ``input`` and ``target`` (inputs or data)."""
    return lambda t, d: {"output": fn(t["input"], t["target"] if "target" in t else d["target"])}


_X = _RNG.standard_normal((4, 5))
_T = _RNG.standard_normal((4, 5))
_T[0, :3] = _X[0, :3]  # ties: input == target
_PM = np.sign(_RNG.standard_normal((4, 5)))  # hinge targets ±1
_HX = _RNG.standard_normal((4, 5)) * 2
_HX[0, :] = [1.0, -1.0, 0.5, -0.25, 3.0]  # margins exactly 1 at the first two (ties)
_PM[0, :] = [1.0, -1.0, 2.0, -4.0, 1.0]  # ... and target·input = 1 at the next two
_P = _RNG.uniform(0.02, 0.98, (4, 5))  # probabilities
_Q = _RNG.uniform(0.02, 0.98, (4, 5))
_LOGITS = np.concatenate([_RNG.standard_normal((3, 6)) * 4,
                          [[-800.0, -40.0, 0.0, 1e-300, 40.0, 800.0]]])
_SOFT = _RNG.uniform(0, 1, (4, 6))


def _quantile(q):
    return lambda x, t: torch.maximum(q * (t - x), (q - 1) * (t - x))


def _hinge(x, t):
    return torch.maximum(1 - t * x, torch.zeros_like(x))


def _bce_logits(w):
    return lambda x, t, r="none": F.binary_cross_entropy_with_logits(
        x, t, reduction=r, pos_weight=None if w == 1 else torch.tensor(w, dtype=x.dtype))


_TINY = float(np.finfo(np.float64).tiny)


def _robust_log(x, c=_TINY):
    """The published robust log, written in torch."""
    return torch.where(x < c, np.log(c) + x / c - 1, torch.log(torch.where(x < c, 1.0, x)))


_WIDE = np.concatenate([_RNG.standard_normal((2, 6)) * 3,
                        [[-1e3, -np.pi, 0.0, 1e-300, np.pi / 2, 1e4]]])
_RECIP = np.array([[-3.0, -0.5, -0.25, -1e-3, 0.0, 1e-3, 0.25, 0.5, 0.75, 1e100]])


def unary(fn):
    return lambda t, d: {"output": fn(t["input"])}


def _held_times_input():
    """StopGradient(x) · x: the gradient is the held x alone (torch: x.detach() · x)."""
    m = ml.Model()
    m |= ml.StopGradient()(input="input", output=ml.IOKey("held", expose=False))
    m |= ml.Multiply()(left="held", right="input", output="output")
    return m


def _stable_reciprocal(x, c):
    """The published stable reciprocal, written in torch."""
    side = torch.where(x < 0, -2.0 / c, 2.0 / c).to(x.dtype)
    return torch.where(x.abs() < c, side - x / c**2, 1 / torch.where(x.abs() < c, 1.0, x))


_POLY_X = np.array([[0.0, 1.5], [-2.0, 0.0], [0.5, -0.25], [3.0, 2.0]])


def _monomials(x, degree):
    """scikit-learn's PolynomialFeatures(degree, include_bias=False), written in torch."""
    from itertools import combinations_with_replacement

    cols = []
    for combo in combinations_with_replacement(range(x.shape[1] + 1), degree):
        if any(combo):
            picked = [x[:, i - 1] for i in combo if i]
            col = picked[0]
            for c in picked[1:]:
                col = col * c
            cols.append(col)
    return torch.stack(cols, dim=1)


def _linear(t):
    """The Linear's weight and bias among the harness's full names (``<model>.linear.weight``)."""
    return [next(v for k, v in t.items() if k.endswith(f"linear.{r}")) for r in ("weight", "bias")]


def _logistic(t, d):
    logit = F.linear(t["input"], *_linear(t))
    return {"output": logit, "probs_output": torch.sigmoid(logit)}


def _order(norm):
    """The published norm modifier, written in torch."""
    return 4.0 * (1.0 - 2.0 * torch.abs(((norm - 1.0) % 8) / 8 - 0.5)) + 1.0


def _minkowski(t, root):
    p = _order(t["norm"][0])
    d = (t["input1"][:, None, :] - t["input2"][None, :, :]).abs().pow(p).sum(-1)
    return d.pow(1 / p) if root else d


def _rbf(t):
    sq = ((t["input1"][:, None, :] - t["input2"][None, :, :]) ** 2).sum(-1)
    return t["l_scale"][0] ** 2 * torch.exp(-sq / (2 * t["sigma"][0] ** 2))


CASES: dict[str, Case] = {
    "absolute_error": Case(lambda: ml.AbsoluteError(), {"input": _X, "target": _T},
                           pair(lambda x, t: F.l1_loss(x, t, reduction="none"))),
    "absolute_error_mean": Case(lambda: ml.AbsoluteError(reduction="mean"), {"input": _X, "target": _T},
                                pair(F.l1_loss)),
    "absolute_error_sum": Case(lambda: ml.AbsoluteError(reduction="sum"), {"input": _X, "target": _T},
                               pair(lambda x, t: F.l1_loss(x, t, reduction="sum"))),
    "quantile_0.1": Case(lambda: ml.QuantileLoss(0.1), {"input": _X, "target": _T}, pair(_quantile(0.1))),
    "quantile_0.9_sum": Case(lambda: ml.QuantileLoss(0.9, reduction="sum"), {"input": _X, "target": _T},
                             pair(lambda x, t: _quantile(0.9)(x, t).sum())),
    "quantile_0": Case(lambda: ml.QuantileLoss(0), {"input": _X, "target": _T}, pair(_quantile(0.0))),
    "quantile_1": Case(lambda: ml.QuantileLoss(1), {"input": _X, "target": _T}, pair(_quantile(1.0))),
    "hinge": Case(lambda: ml.HingeLoss(), {"input": _HX, "target": _PM}, pair(_hinge)),
    "hinge_data_target_mean": Case(lambda: ml.HingeLoss(reduction="mean"), {"input": _HX},
                                   pair(lambda x, t: _hinge(x, t).mean()), data={"target": _PM}),
    "quad_hinge": Case(lambda: ml.QuadHingeLoss(), {"input": _HX, "target": _PM},
                       pair(lambda x, t: _hinge(x, t) ** 2)),
    "bce_probs_soft_targets": Case(lambda: ml.BinaryCrossEntropy("probs", reduction="none"),
                                   {"input": _P, "target": _Q},
                                   pair(lambda p, t: F.binary_cross_entropy(p, t, reduction="none"))),
    "bce_probs_mean": Case(lambda: ml.BinaryCrossEntropy("probs"), {"input": _P},
                           pair(F.binary_cross_entropy), data={"target": (_Q > 0.5) * 1.0}),
    "bce_probs_pos_weight_sum": Case(
        lambda: ml.BinaryCrossEntropy("probs", pos_weight=2.5, reduction="sum"), {"input": _P, "target": _Q},
        pair(lambda p, t: -(2.5 * t * torch.log(p) + (1 - t) * torch.log(1 - p)).sum())),
    # (no subnormal inputs: XLA on CPU reads them as 0)
    "bce_probs_robust": Case(lambda: ml.BinaryCrossEntropy("probs", robust=True, reduction="none"),
                             {"input": np.array([[0.0, 1e-300, 0.3, 1.0]])},
                             pair(lambda p, t: -(t * _robust_log(p) + (1 - t) * _robust_log(1 - p))),
                             data={"target": np.array([[1.0, 0.5, 0.2, 0.0]])}),
    "bce_probs_robust_cutoff": Case(
        lambda: ml.BinaryCrossEntropy("probs", robust=True, cutoff=1e-3, reduction="none"),
        {"input": np.array([[0.0, 1e-4, 0.3, 1 - 1e-4, 1.0]]), "target": np.array([[1.0, 0.5, 0.2, 0.7, 0.0]])},
        pair(lambda p, t: -(t * _robust_log(p, 1e-3) + (1 - t) * _robust_log(1 - p, 1e-3)))),
    "bce_logits_mean": Case(lambda: ml.BinaryCrossEntropy(), {"input": _LOGITS, "target": _SOFT},
                            pair(lambda x, t: _bce_logits(1)(x, t, "mean"))),
    "bce_logits_pos_weight": Case(lambda: ml.BinaryCrossEntropy(pos_weight=3.0, reduction="none"),
                                  {"input": _LOGITS, "target": _SOFT}, pair(_bce_logits(3.0))),
    "bce_logits_pos_weight_sum": Case(lambda: ml.BinaryCrossEntropy(pos_weight=0.25, reduction="sum"),
                                      {"input": _LOGITS, "target": _SOFT},
                                      pair(lambda x, t: _bce_logits(0.25)(x, t, "sum"))),
    "kl_div": Case(lambda: ml.KLDivergence(), {"input": _Q, "target": _P},
                   pair(lambda q, p: F.kl_div(torch.log(q), p, reduction="none"))),
    "kl_div_sum": Case(lambda: ml.KLDivergence(reduction="sum"), {"input": _Q, "target": _P},
                       pair(lambda q, p: F.kl_div(torch.log(q), p, reduction="sum"))),
    "kl_div_mean_zero_targets": Case(lambda: ml.KLDivergence(reduction="mean"), {"input": _Q},
                                     pair(lambda q, p: F.kl_div(torch.log(q), p, reduction="sum") / p.numel()),
                                     data={"target": np.where(_P > 0.5, _P, 0.0)}),
    # -- statistics and elementwise primitives -----------------------------------------------
    "sine": Case(lambda: ml.Sine(), {"input": _WIDE}, unary(torch.sin)),
    "cosine": Case(lambda: ml.Cosine(), {"input": _WIDE}, unary(torch.cos)),
    "stop_gradient_times_input": Case(_held_times_input, {"input": _X},
                                      unary(lambda x: x.detach() * x)),
    "stable_reciprocal_outside": Case(lambda: ml.StableReciprocal(), {"input": _RECIP[:, _RECIP[0] != 0]},
                                      unary(torch.reciprocal)),
    "stable_reciprocal_inside": Case(lambda: ml.StableReciprocal(threshold=0.5), {"input": _RECIP},
                                     unary(lambda x: _stable_reciprocal(x, 0.5))),
    "variance_all": Case(lambda: ml.Variance(), {"input": (3, 4, 5)},
                         unary(lambda x: torch.var(x, correction=0))),
    "variance_axis_keepdim_unbiased": Case(lambda: ml.Variance(axis=1, keepdim=True, correction=1),
                                           {"input": (3, 4, 5)},
                                           unary(lambda x: torch.var(x, dim=1, keepdim=True))),
    "variance_two_axes_fractional": Case(lambda: ml.Variance(axis=(0, -1), correction=2.5),
                                         {"input": (3, 4, 5)},
                                         unary(lambda x: torch.var(x, dim=(0, 2), correction=2.5))),
    "permute_tensor": Case(lambda: ml.PermuteTensor(), {"input": (4, 3, 2)},
                           lambda t, d: {"output": t["input"][d["indices"]]},
                           data={"indices": np.array([2, 0, 3, 1])}),
    "permute_tensor_repeated_negative": Case(lambda: ml.PermuteTensor(), {"input": (4, 3)},
                                             lambda t, d: {"output": t["input"][d["indices"]]},
                                             data={"indices": np.array([0, -1, 0, 2])}),
    # -- regression models ---------------------------------------------------------------------
    "polynomial_features_degree_2": Case(lambda: ml.PolynomialFeatures(2), {"input": _POLY_X},
                                         unary(lambda x: _monomials(x, 2))),
    "polynomial_features_degree_3": Case(lambda: ml.PolynomialFeatures(3), {"input": (4, 3)},
                                         unary(lambda x: _monomials(x, 3))),
    "polynomial_regression": Case(lambda: ml.PolynomialRegression(3, 2), {"input": (5, 2)},
                                  lambda t, d: {"output": F.linear(_monomials(t["input"], 3),
                                                                   *_linear(t))}),
    "logistic_regression": Case(lambda: ml.LogisticRegression(), {"input": (5, 3)}, _logistic,
                                outputs=("output", "probs_output")),
    "distance_matrix_minkowski": Case(lambda: ml.EncoderDistanceMatrix(),
                                      {"input1": (4, 3), "input2": (5, 3), "norm": np.array([2.3])},
                                      lambda t, d: {"output": _minkowski(t, root=True)}),
    "distance_matrix_not_robust": Case(lambda: ml.EncoderDistanceMatrix(robust=False),
                                       {"input1": (4, 3), "input2": (5, 3), "norm": np.array([7.5])},
                                       lambda t, d: {"output": _minkowski(t, root=True)}),
    "distance_matrix_powered": Case(lambda: ml.EncoderDistanceMatrix(get_final_distance=False),
                                    {"input1": (4, 2), "input2": (3, 2), "norm": np.array([6.5])},
                                    lambda t, d: {"output": _minkowski(t, root=False)}),
    "rbf_kernel": Case(lambda: ml.RBFKernel(), {"input1": (4, 3), "input2": (5, 3), "l_scale": np.array([1.3]),
                                                 "sigma": np.array([0.8])}, lambda t, d: {"output": _rbf(t)}),
    "polynomial_kernel": Case(lambda: ml.PolynomialKernel(), {"input1": (4, 3), "input2": (5, 3),
                                                              "poly_coef": np.array([0.7]),
                                                              "degree": np.array([2.5])},
                              lambda t, d: {"output": (t["input1"] @ t["input2"].T
                                                       + t["poly_coef"][0]).abs() ** t["degree"][0]}),
}

test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES, _tight)
test_jax_equals_torch = pytest.mark.slow(test_jax_equals_torch)  # (a JAX process: ~40 s)

#: cases whose gradient has no kink near the inputs (central differences apply)
SMOOTH = ["quantile_0.1", "bce_probs_soft_targets", "bce_probs_pos_weight_sum", "bce_logits_mean",
          "bce_logits_pos_weight", "kl_div", "kl_div_sum", "quad_hinge", "sine", "cosine",
          "variance_all", "variance_axis_keepdim_unbiased",
          "variance_two_axes_fractional", "permute_tensor_repeated_negative",
          "polynomial_features_degree_2", "polynomial_features_degree_3", "polynomial_regression",
          "logistic_regression", "distance_matrix_minkowski", "distance_matrix_powered",
          "rbf_kernel", "polynomial_kernel"]


@pytest.mark.parametrize("name", SMOOTH)
def test_numpy_gradients_match_central_differences(name):
    case = CASES[name]
    params, cots, _, grads = run_mithril(name, case, "numpy")
    if name == "quantile_0.1":  # away from its ties
        params = {k: v + (0.5 if k == "input" else 0.0) for k, v in arrays(name, case).items()}
        params["input"][0, :3] += 0.5
        _, _, _, grads = _numpy_grads(case, params, cots)
    if name in ("bce_logits_mean", "sine", "cosine"):  # the huge inputs' steps would be lost
        params = {k: v[:3] for k, v in params.items()}
        case = Case(case.block, {k: v[:3] for k, v in case.inputs.items()}, case.torch_fn)
        _, _, _, grads = _numpy_grads(case, params, cots)
    fd = central_differences(scalar_loss(case, params, cots), params, 1e-6)
    # (at the squared hinge's kink a central difference is eps/4-sized, not 0)
    atol = 1e-5 if name == "quad_hinge" else 1e-7
    for k in params:
        np.testing.assert_allclose(grads[k], fd[k], rtol=1e-6, atol=atol, err_msg=f"{name} d/d{k}")


def _numpy_grads(case, params, cots):
    b = NumpyBackend(dtype="float64")
    m = ml.Model()
    m |= case.block()(**{k: k for k in [*case.inputs, *case.data]}, output="output")
    c = ml.compile(m, b, shapes={k: list(v.shape) for k, v in {**params, **case.data}.items()},
                   trainable_keys=set(case.inputs))
    out, g = c.evaluate(params, dict(case.data), output_gradients=cots)
    return params, cots, out, g


def _run(block, backend, data: dict, wrt=("input",)):
    """Output and gradients (cotangent 1) of ``block`` on ``data``."""
    m = ml.Model()
    m |= block(**{k: k for k in data}, output="output")
    c = ml.compile(m, backend, shapes={k: list(v.shape) for k, v in data.items()}, trainable_keys=set(wrt))
    p = {k: backend.array(v) for k, v in data.items() if k in wrt}
    d = {k: backend.array(v) for k, v in data.items() if k not in wrt}
    out, g = c.evaluate(p, d, output_gradients={"output": backend.array(np.ones(c.shapes["output"]))})
    return backend.to_numpy(out["output"]), {k: backend.to_numpy(v) for k, v in g.items()}


def test_bce_probabilities_at_0_and_1_as_torch_values_exact_gradients():
    """torch floors each log at -100 (a probability of 0 or 1 gives 100 or 0, never NaN):
    ours too, on every backend here; the gradient is the exact -t/p + (1-t)/(1-p), which is
    torch's own wherever p(1-p) >= 1e-12 (torch divides by max(p(1-p), 1e-12))."""
    p = np.array([0.0, 0.0, 1.0, 1.0, 1e-20, 1e-20, 1e-13, 0.5, 1 - 1e-9])
    t = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.3, 1.0])
    want = F.binary_cross_entropy(torch.tensor(p), torch.tensor(t), reduction="none").numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.where(p > 0, -t / np.where(p > 0, p, 1), 0) + np.where(p < 1, (1 - t) / (1 - p), 0)
    pt = torch.tensor(p, requires_grad=True)
    tg = torch.autograd.grad(F.binary_cross_entropy(pt, torch.tensor(t), reduction="sum"), pt)[0].numpy()
    usual = p * (1 - p) >= 1e-12
    np.testing.assert_allclose(exact[usual], tg[usual], rtol=1e-12)
    for backend in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        out, g = _run(ml.BinaryCrossEntropy("probs", reduction="none"), backend,
                      {"input": p[None], "target": t[None]})
        np.testing.assert_allclose(out[0], want, rtol=1e-12, err_msg=backend.name)
        np.testing.assert_allclose(g["input"][0], exact, rtol=1e-12, err_msg=backend.name)


def test_kl_divergence_of_a_zero_prediction_is_finite():
    """The robust log: q = 0 gives p·(log p − log c + 1) and the gradient −p/c (the
    published Mithril's), where torch's log gives inf."""
    c = np.finfo(np.float64).tiny
    for backend in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        out, g = _run(ml.KLDivergence(), backend, {"input": np.array([[0.0, 0.5]]),
                                                   "target": np.array([[0.25, 0.0]])})
        np.testing.assert_allclose(out, [[0.25 * (np.log(0.25) - np.log(c) + 1), 0.0]], rtol=1e-14)
        np.testing.assert_allclose(g["input"], [[-0.25 / c, 0.0]], rtol=1e-14)


@pytest.mark.parametrize("make, match", [
    (lambda: ml.AbsoluteError(reduction="avg"), "AbsoluteError: reduction must be one of"),
    (lambda: ml.QuantileLoss(quantile=1.5), r"QuantileLoss: quantile must be a finite number in \[0, 1\], got 1.5"),
    (lambda: ml.QuantileLoss(quantile=True), "QuantileLoss: quantile must be"),
    (lambda: ml.HingeLoss(reduction=None), "HingeLoss: reduction must be one of"),
    (lambda: ml.QuadHingeLoss(reduction="batchmean"), "QuadHingeLoss: reduction must be one of"),
    (lambda: ml.BinaryCrossEntropy(input_type="log_probs"), "BinaryCrossEntropy: input_type must be"),
    (lambda: ml.BinaryCrossEntropy(pos_weight=0), "BinaryCrossEntropy: pos_weight must be a finite number > 0"),
    (lambda: ml.BinaryCrossEntropy(pos_weight="auto"), "pos_weight must be a positive number .*'auto'"),
    (lambda: ml.BinaryCrossEntropy(cutoff=-1.0), "BinaryCrossEntropy: cutoff must be"),
    (lambda: ml.BinaryCrossEntropy(reduction="avg"), "BinaryCrossEntropy: reduction must be one of"),
    (lambda: ml.KLDivergence(reduction="batch"), "KLDivergence: reduction must be one of"),
    (lambda: ml.KLDivergence(cutoff=float("nan")), "KLDivergence: cutoff must be"),
])
def test_bad_arguments_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()
    with pytest.raises(TypeError, match="BinaryCrossEntropy: robust must be a bool"):
        ml.BinaryCrossEntropy(robust="yes")


@pytest.mark.parametrize("block", [ml.AbsoluteError, ml.HingeLoss, ml.QuantileLoss,
                                   ml.BinaryCrossEntropy, ml.KLDivergence])
def test_input_and_target_shapes_must_agree(block):
    m = ml.Model()
    m |= block()(input="input", target="target", output="output")
    with pytest.raises(ml.ShapeError, match="'input' has shape \\[2, 3\\] but 'target' has shape \\[2, 4\\]"):
        ml.compile(m, NumpyBackend(), shapes={"input": [2, 3], "target": [2, 4]})


@pytest.mark.parametrize("make, error, match", [
    (lambda: ml.Variance(axis="rows"), TypeError, "Variance: axis must be None, an int or a tuple of ints"),
    (lambda: ml.Variance(axis=(1, 1)), ValueError, "Variance: axis must not repeat an axis"),
    (lambda: ml.Variance(correction=-1), ValueError, "Variance: correction must be a finite number >= 0"),
    (lambda: ml.Variance(keepdim="yes"), TypeError, "Variance: keepdim must be a bool"),
    (lambda: ml.StableReciprocal(threshold=0.0), ValueError, "StableReciprocal: threshold must be"),
])
def test_bad_statistics_arguments_are_refused_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("axis", [2, -3, (0, -2)])
def test_variance_axis_out_of_range_or_repeated_for_the_rank(axis):
    m = ml.Model()
    m |= ml.Variance(axis=axis)(input="input", output="output")
    with pytest.raises(ml.ShapeError, match="Variance: axis"):
        ml.compile(m, NumpyBackend(), shapes={"input": [3, 4]})


@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_variance_of_fewer_elements_than_the_correction_is_inf_as_torch():
    x = np.arange(3.0)[None]
    for backend in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        out, _ = _run(ml.Variance(axis=1, correction=3), backend, {"input": x})
        assert np.isinf(out).all() and torch.var(torch.tensor(x), dim=1, correction=3).isinf().all()


def _permute(indices: np.ndarray, rows: int = 4):
    m = ml.Model()
    m |= ml.PermuteTensor()(input="input", indices="order", output="output")
    return m, {"input": [rows, 3], "order": list(indices.shape)}


@pytest.mark.parametrize("backend", [NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")],
                         ids=["numpy", "torch"])
def test_permute_tensor_refuses_indices_out_of_range_by_key(backend):
    m, shapes = _permute(np.zeros(4, np.int64))
    c = ml.compile(m, backend, shapes=shapes)
    x = backend.array(np.ones((4, 3)))
    for bad, shown in ((np.array([0, 1, 2, 4]), 4), (np.array([-5, 0, 1, 2]), -5)):
        with pytest.raises(ValueError, match=f"PermuteTensor: indices 'order': index {shown} is "
                                             "out of range for 4 rows"):
            c.evaluate({}, {"input": x, "order": backend.array(bad)})
    with pytest.raises(ml.DTypeError, match="input 'order': expected an integer dtype, got float64"):
        c.evaluate({}, {"input": x, "order": backend.array(np.zeros(4))})


@pytest.mark.parametrize("indices, rows, match", [
    (np.zeros((2, 2), np.int64), 4, "'indices' must be a vector, got shape \\[2, 2\\]"),
    (np.zeros(3, np.int64), 4, "'indices' \\[3\\] must be as long as the first axis of 'input' \\[4, 3\\]"),
])
def test_permute_tensor_shapes(indices, rows, match):
    m, shapes = _permute(indices, rows)
    with pytest.raises(ml.ShapeError, match=match):
        ml.compile(m, NumpyBackend(), shapes=shapes)


def test_polynomial_features_column_order_is_scikit_learns():
    """For d = 2, degree 2: x1, x2, x1², x1·x2, x2² (scikit-learn's order)."""
    out, _ = _run(ml.PolynomialFeatures(2), NumpyBackend(dtype="float64"), {"input": np.array([[2.0, 3.0]])})
    np.testing.assert_array_equal(out, [[2.0, 3.0, 4.0, 6.0, 9.0]])


@pytest.mark.parametrize("degree", [0, 1.5, True, "2"])
def test_polynomial_features_refuses_a_bad_degree(degree):
    with pytest.raises(ValueError, match="PolynomialFeatures: degree must be an int >= 1"):
        ml.PolynomialFeatures(degree)


def test_polynomial_features_needs_a_matrix():
    m = ml.Model()
    m |= ml.PolynomialFeatures(2)(input="input", output="output")
    with pytest.raises(ml.ShapeError, match="PolynomialFeatures: 'input' must be \\(N, d\\), got shape \\[2, 3, 4\\]"):
        ml.compile(m, NumpyBackend(), shapes={"input": [2, 3, 4]})


def test_distance_matrix_is_torch_cdist_of_the_modified_order():
    """norm 2.3 gives p = 2.3 (the modifier is the identity on [1, 5])."""
    rng = np.random.default_rng(3)
    x1, x2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    want = torch.cdist(torch.tensor(x1), torch.tensor(x2), p=2.3).numpy()
    for backend in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        out, _ = _run(ml.EncoderDistanceMatrix(), backend, {"input1": x1, "input2": x2, "norm": np.array([2.3])},
                      wrt=("input1",))
        np.testing.assert_allclose(out, want, rtol=1e-12)


def test_distance_matrix_arguments_and_shapes():
    with pytest.raises(TypeError, match="EncoderDistanceMatrix: robust must be a bool"):
        ml.EncoderDistanceMatrix(robust=1)
    m = ml.Model()
    m |= ml.EncoderDistanceMatrix()(input1="a", input2="b", norm="n", output="output")
    with pytest.raises(ml.ShapeError, match="input1 \\(features\\)' has shape \\[3\\] but 'input2 \\(features\\)' has shape \\[2\\]"):
        ml.compile(m, NumpyBackend(), shapes={"a": [4, 3], "b": [5, 2], "n": [1]})
    with pytest.raises(ml.ShapeError, match="'norm' must hold one number, got shape \\[2\\]"):
        ml.compile(m, NumpyBackend(), shapes={"a": [4, 3], "b": [5, 3], "n": [2]})


@pytest.mark.parametrize("block", [ml.RBFKernel, ml.PolynomialKernel])
def test_kernels_refuse_mismatched_features_and_non_scalar_coefficients(block):
    scalars = ("l_scale", "sigma") if block is ml.RBFKernel else ("poly_coef", "degree")
    m = ml.Model()
    m |= block()(input1="a", input2="b", **{k: k for k in scalars}, output="output")
    with pytest.raises(ml.ShapeError, match="'input2 \\(features\\)' has shape \\[2\\]"):
        ml.compile(m, NumpyBackend(), shapes={"a": [4, 3], "b": [5, 2], **{k: [1] for k in scalars}})
    with pytest.raises(ml.ShapeError, match=f"'{scalars[1]}' must hold one number, got shape \\[3\\]"):
        ml.compile(m, NumpyBackend(), shapes={"a": [4, 3], "b": [5, 3], scalars[0]: [1], scalars[1]: [3]})
    if block is ml.PolynomialKernel:
        with pytest.raises(TypeError, match="PolynomialKernel: robust must be a bool"):
            block(robust="no")
