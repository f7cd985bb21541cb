"""``InstanceNorm1D/2D(track_running_stats=True)`` against ``torch.nn.InstanceNorm1d/2d``
with the same options, side by side: three training-mode steps (output, the gradients of the
input, weight and bias, and the running mean / variance after each: torch's unbiased
per-instance variance averaged over the batch), then an inference-mode step normalising by
the running statistics (output and gradients). ``affine`` on and off, momentum 0.1, 0.5 and
None (torch's 0: the statistics stay), 1-D and 2-D; float64 at 1e-10 on NumPy, torch and JAX
(JAX in a subprocess, x64). Then: inference takes one spatial position (as torch) where
training refuses it by name, the state plumbing (initial state as torch's buffers, no
``num_batches_tracked``; a missing state is named) and bad arguments named.
"""

from __future__ import annotations

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
from mithril.errors import KeyMismatchError, ShapeError

C, STEPS = 3, 3
# case: (rank, affine, momentum, input shape)
CASES: dict[str, tuple[int, bool, Any, tuple[int, ...]]] = {
    "1d": (1, False, 0.1, (4, C, 5)),
    "1d_affine_momentum_none": (1, True, None, (2, C, 6)),
    "2d_affine": (2, True, 0.1, (2, C, 3, 4)),
    "2d_momentum_half_batch_of_one": (2, False, 0.5, (1, C, 2, 3)),
}


def setup(case: str):
    rank, affine, momentum, shape = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    wb = rng.standard_normal((2, C)) if affine else None
    # training inputs with channel offsets and scales (the running statistics move), then
    # an inference input; a cotangent for each
    xs = [rng.standard_normal(shape) * rng.uniform(0.5, 3, (C,) + (1,) * rank)
          + rng.uniform(-2, 2, (C,) + (1,) * rank) for _ in range(STEPS + 1)]
    return wb, xs, [rng.standard_normal(shape) for _ in xs]


def block(case: str):
    rank, affine, momentum, _ = CASES[case]
    return (ml.InstanceNorm1D if rank == 1 else ml.InstanceNorm2D)(
        C, affine=affine, track_running_stats=True, momentum=momentum)


def run_ours(case: str, backend_name: str) -> dict[str, np.ndarray]:
    wb, xs, cots = setup(case)
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(block(case), backend, shapes={"input": list(xs[0].shape)},
                          trainable_keys=["input"])
    name = next(iter(compiled.initial_state_dict)).rsplit(".", 1)[0]
    params = {} if wb is None else {f"{name}.weight": backend.array(wb[0]),
                                    f"{name}.bias": backend.array(wb[1])}
    state, res = compiled.initial_state_dict, {}
    for s, (x, cot) in enumerate(zip(xs, cots)):
        training = s < STEPS
        out, grads, state = compiled.evaluate({**params, "input": backend.array(x)}, {},
                                              output_gradients={"output": backend.array(cot)},
                                              state=state, training=training)
        res[f"{s}|output"] = to_np(backend, out["output"])
        res.update({f"{s}|grad|{k.rsplit('.', 1)[-1]}": to_np(backend, v) for k, v in grads.items()})
        res.update({f"{s}|state|{k.rsplit('.', 1)[-1]}": to_np(backend, v) for k, v in state.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    rank, affine, momentum, _ = CASES[case]
    wb, xs, cots = setup(case)
    ref = (torch.nn.InstanceNorm1d if rank == 1 else torch.nn.InstanceNorm2d)(
        C, affine=affine, track_running_stats=True, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.tensor(wb[0]))
            ref.bias.copy_(torch.tensor(wb[1]))
    res = {}
    for s, (x, cot) in enumerate(zip(xs, cots)):
        ref.train(s < STEPS)
        xt = torch.tensor(x, requires_grad=True)
        leaves = {"input": xt, **dict(ref.named_parameters())}
        y = ref(xt)
        grads = torch.autograd.grad(y, list(leaves.values()), torch.tensor(cot))
        res[f"{s}|output"] = y.detach().numpy()
        res.update({f"{s}|grad|{k}": g.numpy() for k, g in zip(leaves, grads)})
        res.update({f"{s}|state|{k}": getattr(ref, k).numpy().copy() for k in ("running_mean", "running_var")})
    assert int(ref.num_batches_tracked) == 0  # torch's InstanceNorm never counts: not kept
    return res


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_train_then_eval_equals_torch(case, backend_name):
    assert_arrays_within(run_ours(case, backend_name), run_torch(case), 1e-10, f"{backend_name} {case}")


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_instance_norm_running_vs_torch", "CASES", "run_ours",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_train_then_eval_equals_torch(case, jax_results):
    assert_arrays_within(jax_results.get(case, {}), run_torch(case), 1e-10, f"jax {case}")


@pytest.mark.parametrize("case", list(CASES))
def test_the_statistics_move_unless_momentum_is_none(case):
    """Not vacuous: the running statistics leave their start (zeros, ones) with a momentum,
    and stay there with None, as torch's."""
    want = run_torch(case)
    moved = not (np.all(want[f"{STEPS - 1}|state|running_mean"] == 0)
                 and np.all(want[f"{STEPS - 1}|state|running_var"] == 1))
    assert moved == (CASES[case][2] is not None)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_one_position_in_inference_only(backend_name):
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(ml.InstanceNorm1D(C, affine=True, track_running_stats=True), backend,
                          shapes={"input": [2, C, 1]})
    params, state = compiled.get_parameters(), compiled.initial_state_dict
    state = {k: backend.array(np.arange(1.0, C + 1)) for k in state}
    x = np.random.default_rng(0).standard_normal((2, C, 1))
    out, same = compiled.evaluate(params, {"input": backend.array(x)}, state=state, training=False)
    ref = torch.nn.InstanceNorm1d(C, affine=True, track_running_stats=True).double().eval()
    with torch.no_grad():
        ref.running_mean.copy_(torch.arange(1.0, C + 1))
        ref.running_var.copy_(torch.arange(1.0, C + 1))
        want = ref(torch.tensor(x)).numpy()
    assert np.abs(to_np(backend, out["output"]) - want).max() <= 1e-12
    with pytest.raises(ValueError, match=r"InstanceNorm1D: training mode needs more than 1 "
                                         r"spatial element per instance .* \(2, 3, 1\)"):
        compiled.evaluate(params, {"input": backend.array(x)}, state=state, training=True)
    with pytest.raises(ShapeError, match=r"InstanceNorm1D: 'input' must have more than 1 spatial"):
        ml.compile(ml.InstanceNorm1D(C), backend, shapes={"input": [2, C, 1]})


def test_state_is_torchs_buffers_and_is_required():
    compiled = ml.compile(ml.InstanceNorm2D(C, track_running_stats=True), ml.NumpyBackend(dtype="float64"),
                          shapes={"input": [2, C, 3, 3]})
    state = compiled.initial_state_dict
    ref = torch.nn.InstanceNorm2d(C, track_running_stats=True)
    assert sorted(state) == ["instance_norm2_d.running_mean", "instance_norm2_d.running_var"]
    for k in ("running_mean", "running_var"):
        np.testing.assert_array_equal(state[f"instance_norm2_d.{k}"], getattr(ref, k).numpy())
    x = np.ones((2, C, 3, 3))
    with pytest.raises(KeyMismatchError, match="state"):
        compiled.evaluate({}, {"input": x})
    assert ml.compile(ml.InstanceNorm2D(C), ml.NumpyBackend(), shapes={"input": [2, C, 3, 3]}
                      ).initial_state_dict == {}


@pytest.mark.parametrize("make, match", [
    (lambda: ml.InstanceNorm1D(3, track_running_stats=True, momentum=1.5),
     r"InstanceNorm1D: momentum must be in \[0, 1\] or None, got 1.5"),
    (lambda: ml.InstanceNorm1D(3, track_running_stats=True, momentum=True), r"momentum must be .* got True"),
    (lambda: ml.InstanceNorm2D(3, track_running_stats="yes"),
     r"InstanceNorm2D: track_running_stats must be a bool, got 'yes'"),
    # torch's positional order (eps, momentum, affine): our third is affine, so it is named
    (lambda: ml.InstanceNorm1D(3, 1e-5, 0.1, True), r"InstanceNorm1D: affine must be a bool, got 0.1"),
])
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
