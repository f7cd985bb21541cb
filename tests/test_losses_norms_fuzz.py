"""Random loss, norm and activation configurations side by side with torch, via hypothesis.

The configurations and their torch references are :mod:`losses_norms_fuzz_cases`: every
loss (``CrossEntropy`` with every ``input_type``, class-index / one-hot / probability targets,
``weight``, ``ignore_index``, ``label_smoothing``, either class axis; ``BinaryCrossEntropy``
on logits and probabilities with ``pos_weight``; ``SquaredError``, ``AbsoluteError``,
``HuberLoss``, ``SmoothL1Loss``, ``KLDivergence``, the hinge and quantile losses), every norm
(``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1D/2D`` in both modes, with and without
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

import os
import re
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_edges import compare, jax_column, nonfinite_error, run_mithril, run_torch
from losses_norms_fuzz_cases import CASES, configs, name_of, norm_gain, unspecified_gradients

import mithril as ml
from mithril.backends import NumpyBackend

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
TOL = 1e-10
BLOCK_NAMES = r"(BatchNorm[12]D|GroupNorm|LayerNorm|RMSNorm|CrossEntropy)"
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
