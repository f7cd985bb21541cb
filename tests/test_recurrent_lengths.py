"""Variable-length sequences: ``RNN`` / ``LSTM`` / ``GRU`` with ``lengths=True`` against
torch's ``pack_padded_sequence(x, lengths, enforce_sorted=False)`` → the module →
``pad_packed_sequence(total_length=T)``: one and two layers, one and two directions,
``batch_first``, no bias, zero and given initial states, lengths from 1 to T, a batch of one.
float64 at 1e-10 on NumPy, torch and JAX (JAX in a subprocess, x64): the padded output (zeros
past each sequence's end), h_n (c_n) at each sequence's own last step, and the gradients of the
input (zero at the padding), the initial states and every parameter. Then the NumPy BPTT
against finite differences, one ``lax.scan`` per layer and direction, and the named errors.
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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mithril as ml
from mithril.errors import InputValueError, ShapeError

TOL = 1e-10
T, D, H = 5, 3, 4
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": ml.RNN, "lstm": ml.LSTM, "gru": ml.GRU}
# case: (kind, lengths, options shared by both, initial states given)
CASES = {
    "rnn_relu": ("rnn", [5, 2, 1], {"nonlinearity": "relu"}, True),
    "rnn_l2_bi_batch_first": ("rnn", [3, 5], {"num_layers": 2, "bidirectional": True,
                                              "batch_first": True}, False),
    "lstm": ("lstm", [2, 5, 4], {}, True),
    "lstm_l2_bi": ("lstm", [5, 1, 3], {"num_layers": 2, "bidirectional": True}, True),
    "lstm_bi_batch_first_no_bias_zero_states": ("lstm", [4, 2], {"bidirectional": True,
                                                                 "batch_first": True, "bias": False}, False),
    "lstm_batch_of_one": ("lstm", [3], {"bidirectional": True}, False),
    "gru": ("gru", [1, 5, 3], {}, False),
    "gru_l2_bi_no_bias": ("gru", [2, 4, 5], {"num_layers": 2, "bidirectional": True, "bias": False}, True),
}


def setup(case: str):
    """(our block, torch's module with random float64 weights, inputs, lengths, cotangents)."""
    kind, lengths, opts, given = CASES[case]
    n = len(lengths)
    rng = np.random.default_rng(sum(map(ord, case)))
    ref = TORCH[kind](D, H, **opts).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.5))
    ours = OURS[kind](H, **opts, initial_states=given, lengths=True)
    k = opts.get("num_layers", 1) * (2 if opts.get("bidirectional") else 1)
    bf, w = opts.get("batch_first", False), H * (2 if opts.get("bidirectional") else 1)
    ins = {"input": rng.standard_normal((n, T, D) if bf else (T, n, D))}
    cots = {"output": rng.standard_normal((n, T, w) if bf else (T, n, w))}
    for s, out in zip(("initial_hidden", "initial_cell")[: 2 if kind == "lstm" else 1], ("hidden", "cell")):
        if given:
            ins[s] = rng.standard_normal((k, n, H))
        cots[out] = rng.standard_normal((k, n, H))
    return ours, ref, ins, np.array(lengths), cots


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    ours, ref, ins, lengths, cots = setup(case)
    assert ours.input_keys[:2] == ("input", "lengths")
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(ours, backend, shapes={**{k: v.shape for k, v in ins.items()},
                                                 "lengths": lengths.shape}, trainable_keys=list(ins))
    params = ours.params_from_torch(ref.state_dict(), backend=backend)
    params.update({k: backend.array(v) for k, v in ins.items()})
    out, grads = compiled.evaluate(params, {"lengths": backend.array(lengths)},
                                   output_gradients={k: backend.array(v) for k, v in cots.items()})
    back = {m: t for t, m in ours.torch_names().items()}
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{back.get(k, k)}": to_np(backend, v) for k, v in grads.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    _, ref, ins, lengths, cots = setup(case)
    bf = CASES[case][2].get("batch_first", False)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    packed = pack_padded_sequence(leaves["input"], torch.tensor(lengths), batch_first=bf,
                                  enforce_sorted=False)
    states = [leaves[k] for k in ("initial_hidden", "initial_cell") if k in leaves]
    args = (packed,) + ((tuple(states) if len(states) == 2 else states[0],) if states else ())
    o, s = ref(*args)
    o, _ = pad_packed_sequence(o, batch_first=bf, total_length=T)
    outs = {"output": o, **(dict(zip(("hidden", "cell"), s)) if isinstance(s, tuple) else {"hidden": s})}
    return torch_results(outs, {**leaves, **dict(ref.named_parameters())}, cots)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch_packed(case, backend_name):
    got, want = run_mithril(case, backend_name), run_torch(case)
    assert_arrays_within(got, want, TOL, f"{backend_name} {case}")
    lengths, bf = np.array(CASES[case][1]), CASES[case][2].get("batch_first", False)
    past = np.arange(T)[:, None] >= lengths  # (T, N): the padding
    out = got["out|output"].swapaxes(0, 1) if bf else got["out|output"]
    assert past.any() == (lengths.min() < T) and not out[past].any()  # zeros there, as torch


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_recurrent_lengths", "CASES", "run_mithril",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_jax_equals_torch_packed(case, jax_results):
    assert_arrays_within(jax_results.get(case, {}), run_torch(case), TOL, f"jax {case}")


def test_full_lengths_equal_no_lengths():
    """lengths all T: the block without lengths, exactly (the same graph, one more slot)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, 2, D))
    backend = ml.NumpyBackend(dtype="float64", seed=0)
    plain = ml.compile(ml.LSTM(H, bidirectional=True), backend, shapes={"input": x.shape})
    params = plain.get_parameters()
    masked = ml.compile(ml.LSTM(H, bidirectional=True, lengths=True), backend,
                        shapes={"input": x.shape, "lengths": [2]})
    a = plain.evaluate(params, {"input": x})
    b = masked.evaluate(params, {"input": x, "lengths": np.array([T, T])})
    for k in ("output", "hidden", "cell"):
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("make", [
    lambda: ml.RNN(2, bidirectional=True, initial_states=True, lengths=True),
    lambda: ml.LSTM(2, num_layers=2, bidirectional=True, initial_states=True, lengths=True),
    lambda: ml.GRU(2, bidirectional=True, batch_first=True, initial_states=True, lengths=True),
], ids=["rnn", "lstm", "gru_batch_first"])
def test_numpy_bptt_matches_finite_differences(make, eps=1e-6):
    block = make()
    k = 2 * (2 if isinstance(block, ml.LSTM) else 1)
    n, t = 3, 4
    shapes = {"input": (n, t, 2) if block.batch_first else (t, n, 2), "initial_hidden": (k, n, 2)}
    if isinstance(block, ml.LSTM):
        shapes["initial_cell"] = (k, n, 2)
    compiled = ml.compile(block, ml.NumpyBackend(dtype="float64"),
                          shapes={**shapes, "lengths": [n]}, trainable_keys=list(shapes))
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    data = {"lengths": np.array([4, 1, 3])}
    cots = {k: rng.standard_normal(compiled.program.output_shape(k)) for k in compiled.output_keys}

    def loss(ps):
        out = compiled.evaluate(ps, data)
        return sum(float(np.sum(out[k] * cots[k])) for k in cots)

    _, grads = compiled.evaluate(params, data, output_gradients=cots)
    for name, numeric in central_differences(loss, params, eps).items():
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_jax_loop_is_one_scan_per_layer_and_direction():
    jax = pytest.importorskip("jax")
    backend = ml.JaxBackend(dtype="float32")
    block = ml.GRU(3, num_layers=2, bidirectional=True, lengths=True)
    compiled = ml.compile(block, backend, shapes={"input": [9, 2, 4], "lengths": [2]})
    params = compiled.get_parameters()
    x, lengths = backend.randn(9, 2, 4), backend.array(np.array([9, 4]))
    jaxpr = str(jax.make_jaxpr(lambda p: compiled.evaluate(p, {"input": x, "lengths": lengths})["output"])(params))
    assert jaxpr.count("scan[") == 4


@pytest.mark.parametrize("lengths, match", [(np.array([0, 3]), r"sequence length 0 out of range.*\[1, 5\]"),
                                            (np.array([6, 3]), r"sequence length 6 out of range.*\[1, 5\]")])
def test_lengths_out_of_range_are_named_before_running(lengths, match):
    compiled = ml.compile(ml.LSTM(2, lengths=True), ml.NumpyBackend(dtype="float64", seed=0),
                          shapes={"input": [T, 2, 3]})
    params = compiled.get_parameters()
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises((InputValueError, ValueError), match=match):
        compiled.evaluate(params, {"input": np.ones((T, 2, 3)), "lengths": lengths})
    assert all(np.array_equal(before[k], params[k]) for k in params)


def test_lengths_of_another_batch_is_a_shape_error():
    with pytest.raises(ShapeError, match=r"'lengths' must be \(N,\), one length per sequence"):
        ml.compile(ml.GRU(2, lengths=True), ml.NumpyBackend(), shapes={"input": [T, 3, 2], "lengths": [4]})
