"""Residuals: what an operator's NumPy forward saves for its VJP (``forward_residuals``).

1. The compiled NumPy program keeps them only in a forward that will be differentiated, only
   for nodes a gradient flows through, hands each to its node's VJP and frees it there:
   nothing is left after the backward, and ``evaluate`` without gradients keeps none.
2. Gradients are bit-for-bit the same with the residuals as with a VJP that recomputes them
   (``residuals=None``), and the forward alone gives the same outputs, for every operator
   that saves some (convolutions, pooling, attention, GELU, the norms).
3. Operators without residuals (the old ``vjp(g, out, args, wrt)`` signature) still work.
"""

from __future__ import annotations

import gc
import inspect
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import conv_relu_pool_model

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.compiler.interpret import numpy_backward, outputs_of, run_forward
from mithril.models.context import RunContext
from mithril.models.operator import Operator


class Box:
    """A residual that can be watched with a weak reference."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value


class Square(Operator):
    """x², saving 2x as its residual; counts calls and watches its residuals."""

    def __init__(self) -> None:
        self.calls = {"forward": 0, "forward_residuals": 0, "vjp": 0}
        self.given: list = []   # what each VJP got as ``residuals``
        self.watch: list = []   # weak references to every residual made

    def forward(self, xp, input):
        self.calls["forward"] += 1
        return input * input

    def forward_residuals(self, xp, input):
        self.calls["forward_residuals"] += 1
        box = Box(2 * input)
        self.watch.append(weakref.ref(box))
        return input * input, box

    def vjp(self, g, out, args, wrt, residuals=None):
        self.calls["vjp"] += 1
        self.given.append(None if residuals is None else id(residuals))
        two_x = residuals.value if residuals is not None else 2 * args["input"]
        return {"input": g * two_x}


class Plain(Operator):
    """An operator written before residuals existed: no ``residuals`` keyword."""

    def forward(self, xp, input):
        return 3 * input

    def vjp(self, g, out, args, wrt):
        return {"input": 3 * g}


def square_model(sq: Square) -> ml.Model:
    m = ml.Model()
    m |= ml.Linear(3)(input="input", output=ml.IOKey("h", expose=False))
    m |= sq(input="h", output=ml.IOKey("s", expose=False))
    m |= Plain()(input="s", output="output")
    return m


def test_residuals_reach_the_vjp_and_are_freed():
    sq = Square()
    compiled = ml.compile(square_model(sq), NumpyBackend(dtype="float64"), shapes={"input": [4, 2]})
    params = compiled.get_parameters()
    x = np.random.default_rng(0).standard_normal((4, 2))
    out, grads = compiled.evaluate(params, {"input": x}, output_gradients={"output": np.ones((4, 3))})
    assert sq.calls == {"forward": 0, "forward_residuals": 1, "vjp": 1}
    assert sq.given[0] is not None  # the VJP got the saved residual ...
    gc.collect()
    assert sq.watch[0]() is None    # ... and nothing holds it once the step is done
    h = x @ params["linear.weight"].T + params["linear.bias"]
    np.testing.assert_allclose(out["output"], 3 * h * h)
    np.testing.assert_allclose(grads["linear.bias"], (3 * 2 * h).sum(0))


def test_forward_without_gradients_keeps_no_residuals():
    sq = Square()
    compiled = ml.compile(square_model(sq), NumpyBackend(dtype="float64"), shapes={"input": [4, 2]})
    compiled.evaluate(compiled.get_parameters(), {"input": np.ones((4, 2))})
    assert sq.calls == {"forward": 1, "forward_residuals": 0, "vjp": 0}
    env = run_forward(compiled.program, np, compiled.get_parameters(), {"input": np.ones((4, 2))})
    assert env.residuals == {}


def test_env_holds_residuals_until_the_backward():
    sq = Square()
    compiled = ml.compile(square_model(sq), NumpyBackend(dtype="float64"), shapes={"input": [4, 2]})
    prog, params = compiled.program, compiled.get_parameters()
    env = run_forward(prog, np, params, {"input": np.ones((4, 2))}, residuals=True)
    kept = [prog.nodes[i].path for i in env.residuals]
    assert kept == ["square"]  # Linear and Plain save nothing
    numpy_backward(prog, env, params, {"output": np.ones((4, 3))})
    assert env.residuals == {}
    gc.collect()
    assert all(w() is None for w in sq.watch)


def test_activations_no_vjp_reads_are_dropped_in_the_differentiated_forward():
    """With their residuals, a convolution's and a max-pool's VJPs read neither their input
    nor their output, and ReLU's reads only its output: a forward that keeps residuals drops
    a convolution's output once its consumer has run (and ReLU overwrites it: it is a fresh
    array nothing reads afterwards); a plain forward drops and overwrites nothing."""
    compiled = ml.compile(cnn(), NumpyBackend(dtype="float64"), shapes={"input": [2, 3, 8, 9]})
    prog, params = compiled.program, compiled.get_parameters()
    wire = {name: i for i, name in enumerate(prog.wire_names)}
    assert [n.path for n in prog.nodes if n.inplace] == ["relu"]
    x = {"input": np.random.default_rng(5).standard_normal((2, 3, 8, 9))}
    env = run_forward(prog, np, params, x, residuals=True)
    assert env[wire["c1"]] is None and env[wire["p0"]] is None  # conv output, conv input
    assert env[wire["c0"]] is None  # ReLU's input, which it overwrote
    assert env[wire["r0"]] is not None  # ReLU's output: its VJP reads it
    plain = run_forward(prog, np, params, x)
    assert all(v is not None for v in plain)
    assert (plain[wire["c0"]] < 0).any()  # not overwritten by the ReLU
    np.testing.assert_array_equal(env[wire["r0"]], plain[wire["r0"]])
    np.testing.assert_array_equal(outputs_of(prog, env)["output"], outputs_of(prog, plain)["output"])


def _relu_vjp_calls(monkeypatch) -> list[str]:
    from mithril.models.activations import Relu

    calls: list[str] = []
    plain, inplace = Relu.vjp, Relu.vjp_inplace
    monkeypatch.setattr(Relu, "vjp", lambda self, *a, **k: (calls.append("new"), plain(self, *a))[1])
    monkeypatch.setattr(Relu, "vjp_inplace",
                        lambda self, *a: (calls.append("in place"), inplace(self, *a))[1])
    return calls


def test_relu_vjp_writes_over_a_cotangent_only_the_pass_holds(monkeypatch):
    """After a max-pool (whose VJP returns a fresh array) the ReLU's VJP writes over its
    cotangent; the same numbers as a new array."""
    m = conv_relu_pool_model()
    compiled = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [2, 3, 8, 8]})
    params = compiled.get_parameters()
    x = {"input": np.random.default_rng(6).standard_normal((2, 3, 8, 8))}
    g = {"output": np.random.default_rng(7).standard_normal(compiled.program.output_shape("output"))}
    calls = _relu_vjp_calls(monkeypatch)
    _, got = compiled.evaluate(params, x, output_gradients=g)
    assert calls == ["in place"]
    monkeypatch.setattr(ml.Relu, "has_vjp_inplace", False)
    # (a compiled model's pass is generated on first use: compile again to see the change)
    compiled = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [2, 3, 8, 8]})
    _, want = compiled.evaluate(params, x, output_gradients=g)
    assert calls == ["in place", "new"]
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("build", ["user cotangent", "shared by two", "a view"])
def test_relu_vjp_never_writes_over_what_others_hold(build, monkeypatch):
    """The user's output cotangent, one array that two ReLUs both receive (Add's VJP hands
    the same one to both inputs) and a view (Transpose's VJP) are never overwritten: the
    gradients are right and the user's array is unchanged."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4))
    model = ml.Model()
    if build == "user cotangent":
        model |= ml.Relu()(input="input", output="output")
        want = lambda gy: gy * (x > 0)  # noqa: E731
    elif build == "shared by two":
        model |= ml.Relu()(input="input", output=ml.IOKey("a", expose=False))
        model |= ml.Relu()(input="input", output=ml.IOKey("b", expose=False))
        model |= ml.Add()(left="a", right="b", output="output")
        want = lambda gy: 2 * gy * (x > 0)  # noqa: E731
    else:
        model |= ml.Relu()(input="input", output=ml.IOKey("a", expose=False))
        model |= ml.Transpose()(input="a", output="output")
        want = lambda gy: gy.T * (x > 0)  # noqa: E731
    compiled = ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": [3, 4]},
                          trainable_keys={"input"})
    gy = rng.standard_normal(compiled.program.output_shape("output"))
    before = gy.copy()
    calls = _relu_vjp_calls(monkeypatch)
    _, grads = compiled.evaluate({"input": x}, {}, output_gradients={"output": gy})
    np.testing.assert_array_equal(gy, before)
    np.testing.assert_allclose(grads["input"], want(before), rtol=0, atol=1e-15)
    assert "in place" not in calls


def test_no_residuals_where_no_gradient_flows():
    """A node fed by data alone (no parameter upstream) gets no cotangent: nothing kept."""
    sq = Square()
    m = ml.Model()
    m |= sq(input="input", output=ml.IOKey("s", expose=False))
    m |= ml.Linear(2)(input="s", output="output")
    compiled = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [3, 2]})
    node = next(n for n in compiled.program.nodes if n.op is sq)
    assert not node.wrt and not node.residuals
    compiled.evaluate(compiled.get_parameters(), {"input": np.ones((3, 2))},
                      output_gradients={"output": np.ones((3, 2))})
    assert sq.calls == {"forward": 1, "forward_residuals": 0, "vjp": 0}


def test_unused_residuals_are_dropped():
    """A node whose output gets no cotangent (an output not differentiated) keeps nothing
    after the backward either."""
    sq = Square()
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="lin")
    m |= sq(input="lin", output="squared")
    compiled = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"input": [3, 2]})
    params = compiled.get_parameters()
    env = run_forward(compiled.program, np, params, {"input": np.ones((3, 2))}, residuals=True)
    assert len(env.residuals) == 1
    numpy_backward(compiled.program, env, params, {"lin": np.ones((3, 2))})
    assert env.residuals == {} and sq.calls["vjp"] == 0


def test_every_operator_with_residuals_takes_them_in_its_vjp():
    """Overriding ``forward_residuals`` means the VJP takes ``residuals=`` (default None)."""
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ops = {c for c in subclasses(Operator) if c.forward_residuals is not Operator.forward_residuals}
    assert {"Convolution2D", "MaxPool2D", "MultiHeadAttention", "Gelu", "LayerNorm"} \
        <= {c.__name__ for c in ops}
    for cls in ops:
        param = inspect.signature(cls.vjp).parameters.get("residuals")
        assert param is not None and param.default is None, cls.__name__


# -- same numbers with and without residuals ----------------------------------------------------
def cnn() -> ml.Model:
    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=1)(input="input", output=ml.IOKey("c0", expose=False))
    m |= ml.Relu()(input="c0", output=ml.IOKey("r0", expose=False))
    m |= ml.GroupNorm(2)(input="r0", output=ml.IOKey("n0", expose=False))
    m |= ml.MaxPool2D(2)(input="n0", output=ml.IOKey("p0", expose=False))
    m |= ml.Convolution2D((2, 3), 6, stride=(1, 2), padding=((1, 0), (2, 1)), groups=2)(
        input="p0", output=ml.IOKey("c1", expose=False))
    m |= ml.MaxPool2D(3, stride=1, padding=1)(input="c1", output=ml.IOKey("p1", expose=False))
    m |= ml.AvgPool2D(2)(input="p1", output=ml.IOKey("a1", expose=False))
    m |= ml.Flatten()(input="a1", output=ml.IOKey("flat", expose=False))
    m |= ml.Linear(5)(input="flat", output="output")
    return m


def sequence() -> ml.Model:
    m = ml.Model()
    m |= ml.Convolution1D(3, 8, padding="same")(input="input", output=ml.IOKey("c", expose=False))
    m |= ml.MaxPool1D(2)(input="c", output=ml.IOKey("p", expose=False))
    m |= ml.Gelu(approximate=True)(input="p", output=ml.IOKey("g", expose=False))
    m |= ml.Flatten(start_dim=1, end_dim=1)(input="g", output=ml.IOKey("f", expose=False))
    m |= ml.Linear(4)(input="f", output="output")
    return m


def transformer() -> ml.Model:
    m = ml.Model()
    m |= ml.TransformerBlock(8, 2, 16, activation="gelu", is_causal=True)(
        input="input", output=ml.IOKey("t", expose=False))
    m |= ml.MultiHeadAttention(2, use_attn_mask=True)(
        query="t", key="input", value="input", attn_mask="attn_mask", output=ml.IOKey("a", expose=False))
    m |= ml.ScaledDotProduct(is_causal=True)(query="a", key="t", value="t", output="output")
    return m


def batchnorm() -> ml.Model:
    m = ml.Model()
    m |= ml.Convolution2D(3, 4)(input="input", output=ml.IOKey("c", expose=False))
    m |= ml.BatchNorm2D(4)(input="c", output="output")
    return m


MODELS = {"cnn": (cnn, (2, 3, 8, 9)), "sequence": (sequence, (2, 3, 10)),
          "transformer": (transformer, (2, 5, 8)), "batchnorm": (batchnorm, (3, 2, 6, 5))}


@pytest.mark.parametrize("name", list(MODELS))
def test_same_results_with_and_without_residuals(name):
    factory, shape = MODELS[name]
    backend = NumpyBackend(dtype="float64", seed=1)
    compiled = ml.compile(factory(), backend, shapes={"input": list(shape)})
    prog, params = compiled.program, compiled.get_parameters()
    rng = np.random.default_rng(2)
    inputs = {"input": rng.standard_normal(shape)}
    if "attn_mask" in compiled.input_keys:
        inputs["attn_mask"] = rng.random((5, 5)) < 0.3
    state = compiled.initial_state_dict
    assert any(n.residuals for n in prog.nodes)

    def step(keep: bool):
        run = RunContext(True, 0, 0, state) if prog.has_context else None
        env = run_forward(prog, np, params, inputs, run, residuals=keep)
        assert bool(env.residuals) == keep
        outs = outputs_of(prog, env)
        cots = {k: np.cos(np.arange(v.size)).reshape(v.shape) for k, v in outs.items()}
        grads = numpy_backward(prog, env, params, cots)
        assert env.residuals == {}
        return outs, grads, (dict(run.new_state) if run is not None else {})

    (out_a, grad_a, state_a), (out_b, grad_b, state_b) = step(True), step(False)
    for k in out_a:
        assert np.array_equal(out_a[k], out_b[k]), k
    for k in grad_a:
        assert np.array_equal(grad_a[k], grad_b[k]), k
    # a VJP recomputing its residuals must not write the running statistics again
    for k in state_a:
        assert np.array_equal(state_a[k], state_b[k]), k
    plain = compiled.evaluate(params, {k: v for k, v in inputs.items()},
                              **({"state": state} if state else {}))
    plain = plain[0] if state else plain
    for k in out_a:
        assert np.array_equal(plain[k], out_a[k]), k


# -- pooling details the residuals carry -------------------------------------------------------
@pytest.mark.parametrize("make, ref", [
    (lambda: ml.MaxPool2D(2), lambda t: F.max_pool2d(t, 2)),
    (lambda: ml.MaxPool2D(3, stride=1, padding=1), lambda t: F.max_pool2d(t, 3, 1, 1)),
])
@pytest.mark.parametrize("loops", [True, False], ids=["compiled", "numpy"])
def test_max_pool_routes_nan_windows_as_torch(make, ref, loops, monkeypatch):
    """A window holding NaN has NaN as its maximum and gets the cotangent at its last NaN
    (with the compiled pass, and with the per-offset masks other dtypes take)."""
    if not loops:
        monkeypatch.setattr("mithril.models.window_kernels._COMPILED", ())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 6))
    x[0, 1, 2, 3] = x[1, 2, 0, 0] = x[1, 2, 1, 1] = x[1, 0, 4, 4] = x[1, 0, 4, 5] = np.nan
    compiled = ml.compile(make(), NumpyBackend(dtype="float64"), shapes={"input": list(x.shape)},
                          trainable_keys={"input"})
    g = rng.standard_normal(compiled.program.output_shape("output"))
    out, grads = compiled.evaluate({"input": x}, {}, output_gradients={"output": g})
    t = torch.tensor(x, requires_grad=True)
    y = ref(t)
    y.backward(torch.tensor(g))
    np.testing.assert_array_equal(out["output"], y.detach().numpy())
    np.testing.assert_allclose(grads["input"], t.grad.numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("make, ref, shape", [
    (lambda: ml.MaxPool2D(3, stride=2, padding=1), lambda t: F.max_pool2d(t, 3, 2, 1), (2, 3, 7, 6)),
    (lambda: ml.MaxPool2D(2, dilation=2, padding=1), lambda t: F.max_pool2d(t, 2, 2, 1, 2),
     (1, 2, 7, 7)),
    (lambda: ml.MaxPool1D(3, padding=1), lambda t: F.max_pool1d(t, 3, padding=1), (2, 3, 8)),
])
@pytest.mark.parametrize("loops", [True, False], ids=["compiled", "numpy"])
def test_max_pool_routes_minus_inf_windows_as_torch(make, ref, shape, loops, monkeypatch):
    """A window of −inf values (padding never counts) sends its cotangent to its first
    element inside the input, as torch; on a channels-last input too (compiled pass and
    per-offset masks)."""
    if not loops:
        monkeypatch.setattr("mithril.models.window_kernels._COMPILED", ())
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    x[0, 0] = -np.inf  # every window of this channel is all −inf
    x[-1, -1, ..., :2] = -np.inf
    compiled = ml.compile(make(), NumpyBackend(dtype="float64"), shapes={"input": list(x.shape)},
                          trainable_keys={"input"})
    g = rng.standard_normal(compiled.program.output_shape("output"))
    t = torch.tensor(x, requires_grad=True)
    y = ref(t)
    y.backward(torch.tensor(g))
    order = (0, *range(2, x.ndim), 1)
    last = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
    for given in (x, last):
        out, grads = compiled.evaluate({"input": given}, {}, output_gradients={"output": g})
        np.testing.assert_array_equal(out["output"], y.detach().numpy())
        # (overlapping windows add up in another order than torch's: rounding only)
        np.testing.assert_allclose(grads["input"], t.grad.numpy(), rtol=1e-13, atol=1e-13)
        assert np.array_equal(grads["input"] == 0, t.grad.numpy() == 0)  # routed alike


@pytest.mark.parametrize("make", [
    lambda: ml.Convolution2D(3, 4, padding=1, groups=2), lambda: ml.Convolution2D(2, 3, stride=2),
    lambda: ml.MaxPool2D(2), lambda: ml.MaxPool2D(3, stride=1, padding=1), lambda: ml.AvgPool2D(2),
])
def test_memory_order_of_the_input_changes_nothing(make):
    """NumPy convolutions and pools read channels-last arrays (their own outputs) as they are:
    the same numbers as from a C-ordered copy."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 4, 5)).astype(np.float32)
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    compiled = ml.compile(make(), NumpyBackend(), shapes={"input": list(x.shape)},
                          trainable_keys={"input"})
    params = compiled.get_parameters()
    g = rng.standard_normal(compiled.program.output_shape("output")).astype(np.float32)
    a = compiled.evaluate({**params, "input": x}, {}, output_gradients={"output": g})
    b = compiled.evaluate({**params, "input": channels_last}, {}, output_gradients={"output": g})
    np.testing.assert_array_equal(a[0]["output"], b[0]["output"])
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)
