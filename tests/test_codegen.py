"""The NumPy backend's generated pass (``mithril.compiler.codegen``) against the interpreter it
replaces (``run_forward`` + ``numpy_backward``): the same outputs, gradients and new state,
bit for bit, on models that exercise every path of the generator: residuals, in-place
forwards and VJPs, one wire under two keys of one operator, a parameter shared by two
operators, a trainable input, cotangents for some outputs only, a parameter no cotangent
reaches, context operators with randomness and state. And a traceback through the generated
function shows its line."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
from conftest import conv_relu_pool_model

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.compiler.codegen import forward_plan, forward_vjp_plan
from mithril.compiler.interpret import numpy_backward, outputs_of, run_forward
from mithril.models.context import RunContext


def _reference(compiled, params, data, cots, run_args=None):
    """The interpreter's outputs, gradients and new state on the checked inputs."""
    ps, ins, prog, _ = compiled._prepare(params, data, partial=False)
    run = RunContext(*run_args) if run_args else None
    env = run_forward(prog, np, ps, ins, run, residuals=True)
    grads = numpy_backward(prog, env, ps, cots)
    return outputs_of(prog, env), grads, (run.new_state if run else {})


def _generated(compiled, params, data, cots, run_args=None):
    ps, ins, prog, _ = compiled._prepare(params, data, partial=False)
    run = RunContext(*run_args) if run_args else None
    out, grads = forward_vjp_plan(prog, tuple(cots))(np, ps, ins, cots, run)
    return out, grads, (run.new_state if run else {})


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check(compiled, params, data, cots, run_args=None):
    want = _reference(compiled, params, data, cots, run_args)
    got = _generated(compiled, params, data, cots, run_args)
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    return got


def _mlp():
    m = ml.Model()
    m |= ml.Linear(6)(input="input", output=ml.IOKey("h0", expose=False))
    m |= ml.Relu()(input="h0", output=ml.IOKey("r0", expose=False))
    m |= ml.Linear(5)(input="r0", output=ml.IOKey("h1", expose=False))
    m |= ml.Relu()(input="h1", output=ml.IOKey("r1", expose=False))
    m |= ml.Linear(3)(input="r1", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    return m


def test_mlp_with_cross_entropy_bit_for_bit():
    c = ml.compile(_mlp(), NumpyBackend(dtype="float32"), shapes={"input": [7, 4]})
    params = c.get_parameters()
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((7, 4)).astype(np.float32),
            "target": rng.integers(0, 3, 7)}
    one = np.ones((), np.float32)
    _check(c, params, data, {"loss": one})
    g = rng.standard_normal((7, 3)).astype(np.float32)
    _check(c, params, data, {"loss": one, "logits": g})  # two outputs: their sum flows
    out, grads, _ = _check(c, params, data, {"logits": g})
    # and through evaluate (the backend runs the generated pass)
    o2, g2 = c.evaluate(params, data, output_gradients={"logits": g})
    _same(out, o2)
    _same(grads, g2)


def test_one_wire_twice_shared_parameter_trainable_input_and_an_unreached_parameter():
    """``x * x`` (a wire under two keys of one Multiply), a weight used by two Linears, the
    input made trainable, and a Linear feeding only an output with no cotangent: its
    parameters get zeros."""
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output=ml.IOKey("a", expose=False))
    m |= ml.Multiply()(left="a", right="a", output=ml.IOKey("sq", expose=False))
    lin = ml.Linear(4)
    m |= lin(input="sq", output=ml.IOKey("b", expose=False))
    m |= ml.Linear(4)(input="b", weight=lin.weight, output="out")
    m |= ml.Linear(2)(input="a", output="side")
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [3, 4]},
                   trainable_keys=["input"])
    params = c.get_parameters()
    rng = np.random.default_rng(1)
    g = {"out": rng.standard_normal((3, 4))}
    out, grads, _ = _check(c, params, {}, g)
    assert "input" in grads
    side = [k for k in params if k.endswith(".weight") and params[k].shape == (2, 4)]
    assert side and not grads[side[0]].any()  # no cotangent reaches it: zeros


def test_context_operators_randomness_and_state():
    m = ml.Model()
    m |= ml.Linear(6)(input="input", output=ml.IOKey("h", expose=False))
    m |= ml.BatchNorm1D(6)(input="h", output=ml.IOKey("n", expose=False))
    m |= ml.Dropout(0.4)(input="n", output=ml.IOKey("d", expose=False))
    m |= ml.Relu()(input="d", output=ml.IOKey("r", expose=False))
    m |= ml.Linear(2)(input="r", output="output")
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [8, 3]})
    params = c.get_parameters()
    rng = np.random.default_rng(2)
    data = {"input": rng.standard_normal((8, 3))}
    g = {"output": rng.standard_normal((8, 2))}
    state = c.initial_state_dict
    for training, step in ((True, 3), (False, 4)):
        out, grads, new_state = _check(c, params, data, g, (training, c.seed, step, state))
        assert new_state or not training
    # evaluate: its new state equals the interpreter's
    o2, g2, s2 = c.evaluate(params, data, output_gradients=g, state=state, step=5)
    want = _reference(c, params, data, g, (True, c.seed, 5, state))
    _same(o2, want[0])
    _same(g2, want[1])
    _same(s2, {**state, **want[2]})


def test_convolution_pool_in_place_vjp():
    c = ml.compile(conv_relu_pool_model(), NumpyBackend(dtype="float32"),
                   shapes={"input": [2, 3, 8, 8]})
    params = c.get_parameters()
    rng = np.random.default_rng(3)
    data = {"input": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    _check(c, params, data, {"output": rng.standard_normal((2, 5)).astype(np.float32)})


def test_forward_plan_equals_the_interpreter():
    c = ml.compile(_mlp(), NumpyBackend(dtype="float64"), shapes={"input": [5, 4]})
    params = c.get_parameters()
    rng = np.random.default_rng(4)
    data = {"input": rng.standard_normal((5, 4)), "target": rng.integers(0, 3, 5)}
    ps, ins, prog, _ = c._prepare(params, data, partial=False)
    _same(forward_plan(prog)(np, ps, ins, None), outputs_of(prog, run_forward(prog, np, ps, ins)))
    _same(c.evaluate(params, data), outputs_of(prog, run_forward(prog, np, ps, ins)))


def test_a_traceback_shows_the_generated_line(monkeypatch):
    c = ml.compile(_mlp(), NumpyBackend(dtype="float64"), shapes={"input": [5, 4]})
    params = c.get_parameters()

    def broken(self, xp, input):
        raise RuntimeError("relu failed")

    monkeypatch.setattr(ml.Relu, "forward_inplace", broken)  # (over a fresh Linear output)
    data = {"input": np.ones((5, 4)), "target": np.zeros(5, np.int64)}
    with pytest.raises(RuntimeError, match="relu failed") as info:
        c.evaluate(params, data, output_gradients={"loss": 1.0})
    frames = [f for f in traceback.extract_tb(info.tb) if f.filename.startswith("<mithril")]
    assert frames and frames[-1].line.startswith("w") and "(xp, input=w" in frames[-1].line


def test_torch_forward_plan_equals_the_interpreter():
    import torch

    from mithril.backends import TorchBackend

    c = ml.compile(_mlp(), TorchBackend(dtype="float64"), shapes={"input": [5, 4]})
    params = c.get_parameters()
    rng = np.random.default_rng(5)
    data = {"input": torch.from_numpy(rng.standard_normal((5, 4))),
            "target": torch.from_numpy(rng.integers(0, 3, 5))}
    ps, ins, prog, _ = c._prepare(params, data, partial=False)
    xp = c.backend._xp
    want = outputs_of(prog, run_forward(prog, xp, ps, ins))
    got = forward_plan(prog)(xp, ps, ins, None)
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    out, grads = c.evaluate(params, data, output_gradients={"loss": 1.0})
    assert torch.equal(out["loss"], want["loss"])


def test_gradients_come_in_the_order_params_were_given():
    """(``evaluate`` passes them in the program's order; the pass itself keeps any order, as
    the interpreter does.)"""
    c = ml.compile(_mlp(), NumpyBackend(dtype="float64"), shapes={"input": [5, 4]})
    rng = np.random.default_rng(6)
    data = {"input": rng.standard_normal((5, 4)), "target": rng.integers(0, 3, 5)}
    ps, ins, prog, _ = c._prepare(c.get_parameters(), data, partial=False)
    backwards = dict(reversed(list(ps.items())))
    cots = {"loss": np.ones(())}
    env = run_forward(prog, np, backwards, ins, None, residuals=True)
    want = numpy_backward(prog, env, backwards, cots)
    _, got = forward_vjp_plan(prog, ("loss",))(np, backwards, ins, cots, None)
    assert list(got) == list(want) == list(backwards)
    _same(got, want)


def test_a_dropped_model_takes_its_generated_lines_along():
    import gc
    import linecache

    before = set(linecache.cache)
    c = ml.compile(_mlp(), NumpyBackend(dtype="float64"), shapes={"input": [5, 4]})
    params = c.get_parameters()
    data = {"input": np.ones((5, 4)), "target": np.zeros(5, np.int64)}
    c.evaluate(params, data, output_gradients={"loss": 1.0})
    c.evaluate(params, data)
    names = [k for k in set(linecache.cache) - before if k.startswith("<mithril forward")]
    assert len(names) == 2
    del c
    gc.collect()
    assert not set(names) & set(linecache.cache)
