"""Convolutions, pooling and GroupNorm against ``torch.nn.functional``.

1. Every block, float64, on NumPy, JAX and torch: the output and the gradient of every
   parameter *and of the input* (the input is a learnable :class:`Source`, so its gradient
   is the block's input cotangent) equal torch's within 1e-10, over strides, padding
   (ints, pairs, asymmetric, "same"), dilation and groups. JAX float64 needs ``jax_enable_x64``
   for the whole process, so the JAX column runs once in a subprocess.
2. The NumPy VJPs against central finite differences on small shapes.
3. torch's default initialisation (bounds and moments) and the bad-input errors.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, jax_case_params, jax_float64, selected_cases, to_np

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import ShapeError

TOL = 1e-10
# torch's own note on padding="same" with an even kernel (the reference, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


class Source(ml.Operator):
    """A learnable array of a fixed shape (parameter ``value``): what the block reads, so that
    its gradient is the block's input cotangent on every backend."""

    inputs = ()
    param_init = {"value": "normal"}

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)

    def param_shapes(self, shapes):
        return {"value": self.shape}

    def infer_shape(self, shapes):
        return self.shape

    def forward(self, xp, value):
        return value

    def vjp(self, g, out, args, wrt):
        return {"value": g}


def _asym(x, w, b):  # padding ((1, 0), (2, 1)): F.pad takes the last axis first
    return F.conv2d(F.pad(x, (2, 1, 1, 0)), w, b, stride=(1, 2))


# name -> (block factory, input shape, torch reference(x, weight, bias), input kind)
CASES = {
    "conv2d": (lambda: ml.Convolution2D(3, 4), (2, 3, 7, 6),
               lambda x, w, b: F.conv2d(x, w, b)),
    "conv2d_stride_padding_dilation_groups": (
        lambda: ml.Convolution2D((3, 2), 6, stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=3),
        (2, 6, 9, 8), lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 2), (2, 1), 3)),
    "conv2d_stride3_uneven": (lambda: ml.Convolution2D(2, 3, stride=3, padding=1), (1, 2, 8, 7),
                              lambda x, w, b: F.conv2d(x, w, b, 3, 1)),
    "conv2d_depthwise": (lambda: ml.Convolution2D(3, 8, padding=1, groups=4), (2, 4, 5, 5),
                         lambda x, w, b: F.conv2d(x, w, b, 1, 1, 1, 4)),
    "conv2d_no_bias": (lambda: ml.Convolution2D(1, 5, use_bias=False), (2, 3, 4, 4),
                       lambda x, w, b: F.conv2d(x, w)),
    "conv2d_same_even_kernel": (lambda: ml.Convolution2D((4, 3), 4, padding="same", dilation=(1, 2)),
                                (1, 2, 6, 7), lambda x, w, b: F.conv2d(x, w, b, padding="same", dilation=(1, 2))),
    "conv2d_valid": (lambda: ml.Convolution2D(3, 2, padding="valid"), (1, 2, 5, 4),
                     lambda x, w, b: F.conv2d(x, w, b, padding="valid")),
    "conv2d_asymmetric_padding": (lambda: ml.Convolution2D(3, 3, stride=(1, 2), padding=((1, 0), (2, 1))),
                                  (2, 2, 5, 6), _asym),
    "conv2d_kernel_fills_input": (lambda: ml.Convolution2D(5, 2, padding=1), (1, 1, 3, 3),
                                  lambda x, w, b: F.conv2d(x, w, b, 1, 1)),
    "conv1d": (lambda: ml.Convolution1D(3, 4), (2, 3, 9), lambda x, w, b: F.conv1d(x, w, b)),
    "conv1d_stride_padding_dilation_groups": (
        lambda: ml.Convolution1D(3, 6, stride=2, padding=2, dilation=3, groups=2), (3, 4, 13),
        lambda x, w, b: F.conv1d(x, w, b, 2, 2, 3, 2)),
    "conv1d_same": (lambda: ml.Convolution1D(4, 3, padding="same"), (2, 2, 7),
                    lambda x, w, b: F.conv1d(x, w, b, padding="same")),
    "max_pool2d": (lambda: ml.MaxPool2D(2), (2, 3, 6, 7), lambda x, w, b: F.max_pool2d(x, 2)),
    "max_pool2d_stride_padding_dilation": (
        lambda: ml.MaxPool2D((3, 2), stride=(2, 1), padding=(1, 1), dilation=(2, 1)), (2, 2, 9, 7),
        lambda x, w, b: F.max_pool2d(x, (3, 2), (2, 1), (1, 1), (2, 1))),
    "max_pool2d_overlapping_ties": (lambda: ml.MaxPool2D(3, stride=1, padding=1), (2, 2, 5, 6),
                                    lambda x, w, b: F.max_pool2d(x, 3, 1, 1)),
    "max_pool1d": (lambda: ml.MaxPool1D(3, padding=1), (2, 3, 10), lambda x, w, b: F.max_pool1d(x, 3, padding=1)),
    "max_pool1d_ties": (lambda: ml.MaxPool1D(4, stride=2, dilation=2), (2, 2, 15),
                        lambda x, w, b: F.max_pool1d(x, 4, 2, 0, 2)),
    "avg_pool2d": (lambda: ml.AvgPool2D(2), (2, 3, 6, 5), lambda x, w, b: F.avg_pool2d(x, 2)),
    "avg_pool2d_stride_padding": (lambda: ml.AvgPool2D((3, 2), stride=(2, 1), padding=(1, 1)),
                                  (2, 2, 7, 6), lambda x, w, b: F.avg_pool2d(x, (3, 2), (2, 1), (1, 1))),
    "avg_pool1d": (lambda: ml.AvgPool1D(3, stride=2, padding=1), (2, 3, 8),
                   lambda x, w, b: F.avg_pool1d(x, 3, 2, 1)),
    "global_avg_pool2d": (lambda: ml.GlobalAvgPool2D(), (3, 4, 5, 6),
                          lambda x, w, b: F.adaptive_avg_pool2d(x, 1).flatten(1)),
    "group_norm": (lambda: ml.GroupNorm(3), (2, 6, 4, 5), lambda x, w, b: F.group_norm(x, 3, w, b)),
    "group_norm_eps_3d": (lambda: ml.GroupNorm(2, eps=1e-3), (3, 4, 7), lambda x, w, b: F.group_norm(x, 2, w, b, 1e-3)),
    "group_norm_5d": (lambda: ml.GroupNorm(2), (2, 4, 2, 3, 3), lambda x, w, b: F.group_norm(x, 2, w, b)),
    "group_norm_instance": (lambda: ml.GroupNorm(4), (2, 4, 3, 3), lambda x, w, b: F.group_norm(x, 4, w, b)),
    "group_norm_no_affine": (lambda: ml.GroupNorm(1, affine=False), (2, 4, 3, 3),
                             lambda x, w, b: F.group_norm(x, 1)),
}
TIES = {"max_pool2d_overlapping_ties", "max_pool1d_ties"}  # small integers: many equal maxima


def make_data(case: str, out_shape=None):
    """The input and random parameters of ``case`` (the same on every backend and process)."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    shape = CASES[case][1]
    x = rng.integers(-2, 3, shape).astype(np.float64) if case in TIES else rng.standard_normal(shape)
    return x, rng


def build(case: str) -> ml.Model:
    m = ml.Model()
    m |= Source(CASES[case][1])(output="x")
    m |= CASES[case][0]()(input="x", output="output")
    return m


def role(name: str) -> str:
    r = name.rsplit(".", 1)[1]
    return "input" if r == "value" else r


def run_mithril(case: str, backend_name: str, jit: bool = True):
    """Outputs and gradients (keyed by role: input, weight, bias) of ``case`` in float64."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(build(case), backend, jit=jit)
    x, rng = make_data(case)
    names = list(compiled.get_parameters())
    params = {n: x if role(n) == "input" else rng.standard_normal(compiled.parameter_shapes[n])
              for n in names}
    cot = rng.standard_normal(compiled.program.output_shape("output"))
    native = {k: backend.array(v) for k, v in params.items()}
    out, grads = compiled.evaluate(native, {}, output_gradients={"output": backend.array(cot)})
    plain = compiled.evaluate(native, {})
    # (XLA compiles the forward alone and the forward+VJP separately: last-bit differences)
    assert max_error(to_np(backend, plain["output"]), to_np(backend, out["output"])) <= 1e-14
    return ({role(n): v for n, v in params.items()}, cot, to_np(backend, out["output"]),
            {role(n): to_np(backend, g) for n, g in grads.items()})


def run_torch(case: str, params: dict, cot: np.ndarray):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    out = CASES[case][2](t["input"], t.get("weight"), t.get("bias"))
    grads = torch.autograd.grad(out, list(t.values()), torch.tensor(cot))
    return out.detach().numpy(), {k: g.numpy() for k, g in zip(t, grads)}


def max_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max(initial=0.0)) / max(1.0, float(np.abs(want).max(initial=0.0)))


def compare(case: str, params, cot, out, grads, what: str) -> None:
    want_out, want_grads = run_torch(case, params, cot)
    assert set(grads) == set(want_grads) == set(params)
    errs = {"output": max_error(out, want_out),
            **{f"gradient of {k}": max_error(grads[k], want_grads[k]) for k in want_grads}}
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {case}: {bad}"


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch(case, backend_name):
    compare(case, *run_mithril(case, backend_name), what=backend_name)


CONV_CASES = [c for c in CASES if c.startswith("conv")]


@pytest.mark.parametrize("case", CONV_CASES)
def test_numpy_convolution_in_chunks_of_one_image_equals_torch(case, monkeypatch):
    """The NumPy convolution works through the batch in chunks of im2col rows (one here:
    every image its own chunk, the weight gradient summed over them)."""
    from mithril.models import conv

    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    compare(case, *run_mithril(case, "numpy"), what="numpy, one image per chunk")


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("conv", "max_pool"))])
def test_numpy_without_compiled_loops_equals_torch(case, monkeypatch):
    """The NumPy paths dtypes without compiled window loops take (bfloat16, float16): strided
    copies and adds for im2col / col2im, per-offset masks for max pooling."""
    from mithril.models import window_kernels

    monkeypatch.setattr(window_kernels, "_COMPILED", ())
    compare(case, *run_mithril(case, "numpy"), what="numpy, no compiled loops")


@pytest.fixture(scope="module")
def jax_results(request):
    """The selected cases on JAX float64 (jit), run once in a fresh interpreter."""
    flat = {}
    with jax_float64():
        for case in selected_cases(request, "case", list(CASES)):
            params, cot, out, grads = run_mithril(case, "jax")
            flat[case + "|output"] = np.asarray(out)
            flat.update({case + "|grad|" + k: np.asarray(v) for k, v in grads.items()})
    return flat


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch(case, jax_results):
    params, cot, _, _ = run_mithril(case, "numpy")  # the same params and cotangent as in there
    grads = {k.rsplit("|", 1)[1]: v for k, v in jax_results.items() if k.startswith(case + "|grad|")}
    compare(case, params, cot, jax_results[case + "|output"], grads, what="jax")


# -- finite differences of the NumPy VJPs ------------------------------------------------------
FD_CASES = {
    "conv2d": (lambda: ml.Convolution2D((3, 2), 4, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
               (1, 4, 5, 5)),
    "conv2d_same": (lambda: ml.Convolution2D(2, 2, padding="same"), (1, 2, 4, 3)),
    "conv1d": (lambda: ml.Convolution1D(3, 3, stride=2, padding=1, dilation=2, groups=3), (2, 3, 9)),
    "max_pool2d": (lambda: ml.MaxPool2D(3, stride=2, padding=1, dilation=(1, 2)), (1, 2, 6, 7)),
    "max_pool1d": (lambda: ml.MaxPool1D(2, stride=1), (2, 2, 6)),
    "avg_pool2d": (lambda: ml.AvgPool2D(3, stride=(1, 2), padding=1), (1, 2, 5, 6)),
    "avg_pool1d": (lambda: ml.AvgPool1D(2, padding=1), (2, 2, 5)),
    "global_avg_pool2d": (lambda: ml.GlobalAvgPool2D(), (2, 3, 3, 4)),
    "group_norm": (lambda: ml.GroupNorm(2), (2, 4, 3, 2)),
    "group_norm_3d": (lambda: ml.GroupNorm(3, eps=1e-2), (2, 3, 4)),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_numpy_vjp_matches_finite_differences(case, eps=1e-6):
    factory, shape = FD_CASES[case]
    m = ml.Model()
    m |= Source(shape)(output="x")
    m |= factory()(input="x", output="output")
    compiled = ml.compile(m, NumpyBackend(dtype="float64"))
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = {k: rng.standard_normal(v) for k, v in compiled.parameter_shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))

    def loss(p):
        return float(np.sum(compiled.evaluate(p, {})["output"] * cot))

    _, grads = compiled.evaluate(params, {}, output_gradients={"output": cot})
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            orig = p[i]
            p[i] = orig + eps
            up = loss(params)
            p[i] = orig - eps
            numeric[i] = (up - loss(params)) / (2 * eps)
            p[i] = orig
        scale = max(np.abs(numeric).max(), 1e-3)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7 * scale,
                                   err_msg=f"{case}: gradient of '{name}'")


# -- initialisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("nd, groups", [(2, 1), (2, 4), (1, 2)])
def test_default_init_is_torchs(nd, groups):
    """kaiming_uniform_(a=√5) weights and U(±1/√fan_in) biases, as torch.nn.Conv{1,2}d."""
    c_in, c_out, k = 8, 64, 3
    block = (ml.Convolution2D if nd == 2 else ml.Convolution1D)(k, c_out, groups=groups)
    shape = [2, c_in, *([9] * nd)]
    params = ml.compile(block, NumpyBackend(dtype="float64", seed=3), shapes={"input": shape}).get_parameters()
    w = next(v for n, v in params.items() if n.endswith(".weight"))
    b = next(v for n, v in params.items() if n.endswith(".bias"))
    fan_in = c_in // groups * k**nd
    bound = 1 / math.sqrt(fan_in)
    ref = (torch.nn.Conv2d if nd == 2 else torch.nn.Conv1d)(c_in, c_out, k, groups=groups, dtype=torch.float64)
    assert w.shape == tuple(ref.weight.shape) and b.shape == tuple(ref.bias.shape)
    for name, ours, theirs in (("weight", w, ref.weight), ("bias", b, ref.bias)):
        theirs = theirs.detach().numpy()
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound, name
    # the uniform's moments (the weight has >= 576 draws)
    for arr in (w, ref.weight.detach().numpy()):
        assert np.abs(arr).max() > 0.97 * bound
        assert abs(arr.mean()) < 0.1 * bound
        assert abs(arr.var() / (bound**2 / 3) - 1) < 0.15
    assert np.abs(b).max() > 0.5 * bound  # 64 draws of U(±bound)


def test_init_same_on_every_backend_and_group_norm_init():
    model = ml.Model()
    model += ml.Convolution2D(3, 4, padding=1)
    model += ml.GroupNorm(2)
    per_backend = {}
    for name, cls in BACKENDS.items():
        backend = cls(dtype="float32", seed=5)
        params = ml.compile(model, backend, shapes={"input": [1, 3, 6, 6]}).get_parameters()
        per_backend[name] = {k: to_np(backend, v) for k, v in params.items()}
    ref = per_backend["numpy"]
    for name, params in per_backend.items():
        assert list(params) == list(ref)
        for k, v in params.items():
            np.testing.assert_array_equal(v, ref[k], err_msg=f"{name}: {k}")
    gn = {k.rsplit(".", 1)[1]: v for k, v in ref.items() if k.startswith("group_norm")}
    np.testing.assert_array_equal(gn["weight"], np.ones(4))
    np.testing.assert_array_equal(gn["bias"], np.zeros(4))


# -- a small CNN on the three backends ------------------------------------------------------------
def test_small_cnn_backends_agree():
    model = ml.Model()
    model += ml.Convolution2D(3, 8, padding=1)
    model += ml.GroupNorm(4)
    model += ml.Relu()
    model += ml.MaxPool2D(2)
    model += ml.Convolution2D(3, 6, stride=2, groups=2)
    model += ml.AvgPool2D(2, stride=1)
    model += ml.GlobalAvgPool2D()
    model += ml.Linear(3)
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    results = {}
    for name, cls in BACKENDS.items():
        backend = cls(dtype="float32", seed=0)
        compiled = ml.compile(model, backend, shapes={"input": [None, 3, 12, 12]})
        out, grads = compiled.evaluate(compiled.get_parameters(), {"input": backend.array(x)},
                                       output_gradients={"output": backend.array(g)})
        assert to_np(backend, out["output"]).shape == (4, 3)
        results[name] = (to_np(backend, out["output"]), {k: to_np(backend, v) for k, v in grads.items()})
    ref_out, ref_grads = results["numpy"]
    for name, (out, grads) in results.items():
        np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5, err_msg=name)
        for k, v in grads.items():
            scale = max(np.abs(ref_grads[k]).max(), 1e-6)
            np.testing.assert_allclose(v, ref_grads[k], rtol=1e-4, atol=1e-4 * scale, err_msg=f"{name} {k}")


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("block, shape, match", [
    (lambda: ml.Convolution2D(5, 4), [1, 3, 4, 4], "kernel size 5 is larger than the padded input"),
    (lambda: ml.Convolution2D(7, 4, padding=1), [1, 3, 4, 8], "larger than the padded input along spatial axis 0"),
    (lambda: ml.Convolution2D(3, 4, dilation=(1, 3)), [1, 3, 8, 6], r"dilated to 7"),
    (lambda: ml.Convolution1D(4, 2), [1, 1, 3], "larger than the padded input"),
    (lambda: ml.Convolution2D(3, 4, groups=2), [1, 3, 8, 8], r"input channels \(3\) must be divisible by groups \(2\)"),
    (lambda: ml.Convolution2D(3, 4), [8, 8], r"rank 4 \(N, C, H, W\)"),
    (lambda: ml.Convolution1D(3, 4), [1, 3, 8, 8], r"rank 3 \(N, C, L\)"),
    (lambda: ml.MaxPool2D(5), [1, 3, 4, 4], "larger than the padded input"),
    (lambda: ml.MaxPool2D(2), [4, 4], "rank 4"),
    (lambda: ml.MaxPool1D(2), [4], "rank 3"),
    (lambda: ml.AvgPool2D(3, padding=1), [1, 1, 0, 5], "larger than the padded input"),
    (lambda: ml.GlobalAvgPool2D(), [2, 3, 4], "rank 4"),
    (lambda: ml.GroupNorm(4), [2, 6, 5, 5], r"input channels \(6\) must be divisible by num_groups \(4\)"),
    (lambda: ml.GroupNorm(2), [6], "rank >= 2"),
])
def test_bad_shapes_are_named_at_compile_time(block, shape, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), NumpyBackend(), shapes={"input": shape})


def test_free_dims_are_checked_on_concrete_inputs_before_running(backend):
    compiled = ml.compile(ml.Convolution2D(3, 2, dilation=2), backend, shapes={"input": [None, 1, None, None]})
    params = compiled.get_parameters()
    ok = compiled.evaluate(params, {"input": backend.randn(2, 1, 5, 6)})
    assert tuple(ok["output"].shape) == (2, 2, 1, 2)
    with pytest.raises(ShapeError, match="dilated to 5.*larger than the padded input along spatial axis 0"):
        compiled.evaluate(params, {"input": backend.randn(2, 1, 4, 6)})


@pytest.mark.parametrize("make, match", [
    (lambda: ml.Convolution2D(3, 5, groups=2), r"out_channels \(5\) must be divisible by groups \(2\)"),
    (lambda: ml.Convolution2D(3, 0), "out_channels must be a positive int"),
    (lambda: ml.Convolution2D((3, 3, 3), 4), "kernel_size must be an int or a sequence of 2 ints"),
    (lambda: ml.Convolution2D(0, 4), "kernel_size must be"),
    (lambda: ml.Convolution1D(3, 4, stride=(1, 1)), "stride must be an int"),
    (lambda: ml.Convolution2D(3, 4, padding=-1), "padding must be"),
    (lambda: ml.Convolution2D(3, 4, padding="full"), "padding must be an int, a sequence, 'same' or 'valid'"),
    (lambda: ml.Convolution2D(3, 4, stride=2, padding="same"), "padding='same' needs stride 1"),
    (lambda: ml.MaxPool2D(3, padding=2), "padding must be at most half the kernel size"),
    (lambda: ml.AvgPool1D(2, padding=2), "padding must be at most half the kernel size"),
    (lambda: ml.GroupNorm(0), "num_groups must be a positive int"),
])
def test_bad_arguments_are_named_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("nd,kernel,stride,dilation,pads,groups", [
    (2, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1),
    (2, (3, 2), (2, 1), (1, 2), ((1, 0), (0, 2)), 2),
    (2, (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0)), 1),
    (1, (5,), (3,), (2,), ((2, 1),), 3),
])
def test_compiled_col2im_equals_strided_adds_bit_for_bit(nd, kernel, stride, dilation, pads, groups):
    """The compiled gather sums each input element's columns in the order and from the zero
    that one strided ``+=`` per kernel offset does: the same float32 bits."""
    from mithril.models.conv import offset_slices
    from mithril.models.window_kernels import col2im

    rng = np.random.default_rng(nd + groups)
    n, cg, spatial = 3, 4, (7, 9)[2 - nd:]
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pads))
    out = tuple((p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(padded, kernel, stride, dilation))
    gcols = rng.standard_normal((n, *out, groups, *kernel, cg)).astype(np.float32)
    ref = np.zeros((n, *padded, groups, cg), np.float32)
    every = (slice(None),) * (2 + nd)
    for off in np.ndindex(*kernel):
        ref[(slice(None), *offset_slices(off, stride, dilation, out)[2:])] += gcols[(*every, *off)]
    ref = ref[(slice(None), *(slice(lo, lo + s) for s, (lo, _) in zip(spatial, pads)))]
    got = col2im(gcols, spatial, pads, stride, dilation)
    assert got.shape == (n, *spatial, groups * cg)
    assert np.array_equal(got, ref.reshape(got.shape))


@pytest.mark.parametrize("nd,kernel,stride,dilation,pads,groups", [
    (2, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 1),
    (2, (3, 2), (2, 1), (1, 2), ((1, 0), (0, 2)), 2),
    (1, (5,), (3,), (2,), ((2, 1),), 3),
])
def test_window_copies_of_other_dtypes_equal_the_compiled_ones(nd, kernel, stride, dilation, pads,
                                                               groups):
    """float16 (as bfloat16) takes NumPy's strided operations instead of the compiled loops:
    the same windows and the same sums (small integers: exact in both dtypes)."""
    from mithril.models.conv import out_sizes
    from mithril.models.window_kernels import col2im, im2col

    rng = np.random.default_rng(7)
    n, cg, spatial = 2, 3, (7, 9)[2 - nd:]
    x = rng.integers(-3, 4, (n, *spatial, groups * cg)).astype(np.float32)
    out = out_sizes(spatial, kernel, stride, dilation, pads, "test")
    cols = {dt: np.empty((n, *out, groups, *kernel, cg), dt) for dt in (np.float32, np.float16)}
    for dt, c in cols.items():
        im2col(x.astype(dt), c, pads, stride, dilation)
    assert np.array_equal(cols[np.float16].astype(np.float32), cols[np.float32])
    assert (cols[np.float32] == 0).any()  # the padding was read
    gcols = rng.integers(-3, 4, cols[np.float32].shape).astype(np.float32)
    back = {dt: col2im(gcols.astype(dt), spatial, pads, stride, dilation) for dt in cols}
    assert np.array_equal(back[np.float16].astype(np.float32), back[np.float32])
