"""Shared by ``test_layers_edges_vs_torch*.py``: run one block on a backend in float64 and
compare its outputs and every gradient with torch autograd.

A case is a :class:`Case`: the block, the inputs it differentiates with respect to (given as
trainable keys, so their gradients are the block's input cotangents), constant data (masks,
class indices), the torch reference, and the outputs. The block's own parameters get random
values (the same on every backend), and the torch reference receives every parameter and
input by its full name as a tensor that requires grad.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

BACKENDS = {"numpy": NumpyBackend, "jax": JaxBackend, "torch": TorchBackend}
TOL = 1e-10


@dataclass
class Case:
    block: Callable[[], Any]
    #: differentiated inputs: key -> shape (standard normal values) or an array
    inputs: dict[str, Any]
    #: (params and inputs by full name as tensors, data as tensors) -> {output: tensor}
    torch_fn: Callable[[dict, dict], dict]
    data: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: tuple[str, ...] = ("output",)
    training: bool | None = None


def arrays(name: str, case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {k: rng.standard_normal(v) if isinstance(v, tuple) else np.asarray(v, np.float64)
            for k, v in case.inputs.items()}


def run_mithril(name: str, case: Case, backend_name: str):
    """``(params, cotangents, outputs, gradients)`` as NumPy arrays (params: the inputs and
    the block's parameters by full name)."""
    backend = BACKENDS[backend_name](dtype="float64")
    ins = arrays(name, case)
    model = ml.Model()
    keys = [*ins, *case.data]
    model |= case.block()(**{k: k for k in keys}, **{o: o for o in case.outputs})
    shapes = {k: list(np.shape(v)) for k, v in {**ins, **case.data}.items()}
    compiled = ml.compile(model, backend, shapes=shapes, trainable_keys=set(ins))
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    params = dict(ins)
    for key in compiled.get_parameters():
        if key not in params:
            params[key] = rng.standard_normal(compiled.parameter_shapes[key])
    cots = {o: rng.standard_normal(compiled.program.output_shape(o)) for o in case.outputs}
    kw: dict[str, Any] = {}
    if compiled.initial_state_dict:
        kw["state"] = compiled.initial_state_dict
    if case.training is not None:
        kw["training"] = case.training
    res = compiled.evaluate({k: backend.array(v) for k, v in params.items()},
                            {k: backend.array(v) if v.dtype != bool else _bool(backend, v)
                             for k, v in case.data.items()},
                            output_gradients={o: backend.array(v) for o, v in cots.items()}, **kw)
    out, grads = res[0], res[1]
    to_np = lambda a: np.asarray(backend.to_numpy(a))  # noqa: E731
    return (params, cots, {o: to_np(out[o]) for o in case.outputs},
            {k: to_np(g) for k, g in grads.items()})


def _bool(backend: Any, v: np.ndarray) -> Any:
    """A boolean mask in the backend's own array type, still boolean."""
    if isinstance(backend, TorchBackend):
        return torch.tensor(v)
    if isinstance(backend, JaxBackend):
        import jax.numpy as jnp

        return jnp.asarray(v)
    return v


def run_torch(case: Case, params: dict, cots: dict):
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    d = {k: torch.tensor(v) for k, v in case.data.items()}
    y = case.torch_fn(t, d)
    grads = torch.autograd.grad([y[o] for o in case.outputs], list(t.values()),
                                [torch.tensor(cots[o]) for o in case.outputs], allow_unused=True)
    return ({o: y[o].detach().numpy() for o in case.outputs},
            {k: np.zeros_like(params[k]) if g is None else g.numpy() for k, g in zip(t, grads)})


def error(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference relative to max(1, |want|); NaN in the same places (as torch:
    an all-ignored cross-entropy mean) counts as equal, elsewhere as a mismatch."""
    assert got.shape == want.shape, (got.shape, want.shape)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    if (nan_g != nan_w).any():
        return float("inf")
    d = np.abs(np.where(nan_w, 0, got) - np.where(nan_w, 0, want))
    scale = max(1.0, float(np.abs(np.where(nan_w, 0, want)).max(initial=0.0)))
    return float(d.max(initial=0.0)) / scale


def nonfinite_error(got: np.ndarray, want: np.ndarray) -> float:
    """:func:`error` where ``want`` may hold infinities too: ±inf must be met by the same
    infinity (inf − inf is NaN, which :func:`error` reads as a mismatch), NaN by NaN; the
    finite elements are compared as :func:`error` does."""
    assert got.shape == want.shape, (got.shape, want.shape)
    inf_w = np.isinf(want)
    if (np.isinf(got) != inf_w).any() or (got[inf_w] != want[inf_w]).any():
        return float("inf")
    return error(np.where(inf_w, 0.0, got), np.where(inf_w, 0.0, want))


def compare(name: str, case: Case, params, cots, out, grads, what: str,
            err: Callable[[np.ndarray, np.ndarray], float] = error) -> None:
    """Each output and gradient of a run of ``case`` against torch's within :data:`TOL` by
    ``err`` (:func:`error`, or :func:`nonfinite_error` where the outputs hold infinities)."""
    want_out, want_grads = run_torch(case, params, cots)
    assert set(grads) == set(want_grads), set(grads) ^ set(want_grads)
    errs = {**{o: err(out[o], want_out[o]) for o in case.outputs},
            **{f"d/d {k}": err(grads[k], want_grads[k]) for k in want_grads}}
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {name}: {bad}"


def jax_column(module: str, names: list[str], tests_dir: str) -> dict[str, Any]:
    """Run ``names`` of ``module``'s CASES on JAX float64 in a fresh process (JAX x64 is
    process-wide) and return ``{name: (params, cots, out, grads)}``."""
    from conftest import run_python

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jax.npz")
        run_python(f"""
            import sys
            sys.path.insert(0, {tests_dir!r})
            import jax
            jax.config.update("jax_enable_x64", True)
            import numpy as np
            import layer_edges as le
            import {module} as m
            flat = {{}}
            for name in {names!r}:
                params, cots, out, grads = le.run_mithril(name, m.CASES[name], "jax")
                for kind, d in (("p", params), ("c", cots), ("o", out), ("g", grads)):
                    for k, v in d.items():
                        flat[f"{{name}}|{{kind}}|{{k}}"] = v
            np.savez({path!r}, **flat)
        """, timeout=600)
        flat = dict(np.load(path))
    res: dict[str, Any] = {}
    for key, v in flat.items():
        name, kind, k = key.split("|", 2)
        res.setdefault(name, {"p": {}, "c": {}, "o": {}, "g": {}})[kind][k] = v
    return {n: (d["p"], d["c"], d["o"], d["g"]) for n, d in res.items()}


def parity_tests(module: str, cases: dict[str, Case],
                 err: Callable[[np.ndarray, np.ndarray], float] = error) -> tuple[Any, Any, Any]:
    """The tests every table of cases gets, to be bound in ``module`` (the test file, whose
    ``CASES`` is ``cases``): on the NumPy and torch backends, and the JAX column (float64, in
    a fresh process), each case's outputs and every gradient against torch autograd (compared
    by ``err``: :func:`error`, or :func:`nonfinite_error` for outputs with infinities)."""
    import pytest

    @pytest.mark.parametrize("backend_name", ["numpy", "torch"])
    @pytest.mark.parametrize("name", list(cases))
    def test_equals_torch(name: str, backend_name: str) -> None:
        case = cases[name]
        compare(name, case, *run_mithril(name, case, backend_name), what=backend_name, err=err)

    @pytest.fixture(scope="module")
    def jax_results() -> dict[str, Any]:
        return jax_column(module, list(cases), os.path.dirname(__file__))

    @pytest.mark.parametrize("name", list(cases))
    def test_jax_equals_torch(name: str, jax_results: dict[str, Any]) -> None:
        compare(name, cases[name], *jax_results[name], what="jax", err=err)

    return test_equals_torch, jax_results, test_jax_equals_torch


def scalar_loss(case: Case, params: dict[str, np.ndarray], cots: dict[str, np.ndarray],
                backend_name: str = "numpy") -> Callable[[dict[str, np.ndarray]], float]:
    """``p -> sum over outputs of <output(p), cotangent>`` for ``case`` on a float64 backend:
    the scalar whose gradient :func:`run_mithril` returns (for central differences)."""
    backend = BACKENDS[backend_name](dtype="float64")
    model = ml.Model()
    model |= case.block()(**{k: k for k in [*case.inputs, *case.data]},
                          **{o: o for o in case.outputs})
    shapes = {k: list(np.shape(v)) for k, v in {**params, **case.data}.items()
              if k in case.inputs or k in case.data}
    compiled = ml.compile(model, backend, shapes=shapes, trainable_keys=set(case.inputs))

    def f(p: dict[str, np.ndarray]) -> float:
        out = compiled.evaluate({k: backend.array(v) for k, v in p.items()},
                                {k: backend.array(v) for k, v in case.data.items()})
        return float(sum(np.sum(np.asarray(backend.to_numpy(out[o])) * cots[o])
                         for o in case.outputs))
    return f
