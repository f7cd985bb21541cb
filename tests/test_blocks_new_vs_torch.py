"""RMSNorm, the torch activations (Softplus, ELU, SELU, CELU, Mish, Hardswish, Hardsigmoid),
the Huber / smooth-L1 losses and the convolutions' ``padding_mode`` side by side with torch
(``torch.nn.functional``, or torch's own Conv modules) in float64 on NumPy, JAX and torch:
the output and every gradient within 1e-10 (relative to max(1, |torch|)), at the edges:
inputs at and around each threshold or kink, tiny and huge values, and the arguments' edge
values (eps from torch's finfo default, beta = 0, the largest reflect / circular padding).
Two torch gradients rounded through float32 (Hardsigmoid's 1/6, CELU's 1/α) are replaced by
the exact derivative, and the tests below measure torch's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, parity_tests

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


def _around(*points, spread=1e-9):
    """A (k, 7) array: each point, ±1 ulp, ±spread around it, and two far values. Around 0
    the smallest normal numbers stand for ±1 ulp: XLA on CPU reads subnormal inputs as 0
    (5e-324 > 0 is false on JAX), so an ELU's branch there is the platform's, not torch's."""
    tiny = np.finfo(np.float64).tiny
    rows = [[p, np.nextafter(p, -np.inf) if p else -tiny, np.nextafter(p, np.inf) if p else tiny,
             p - spread, p + spread, p - 50.0, p + 50.0] for p in points]
    return np.array(rows, np.float64)


_KINKS = _around(-3.0, 0.0, 3.0)  # Hardswish / Hardsigmoid / the ELUs' switch points
_WIDE = np.concatenate([_RNG.standard_normal((2, 7)) * 4, _around(0.0),
                        [[-800.0, -40.0, -1e-300, 1e-300, 40.0, 700.0, 800.0]]])

class _ExactHardsigmoid(torch.autograd.Function):
    """F.hardsigmoid's forward and backward with its 1/6 in float64: torch's own backward
    multiplies by 1/6 rounded to float32 (test_hardsigmoid_gradient_vs_torchs_float32_sixth
    measures that)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.hardsigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where((x > -3) & (x < 3), g / 6, 0 * g)


_hardsigmoid = _ExactHardsigmoid.apply

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
    # -- activations ---------------------------------------------------------------------
    "softplus_default": Case(lambda: ml.Softplus(), {"input": _WIDE}, unary(F.softplus)),
    "softplus_at_threshold": Case(lambda: ml.Softplus(), {"input": _around(20.0, -20.0)},
                                  unary(F.softplus)),
    "softplus_beta_threshold": Case(lambda: ml.Softplus(beta=2.5, threshold=3.0),
                                    {"input": _around(1.2, 0.0)},
                                    unary(lambda x: F.softplus(x, 2.5, 3.0))),
    "softplus_small_beta": Case(lambda: ml.Softplus(beta=1e-3), {"input": 100 * _WIDE[:3]},
                                unary(lambda x: F.softplus(x, 1e-3))),
    "softplus_negative_threshold": Case(lambda: ml.Softplus(threshold=-1.0), {"input": _around(-1.0, 0.0)},
                                        unary(lambda x: F.softplus(x, 1.0, -1.0))),
    "elu_default": Case(lambda: ml.Elu(), {"input": _WIDE}, unary(F.elu)),
    "elu_alpha_2_at_zero": Case(lambda: ml.Elu(2.0), {"input": _KINKS}, unary(lambda x: F.elu(x, 2.0))),
    "elu_negative_alpha": Case(lambda: ml.Elu(-0.5), {"input": _KINKS}, unary(lambda x: F.elu(x, -0.5))),
    "elu_alpha_0": Case(lambda: ml.Elu(0.0), {"input": _KINKS}, unary(lambda x: F.elu(x, 0.0))),
    "selu": Case(lambda: ml.Selu(), {"input": _WIDE}, unary(F.selu)),
    "selu_at_zero": Case(lambda: ml.Selu(), {"input": _KINKS}, unary(F.selu)),
    "celu_default": Case(lambda: ml.Celu(), {"input": _WIDE}, unary(F.celu)),
    # (an α float32 holds exactly: torch's CELU backward rounds 1/α through float32, see below)
    "celu_small_alpha": Case(lambda: ml.Celu(0.125), {"input": _KINKS}, unary(lambda x: F.celu(x, 0.125))),
    "celu_negative_alpha": Case(lambda: ml.Celu(-0.5), {"input": _KINKS}, unary(lambda x: F.celu(x, -0.5))),
    "celu_large_alpha": Case(lambda: ml.Celu(30.0), {"input": _WIDE}, unary(lambda x: F.celu(x, 30.0))),
    "mish": Case(lambda: ml.Mish(), {"input": _WIDE}, unary(F.mish)),
    "mish_at_zero": Case(lambda: ml.Mish(), {"input": _KINKS}, unary(F.mish)),
    "hardswish_kinks": Case(lambda: ml.Hardswish(), {"input": _KINKS}, unary(F.hardswish)),
    "hardswish_wide": Case(lambda: ml.Hardswish(), {"input": _WIDE}, unary(F.hardswish)),
    "hardsigmoid_kinks": Case(lambda: ml.Hardsigmoid(), {"input": _KINKS}, unary(_hardsigmoid)),
    "hardsigmoid_wide": Case(lambda: ml.Hardsigmoid(), {"input": _WIDE}, unary(_hardsigmoid)),
}


def _loss(fn, **kw):
    return lambda t, d: {"output": fn(t["input"], t["target"], **kw)}


_ZEROS = np.zeros((3, 7))
for _red in ("mean", "sum", "none"):
    CASES[f"huber_{_red}"] = Case(lambda r=_red: ml.HuberLoss(reduction=r),
                                  {"input": 2 * _WIDE[:3], "target": (3, 7)},
                                  _loss(F.huber_loss, reduction=_red))
    CASES[f"smooth_l1_{_red}"] = Case(lambda r=_red: ml.SmoothL1Loss(reduction=r),
                                      {"input": 2 * _WIDE[:3], "target": (3, 7)},
                                      _loss(F.smooth_l1_loss, reduction=_red))
    CASES[f"smooth_l1_beta_0_{_red}"] = Case(  # L1, the gradient 0 where input = target
        lambda r=_red: ml.SmoothL1Loss(beta=0.0, reduction=r), {"input": _around(0.0, 1.0), "target": _ZEROS[:2]},
        _loss(F.smooth_l1_loss, reduction=_red, beta=0.0))
CASES.update({
    # d = input − 0 exactly at, and an ulp and 1e-9 either side of, ±delta / ±beta
    "huber_at_delta": Case(lambda: ml.HuberLoss(delta=1.5, reduction="none"),
                           {"input": _around(1.5, -1.5, 0.0), "target": _ZEROS},
                           _loss(F.huber_loss, reduction="none", delta=1.5)),
    "huber_tiny_delta": Case(lambda: ml.HuberLoss(delta=1e-12, reduction="sum"),
                             {"input": _around(1e-12, 0.0, spread=1e-13), "target": _ZEROS[:2]},
                             _loss(F.huber_loss, reduction="sum", delta=1e-12)),
    "huber_huge_values": Case(lambda: ml.HuberLoss(delta=1e3),
                              {"input": 1e150 * _WIDE[:2], "target": (2, 7)},
                              _loss(F.huber_loss, delta=1e3)),
    "smooth_l1_at_beta": Case(lambda: ml.SmoothL1Loss(beta=0.25, reduction="none"),
                              {"input": _around(0.25, -0.25, 0.0), "target": _ZEROS},
                              _loss(F.smooth_l1_loss, reduction="none", beta=0.25)),
    "smooth_l1_tiny_beta": Case(lambda: ml.SmoothL1Loss(beta=1e-12, reduction="sum"),
                                {"input": _around(1e-12, 0.0, spread=1e-13), "target": _ZEROS[:2]},
                                _loss(F.smooth_l1_loss, reduction="sum", beta=1e-12)),
    "smooth_l1_large_beta": Case(lambda: ml.SmoothL1Loss(beta=1e6), {"input": 1e3 * _WIDE[:3], "target": (3, 7)},
                                 _loss(F.smooth_l1_loss, beta=1e6)),
})



def _torch_conv(nd, out, k, **kw):
    """The reference: torch's own nn.Conv1d / Conv2d module (its padding_mode) with the
    block's weight and bias."""
    def ref(t, d):
        x = t["input"]
        params = {k2.rsplit(".", 1)[-1]: v for k2, v in t.items() if k2 != "input"}
        cls = torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d
        mod = cls(x.shape[1], out, k, dtype=torch.float64, bias="bias" in params, **kw)
        return {"output": torch.func.functional_call(mod, params, (x,))}
    return ref


for _mode in ("reflect", "replicate", "circular"):
    CASES.update({
        f"conv2d_{_mode}": Case(lambda m=_mode: ml.Convolution2D(3, 4, padding=1, padding_mode=m),
                                {"input": (2, 3, 5, 6)}, _torch_conv(2, 4, 3, padding=1, padding_mode=_mode)),
        f"conv2d_{_mode}_stride_dilation_groups": Case(
            lambda m=_mode: ml.Convolution2D((3, 2), 4, stride=(2, 1), padding=(2, 1), dilation=(1, 2),
                                             groups=2, padding_mode=m),
            {"input": (2, 4, 6, 5)},
            _torch_conv(2, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2,
                        padding_mode=_mode)),
        f"conv2d_{_mode}_same_even_kernel": Case(  # torch: the odd element after
            lambda m=_mode: ml.Convolution2D((2, 4), 3, padding="same", use_bias=False, padding_mode=m),
            {"input": (1, 2, 5, 5)}, _torch_conv(2, 3, (2, 4), padding="same", padding_mode=_mode)),
        f"conv2d_{_mode}_largest_padding": Case(  # reflect: size − 1; the others: the size
            lambda m=_mode: ml.Convolution2D(3, 2, padding=(2, 3) if m == "reflect" else (3, 4), padding_mode=m),
            {"input": (1, 2, 3, 4)},
            _torch_conv(2, 2, 3, padding=(2, 3) if _mode == "reflect" else (3, 4), padding_mode=_mode)),
        f"conv1d_{_mode}": Case(lambda m=_mode: ml.Convolution1D(3, 4, padding=2, dilation=2, padding_mode=m),
                                {"input": (2, 3, 7)}, _torch_conv(1, 4, 3, padding=2, dilation=2, padding_mode=_mode)),
        f"conv1d_{_mode}_asymmetric": Case(  # (before, after): F.pad then F.conv1d, as torch's module does
            lambda m=_mode: ml.Convolution1D(4, 2, padding=[(3, 1)], padding_mode=m), {"input": (2, 3, 6)},
            unary(lambda x, weight, bias, m=_mode: F.conv1d(F.pad(x, (3, 1), mode=m), weight, bias))),
    })


test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES)


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


# -- activations: arguments, names and the kinks' gradients --------------------------------

def test_activation_argument_errors():
    for bad in (0, -1.0, float("inf"), float("nan"), "1", True, None):
        with pytest.raises(ValueError, match="Softplus: beta must be a finite number > 0"):
            ml.Softplus(beta=bad)
    for bad in (float("inf"), float("nan"), "20", False):
        with pytest.raises(ValueError, match="Softplus: threshold must be a finite number"):
            ml.Softplus(threshold=bad)
    for bad in (float("nan"), float("-inf"), "1", True):
        with pytest.raises(ValueError, match="Elu: alpha must be a finite number"):
            ml.Elu(bad)
    for bad in (0, 0.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="Celu: alpha must be a finite number != 0"):
            ml.Celu(bad)
    with pytest.raises(RuntimeError):  # torch's own: CELU's α divides the input
        F.celu(torch.zeros(2), 0.0)


@pytest.mark.parametrize("name", ["softplus", "elu", "selu", "celu", "mish", "hardswish",
                                  "hardsigmoid", "silu", "hardtanh"])
def test_mlp_takes_the_activation_names(name):
    model = ml.MLP([name, None], [3, 2])
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [4, 5]})
    params = compiled.get_parameters()
    x = np.random.default_rng(0).standard_normal((4, 5))
    out = compiled.evaluate(params, {"input": x})["output"]
    p = {k: torch.tensor(v) for k, v in params.items()}
    lin = sorted({k.rsplit(".", 1)[0] for k in p})  # the two Linear layers, in order
    assert len(lin) == 2 and p[lin[0] + ".weight"].shape == (3, 5)
    h = getattr(F, name)(F.linear(torch.tensor(x), p[lin[0] + ".weight"], p[lin[0] + ".bias"]))
    want = F.linear(h, p[lin[1] + ".weight"], p[lin[1] + ".bias"])
    assert np.abs(out - want.numpy()).max() <= 1e-12


def test_hardswish_gradient_at_the_kinks_is_torchs():
    """torch's backward takes the outer branches at ±3: 0 at −3 and 1 at 3 (not the middle
    formula's −½ and 1.5), and Hardsigmoid's gradient is 0 at both: Mithril's the same."""
    x = torch.tensor([-3.0, 3.0], dtype=torch.float64, requires_grad=True)
    F.hardswish(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0]
    x.grad = None
    F.hardsigmoid(x).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0]
    for block, want in ((ml.Hardswish, [0.0, 1.0]), (ml.Hardsigmoid, [0.0, 0.0])):
        model = ml.Model()
        model |= block()(input="input", output="output")
        compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [2]},
                              trainable_keys={"input"})
        _, grads = compiled.evaluate({"input": np.array([-3.0, 3.0])}, {},
                                     output_gradients={"output": np.ones(2)})
        assert grads["input"].tolist() == want


def test_celu_gradient_is_exact_where_torchs_rounds_alpha_to_float32():
    """torch's CELU backward takes 1/α from α rounded to float32 (derivatives.yaml:
    ``1.0 / alpha.toFloat()``), so for α = 0.1 its float64 gradient is off the derivative
    e^(x/α) by ~1.5e-8 relative; Celu's is the derivative itself (and equals torch's to
    1e-10 wherever α is a float32 value: the cases above)."""
    x = np.array([-0.3, -0.05, 0.0, 0.4])
    model = ml.Model()
    model |= ml.Celu(0.1)(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [4]},
                          trainable_keys={"input"})
    out, grads = compiled.evaluate({"input": x}, {}, output_gradients={"output": np.ones(4)})
    exact = np.where(x > 0, 1.0, np.exp(np.minimum(x, 0) / 0.1))
    assert np.abs(grads["input"] - exact).max() <= 1e-15
    xt = torch.tensor(x, requires_grad=True)
    y = F.celu(xt, 0.1)
    y.sum().backward()
    assert np.abs(out["output"] - y.detach().numpy()).max() <= 1e-15  # the forward: torch's
    a32 = float(np.float32(0.1))
    torchs = np.where(x > 0, 1.0, 0.1 * np.exp(x / 0.1 * 0.1 * (1 / a32)) * (1 / a32))
    assert np.abs(xt.grad.numpy() - torchs).max() <= 1e-15
    assert 1e-9 < np.abs(xt.grad.numpy() - exact).max() < 1e-7


def test_hardsigmoid_gradient_vs_torchs_float32_sixth():
    """Hardsigmoid's gradient is 1/6 (float64) inside (−3, 3); torch's own backward gives
    float32's 1/6, 0.16666667163 (3e-8 relative off), which the cases above replace."""
    x = np.array([-3.0, -2.9, 0.0, 2.9, 3.0])
    xt = torch.tensor(x, requires_grad=True)
    F.hardsigmoid(xt).sum().backward()
    assert xt.grad.tolist() == [0.0] + [float(np.float32(1 / 6))] * 3 + [0.0]
    model = ml.Model()
    model |= ml.Hardsigmoid()(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [5]},
                          trainable_keys={"input"})
    out, grads = compiled.evaluate({"input": x}, {}, output_gradients={"output": np.ones(5)})
    assert grads["input"].tolist() == [0.0, 1 / 6, 1 / 6, 1 / 6, 0.0]
    assert np.array_equal(out["output"], F.hardsigmoid(torch.tensor(x)).numpy())


# -- losses: arguments and shapes ---------------------------------------------------------

def test_loss_argument_errors_and_shapes():
    for bad in (0, -1.0, float("inf"), float("nan"), "1", True, None):
        with pytest.raises(ValueError, match="HuberLoss: delta must be a finite number > 0"):
            ml.HuberLoss(delta=bad)
    with pytest.raises(RuntimeError, match="delta"):  # torch's own
        F.huber_loss(torch.zeros(2), torch.zeros(2), delta=0.0)
    for bad in (-1e-9, float("inf"), float("nan"), "1", False):
        with pytest.raises(ValueError, match="SmoothL1Loss: beta must be a finite number >= 0"):
            ml.SmoothL1Loss(beta=bad)
    with pytest.raises(RuntimeError, match="beta"):
        F.smooth_l1_loss(torch.zeros(2), torch.zeros(2), beta=-1.0)
    for cls in (ml.HuberLoss, ml.SmoothL1Loss):
        with pytest.raises(ValueError, match=f"{cls.__name__}: reduction must be one of"):
            cls(reduction="avg")
        model = ml.Model()
        model |= cls()(input="input", target="target", output="output")
        with pytest.raises(ml.ShapeError, match=r"'input' has shape \[2, 3\] but 'target' has shape \[2, 4\]"):
            ml.compile(model, NumpyBackend(), shapes={"input": [2, 3], "target": [2, 4]})
    from mithril.models.losses import HuberLoss
    assert HuberLoss is ml.HuberLoss
    assert repr(ml.SmoothL1Loss(0)) == "SmoothL1Loss(beta=0.0, reduction='mean')"


def test_huber_is_delta_times_smooth_l1():
    """HuberLoss(delta=b) = b · SmoothL1Loss(beta=b), as torch documents."""
    x = np.random.default_rng(1).standard_normal((4, 5)) * 3
    outs = []
    for block in (ml.HuberLoss(delta=0.7, reduction="none"), ml.SmoothL1Loss(beta=0.7, reduction="none")):
        model = ml.Model()
        model |= block(input="input", target="target", output="output")
        compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [4, 5], "target": [4, 5]})
        outs.append(compiled.evaluate({}, {"input": x, "target": np.zeros((4, 5))})["output"])
    assert np.abs(outs[0] - 0.7 * outs[1]).max() <= 1e-15
    want = F.huber_loss(torch.tensor(x), torch.zeros(4, 5, dtype=torch.float64), reduction="none", delta=0.7)
    assert np.abs(outs[0] - want.numpy()).max() <= 1e-15


# -- convolution padding_mode ----------------------------------------------------------------

def test_conv_padding_mode_errors_and_repr():
    with pytest.raises(ValueError, match=r"Convolution2D: padding_mode must be one of \('zeros', "
                                         r"'reflect', 'replicate', 'circular'\), got 'mirror'"):
        ml.Convolution2D(3, 4, padding=1, padding_mode="mirror")
    for mode, n, pad in (("reflect", 3, 3), ("circular", 3, 4)):
        model = ml.Model()
        model |= ml.Convolution2D(3, 2, padding=pad, padding_mode=mode)(input="input")
        with pytest.raises(ml.ShapeError, match=f"Convolution2D: padding_mode='{mode}' needs each "
                                                f"padding .* spatial axis 0 of size {n}"):
            ml.compile(model, NumpyBackend(), shapes={"input": [1, 2, n, 8]})
        with pytest.raises(RuntimeError):  # torch refuses the same
            torch.nn.Conv2d(2, 2, 3, padding=pad, padding_mode=mode)(torch.zeros(1, 2, n, 8))
    assert repr(ml.Convolution1D(3, 2, padding=1, padding_mode="circular")).endswith(
        "use_bias=True, padding_mode='circular')")
    assert ml.Convolution2D(3, 2, padding_mode="reflect").mode_pads is None  # no padding: nothing to do


def test_conv_padding_mode_free_size_checked_at_evaluate():
    """A spatial size left free at compile time is checked when the input comes."""
    model = ml.Model()
    model |= ml.Convolution1D(3, 2, padding=2, padding_mode="reflect")(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [1, 1, None]})
    params = compiled.get_parameters()
    with pytest.raises(ml.ShapeError, match="padding_mode='reflect' needs each padding less than"):
        compiled.evaluate(params, {"input": np.ones((1, 1, 2))})
    x = np.arange(5.0).reshape(1, 1, 5)
    out = compiled.evaluate(params, {"input": x})["output"]
    w, b = (torch.tensor(params[k]) for k in ("convolution1_d.weight", "convolution1_d.bias"))
    want = F.conv1d(F.pad(torch.tensor(x), (2, 2), mode="reflect"), w, b)
    assert np.abs(out - want.numpy()).max() <= 1e-12
