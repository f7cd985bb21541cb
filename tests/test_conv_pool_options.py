"""The arguments of torch's convolution and pooling layers we do not offer, or offer under
another name, and inputs in other memory layouts.

1. torch's ``bias=``, ``output_padding=`` (transposed convolution), ``return_indices=``
   and average pooling's ``dilation=`` (torch's has none either): a ``TypeError`` that names
   the argument. ``use_bias`` must be a bool (it was read as truthiness: ``"no"`` made a
   bias, ``None`` none); ``divisor_override`` a nonzero int, as torch.
2. Channels-last inputs (an NHWC array seen as NCHW; torch's ``channels_last``): the output
   and gradients of Convolution2D, MaxPool2D and AvgPool2D equal torch's in float64 on NumPy
   and torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend


@pytest.mark.parametrize("make, message", [
    (lambda: ml.Convolution2D(3, 4, bias=False), r"Convolution2D: no bias= argument \(ours is use_bias"),
    (lambda: ml.Convolution1D(3, 4, output_padding=1),
     r"Convolution1D: no output_padding= argument \(transposed"),
    (lambda: ml.AvgPool2D(2, return_indices=True), r"AvgPool2D: no return_indices= argument"),
    (lambda: ml.AvgPool1D(2, dilation=2), r"AvgPool1D: no dilation= argument"),
    (lambda: ml.Linear(4, bias=False), r"Linear: no bias= argument \(ours is use_bias"),
    (lambda: ml.Linear(in_features=3, out_features=4),
     r"Linear: no in_features= argument \(read from the input's shape"),
    (lambda: ml.MLP(["relu", None], [4, 2], bias=False), r"MLP: no bias= argument \(ours is"),
])
def test_torch_arguments_not_offered_are_named(make, message: str) -> None:
    """The public layer is named (not an internal base class), with what to use instead."""
    with pytest.raises(TypeError, match=message):
        make()


@pytest.mark.parametrize("value", ["no", None, 1, np.array([True])])
def test_use_bias_must_be_a_bool(value) -> None:
    """Regression: ``use_bias="no"`` built a layer with a bias and ``None`` one without."""
    with pytest.raises(TypeError, match="Convolution2D: use_bias must be a bool"):
        ml.Convolution2D(3, 4, use_bias=value)
    assert ml.Convolution2D(3, 4, use_bias=np.bool_(False)).use_bias is False
    with pytest.raises(TypeError, match="Linear: use_bias must be a bool"):
        ml.Linear(4, use_bias=value)
    assert ml.Linear(4, use_bias=np.bool_(False)).use_bias is False


@pytest.mark.parametrize("value", [0, True, 1.5, "2"])
def test_divisor_override_must_be_a_nonzero_int(value) -> None:
    with pytest.raises(ValueError, match="AvgPool2D: divisor_override must be None or a nonzero"):
        ml.AvgPool2D(2, divisor_override=value)


BLOCKS = {  # name: (block, torch reference of (x, weight, bias))
    "conv": (lambda: ml.Convolution2D(3, 4, stride=2, padding=1, groups=2),
             lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2)),
    "max_pool": (lambda: ml.MaxPool2D(3, stride=1, padding=1),
                 lambda x, w, b: F.max_pool2d(x, 3, 1, 1)),
    "avg_pool": (lambda: ml.AvgPool2D(3, stride=2, padding=1, count_include_pad=False),
                 lambda x, w, b: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
}


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_channels_last_inputs_equal_torch(block: str, backend_name: str) -> None:
    make, ref = BLOCKS[block]
    rng = np.random.default_rng(7)
    x = np.moveaxis(rng.standard_normal((2, 6, 5, 4)), -1, 1)  # (N, C, H, W), NHWC in memory
    model = ml.Model()
    model |= make()(input="input", output="output")
    backend = (NumpyBackend if backend_name == "numpy" else TorchBackend)(dtype="float64")
    c = ml.compile(model, backend, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    params = {k: rng.standard_normal(v) for k, v in c.parameter_shapes.items() if k != "input"}
    xin = x if backend_name == "numpy" else torch.tensor(np.ascontiguousarray(x)).to(
        memory_format=torch.channels_last)
    assert not (xin.flags.c_contiguous if backend_name == "numpy" else xin.is_contiguous())
    cot = rng.standard_normal(c.program.output_shape("output"))
    out, grads = c.evaluate({"input": xin, **{k: backend.array(v) for k, v in params.items()}},
                            {}, output_gradients={"output": backend.array(cot)})
    t = {k: torch.tensor(v, requires_grad=True) for k, v in {"input": x, **params}.items()}
    w = next((v for k, v in t.items() if k.endswith("weight")), None)
    b = next((v for k, v in t.items() if k.endswith("bias")), None)
    y = ref(t["input"], w, b)
    want = torch.autograd.grad(y, list(t.values()), torch.tensor(cot))
    np.testing.assert_allclose(np.asarray(backend.to_numpy(out["output"])), y.detach().numpy(),
                               rtol=0, atol=1e-12)
    for k, g in zip(t, want):
        np.testing.assert_allclose(np.asarray(backend.to_numpy(grads[k])), g.numpy(), rtol=0,
                                   atol=1e-12, err_msg=k)
