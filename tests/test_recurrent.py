"""Recurrent layers against ``torch.nn``: ``RNN`` / ``LSTM`` / ``GRU`` over 7 time steps and
the ``RNNCell`` / ``LSTMCell`` / ``GRUCell`` steps, float64, at 1e-10 on NumPy, JAX and torch:
every output, and the gradient of the input, of the initial states and of every weight and bias
(inputs and initial states are made trainable, so their gradients are the layer's input
cotangents). The sequences run both ways: by default (zero initial states, no state inputs)
against torch called without h0 / c0, and with ``initial_states=True`` against torch given
h0 / c0. JAX float64 runs in a subprocess. Then: the NumPy BPTT against central finite
differences, the JAX loop is one ``scan`` whatever the length, torch's initialisation, and
named errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    BACKENDS,
    assert_arrays_within,
    central_differences,
    jax_float64_results,
    selected_cases,
    to_np,
    torch_results,
)

import mithril as ml
from mithril.errors import KeyMismatchError, ShapeError

TOL = 1e-10
T, N, D, H = 7, 3, 4, 5  # steps, batch, input features, hidden
GIVEN = {"initial_states": True}  # the initial states as inputs, as torch given h0 / c0
SEQ = {  # case: (mithril factory, torch factory, batch_first)
    "rnn_tanh": (lambda: ml.RNN(H, **GIVEN), lambda: torch.nn.RNN(D, H), False),
    "rnn_relu_batch_first": (lambda: ml.RNN(H, batch_first=True, nonlinearity="relu", **GIVEN),
                             lambda: torch.nn.RNN(D, H, nonlinearity="relu", batch_first=True), True),
    "lstm": (lambda: ml.LSTM(H, **GIVEN), lambda: torch.nn.LSTM(D, H), False),
    "lstm_batch_first": (lambda: ml.LSTM(H, batch_first=True, **GIVEN),
                         lambda: torch.nn.LSTM(D, H, batch_first=True), True),
    "lstm_no_bias": (lambda: ml.LSTM(H, bias=False, **GIVEN), lambda: torch.nn.LSTM(D, H, bias=False), False),
    "gru": (lambda: ml.GRU(H, **GIVEN), lambda: torch.nn.GRU(D, H), False),
    "gru_batch_first": (lambda: ml.GRU(H, batch_first=True, **GIVEN),
                        lambda: torch.nn.GRU(D, H, batch_first=True), True),
    # the default: zero initial states, as torch without h0 / c0
    "rnn_relu_default_states": (lambda: ml.RNN(H, nonlinearity="relu"),
                                lambda: torch.nn.RNN(D, H, nonlinearity="relu"), False),
    "lstm_default_states_batch_first": (lambda: ml.LSTM(H, batch_first=True),
                                        lambda: torch.nn.LSTM(D, H, batch_first=True), True),
    "gru_default_states": (lambda: ml.GRU(H), lambda: torch.nn.GRU(D, H), False),
}
CELLS = {
    "rnn_cell": (lambda: ml.RNNCell(H), lambda: torch.nn.RNNCell(D, H)),
    "rnn_cell_relu": (lambda: ml.RNNCell(H, nonlinearity="relu"), lambda: torch.nn.RNNCell(D, H, nonlinearity="relu")),
    "lstm_cell": (lambda: ml.LSTMCell(H), lambda: torch.nn.LSTMCell(D, H)),
    "gru_cell": (lambda: ml.GRUCell(H), lambda: torch.nn.GRUCell(D, H)),
}
TORCH_PARAM = {"weight_ih": "weight_ih", "weight_hh": "weight_hh", "bias_ih": "bias_ih", "bias_hh": "bias_hh"}


def data(case: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, case)))
    if case in CELLS:
        vals = {"input": (N, D), "prev_hidden": (N, H), "prev_cell": (N, H)}
    else:
        vals = {"input": (N, T, D) if SEQ[case][2] else (T, N, D), "initial_hidden": (1, N, H),
                "initial_cell": (1, N, H)}
    out = {k: rng.standard_normal(s) for k, s in vals.items()}
    out.update({f"w|{k}": rng.standard_normal(s) * 0.5 for k, s in
                (("weight_ih", (4 * H, D)), ("weight_hh", (4 * H, H)), ("bias_ih", (4 * H,)), ("bias_hh", (4 * H,)))})
    out.update({f"cot|{k}": rng.standard_normal(s) for k, s in
                (("output", vals["input"][:-1] + (H,)), ("hidden", (1, N, H)), ("cell", (N, H) if case in CELLS else (1, N, H)))})
    return out


def gates(case: str) -> int:
    return 4 if "lstm" in case else 3 if "gru" in case else 1


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    d, g = data(case), gates(case)
    block = (CELLS[case] if case in CELLS else SEQ[case])[0]()
    backend = BACKENDS[backend_name](dtype="float64")
    state_keys = [k for k in block.input_keys if k != "input"]
    compiled = ml.compile(block, backend, shapes={k: d[k].shape for k in ("input", *state_keys)},
                          trainable_keys=["input", *state_keys])
    params = {}
    for name, shape in compiled.parameter_shapes.items():
        role = name.rsplit(".", 1)[-1]
        value = d[name] if name in d else d[f"w|{role}"][: g * H]
        assert value.shape == shape, (name, value.shape, shape)
        params[name] = backend.array(value)
    cots = {k: backend.array(d[f"cot|{k}"]) for k in compiled.output_keys}
    out, grads = compiled.evaluate(params, {}, output_gradients=cots)
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{k.rsplit('.', 1)[-1]}": to_np(backend, v) for k, v in grads.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    d, g = data(case), gates(case)
    ref = (CELLS[case] if case in CELLS else SEQ[case])[1]().double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.tensor(d[f"w|{name.removesuffix('_l0')}"][: g * H]))
    if case in CELLS:
        x, h = torch.tensor(d["input"], requires_grad=True), torch.tensor(d["prev_hidden"], requires_grad=True)
        leaves = {"input": x, "prev_hidden": h}
        if "lstm" in case:
            c = leaves["prev_cell"] = torch.tensor(d["prev_cell"], requires_grad=True)
            h2, c2 = ref(x, (h, c))
            outs = {"output": h2, "cell": c2}
        else:
            outs = {"output": ref(x, h)}
    elif "default_states" in case:  # torch's h0 = c0 = None: zeros
        x = torch.tensor(d["input"], requires_grad=True)
        leaves = {"input": x}
        if "lstm" in case:
            o, (hn, cn) = ref(x)
            outs = {"output": o, "hidden": hn, "cell": cn}
        else:
            o, hn = ref(x)
            outs = {"output": o, "hidden": hn}
    else:
        x, h = torch.tensor(d["input"], requires_grad=True), torch.tensor(d["initial_hidden"], requires_grad=True)
        leaves = {"input": x, "initial_hidden": h}
        if "lstm" in case:
            c = leaves["initial_cell"] = torch.tensor(d["initial_cell"], requires_grad=True)
            o, (hn, cn) = ref(x, (h, c))
            outs = {"output": o, "hidden": hn, "cell": cn}
        else:
            o, hn = ref(x, h)
            outs = {"output": o, "hidden": hn}
    named = {n.removesuffix("_l0"): p for n, p in ref.named_parameters()}
    return torch_results(outs, {**leaves, **named}, {k: d[f"cot|{k}"] for k in outs})


def compare(case: str, got: dict[str, np.ndarray], what: str) -> None:
    assert_arrays_within(got, run_torch(case), TOL, f"{what} {case}")


ALL = [*SEQ, *CELLS]


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", ALL)
def test_equals_torch(case, backend_name):
    compare(case, run_mithril(case, backend_name), backend_name)


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_recurrent", "ALL", "run_mithril",
        only=selected_cases(request, "case", list(ALL)))


#: JAX by default: each kind, ReLU, batch_first, given and zero states, a cell (each case a
#: compile in the JAX interpreter); the rest under -m slow
JAX_QUICK = ("rnn_relu_batch_first", "lstm", "gru_default_states", "lstm_cell")


@pytest.mark.parametrize("case", [c if c in JAX_QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in ALL])
def test_jax_equals_torch(case, jax_results):
    compare(case, jax_results.get(case, {}), "jax")


@pytest.mark.parametrize("make, states", [
    (lambda **o: ml.RNN(H, **o), ["initial_hidden"]),
    (lambda **o: ml.LSTM(H, batch_first=True, **o), ["initial_hidden", "initial_cell"]),
    (lambda **o: ml.GRU(H, **o), ["initial_hidden"]),
], ids=["rnn", "lstm", "gru"])
def test_initial_states_are_zero_by_default(make, states):
    """By default a sequence block has no state inputs (torch's h0 = c0 = None);
    ``initial_states=True`` adds them, ``initial_states=False`` is the default."""
    assert make().input_keys == ("input",)
    assert make(initial_states=False).input_keys == ("input",)
    assert make(initial_states=True).input_keys == ("input", *states)
    assert make().initial_states is False


@pytest.mark.parametrize("make", [lambda: ml.RNN(H), lambda: ml.LSTM(H), lambda: ml.GRU(H, num_layers=2)],
                         ids=["rnn", "lstm", "gru_l2"])
def test_connecting_a_state_to_the_default_block_says_how(make):
    model = ml.Model()
    with pytest.raises(KeyMismatchError, match=r"no terminal\(s\) \['initial_hidden'\]: its initial "
                                                r"states are zero by default.*initial_states=True"):
        model |= make()(input="x", initial_hidden="h0")
    assert not model.blocks


@pytest.mark.parametrize("make", [lambda: ml.RNN(2, nonlinearity="tanh", initial_states=True),
                                  lambda: ml.RNN(2, nonlinearity="relu"),
                                  lambda: ml.LSTM(2, initial_states=True), lambda: ml.LSTM(2),
                                  lambda: ml.GRU(2, batch_first=True, initial_states=True)],
                         ids=["rnn", "rnn_relu_zero_states", "lstm", "lstm_zero_states", "gru"])
def test_numpy_bptt_matches_finite_differences(make, eps=1e-6):
    block = make()
    backend = ml.NumpyBackend(dtype="float64")
    states = [k for k in block.input_keys if k != "input"]
    shapes = {"input": (2, 3, 3) if block.batch_first else (3, 2, 3), **{k: (1, 2, 2) for k in states}}
    compiled = ml.compile(block, backend, shapes=shapes, trainable_keys=["input", *states])
    rng = np.random.default_rng(1)
    params = {k: rng.standard_normal(s) for k, s in compiled.parameter_shapes.items()}
    cots = {k: rng.standard_normal(compiled.program.output_shape(k)) for k in compiled.output_keys}
    _, grads = compiled.evaluate(params, {}, output_gradients=cots)

    def f(p):
        out = compiled.evaluate(p, {})
        return sum(float((out[k] * cots[k]).sum()) for k in cots)

    for name, fd in central_differences(f, params, eps).items():
        assert np.abs(grads[name] - fd).max() < 1e-7, name


def test_jax_loop_is_one_scan_whatever_the_length():
    import jax

    sizes = {}
    for steps in (7, 70):
        backend = ml.JaxBackend()
        compiled = ml.compile(ml.LSTM(4, initial_states=True), backend, jit=False,
                              shapes={"input": [steps, 2, 3], "initial_hidden": [1, 2, 4], "initial_cell": [1, 2, 4]})
        params = compiled.get_parameters()
        inputs = {"input": backend.randn(steps, 2, 3), "initial_hidden": backend.zeros(1, 2, 4),
                  "initial_cell": backend.zeros(1, 2, 4)}
        ev = compiled._eval
        jaxpr = jax.make_jaxpr(lambda p, x, ev=ev: ev._fwd(p, x))(tuple(params[k] for k in ev.names), inputs)
        text = str(jaxpr)
        assert text.count("scan[") == 1
        sizes[steps] = len(jaxpr.jaxpr.eqns)
    assert sizes[7] == sizes[70]


def test_init_is_torchs():
    backend = ml.NumpyBackend(dtype="float64", seed=0)
    compiled = ml.compile(ml.GRU(16), backend, shapes={"input": [5, 64, 8]})
    params = compiled.get_parameters()
    assert {k: v.shape for k, v in params.items()} == {
        "recurrence.weight_ih": (48, 8), "recurrence.weight_hh": (48, 16),
        "recurrence.bias_ih": (48,), "recurrence.bias_hh": (48,)}
    bound = 1 / np.sqrt(16)
    for v in params.values():  # U(-1/sqrt(H), 1/sqrt(H)): bounds and variance bound²/3
        assert np.abs(v).max() <= bound
    allw = np.concatenate([v.ravel() for v in params.values()])
    assert abs(allw.var() - bound ** 2 / 3) < 0.15 * bound ** 2 / 3
    ref = torch.nn.GRU(8, 16)
    assert {n.removesuffix("_l0"): tuple(p.shape) for n, p in ref.named_parameters()} == \
        {k.rsplit(".", 1)[1]: v.shape for k, v in params.items()}


def test_lstm_cell_unrolled_equals_lstm():
    """Seven LSTMCell steps, each its own block sharing nothing, from zero states, give the
    states of LSTM (zero initial states by default) when given the same weights."""
    backend = ml.NumpyBackend(dtype="float64")
    rng = np.random.default_rng(2)
    seq = ml.compile(ml.LSTM(3), backend, shapes={"input": [7, 2, 4]})
    weights = {k: rng.standard_normal(s) for k, s in seq.parameter_shapes.items()}
    x, h, c = rng.standard_normal((7, 2, 4)), np.zeros((2, 3)), np.zeros((2, 3))
    out = seq.evaluate(weights, {"input": x})
    cell = ml.compile(ml.LSTMCell(3), backend, shapes={"input": [2, 4], "prev_hidden": [2, 3], "prev_cell": [2, 3]})
    for t in range(7):
        step = cell.evaluate(weights, {"input": x[t], "prev_hidden": h, "prev_cell": c})
        h, c = step["output"], step["cell"]
        assert np.allclose(h, out["output"][t], atol=1e-14)
    assert np.allclose(c, out["cell"][0], atol=1e-14)


@pytest.mark.parametrize("make, match", [
    (lambda: ml.LSTM(0), "hidden_size must be a positive int"),
    (lambda: ml.GRUCell(2.5), "hidden_size must be a positive int"),
    (lambda: ml.RNN(3, nonlinearity="sigmoid"), "nonlinearity must be 'tanh' or 'relu'"),
])
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("block, shapes, match", [
    (lambda: ml.LSTM(3), {"input": [7, 2, 2, 2]}, r"'input' must be \(T, N, I\) or unbatched"),
    (lambda: ml.LSTM(3, initial_states=True), {"input": [7, 2], "initial_hidden": [1, 2, 3]},
     r"'initial_hidden' must be \(1, 3\) .* for the unbatched 'input' \[7, 2\]"),
    (lambda: ml.GRU(3, initial_states=True), {"input": [7, 2, 4], "initial_hidden": [1, 2, 4]},
     r"'initial_hidden' must be \(N, 3\) .*got shape \[1, 2, 4\]"),
    (lambda: ml.LSTM(3, initial_states=True), {"input": [7, 2, 4], "initial_cell": [1, 3, 3]},
     r"'initial_cell' must be \(N, 3\) .*with N = 2 the batch of 'input' \(\[7, 2, 4\] in time-major .*got shape \[1, 3, 3\]"),
    (lambda: ml.GRUCell(3), {"input": [5, 4], "prev_hidden": [2, 3]},
     r"'prev_hidden' must be \(N, 3\) with N the batch"),
])
def test_bad_shapes_are_named(block, shapes, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), ml.NumpyBackend(), shapes=shapes)
