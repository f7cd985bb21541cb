"""Random convolution and pooling configurations side by side with torch, via hypothesis.

A configuration is a JSON dict (its text is the case's name, which seeds its input and
parameters, so a name rebuilds its case anywhere: :data:`CASES` builds cases from names,
for the JAX column in a fresh x64 process): ``Convolution1D/2D`` with every argument we
offer (kernel, stride, dilation, padding as an int, per-axis ints, ``(before, after)`` pairs,
``"same"`` or ``"valid"``, every ``padding_mode``, groups with depthwise multipliers,
``use_bias``; 1-D also as one bare ``(before, after)`` pair), ``MaxPool1D/2D`` (dilation,
``ceil_mode``, inputs with −inf and NaN, or ties) and ``AvgPool1D/2D``
(``count_include_pad``, ``ceil_mode``, ``divisor_override``), pools with symmetric or
``(before, after)`` padding, batches of 1 and 2 or no batch axis (``n`` 0), axes of size 1.

* The torch reference is torch's own module or function with the same arguments
  (``nn.Conv1d/2d`` through ``torch.func.functional_call``, ``F.max_pool*``,
  ``F.avg_pool*``; asymmetric pairs, which torch's layers do not take, as ``F.pad`` then an
  unpadded convolution or pool: :func:`layer_edges.max_pool_padded_ref` and
  :func:`layer_edges.avg_pool_padded_ref`). Where torch refuses a configuration, ours must refuse it too, with
  an error naming the block.
* NumPy and torch in process, JAX float64 in one fresh process per example (a list of
  configurations): the output and the gradients of the input, weight and bias within 1e-12
  of torch's (relative to max(1, |torch|); infinities and NaN in the same places).
* A few configurations' NumPy gradients against central differences.

The default variant draws a handful of examples; ``-m slow`` draws many.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import central_differences
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_edges import (
    Case,
    avg_pool_padded_ref,
    compare,
    conv_padded_ref,
    jax_column,
    max_pool_padded_ref,
    nonfinite_error,
    run_mithril,
    scalar_loss,
)

import mithril as ml
from mithril.errors import ShapeError

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
TOL = 1e-12
MODES = ("zeros", "reflect", "replicate", "circular")


# -- configurations ---------------------------------------------------------------------------
def _axes(draw: Any, nd: int, lo: int, hi: int) -> list[int]:
    return [draw(st.integers(lo, hi)) for _ in range(nd)]


@st.composite
def conv_configs(draw: Any) -> dict[str, Any]:
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["int", "ints", "pairs", "same", "valid"]))
    pad: Any = {"int": lambda: draw(st.integers(0, 3)), "ints": lambda: _axes(draw, nd, 0, 3),
                "pairs": lambda: (_axes(draw, 2, 0, 3) if nd == 1 and draw(st.booleans()) else
                                  [_axes(draw, 2, 0, 3) for _ in range(nd)]),
                "same": lambda: "same", "valid": lambda: "valid"}[kind]()
    return {"op": "conv", "nd": nd, "k": _axes(draw, nd, 1, 4),
            "s": [1] * nd if kind == "same" and draw(st.booleans()) else _axes(draw, nd, 1, 4),
            "d": _axes(draw, nd, 1, 3), "pad": pad, "mode": draw(st.sampled_from(MODES)),
            "groups": groups, "cg": draw(st.integers(1, 2)), "mult": draw(st.integers(1, 2)),
            "bias": draw(st.booleans()), "n": draw(st.integers(0, 2)),
            "size": _axes(draw, nd, 1, 8)}


@st.composite
def pool_configs(draw: Any) -> dict[str, Any]:
    nd = draw(st.sampled_from([1, 2]))
    op = draw(st.sampled_from(["max", "avg"]))
    k = _axes(draw, nd, 1, 4)
    cfg = {"op": op, "nd": nd, "k": k,
           "s": None if draw(st.booleans()) else _axes(draw, nd, 1, 5),
           "p": [draw(st.integers(0, ki // 2 + (draw(st.integers(0, 9)) == 0))) for ki in k],
           "ceil": draw(st.booleans()), "n": draw(st.integers(0, 2)),
           "c": draw(st.integers(1, 3)), "size": _axes(draw, nd, 1, 9)}
    if op == "max":
        cfg["d"] = _axes(draw, nd, 1, 3)
        cfg["special"] = draw(st.sampled_from(["", "-inf", "nan", "both", "ties"]))
    else:
        cfg["include_pad"] = draw(st.booleans())
        cfg["div"] = draw(st.sampled_from([None, None, 1, 3, -2]))
    if draw(st.booleans()):  # (before, after) per axis
        cfg["p"] = [[draw(st.integers(0, ki // 2 + (draw(st.integers(0, 9)) == 0)))
                     for _ in range(2)] for ki in k]
    return cfg


def _batch(cfg: dict[str, Any], *rest: int) -> tuple[int, ...]:
    """The input's shape: ``n`` 0 is one example without a batch axis."""
    return (*(cfg["n"],) * bool(cfg["n"]), *rest)


def _pairs(pad: Any, nd: int) -> tuple[tuple[int, int], ...] | None:
    """The (before, after) pairs of a JSON padding given as pairs (a bare 1-D pair too)."""
    if not isinstance(pad, list):
        return None
    if nd == 1 and len(pad) == 2 and not isinstance(pad[0], list):
        return (tuple(pad),)  # type: ignore[return-value]
    return tuple(tuple(p) for p in pad) if isinstance(pad[0], list) else None  # type: ignore[misc]


def name_of(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":"))


# -- cases from configurations ------------------------------------------------------------------
def _padding(pad: Any) -> Any:
    """The JSON padding as our blocks take it: pairs and per-axis ints as tuples."""
    if isinstance(pad, list):
        return tuple(tuple(p) if isinstance(p, list) else p for p in pad)
    return pad


def _conv_case(cfg: dict[str, Any]) -> Case:
    nd, g = cfg["nd"], cfg["groups"]
    c, o = g * cfg["cg"], g * cfg["mult"]
    block = ml.Convolution1D if nd == 1 else ml.Convolution2D
    kw = dict(stride=tuple(cfg["s"]), padding=_padding(cfg["pad"]), dilation=tuple(cfg["d"]),
              groups=g, use_bias=cfg["bias"], padding_mode=cfg["mode"])

    pairs = _pairs(cfg["pad"], nd)
    padded = None if pairs is None else conv_padded_ref(nd, tuple(cfg["s"]), tuple(cfg["d"]), g,
                                                        pairs, cfg["mode"])

    def ref(t: dict, _: dict) -> dict:
        if padded is not None:  # asymmetric: F.pad first
            return padded(t, _)
        x = t["input"]
        w = next(v for k, v in t.items() if k.endswith(".weight"))
        b = next((v for k, v in t.items() if k.endswith(".bias")), None)
        pad = cfg["pad"]
        mod = (torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d)(
            c, o, tuple(cfg["k"]), tuple(cfg["s"]), pad if isinstance(pad, (int, str)) else
            tuple(pad), tuple(cfg["d"]), g, bias=cfg["bias"], padding_mode=cfg["mode"],
            dtype=torch.float64)
        p = {"weight": w} if b is None else {"weight": w, "bias": b}
        return {"output": torch.func.functional_call(mod, p, (x,))}

    return Case(lambda: block(tuple(cfg["k"]), o, **kw), {"input": _batch(cfg, c, *cfg["size"])}, ref)


def _pool_input(cfg: dict[str, Any]) -> np.ndarray:
    """Standard normal values; with ``special``, a few −inf (a whole channel's leading block,
    so windows hold nothing else) and NaN elements, or ("ties") integers from −1 to 1 (as a
    ReLU's zeros: windows with several maxima, torch takes the first)."""
    rng = np.random.default_rng(zlib.crc32(name_of(cfg).encode()))
    x = rng.standard_normal(_batch(cfg, cfg["c"], *cfg["size"]))
    if cfg.get("special") == "ties":
        return np.round(x.clip(-1, 1))
    flat = x.reshape(-1)
    if cfg.get("special") in ("-inf", "both"):
        x[(0,) * (x.ndim - cfg["nd"]) + (..., slice(0, max(1, cfg["size"][-1] // 2)))] = -np.inf
        flat[rng.integers(0, flat.size, 2)] = -np.inf
    if cfg.get("special") in ("nan", "both"):
        flat[rng.integers(0, flat.size, 2)] = np.nan
    return x


def _inside(spatial: Any, out: Any, k: tuple, s: tuple, p: tuple, d: tuple) -> np.ndarray:
    """Per output position, whether its (dilated) window holds an input element."""
    axes = [np.array([any(0 <= j * si + u * di - pi < n for u in range(ki)) for j in range(o)])
            for n, o, ki, si, pi, di in zip(spatial, out, k, s, p, d)]
    return axes[0] if len(axes) == 1 else axes[0][:, None] & axes[1][None, :]


def _pool_case(cfg: dict[str, Any]) -> Case:
    nd, k, ceil = cfg["nd"], tuple(cfg["k"]), cfg["ceil"]
    pairs = _pairs(cfg["p"], nd)
    p = _padding(cfg["p"]) if pairs is not None else tuple(cfg["p"])
    s = None if cfg["s"] is None else tuple(cfg["s"])
    if cfg["op"] == "max":
        d = tuple(cfg["d"])
        fn = F.max_pool1d if nd == 1 else F.max_pool2d
        block = ml.MaxPool1D if nd == 1 else ml.MaxPool2D
        if pairs is not None:
            return Case(lambda: block(k, stride=s, padding=p, dilation=d, ceil_mode=ceil),
                        {"input": _pool_input(cfg)},
                        max_pool_padded_ref(nd, k, s or k, d, pairs, ceil))

        def ref(t: dict, _: dict) -> dict:
            x = t["input"]
            y, idx = fn(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
            inside = torch.tensor(_inside(x.shape[-nd:], y.shape[-nd:], k, s or k, p, d))
            if bool(inside.all()):
                return {"output": fn(x, k, s, p, d, ceil_mode=ceil)}
            # a dilated window of padding only: torch's index there is garbage and its
            # backward writes through it (out of bounds: a bus error); −inf, no gradient
            # (as the torch backend), torch's index elsewhere, through a gather
            picked = x.flatten(-nd).gather(-1, torch.where(inside, idx, 0).flatten(-nd)).view_as(y)
            return {"output": torch.where(inside, picked, -torch.inf)}

        return Case(lambda: block(k, stride=s, padding=p, dilation=d, ceil_mode=ceil),
                    {"input": _pool_input(cfg)}, ref)
    inc, div = cfg["include_pad"], cfg.get("div")
    block = ml.AvgPool1D if nd == 1 else ml.AvgPool2D
    if pairs is not None:
        return Case(lambda: block(k, stride=s, padding=p, count_include_pad=inc, ceil_mode=ceil,
                                  divisor_override=div), {"input": _pool_input(cfg)},
                    avg_pool_padded_ref(nd, k, s or k, pairs, ceil, inc, div))

    def avg(t: dict, _: dict) -> dict:
        x = t["input"]
        if nd == 1 and div is None:
            return {"output": F.avg_pool1d(x, k, s, p, ceil_mode=ceil, count_include_pad=inc)}
        if nd == 1:  # F.avg_pool1d has no divisor_override: as 2-D with one row
            return {"output": F.avg_pool2d(x[..., None, :], (1, *k), None if s is None else
                                           (1, *s), (0, *p), ceil, inc, div)[..., 0, :]}
        return {"output": F.avg_pool2d(x, k, s, p, ceil, inc, div)}

    return Case(lambda: block(k, stride=s, padding=p, count_include_pad=inc, ceil_mode=ceil,
                              divisor_override=div), {"input": _pool_input(cfg)}, avg)


def case_of(name: str) -> Case:
    cfg = json.loads(name)
    return _conv_case(cfg) if cfg["op"] == "conv" else _pool_case(cfg)


class _Cases(dict):
    """``CASES[name]``: the case a configuration's name describes (built on first use)."""

    def __missing__(self, name: str) -> Case:
        self[name] = case_of(name)
        return self[name]


CASES: dict[str, Case] = _Cases()


def torch_refuses(name: str) -> BaseException | None:
    """torch's error on the configuration, if it refuses it (None when it runs it)."""
    case = CASES[name]
    x = case.inputs["input"]
    t = {"input": torch.tensor(np.zeros(x) if isinstance(x, tuple) else x)}
    cfg = json.loads(name)
    pairs = _pairs(cfg.get("p"), cfg["nd"]) if cfg["op"] != "conv" else None
    if pairs is not None and any(max(pr) > ki // 2 for pr, ki in zip(pairs, cfg["k"])):
        # torch's pooling rule (F.pad + pool does not see the padding): at most half the kernel
        return ValueError("pad should be at most half of effective kernel size")
    if cfg["op"] == "conv":
        o = cfg["groups"] * cfg["mult"]
        t["w.weight"] = torch.zeros((o, cfg["cg"], *cfg["k"]), dtype=torch.float64)
        if cfg["bias"]:
            t["w.bias"] = torch.zeros(o, dtype=torch.float64)
    try:
        case.torch_fn(t, {})
    except (RuntimeError, ValueError, IndexError) as e:
        return e
    return None


def check_numpy_torch(name: str) -> None:
    """Ours on NumPy and torch == torch's (or, where torch refuses, a named error of ours)."""
    case, refused = CASES[name], torch_refuses(name)
    for backend_name in ("numpy", "torch"):
        if refused is not None:
            with pytest.raises((ValueError, ShapeError), match=r"(Convolution|Pool)[12]D"):
                run_mithril(name, case, backend_name)
            continue
        compare(name, case, *run_mithril(name, case, backend_name), what=backend_name,
                err=_err)


def _err(got: np.ndarray, want: np.ndarray) -> float:
    """:func:`nonfinite_error`, failing (inf) anything above :data:`TOL` (``compare``'s own
    bound is 1e-10)."""
    e = nonfinite_error(got, want)
    return e if e <= TOL else float("inf")


def check_jax(names: list[str]) -> None:
    """The configurations torch runs, on JAX float64 in one fresh process, == torch's."""
    names = [n for n in names if torch_refuses(n) is None]
    if not names:
        return
    res = jax_column("test_conv_pool_fuzz", names, os.path.dirname(__file__))
    for n in names:
        compare(n, CASES[n], *res[n], what="jax", err=_err)


configs = st.one_of(conv_configs(), pool_configs())
_FAST = settings(max_examples=10, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
_SLOW = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- tests ------------------------------------------------------------------------------------
@_FAST
@given(configs)
def test_numpy_and_torch_equal_torch_functional(cfg: dict[str, Any]) -> None:
    check_numpy_torch(name_of(cfg))


@pytest.mark.slow
@_SLOW
@given(configs)
def test_numpy_and_torch_equal_torch_functional_many(cfg: dict[str, Any]) -> None:
    check_numpy_torch(name_of(cfg))


@settings(max_examples=1, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(configs, min_size=12, max_size=12))
def test_jax_float64_equals_torch_functional(cfgs: list[dict[str, Any]]) -> None:
    check_jax([name_of(c) for c in cfgs])


@pytest.mark.slow
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(configs, min_size=60, max_size=60))
def test_jax_float64_equals_torch_functional_many(cfgs: list[dict[str, Any]]) -> None:
    check_jax([name_of(c) for c in cfgs])


# -- central differences ----------------------------------------------------------------------
FD_CONFIGS = [
    {"op": "conv", "nd": 2, "k": [2, 3], "s": [2, 1], "d": [1, 2], "pad": [[1, 0], [2, 1]],
     "mode": "reflect", "groups": 2, "cg": 1, "mult": 2, "bias": True, "n": 1, "size": [4, 5]},
    {"op": "conv", "nd": 1, "k": [4], "s": [1], "d": [2], "pad": "same", "mode": "circular",
     "groups": 1, "cg": 2, "mult": 1, "bias": False, "n": 2, "size": [6]},
    {"op": "max", "nd": 2, "k": [3, 2], "s": [1, 2], "p": [1, 1], "d": [1, 2], "ceil": True,
     "n": 1, "c": 2, "size": [4, 5], "special": ""},
    {"op": "avg", "nd": 2, "k": [3, 2], "s": [2, 3], "p": [1, 1], "ceil": True, "n": 1, "c": 2,
     "size": [5, 5], "include_pad": False},
    {"op": "avg", "nd": 1, "k": [3], "s": [2], "p": [1], "ceil": True, "n": 2, "c": 1,
     "size": [6], "include_pad": True, "div": -2},
]


@pytest.mark.parametrize("cfg", FD_CONFIGS, ids=lambda c: f"{c['op']}{c['nd']}d{c.get('div') or ''}")
def test_numpy_gradients_equal_central_differences(cfg: dict[str, Any]) -> None:
    """The input, weight and bias gradients on NumPy against central differences of
    <output, cotangent> (and torch's, side by side)."""
    name = name_of(cfg)
    case = CASES[name]
    params, cots, out, grads = run_mithril(name, case, "numpy")
    compare(name, case, params, cots, out, grads, what="numpy", err=_err)
    fd = central_differences(scalar_loss(case, params, cots), params, 1e-6)
    for k, g in grads.items():
        np.testing.assert_allclose(g, fd[k], rtol=1e-6, atol=1e-7, err_msg=k)
