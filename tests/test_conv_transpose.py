"""ConvTranspose1D / ConvTranspose2D against ``torch.nn.functional.conv_transpose1d/2d``.

1. Fixed cases and a seeded mini-fuzz of configurations (stride, padding, output_padding,
   dilation, groups, bias, unbatched inputs), float64 on NumPy, torch and JAX (JAX in a
   subprocess: float64 needs ``jax_enable_x64`` for the whole process): the output and the
   gradients of the input, weight and bias equal torch autograd's within 1e-10.
2. The NumPy VJP against central finite differences.
3. torch's initialisation bounds, ``nn.ConvTranspose2d``'s state_dict copied by name, and the
   bad arguments torch refuses.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, jax_float64, to_np
from test_conv_blocks import Source, max_error, role

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.errors import ShapeError

TOL = 1e-10


def _fuzz_cases(count: int, seed: int) -> dict[str, tuple[int, dict, tuple]]:
    """``count`` random valid configurations: name -> (nd, block kwargs, input shape)."""
    rng = np.random.default_rng(seed)
    out = {}
    while len(out) < count:
        nd = int(rng.integers(1, 3))
        groups = int(rng.choice([1, 2, 3]))
        cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
        k = tuple(int(v) for v in rng.integers(1, 4, nd))
        s = tuple(int(v) for v in rng.integers(1, 4, nd))
        d = tuple(int(v) for v in rng.integers(1, 3, nd))
        p = tuple(int(v) for v in rng.integers(0, 3, nd))
        op = tuple(int(rng.integers(0, max(a, b))) for a, b in zip(s, d))
        spatial = tuple(int(v) for v in rng.integers(1, 5, nd))
        if any((n - 1) * a - 2 * q + e * (kk - 1) + o + 1 <= 0
               for n, a, q, e, kk, o in zip(spatial, s, p, d, k, op)):
            continue
        batch = () if rng.random() < 0.2 else (int(rng.integers(1, 3)),)
        kw = dict(kernel_size=k, out_channels=cout, stride=s, padding=p, output_padding=op,
                  dilation=d, groups=groups, use_bias=bool(rng.random() < 0.7))
        out[f"fuzz{len(out)}_{nd}d"] = (nd, kw, (*batch, cin, *spatial))
    return out


CASES: dict[str, tuple[int, dict, tuple]] = {
    "1d": (1, dict(kernel_size=3, out_channels=4), (2, 3, 6)),
    "1d_all": (1, dict(kernel_size=3, out_channels=6, stride=3, padding=2, output_padding=1,
                       dilation=2, groups=2), (2, 4, 5)),
    "1d_unbatched": (1, dict(kernel_size=2, out_channels=3, stride=2), (2, 5)),
    # padding beyond dilation·(k − 1): JAX's equivalent convolution has negative padding
    "1d_padding_beyond_kernel": (1, dict(kernel_size=1, out_channels=2, stride=2, padding=1),
                                 (1, 3, 5)),
    "2d": (2, dict(kernel_size=3, out_channels=2), (2, 3, 4, 5)),
    "2d_all": (2, dict(kernel_size=(3, 2), out_channels=4, stride=(2, 3), padding=(1, 0),
                       output_padding=(1, 2), dilation=(1, 2), groups=2, use_bias=False),
               (2, 4, 3, 4)),
    # output_padding >= stride but < dilation: torch allows it
    "2d_op_below_dilation": (2, dict(kernel_size=2, out_channels=3, stride=1, output_padding=1,
                                     dilation=2), (1, 2, 3, 3)),
    "2d_unbatched_depthwise": (2, dict(kernel_size=2, out_channels=3, stride=2, padding=1,
                                       groups=3), (3, 4, 4)),
    **_fuzz_cases(24, seed=1234),
}


def block(case: str) -> ml.Operator:
    nd, kw, _ = CASES[case]
    return (ml.ConvTranspose1D if nd == 1 else ml.ConvTranspose2D)(**kw)


def torch_ref(case: str, x, w, b):
    nd, kw, _ = CASES[case]
    fn = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
    return fn(x, w, b, kw.get("stride", 1), kw.get("padding", 0), kw.get("output_padding", 0),
              kw.get("groups", 1), kw.get("dilation", 1))


def build(case: str) -> ml.Model:
    m = ml.Model()
    m |= Source(CASES[case][2])(output="x")
    m |= block(case)(input="x", output="output")
    return m


def run_mithril(case: str, backend_name: str):
    """Params (keyed by role: input, weight, bias), cotangent, output and gradients, float64."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(build(case), backend)
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    params = {n: rng.standard_normal(s) for n, s in compiled.parameter_shapes.items()}
    cot = rng.standard_normal(compiled.program.output_shape("output"))
    native = {k: backend.array(v) for k, v in params.items()}
    out, grads = compiled.evaluate(native, {}, output_gradients={"output": backend.array(cot)})
    return ({role(n): v for n, v in params.items()}, cot, to_np(backend, out["output"]),
            {role(n): to_np(backend, g) for n, g in grads.items()})


def run_torch(case: str, params: dict, cot: np.ndarray):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    out = torch_ref(case, t["input"], t["weight"], t.get("bias"))
    grads = torch.autograd.grad(out, list(t.values()), torch.tensor(cot))
    return out.detach().numpy(), {k: g.numpy() for k, g in zip(t, grads)}


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


@pytest.mark.parametrize("case", ["1d_all", "2d_all", "2d_unbatched_depthwise"])
def test_numpy_without_compiled_loops_equals_torch(case, monkeypatch):
    """The NumPy strided im2col / col2im (dtypes without compiled loops) give the same."""
    from mithril.models import window_kernels

    monkeypatch.setattr(window_kernels, "_COMPILED", ())
    compare(case, *run_mithril(case, "numpy"), what="numpy, no compiled loops")


#: JAX by default on the fixed cases and the first fuzz ones (its subprocess compiles each
#: case); every fuzz case in the slow test
JAX_CASES = list(CASES)[:16]


def jax_run(cases: list[str]) -> dict[str, np.ndarray]:
    """Every case of ``cases`` on JAX float64 (jit), run in this process (x64 for the block)."""
    flat = {}
    with jax_float64():
        for case in cases:
            params, cot, out, grads = run_mithril(case, "jax")
            flat[case + "|output"] = np.asarray(out)
            flat.update({case + "|grad|" + k: np.asarray(v) for k, v in grads.items()})
    return flat


def jax_compare(case: str, results: dict[str, np.ndarray]) -> None:
    params, cot, _, _ = run_mithril(case, "numpy")  # the same params and cotangent as in there
    grads = {k.rsplit("|", 1)[1]: v for k, v in results.items() if k.startswith(case + "|grad|")}
    compare(case, params, cot, results[case + "|output"], grads, what="jax")


@pytest.fixture(scope="module")
def jax_results():
    return jax_run(JAX_CASES)


@pytest.mark.parametrize("case", JAX_CASES)
def test_jax_equals_torch(case, jax_results):
    jax_compare(case, jax_results)


@pytest.mark.slow
def test_jax_equals_torch_every_fuzz_case():
    rest = [c for c in CASES if c not in JAX_CASES]
    results = jax_run(rest)
    for case in rest:
        jax_compare(case, results)


# -- finite differences of the NumPy VJP -------------------------------------------------------
@pytest.mark.parametrize("case", ["1d_all", "2d_all", "2d_op_below_dilation", "1d_unbatched"])
def test_numpy_vjp_matches_central_differences(case):
    """d<cot, output>/d(every element) by central differences equals the VJP (a linear map:
    the differences are exact up to rounding)."""
    backend = BACKENDS["numpy"](dtype="float64")
    compiled = ml.compile(build(case), backend)
    params, cot, _, grads = run_mithril(case, "numpy")
    names = {role(n): n for n in compiled.parameter_shapes}

    def loss(p):
        out = compiled.evaluate({names[k]: v for k, v in p.items()}, {})["output"]
        return float(np.sum(np.asarray(out) * cot))

    h = 1e-6
    for key, value in params.items():
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += h
            down[i] -= h
            fd[i] = (loss({**params, key: up}) - loss({**params, key: down})) / (2 * h)
        assert max_error(grads[key], fd) <= 1e-7, key


# -- initialisation, state_dict, errors --------------------------------------------------------
@pytest.mark.parametrize("nd, groups", [(2, 1), (2, 2), (1, 4)])
def test_default_init_is_torchs(nd, groups):
    """torch's fan_in of a transposed weight is size(1)·prod(k) = out/groups·prod(k): the
    weight is kaiming_uniform(a=√5) = U(±1/√fan_in), the bias U(±1/√fan_in), as torch's."""
    c_in, c_out, k = 8, 64, 3
    blk = (ml.ConvTranspose2D if nd == 2 else ml.ConvTranspose1D)(k, c_out, groups=groups)
    params = ml.compile(blk, NumpyBackend(dtype="float64", seed=3),
                        shapes={"input": [2, c_in, *([5] * nd)]}).get_parameters()
    w = next(v for n, v in params.items() if n.endswith(".weight"))
    b = next(v for n, v in params.items() if n.endswith(".bias"))
    ref = (torch.nn.ConvTranspose2d if nd == 2 else torch.nn.ConvTranspose1d)(
        c_in, c_out, k, groups=groups, dtype=torch.float64)
    bound = 1 / math.sqrt(c_out // groups * k**nd)
    assert w.shape == tuple(ref.weight.shape) and b.shape == tuple(ref.bias.shape)
    for ours, theirs in ((w, ref.weight), (b, ref.bias)):
        theirs = theirs.detach().numpy()
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
        assert np.abs(ours).max() > 0.7 * bound and np.abs(theirs).max() > 0.7 * bound
    assert abs(w.var() / (bound**2 / 3) - 1) < 0.2


def test_state_dict_copy_gives_torchs_output():
    """nn.ConvTranspose2d's weight and bias copied by name (no transposing) give its output."""
    ref = torch.nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=1, output_padding=1,
                                   groups=2, dilation=(1, 2)).double()
    m = ml.Model()
    m |= ml.ConvTranspose2D((3, 2), 6, stride=2, padding=1, output_padding=1, groups=2,
                            dilation=(1, 2))(input="input", output="output")
    compiled = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": (2, 4, 5, 5)})
    names = {n.rsplit(".", 1)[-1]: n for n in compiled.parameter_shapes}
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5))
    sd = {names[k]: v.detach().numpy() for k, v in ref.state_dict().items()}
    got = compiled.evaluate(sd, {"input": x})["output"]
    assert max_error(np.asarray(got), ref(torch.tensor(x)).detach().numpy()) <= TOL


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=3, out_channels=2, stride=2, output_padding=2), "output_padding"),
    (dict(kernel_size=3, out_channels=2, stride=2, dilation=2, output_padding=(1, 2)),
     "output_padding"),
    (dict(kernel_size=3, out_channels=3, groups=2), "out_channels"),
    (dict(kernel_size=3, out_channels=0), "out_channels"),
    (dict(kernel_size=0, out_channels=2), "kernel_size"),
    (dict(kernel_size=3, out_channels=2, padding=-1), "padding"),
    (dict(kernel_size=3, out_channels=2, use_bias="no"), "use_bias"),
    (dict(kernel_size=3, out_channels=2, bias=False), "no bias= argument .ours is use_bias"),
    (dict(kernel_size=3, out_channels=2, padding_mode="zeros"), "no padding_mode= argument"),
])
def test_bad_arguments_are_refused_and_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ml.ConvTranspose2D(**kwargs)


def test_bad_arguments_torch_refuses_too():
    """The output_padding rule is torch's own (the reference refuses the same)."""
    with pytest.raises(RuntimeError, match="output padding"):
        F.conv_transpose2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), stride=2,
                           output_padding=2)


@pytest.mark.parametrize("shape, match", [
    ((2, 4), "rank"),                    # a 2-D block given (C, L)
    ((1, 3, 4, 4), "divisible by groups"),
    ((1, 2, 1, 1), "padding too large"),
])
def test_bad_shapes_are_named(shape, match):
    m = ml.Model()
    m |= ml.ConvTranspose2D(1, 2, groups=2, padding=1)(input="input", output="output")
    with pytest.raises(ShapeError, match=match):
        ml.compile(m, BACKENDS["numpy"](), shapes={"input": shape})


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_float32_equals_torch(backend_name):
    """The default float32 (the NumPy compiled loops' other dtype) to float32 rounding."""
    case = "2d_all"
    backend = BACKENDS[backend_name](dtype="float32")
    compiled = ml.compile(build(case), backend)
    params, cot, _, _ = run_mithril(case, "numpy")
    names = {role(n): n for n in compiled.parameter_shapes}
    native = {names[k]: backend.array(v.astype(np.float32)) for k, v in params.items()}
    out, grads = compiled.evaluate(native, {}, output_gradients={
        "output": backend.array(cot.astype(np.float32))})
    assert str(out["output"].dtype).endswith("float32")
    want_out, want_grads = run_torch(case, params, cot)
    assert max_error(to_np(backend, out["output"]).astype(np.float64), want_out) <= 1e-5
    for k, n in names.items():
        assert max_error(to_np(backend, grads[n]).astype(np.float64), want_grads[k]) <= 1e-5, k
