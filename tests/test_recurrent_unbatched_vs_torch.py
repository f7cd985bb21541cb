"""Unbatched recurrent inputs against torch: ``RNN`` / ``LSTM`` / ``GRU`` on (T, I) with
initial states (K, H) (K = num_layers · num_directions), outputs (T, D·H) and h_n / c_n (K, H)
without the batch axis, as torch returns them (``batch_first`` ignored, as torch); the cells
on (I,) with states (H,). One and two layers and directions, relu, no bias, ``proj_size``,
zero and given states. float64 at 1e-10 on NumPy, torch and JAX (JAX in a subprocess, x64):
outputs and the gradients of the input, the states and every parameter, with torch's weights
loaded by ``params_from_torch``. Then the NumPy BPTT against central differences and the
named errors (batched states for an unbatched input, ``lengths``, a rank-4 input).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    central_differences,
    jax_case_params,
    jax_float64_results,
    selected_cases,
    to_np,
    torch_results,
)

import mithril as ml
from mithril.errors import ShapeError

TOL = 1e-10
T, D, H = 4, 3, 5
# case: (kind, options shared by ours and torch's, initial states given)
CASES = {
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}, True),
    "rnn_l2_bi_zero_states": ("RNN", {"num_layers": 2, "bidirectional": True}, False),
    "lstm_l2_bi": ("LSTM", {"num_layers": 2, "bidirectional": True}, True),
    "lstm_proj_batch_first": ("LSTM", {"proj_size": 2, "batch_first": True}, True),
    "gru_bi_batch_first_no_bias": ("GRU", {"bidirectional": True, "batch_first": True, "bias": False}, True),
    "gru_l2_zero_states": ("GRU", {"num_layers": 2}, False),
    "rnn_cell": ("RNNCell", {"nonlinearity": "tanh"}, True),
    "lstm_cell": ("LSTMCell", {}, True),
    "gru_cell_no_bias": ("GRUCell", {"bias": False}, True),
}


def setup(case: str):
    kind, opts, given = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    ref = getattr(torch.nn, kind)(D, H, **opts).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.5))
    cell = kind.endswith("Cell")
    lstm = kind.startswith("LSTM")
    if cell:
        ours = getattr(ml, kind)(H, **opts)
        ins = {"input": rng.standard_normal(D), "prev_hidden": rng.standard_normal(H)}
        if lstm:
            ins["prev_cell"] = rng.standard_normal(H)
        cots = {"output": rng.standard_normal(H), **({"cell": rng.standard_normal(H)} if lstm else {})}
        return ours, ref, ins, cots
    ours = getattr(ml, kind)(H, **opts, initial_states=given)
    k = opts.get("num_layers", 1) * (2 if opts.get("bidirectional") else 1)
    p = opts.get("proj_size", 0) or H
    ins = {"input": rng.standard_normal((T, D))}  # unbatched: (T, I), batch_first or not
    if given:
        ins["initial_hidden"] = rng.standard_normal((k, p))
        if lstm:
            ins["initial_cell"] = rng.standard_normal((k, H))
    cots = {"output": rng.standard_normal((T, p * (2 if opts.get("bidirectional") else 1))),
            "hidden": rng.standard_normal((k, p)), **({"cell": rng.standard_normal((k, H))} if lstm else {})}
    return ours, ref, ins, cots


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    ours, ref, ins, cots = setup(case)
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(ours, backend, shapes={k: v.shape for k, v in ins.items()},
                          trainable_keys=list(ins))
    params = ours.params_from_torch(ref.state_dict(), backend=backend)
    params.update({k: backend.array(v) for k, v in ins.items()})
    out, grads = compiled.evaluate(params, {}, output_gradients={k: backend.array(v) for k, v in cots.items()})
    back = {m: t for t, m in ours.torch_names().items()}
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{back.get(k, k)}": to_np(backend, v) for k, v in grads.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    _, ref, ins, cots = setup(case)
    kind = CASES[case][0]
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    x = leaves["input"]
    if kind.endswith("Cell"):
        if kind == "LSTMCell":
            h, c = ref(x, (leaves["prev_hidden"], leaves["prev_cell"]))
            outs = {"output": h, "cell": c}
        else:
            outs = {"output": ref(x, leaves["prev_hidden"])}
    else:
        states = None if "initial_hidden" not in leaves else leaves["initial_hidden"] \
            if kind != "LSTM" else (leaves["initial_hidden"], leaves["initial_cell"])
        o, hn = ref(x, states)
        outs = {"output": o, "hidden": hn} if kind != "LSTM" else {"output": o, "hidden": hn[0], "cell": hn[1]}
    assert outs["output"].ndim == ins["input"].ndim  # torch's output has no batch axis either
    return torch_results(outs, {**leaves, **dict(ref.named_parameters())}, cots)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch(case, backend_name):
    assert_arrays_within(run_mithril(case, backend_name), run_torch(case), TOL, f"{backend_name} {case}")


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_recurrent_unbatched_vs_torch", "CASES", "run_mithril",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch(case, jax_results):
    assert_arrays_within(jax_results.get(case, {}), run_torch(case), TOL, f"jax {case}")


def test_unbatched_is_the_batch_of_one_without_its_axis():
    """(T, I) and (T, 1, I) compile to two models of one block: the same numbers exactly."""
    block = ml.GRU(3, num_layers=2, bidirectional=True, initial_states=True)
    backend = ml.NumpyBackend(dtype="float64", seed=0)
    one = ml.compile(block, backend, shapes={"input": [4, 2], "initial_hidden": [4, 3]})
    many = ml.compile(block, backend, shapes={"input": [4, 1, 2], "initial_hidden": [4, 1, 3]})
    params = one.get_parameters()
    rng = np.random.default_rng(0)
    x, h0 = rng.standard_normal((4, 2)), rng.standard_normal((4, 3))
    a = one.evaluate(params, {"input": x, "initial_hidden": h0})
    b = many.evaluate(params, {"input": x[:, None], "initial_hidden": h0[:, None]})
    assert a["output"].shape == (4, 6) and a["hidden"].shape == (4, 3)
    np.testing.assert_array_equal(a["output"], b["output"][:, 0])
    np.testing.assert_array_equal(a["hidden"], b["hidden"][:, 0])


def test_numpy_bptt_matches_finite_differences(eps=1e-6):
    block = ml.LSTM(3, num_layers=2, bidirectional=True, proj_size=2, initial_states=True)
    shapes = {"input": (3, 2), "initial_hidden": (4, 2), "initial_cell": (4, 3)}
    compiled = ml.compile(block, ml.NumpyBackend(dtype="float64"), shapes=shapes, trainable_keys=list(shapes))
    rng = np.random.default_rng(2)
    params = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    cots = {k: rng.standard_normal(compiled.program.output_shape(k)) for k in compiled.output_keys}

    def loss(ps):
        out = compiled.evaluate(ps, {})
        return sum(float(np.sum(out[k] * cots[k])) for k in cots)

    _, grads = compiled.evaluate(params, {}, output_gradients=cots)
    for name, numeric in central_differences(loss, params, eps).items():
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("block, shapes, match", [
    (lambda: ml.LSTM(3, initial_states=True), {"input": [4, 2], "initial_hidden": [1, 1, 3]},
     r"LSTM: 'initial_hidden' must be \(1, 3\) \(num_layers · num_directions = 1\) for the "
     r"unbatched 'input' \[4, 2\], got shape \[1, 1, 3\]"),
    (lambda: ml.GRU(3, num_layers=2, initial_states=True), {"input": [4, 2], "initial_hidden": [1, 3]},
     r"GRU: 'initial_hidden' must be \(2, 3\) .* got shape \[1, 3\]"),
    (lambda: ml.RNN(3, initial_states=True), {"input": [4, 1, 2], "initial_hidden": [1, 3]},
     r"RNN: 'initial_hidden' must be \(N, 3\) per layer and direction"),
    (lambda: ml.GRUCell(3), {"input": [2], "prev_hidden": [1, 3]},
     r"GRUCell: 'prev_hidden' must be \(3,\) for the unbatched 'input' \[2\], got shape \[1, 3\]"),
    (lambda: ml.GRU(3, lengths=True), {"input": [4, 2], "lengths": [1]},
     r"GRU: 'lengths' needs a batched 'input' \(T, N, I\) .* got the unbatched shape \[4, 2\]"),
    (lambda: ml.LSTM(3), {"input": [4, 2, 2, 2]},
     r"LSTM: 'input' must be \(T, N, I\) or unbatched \(T, I\), got shape \[4, 2, 2, 2\]"),
    (lambda: ml.RNN(3, batch_first=True), {"input": [2]},
     r"RNN: 'input' must be \(N, T, I\) with batch_first, or unbatched \(T, I\), got shape \[2\]"),
])
def test_bad_shapes_are_named(block, shapes, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), ml.NumpyBackend(dtype="float64"), shapes=shapes)
