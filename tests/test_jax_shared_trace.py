"""JAX: equal operators share one traced forward inside a jitted program
(``interpret._traced_call``): a model of many equal layers traces one layer's forward per
shape, and the program, its values and its gradients are what tracing every node gives."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend
from mithril.compiler import interpret
from mithril.models.layers import Linear

jax = pytest.importorskip("jax")


def deep_model(dropout: bool = False) -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(16)(input="input", output=ml.IOKey("h0", expose=False))
    prev = "h0"
    for i in range(1, 9):  # eight equal (16 -> 16) layers
        m |= ml.Relu()(input=prev, output=ml.IOKey(f"r{i}", expose=False))
        if dropout and i == 4:
            m |= ml.Dropout(0.3)(input=f"r{i}", output=ml.IOKey("d", expose=False))
        m |= ml.Linear(16)(input="d" if dropout and i == 4 else f"r{i}",
                           output=ml.IOKey(f"h{i}", expose=False))
        prev = f"h{i}"
    m |= ml.Linear(3)(input=prev, output=ml.IOKey("logits"))
    m |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    return m


def run(dropout: bool, shared: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    if not shared:
        monkeypatch.setattr(interpret, "_traced_call", lambda op, args: None)
    be = JaxBackend(dtype="float32", seed=0)
    c = ml.compile(deep_model(dropout), be, shapes={"input": [5, 4]})
    params = c.get_parameters()
    rng = np.random.default_rng(0)
    data = {"input": be.array(rng.standard_normal((5, 4)).astype(np.float32)),
            "target": be.array(np.array([0, 1, 2, 1, 0]), be.int_dtype)}
    out, grads = c.evaluate(params, data, output_gradients={"loss": 1.0})
    monkeypatch.undo()
    return ({k: np.asarray(v) for k, v in out.items()}, {k: np.asarray(v) for k, v in grads.items()})


@pytest.mark.parametrize("dropout", [False, True])  # a context operator is traced in place
def test_shared_trace_gives_the_same_values_and_gradients(dropout, monkeypatch) -> None:
    interpret._JITTED.clear()
    shared = run(dropout, True, monkeypatch)
    alone = run(dropout, False, monkeypatch)
    for a, b in zip(shared, alone, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_equal_layers_trace_one_forward_per_shape(monkeypatch) -> None:
    interpret._JITTED.clear()
    calls = []
    real = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, xp, *a, **k: (
        calls.append(self.dimension), real(self, xp, *a, **k))[1])
    be = JaxBackend(dtype="float32", seed=0)
    c = ml.compile(deep_model(), be, shapes={"input": [5, 4]})
    data = {"input": be.array(np.ones((5, 4), np.float32)),
            "target": be.array(np.zeros(5), be.int_dtype)}
    c.evaluate(c.get_parameters(), data, output_gradients={"loss": 1.0})
    # 10 Linear nodes, three (configuration, shapes): 4 -> 16, 16 -> 16 (eight), 16 -> 3
    assert sorted(calls) == [3, 16, 16]


def test_an_operator_with_unhashable_settings_is_traced_in_place() -> None:
    class Scale(ml.models.operator.Operator):  # a list attribute: no shared function
        inputs = ("input",)

        def __init__(self) -> None:
            self.factors = [2.0]

        def infer_shape(self, shapes):
            return shapes.get("input")

        def forward(self, xp, input):
            return input * self.factors[0]

        def vjp(self, g, out, args, wrt):
            return {"input": g * self.factors[0]}

    assert interpret._traced_call(Scale(), {"input": 1.0}) is None
    be = JaxBackend(dtype="float32")
    m = ml.Model()
    m |= Scale()(input="input", output=ml.IOKey("output"))
    c = ml.compile(m, be, shapes={"input": [3]})
    out = c.evaluate({}, {"input": be.array(np.ones(3, np.float32))})
    np.testing.assert_array_equal(np.asarray(out["output"]), np.full(3, 2.0, np.float32))


def test_a_forward_that_returns_no_array_is_traced_in_place() -> None:
    """An operator whose forward gives something other than one array (a Python number)
    falls back to tracing it in place, and is remembered as such."""
    class Half(ml.models.operator.Operator):
        inputs = ("input",)

        def infer_shape(self, shapes):
            return ()

        def forward(self, xp, input):
            return 0.5

        def vjp(self, g, out, args, wrt):
            return {}

    interpret._JITTED.clear()
    op, seen = Half(), []

    def f(x):
        call = interpret._traced_call(op, {"input": x})
        seen.append(call is not None)
        return x * (call(input=x) if call is not None else op.forward(jax.numpy, input=x))

    np.testing.assert_array_equal(np.asarray(jax.jit(f)(jax.numpy.ones(3))), np.full(3, 0.5))
    assert seen == [True] and list(interpret._JITTED.values()) == [False]
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(jax.numpy.ones(4))), np.full(4, 0.5))
    assert seen == [True, False]  # remembered: traced in place at once
