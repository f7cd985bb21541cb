"""Hunt 65 (convolution, pooling and resampling blocks): edge cases against
``torch.nn.functional`` in float64, forward and every gradient, on NumPy, torch and JAX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml

BACKENDS = {
    "numpy": lambda: ml.NumpyBackend(dtype="float64", seed=0),
    "torch": lambda: ml.TorchBackend(dtype="float64", seed=0),
    "jax": lambda: ml.JaxBackend(dtype="float64", seed=0),
}


def _np(v) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _compare(block, x: np.ndarray, ref, backend: str, tol: float = 1e-10) -> None:
    """The block's output and input gradient against ``ref`` (torch autograd)."""
    model = ml.Model()
    model |= block(input="input", output="output")
    be = BACKENDS[backend]()
    compiled = ml.compile(model, be, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    xt = torch.tensor(x, requires_grad=True)
    y = ref(xt)
    g = np.random.default_rng(1).standard_normal(tuple(y.shape))
    y.backward(torch.tensor(g))
    out, grads = compiled.evaluate({"input": be.array(x)}, {},
                                   output_gradients={"output": be.array(g)})
    assert np.abs(_np(out["output"]) - y.detach().numpy()).max() < tol
    assert np.abs(_np(grads["input"]) - xt.grad.numpy()).max() < tol


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode, shape, scale", [
    ("linear", (1, 2, 3), 1.2),                  # 3 -> 3: copied, not interpolated
    ("bilinear", (1, 2, 5, 3), 1.2),             # 5 -> 6, 3 -> 3
    ("trilinear", (1, 1, 3, 4, 5), 1.2),         # 3 -> 3, 4 -> 4, 5 -> 6
    ("bilinear", (2, 1, 4, 3), (1.1, 2.0)),      # 4 -> 4 (scale 1.1), 3 -> 6
])
def test_linear_upsample_same_size_axis_is_copied(backend, mode, shape, scale):
    """torch's linear modes copy an axis whose size a ``scale_factor`` leaves unchanged
    (``compute_source_index_and_lambda``'s output_size == input_size case, forward and
    backward); the NumPy and JAX taps interpolated at scale 1/1.2 instead."""
    x = np.random.default_rng(0).standard_normal(shape)
    _compare(lambda **k: ml.Upsample(scale_factor=scale, mode=mode)(**k), x,
             lambda t: F.interpolate(t, scale_factor=scale, mode=mode), backend)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode, shape, padding", [
    ("reflect", (2, 1, 3), (-1, 2)),             # [1, 2, 3] -> [2, 3, 2, 1]
    ("reflect", (1, 2, 3), (2, -2)),             # 2 < 3 but more than the 1 element left
    ("reflect", (1, 2, 3), (-4, 2)),             # cropped past the input, into the padding
    ("replicate", (1, 2, 1), (3, -2)),           # [x0, x0]
    ("replicate", (1, 2, 3), (-3, 1)),           # the right padding only
    ("reflect", (3, 3, 4), (-1, 2, 2, -1)),      # unbatched 2-D
    ("replicate", (2, 3, 2, 2), (-2, 1, 0, 2, 1, -1)),
])
def test_pad_negative_reflect_replicate_pads_then_crops(backend, mode, shape, padding):
    """torch's reflect / replicate kernels pad the whole input and crop the result, their
    limits on the input's size: F.pad([1, 2, 3], (-1, 2), "reflect") is [2, 3, 2, 1]. Ours
    cropped first and refused these valid calls (a ShapeError about the cropped size)."""
    x = np.random.default_rng(0).standard_normal(shape)
    unbatched = len(shape) == len(padding) // 2 + 1
    _compare(lambda **k: ml.Pad(padding, mode=mode)(**k), x,
             lambda t: F.pad(t[None], padding, mode=mode)[0] if unbatched
             else F.pad(t, padding, mode=mode), backend)


def test_pad_negative_reflect_leaving_nothing_is_refused():
    """torch refuses an output without an element ("input is too small"); so do we, by name."""
    model = ml.Model()
    model |= ml.ReflectionPad1D((-2, -1))(input="input", output="output")
    with pytest.raises(ml.ShapeError, match="ReflectionPad1D.*negative padding"):
        ml.compile(model, ml.NumpyBackend(), shapes={"input": [1, 2, 3]})


_EMPTY_BATCH = {  # block, input shape with N = 0, torch's function
    "adaptive_max1": (lambda: ml.AdaptiveMaxPool1D(3), (0, 2, 5),
                      lambda t: F.adaptive_max_pool1d(t, 3)),
    "adaptive_max2": (lambda: ml.AdaptiveMaxPool2D(3), (0, 2, 5, 4),
                      lambda t: F.adaptive_max_pool2d(t, 3)),
    "adaptive_max3": (lambda: ml.AdaptiveMaxPool3D(2), (0, 2, 3, 3, 3),
                      lambda t: F.adaptive_max_pool3d(t, 2)),
    "unfold": (lambda: ml.Unfold(2, padding=1), (0, 2, 3, 3), lambda t: F.unfold(t, 2, padding=1)),
    "fold": (lambda: ml.Fold((3, 3), 2), (0, 8, 4), lambda t: F.fold(t, (3, 3), 2)),
    "pixel_shuffle": (lambda: ml.PixelShuffle(2), (0, 4, 3, 3), lambda t: F.pixel_shuffle(t, 2)),
    "pixel_unshuffle": (lambda: ml.PixelUnshuffle(2), (0, 1, 4, 4),
                        lambda t: F.pixel_unshuffle(t, 2)),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(_EMPTY_BATCH))
def test_empty_batch(backend, name):
    """A batch of 0 examples gives torch's output shape and an empty input gradient. The
    NumPy and JAX paths reshaped with -1 (ambiguous for 0 elements); torch's own
    pixel_unshuffle returns an empty input unchanged (shape (0, 1, 4, 4), not (0, 4, 2, 2))
    and pixel_shuffle's backward fails on it."""
    block, shape, ref = _EMPTY_BATCH[name]
    want = tuple(ref(torch.zeros(1, *shape[1:], dtype=torch.float64))[:0].shape)
    model = ml.Model()
    model |= block()(input="input", output="output")
    be = BACKENDS[backend]()
    compiled = ml.compile(model, be, shapes={"input": list(shape)}, trainable_keys={"input"})
    out, grads = compiled.evaluate({"input": be.array(np.zeros(shape))}, {},
                                   output_gradients={"output": be.array(np.zeros(want))})
    assert tuple(out["output"].shape) == want
    assert tuple(grads["input"].shape) == shape


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_empty_batch_max_pool_indices_unpool(backend):
    """MaxPool2D(return_indices=True) into MaxUnpool2D on a batch of 0 (NumPy reshaped the
    indices and the unpool's cotangent with -1)."""
    model = ml.Model()
    model |= ml.MaxPool2D(2, return_indices=True)(
        input="input", output=ml.IOKey("o", expose=False), indices=ml.IOKey("i", expose=False))
    model |= ml.MaxUnpool2D(2)(input="o", indices="i", output="output")
    be = BACKENDS[backend]()
    compiled = ml.compile(model, be, shapes={"input": [0, 2, 4, 4]}, trainable_keys={"input"})
    out, grads = compiled.evaluate({"input": be.array(np.zeros((0, 2, 4, 4)))}, {},
                                   output_gradients={"output": be.array(np.zeros((0, 2, 4, 4)))})
    assert tuple(out["output"].shape) == (0, 2, 4, 4)
    assert tuple(grads["input"].shape) == (0, 2, 4, 4)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape, kw", [
    ((2, 3, 7), dict(scale_factor=1.5)),
    ((1, 2, 3), dict(scale_factor=1.2)),                     # 3 -> 3, not the identity
    ((2, 2, 5, 3), dict(size=(7, 2))),
    ((1, 1, 4, 6), dict(scale_factor=(0.7, 1 / 3), recompute_scale_factor=True)),
    ((1, 2, 2, 3, 5), dict(scale_factor=(2.0, 1.5, 0.5))),
    ((3, 4, 5), dict(size=11)),
])
def test_upsample_nearest_exact(backend, shape, kw):
    """F.interpolate(mode="nearest-exact"): output j reads min(floor((j + ½)·r), n − 1) in
    float32, on every rank (was refused: not among the modes)."""
    x = np.random.default_rng(0).standard_normal(shape)
    _compare(lambda **k: ml.Upsample(mode="nearest-exact", **kw)(**k), x,
             lambda t: F.interpolate(t, mode="nearest-exact", **kw), backend)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape, kw", [
    ((2, 3, 7), dict(scale_factor=0.5)),                     # 7 -> 3: windows of 3, overlapping
    ((1, 2, 7), dict(scale_factor=1.6)),                     # 7 -> 11: upsampling
    ((2, 2, 5, 3), dict(size=(7, 2))),
    ((1, 1, 4, 6), dict(scale_factor=(0.7, 1 / 3), recompute_scale_factor=True)),
    ((1, 2, 2, 3, 5), dict(scale_factor=(2.0, 1.5, 0.5))),
])
def test_upsample_area(backend, shape, kw):
    """F.interpolate(mode="area"): adaptive average pooling to the output size, on every rank
    (was refused: not among the modes)."""
    x = np.random.default_rng(0).standard_normal(shape)
    _compare(lambda **k: ml.Upsample(mode="area", **kw)(**k), x,
             lambda t: F.interpolate(t, mode="area", **kw), backend)


def test_upsample_nearest_exact_refuses_align_corners():
    with pytest.raises(ValueError, match="align_corners.*'nearest-exact'"):
        ml.Upsample(scale_factor=2, mode="nearest-exact", align_corners=False)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape, k, s, p, output_size", [
    ((2, 2, 4, 4, 6), 2, 2, 0, None),
    ((1, 2, 5, 5, 3), 3, 2, 1, None),
    ((2, 5, 4, 6), 2, 2, 0, None),                     # unbatched (C, D, H, W)
    ((1, 2, 5, 4, 5), 2, 2, 0, (5, 4, 5)),             # odd sizes back through output_size
])
def test_max_unpool3d_after_max_pool3d(backend, shape, k, s, p, output_size):
    """nn.MaxUnpool3d (MaxPool3D's indices back into the volume), torch's values and input
    gradient; there was no MaxUnpool3D (MaxPool3D(return_indices=True) had no inverse)."""

    def block(**keys):
        model = ml.Model()
        model |= ml.MaxPool3D(k, stride=s, padding=p, return_indices=True)(
            input="input", output=ml.IOKey("o", expose=False), indices=ml.IOKey("i", expose=False))
        model |= ml.MaxUnpool3D(k, stride=s, padding=p, output_size=output_size)(
            input="o", indices="i", output="output")
        return model(**keys)

    def ref(t):
        o, i = F.max_pool3d(t, k, s, p, return_indices=True)
        return F.max_unpool3d(o, i, k, s, p, output_size=output_size)

    x = np.round(2 * np.random.default_rng(0).standard_normal(shape))  # ties: the first max
    _compare(block, x, ref, backend)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("norm_type, k, s, ceil, shape", [
    (2.0, 2, None, False, (2, 2, 4, 4, 5)),
    (1.0, 2, 1, True, (2, 3, 4, 5)),                   # unbatched
    (3.0, (1, 2, 3), (1, 2, 2), True, (1, 2, 3, 5, 6)),
])
def test_lp_pool3d(backend, norm_type, k, s, ceil, shape):
    """nn.LPPool3d / F.lp_pool3d (there was no LPPool3D)."""
    x = np.random.default_rng(0).standard_normal(shape)
    x = np.abs(x) if norm_type == 3.0 else x  # a negative sum's root is NaN, as torch's
    _compare(lambda **kw: ml.LPPool3D(norm_type, k, stride=s, ceil_mode=ceil)(**kw), x,
             lambda t: F.lp_pool3d(t, norm_type, k, s, ceil), backend)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pad_value_with_non_constant_mode_is_refused(mode):
    """F.pad(x, p, mode="reflect", value=1.0) raises ("doesn't take in value argument"); ours
    silently dropped the value. value=0 stays accepted, as torch's."""
    with pytest.raises(RuntimeError):
        F.pad(torch.zeros(1, 1, 3), (1, 1), mode=mode, value=1.0)
    with pytest.raises(ValueError, match=f"Pad: mode='{mode}' takes no value.*value=1.0"):
        ml.Pad((1, 1), mode=mode, value=1.0)
    assert ml.Pad((1, 1), mode=mode, value=0.0).mode == mode
