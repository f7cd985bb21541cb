"""Adaptive pools, padding layers, Upsample and the pixel shuffles against
``torch.nn.functional``.

1. Every mode and option, odd sizes (adaptive windows that overlap when the output size does
   not divide the input's; nearest sizes off the 2x fast path; downsampling; output size 1
   with ``align_corners``), max pools over inputs with ties (integers: torch's gradient goes
   to the window's first maximum) and unbatched inputs: the output and the input gradient in
   float64 on NumPy, torch and JAX (a fresh process) within 1e-10 of torch autograd's.
2. The NumPy VJPs against central finite differences.
3. Bad input named: reflection padding >= the input size, circular padding > it (torch
   refuses both), wrong ranks, bad modes and arguments.
4. A small CNN (convolution, adaptive average pool, flatten, linear, cross-entropy) trained
   4 SGD steps side by side with the same ``torch.nn.Module``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import (
    Case,
    compare,
    nonfinite_error,
    parity_tests,
    run_mithril,
    scalar_loss,
)

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.utils.optimizers import SGD

_TIES = np.round(1.5 * np.random.default_rng(7).standard_normal((2, 3, 7, 5)))


_NONFINITE = np.round(np.random.default_rng(8).standard_normal((1, 2, 5, 5)))
_NONFINITE[0, 0, 0, :2] = _NONFINITE[0, 0, 1, 1] = np.nan  # a window's last NaN (torch's pick)
_NONFINITE[0, 1, :3, :3] = -np.inf  # a window of -inf only: its first element


def unary(fn):
    return lambda t, d: {"output": fn(t["input"])}


def batched(fn):
    """torch's non-constant padding modes want a batch axis: an unbatched input as a batch of one."""
    return lambda x: fn(x[None])[0]


def nearest_1d_by_gather(x: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's 1-D nearest forward as a gather of the indices it reads (so autograd gives
    that forward's true gradient); equal to F.interpolate's output, checked here."""
    n = x.shape[-1]
    idx = F.interpolate(torch.arange(float(n)).reshape(1, 1, n), scale_factor=scale)[0, 0].long()
    y = x[..., idx]
    assert torch.equal(y, F.interpolate(x, scale_factor=scale))
    return y


def pad_case(block, shape, torch_pad, mode="constant", value=0.0, unbatched=False):
    def ref(x):
        return F.pad(x, torch_pad, value=value) if mode == "constant" else F.pad(x, torch_pad, mode=mode)
    return Case(block, {"input": shape}, unary(batched(ref) if unbatched else ref))


CASES: dict[str, Case] = {
    # -- padding --------------------------------------------------------------------------
    "constant_1d": pad_case(lambda: ml.ConstantPad1D((2, 1), 3.5), (2, 3, 4), (2, 1), value=3.5),
    "constant_2d_unbatched": pad_case(lambda: ml.ConstantPad2D(1, -1.0), (3, 2, 3), (1,) * 4,
                                      value=-1.0),
    "zero_1d_int": pad_case(lambda: ml.ZeroPad1D(3), (2, 1, 2), (3, 3)),
    "zero_2d": pad_case(lambda: ml.ZeroPad2D((0, 2, 1, 0)), (2, 2, 3, 4), (0, 2, 1, 0)),
    "reflect_1d_largest": pad_case(lambda: ml.ReflectionPad1D((4, 3)), (2, 2, 5), (4, 3), "reflect"),
    "reflect_1d_unbatched": pad_case(lambda: ml.ReflectionPad1D(2), (3, 4), (2, 2), "reflect", unbatched=True),
    "reflect_2d": pad_case(lambda: ml.ReflectionPad2D((1, 3, 2, 0)), (2, 2, 3, 4), (1, 3, 2, 0), "reflect"),
    "replicate_1d": pad_case(lambda: ml.ReplicationPad1D((5, 1)), (2, 2, 3), (5, 1), "replicate"),
    "replicate_2d_unbatched": pad_case(lambda: ml.ReplicationPad2D((3, 0, 1, 4)), (2, 2, 3),
                                       (3, 0, 1, 4), "replicate", unbatched=True),
    "circular_1d_full": pad_case(lambda: ml.CircularPad1D((3, 2)), (2, 2, 3), (3, 2), "circular"),
    "circular_2d": pad_case(lambda: ml.CircularPad2D((1, 2, 3, 1)), (1, 2, 3, 4), (1, 2, 3, 1), "circular"),
    "constant_negative_crops": pad_case(lambda: ml.ConstantPad2D((-1, 2, 1, -2), 0.5), (2, 2, 4, 5),
                                        (-1, 2, 1, -2), value=0.5),
    "zero_1d_negative_both": pad_case(lambda: ml.ZeroPad1D((-1, -2)), (2, 2, 5), (-1, -2)),
    **{f"{mode}_negative": pad_case(lambda mode=mode: ml.Pad((-1, 2, 2, -1), mode=mode),
                                    (2, 2, 4, 5), (-1, 2, 2, -1), mode)
       for mode in ("reflect", "replicate", "circular")},
    "pad_reflect_generic": pad_case(lambda: ml.Pad((1, 1, 2, 2), mode="reflect"), (1, 2, 3, 4),
                                    (1, 1, 2, 2), "reflect"),
    # -- adaptive pools ---------------------------------------------------------------------
    "avg_1d_overlap": Case(lambda: ml.AdaptiveAvgPool1D(4), {"input": (2, 3, 7)},
                           unary(lambda x: F.adaptive_avg_pool1d(x, 4))),
    "avg_1d_upsizing_unbatched": Case(lambda: ml.AdaptiveAvgPool1D(5), {"input": (3, 3)},
                                      unary(lambda x: F.adaptive_avg_pool1d(x, 5))),
    "avg_2d_odd": Case(lambda: ml.AdaptiveAvgPool2D((3, 2)), {"input": (2, 2, 7, 5)},
                       unary(lambda x: F.adaptive_avg_pool2d(x, (3, 2)))),
    "avg_2d_none_axis": Case(lambda: ml.AdaptiveAvgPool2D((None, 4)), {"input": (2, 3, 4, 9)},
                             unary(lambda x: F.adaptive_avg_pool2d(x, (None, 4)))),
    "avg_2d_global_unbatched": Case(lambda: ml.AdaptiveAvgPool2D(1), {"input": (3, 5, 6)},
                                    unary(lambda x: F.adaptive_avg_pool2d(x, 1))),
    "max_1d_ties": Case(lambda: ml.AdaptiveMaxPool1D(3), {"input": _TIES[0, :, :, 0]},
                        unary(lambda x: F.adaptive_max_pool1d(x, 3))),
    "max_1d_overlap": Case(lambda: ml.AdaptiveMaxPool1D(5), {"input": (2, 2, 8)},
                           unary(lambda x: F.adaptive_max_pool1d(x, 5))),
    "max_2d_ties_odd": Case(lambda: ml.AdaptiveMaxPool2D((3, 4)), {"input": _TIES},
                            unary(lambda x: F.adaptive_max_pool2d(x, (3, 4)))),
    "max_2d_upsizing_unbatched": Case(lambda: ml.AdaptiveMaxPool2D((4, 9)), {"input": _TIES[0, :, :3]},
                                      unary(lambda x: F.adaptive_max_pool2d(x, (4, 9)))),
    "max_2d_odd_unbatched": Case(lambda: ml.AdaptiveMaxPool2D((3, 4)), {"input": (2, 7, 5)},
                                 unary(lambda x: F.adaptive_max_pool2d(x, (3, 4)))),
    "max_2d_global_ties": Case(lambda: ml.AdaptiveMaxPool2D(1), {"input": np.ones((2, 2, 3, 3))},
                               unary(lambda x: F.adaptive_max_pool2d(x, 1))),
    # -- Upsample / interpolate -------------------------------------------------------------
    **{f"nearest_{name}": Case(lambda kw=kw: ml.Upsample(**kw), {"input": shape},
                               unary(lambda x, kw=kw: F.interpolate(x, **kw)))
       for name, kw, shape in [
           ("scale_1d", dict(scale_factor=2.5), (2, 2, 3)),
           ("scale_2", dict(scale_factor=2), (2, 2, 3, 4)),
           ("scale_odd", dict(scale_factor=(1.7, 0.6)), (2, 2, 5, 7)),
           ("recompute", dict(scale_factor=1.7, recompute_scale_factor=True), (2, 2, 5, 7)),
           ("size_down", dict(size=(3, 2)), (1, 2, 7, 5)),
           ("size_int_1d", dict(size=7), (2, 3, 3)),
           ("same_size_2d", dict(scale_factor=1.2), (2, 2, 3, 4)),  # out = n: reads j (2-D)
           ("double_size_2d", dict(scale_factor=(2.1, 1)), (1, 2, 3, 2)),  # out = 2n: j // 2
           ("half", dict(scale_factor=0.5), (1, 2, 5, 7))]},
    # 1-D, out = n or 2n off scale 1 / 2: torch's forward and backward disagree (see
    # test_torch_1d_nearest_backward_disagrees_with_its_forward): its forward, differentiated
    **{f"nearest_1d_scale_{s}": Case(lambda s=s: ml.Upsample(scale_factor=s), {"input": (2, 2, 3)},
                                     unary(lambda x, s=s: nearest_1d_by_gather(x, s)))
       for s in (1.2, 2.1)},
    **{f"{mode}_{name}": Case(lambda kw=kw, mode=mode: ml.Upsample(mode=mode, **kw), {"input": shape},
                              unary(lambda x, kw=kw, mode=mode: F.interpolate(x, mode=mode, **kw)))
       for mode, shape in (("linear", (2, 3, 5)), ("bilinear", (2, 2, 4, 5)))
       for name, kw in [
           ("scale", dict(scale_factor=2.3)),
           ("scale_align", dict(scale_factor=1.5, align_corners=True)),
           ("down", dict(scale_factor=0.6)),
           ("recompute", dict(scale_factor=2.3, recompute_scale_factor=True)),
           ("size", dict(size=7 if mode == "linear" else (7, 3))),
           ("size_align", dict(size=9 if mode == "linear" else (9, 4), align_corners=True)),
           ("size_1_align", dict(size=1 if mode == "linear" else (1, 3), align_corners=True))]},
    # -- pixel shuffles -------------------------------------------------------------------
    "pixel_shuffle": Case(lambda: ml.PixelShuffle(2), {"input": (2, 8, 3, 2)},
                          unary(lambda x: F.pixel_shuffle(x, 2))),
    "pixel_shuffle_unbatched": Case(lambda: ml.PixelShuffle(3), {"input": (9, 2, 1)},
                                    unary(lambda x: F.pixel_shuffle(x, 3))),
    "pixel_shuffle_5d": Case(lambda: ml.PixelShuffle(2), {"input": (2, 1, 4, 2, 3)},
                             unary(lambda x: F.pixel_shuffle(x, 2))),
    "pixel_unshuffle": Case(lambda: ml.PixelUnshuffle(2), {"input": (2, 3, 4, 6)},
                            unary(lambda x: F.pixel_unshuffle(x, 2))),
    "pixel_unshuffle_unbatched": Case(lambda: ml.PixelUnshuffle(3), {"input": (1, 6, 3)},
                                      unary(lambda x: F.pixel_unshuffle(x, 3))),
}

test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(__name__, CASES)


@pytest.mark.parametrize("name", ["reflect_2d", "circular_1d_full", "replicate_2d_unbatched",
                                  "avg_2d_odd", "max_1d_overlap", "max_2d_odd_unbatched",
                                  "nearest_scale_odd", "nearest_1d_scale_2.1", "bilinear_down", "linear_scale_align",
                                  "pixel_shuffle", "pixel_unshuffle_unbatched"])
def test_numpy_vjp_matches_finite_differences(name: str) -> None:
    case = CASES[name]
    params, cots, _, grads = run_mithril(name, case, "numpy")
    f, x, h = scalar_loss(case, params, cots), params["input"], 1e-6
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        fd[i] = (f({"input": x + step}) - f({"input": x - step})) / (2 * h)
    assert np.abs(fd - grads["input"]).max() < 1e-7


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("block, ref", [
    (lambda: ml.Upsample(scale_factor=2), lambda x: F.interpolate(x, scale_factor=2)),
    (lambda: ml.Upsample(scale_factor=1.5, mode="bilinear"),
     lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear")),
    (lambda: ml.AdaptiveAvgPool2D((2, 3)), lambda x: F.adaptive_avg_pool2d(x, (2, 3))),
    (lambda: ml.AdaptiveMaxPool2D((2, 3)), lambda x: F.adaptive_max_pool2d(x, (2, 3))),
    (lambda: ml.ReflectionPad2D(2), lambda x: F.pad(x, (2,) * 4, mode="reflect")),
])
def test_nan_and_inf_stay_where_torch_puts_them(block, ref, backend_name: str) -> None:
    """Regression: resizing by dense per-axis matrices spread one NaN over whole rows
    (0 · NaN); an inf became NaN the same way. Now as torch's: only the outputs reading it."""
    from conftest import BACKENDS

    x = np.arange(20.0).reshape(1, 1, 4, 5)
    x[0, 0, 1, 2], x[0, 0, 0, 0], x[0, 0, 3, 4] = np.nan, np.inf, -np.inf
    backend = BACKENDS[backend_name](dtype="float64")
    out = _compile(block(), x.shape, backend).evaluate({}, {"input": backend.array(x)})["output"]
    assert nonfinite_error(np.asarray(backend.to_numpy(out)), ref(torch.tensor(x)).numpy()) <= 1e-12


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_adaptive_max_nan_and_all_minus_inf_windows_as_torch(backend_name: str) -> None:
    """A window's last NaN is its maximum and gets the gradient; a window of -inf only gives
    -inf and its first element the gradient (torch's ``val > max || isnan`` from -inf)."""
    case = Case(lambda: ml.AdaptiveMaxPool2D((2, 3)), {"input": _NONFINITE},
                unary(lambda x: F.adaptive_max_pool2d(x, (2, 3))))
    compare("max_2d_nan_inf", case, *run_mithril("max_2d_nan_inf", case, backend_name),
            what=backend_name, err=nonfinite_error)


def test_torch_1d_nearest_backward_disagrees_with_its_forward():
    """What the 1-D cases above work around, measured: torch 2.x's 1-D nearest forward with
    scale_factor=1.2 on 3 elements reads [x0, x0, x1], its backward sends [1, 1, 1]. If torch
    fixes it, this fails and the gather reference can go."""
    x = torch.arange(3.0, requires_grad=True)
    y = F.interpolate(x.reshape(1, 1, 3), scale_factor=1.2)
    assert y.flatten().tolist() == [0.0, 0.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]  # the forward's gradient is [2, 1, 0]


def _compile(block, shape, backend=None):
    model = ml.Model()
    model |= block(input="input", output="output")
    return ml.compile(model, backend or NumpyBackend(dtype="float64"), shapes={"input": list(shape)})


@pytest.mark.parametrize("block, shape, mode, torch_pad, message", [
    (lambda: ml.ReflectionPad1D(3), (1, 2, 3), "reflect", (3, 3),
     r"ReflectionPad1D: mode='reflect' needs each padding less than the input size.* "
     r"padding 3\+3 on spatial axis 0 of size 3"),
    (lambda: ml.ReflectionPad2D((0, 0, 0, 4)), (1, 1, 4, 6), "reflect", (0, 0, 0, 4),
     r"ReflectionPad2D: .*padding 0\+4 on spatial axis 0 of size 4"),
    (lambda: ml.CircularPad1D((0, 4)), (1, 2, 3), "circular", (0, 4),
     r"CircularPad1D: mode='circular' needs each padding at most the input size"),
])
def test_padding_beyond_the_input_is_refused_as_torch(block, shape, mode, torch_pad, message):
    with pytest.raises(ml.ShapeError, match=message):
        _compile(block(), shape)
    with pytest.raises((RuntimeError, ValueError)):
        F.pad(torch.zeros(shape), torch_pad, mode=mode)


def test_size_free_at_compile_time_checked_at_evaluate():
    model = ml.Model()
    model |= ml.ReflectionPad1D(2)(input="input", output="output")
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [1, 1, None]})
    with pytest.raises(ml.ShapeError, match="ReflectionPad1D: .* size 2"):
        compiled.evaluate({}, {"input": np.ones((1, 1, 2))})
    x = np.arange(4.0).reshape(1, 1, 4)
    want = F.pad(torch.tensor(x), (2, 2), mode="reflect").numpy()
    assert np.array_equal(compiled.evaluate({}, {"input": x})["output"], want)


@pytest.mark.parametrize("block, shape, message", [
    (lambda: ml.ReflectionPad2D(1), (4, 5), r"ReflectionPad2D: 'input' must have rank 4"),
    (lambda: ml.ZeroPad1D(1), (1, 2, 3, 4), r"ZeroPad1D: 'input' must have rank 3"),
    (lambda: ml.ZeroPad1D((-2, -2)), (1, 2, 3), r"ZeroPad1D: the negative padding \(-2, -2\) crops "
     r"more than the input's last 1 axes hold \(sizes \(-1,\) left\)"),  # torch: narrow()
    (lambda: ml.AdaptiveAvgPool2D(2), (2, 3, 4, 5, 6), r"AdaptiveAvgPool2D: 'input' must have rank 4"),
    (lambda: ml.AdaptiveMaxPool1D(2), (2, 3, 0), r"AdaptiveMaxPool1D: 'input' has an empty spatial axis"),
    (lambda: ml.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4),
     r"Upsample: mode='bilinear' needs an 'input' of rank 4 \(N, C, H, W\), got rank 3"),
    (lambda: ml.Upsample(scale_factor=2, mode="linear"), (2, 3, 4, 4),
     r"Upsample: mode='linear' needs an 'input' of rank 3"),
    (lambda: ml.Upsample(size=(2, 3)), (2, 3, 4), r"Upsample: size \(2, 3\) has 2 entries"),
    (lambda: ml.Upsample(scale_factor=0.2), (2, 3, 4), r"Upsample: input .* empty output size \(0,\)"),
    (lambda: ml.PixelShuffle(2), (1, 6, 2, 2), r"PixelShuffle: the channels 6 must be divisible by"),
    (lambda: ml.PixelUnshuffle(2), (1, 1, 3, 2), r"PixelUnshuffle: H and W \(3, 2\) must be divisible"),
])
def test_wrong_shapes_are_named(block, shape, message):
    with pytest.raises(ml.ShapeError, match=message):
        _compile(block(), shape)


@pytest.mark.parametrize("make, message", [
    (lambda: ml.Pad((1, 1), mode="mirror"), r"Pad: mode must be one of \('constant', 'reflect'"),
    (lambda: ml.Pad((1, 1, 1)), r"Pad: padding must be 2 ints"),
    (lambda: ml.ZeroPad2D((1, 1)), r"ZeroPad2D: padding must be an int or 4 ints"),
    (lambda: ml.AdaptiveMaxPool2D(2, return_indices=True),
     r"AdaptiveMaxPool2D: return_indices=True is not supported"),
    (lambda: ml.AdaptiveAvgPool1D(0), r"AdaptiveAvgPool1D: output_size must be a positive int"),
    (lambda: ml.AdaptiveAvgPool2D((2, 2, 2)), r"AdaptiveAvgPool2D: output_size must be"),
    (lambda: ml.Upsample(scale_factor=2, mode="nearest-area"), r"Upsample: mode must be one of"),
    (lambda: ml.Upsample(size=2, mode="area", align_corners=False),
     r"Upsample: align_corners can only be set"),
    (lambda: ml.Upsample(), r"Upsample: give exactly one of size and scale_factor"),
    (lambda: ml.Upsample(size=2, scale_factor=2), r"Upsample: give exactly one"),
    (lambda: ml.Upsample(size=2, align_corners=True), r"Upsample: align_corners can only be set"),
    (lambda: ml.Upsample(size=2, mode="linear", recompute_scale_factor=True),
     r"Upsample: recompute_scale_factor is not meaningful"),
    (lambda: ml.Upsample(scale_factor=-1.0), r"Upsample: scale_factor must be positive"),
    (lambda: ml.PixelShuffle(0), r"PixelShuffle: the factor must be a positive int"),
])
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_torch_refuses_the_same_arguments():
    """The refusals above are torch's own too."""
    x = torch.zeros(1, 1, 4)
    for kw in (dict(scale_factor=2, mode="nearest-area"), {}, dict(size=2, scale_factor=2),
               dict(size=2, align_corners=True), dict(size=2, mode="area", align_corners=False),
               dict(size=2, mode="linear", recompute_scale_factor=True)):
        with pytest.raises((ValueError, NotImplementedError)):
            F.interpolate(x, **kw)


# -- a CNN: convolution -> adaptive average pool -> linear, trained side by side ---------------
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 2 * 3, 3)

    def forward(self, input, target):
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(input)), (2, 3))
        return F.cross_entropy(self.head(x.flatten(1)), target)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_cnn_with_adaptive_pool_trains_as_torch(backend_name: str) -> None:
    from conftest import BACKENDS

    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=1)(input="input", output=ml.IOKey("c", expose=False))
    m |= ml.Relu()(input="c", output=ml.IOKey("r", expose=False))
    m |= ml.AdaptiveAvgPool2D((2, 3))(input="r", output=ml.IOKey("p", expose=False))
    m |= ml.Flatten()(input="p", output=ml.IOKey("f", expose=False))
    m |= ml.Linear(3)(input="f", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(m, backend, shapes={"input": [None, 2, 7, 5]})
    torch.manual_seed(0)
    net = Net().double()
    names = {"convolution2_d.weight": "conv.weight", "convolution2_d.bias": "conv.bias",
             "linear.weight": "head.weight", "linear.bias": "head.bias"}
    theirs = dict(net.named_parameters())
    assert set(compiled.get_parameters()) == set(names)
    params = {k: backend.array(theirs[t].detach().numpy().copy()) for k, t in names.items()}
    optimizer, reference = SGD(learning_rate=0.2), torch.optim.SGD(net.parameters(), lr=0.2)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(3)
    for _ in range(4):
        x, y = rng.standard_normal((4, 2, 7, 5)), rng.integers(0, 3, 4)
        reference.zero_grad()
        loss = net(torch.tensor(x), torch.tensor(y))
        loss.backward()
        reference.step()
        out, grads = compiled.evaluate(params, {"input": backend.array(x),
                                                "target": backend.array(y, backend.int_dtype)},
                                       output_gradients={"loss": 1.0})[:2]
        params, opt_state = optimizer.update(params, grads, opt_state)
        assert abs(float(backend.to_numpy(out["loss"])) - loss.item()) < 1e-10
        for k, t in names.items():
            assert np.abs(backend.to_numpy(params[k]) - theirs[t].detach().numpy()).max() < 1e-10
