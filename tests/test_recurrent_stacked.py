"""Stacked and bidirectional ``RNN`` / ``LSTM`` / ``GRU`` against ``torch.nn`` (issue #17):
``num_layers=2``, one and two directions, ``batch_first``, no bias, 7 time steps in float64
at 1e-10 on NumPy, torch and JAX (JAX in a subprocess, x64): the outputs, h_n (c_n), and the
gradients of the input, the initial states and every parameter. Initial states both ways: the
default (zero states, no state inputs) against torch called without h0 / c0, and
``initial_states=True`` against torch given h0 / c0.
The weights are torch's, loaded with ``params_from_torch``. Then: the NumPy BPTT against
central finite differences (with dropout too), one ``lax.scan`` per layer and direction on
JAX whatever the length, dropout between layers against torch with the same mask, torch's
names and initialisation, and named errors before anything runs.
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
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": ml.RNN, "lstm": ml.LSTM, "gru": ml.GRU}
CASES = {  # case: (kind, options shared by both, initial states given; False: the default)
    "rnn_l2": ("rnn", {"num_layers": 2}, True),
    "rnn_l2_bi_relu": ("rnn", {"num_layers": 2, "bidirectional": True, "nonlinearity": "relu"}, True),
    "lstm_l2": ("lstm", {"num_layers": 2}, True),
    "lstm_l2_bi": ("lstm", {"num_layers": 2, "bidirectional": True}, True),
    "lstm_l2_bi_batch_first": ("lstm", {"num_layers": 2, "bidirectional": True, "batch_first": True}, True),
    "lstm_l2_bi_no_bias": ("lstm", {"num_layers": 2, "bidirectional": True, "bias": False}, True),
    "lstm_l1_bi": ("lstm", {"bidirectional": True}, True),
    "lstm_l2_bi_zero_states": ("lstm", {"num_layers": 2, "bidirectional": True}, False),
    "lstm_l2_bi_batch_first_zero_states": ("lstm", {"num_layers": 2, "bidirectional": True,
                                                    "batch_first": True}, False),
    "gru_l2": ("gru", {"num_layers": 2}, True),
    "gru_l2_bi": ("gru", {"num_layers": 2, "bidirectional": True}, True),
    "gru_l3_bi_batch_first_zero_states": ("gru", {"num_layers": 3, "bidirectional": True,
                                                  "batch_first": True}, False),
    "rnn_l2_bi_batch_first_zero_states": ("rnn", {"num_layers": 2, "bidirectional": True,
                                                  "batch_first": True}, False),
}


def make(case: str):
    """(our block, torch's module in float64 with random weights) of ``case``: with the
    initial states as inputs (``initial_states=True``) or the default, zero states."""
    kind, opts, given = CASES[case]
    ours = OURS[kind](H, **opts, **({"initial_states": True} if given else {}), input_size=D)
    assert ours.input_keys == (("input", "initial_hidden", *(("initial_cell",) if kind == "lstm" else ()))
                               if given else ("input",))
    torch.manual_seed(0)
    ref = TORCH[kind](D, H, **opts).double()
    rng = np.random.default_rng(sum(map(ord, case)))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * 0.5))
    return ours, ref


def data(case: str) -> dict[str, np.ndarray]:
    kind, opts, given = CASES[case]
    k = opts.get("num_layers", 1) * (2 if opts.get("bidirectional") else 1)
    bf = opts.get("batch_first", False)
    rng = np.random.default_rng(100 + sum(map(ord, case)))
    out = {"input": rng.standard_normal((N, T, D) if bf else (T, N, D))}
    if given:
        out["initial_hidden"] = rng.standard_normal((k, N, H))
        if kind == "lstm":
            out["initial_cell"] = rng.standard_normal((k, N, H))
    width = H * (2 if opts.get("bidirectional") else 1)
    out["cot|output"] = rng.standard_normal((N, T, width) if bf else (T, N, width))
    out["cot|hidden"] = rng.standard_normal((k, N, H))
    if kind == "lstm":
        out["cot|cell"] = rng.standard_normal((k, N, H))
    return out


def run_mithril(case: str, backend_name: str) -> dict[str, np.ndarray]:
    d = data(case)
    block, ref = make(case)
    backend = BACKENDS[backend_name](dtype="float64")
    names = block.torch_names()
    params = block.params_from_torch(ref.state_dict(), backend=backend)
    states = [k for k in d if k.startswith("initial_")]
    compiled = ml.compile(block, backend, shapes={k: d[k].shape for k in ("input", *states)},
                          trainable_keys=["input", *states])
    assert set(params) == set(names.values())
    params.update({k: backend.array(d[k]) for k in ("input", *states)})  # trainable inputs
    assert set(compiled.parameter_shapes) == set(params)
    cots = {k: backend.array(d[f"cot|{k}"]) for k in compiled.output_keys}
    out, grads = compiled.evaluate(params, {}, output_gradients=cots)
    back = {m: t for t, m in names.items()}
    res = {f"out|{k}": to_np(backend, v) for k, v in out.items()}
    res.update({f"grad|{back.get(k, k)}": to_np(backend, v) for k, v in grads.items()})
    return res


def run_torch(case: str) -> dict[str, np.ndarray]:
    d = data(case)
    kind = CASES[case][0]
    _, ref = make(case)
    x = torch.tensor(d["input"], requires_grad=True)
    leaves = {"input": x}
    for k in ("initial_hidden", "initial_cell"):
        if k in d:
            leaves[k] = torch.tensor(d[k], requires_grad=True)
    if kind == "lstm":
        o, (hn, cn) = ref(x, (leaves["initial_hidden"], leaves["initial_cell"])) \
            if "initial_hidden" in leaves else ref(x)
        outs = {"output": o, "hidden": hn, "cell": cn}
    else:
        o, hn = ref(x, leaves["initial_hidden"]) if "initial_hidden" in leaves else ref(x)
        outs = {"output": o, "hidden": hn}
    return torch_results(outs, {**leaves, **dict(ref.named_parameters())}, {k: d[f"cot|{k}"] for k in outs})


def compare(case: str, got: dict[str, np.ndarray], what: str) -> float:
    return assert_arrays_within(got, run_torch(case), TOL, f"{what} {case}")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch(case, backend_name):
    compare(case, run_mithril(case, backend_name), backend_name)


@pytest.fixture(scope="module")
def jax_results(request):
    return jax_float64_results("test_recurrent_stacked", "CASES", "run_mithril",
        only=selected_cases(request, "case", list(CASES)))


#: JAX by default: each kind, one and two directions, ReLU, no bias, batch_first, three layers,
#: given and zero states (each case a compile in the JAX interpreter); the rest under -m slow
JAX_QUICK = ("rnn_l2_bi_relu", "lstm_l2_bi_no_bias", "gru_l3_bi_batch_first_zero_states")


@pytest.mark.parametrize("case", [c if c in JAX_QUICK else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_jax_equals_torch(case, jax_results):
    compare(case, jax_results.get(case, {}), "jax")


# -- NumPy BPTT against central finite differences ------------------------------------------------
@pytest.mark.parametrize("block, given", [
    (lambda: ml.RNN(2, num_layers=2, bidirectional=True, initial_states=True), True),
    (lambda: ml.LSTM(2, num_layers=2, bidirectional=True, initial_states=True), True),
    (lambda: ml.GRU(2, num_layers=2, bidirectional=True, batch_first=True, initial_states=True), True),
    (lambda: ml.LSTM(2, num_layers=2, bidirectional=True), False),
    (lambda: ml.GRU(2, num_layers=2, dropout=0.5, initial_states=True), True),
], ids=["rnn", "lstm", "gru_batch_first", "lstm_zero_states", "gru_dropout"])
def test_numpy_bptt_matches_finite_differences(block, given, eps=1e-6):
    block = block()
    backend = ml.NumpyBackend(dtype="float64", seed=3)
    k = block.num_layers * block.num_directions
    states = [s for s in block.input_keys if s != "input"]
    assert bool(states) == given
    shapes = {"input": (2, 3, 3) if block.batch_first else (3, 2, 3), **{s: (k, 2, 2) for s in states}}
    compiled = ml.compile(block, backend, shapes=shapes, trainable_keys=["input", *states])
    rng = np.random.default_rng(1)
    params = {n: rng.standard_normal(s) for n, s in compiled.parameter_shapes.items()}
    cots = {n: rng.standard_normal(compiled.program.output_shape(n)) for n in compiled.output_keys}
    _, grads = compiled.evaluate(params, {}, output_gradients=cots, training=True, step=0)

    def f(p):
        out = compiled.evaluate(p, {}, training=True, step=0)
        return sum(float((out[n] * cots[n]).sum()) for n in cots)

    for name, fd in central_differences(f, params, eps).items():
        assert np.abs(grads[name] - fd).max() < 1e-7, name


# -- JAX: one scan per layer and direction ---------------------------------------------------------
def test_jax_loop_is_one_scan_per_layer_and_direction():
    import jax

    sizes = {}
    for steps in (7, 70):
        backend = ml.JaxBackend()
        compiled = ml.compile(ml.LSTM(4, num_layers=2, bidirectional=True),
                              backend, jit=False, shapes={"input": [steps, 2, 3]})
        params = compiled.get_parameters()
        ev = compiled._eval
        jaxpr = jax.make_jaxpr(lambda p, x, ev=ev: ev._fwd(p, x))(
            tuple(params[k] for k in ev.names), {"input": backend.randn(steps, 2, 3)})
        assert str(jaxpr).count("scan[") == 4
        sizes[steps] = len(jaxpr.jaxpr.eqns)
    assert sizes[7] == sizes[70]


# -- dropout between layers -------------------------------------------------------------------------
def test_dropout_between_layers_is_torchs_with_the_same_mask():
    """Training mode: layer 2 reads layer 1's output times the Dropout mask (the mask of a
    Dropout block at the same path, seed and step); inference mode: no dropout. Checked
    against two torch layers, on NumPy and torch."""
    p, seed, step = 0.4, 5, 3
    torch.manual_seed(1)
    ref = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, dropout=p).double()
    sd = ref.state_dict()
    l0 = torch.nn.LSTM(D, H, bidirectional=True).double()
    l1 = torch.nn.LSTM(2 * H, H, bidirectional=True).double()
    with torch.no_grad():
        for layer, m in ((0, l0), (1, l1)):
            for name, q in m.named_parameters():
                q.copy_(sd[name.replace("_l0", f"_l{layer}")])
    x = np.random.default_rng(4).standard_normal((T, N, D))
    for name, cls in (("numpy", ml.NumpyBackend), ("torch", ml.TorchBackend)):
        backend = cls(dtype="float64", seed=seed)
        block = ml.LSTM(H, num_layers=2, bidirectional=True, dropout=p)
        compiled = ml.compile(block, backend, shapes={"input": [T, N, D]})
        assert [n.path for n in compiled.program.nodes if type(n.op).__name__ == "Dropout"] == ["dropout"]
        params = block.params_from_torch(sd, backend=backend)
        drop = ml.compile(ml.Dropout(p), backend)
        mask = to_np(backend, drop.evaluate({}, {"input": backend.ones(T, N, 2 * H)}, step=step)["output"])
        assert 0 < (mask == 0).mean() < 1
        with torch.no_grad():
            o1, _ = l0(torch.tensor(x))
            o2, (h2, c2) = l1(o1 * torch.tensor(mask))
            _, (h1, c1) = l0(torch.tensor(x))
            want_train = {"output": o2, "hidden": torch.cat([h1, h2]), "cell": torch.cat([c1, c2])}
            o, (h, c) = ref.eval()(torch.tensor(x))
            want_eval = {"output": o, "hidden": h, "cell": c}
        for training, want in ((True, want_train), (False, want_eval)):
            got = compiled.evaluate(params, {"input": backend.array(x)}, training=training, step=step)
            for k, v in want.items():
                err = np.abs(to_np(backend, got[k]) - v.numpy()).max()
                assert err <= TOL, (name, training, k, err)


# -- torch's names, initialisation and initial states -----------------------------------------------
def test_names_and_init_are_torchs():
    backend = ml.NumpyBackend(dtype="float64", seed=0)
    block = ml.GRU(16, num_layers=2, bidirectional=True)
    compiled = ml.compile(block, backend, shapes={"input": [5, 64, 8]})
    params = compiled.get_parameters()
    ref = torch.nn.GRU(8, 16, num_layers=2, bidirectional=True)
    names = block.torch_names()
    assert names["weight_ih_l0"] == "l0.weight_ih" and names["bias_hh_l1_reverse"] == "l1_reverse.bias_hh"
    assert {names[k]: tuple(v.shape) for k, v in ref.state_dict().items()} == \
        {k: v.shape for k, v in params.items()}
    assert block.torch_names("gru.")["weight_hh_l1_reverse"] == "gru.l1_reverse.weight_hh"
    bound = 1 / np.sqrt(16)
    allw = np.concatenate([v.ravel() for v in params.values()])
    assert np.abs(allw).max() <= bound
    assert abs(allw.var() - bound ** 2 / 3) < 0.1 * bound ** 2 / 3
    # one layer, one direction: the names of before, mapped to torch's *_l0
    assert ml.LSTM(3).torch_names("lstm.") == {
        "weight_ih_l0": "lstm.recurrence.weight_ih", "weight_hh_l0": "lstm.recurrence.weight_hh",
        "bias_ih_l0": "lstm.recurrence.bias_ih", "bias_hh_l0": "lstm.recurrence.bias_hh"}
    assert ml.GRUCell(3, bias=False).torch_names() == {
        "weight_ih": "recurrence.weight_ih", "weight_hh": "recurrence.weight_hh"}


def test_nested_block_loads_torch_weights():
    """An LSTM inside a model: its parameters are prefixed by its path."""
    torch.manual_seed(2)
    ref = torch.nn.LSTM(D, H, num_layers=2, batch_first=True).double()
    head = torch.nn.Linear(H, 2).double()
    model = ml.Model()
    lstm = ml.LSTM(H, num_layers=2, batch_first=True)
    model |= lstm(input="x", hidden="h")
    model |= ml.Indexer(-1)(input="h", output="last")
    model |= ml.Linear(2)(input="last", output="y")
    backend = ml.TorchBackend(dtype="float64")
    compiled = ml.compile(model, backend, shapes={"x": [N, T, D]})
    params = {**lstm.params_from_torch(ref.state_dict(), prefix="lstm.", backend=backend),
              "linear.weight": backend.array(head.weight.detach().numpy()),
              "linear.bias": backend.array(head.bias.detach().numpy())}
    assert set(params) == set(compiled.parameter_shapes)
    x = np.random.default_rng(0).standard_normal((N, T, D))
    got = to_np(backend, compiled.evaluate(params, {"x": backend.array(x)})["y"])
    with torch.no_grad():
        want = head(ref(torch.tensor(x))[1][0][-1]).numpy()
    assert np.abs(got - want).max() <= TOL


def test_train_model_sees_every_layers_parameters():
    """The per-layer parameters are ordinary parameters: a TrainModel lists them and a
    regularizer picks them by pattern; the summary counts them per layer."""
    import re

    model = ml.Model()
    model |= ml.LSTM(3, num_layers=2, bidirectional=True)(input="input", hidden="h")
    model |= ml.Sum()(input="h", output="s")
    tm = ml.TrainModel(model)
    assert [n for n in tm.parameter_names if "weight_hh" in n] == [
        "lstm.l0.weight_hh", "lstm.l0_reverse.weight_hh", "lstm.l1.weight_hh", "lstm.l1_reverse.weight_hh"]
    tm.add_loss(ml.SquaredError(), input="s", target="target")
    tm.add_regularization(ml.L2(), coef=0.5, input=re.compile(r"weight_hh"))
    backend = ml.NumpyBackend(dtype="float64", seed=0)
    compiled = ml.compile(tm, backend, shapes={"input": [4, 2, 2], "target": []})
    params = compiled.get_parameters()
    x = backend.randn(4, 2, 2)
    _, grads = compiled.evaluate(params, {"input": x, "target": np.zeros(())}, output_gradients=True)
    plain = ml.compile(model, backend, shapes={"input": [4, 2, 2]})
    out, g0 = plain.evaluate(params, {"input": x}, output_gradients={"s": np.ones(())})
    for name in params:  # the loss (s − 0)² gives 2s·ds/dp; the L2 term adds c·W to weight_hh only
        extra = grads[name] - 2 * out["s"] * g0[name]
        if "weight_hh" in name:
            assert np.abs(extra).max() > 0 and np.allclose(extra / params[name], (extra / params[name]).flat[0])
        else:
            assert np.abs(extra).max() < 1e-12, name
    text = compiled.summary(print_fn=None)
    assert re.search(r"lstm\.l1_reverse \(L1Reverse\)\s+\[2, 4, 2, 3\]\s+132", text), text


# every kind on NumPy and torch; JAX (three compiles a case) by default with the LSTM's two states
@pytest.mark.parametrize("kind, backend_name", [
    (k, b) if b != "jax" or k == "lstm" else pytest.param(k, b, marks=pytest.mark.slow)
    for k in ("rnn", "lstm", "gru") for b in ("numpy", "torch", "jax")])
def test_default_zero_states_equal_explicit_zeros(kind, backend_name):
    """The default (and ``initial_states=False``) gives what ``initial_states=True`` gives
    with zeros, outputs and parameter gradients, with a batch free until ``evaluate``."""
    backend = BACKENDS[backend_name](dtype="float32" if backend_name == "jax" else "float64", seed=0)
    shapes = {"input": [None, 4, 3]}
    made = [OURS[kind](3, num_layers=2, bidirectional=True, batch_first=True, **o)
            for o in ({}, {"initial_states": False}, {"initial_states": True})]
    assert made[0].input_keys == made[1].input_keys == ("input",)
    a, b, c = (ml.compile(m, backend, shapes=shapes) for m in made)
    params = a.get_parameters()
    assert set(params) == set(b.parameter_shapes) == set(c.parameter_shapes)
    x = backend.randn(2, 4, 3)
    zeros = {k: backend.zeros(4, 2, 3) for k in c.input_keys if k != "input"}
    assert sorted(zeros) == (["initial_cell", "initial_hidden"] if kind == "lstm" else ["initial_hidden"])
    rng = np.random.default_rng(7)
    cots = {k: backend.array(rng.standard_normal((2, 4, 6) if k == "output" else (4, 2, 3)))
            for k in c.output_keys}
    runs = [m.evaluate(params, {"input": x, **z}, output_gradients=cots)
            for m, z in ((a, {}), (b, {}), (c, zeros))]
    for out, grads in runs[1:]:
        assert out.keys() == runs[0][0].keys() and grads.keys() == runs[0][1].keys()
        for k in out:
            assert np.array_equal(to_np(backend, out[k]), to_np(backend, runs[0][0][k])), k
        for k in grads:
            assert np.array_equal(to_np(backend, grads[k]), to_np(backend, runs[0][1][k])), k


# -- named errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_block, error, match", [
    (lambda: ml.LSTM(3, num_layers=0), ValueError, "LSTM: num_layers must be a positive int"),
    (lambda: ml.GRU(3, num_layers=1.5), ValueError, "GRU: num_layers must be a positive int"),
    (lambda: ml.RNN(3, num_layers=True), ValueError, "RNN: num_layers must be a positive int"),
    (lambda: ml.LSTM(3, num_layers=2, dropout=1.5), ValueError, r"LSTM: dropout must be a probability"),
    (lambda: ml.LSTM(3, input_size=0), ValueError, "LSTM: input_size must be a positive int"),
])
def test_bad_arguments_are_named(make_block, error, match):
    with pytest.raises(error, match=match):
        make_block()


def test_dropout_with_one_layer_warns_as_torch():
    with pytest.warns(UserWarning, match="num_layers=1"):
        ml.GRU(3, dropout=0.5)


@pytest.mark.parametrize("block, shapes, match", [
    (lambda: ml.LSTM(5, num_layers=2, bidirectional=True, input_size=4),
     {"input": [7, 3, 6]}, r"'input' must have input_size = 4 features"),
    (lambda: ml.LSTM(5, num_layers=2, bidirectional=True, initial_states=True),
     {"input": [7, 3, 4], "initial_hidden": [2, 3, 5]},
     r"'initial_hidden' must be \(N, 5\) per layer and direction, \(4, N, 5\) .*got shape \[2, 3, 5\]"),
    (lambda: ml.GRU(5, num_layers=2, initial_states=True),
     {"input": [7, 3, 4], "initial_hidden": [2, 4, 5]},
     r"'initial_hidden' must be .* with N = 3 the batch of 'input' \(\[7, 3, 4\] in time-major .*got shape \[2, 4, 5\]"),
    (lambda: ml.LSTM(5, num_layers=2, initial_states=True),
     {"input": [7, 3, 4], "initial_hidden": [2, 3, 5], "initial_cell": [2, 3, 6]},
     r"'initial_cell' must be \(N, 5\) .*got shape \[2, 3, 6\]"),
    (lambda: ml.RNN(5, num_layers=3, bidirectional=True, batch_first=True, initial_states=True),
     {"input": [3, 7, 4], "initial_hidden": [6, 3]}, r"'initial_hidden' must be \(N, 5\) per layer"),
])
def test_bad_shapes_are_named_at_compile(block, shapes, match):
    with pytest.raises(ShapeError, match=match):
        ml.compile(block(), ml.NumpyBackend(), shapes=shapes)


def test_states_given_to_the_default_block_are_named():
    """The default block has no state inputs: states given anyway are named, at compile time
    and at evaluate."""
    with pytest.raises(KeyMismatchError, match=r"compile\(shapes=...\): model has no terminal 'initial_hidden'"):
        ml.compile(ml.LSTM(5, num_layers=2), ml.NumpyBackend(),
                   shapes={"input": [7, 3, 4], "initial_hidden": [2, 3, 5]})
    compiled = ml.compile(ml.GRU(5, num_layers=2), ml.NumpyBackend(), shapes={"input": [7, 3, 4]})
    with pytest.raises(KeyMismatchError, match=r"unknown key\(s\) \['initial_hidden'\]"):
        compiled.evaluate(compiled.get_parameters(),
                          {"input": np.zeros((7, 3, 4)), "initial_hidden": np.zeros((2, 3, 5))})


def test_bad_shapes_are_named_before_running():
    """Free batch dimensions bound at evaluate: a mismatch is a ShapeError before anything
    runs (the dropout step counter does not move); a wrong feature size too."""
    backend = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(ml.LSTM(5, num_layers=2, bidirectional=True, dropout=0.5,
                                  initial_states=True), backend,
                          shapes={"input": [7, None, 4], "initial_hidden": [4, None, 5],
                                  "initial_cell": [4, None, 5]})
    params = compiled.get_parameters()
    good = {"input": np.zeros((7, 3, 4)), "initial_hidden": np.zeros((4, 3, 5)),
            "initial_cell": np.zeros((4, 3, 5))}
    for key, shape, match in (("initial_hidden", (4, 2, 5), r"'initial_hidden' must be \(N, 5\) per layer .* batch"),
                              ("initial_cell", (4, 3, 4), r"expected shape \[4, None, 5\]"),
                              ("input", (7, 3, 5), r"expected shape \[7, None, 4\]")):
        with pytest.raises(ShapeError, match=match):
            compiled.evaluate(params, {**good, key: np.zeros(shape)})
        assert compiled.step == 0
    compiled.evaluate(params, good)
    assert compiled.step == 1


def test_params_from_torch_checks_the_state_dict():
    block = ml.LSTM(5, num_layers=2, bidirectional=True, input_size=4)
    with pytest.raises(KeyMismatchError, match=r"missing key\(s\) \[.*'weight_ih_l1_reverse'"):
        block.params_from_torch(torch.nn.LSTM(4, 5, num_layers=2).state_dict())
    with pytest.raises(KeyMismatchError, match=r"unexpected key\(s\) \['bias_hh_l2'"):
        block.params_from_torch(torch.nn.LSTM(4, 5, num_layers=3, bidirectional=True).state_dict())
    with pytest.raises(ShapeError, match=r"'weight_ih_l0' must have shape \[20, 4\], got \[24, 4\]"):
        block.params_from_torch(torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True).state_dict())
    with pytest.raises(ShapeError, match=r"'weight_ih_l0' must have shape \[20, 4\], got \[20, 3\]"):
        block.params_from_torch(torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True).state_dict())
    with pytest.raises(ShapeError, match=r"'weight_ih_l0' must have shape \[12, None\]"):
        ml.GRU(4).params_from_torch(torch.nn.LSTM(3, 4).state_dict())
