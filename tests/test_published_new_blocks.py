"""The published Mithril's blocks added last: FloorDivide, Prod, NormModifier, MDSCore, MDS,
GaussProcessRegressionCore (with AddDiagonal, SymmetricSolve, TransposedDiagonal, GPRLoss),
PublishedRNNCell, PublishedLSTMCell and RowsOf, side by side with torch in float64 on NumPy,
torch and (slow, a subprocess) JAX: outputs and every gradient against torch autograd of a
direct torch expression (``torch.prod`` with one and two zeros in a slice, torch's
``div(rounding_mode="floor")``, ``torch.linalg.cholesky`` for the Gaussian process); the
NumPy gradients against central differences. ShiftLeft / ShiftRight (integers) against
torch's and NumPy's shifts. The integer cases are in ``test_published_new_blocks_cases.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import central_differences
from layer_edges import Case, arrays, parity_tests, run_mithril, scalar_loss

import mithril as ml

_RNG = np.random.default_rng(2026)


def _floor_div(t, d):
    return {"output": torch.div(t["numerator"], t["denominator"], rounding_mode="floor")}


def _prod(axis, keepdim=False):
    def ref(t, d):
        x = t["input"]
        axes = range(x.ndim) if axis is None else (axis,) if isinstance(axis, int) else axis
        for a in sorted((a % x.ndim for a in axes), reverse=True):
            x = torch.prod(x, dim=a, keepdim=keepdim)
        return {"output": x}
    return ref


_ZEROS = _RNG.uniform(0.5, 1.5, (3, 4, 2)) * np.sign(_RNG.standard_normal((3, 4, 2)))
_ZEROS[0, 1, 0] = 0.0  # one zero in the slice (0, :, 0)
_ZEROS[1, 0, 1] = _ZEROS[1, 3, 1] = 0.0  # two zeros in the slice (1, :, 1)
_ZEROS[2, 2, :] = 0.0  # one zero in each of two slices


def _norm_modifier(n):
    return 4.0 * (1.0 - 2.0 * torch.abs(torch.remainder(n - 1.0, 8) / 8 - 0.5)) + 1.0


def _stress(d, pd, norm, exact):
    """The published MDSCore's formula in torch (values away from the robust branches)."""
    p = _norm_modifier(norm)
    r = 1 / p
    if exact:
        return (torch.sum(torch.abs(d - pd ** r) ** p) / torch.sum(d ** p)) ** r
    return (torch.sum(torch.abs(d ** r - pd ** r) ** p) / torch.sum(d)) ** r


def _powered(x, p):
    return torch.sum(torch.abs(x[:, None, :] - x[None, :, :]) ** p, -1)


def _mds(t, d):
    p = _norm_modifier(t["norm"])
    safe = t["coords"][:, None, :] - t["coords"][None, :, :]
    # (|0|^p's gradient is 0 (ours and torch's for p > 1): the diagonal is 0)
    pd = torch.sum(torch.where(safe == 0, 0.0, torch.abs(safe)) ** p, -1)
    # (the robust power's root of a zero diagonal is 0 with a finite gradient)
    root = torch.where(pd == 0, 0.0, torch.where(pd == 0, 1.0, pd) ** (1 / p))
    out = (torch.sum(torch.abs(t["input"] ** (1 / p) - root) ** p)
           / torch.sum(t["input"])) ** (1 / p)
    return {"output": out, "predicted_coords": t["coords"] * 1.0}


def _gpr(t, d):
    k, s = t["k"], t["s"]
    n = k.shape[0]
    big_k = k + s * torch.eye(n, dtype=k.dtype)
    chol = torch.linalg.cholesky(big_k)
    diff = t["label"] - t["mu"]
    alpha = torch.cholesky_solve(diff, chol)
    loss = (0.5 * (diff.T @ alpha).reshape(1) + torch.log(torch.diagonal(chol)).sum()
            + n * math.log(2 * math.pi) / 2)
    v = torch.linalg.solve_triangular(chol, k, upper=False)
    conf = s + torch.abs(torch.diagonal(t["k_star"] - v.T @ v))[:, None]
    return {"loss": loss, "predictions": t["mu"] + k.T @ alpha, "confidence": conf}


def _rnn_cell(t, d):
    n = t["input"].shape[0]
    h = torch.tanh(t["input"] @ t["w_ih"].T + t["prev_hidden"][:n] @ t["w_hh"].T + t["bias_h"])
    return {"hidden": h, "output": h @ t["w_ho"].T + t["bias_o"],
            "hidden_compl": t["prev_hidden"][n:] * 1.0}


def _lstm_cell(t, d):
    """torch's own LSTM step (gates i, f, g, o) from the published weights."""
    n, i = t["input"].shape[0], t["input"].shape[-1]
    w = {g: t[f"w_{g}"] for g in "ifco"}
    h2, c2 = torch._VF.lstm_cell(t["input"][:, 0], (t["prev_hidden"][:n, 0], t["prev_cell"][:n, 0]),
                                 torch.cat([w[g][:, :i] for g in "ifco"]),
                                 torch.cat([w[g][:, i:] for g in "ifco"]),
                                 torch.cat([t[f"bias_{g}"] for g in "ifco"]), None)
    h2, c2 = h2[:, None], c2[:, None]
    return {"hidden": h2, "cell": c2, "output": h2 @ t["w_out"].T + t["bias_out"],
            "hidden_compl": t["prev_hidden"][n:] * 1.0}


def _spd(n, seed):
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a @ a.T / n + 0.5 * np.eye(n)


def _distances(x):
    return (np.abs(x[:, None] - x[None]) ** 2.0).sum(-1)


_PTS = _RNG.standard_normal((4, 2))
_H, _I, _O = 3, 2, 2
_LSTM_IN = {"input": (2, 1, _I), "prev_hidden": (3, 1, _H), "prev_cell": (3, 1, _H),
            **{f"w_{g}": (_H, _I + _H) for g in "fico"}, **{f"bias_{g}": (_H,) for g in "fico"},
            "w_out": (_O, _H), "bias_out": (_O,)}

CASES = {
    "floor_divide": Case(ml.FloorDivide, {"numerator": (3, 4), "denominator": (4,)}, _floor_div),
    "prod_axis_0": Case(lambda: ml.Prod(axis=0), {"input": (5, 3)}, _prod(0)),
    "prod_all": Case(ml.Prod, {"input": (2, 3)}, _prod(None)),
    "prod_zeros_axis_1": Case(lambda: ml.Prod(axis=1), {"input": _ZEROS}, _prod(1)),
    "prod_zeros_two_axes_keepdim": Case(lambda: ml.Prod(axis=(0, -1), keepdim=True),
                                        {"input": _ZEROS}, _prod((0, 2), True)),
    "norm_modifier": Case(ml.NormModifier, {"input": np.array([-3.7, 0.2, 2.0, 4.4, 6.1, 12.5])},
                          lambda t, d: {"output": _norm_modifier(t["input"])}),
    "mds_core_exact": Case(lambda: ml.MDSCore(robust=False),
                           {"distances": np.sqrt(_distances(_PTS)) + 0.1,
                            "pred_distances": _distances(_RNG.standard_normal((4, 2))) + 0.2,
                            "norm": np.array(2.6)},
                           lambda t, d: {"output": _stress(t["distances"], t["pred_distances"],
                                                           t["norm"], True)}),
    "mds_core_powered": Case(lambda: ml.MDSCore(exact_distances=False),
                             {"distances": _distances(_PTS) + 0.1,
                              "pred_distances": _distances(_RNG.standard_normal((4, 2))) + 0.2,
                              "norm": np.array(3.3)},
                             lambda t, d: {"output": _stress(t["distances"], t["pred_distances"],
                                                             t["norm"], False)}),
    "mds_powered_distances": Case(lambda: ml.MDS(prediction_dim=2, input_type="powered_distances"),
                                  {"input": _distances(_PTS) + 0.3, "coords": (4, 2),
                                   "norm": np.array(2.4)}, _mds,
                                  outputs=("output", "predicted_coords")),
    "gpr_core": Case(ml.GaussProcessRegressionCore,
                     {"label": (4, 1), "s": np.array([0.7]), "k": _spd(4, 1), "k_star": _spd(4, 2),
                      "mu": (4, 1)}, _gpr, outputs=("loss", "predictions", "confidence")),
    "symmetric_solve": Case(ml.SymmetricSolve, {"matrix": _spd(3, 3) + np.triu(np.ones((3, 3)), 1) * 0.3,
                                                "input": (3, 2)},
                            lambda t, d: {"output": torch.linalg.solve(
                                (t["matrix"] + t["matrix"].T) / 2, t["input"])}),
    "rnn_cell": Case(ml.PublishedRNNCell, {"input": (2, 1, _I), "prev_hidden": (3, 1, _H),
                                           "w_ih": (_H, _I), "w_hh": (_H, _H), "bias_h": (_H,),
                                           "w_ho": (_O, _H), "bias_o": (_O,)}, _rnn_cell,
                     outputs=("hidden", "output", "hidden_compl")),
    "lstm_cell": Case(ml.PublishedLSTMCell, _LSTM_IN, _lstm_cell,
                      outputs=("hidden", "cell", "output", "hidden_compl")),
}

test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES)
test_jax_equals_torch = pytest.mark.slow(test_jax_equals_torch)  # (a JAX process)

#: no kink near the inputs (|x| of a nonzero difference; products): central differences apply
SMOOTH = ["prod_axis_0", "prod_zeros_axis_1", "prod_zeros_two_axes_keepdim", "mds_core_exact",
          "mds_core_powered", "gpr_core", "symmetric_solve", "rnn_cell", "lstm_cell"]


@pytest.mark.parametrize("name", SMOOTH)
def test_numpy_gradients_match_central_differences(name):
    case = CASES[name]
    params, cots, _, grads = run_mithril(name, case, "numpy")
    fd = central_differences(scalar_loss(case, params, cots), params, 1e-6)
    for k in params:
        np.testing.assert_allclose(grads[k], fd[k], rtol=1e-6, atol=1e-7, err_msg=f"{name} d/d{k}")


def test_prod_gradient_with_zeros_is_exact_not_nan():
    """One zero in a slice: the others' product there, 0 elsewhere; two: 0 (as torch), where
    out / x would give 0/0."""
    x = arrays("prod_zeros_axis_1", CASES["prod_zeros_axis_1"])["input"]
    params, cots, out, grads = run_mithril("prod_zeros_axis_1", CASES["prod_zeros_axis_1"], "numpy")
    g = grads["input"]
    assert np.isfinite(g).all()
    others = np.prod(np.delete(x[0, :, 0], 1))
    assert g[0, 1, 0] == pytest.approx(others * cots["output"][0, 0], rel=1e-14)
    assert (g[1, :, 1] == 0).all() and (g[0, [0, 2, 3], 0] == 0).all()


def test_gpr_gradient_is_symmetric_in_the_kernel_through_the_solve():
    """k enters K = k + s·I through its symmetric part (torch's Cholesky convention): the
    loss's gradient in k is symmetric (the loss reads k only through K)."""
    case = Case(ml.GaussProcessRegressionCore, CASES["gpr_core"].inputs, _gpr, outputs=("loss",))
    _, _, _, grads = run_mithril("gpr_loss_only", case, "numpy")
    np.testing.assert_allclose(grads["k"], grads["k"].T, rtol=1e-13, atol=1e-15)
