"""torch.nn's small modules (Identity, Unflatten, Softmin, Tanhshrink, Threshold, ReLU6, RReLU,
CosineSimilarity, PairwiseDistance, Bilinear, LocalResponseNorm, NLLLoss) side by side with
torch autograd in float64 on NumPy, torch and JAX: the output and every gradient within 1e-10
(relative to max(1, |torch|)), at the edges (threshold ties, zero vectors, ignored rows, a
batch with every row ignored); the NumPy VJPs against central differences; bad arguments and
shapes named."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from layer_edges import Case, parity_tests, run_mithril, scalar_loss

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend


def unary(fn):
    """A torch reference of a block on ``input`` whose parameters are named by their role."""
    def ref(t, d):
        roles = {k.rsplit(".", 1)[-1]: v for k, v in t.items() if k != "input"}
        return {"output": fn(t["input"], **roles)}
    return ref


def pair(fn):
    """A torch reference of a block on ``input1`` and ``input2`` (parameters by role)."""
    def ref(t, d):
        roles = {k.rsplit(".", 1)[-1]: v for k, v in t.items() if k not in ("input1", "input2")}
        return {"output": fn(t["input1"], t["input2"], **roles)}
    return ref


def nll(**kw):
    return lambda t, d: {"output": F.nll_loss(t["input"], d["target"], **kw)}


_RNG = np.random.default_rng(149)
_TIES = np.array([[-1.0, -0.5, 0.0, np.nextafter(0.5, 0), 0.5, np.nextafter(0.5, 1), 3.0],
                  [6.0, np.nextafter(6.0, 0), np.nextafter(6.0, 7), 0.0, -1e-300, 1e-300, 7.0]])
_ZERO_ROWS = _RNG.standard_normal((4, 5))
_ZERO_ROWS[0] = 0.0
_ZERO_ROWS[1] *= 1e-11  # a norm below eps 1e-8: torch's clamp and its gradient
_W = np.array([0.5, 2.0, 1.0, 3.0])
_LABELS = np.array([2, -100, 0, 3, -100, 1])

CASES: dict[str, Case] = {
    "identity": Case(lambda: ml.Identity(54, unused="x"), {"input": (3, 4)}, unary(lambda x: x * 1)),
    "unflatten": Case(lambda: ml.Unflatten(1, (2, 3)), {"input": (4, 6, 2)},
                      unary(lambda x: x.unflatten(1, (2, 3)))),
    "unflatten_minus_one_last": Case(lambda: ml.Unflatten(-1, (-1, 2)), {"input": (3, 8)},
                                     unary(lambda x: x.unflatten(-1, (-1, 2)))),
    "softmin": Case(lambda: ml.Softmin(1), {"input": (3, 5, 2)}, unary(lambda x: F.softmin(x, 1))),
    "softmin_last": Case(lambda: ml.Softmin(), {"input": 30 * _RNG.standard_normal((4, 6))},
                         unary(lambda x: F.softmin(x, -1))),
    "tanhshrink": Case(lambda: ml.Tanhshrink(), {"input": 3 * _RNG.standard_normal((4, 6))},
                       unary(F.tanhshrink)),
    "threshold_ties": Case(lambda: ml.Threshold(0.5, -2.0), {"input": _TIES},
                           unary(lambda x: F.threshold(x, 0.5, -2.0))),
    "threshold_at_zero": Case(lambda: ml.Threshold(0.0, 20.0), {"input": _TIES},
                              unary(lambda x: F.threshold(x, 0.0, 20.0))),
    "relu6_ties": Case(lambda: ml.ReLU6(), {"input": _TIES}, unary(F.relu6)),
    "rrelu_eval": Case(lambda: ml.RReLU(), {"input": _TIES}, unary(lambda x: F.rrelu(x)),
                       training=False),
    "rrelu_eval_bounds": Case(lambda: ml.RReLU(0.1, 0.9), {"input": (3, 4)},
                              unary(lambda x: F.rrelu(x, 0.1, 0.9)), training=False),
    "cosine_similarity_zero_rows": Case(lambda: ml.CosineSimilarity(), {"input1": _ZERO_ROWS, "input2": (4, 5)},
                                        pair(F.cosine_similarity)),
    "cosine_similarity_both_zero": Case(lambda: ml.CosineSimilarity(dim=-1, eps=1e-3),
                                        {"input1": _ZERO_ROWS, "input2": _ZERO_ROWS[[0, 0, 2, 3]]},
                                        pair(lambda a, b: F.cosine_similarity(a, b, -1, 1e-3))),
    "cosine_similarity_broadcast": Case(lambda: ml.CosineSimilarity(dim=2), {"input1": (2, 3, 4), "input2": (3, 4)},
                                        pair(lambda a, b: F.cosine_similarity(a, b, 2))),
    "cosine_similarity_dim0": Case(lambda: ml.CosineSimilarity(0), {"input1": (5,), "input2": (5,)},
                                   pair(lambda a, b: F.cosine_similarity(a, b, 0))),
    "pairwise_distance": Case(lambda: ml.PairwiseDistance(), {"input1": (4, 5), "input2": (4, 5)},
                              pair(F.pairwise_distance)),
    "pairwise_distance_equal_rows": Case(  # x1 − x2 + eps = eps: the distance of eps alone
        lambda: ml.PairwiseDistance(keepdim=True), {"input1": _ZERO_ROWS, "input2": _ZERO_ROWS},
        pair(lambda a, b: F.pairwise_distance(a, b, keepdim=True))),
    "pairwise_distance_zero_distance": Case(  # eps = 0, equal rows: the masked gradient 0
        lambda: ml.PairwiseDistance(eps=0.0), {"input1": _ZERO_ROWS, "input2": _ZERO_ROWS},
        pair(lambda a, b: F.pairwise_distance(a, b, eps=0.0))),
    "pairwise_distance_p1_broadcast": Case(lambda: ml.PairwiseDistance(p=1.0), {"input1": (2, 3, 4), "input2": (4,)},
                                           pair(lambda a, b: F.pairwise_distance(a, b, 1.0))),
    "pairwise_distance_p3": Case(lambda: ml.PairwiseDistance(p=3.0, eps=0.1), {"input1": (3, 6), "input2": (3, 6)},
                                 pair(lambda a, b: F.pairwise_distance(a, b, 3.0, 0.1))),
    "pairwise_distance_p_half": Case(lambda: ml.PairwiseDistance(p=0.5), {"input1": (3, 6), "input2": (3, 6)},
                                     pair(lambda a, b: F.pairwise_distance(a, b, 0.5))),
    "pairwise_distance_inf": Case(lambda: ml.PairwiseDistance(p=float("inf")), {"input1": (3, 6), "input2": (3, 6)},
                                  pair(lambda a, b: F.pairwise_distance(a, b, float("inf")))),
    "pairwise_distance_p0": Case(lambda: ml.PairwiseDistance(p=0), {"input1": (3, 6), "input2": (3, 6)},
                                 pair(lambda a, b: F.pairwise_distance(a, b, 0.0))),
    "pairwise_distance_vectors": Case(lambda: ml.PairwiseDistance(), {"input1": (5,), "input2": (5,)},
                                      pair(F.pairwise_distance)),
    "bilinear": Case(lambda: ml.Bilinear(3, 4, 5), {"input1": (6, 3), "input2": (6, 4)}, pair(F.bilinear)),
    "bilinear_no_bias_nd": Case(lambda: ml.Bilinear(2, 3, 4, bias=False), {"input1": (2, 5, 2), "input2": (2, 5, 3)},
                                pair(F.bilinear)),
    "bilinear_unbatched": Case(lambda: ml.Bilinear(3, 2, 2), {"input1": (3,), "input2": (2,)}, pair(F.bilinear)),
    "local_response_norm": Case(lambda: ml.LocalResponseNorm(3), {"input": (2, 6, 4)},
                                unary(lambda x: F.local_response_norm(x, 3))),
    "local_response_norm_even_size_2d": Case(
        lambda: ml.LocalResponseNorm(4, alpha=0.5, beta=1.5, k=2.0), {"input": (2, 5, 3, 2)},
        unary(lambda x: F.local_response_norm(x, 4, 0.5, 1.5, 2.0))),
    "local_response_norm_window_wider_than_channels": Case(
        lambda: ml.LocalResponseNorm(7, alpha=1.0), {"input": (1, 3, 2, 2, 2)},
        unary(lambda x: F.local_response_norm(x, 7, 1.0))),
}
for _red in ("mean", "sum", "none"):
    CASES.update({
        f"nll_{_red}": Case(lambda r=_red: ml.NLLLoss(reduction=r), {"input": (5, 4)}, nll(reduction=_red),
                            data={"target": np.array([0, 3, 1, 1, 2])}),
        f"nll_weight_ignore_{_red}": Case(
            lambda r=_red: ml.NLLLoss(_W, reduction=r), {"input": (6, 4)}, nll(weight=torch.tensor(_W), reduction=_red),
            data={"target": _LABELS}),
        f"nll_spatial_ignore_2_{_red}": Case(
            lambda r=_red: ml.NLLLoss(ignore_index=2, reduction=r), {"input": (2, 4, 3, 2)},
            nll(ignore_index=2, reduction=_red), data={"target": np.array([[[2, 0], [1, 2], [3, 3]]] * 2)}),
        f"nll_all_ignored_{_red}": Case(  # the mean: 0/0 = NaN, as torch; the gradient 0
            lambda r=_red: ml.NLLLoss(_W, reduction=r), {"input": (3, 4)}, nll(weight=torch.tensor(_W), reduction=_red),
            data={"target": np.full(3, -100)}),
        f"nll_unbatched_{_red}": Case(lambda r=_red: ml.NLLLoss(_W, reduction=r), {"input": (4,)},
                                      nll(weight=torch.tensor(_W), reduction=_red), data={"target": np.array(3)}),
    })

def _instance_norm(nd, c, affine=False, running=False, eps=1e-5):
    """torch's own nn.InstanceNormNd on the unbatched input (its unsqueeze / squeeze), with
    the block's weight and bias; ``running``: inference mode by the initial statistics."""
    def ref(t, d):
        cls = torch.nn.InstanceNorm1d if nd == 1 else torch.nn.InstanceNorm2d
        mod = cls(c, eps=eps, affine=affine, track_running_stats=running, dtype=torch.float64)
        mod.train(not running)
        params = {k.rsplit(".", 1)[-1]: v for k, v in t.items() if k != "input"}
        return {"output": torch.func.functional_call(mod, params, (t["input"],))}
    return ref


CASES.update({
    "instance_norm1d_unbatched": Case(lambda: ml.InstanceNorm1D(3), {"input": (3, 7)}, _instance_norm(1, 3)),
    "instance_norm1d_unbatched_affine": Case(lambda: ml.InstanceNorm1D(4, eps=0.1, affine=True), {"input": (4, 5)},
                                             _instance_norm(1, 4, affine=True, eps=0.1)),
    "instance_norm2d_unbatched_affine": Case(lambda: ml.InstanceNorm2D(2, affine=True), {"input": (2, 3, 4)},
                                             _instance_norm(2, 2, affine=True)),
    "instance_norm2d_unbatched_running_train": Case(
        lambda: ml.InstanceNorm2D(2, affine=True, track_running_stats=True), {"input": (2, 3, 4)},
        _instance_norm(2, 2, affine=True), training=True),
    "instance_norm1d_unbatched_running_eval": Case(  # one position: allowed by the running stats
        lambda: ml.InstanceNorm1D(3, track_running_stats=True), {"input": 5 * _RNG.standard_normal((3, 1))},
        _instance_norm(1, 3, running=True), training=False),
})


test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES)


# (not the zero rows: torch's clamp is not differentiated, so its gradient is not the slope)
_FD = ["tanhshrink", "softmin", "cosine_similarity_dim0", "cosine_similarity_broadcast",
       "pairwise_distance_p3", "pairwise_distance_p1_broadcast", "bilinear_no_bias_nd",
       "local_response_norm_even_size_2d", "local_response_norm_window_wider_than_channels",
       "nll_weight_ignore_mean", "instance_norm2d_unbatched_affine"]


@pytest.mark.parametrize("name", _FD)
def test_numpy_vjp_matches_central_differences(name):
    case = CASES[name]
    params, cots, _, grads = run_mithril(name, case, "numpy")
    fd = central_differences(scalar_loss(case, params, cots), params, 1e-6)
    for k in params:
        assert np.allclose(grads[k], fd[k], rtol=1e-5, atol=1e-6), (name, k)


# -- RReLU in training mode: slopes drawn as Dropout's masks --------------------------------

def _rrelu_train(backend, x, g, seed=0):
    model = ml.Model()
    model |= ml.RReLU(0.1, 0.3)(input="input", output="output")
    compiled = ml.compile(model, backend, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    out, grads = compiled.evaluate({"input": backend.array(x)}, {}, output_gradients={
        "output": backend.array(g)}, training=True)
    return np.asarray(backend.to_numpy(out["output"])), np.asarray(backend.to_numpy(grads["input"]))


def test_rrelu_training_slopes_in_range_and_the_same_on_numpy_and_torch():
    x = -np.abs(np.random.default_rng(0).standard_normal((50, 40))) - 0.1
    x[0, :5] = [1.0, 2.0, 0.0, 0.5, 3.0]
    g = np.random.default_rng(1).standard_normal(x.shape)
    y, gx = _rrelu_train(NumpyBackend(dtype="float64"), x, g)
    yt, gxt = _rrelu_train(TorchBackend(dtype="float64"), x, g)
    assert np.array_equal(y, yt) and np.allclose(gx, gxt, rtol=0, atol=1e-15)
    a = y[x < 0] / x[x < 0]
    assert 0.1 <= a.min() and a.max() < 0.3 and abs(a.mean() - 0.2) < 0.005  # U(0.1, 0.3)
    assert len(np.unique(a)) > 1900  # one slope per element
    assert np.array_equal(y[0, [0, 1, 3, 4]], x[0, [0, 1, 3, 4]])
    # torch's rrelu_with_noise: output = a · x, gradient a · g, the same slopes
    assert np.allclose(gx[x < 0], g[x < 0] * a, rtol=1e-14)
    assert np.array_equal(gx[0, [0, 1, 3, 4]], g[0, [0, 1, 3, 4]])
    # torch's own training-mode draws stay in the same range
    tx = torch.tensor(x)
    at = (F.rrelu(tx, 0.1, 0.3, training=True) / tx)[tx < 0]
    assert 0.1 <= float(at.min()) and float(at.max()) <= 0.3


def test_rrelu_training_slopes_on_jax_are_numpys(tmp_path):
    """JAX draws the same slopes (its uint32 bits): the outputs agree to rounding."""
    from conftest import run_python

    x = np.random.default_rng(0).standard_normal((20, 30))
    g = np.random.default_rng(1).standard_normal(x.shape)
    np.savez(tmp_path / "in.npz", x=x, g=g)
    run_python(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np
        from test_small_modules_vs_torch import _rrelu_train
        from mithril.backends import JaxBackend
        d = np.load({str(tmp_path / "in.npz")!r})
        y, gx = _rrelu_train(JaxBackend(dtype="float64"), d["x"], d["g"])
        np.savez({str(tmp_path / "out.npz")!r}, y=y, gx=gx)
    """)
    want_y, want_g = _rrelu_train(NumpyBackend(dtype="float64"), x, g)
    got = np.load(tmp_path / "out.npz")
    assert np.allclose(got["y"], want_y, rtol=1e-14, atol=1e-15)
    assert np.allclose(got["gx"], want_g, rtol=1e-14, atol=1e-15)
    assert not np.allclose(want_y[x < 0] / x[x < 0], want_y[x < 0][0] / x[x < 0][0])


# -- NLLLoss and the other arguments and shapes -------------------------------------------

def _compile(block, shapes, backend=None, **kw):
    model = ml.Model()
    model |= block(**{k: k for k in shapes}, output="output")
    return ml.compile(model, backend or NumpyBackend(dtype="float64"), shapes=shapes, **kw)


def test_nll_loss_refuses_what_torch_refuses():
    c = _compile(ml.NLLLoss(), {"input": [3, 4], "target": [3]})
    x = np.zeros((3, 4))
    with pytest.raises(ml.DTypeError, match="NLLLoss: target 'target' must hold integer class"):
        c.evaluate({}, {"input": x, "target": np.zeros(3)})
    with pytest.raises(ValueError, match="out of range"):
        c.evaluate({}, {"input": x, "target": np.array([0, 4, 1])})
    with pytest.raises(ml.ShapeError, match="NLLLoss: 'target' must hold class indices of shape"):
        _compile(ml.NLLLoss(), {"input": [3, 4], "target": [3, 4]})
    with pytest.raises(ml.ShapeError, match="NLLLoss: weight has 2 entries but .* 4 classes"):
        _compile(ml.NLLLoss([1.0, 2.0]), {"input": [3, 4], "target": [3]})
    with pytest.raises(TypeError, match="NLLLoss: ignore_index must be an int"):
        ml.NLLLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match="NLLLoss: weight must be finite"):
        ml.NLLLoss(weight=[1.0, float("nan")])
    with pytest.raises(TypeError):
        ml.NLLLoss(label_smoothing=0.1)  # torch's NLL has none
    assert repr(ml.NLLLoss([1, 2])) == "NLLLoss(weight=[1.0, 2.0], ignore_index=-100, reduction='mean')"


def test_argument_errors_are_named():
    for bad, match in ((lambda: ml.Threshold(float("nan"), 0.0), "Threshold: threshold must be"),
                       (lambda: ml.Threshold(0.0, "1"), "Threshold: value must be"),
                       (lambda: ml.RReLU(0.5, 0.2), "RReLU: need 0 <= lower <= upper"),
                       (lambda: ml.RReLU(-0.1, 0.2), "RReLU: need 0 <= lower <= upper"),
                       (lambda: ml.PairwiseDistance(p=float("nan")), "PairwiseDistance: p must be"),
                       (lambda: ml.PairwiseDistance(keepdim=1), "PairwiseDistance: keepdim must"),
                       (lambda: ml.CosineSimilarity(eps=float("inf")), "CosineSimilarity: eps"),
                       (lambda: ml.Bilinear(3, 0, 2), "Bilinear: in2_features must be"),
                       (lambda: ml.Bilinear(3, 2, 2, bias=None), "Bilinear: bias must be"),
                       (lambda: ml.LocalResponseNorm(0), "LocalResponseNorm: size must be"),
                       (lambda: ml.Unflatten(1, (2, -1, -1)), "Unflatten: unflattened_size"),
                       (lambda: ml.Unflatten(1, ()), "Unflatten: unflattened_size")):
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(TypeError, match="CosineSimilarity: dim must be an int"):
        ml.CosineSimilarity(dim=1.0)


def test_shape_errors_are_named():
    for block, shapes, match in (
            (ml.Bilinear(3, 4, 2), {"input1": [5, 3], "input2": [5, 3]}, "'input2' must be"),
            (ml.Bilinear(3, 4, 2), {"input1": [5, 3], "input2": [6, 4]}, "leading axes"),
            (ml.LocalResponseNorm(2), {"input": [4, 3]}, "at least 3 axes"),
            (ml.Unflatten(1, (4, 2)), {"input": [2, 6]}, "cannot be split into"),
            (ml.Unflatten(2, (3, 2)), {"input": [2, 6]}, "dim 2 is out of range"),
            (ml.CosineSimilarity(2), {"input1": [2, 3], "input2": [2, 3]}, "dim 2 is out of range"),
            (ml.PairwiseDistance(), {"input1": [2, 3], "input2": [2, 4]}, "do not broadcast")):
        with pytest.raises(ml.ShapeError, match=match):
            _compile(block, shapes)


def test_parameters_are_torchs_layout_and_init():
    c = _compile(ml.Bilinear(16, 3, 5), {"input1": [2, 16], "input2": [2, 3]})
    p = c.get_parameters()
    w, b = p["bilinear.weight"], p["bilinear.bias"]
    assert w.shape == (5, 16, 3) and b.shape == (5,)
    assert np.abs(w).max() <= 0.25 and np.abs(b).max() <= 0.25 and np.abs(w).max() > 0.2
    assert w.std() == pytest.approx(0.25 / np.sqrt(3), rel=0.2)  # U(±1/√in1), torch's
    torch_w = torch.nn.Bilinear(16, 3, 5).weight.detach()
    assert float(torch_w.abs().max()) <= 0.25
    assert ml.CELU is ml.Celu and ml.SELU is ml.Selu
    assert _compile(ml.Unflatten(0, (-1, 2)), {"input": [None, 3]}).program.output_shape is not None


def test_instance_norm_unbatched_running_statistics_are_torchs():
    x = np.random.default_rng(3).standard_normal((3, 6)) * 2 + 1
    model = ml.Model()
    model |= ml.InstanceNorm1D(3, track_running_stats=True, momentum=0.3)(input="input", output="output")
    c = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [3, 6]})
    out, state = c.evaluate({}, {"input": x}, state=c.initial_state_dict, training=True)
    mod = torch.nn.InstanceNorm1d(3, track_running_stats=True, momentum=0.3, dtype=torch.float64)
    want = mod(torch.tensor(x))
    assert np.allclose(out["output"], want.detach().numpy(), rtol=0, atol=1e-12)
    (rm,) = (v for k, v in state.items() if k.endswith("running_mean"))
    (rv,) = (v for k, v in state.items() if k.endswith("running_var"))
    assert np.allclose(rm, mod.running_mean.numpy(), atol=1e-14)
    assert np.allclose(rv, mod.running_var.numpy(), atol=1e-14)


def test_instance_norm_unbatched_shapes_named():
    for block, shape, match in ((ml.InstanceNorm1D(3), [4, 6], r"input channels \(4\) must equal num_features"),
                                (ml.InstanceNorm1D(3), [6], "must have rank 3 .* or 2"),
                                (ml.InstanceNorm2D(3), [3, 1, 1], "more than 1 spatial element")):
        with pytest.raises(ml.ShapeError, match=match):
            _compile(block, {"input": shape})
