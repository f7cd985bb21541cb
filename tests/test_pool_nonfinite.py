"""Max pooling over −inf and NaN, side by side with ``torch.nn.functional.max_pool1d/2d``.

torch's max pooling takes, per window, the first maximum in window order (row-major over the
kernel), the last NaN where the window holds one (its CPU kernel: ``val > max || isnan(val)``;
the output is NaN) and, where every element inside the input is −inf, the first of them (the
−inf padding never: its windows start at the first element inside). Its backward adds each
output's cotangent at that one element, so overlapping windows (stride < kernel) add up.

1. A table of configurations (padding, stride < kernel and > kernel, dilation, ``ceil_mode``
   with a last window past the end or one that would start in the padding, which torch drops;
   1-D and 2-D) over one input with an all −inf plane, −inf blocks next to the padding, NaN
   pairs and ties: the output and the input gradient within 1e-10 of torch's in float64 on
   NumPy, torch and JAX (JAX in a fresh x64 process), infinities and NaN in the same places.
2. Regression: JAX float32 in-process, where XLA's own ``reduce_window`` derivative sent an
   all −inf window's gradient to the padding (lost) and a NaN window's past the NaN.
3. NumPy float16 (the strided path, not the compiled loops) routes as torch's float16.
4. ``return_indices`` is offered by MaxPool (tests/test_max_pool_indices_vs_torch.py);
   AvgPool refuses it by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_edges import Case, nonfinite_error, parity_tests

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend


def _input(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal values with the cases that route differently: channel (0, 0) all −inf,
    a −inf block at the top-left corner of (1, 1) (windows over it and the padding), two
    NaNs in one row and one alone, and a tie."""
    x = np.random.default_rng(118).standard_normal(shape)
    x[0, 0] = -np.inf
    x[1, 1, ..., :3] = -np.inf
    if len(shape) == 4:
        x[1, 1, 3:] = np.random.default_rng(1).standard_normal(x[1, 1, 3:].shape)
        x[0, 1, 1, 1] = x[0, 1, 1, 2] = np.nan
        x[1, 0, 3, 3] = np.nan
        x[1, 1, 4, 4] = x[1, 1, 4, 5] = 5.0
    else:
        x[0, 1, 1] = x[0, 1, 2] = np.nan
        x[1, 0, 5] = np.nan
        x[1, 1, 6] = x[1, 1, 7] = 5.0
    return x


def _case(nd: int, k: int, s: int, p: int, d: int, ceil: bool) -> Case:
    block = ml.MaxPool1D if nd == 1 else ml.MaxPool2D
    fn = F.max_pool1d if nd == 1 else F.max_pool2d
    shape = (2, 2, 10) if nd == 1 else (2, 2, 6, 7)  # ceil_mode drops a last window: 10, 7
    return Case(lambda: block(k, stride=s, padding=p, dilation=d, ceil_mode=ceil),
                {"input": _input(shape)},
                lambda t, _: {"output": fn(t["input"], k, s, p, d, ceil_mode=ceil)})


# (kernel, stride, padding, dilation, ceil_mode)
CONFIGS = {
    "disjoint": (2, 2, 0, 1, False),
    "overlapping": (2, 1, 0, 1, False),
    "padded_overlapping": (3, 1, 1, 1, False),
    "padded_stride2": (3, 2, 1, 1, False),
    "stride_above_kernel": (2, 3, 1, 1, False),
    "ceil_past_end": (2, 2, 1, 1, True),
    "ceil_overlapping": (3, 2, 1, 1, True),
    "ceil_start_in_padding_dropped": (2, 3, 1, 1, True),
    "dilated": (3, 2, 1, 2, False),
    "dilated_ceil": (3, 3, 1, 2, True),
    "dilated_overlapping_ceil": (2, 1, 1, 3, True),
}
CASES: dict[str, Case] = {f"max_pool{nd}d_{name}": _case(nd, *cfg)
                          for nd in (1, 2) for name, cfg in CONFIGS.items()}

test_equals_torch, jax_results, test_jax_equals_torch = parity_tests(
    "test_pool_nonfinite", CASES, err=nonfinite_error)


def test_the_input_holds_what_the_cases_are_about() -> None:
    """Every configuration's torch output has −inf and NaN windows (else the table would not
    test the routing it is named for)."""
    for name, case in CASES.items():
        y = case.torch_fn({"input": torch.tensor(case.inputs["input"])}, {})["output"]
        assert torch.isneginf(y).any() and torch.isnan(y).any(), name


def _grad(backend, block, x: np.ndarray, cot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = ml.Model()
    model |= block(input="input", output="output")
    c = ml.compile(model, backend, shapes={"input": list(x.shape)}, trainable_keys={"input"})
    out, grads = c.evaluate({"input": backend.array(x)}, {},
                            output_gradients={"output": backend.array(cot)})
    return (np.asarray(backend.to_numpy(out["output"]), np.float64),
            np.asarray(backend.to_numpy(grads["input"]), np.float64))


@pytest.mark.parametrize("config", ["disjoint", "padded_overlapping", "ceil_past_end"])
def test_jax_float32_max_pool_gradient_of_minus_inf_and_nan_windows_is_torchs(config: str) -> None:
    """Regression (JAX without dilation took XLA's ``reduce_window`` derivative): an all −inf
    window's gradient went to the −inf padding or another element, a NaN window's past the
    NaN: 2, 25 and 14 of 168 gradient elements off by up to 0.23, 2.0 and 2.6 before. Now
    torch's float32 gradient."""
    k, s, p, d, ceil = CONFIGS[config]
    x = _input((2, 2, 6, 7)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    want = F.max_pool2d(tx, k, s, p, d, ceil_mode=ceil)
    cot = np.random.default_rng(3).standard_normal(tuple(want.shape)).astype(np.float32)
    (want_g,) = torch.autograd.grad(want, tx, torch.tensor(cot))
    out, g = _grad(JaxBackend(dtype="float32"), ml.MaxPool2D(k, stride=s, padding=p, dilation=d,
                                                            ceil_mode=ceil), x, cot)
    np.testing.assert_array_equal(out, want.detach().numpy())  # equal infinities and NaNs agree
    np.testing.assert_allclose(g, want_g.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("nd", [1, 2])
def test_numpy_float16_strided_path_routes_minus_inf_and_nan_as_torch(nd: int) -> None:
    """float16 takes the per-offset masks (the compiled loops are float32/float64 only): the
    same routing as torch's float16 max pooling, overlapping padded windows included."""
    shape = (2, 2, 9) if nd == 1 else (2, 2, 6, 7)
    x = _input(shape).astype(np.float16)
    tx = torch.tensor(x, requires_grad=True)
    fn = F.max_pool1d if nd == 1 else F.max_pool2d
    want = fn(tx, 3, 1, 1)
    cot = np.random.default_rng(4).integers(1, 4, tuple(want.shape)).astype(np.float16)
    (want_g,) = torch.autograd.grad(want, tx, torch.tensor(cot))
    out, g = _grad(NumpyBackend(dtype="float16"),
                   (ml.MaxPool1D if nd == 1 else ml.MaxPool2D)(3, stride=1, padding=1), x, cot)
    np.testing.assert_array_equal(out, want.detach().double().numpy())
    np.testing.assert_array_equal(g, want_g.double().numpy())  # small integer sums: exact


@pytest.mark.parametrize("block", [ml.AvgPool1D, ml.AvgPool2D])
def test_return_indices_is_not_offered_by_avg_pool_and_the_error_names_it(block) -> None:
    with pytest.raises(TypeError, match="return_indices"):
        block(2, return_indices=True)
