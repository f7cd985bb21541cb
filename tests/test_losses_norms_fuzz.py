"""Random loss, norm and activation configurations side by side with torch, via hypothesis.

The configurations and their torch references are :mod:`losses_norms_fuzz_cases`: every
loss (``CrossEntropy`` with every ``input_type``, class-index / one-hot / probability targets,
``weight``, ``ignore_index``, ``label_smoothing``, either class axis; ``BinaryCrossEntropy``
on logits and probabilities with ``pos_weight``; ``SquaredError``, ``AbsoluteError``,
``HuberLoss``, ``SmoothL1Loss``, ``KLDivergence``, the hinge and quantile losses), every norm
(``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``InstanceNorm1D/2D``, ``BatchNorm1D/2D`` in both modes, with and without
running statistics) and every activation (and the ``L1`` / ``L2`` regularizers), each with
every argument torch's function has and ours offers, against ``torch.nn.functional`` (or, for
the blocks torch lacks, a torch expression), with autograd for the gradients:

* NumPy and torch in process, JAX float64 in one fresh process per example (a list of
  configurations): the output and the gradient of every input and parameter within 1e-10 of
  torch's (relative to max(1, |torch|); infinities and NaN in the same places);
* float32 on the three backends against torch float64 within float32's accuracy;
* a few configurations' NumPy gradients against central differences.

The default variant draws a handful of examples; ``-m slow`` draws many.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_edges import BACKENDS, compare, jax_column, nonfinite_error, run_mithril, run_torch
from losses_norms_fuzz_cases import CASES, configs, name_of, norm_gain, unspecified_gradients

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
TOL = 1e-10
BLOCK_NAMES = r"(BatchNorm[12]D|InstanceNorm[12]D|GroupNorm|LayerNorm|RMSNorm|CrossEntropy)"
#: a norm's tolerance grows by this times :func:`norm_gain` (rounding amplified by 1/σ²)
ROUNDING = 1e3 * float(np.finfo(np.float64).eps)


def _err(name: str):
    tol = TOL + ROUNDING * norm_gain(name)

    def err(got: np.ndarray, want: np.ndarray) -> float:
        e = nonfinite_error(got, want)  # (within a norm's rounding: as within TOL)
        return e if e <= TOL else 0.0 if e <= tol else float("inf")
    return err


def _masked(name: str, res: tuple) -> tuple:
    """A run's results with the cotangents zeroed where the gradient is unspecified
    (:func:`unspecified_gradients`) and our gradient there set to torch's then (0·NaN or 0
    in torch, by position), so the rest is compared."""
    mask = unspecified_gradients(name)
    if mask is None:
        return res
    params, cots, out, grads = res
    case = CASES[name]
    cots = {k: np.where(mask, 0.0, v) for k, v in cots.items()}
    _, want = run_torch(case, params, cots)
    grads = {**grads, "input": np.where(mask, want["input"], grads["input"])}
    return params, cots, out, grads


def torch_refuses(name: str) -> BaseException | None:
    """torch's error on the configuration's inputs (and its block's parameters, ones), if it
    refuses them; None when it runs them."""
    case = CASES[name]
    params = {k: np.asarray(v) for k, v in case.inputs.items()}
    model = ml.Model()
    model |= case.block()(**{k: k for k in [*case.inputs, *case.data]})
    shapes = {k: list(np.shape(v)) for k, v in {**case.inputs, **case.data}.items()}
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes=shapes,
                          trainable_keys=set(case.inputs))
    for key in compiled.get_parameters():
        params.setdefault(key, np.ones(compiled.parameter_shapes[key]))
    try:
        case.torch_fn({k: torch.tensor(v) for k, v in params.items()},
                      {k: torch.tensor(v) for k, v in case.data.items()})
    except (RuntimeError, ValueError, IndexError) as e:
        return e
    return None


def check_numpy_torch(name: str) -> None:
    """Ours on NumPy and torch == torch's; where ours refuses, torch must refuse too, and our
    error must be a library one naming the block."""
    case = CASES[name]
    for backend_name in ("numpy", "torch"):
        try:
            res = run_mithril(name, case, backend_name)
        except (ValueError, TypeError) as e:
            assert re.search(BLOCK_NAMES, str(e)), f"{backend_name} {name}: unnamed {e!r}"
            assert torch_refuses(name) is not None, f"{backend_name} {name}: torch runs it: {e}"
            continue
        compare(name, case, *_masked(name, res), what=backend_name, err=_err(name))


def check_jax(names: list[str]) -> None:
    names = [n for n in names if torch_refuses(n) is None]
    res = jax_column("losses_norms_fuzz_cases", names, os.path.dirname(__file__))
    for n in names:
        compare(n, CASES[n], *_masked(n, res[n]), what="jax", err=_err(n))


_FAST = settings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
_SLOW = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
@given(st.lists(configs, min_size=15, max_size=15))
def test_jax_float64_equals_torch_functional(cfgs: list[dict[str, Any]]) -> None:
    check_jax([name_of(c) for c in cfgs])


@pytest.mark.slow
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(configs, min_size=150, max_size=150))
def test_jax_float64_equals_torch_functional_many(cfgs: list[dict[str, Any]]) -> None:
    check_jax([name_of(c) for c in cfgs])


# -- BatchNorm's running statistics over several steps ------------------------------------------
@st.composite
def running_stats_configs(draw: Any) -> dict[str, Any]:
    nd = draw(st.sampled_from([1, 2]))
    rank = draw(st.sampled_from([2, 3])) if nd == 1 else 4
    return {"nd": nd, "c": draw(st.integers(1, 3)), "rest": [draw(st.integers(1, 3))
                                                             for _ in range(rank - 2)],
            "batches": [draw(st.integers(2, 4)) for _ in range(draw(st.integers(1, 4)))],
            "momentum": draw(st.sampled_from([0.1, None, 0.0, 1.0, 0.7])),
            "eps": draw(st.sampled_from([1e-5, 0.5])), "affine": draw(st.booleans()),
            "seed": draw(st.integers(0, 99))}


def check_running_stats(cfg: dict[str, Any], backend_cls: Any) -> None:
    """Steps of batches of changing sizes in training mode, then one in inference mode: the
    outputs, running mean / variance and count equal ``nn.BatchNorm*d``'s (float64)."""
    block = ml.BatchNorm1D if cfg["nd"] == 1 else ml.BatchNorm2D
    ref_cls = torch.nn.BatchNorm1d if cfg["nd"] == 1 else torch.nn.BatchNorm2d
    c, m = cfg["c"], cfg["momentum"]
    model = ml.Model()
    model |= block(c, cfg["eps"], m, cfg["affine"])(input="input", output="output")
    compiled = ml.compile(model, backend_cls(dtype="float64"),
                          shapes={"input": [None, c, *cfg["rest"]]})
    ref = ref_cls(c, cfg["eps"], m, cfg["affine"], dtype=torch.float64)
    rng = np.random.default_rng(cfg["seed"])
    params = {k: rng.standard_normal(compiled.parameter_shapes[k])
              for k in compiled.get_parameters()}
    with torch.no_grad():
        for k, v in params.items():
            getattr(ref, k.rsplit(".", 1)[1]).copy_(torch.tensor(v))
    be = compiled.backend
    params = {k: be.array(v) for k, v in params.items()}
    state = compiled.initial_state_dict
    to_np = lambda a: np.asarray(be.to_numpy(a))  # noqa: E731
    for n in [*cfg["batches"], 0]:  # 0: the inference step
        training = n > 0
        x = 2 + 3 * rng.standard_normal((max(n, 2), c, *cfg["rest"]))
        out, new = compiled.evaluate(params, {"input": be.array(x)}, state=state,
                                     training=training)
        state = new if training else state
        want = ref.train(training)(torch.tensor(x)).detach().numpy()
        assert np.abs(to_np(out["output"]) - want).max() <= 1e-12 * max(1, np.abs(want).max())
    for k, v in state.items():
        want = getattr(ref, k.rsplit(".", 1)[1]).numpy()
        assert np.abs(to_np(v) - want).max() <= 1e-12 * max(1, np.abs(want).max()), k


@settings(max_examples=6, deadline=None, derandomize=True)
@given(running_stats_configs(), st.sampled_from([NumpyBackend, TorchBackend]))
def test_batch_norm_running_stats_equal_torch(cfg: dict[str, Any], backend_cls: Any) -> None:
    check_running_stats(cfg, backend_cls)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(running_stats_configs(), st.sampled_from([NumpyBackend, TorchBackend]))
def test_batch_norm_running_stats_equal_torch_many(cfg: dict[str, Any], backend_cls: Any) -> None:
    check_running_stats(cfg, backend_cls)


# -- float32 ----------------------------------------------------------------------------------
TOL32 = 2e-5


def _float32(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float32)
    return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0), v)


def run_float32(name: str, backend_name: str) -> tuple[dict, dict, dict, dict]:
    """:func:`run_mithril` in float32: the case's inputs, parameters, cotangents and float
    data rounded to float32 (subnormals flushed to 0: XLA on CPU flushes them itself, so
    a probability of 1e-40 is 0 on JAX, finite on NumPy and torch), then ours on
    ``backend_name`` in float32 (returned as float32 NumPy arrays)."""
    case = CASES[name]
    params64, cots64, _, _ = run_mithril(name, case, "numpy")
    params = {k: _float32(v) for k, v in params64.items()}
    cots = {k: _float32(v) for k, v in cots64.items()}
    data = {k: _float32(v) if v.dtype.kind == "f" else v for k, v in case.data.items()}
    backend = BACKENDS[backend_name](dtype="float32")
    model = ml.Model()
    model |= case.block()(**{k: k for k in [*case.inputs, *data]}, output="output")
    shapes = {k: list(np.shape(v)) for k, v in {**case.inputs, **data}.items()}
    compiled = ml.compile(model, backend, shapes=shapes, trainable_keys=set(case.inputs))
    kw: dict[str, Any] = {"state": compiled.initial_state_dict} if compiled.initial_state_dict \
        else {}
    if case.training is not None:
        kw["training"] = case.training
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in params.items()},
                                   {k: backend.array(v) for k, v in data.items()},
                                   output_gradients={"output": backend.array(cots["output"])},
                                   **kw)[:2]
    to_np = lambda a: np.asarray(backend.to_numpy(a))  # noqa: E731
    return params, cots, {"output": to_np(out["output"])}, {k: to_np(g) for k, g in grads.items()}


def check_float32(name: str) -> None:
    """Ours in float32 on the three backends against torch's functional in float32 on the
    same (rounded) values: within :data:`TOL32` relative to max(1, |torch|) (more for a norm
    at a tiny variance, by :func:`norm_gain` in float32's epsilon)."""
    case, cfg = CASES[name], json.loads(name)
    if torch_refuses(name) is not None:
        return
    if cfg["op"] == "gelu" and cfg["special"] == "inf" and torch.isnan(
            F.gelu(torch.full(cfg["shape"], np.inf, dtype=torch.float32))).any():
        # torch's vectorised float32 GELU of +inf is NaN (its scalar loop's, its float64
        # one, ours and JAX's: inf); a shape that torch runs in the scalar loop is compared
        return
    tol = TOL32 + 1e2 * float(np.finfo(np.float32).eps) * norm_gain(name)
    for backend_name in ("numpy", "torch", "jax"):
        params, cots, out, grads = _masked(name, run_float32(name, backend_name))
        t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        d = {k: torch.tensor(_float32(v) if v.dtype.kind == "f" else v)
             for k, v in case.data.items()}
        y = case.torch_fn(t, d)["output"]
        want_g = torch.autograd.grad(y, list(t.values()), torch.tensor(cots["output"]),
                                     allow_unused=True)
        errs = {"output": nonfinite_error(out["output"], y.detach().numpy())}
        errs |= {k: nonfinite_error(grads[k], np.zeros_like(params[k]) if g is None
                                    else g.numpy()) for k, g in zip(t, want_g)}
        bad = {k: e for k, e in errs.items() if not e <= tol}
        assert not bad, f"{backend_name} float32 {name}: {bad}"


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_float32_on_three_backends_equals_torch_float32(cfg: dict[str, Any]) -> None:
    check_float32(name_of(cfg))


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_float32_on_three_backends_equals_torch_float32_many(cfg: dict[str, Any]) -> None:
    check_float32(name_of(cfg))
