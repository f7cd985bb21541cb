"""The core model API fuzzed with random small graphs (:mod:`tests.graph_fuzz_graphs`).

Hypothesis draws graphs of connection arithmetic (``+ - * / ** @`` with nodes, new inputs
of broadcasting shapes of other ranks and constants on either side), indexing (ints, slices
of any step, None, ``...``, integer lists, boolean masks), reshape / transpose, reductions
(``axis`` None / int / tuple, negative, ``keepdim``), unary math, ``Relu`` / ``Tanh`` /
``Sigmoid`` / ``Linear`` blocks (parameters named, so shared between blocks), ``Where`` on
integer inputs, integer inputs cast to floats and casts through int64 (and float32); a
parameter or node read several times, several outputs, some of them read again, with
cotangents on one or more. Each graph is compiled on NumPy, torch and JAX (jit), and

* the outputs and the gradients agree across the backends: float64 to 1e-12 (outputs) and
  1e-10 (gradients), float32 to 1e-5 (outputs) and 1e-4 (gradients: see ``TOL``), relative
  to the array's largest entry (or 1); the outputs of a call without gradients too;
* in float64, they agree with the same formula on torch tensors (autograd) to 1e-10 and the
  gradients with central differences (step 1e-6) to 1e-6;
* a call leaves the arrays it was given as they were, and (NumPy) a later call leaves the
  arrays an earlier one returned;
* a call with a parameter or input of the wrong shape or dtype, a missing or unknown key or
  a cotangent of the wrong shape raises the library's error naming the key (and, for a
  shape, both shapes), and the correct call after it gives the same numbers bit for bit.

float64 runs with JAX's x64 on for the fuzz only (conftest's ``jax_float64``).
The default run draws 40 graphs in float64 and 25 in float32; ``pytest -m slow`` 2,000 and
1,000. Failures found are minimised in :mod:`tests.test_graph_fuzz_regressions`.
"""

from __future__ import annotations

import os
import sys
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from conftest import BACKENDS, jax_float64
from graph_fuzz_graphs import Graph, compile_graph, graphs, torch_outputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mithril.errors import DTypeError, KeyMismatchError, ShapeError

#: (outputs, gradients). float32 gradients: 1e-4, as XLA's float32 tanh is exactly ±1 beyond
#: |x| ~ 7.9, so JAX's gradient there is 0 where NumPy's and torch's are ~1e-6 (found: a
#: relative difference of 1.1e-5 on a scalar parameter behind tanh(x²))
TOL = {"float64": (1e-12, 1e-10), "float32": (1e-5, 1e-4)}
REF_TOL, FD_TOL, FD_EPS = 1e-10, 1e-6, 1e-6


def rel_error(got: Any, want: Any) -> float:
    """max |got - want| over max(1, max |want|); inf on a shape mismatch; NaN equal to NaN."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    both_nan = np.isnan(got) & np.isnan(want)
    diff = np.where(both_nan, 0.0, np.abs(got - want))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)) / max(
        1.0, float(np.nan_to_num(np.abs(want)).max(initial=0.0)))


def values(g: Graph, compiled: Any, dtype: str, seed: int) -> tuple[dict, dict, dict]:
    """(params, data, cotangents) as NumPy arrays: normal floats, ints in [-2, 2]."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in compiled.parameter_shapes.items()}
    data = {k: rng.integers(-2, 3, s) if kind == "int" else rng.standard_normal(s).astype(dtype)
            for k, (s, kind) in g.used_leaves().items() if kind != "float"}
    cots = {f"out{k}": rng.standard_normal(g.shapes[g.outputs[k]]).astype(dtype) for k in g.cots}
    return params, data, cots


def run(compiled: Any, backend: Any, params: dict, data: dict, cots: dict) -> tuple[dict, dict]:
    """Outputs and gradients of one call, as float64 NumPy arrays (copies). The call must
    leave its arguments as they were, and a second call (other parameters) the arrays the
    first returned."""
    args = [{k: backend.array(v) for k, v in d.items()} for d in (params, data, cots)]
    host = lambda d: {k: np.array(backend.to_numpy(v), np.float64) for k, v in d.items()}  # noqa: E731
    before = [host(d) for d in args]
    out, grads = compiled.evaluate(*args[:2], output_gradients=args[2])
    first = host(out), host(grads)
    for a, b in zip(before, args, strict=True):
        assert all(np.array_equal(a[k], v, equal_nan=True) for k, v in host(b).items()), "argument changed"
    if backend.__class__.__name__ == "NumpyBackend":  # (JAX and torch arrays are not reused)
        compiled.evaluate({k: v * 2 for k, v in args[0].items()}, args[1], output_gradients=args[2])
        for a, b in zip(first, (out, grads), strict=True):
            assert all(np.array_equal(a[k], v, equal_nan=True) for k, v in host(b).items()), \
                "a later call changed the arrays an earlier one returned"
    return first


def compare(label: str, got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want), f"{label}: keys {sorted(got)} != {sorted(want)}"
    errs = {k: rel_error(got[k], want[k]) for k in want}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{label}: relative errors {bad}"


def reference(g: Graph, params: dict, data: dict, cots: dict) -> tuple[dict, dict]:
    """The outputs and gradients of the same formula on torch tensors (float64 autograd)."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    out = torch_outputs(g, t, {k: torch.tensor(v) for k, v in data.items()})
    keys = [k for k in cots if out[k].requires_grad]
    grads = torch.autograd.grad([out[k] for k in keys], list(t.values()),
                                [torch.tensor(cots[k]) for k in keys], allow_unused=True) if keys else [None] * len(t)
    return ({k: v.detach().numpy() for k, v in out.items()},
            {k: np.zeros_like(params[k]) if d is None else d.numpy() for k, d in zip(t, grads, strict=True)})


def finite_differences(compiled: Any, params: dict, data: dict, cots: dict) -> dict:
    """Central differences of Σ <out_k, cot_k> (NumPy, float64) in every parameter entry."""
    def f(p: dict) -> float:
        out = compiled.evaluate(p, data)
        return float(sum(np.sum(out[k] * c) for k, c in cots.items()))

    fd = {}
    for name, value in params.items():
        d = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            hi, lo = value.copy(), value.copy()
            hi[i] += FD_EPS
            lo[i] -= FD_EPS
            d[i] = (f({**params, name: hi}) - f({**params, name: lo})) / (2 * FD_EPS)
        fd[name] = d
    return fd


# -- bad input ---------------------------------------------------------------------------------
def corruptions(params: dict, data: dict, cots: dict) -> list[tuple[str, dict, dict, dict, type, list[str]]]:
    """Bad calls: (what, params, data, cotangents, error class, words the message must hold)."""
    out: list[tuple[str, dict, dict, dict, type, list[str]]] = []
    for kind, d in (("parameter", params), ("input", data)):
        for k, v in d.items():
            bigger = np.zeros((*v.shape, 2), v.dtype)
            rest = {**d, k: bigger}
            args = (rest, data, cots) if kind == "parameter" else (params, rest, cots)
            words = [k, str(list(bigger.shape))] + [str(list(v.shape))] * (kind == "parameter")
            out.append((f"{kind} {k} shape", *args, ShapeError, words))
            if kind == "parameter":
                out.append((f"{k} as int", {**d, k: v.astype(np.int64)}, data, cots, DTypeError, [k, "int"]))
                out.append((f"{k} missing", {a: b for a, b in d.items() if a != k}, data, cots,
                            KeyMismatchError, [k, "missing"]))
    for k, v in cots.items():
        out.append((f"cotangent {k} shape", params, data, {**cots, k: np.zeros((3, *v.shape), v.dtype)},
                    ShapeError, [k]))
    out.append(("unknown input", params, {**data, "nosuch": np.zeros(2)}, cots, KeyMismatchError, ["nosuch"]))
    out.append(("unknown cotangent", params, data, {**cots, "nosuch": np.zeros(2)}, KeyMismatchError, ["nosuch"]))
    return out


def check_bad_input(compiled: Any, backend: Any, params: dict, data: dict, cots: dict,
                    first: tuple[dict, dict], which: int) -> None:
    """One bad call (``which`` picks it) raises a clear error; then the correct call again
    gives ``first`` bit for bit."""
    cases = corruptions(params, data, cots)
    what, p, d, c, cls, words = cases[which % len(cases)]
    with pytest.raises(cls) as e:
        run(compiled, backend, p, d, c)
    msg = str(e.value)
    assert all(w in msg for w in words), f"{what}: {type(e.value).__name__}: {msg!r} lacks {words}"
    again = run(compiled, backend, params, data, cots)
    for a, b in zip(first, again, strict=True):
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a), what


# -- one graph -----------------------------------------------------------------------------------
def check_graph(g: Graph, dtype: str, seed: int, which_bad: int = 0, jit: bool = True) -> None:
    """Every property of the module docstring for ``g`` in ``dtype`` (``jit``: compiled with
    it, on every backend)."""
    results, compiled = {}, {}
    params = data = cots = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)  # JAX float32: int64 casts are int32
        for name in ("numpy", "torch", "jax"):
            backend = BACKENDS[name](dtype=dtype)
            compiled[name] = (compile_graph(g, backend, dtype, jit), backend)
            if name == "numpy":
                params, data, cots = values(g, compiled[name][0], dtype, seed)
            results[name] = run(compiled[name][0], backend, params, data, cots)
            forward = compiled[name][0].evaluate({k: backend.array(v) for k, v in params.items()},
                                                 {k: backend.array(v) for k, v in data.items()})
            compare(f"{name} outputs without gradients", {k: backend.to_numpy(v) for k, v in forward.items()},
                    results[name][0], TOL[dtype][0])
        out_tol, grad_tol = TOL[dtype]
        for name in ("torch", "jax"):
            compare(f"{name} outputs vs numpy", results[name][0], results["numpy"][0], out_tol)
            compare(f"{name} gradients vs numpy", results[name][1], results["numpy"][1], grad_tol)
        if dtype == "float64":
            ref_out, ref_grads = reference(g, params, data, cots)
            outs = {k: v for k, v in results["numpy"][0].items() if k in ref_out}
            compare("numpy outputs vs torch autograd", outs, ref_out, REF_TOL)
            compare("numpy gradients vs torch autograd", results["numpy"][1], ref_grads, REF_TOL)
            finite = all(np.isfinite(v).all() for v in results["numpy"][0].values())
            if g.fd_ok and finite:  # (a mean of no values is NaN)
                fd = finite_differences(compiled["numpy"][0], params, data, cots)
                compare("numpy gradients vs central differences", results["numpy"][1], fd, FD_TOL)
        name = ("numpy", "torch", "jax")[which_bad % 3]
        check_bad_input(*compiled[name], params, data, cots, results[name], which_bad // 3)


def fuzz(dtype: str, examples: int, max_ops: int = 8) -> int:
    """``examples`` graphs through :func:`check_graph`; returns how many ran."""
    count = [0]

    @given(graphs(max_ops=max_ops, with_cast32=dtype == "float64"), st.integers(0, 2 ** 16),
           st.booleans())
    @settings(max_examples=examples, derandomize=not os.environ.get("GRAPH_FUZZ_RANDOM"), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def one(g: Graph, which_bad: int, jit: bool) -> None:
        count[0] += 1
        check_graph(g, dtype, zlib.crc32(repr(g).encode()), which_bad, jit)

    one()
    return count[0]


def _float64(examples: int) -> None:
    """``examples`` float64 graphs, JAX's x64 on for the block only."""
    with jax_float64():
        assert fuzz("float64", examples) == examples


def test_float64_graphs_agree_across_backends_torch_and_finite_differences():
    _float64(40)


def test_float32_graphs_agree_across_backends():
    assert fuzz("float32", 25) == 25


@pytest.mark.slow
def test_float64_graphs_long():
    _float64(2000)


@pytest.mark.slow
def test_float32_graphs_long():
    assert fuzz("float32", 1000) == 1000


if __name__ == "__main__":  # python tests/test_graph_fuzz.py float64 200
    print(fuzz(sys.argv[1], int(sys.argv[2])))
