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
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
    """Run ``names`` of ``module``'s CASES on JAX float64 in this process (under conftest's
    ``jax_float64``: the x64 flag put back after) and return ``{name: (params, cots, out,
    grads)}`` as NumPy arrays. ``tests_dir``: unused (the column ran in a fresh interpreter)."""
    import importlib

    from conftest import jax_float64

    m = importlib.import_module(module)
    res: dict[str, Any] = {}
    with jax_float64():
        for name in names:
            res[name] = tuple({k: np.asarray(v) for k, v in d.items()}
                              for d in run_mithril(name, m.CASES[name], "jax"))
    return res


def parity_tests(module: str, cases: dict[str, Case],
                 err: Callable[[np.ndarray, np.ndarray], float] = error,
                 jax_default: list[str] | None = None) -> tuple[Any, Any, Any]:
    """The tests every table of cases gets, to be bound in ``module`` (the test file, whose
    ``CASES`` is ``cases``): on the NumPy and torch backends, and the JAX column (float64, in
    a fresh process), each case's outputs and every gradient against torch autograd (compared
    by ``err``: :func:`error`, or :func:`nonfinite_error` for outputs with infinities). The JAX
    column runs every third case by default, or the cases named in ``jax_default``, and all
    under ``-m slow`` (``jax_case_params``)."""
    import pytest
    from conftest import jax_case_params, selected_cases

    @pytest.mark.parametrize("backend_name", ["numpy", "torch"])
    @pytest.mark.parametrize("name", list(cases))
    def test_equals_torch(name: str, backend_name: str) -> None:
        case = cases[name]
        compare(name, case, *run_mithril(name, case, backend_name), what=backend_name, err=err)

    @pytest.fixture(scope="module")
    def jax_results(request: Any) -> dict[str, Any]:
        return jax_column(module, selected_cases(request, "name", list(cases)),
                          os.path.dirname(__file__))

    jax_params = jax_case_params(list(cases)) if jax_default is None else [
        n if n in jax_default else pytest.param(n, marks=pytest.mark.slow) for n in cases]
    assert jax_default is None or set(jax_default) <= set(cases), jax_default

    @pytest.mark.parametrize("name", jax_params)
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


# -- torch references of padding that differs before and after (torch pads symmetrically) --
Pairs = tuple[tuple[int, int], ...]


def torch_pad_order(pads: Pairs) -> list[int]:
    """``F.pad``'s order: (before, after) per axis, the last axis first."""
    return [p for pair in reversed(pads) for p in pair]


def pool_out_size_pad_lr(n: int, k: int, s: int, d: int, lo: int, hi: int, ceil: bool) -> int:
    """torch's ``pooling_output_shape_pad_lr`` (aten/src/ATen/native/Pool.h)."""
    out = (n + lo + hi - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    return out - 1 if ceil and (out - 1) * s >= n + lo else out


def cut_to(y: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return y[(..., *(slice(0, o) for o in sizes))]


def conv_padded_ref(nd: int, stride: Any, dilation: Any, groups: int, pads: Pairs, mode: str):
    """torch's convolution of the input padded by ``F.pad`` in ``mode`` (constant for
    "zeros"), unpadded: as ``nn.ConvNd`` pads for a non-zeros mode."""
    conv = F.conv1d if nd == 1 else F.conv2d

    def ref(t: dict, _: dict) -> dict:
        w = next(v for k, v in t.items() if k.endswith(".weight"))
        b = next((v for k, v in t.items() if k.endswith(".bias")), None)
        x = F.pad(t["input"], torch_pad_order(pads), mode="constant" if mode == "zeros" else mode)
        return {"output": conv(x, w, b, stride, 0, dilation, groups)}
    return ref


def max_pool_padded_ref(nd: int, k: tuple, s: tuple, d: tuple, pads: Pairs, ceil: bool):
    """torch's max pooling of the −inf padded input (indices into it), its −inf windows'
    index moved to their first element inside the input, padding-only windows −inf."""
    fn = F.max_pool1d if nd == 1 else F.max_pool2d

    def ref(t: dict, _: dict) -> dict:
        x = t["input"]
        batched = x.ndim == nd + 2
        xb = x if batched else x[None]
        spatial = xb.shape[2:]
        sizes = [pool_out_size_pad_lr(n, *a, ceil) for n, a in
                 zip(spatial, zip(k, s, d, *zip(*pads)))]
        xp = F.pad(xb, torch_pad_order(pads), value=-torch.inf)
        y, idx = fn(xp, k, s, 0, d, ceil_mode=ceil, return_indices=True)
        y, idx = cut_to(y, sizes), cut_to(idx, sizes)
        first = torch.full(y.shape[2:], -1, dtype=torch.int64)
        for pos in np.ndindex(*sizes):  # the first inside element, in window order
            for off in np.ndindex(*k):
                at = [j * si + u * di for j, u, si, di in zip(pos, off, s, d)]
                if all(0 <= a - lo < n for a, (lo, _), n in zip(at, pads, spatial)):
                    first[pos] = at[0] if nd == 1 else at[0] * xp.shape[3] + at[1]
                    break
        idx = torch.where((y == -torch.inf) & (first >= 0), first, idx)
        picked = xp.flatten(2).gather(2, torch.where(first >= 0, idx, 0).flatten(2)).view_as(y)
        out = torch.where(first >= 0, picked, -torch.inf)
        return {"output": out if batched else out[0]}
    return ref


def avg_pool_padded_ref(nd: int, k: tuple, s: tuple, pads: Pairs, ceil: bool, include: bool,
                        div: int | None):
    """torch's window sums (``divisor_override=1``) of the zero-padded input, over
    ``div``, or over the window sums of a ones mask padded with ones (``include``: the
    padding counts, the ``ceil_mode`` part past it not) or zeros (input elements only)."""
    def sums(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        xp = F.pad(x, torch_pad_order(pads), value=value)
        if nd == 1:
            return F.avg_pool2d(xp[:, :, None], (1, *k), (1, *s), 0, ceil,
                                divisor_override=1)[:, :, 0]
        return F.avg_pool2d(xp, k, s, 0, ceil, divisor_override=1)

    def ref(t: dict, _: dict) -> dict:
        x = t["input"]
        xb = x if x.ndim == nd + 2 else x[None]
        sizes = [pool_out_size_pad_lr(n, ki, si, 1, lo, hi, ceil)
                 for n, ki, si, (lo, hi) in zip(xb.shape[2:], k, s, pads)]
        total = cut_to(sums(xb), sizes)
        if div is not None:
            out = total / div
        else:  # the elements counted: padding too (ones there) or the input's only
            out = total / cut_to(sums(torch.ones_like(xb), 1.0 if include else 0.0), sizes)
        return {"output": out if x.ndim == nd + 2 else out[0]}
    return ref
