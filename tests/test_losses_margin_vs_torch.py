"""torch's margin, embedding and likelihood losses side by side with
``torch.nn.functional``: MarginRankingLoss, HingeEmbeddingLoss, SoftMarginLoss,
CosineEmbeddingLoss, TripletMarginLoss, MultiMarginLoss, MultiLabelMarginLoss,
MultiLabelSoftMarginLoss, PoissonNLLLoss and GaussianNLLLoss.

Every option and reduction, in float64: the output and every input gradient on NumPy and
torch in process and on JAX in a fresh x64 process, within 1e-10 of torch autograd's
(relative to max(1, |torch|)), at the edges: pairs exactly at the margin (torch's
clamp_min passes the gradient there, its multi-margin kernels do not), zero-norm vectors in
the cosine, a zero difference in the triplet distance, swap ties, variances below the
GaussianNLL clamp; NumPy's gradients against central differences where the loss is smooth
(the targets torch does not differentiate included); bad arguments and inputs refused with
an error naming the block and the argument, shape or data key."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import Case, parity_tests, run_mithril, scalar_loss

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.errors import ShapeError

REDUCTIONS = ("mean", "sum", "none")
_RNG = np.random.default_rng(1443)


def _signs(*shape: int, zero: bool = False) -> np.ndarray:
    y = _RNG.choice([-1.0, 1.0], shape)
    if zero and y.size:
        y.reshape(-1)[0] = 0.0  # neither label: torch's own rule for it
    return y


def _ref(fn: Any, *keys: str, **kw: Any) -> Any:
    """A torch reference ``fn(*inputs by key, **kw)``, each input trainable or data."""
    def ref(t: dict, d: dict) -> dict:
        return {"output": fn(*[t[k] if k in t else d[k] for k in keys], **kw)}
    return ref


CASES: dict[str, Case] = {}
SMOOTH: list[str] = []  # (no tie, no clamp: for central differences)


def _add(name: str, case: Case, smooth: bool = False) -> None:
    CASES[name] = case
    if smooth:
        SMOOTH.append(name)


# -- MarginRankingLoss: target differentiable, as torch's ----------------------------------
_X2 = np.array([[0.25, 0.5, -1.0, 2.0], [1.5, -0.75, 0.0, 0.125]])
_Y = np.array([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, 1.0, -1.0]])
for m in (0.0, 0.5, -0.25):
    for r in REDUCTIONS:
        _add(f"margin_ranking m={m} {r}", Case(
            lambda m=m, r=r: ml.MarginRankingLoss(margin=m, reduction=r),
            {"input1": (3, 4), "input2": (3, 4), "target": _signs(3, 4)},
            _ref(F.margin_ranking_loss, "input1", "input2", "target", margin=m, reduction=r)),
            smooth=True)
    # every pair exactly at the margin: y·(x1 − x2) = margin (exact in binary)
    _add(f"margin_ranking ties m={m}", Case(
        lambda m=m: ml.MarginRankingLoss(margin=m, reduction="sum"),
        {"input1": _X2 + _Y * m, "input2": _X2, "target": _Y},
        _ref(F.margin_ranking_loss, "input1", "input2", "target", margin=m, reduction="sum")))
_add("margin_ranking 0-d", Case(lambda: ml.MarginRankingLoss(0.1, reduction="none"),
                               {"input1": (), "input2": (), "target": np.array(-1.0)},
                               _ref(F.margin_ranking_loss, "input1", "input2", "target",
                                    margin=0.1, reduction="none")), smooth=True)

# -- HingeEmbeddingLoss: the label is data (torch gives it no gradient) -----------------
for m in (1.0, 2.0, -0.5):
    for r in REDUCTIONS:
        _add(f"hinge_embedding m={m} {r}", Case(
            lambda m=m, r=r: ml.HingeEmbeddingLoss(margin=m, reduction=r),
            {"input": (4, 5)}, _ref(F.hinge_embedding_loss, "input", "target", margin=m,
                                    reduction=r), data={"target": _signs(4, 5, zero=True)}),
            smooth=True)
    _add(f"hinge_embedding ties m={m}", Case(  # inputs exactly at the margin
        lambda m=m: ml.HingeEmbeddingLoss(margin=m, reduction="none"),
        {"input": np.array([m, m, m + 1.0, m - 1.0])},
        _ref(F.hinge_embedding_loss, "input", "target", margin=m, reduction="none"),
        data={"target": np.array([-1.0, 0.0, -1.0, 1.0])}))

# -- SoftMarginLoss: torch refuses a target that requires grad -----------------------------
for r in REDUCTIONS:
    for scale in (1.0, 30.0):
        _add(f"soft_margin x{scale} {r}", Case(
            lambda r=r: ml.SoftMarginLoss(reduction=r),
            {"input": scale * _RNG.standard_normal((3, 4))},
            _ref(F.soft_margin_loss, "input", "target", reduction=r),
            data={"target": _signs(3, 4)}), smooth=scale == 1.0)

# -- CosineEmbeddingLoss ------------------------------------------------------------------
_A = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [3.0, -1.0, 0.5],
               [0.0, 0.0, 0.0]])
_B = np.array([[1.0, 0.0, 2.0], [1.0, 2.0, -1.0], [1.0, -1.0, 0.0], [0.5, 1.0, 1.0],
               [0.0, 0.0, 0.0]])
for m in (0.0, 0.3, -0.5):
    for r in REDUCTIONS:
        _add(f"cosine m={m} {r}", Case(
            lambda m=m, r=r: ml.CosineEmbeddingLoss(margin=m, reduction=r),
            {"input1": (4, 6), "input2": (4, 6)},
            _ref(F.cosine_embedding_loss, "input1", "input2", "target", margin=m, reduction=r),
            data={"target": _signs(4, zero=True)}), smooth=True)
# zero-norm vectors (cosine 0, a tie with margin 0 and its gradient ~1e6), orthogonal pairs
for y in (-1.0, 1.0):
    _add(f"cosine zero-norm y={y}", Case(
        lambda: ml.CosineEmbeddingLoss(reduction="none"), {"input1": _A, "input2": _B},
        _ref(F.cosine_embedding_loss, "input1", "input2", "target", reduction="none"),
        data={"target": np.full(5, y)}))
_add("cosine 1-d", Case(lambda: ml.CosineEmbeddingLoss(0.1), {"input1": (5,), "input2": (5,)},
                        _ref(F.cosine_embedding_loss, "input1", "input2", "target", margin=0.1),
                        data={"target": np.array(-1.0)}))

# -- TripletMarginLoss --------------------------------------------------------------------
_TRIPLET = ("anchor", "positive", "negative")
for p in (2.0, 1.0, 3.0, 0.5, math.inf):
    for swap in (False, True):
        for r in REDUCTIONS:
            _add(f"triplet p={p} swap={swap} {r}", Case(
                lambda p=p, swap=swap, r=r: ml.TripletMarginLoss(
                    margin=2.0, p=p, swap=swap, reduction=r),
                {k: (4, 3) for k in _TRIPLET},
                _ref(F.triplet_margin_loss, *_TRIPLET, margin=2.0, p=p, swap=swap,
                     reduction=r)), smooth=p != math.inf)
# eps = 0: a zero difference (anchor = positive), the hinge exactly at 0, swap ties
# (D(a, n) = D(p, n)), ties of the max norm
_EDGE = {"anchor": np.array([[0.0, 0.0], [1.0, 2.0], [0.5, -0.5]]),
         "positive": np.array([[1.0, 0.0], [1.0, 2.0], [0.5, -0.5]]),
         "negative": np.array([[0.0, 1.0], [2.0, 2.0], [1.5, 0.5]])}
for p in (2.0, 1.0, 0.5, math.inf):
    for swap in (False, True):
        _add(f"triplet edges p={p} swap={swap}", Case(
            lambda p=p, swap=swap: ml.TripletMarginLoss(1.0, p=p, eps=0.0, swap=swap,
                                                        reduction="none"),
            dict(_EDGE), _ref(F.triplet_margin_loss, *_TRIPLET, margin=1.0, p=p, eps=0.0,
                              swap=swap, reduction="none")))
_add("triplet 1-d and 3-d", Case(lambda: ml.TripletMarginLoss(0.5, eps=1e-3),
                                 {k: (2, 3, 4) for k in _TRIPLET},
                                 _ref(F.triplet_margin_loss, *_TRIPLET, margin=0.5,
                                      eps=1e-3)), smooth=True)
_add("triplet (D,)", Case(lambda: ml.TripletMarginLoss(reduction="none"),
                          {k: (5,) for k in _TRIPLET},
                          _ref(F.triplet_margin_loss, *_TRIPLET, reduction="none")), smooth=True)

# -- MultiMarginLoss (class indices: data) ------------------------------------------------
_W4 = [0.5, 2.0, 1.0, 3.0]
for p in (1, 2):
    for m, w in ((1.0, None), (0.5, _W4), (-0.25, None), (2.0, _W4)):
        for r in REDUCTIONS:
            _add(f"multi_margin p={p} m={m} w={w is not None} {r}", Case(
                lambda p=p, m=m, w=w, r=r: ml.MultiMarginLoss(p=p, margin=m, weight=w,
                                                              reduction=r),
                {"input": (5, 4)},
                lambda t, d, p=p, m=m, w=w, r=r: {"output": F.multi_margin_loss(
                    t["input"], d["target"], p=p, margin=m, reduction=r,
                    weight=None if w is None else torch.tensor(w, dtype=torch.float64))},
                data={"target": np.array([0, 3, 1, 1, 2])}), smooth=True)
    # x[i] − x[y] exactly −margin (the term is 0: no gradient, torch's kernel) and above
    _add(f"multi_margin ties p={p}", Case(
        lambda p=p: ml.MultiMarginLoss(p=p, margin=0.5, weight=_W4, reduction="none"),
        {"input": np.array([[1.0, 0.5, 0.75, -1.0], [0.0, 0.25, 0.5, -0.25]])},
        lambda t, d, p=p: {"output": F.multi_margin_loss(
            t["input"], d["target"], p=p, margin=0.5, weight=torch.tensor(_W4, dtype=torch.float64),
            reduction="none")}, data={"target": np.array([0, 2])}))
_add("multi_margin (C,)", Case(lambda: ml.MultiMarginLoss(reduction="none"), {"input": (6,)},
                               _ref(F.multi_margin_loss, "input", "target", reduction="none"),
                               data={"target": np.array(4)}), smooth=True)

# -- MultiLabelMarginLoss: class lists padded with -1 ---------------------------------
_LABELS = np.array([[3, 0, -1, 1, 1], [1, 1, -1, 0, 4], [2, 4, 0, 1, 3], [-1, 2, 2, 0, 0],
                    [4, -1, -1, -1, 2], [0, 2, 0, -1, 3]])
for r in REDUCTIONS:
    _add(f"multilabel_margin {r}", Case(
        lambda r=r: ml.MultiLabelMarginLoss(reduction=r), {"input": (6, 5)},
        _ref(F.multilabel_margin_loss, "input", "target", reduction=r),
        data={"target": _LABELS}), smooth=True)
_add("multilabel_margin ties", Case(  # x[j] − x[i] exactly 1 (no gradient), and 0.5, 2
    lambda: ml.MultiLabelMarginLoss(reduction="none"),
    {"input": np.array([[1.5, 0.5, 1.0, -0.5], [0.0, 1.0, 2.0, 0.0]])},
    _ref(F.multilabel_margin_loss, "input", "target", reduction="none"),
    data={"target": np.array([[0, -1, 2, 2], [2, 1, -1, 0]])}))
_add("multilabel_margin (C,)", Case(lambda: ml.MultiLabelMarginLoss(), {"input": (4,)},
                                    _ref(F.multilabel_margin_loss, "input", "target"),
                                    data={"target": np.array([2, 0, -1, 3])}), smooth=True)

# -- MultiLabelSoftMarginLoss: the target differentiable, as torch's ---------------------
for w in (None, [0.5, 2.0, 1.0], [1.5]):
    for r in REDUCTIONS:
        _add(f"multilabel_soft_margin w={w} {r}", Case(
            lambda w=w, r=r: ml.MultiLabelSoftMarginLoss(weight=w, reduction=r),
            {"input": 3.0 * _RNG.standard_normal((4, 3)), "target": _RNG.uniform(0, 1, (4, 3))},
            lambda t, d, w=w, r=r: {"output": F.multilabel_soft_margin_loss(
                t["input"], t["target"],
                weight=None if w is None else torch.tensor(w, dtype=torch.float64),
                reduction=r)}), smooth=True)
_add("multilabel_soft_margin 3-d", Case(
    lambda: ml.MultiLabelSoftMarginLoss(reduction="none"),
    {"input": (2, 3, 4), "target": _RNG.choice([0.0, 1.0], (2, 3, 4))},
    _ref(F.multilabel_soft_margin_loss, "input", "target", reduction="none")), smooth=True)

# -- PoissonNLLLoss -----------------------------------------------------------------------
_COUNTS = np.array([[0.0, 1.0, 2.0, 5.0], [0.5, 3.0, 1.5, 10.0], [7.0, 1.0, 4.0, 2.0]])
_RATES = _RNG.uniform(0.05, 4.0, (3, 4))
for log_input in (True, False):
    for full in (False, True):
        for r in REDUCTIONS:
            x = _RNG.standard_normal((3, 4)) if log_input else _RATES
            ref = _ref(F.poisson_nll_loss, "input", "target", log_input=log_input, full=full,
                       reduction=r)
            # torch's Stirling-term target gradient is NaN at t = 0: the target is data there
            trained = {"input": x} if full else {"input": x, "target": _COUNTS}
            _add(f"poisson log={log_input} full={full} {r}", Case(
                lambda log_input=log_input, full=full, r=r: ml.PoissonNLLLoss(
                    log_input=log_input, full=full, reduction=r), trained, ref,
                data={} if not full else {"target": _COUNTS}), smooth=True)
_T1 = np.array([[0.5, 3.0, 1.5, 10.0], [7.0, 0.25, 4.0, 2.0]])  # no 0 (torch's target
# gradient is NaN there) and no 1 (the Stirling term jumps there: no central differences)
_add("poisson full target grad", Case(
    lambda: ml.PoissonNLLLoss(log_input=False, full=True, eps=0.5, reduction="sum"),
    {"input": _RATES[1:], "target": _T1},
    _ref(F.poisson_nll_loss, "input", "target", log_input=False, full=True, eps=0.5,
         reduction="sum")), smooth=True)

# -- GaussianNLLLoss: var of each layout, values below the clamp -------------------------
_V = _RNG.uniform(0.1, 2.0, (3, 4))
for full in (False, True):
    for r in REDUCTIONS:
        for layout, v in (("same", _V), ("rows", _V[:, 0]), ("axis1", _V[:1]),
                          ("last1", _V[:, :1])):
            _add(f"gaussian full={full} var={layout} {r}", Case(
                lambda full=full, r=r: ml.GaussianNLLLoss(full=full, reduction=r),
                {"input": (3, 4), "target": (3, 4), "var": v},
                _ref(F.gaussian_nll_loss, "input", "target", "var", full=full, reduction=r)),
                smooth=True)
_add("gaussian clamp", Case(  # var 0, below eps, at eps: the clamped value's gradient
    lambda: ml.GaussianNLLLoss(eps=1e-3, reduction="none"),
    {"input": (2, 3), "target": (2, 3), "var": np.array([[0.0, 1e-4, 1e-3], [2e-3, 0.5, 0.0]])},
    _ref(F.gaussian_nll_loss, "input", "target", "var", eps=1e-3, reduction="none")))

# The JAX column (a fresh x64 process, a compile per case) runs every edge case and one case
# of each option by default, and the rest with ``-m slow``.
_EDGES = re.compile(r"ties|edges|zero-norm|clamp|1-d|\(C,\)|\(D,\)|0-d|3-d|target grad")
JAX_NAMES = [n for n in CASES if _EDGES.search(n)] + [
    "margin_ranking m=-0.25 none", "hinge_embedding m=2.0 mean", "soft_margin x30.0 none",
    "cosine m=0.3 none", "triplet p=3.0 swap=True none", "triplet p=inf swap=True sum",
    "multi_margin p=2 m=0.5 w=True none", "multi_margin p=1 m=-0.25 w=False sum",
    "multilabel_margin none", "multilabel_soft_margin w=[0.5, 2.0, 1.0] none",
    *(f"poisson log={a} full={b} none" for a in (True, False) for b in (False, True)),
    *(f"gaussian full=True var={v} none" for v in ("same", "rows", "axis1", "last1")),
    "gaussian full=False var=rows mean"]
test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_losses_margin_vs_torch", CASES, jax_default=JAX_NAMES)


# -- central differences of the NumPy VJP, every differentiable input ---------------------
_FD_EXTRA = {  # the targets torch does not differentiate: the true derivative here
    "soft_margin target": Case(lambda: ml.SoftMarginLoss(), {"input": (3, 4),
                                                             "target": _signs(3, 4)}, None),
    "poisson full target at t<=1": Case(
        lambda: ml.PoissonNLLLoss(full=True, reduction="sum"),
        {"input": (2, 3), "target": np.array([[0.25, 0.5, 3.0], [0.75, 2.5, 1.25]])}, None),
}


@pytest.mark.parametrize("name", [*SMOOTH[::3], *_FD_EXTRA])
def test_numpy_gradient_equals_central_differences(name: str) -> None:
    case = CASES.get(name) or _FD_EXTRA[name]
    params, cots, _, grads = run_mithril(name, case, "numpy")
    fd = central_differences(scalar_loss(case, params, cots), params, 1e-6)
    for k, want in fd.items():
        assert np.abs(grads[k] - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), k


# -- conventions, measured directly -----------------------------------------------------
def _run(block: Any, data: dict, trainable: dict, backend: Any = None) -> tuple[dict, dict]:
    backend = backend or NumpyBackend(dtype="float64")
    model = ml.Model()
    keys = [*trainable, *data]
    model |= block(**{k: k for k in keys}, output="output")
    shapes = {k: list(np.shape(v)) for k, v in {**trainable, **data}.items()}
    c = ml.compile(model, backend, shapes=shapes, trainable_keys=set(trainable))
    out, grads = c.evaluate({k: backend.array(v) for k, v in trainable.items()},
                            {k: backend.array(v) for k, v in data.items()},
                            output_gradients={"output": backend.array(np.ones(
                                c.program.output_shape("output")))})[:2]
    f = backend.to_numpy
    return {"output": np.asarray(f(out["output"]))}, {k: np.asarray(f(g)) for k, g in grads.items()}


def test_ties_at_the_margin_follow_torch() -> None:
    """clamp_min-style hinges pass the gradient at 0; the multi-margin kernels do not."""
    _, g = _run(ml.MarginRankingLoss(margin=0.5, reduction="sum"), {},
                {"input1": np.array([1.0]), "input2": np.array([0.5]), "target": np.array([1.0])})
    np.testing.assert_array_equal(g["input1"], [-1.0])  # the hinge's argument is exactly 0
    out, g = _run(ml.MultiMarginLoss(margin=0.5, reduction="sum"),
                  {"target": np.array([0])}, {"input": np.array([[1.0, 0.5, 0.75]])})
    np.testing.assert_allclose(out["output"], 0.25 / 3)
    np.testing.assert_array_equal(g["input"], [[-1 / 3, 0.0, 1 / 3]])  # the tie: no gradient


def test_cosine_of_a_zero_vector_is_zero() -> None:
    out, g = _run(ml.CosineEmbeddingLoss(reduction="none"), {"target": np.array([1.0, -1.0])},
                  {"input1": np.zeros((2, 2)), "input2": np.array([[1.0, 2.0], [3.0, 4.0]])})
    np.testing.assert_array_equal(out["output"], [1.0, 0.0])
    assert np.isfinite(g["input1"]).all() and np.abs(g["input1"]).max() > 1e5


def test_gaussian_var_gradient_through_the_clamp() -> None:
    """torch clamps under no_grad: the gradient is ½·(1/eps − d²/eps²) at var < eps."""
    eps, d = 0.01, 0.5
    _, g = _run(ml.GaussianNLLLoss(eps=eps, reduction="sum"), {},
                {"input": np.array([d]), "target": np.array([0.0]), "var": np.array([0.0])})
    np.testing.assert_allclose(g["var"], [0.5 * (1 / eps - d * d / eps**2)], rtol=1e-12)


def test_soft_margin_is_finite_where_torchs_overflows() -> None:
    out, g = _run(ml.SoftMarginLoss(reduction="sum"), {"target": np.array([1.0])},
                  {"input": np.array([-800.0])})
    assert float(F.soft_margin_loss(torch.tensor([-800.0], dtype=torch.float64),
                                    torch.tensor([1.0], dtype=torch.float64))) == math.inf
    np.testing.assert_allclose(out["output"], 800.0)
    np.testing.assert_allclose(g["input"], [-1.0])


# -- bad arguments and inputs -------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: ml.TripletMarginLoss(margin=0.0), r"TripletMarginLoss: margin must be a finite "
     r"number > 0"),
    (lambda: ml.TripletMarginLoss(margin=-1.0), r"TripletMarginLoss: margin must be"),
    (lambda: ml.TripletMarginLoss(p=0), r"TripletMarginLoss: p \(or math.inf\) must be"),
    (lambda: ml.TripletMarginLoss(swap="yes"), r"TripletMarginLoss: swap must be a bool"),
    (lambda: ml.TripletMarginLoss(eps=math.nan), r"TripletMarginLoss: eps must be"),
    (lambda: ml.MarginRankingLoss(margin="1"), r"MarginRankingLoss: margin must be"),
    (lambda: ml.HingeEmbeddingLoss(reduction="batchmean"),
     r"HingeEmbeddingLoss: reduction must be one of"),
    (lambda: ml.CosineEmbeddingLoss(margin=math.inf), r"CosineEmbeddingLoss: margin must be"),
    (lambda: ml.SoftMarginLoss(reduction=None), r"SoftMarginLoss: reduction must be"),
    (lambda: ml.MultiMarginLoss(p=3), r"MultiMarginLoss: p must be 1 or 2"),
    (lambda: ml.MultiMarginLoss(weight=[[1.0, 2.0]]), r"MultiMarginLoss: weight must be a 1-d"),
    (lambda: ml.MultiMarginLoss(weight=[1.0, math.nan]), r"MultiMarginLoss: weight must be"),
    (lambda: ml.MultiLabelSoftMarginLoss(weight=[]), r"MultiLabelSoftMarginLoss: weight must"),
    (lambda: ml.PoissonNLLLoss(log_input="yes"), r"PoissonNLLLoss: log_input must be a bool"),
    (lambda: ml.PoissonNLLLoss(eps=-1e-8), r"PoissonNLLLoss: eps must be a finite number >= 0"),
    (lambda: ml.GaussianNLLLoss(eps=-1.0), r"GaussianNLLLoss: eps must be"),
    (lambda: ml.GaussianNLLLoss(full=1), r"GaussianNLLLoss: full must be a bool"),
])
def test_bad_arguments_are_named(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("block, shapes, match", [
    (lambda: ml.MarginRankingLoss(), {"input1": [3], "input2": [3], "target": [4]},
     r"MarginRankingLoss: .*'target' has shape \[4\]"),
    (lambda: ml.TripletMarginLoss(), {"anchor": [2, 3], "positive": [2, 3], "negative": [3]},
     r"TripletMarginLoss: .*'negative' has shape \[3\]"),
    (lambda: ml.TripletMarginLoss(), {"anchor": [], "positive": [], "negative": []},
     r"TripletMarginLoss: .*need an axis of features"),
    (lambda: ml.CosineEmbeddingLoss(), {"input1": [2, 3, 4], "input2": [2, 3, 4],
                                        "target": [2]}, r"CosineEmbeddingLoss: .*\(N, D\)"),
    (lambda: ml.CosineEmbeddingLoss(), {"input1": [2, 3], "input2": [2, 3], "target": [3]},
     r"CosineEmbeddingLoss: .*'target' has shape \[3\].*one label per row"),
    (lambda: ml.HingeEmbeddingLoss(), {"input": [2, 3], "target": [3, 2]},
     r"HingeEmbeddingLoss: .*'target' has shape \[3, 2\]"),
    (lambda: ml.MultiMarginLoss(weight=[1.0, 2.0]), {"input": [4, 3], "target": [4]},
     r"MultiMarginLoss: weight has 2 entries but the input \[4, 3\] has 3 classes"),
    (lambda: ml.MultiMarginLoss(), {"input": [4, 3], "target": [5]},
     r"MultiMarginLoss: .*'target' has shape \[5\]"),
    (lambda: ml.MultiMarginLoss(), {"input": [2, 4, 3], "target": [2, 4]},
     r"MultiMarginLoss: input must be \(N, C\) or \(C,\)"),
    (lambda: ml.MultiLabelMarginLoss(), {"input": [4, 3], "target": [4, 2]},
     r"MultiLabelMarginLoss: .*padded with -1"),
    (lambda: ml.MultiLabelSoftMarginLoss(weight=[1.0, 2.0]), {"input": [4, 3],
                                                               "target": [4, 3]},
     r"MultiLabelSoftMarginLoss: weight has 2 entries"),
    (lambda: ml.GaussianNLLLoss(), {"input": [3, 4], "target": [3, 4], "var": [1, 1]},
     r"GaussianNLLLoss: var has shape \[1, 1\]"),
    (lambda: ml.GaussianNLLLoss(), {"input": [3, 4], "target": [3, 4], "var": [4]},
     r"GaussianNLLLoss: var has shape \[4\]"),
    (lambda: ml.PoissonNLLLoss(), {"input": [3], "target": [2]},
     r"PoissonNLLLoss: .*'target' has shape \[2\]"),
])
def test_bad_shapes_are_named(block: Any, shapes: dict, match: str) -> None:
    model = ml.Model()
    model |= block()(**{k: k for k in shapes}, output="output")
    with pytest.raises(ShapeError, match=match):
        ml.compile(model, NumpyBackend(dtype="float64"), shapes=shapes,
                   data_keys={k for k in shapes})


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend])
@pytest.mark.parametrize("block, x, target, match", [
    (lambda: ml.MultiMarginLoss(), np.zeros((2, 3)), np.array([0, 3]),
     r"MultiMarginLoss: target 'target' holds class index 3 out of range: .* \[0, 2\]"),
    (lambda: ml.MultiMarginLoss(), np.zeros((2, 3)), np.array([-1, 0]),
     r"MultiMarginLoss: target 'target' holds class index -1"),
    (lambda: ml.MultiLabelMarginLoss(), np.zeros((1, 3)), np.array([[0, -2, 1]]),
     r"MultiLabelMarginLoss: target 'target' holds class index -2 .* \[-1, 2\]"),
    (lambda: ml.MultiLabelMarginLoss(), np.zeros((1, 3)), np.array([[0, -1, 3]]),
     r"MultiLabelMarginLoss: target 'target' holds class index 3"),
])
def test_bad_class_indices_are_named(backend: Any, block: Any, x: np.ndarray,
                                     target: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _run(block(), {"target": target}, {"input": x}, backend(dtype="float64"))


@pytest.mark.parametrize("backend", [NumpyBackend, TorchBackend])
def test_negative_variance_is_named(backend: Any) -> None:
    with pytest.raises(ValueError, match=r"GaussianNLLLoss: var 'var' has negative entries"):
        _run(ml.GaussianNLLLoss(), {"var": np.array([1.0, -0.5])},
             {"input": np.zeros(2), "target": np.zeros(2)}, backend(dtype="float64"))


# -- in a training model: parameter gradients through the losses --------------------------
@pytest.mark.parametrize("backend_cls", [NumpyBackend, TorchBackend])
def test_train_model_gradients_equal_torch(backend_cls: Any) -> None:
    """A Linear layer under MultiMarginLoss + CosineEmbeddingLoss + GaussianNLLLoss (var per
    row) as TrainModel losses: final_cost and the weight and bias gradients equal torch's."""
    from mithril.models import Mean, TrainModel

    model = ml.Model()
    model |= ml.Linear(4)(input="input", output=ml.IOKey("emb"))
    tm = TrainModel(model)
    tm.add_loss(ml.MultiMarginLoss(p=2, margin=0.5, weight=_W4), [Mean()], input="emb",
                target="labels")
    tm.add_loss(ml.CosineEmbeddingLoss(margin=0.2), [Mean()], input1="emb", input2="other",
                target="same")
    tm.add_loss(ml.GaussianNLLLoss(full=True), [Mean()], input="emb", target="obs", var="var")
    backend = backend_cls(dtype="float64")
    c = ml.compile(tm, backend, shapes={"input": [6, 3], "other": [6, 4], "obs": [6, 4],
                                        "var": [6], "labels": [6], "same": [6]})
    rng = np.random.default_rng(7)
    params = {k: rng.standard_normal(c.parameter_shapes[k]) for k in c.get_parameters()}
    data = {"input": rng.standard_normal((6, 3)), "other": rng.standard_normal((6, 4)),
            "obs": rng.standard_normal((6, 4)), "var": rng.uniform(0.1, 2.0, 6),
            "labels": np.array([0, 3, 1, 2, 2, 0]), "same": _signs(6)}
    out, grads = c.evaluate({k: backend.array(v) for k, v in params.items()},
                            {k: backend.array(v) for k, v in data.items()},
                            output_gradients=True)[:2]
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    d = {k: torch.tensor(v) for k, v in data.items()}
    w_key = next(k for k in t if k.endswith("weight"))
    b_key = next(k for k in t if k.endswith("bias"))
    emb = F.linear(d["input"], t[w_key], t[b_key])
    cost = (F.multi_margin_loss(emb, d["labels"], p=2, margin=0.5,
                                weight=torch.tensor(_W4, dtype=torch.float64))
            + F.cosine_embedding_loss(emb, d["other"], d["same"], margin=0.2)
            + F.gaussian_nll_loss(emb, d["obs"], d["var"], full=True))
    cost.backward()
    assert abs(float(backend.to_numpy(out["final_cost"])) - cost.item()) < 1e-12
    for k in (w_key, b_key):
        np.testing.assert_allclose(np.asarray(backend.to_numpy(grads[k])), t[k].grad.numpy(),
                                   rtol=0, atol=1e-12)
