"""PReLU, LogSigmoid, Softsign, Softshrink and Hardshrink side by side with torch.

The output and the gradients (the input's, and PReLU's ``weight``) on NumPy and torch in
process (float64 and float32) and on JAX float64 in a fresh process, against torch
autograd's (``F.prelu`` / ``logsigmoid`` / ``softsign`` / ``softshrink`` / ``hardshrink``)
on inputs holding the kinks exactly (0, ±λ) and, in the "nonfinite" cases, ±inf and NaN;
NumPy's gradients against central differences away from the kinks; bad arguments refused
with an error naming the block and the argument.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mithril as ml
from mithril.errors import ShapeError
from mithril.models import MLP, Hardshrink, LogSigmoid, PReLU, Softshrink, Softsign

Case = tuple[Callable[[], Any], Callable[..., Any], list[int], float, str]


def _prelu_t(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    assert w is not None
    return F.prelu(x, w)


# name: (block factory, torch function (x, weight), shape, kink λ, special)
CASES: dict[str, Case] = {
    "prelu1_4d": (lambda: PReLU(), _prelu_t, [2, 3, 4, 2], 0.0, ""),
    "prelu3_4d": (lambda: PReLU(3, init=0.1), _prelu_t, [2, 3, 2, 3], 0.0, ""),
    "prelu4_2d": (lambda: PReLU(4), _prelu_t, [5, 4], 0.0, "nonfinite"),
    "prelu1_0d": (lambda: PReLU(), _prelu_t, [], 0.0, ""),
    "prelu1_1d": (lambda: PReLU(), _prelu_t, [7], 0.0, "nonfinite"),
    "logsigmoid": (lambda: LogSigmoid(), lambda x, w: F.logsigmoid(x), [4, 6], 0.0, ""),
    "logsigmoid_far": (lambda: LogSigmoid(), lambda x, w: F.logsigmoid(x), [3, 5], 0.0,
                       "far"),
    "logsigmoid_nf": (lambda: LogSigmoid(), lambda x, w: F.logsigmoid(x), [9], 0.0,
                      "nonfinite"),
    "softsign": (lambda: Softsign(), lambda x, w: F.softsign(x), [3, 5], 0.0, ""),
    "softsign_nf": (lambda: Softsign(), lambda x, w: F.softsign(x), [9], 0.0, "nonfinite"),
    "softshrink": (lambda: Softshrink(), lambda x, w: F.softshrink(x, 0.5), [4, 5], 0.5, ""),
    "softshrink_2": (lambda: Softshrink(2.0), lambda x, w: F.softshrink(x, 2.0), [3, 4],
                     2.0, "nonfinite"),
    "softshrink_0": (lambda: Softshrink(0), lambda x, w: F.softshrink(x, 0.0), [6], 0.0, ""),
    "hardshrink": (lambda: Hardshrink(), lambda x, w: F.hardshrink(x, 0.5), [4, 5], 0.5, ""),
    "hardshrink_1": (lambda: Hardshrink(1.25), lambda x, w: F.hardshrink(x, 1.25), [3, 4],
                     1.25, "nonfinite"),
    "hardshrink_neg": (lambda: Hardshrink(-0.5), lambda x, w: F.hardshrink(x, -0.5), [5],
                       -0.5, ""),
}


def _inputs(name: str, dtype: str = "float64", smooth: bool = False) -> dict[str, np.ndarray]:
    """The input (kinks 0, ±λ at fixed places unless ``smooth``) and PReLU's weight."""
    block, _, shape, lam, special = CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    x = np.asarray(rng.standard_normal(shape)) * (40.0 if special == "far" else 2.0)
    flat = x.reshape(-1)
    if smooth:  # central differences: 1e-2 away from every kink
        for k in {0.0, lam, -lam}:
            near = np.abs(flat - k) < 1e-2
            flat[near] = k + 0.05
    else:
        kinks = [0.0, lam, -lam] + ([np.inf, -np.inf, np.nan] if special == "nonfinite" else [])
        flat[:len(kinks)] = kinks[:flat.size]
    out = {"x": np.asarray(x.astype(dtype))}
    op = block()
    if isinstance(op, PReLU):
        w = rng.uniform(-0.5, 0.8, op.num_parameters)
        w[0] = 0.25
        out["w"] = w.astype(dtype)
    return out


def _backend(kind: str, dtype: str) -> Any:
    import mithril.backends as B

    cls = {"numpy": B.NumpyBackend, "torch": B.TorchBackend}.get(kind)
    if cls is None:
        cls = B.JaxBackend
    return cls(dtype=dtype)


def run_mithril(name: str, kind: str, dtype: str = "float64", smooth: bool = False,
                cot: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The block's output and its gradients (``x``, and ``w`` for PReLU) on ``kind``."""
    ins = _inputs(name, dtype, smooth)
    b = _backend(kind, dtype)
    model = ml.Model()
    op = CASES[name][0]()
    conn = {"input": "x", "output": "y"}
    if "w" in ins:
        conn["weight"] = "w"
    model |= op(**conn)
    c = ml.compile(model, b, shapes={k: list(v.shape) for k, v in ins.items()},
                   trainable_keys=set(ins))
    g = _cot(name, dtype) if cot is None else cot
    out, grads = c.evaluate({k: b.array(v) for k, v in ins.items()}, {},
                            output_gradients={"y": b.array(g)})[:2]
    to_np = lambda a: np.asarray(b.to_numpy(a))  # noqa: E731
    return to_np(out["y"]), {k: to_np(v) for k, v in grads.items()}


def _cot(name: str, dtype: str) -> np.ndarray:
    shape = CASES[name][2]
    return np.random.default_rng(7).standard_normal(shape).astype(dtype)


def run_torch(name: str, dtype: str = "float64") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    ins = {k: torch.tensor(v, requires_grad=True) for k, v in _inputs(name, dtype).items()}
    y = CASES[name][1](ins["x"], ins.get("w"))
    grads = torch.autograd.grad(y, list(ins.values()), torch.tensor(_cot(name, dtype)))
    return y.detach().numpy(), {k: g.numpy() for k, g in zip(ins, grads, strict=True)}


def _nan_passes(name: str, dtype: str, tg: dict[str, np.ndarray]) -> None:
    """The shrinks' gradient at a NaN input is the cotangent (passed through) on every
    backend; torch's is 0 in its vectorised loop and 1 in its scalar tail (by position)."""
    if "shrink" in name:
        nan = np.isnan(_inputs(name, dtype)["x"])
        tg["x"] = np.where(nan, _cot(name, dtype), tg["x"])


def _close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_torch(name: str, kind: str, dtype: str) -> None:
    rtol = 1e-12 if dtype == "float64" else 2e-6
    y, g = run_mithril(name, kind, dtype)
    ty, tg = run_torch(name, dtype)
    _nan_passes(name, dtype, tg)
    _close(y, ty, rtol, f"{name} output")
    assert sorted(g) == sorted(tg)
    for k in tg:
        _close(g[k], tg[k], rtol, f"{name} d{k}")


def test_kinks_are_torchs() -> None:
    """The fixed values torch gives at the kinks: the gradient 0 at exactly ±λ for the
    shrinks, the negative side's at 0 for PReLU, ½ at 0 for LogSigmoid, 1 at 0 for
    Softsign; NaN / ±inf through each as torch."""
    for name, gx in [("softshrink", [0, 0, 0]), ("hardshrink", [0, 0, 0]),
                     ("prelu1_4d", [0.25, 0.25, 0.25])]:
        lam = CASES[name][3]
        _, g = run_mithril(name, "numpy", cot=np.ones(CASES[name][2]))
        x = _inputs(name)["x"].reshape(-1)
        assert list(x[:3]) == [0.0, lam, -lam]
        assert list(g["x"].reshape(-1)[:3]) == gx  # PReLU: 0 is on the weight's side
    y, g = run_mithril("logsigmoid_nf", "numpy", cot=np.ones(9))
    assert y[0] == -np.log(2) and g["x"][0] == 0.5
    assert list(y[3:5]) == [0.0, -np.inf] and list(g["x"][3:5]) == [0.0, 1.0]
    assert np.isnan(y[5]) and np.isnan(g["x"][5])
    y, g = run_mithril("softsign_nf", "numpy", cot=np.ones(9))
    assert y[0] == 0.0 and g["x"][0] == 1.0
    assert np.isnan(y[3:6]).all() and np.isnan(g["x"][3:6]).all()  # inf/inf, as torch
    y, g = run_mithril("softshrink_2", "numpy", cot=np.ones((3, 4)))
    assert list(y.reshape(-1)[3:5]) == [np.inf, -np.inf] and np.isnan(y.reshape(-1)[5])
    assert list(g["x"].reshape(-1)[3:6]) == [1.0, 1.0, 1.0]  # NaN: 1, as torch


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n][4] != "nonfinite"])
def test_numpy_gradient_vs_central_differences(name: str) -> None:
    ins = _inputs(name, smooth=True)
    cot = _cot(name, "float64")
    _, g = run_mithril(name, "numpy", smooth=True, cot=cot)
    op = CASES[name][0]()

    def loss(vals: dict[str, np.ndarray]) -> float:
        args = {"input": vals["x"]} | ({"weight": vals["w"]} if "w" in vals else {})
        return float((op.forward(np, **args) * cot).sum())

    h = 1e-6
    for k, v in ins.items():
        num = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            hi, lo = {**ins, k: v.copy()}, {**ins, k: v.copy()}
            hi[k][i] += h
            lo[k][i] -= h
            num[i] = (loss(hi) - loss(lo)) / (2 * h)
        np.testing.assert_allclose(g[k], num, rtol=1e-6, atol=1e-7, err_msg=f"{name} d{k}")


_JAX = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_activations_prelu_more as t
out = {{}}
for name in t.CASES:
    y, g = t.run_mithril(name, "jax")
    out[name] = [y.tolist(), {{k: v.tolist() for k, v in g.items()}}]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def jax_results() -> dict[str, Any]:
    pytest.importorskip("jax")
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _JAX.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):].replace("NaN", "NaN"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_jax_equals_torch(name: str, jax_results: dict[str, Any]) -> None:
    y, g = jax_results[name]
    ty, tg = run_torch(name)
    _nan_passes(name, "float64", tg)
    _close(np.asarray(y, dtype=np.float64).reshape(ty.shape), ty, 1e-12, f"{name} output")
    assert sorted(g) == sorted(tg)
    for k in tg:
        _close(np.asarray(g[k], dtype=np.float64).reshape(tg[k].shape), tg[k], 1e-12,
               f"{name} d{k}")


def test_prelu_weight_is_torchs() -> None:
    """The parameter is ``weight`` of shape (num_parameters,), a torch state_dict's copies in,
    and its initialiser is ``init``."""
    tm = torch.nn.PReLU(3, init=0.1).double()
    with torch.no_grad():
        tm.weight.copy_(torch.tensor([0.1, -0.3, 0.7]))
    op = PReLU(3, init=0.1)
    assert op.param_init == {"weight": "constant:0.1"}
    assert PReLU(init=0).param_init == {"weight": "zeros"}
    assert PReLU(init=1).param_init == {"weight": "ones"}
    b = _backend("numpy", "float64")
    model = ml.Model()
    model |= op(input="x", output="y")
    c = ml.compile(model, b, shapes={"x": [2, 3, 4]})
    (key,) = c.parameter_shapes
    assert key.endswith(".weight") and tuple(c.parameter_shapes[key]) == (3,)
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    y = c.evaluate({key: tm.state_dict()["weight"].numpy()}, {"x": x})
    np.testing.assert_allclose(y["y"], tm(torch.tensor(x)).detach().numpy(), rtol=1e-14)
    np.testing.assert_array_equal(c.randomize_params()[key], [0.1, 0.1, 0.1])
    d = ml.compile(ml.PReLU(), b, shapes={"input": [2, 3]})  # (torch's default init 0.25)
    np.testing.assert_array_equal(d.get_parameters()[next(iter(d.parameter_shapes))],
                                  torch.nn.PReLU().weight.detach().numpy())


def test_mlp_names() -> None:
    x = np.random.default_rng(1).standard_normal((4, 3))
    for act, f in [("logsigmoid", F.logsigmoid), ("softsign", F.softsign)]:
        c = ml.compile(MLP([act], [2]), _backend("numpy", "float64"), shapes={"input": [4, 3]})
        p = {k: np.random.default_rng(2).standard_normal(s)
             for k, s in sorted(c.parameter_shapes.items())}
        (w,) = [v for k, v in p.items() if k.endswith("weight")]
        (bias,) = [v for k, v in p.items() if k.endswith("bias")]
        want = f(torch.tensor(x @ w.T + bias if w.shape == (2, 3) else x @ w + bias))
        got = c.evaluate(p, {"input": x})
        np.testing.assert_allclose(next(iter(got.values())), want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("make, words", [
    (lambda: PReLU(0), ["PReLU", "num_parameters"]),
    (lambda: PReLU(True), ["PReLU", "num_parameters"]),
    (lambda: PReLU(2.0), ["PReLU", "num_parameters"]),
    (lambda: PReLU(init="a"), ["PReLU", "init"]),
    (lambda: PReLU(init=float("nan")), ["PReLU", "init"]),
    (lambda: Softshrink(-0.1), ["Softshrink", "lambd", ">= 0"]),
    (lambda: Softshrink(float("inf")), ["Softshrink", "lambd"]),
    (lambda: Hardshrink("0.5"), ["Hardshrink", "lambd"]),
    (lambda: Hardshrink(None), ["Hardshrink", "lambd"]),
])
def test_bad_arguments_named(make: Callable[[], Any], words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        make()
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("shape", [[2, 4, 3], [3]])
def test_prelu_channels_mismatch(shape: list[int]) -> None:
    model = ml.Model()
    model |= PReLU(3)(input="x", output="y")
    with pytest.raises(ShapeError, match="num_parameters=3"):
        ml.compile(model, _backend("numpy", "float64"), shapes={"x": shape})
