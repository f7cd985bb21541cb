"""``Embedding``'s ``max_norm`` / ``norm_type`` / ``scale_grad_by_freq`` against
``torch.nn.Embedding`` with the same options, trained side by side with SGD for three steps
(different indices each step, repeated indices, the padding row among them): each step's
output and weight gradient, torch's weight after its in-place renormalisation
(``Embedding.renormed_weight``) and the weight after each update, float64 at 1e-10 on NumPy,
torch and JAX (JAX in a subprocess, x64), float32 at 1e-5. Ours applies
``renormed_weight`` before the update, which is what torch's forward did to its weight in
place: the trajectories agree. Then: the parameters given to ``evaluate`` are not changed
(torch's are), the cases do rescale some rows and keep others, and bad arguments are named.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    jax_case_params,
    jax_float64_results,
    selected_cases,
    to_np,
)

import mithril as ml
from mithril.errors import ShapeError

N, DIM, LR, STEPS = 7, 4, 0.1, 3
# case: (options of both, dtype)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "max_norm": ({"max_norm": 1.5}, "float64"),
    "max_norm_p1": ({"max_norm": 2.0, "norm_type": 1.0}, "float64"),
    "max_norm_inf_padding": ({"max_norm": 1.6, "norm_type": math.inf, "padding_idx": 1}, "float64"),
    "max_norm_p3_5": ({"max_norm": 1.5, "norm_type": 3.5}, "float64"),
    "freq": ({"scale_grad_by_freq": True}, "float64"),
    "freq_padding_max_norm": ({"scale_grad_by_freq": True, "padding_idx": -1, "max_norm": 2.1}, "float64"),
    "max_norm_freq_float32": ({"max_norm": 1.5, "scale_grad_by_freq": True}, "float32"),
}


def setup(case: str):
    """The weight, and per step the indices (2, 5) (repeats; rows 1 and N − 1 in each) and
    the output's cotangent."""
    rng = np.random.default_rng(sum(map(ord, case)))
    w = rng.standard_normal((N, DIM))
    steps = []
    for _ in range(STEPS):
        idx = rng.integers(0, N, (2, 5))
        idx[0, :3] = [1, N - 1, idx[1, 4]]
        steps.append((idx, rng.standard_normal((2, 5, DIM))))
    return w, steps


def run_ours(case: str, backend_name: str) -> dict[str, np.ndarray]:
    opts, dtype = CASES[case]
    w, steps = setup(case)
    backend = BACKENDS[backend_name](dtype=dtype)
    block = ml.Embedding(N, DIM, **opts)
    compiled = ml.compile(block, backend, shapes={"input": [2, 5]})
    weight, res = backend.array(w), {}
    for s, (idx, cot) in enumerate(steps):
        ids = backend.array(idx)
        out, grads = compiled.evaluate({"embedding.weight": weight}, {"input": ids},
                                       output_gradients={"output": backend.array(cot)})
        res[f"{s}|output"] = to_np(backend, out["output"])
        res[f"{s}|grad"] = to_np(backend, grads["embedding.weight"])
        if "max_norm" in opts:  # torch's side effect, then its SGD step
            weight = block.renormed_weight(weight, ids)
            res[f"{s}|renormed"] = to_np(backend, weight)
        weight = weight - LR * grads["embedding.weight"]
        res[f"{s}|updated"] = to_np(backend, weight)
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    opts, dtype = CASES[case]
    w, steps = setup(case)
    ref = torch.nn.Embedding(N, DIM, **opts).to(getattr(torch, dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
    sgd = torch.optim.SGD(ref.parameters(), lr=LR)
    res = {}
    for s, (idx, cot) in enumerate(steps):
        out = ref(torch.tensor(idx))  # (renormalises the looked-up rows of ref.weight in place)
        (out * torch.tensor(cot, dtype=out.dtype)).sum().backward()
        res[f"{s}|output"] = out.detach().double().numpy()
        res[f"{s}|grad"] = ref.weight.grad.double().numpy()
        if "max_norm" in opts:
            res[f"{s}|renormed"] = ref.weight.detach().double().numpy().copy()
        sgd.step()
        sgd.zero_grad()
        res[f"{s}|updated"] = ref.weight.detach().double().numpy().copy()
    return res


def tol(case: str) -> float:
    return 1e-10 if CASES[case][1] == "float64" else 1e-5


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_equal_torch(case, backend_name):
    assert_arrays_within(run_ours(case, backend_name), run_torch(case), tol(case), f"{backend_name} {case}")


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_embedding_options_vs_torch", "CASES", "run_ours",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_training_steps_equal_torch(case, jax_results):
    assert_arrays_within(jax_results.get(case, {}), run_torch(case), tol(case), f"jax {case}")


@pytest.mark.parametrize("case", [c for c in CASES if "max_norm" in CASES[c][0]])
def test_cases_rescale_some_rows_and_keep_others(case):
    """Not vacuous: the first step's renormalisation changes some looked-up rows and leaves
    others (under max_norm) as they are; no step changes a row it does not look up."""
    want, (w, steps) = run_torch(case), setup(case)
    for s in range(STEPS):
        before = want[f"{s - 1}|updated"] if s else w.astype(CASES[case][1])
        changed = np.any(want[f"{s}|renormed"] != before, axis=1)
        used = np.isin(np.arange(N), steps[s][0])
        assert not (changed & ~used).any(), (case, s)
        if s == 0:
            assert changed.any() and (used & ~changed).any(), case


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_evaluate_leaves_the_parameters_alone(backend_name):
    """torch's forward rescales its weight in place; ours returns the same numbers and leaves
    the arrays it was given as they were (the update is ``renormed_weight``'s, a new array)."""
    w, steps = setup("max_norm")
    backend = BACKENDS[backend_name](dtype="float64")
    block = ml.Embedding(N, DIM, max_norm=1.5)
    compiled = ml.compile(block, backend, shapes={"input": [2, 5]})
    weight, ids = backend.array(w), backend.array(steps[0][0])
    compiled.evaluate({"embedding.weight": weight}, {"input": ids},
                      output_gradients={"output": backend.array(steps[0][1])})
    renormed = block.renormed_weight(weight, ids)
    np.testing.assert_array_equal(to_np(backend, weight), w)
    assert not np.array_equal(to_np(backend, renormed), w)


@pytest.mark.parametrize("make, error, match", [
    (lambda: ml.Embedding(4, 2, max_norm=0.0), ValueError, r"Embedding: max_norm must be a finite number > 0"),
    (lambda: ml.Embedding(4, 2, max_norm=-1.0), ValueError, r"max_norm must be .* got -1.0"),
    (lambda: ml.Embedding(4, 2, max_norm=math.inf), ValueError, r"max_norm must be .* got inf"),
    (lambda: ml.Embedding(4, 2, max_norm=True), ValueError, r"max_norm must be .* got True"),
    (lambda: ml.Embedding(4, 2, max_norm="1"), ValueError, r"max_norm must be .* got '1'"),
    (lambda: ml.Embedding(4, 2, max_norm=1.0, norm_type=0), ValueError,
     r"Embedding: norm_type must be a number > 0 \(inf: the max norm\), got 0"),
    (lambda: ml.Embedding(4, 2, norm_type=math.nan), ValueError, r"norm_type must be .* got nan"),
    (lambda: ml.Embedding(4, 2, scale_grad_by_freq="yes"), ValueError,
     r"Embedding: scale_grad_by_freq must be a bool, got 'yes'"),
    (lambda: ml.Embedding(4, 2, sparse=True), ValueError, r"Embedding: sparse must be False, got True"),
    (lambda: ml.Embedding(4, 2).renormed_weight(np.ones((4, 2)), np.array([0])), ValueError,
     r"Embedding: renormed_weight needs max_norm"),
    (lambda: ml.Embedding(4, 2, max_norm=1.0).renormed_weight(np.ones((3, 2)), np.array([0])),
     ShapeError, r"Embedding: renormed_weight: 'weight' must be \(4, 2\), got shape \(3, 2\)"),
    (lambda: ml.Embedding(4, 2, max_norm=1.0).renormed_weight(np.ones((4, 2)), np.array([0, 4])),
     ValueError, r"Embedding: renormed_weight: indices must be in \[0, 3\], got 4"),
])
def test_bad_arguments_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_repr_shows_the_options():
    assert repr(ml.Embedding(4, 2, max_norm=1.0, norm_type=1, scale_grad_by_freq=True)) == \
        "Embedding(4, 2, max_norm=1.0, norm_type=1.0, scale_grad_by_freq=True)"
