"""Arithmetic and indexing on connection objects (issue #13; ``mithril.models.expressions``).

1. Every operator on connections (``+ - * / ** @``, reflected too, ``-x``, ``abs``, ``sqrt``,
   ``exp``, indexing, ``.T``, ``transpose``, ``reshape``, ``sum`` / ``mean`` / ``max`` /
   ``min``), with connections, constants, IOKeys, child terminals, a parameter role and a
   nested model: outputs and the gradients of every trainable input and parameter, in float64
   on NumPy, torch and JAX (JAX in one subprocess: x64 is process-global), against torch's
   autograd of the same formula written by hand, at 1e-10.
2. How the blocks are added: anonymous, named after their class, one block per expression
   object, constants folded in (and floats in the model's dtype).
3. Bad input is named (the operator and the connection) and leaves the model unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import BACKENDS, jax_case_params, jax_float64_results, selected_cases, to_np

import mithril as ml
from mithril.models import Add, Buffer, IOKey, Linear, Model, Relu
from mithril.models.expressions import Expression

TOL = 1e-10


def _idx(t: torch.Tensor, index) -> torch.Tensor:
    """``t[index]`` for any NumPy index (negative steps too): the positions NumPy picks,
    gathered from the flat tensor (autograd adds repeats up)."""
    pos = np.arange(t.numel()).reshape(tuple(t.shape))[index]
    return t.reshape(-1)[torch.from_numpy(np.ascontiguousarray(pos))]


def _model(shapes: dict, out: Callable[[Model], dict]) -> Model:
    """A model whose inputs are ``shapes``' keys and whose outputs are ``out(model)``'s
    expressions, each through a ``Buffer`` named after its key."""
    m = Model()
    for k in shapes:
        m |= Buffer()(input=k, output=IOKey(f"_{k}", expose=False))
    for name, expr in out(m).items():
        m |= Buffer()(input=expr, output=name)
    return m


def _simple(shapes: dict, out: Callable, ref: Callable | None = None,
            positive: tuple[str, ...] = ()) -> tuple:
    """A case whose outputs are ``out(v)``: expressions of the model's inputs, as ``v.x``
    (``model.x``). The reference is ``ref(v)`` with torch tensors as ``v.x``; without one,
    the same formula on torch tensors."""
    def build() -> Model:
        return _model(shapes, lambda m: out(SimpleNamespace(**{k: getattr(m, k) for k in shapes})))
    return build, shapes, lambda t: (ref or out)(SimpleNamespace(**t)), positive


def _lin_case():
    """Two Linear blocks combined by terminal objects (the published README pattern)."""
    def build():
        m = Model()
        lin1, lin2 = Linear(3), Linear(3)
        m |= lin1(input="x")
        m |= lin2(input="x")
        m |= Relu()(input=lin1.output + lin2.output * 2.0, output="output")
        m |= Buffer()(input=(lin1.output - lin2.output).abs().sum(axis=-1), output="gap")
        return m

    def ref(t):
        h1 = t["x"] @ t["linear_0.weight"].T + t["linear_0.bias"]
        h2 = t["x"] @ t["linear_1.weight"].T + t["linear_1.bias"]
        # "output_1": lin2's output, left unnamed (a terminal here: see docs/mithril-compat.md)
        return {"output": torch.relu(h1 + h2 * 2.0), "gap": (h1 - h2).abs().sum(-1), "output_1": h2}
    return build, {"x": (4, 5)}, ref, ()


def _shared_and_weight_case():
    """One expression object used twice (one block), a parameter role in an expression and an
    expression into a parameter role (a tied, transposed weight)."""
    def build():
        m = Model()
        enc = Linear(3, use_bias=False)
        m |= enc(input="x", output="h")
        shared = m.h * m.h
        m |= Add()(left=shared, right=shared / 2.0, output="y")
        m |= Linear(5, use_bias=False)(input=m.h, weight=enc.weight.T * 0.5, output="back")
        m |= Buffer()(input=(enc.weight ** 2).sum(), output="wsq")
        return m

    def ref(t):
        w = t["linear_0.weight"]
        h = t["x"] @ w.T
        return {"h": h, "y": h * h + h * h / 2.0, "back": h @ (w.T * 0.5).T, "wsq": (w ** 2).sum()}
    return build, {"x": (4, 5)}, ref, ()


def _iokey_case():
    """IOKey leaves: named connections created by the expression, and a constant IOKey."""
    def build():
        m = Model()
        m |= Buffer()(input=IOKey("x") * IOKey("y") - IOKey(value=[1.0, 2.0, 3.0]), output="z")
        return m

    def ref(t):
        return {"z": t["x"] * t["y"] - torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    return build, {"x": (2, 3), "y": (3,)}, ref, ()


def _nested_case():
    """Expressions inside a child model, then on the child's terminals in the parent."""
    def build():
        child = Model()
        child |= Linear(4)(input="x", output="h")
        child |= Buffer()(input=child.h.exp() * 2 + 1, output="y")
        parent = Model()
        parent |= child(x="x", y="cy")
        parent |= Buffer()(input=(child.y - parent.x.mean(axis=-1, keepdim=True)).T[::-1], output="z")
        return parent

    def ref(t):
        h = t["x"] @ t["model.linear.weight"].T + t["model.linear.bias"]
        y = h.exp() * 2 + 1
        return {"cy": y, "z": torch.flip((y - t["x"].mean(-1, keepdim=True)).T, (0,))}
    return build, {"x": (3, 4)}, ref, ()


F64 = {"dtype": torch.float64}
M = np.array([[1.0, -2.0], [0.5, 3.0], [2.0, 0.0], [-1.0, 1.0]])
TM = torch.tensor(M)
NEG, STEPS = (-1, 2), (slice(2, 0, -1), slice(None, None, -2), slice(-1, -5, -3))  # indices

CASES: dict[str, tuple] = {
    "add": _simple({"x": (3, 4), "y": (4,)}, lambda v: {"a": v.x + v.y, "b": v.x + 2.0, "c": 2 + v.y}),
    "subtract": _simple({"x": (3, 4), "y": (3, 1)},
                        lambda v: {"a": v.x - v.y, "b": 1.5 - v.x, "c": v.x - np.arange(4.0)},
                        lambda v: {"a": v.x - v.y, "b": 1.5 - v.x, "c": v.x - torch.arange(4.0, **F64)}),
    "multiply": _simple({"x": (3, 4), "y": (4,)},
                        lambda v: {"a": v.x * v.y, "b": 3 * v.x, "c": v.y * [1, 2, 3, 4]},
                        lambda v: {"a": v.x * v.y, "b": 3 * v.x, "c": v.y * torch.arange(1.0, 5, **F64)}),
    "divide": _simple({"x": (3, 4), "p": (3, 1)},
                      lambda v: {"a": v.x / v.p, "b": 1.0 / v.p, "c": v.x / 4}, positive=("p",)),
    "power": _simple({"x": (3, 4), "p": (3, 4)},
                     lambda v: {"a": v.x ** 2, "b": v.p ** v.x, "c": 2.0 ** v.x, "d": v.p ** 0.5},
                     positive=("p",)),
    "matmul": _simple({"x": (3, 4), "w": (4, 2), "b": (2, 5, 3)},
                      lambda v: {"a": v.x @ v.w, "m": v.x @ M, "r": M.T @ v.x.T, "batched": v.b @ v.x},
                      lambda v: {"a": v.x @ v.w, "m": v.x @ TM, "r": TM.T @ v.x.T, "batched": v.b @ v.x}),
    "unary": _simple({"x": (3, 4), "p": (3, 4)},
                     lambda v: {"neg": -v.x, "abs": abs(v.x), "abs2": v.x.abs(), "sqrt": v.p.sqrt(),
                                "exp": v.x.exp()}, positive=("p",)),
    "shaping": _simple({"x": (2, 3, 4)},
                       lambda v: {"T": v.x.T, "perm": v.x.transpose((1, 0, 2)), "r1": v.x.reshape((4, -1)),
                                  "r2": v.x.reshape(6, 4), "r3": v.x.reshape([None, 2])},
                       lambda v: {"T": v.x.permute(2, 1, 0), "perm": v.x.permute(1, 0, 2),
                                  "r1": v.x.reshape(4, -1), "r2": v.x.reshape(6, 4),
                                  "r3": v.x.reshape(-1, 2)}),
    "reductions": _simple({"x": (2, 3, 4)},
                          lambda v: {"sum": v.x.sum(), "sum1": v.x.sum(axis=1),
                                     "mean": v.x.mean(axis=(0, 2), keepdim=True), "max": v.x.max(axis=-1),
                                     "min": v.x.min(axis=0, keepdim=True), "maxall": v.x.max()},
                          lambda v: {"sum": v.x.sum(), "sum1": v.x.sum(1),
                                     "mean": v.x.mean((0, 2), keepdim=True),
                                     "max": v.x.amax(-1), "min": v.x.amin(0, keepdim=True),
                                     "maxall": v.x.max()}),
    "indexing": _simple({"x": (3, 4, 5)},
                        lambda v: {"int": v.x[1], "neg_int": v.x[-1, 2], "slice": v.x[:, 1:3],
                                   "none": v.x[None, 0], "ellipsis": v.x[..., 2],
                                   "mixed": v.x[1:, None, ..., ::2], "rev": v.x[::-1],
                                   "steps": v.x[2:0:-1, ::-2, -1:-5:-3], "list": v.x[[0, 2, 2]],
                                   "tuple_list": v.x[:, [3, 1]], "chain": v.x[0][1:][..., 0]},
                        lambda v: {"int": _idx(v.x, 1), "neg_int": _idx(v.x, NEG),
                                   "slice": _idx(v.x, (slice(None), slice(1, 3))),
                                   "none": _idx(v.x, (None, 0)), "ellipsis": _idx(v.x, (..., 2)),
                                   "mixed": _idx(v.x, (slice(1, None), None, ..., slice(None, None, 2))),
                                   "rev": _idx(v.x, slice(None, None, -1)), "steps": _idx(v.x, STEPS),
                                   "list": _idx(v.x, [0, 2, 2]),
                                   "tuple_list": _idx(v.x, (slice(None), [3, 1])),
                                   "chain": v.x[0][1:][..., 0]}),
    "compound": _simple({"x": (3, 4), "y": (4,)},
                        lambda v: {"out": ((v.x - v.y) ** 2).mean(axis=0) / (1 + v.y.abs())
                                   + (v.x @ v.x.T).sum(axis=1).max()},
                        lambda v: {"out": ((v.x - v.y) ** 2).mean(0) / (1 + v.y.abs())
                                   + (v.x @ v.x.T).sum(1).max()}),
    "linears": _lin_case(),
    "shared_and_weight": _shared_and_weight_case(),
    "iokey": _iokey_case(),
    "nested": _nested_case(),
}


def _data(case: str) -> tuple[dict, dict]:
    """Inputs (trainable) and their values for ``case``, from a seed of its name."""
    _, shapes, _, positive = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    data = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return {k: np.abs(v) + 0.5 if k in positive else v for k, v in data.items()}, shapes


def run(case: str, backend_name: str) -> dict[str, np.ndarray]:
    """Outputs ("out|k"), gradients ("grad|k"), parameters ("param|k") and cotangents
    ("cot|k") of ``case`` on ``backend_name`` in float64."""
    build = CASES[case][0]
    data, shapes = _data(case)
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(build(), backend, shapes=shapes, trainable_keys=list(shapes))
    rng = np.random.default_rng(zlib.crc32(case.encode()) + 1)
    params = {k: data[k] if k in data else rng.standard_normal(s)
              for k, s in compiled.parameter_shapes.items()}
    cots = {k: rng.standard_normal(compiled.program.output_shape(k)) for k in compiled.output_keys}
    out, grads = compiled.evaluate({k: backend.array(v) for k, v in params.items()}, {},
                                   output_gradients={k: backend.array(v) for k, v in cots.items()})
    return {**{f"out|{k}": to_np(backend, v) for k, v in out.items()},
            **{f"grad|{k}": to_np(backend, v) for k, v in grads.items()},
            **{f"param|{k}": v for k, v in params.items()}, **{f"cot|{k}": v for k, v in cots.items()}}


def _part(res: dict, kind: str) -> dict[str, np.ndarray]:
    return {k.split("|", 1)[1]: v for k, v in res.items() if k.startswith(kind + "|")}


def _max_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max(initial=0.0)) / max(1.0, float(np.abs(want).max(initial=0.0)))


def check(case: str, res: dict, what: str) -> None:
    """``res`` (from :func:`run`) against torch's autograd of the case's formula."""
    params, cots = _part(res, "param"), _part(res, "cot")
    t = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    want = CASES[case][2](t)
    got_out, got_grads = _part(res, "out"), _part(res, "grad")
    assert set(got_out) == set(want), (set(got_out), set(want))
    keys = list(want)
    wgrads = torch.autograd.grad([want[k] for k in keys], list(t.values()),
                                 [torch.tensor(cots[k]) for k in keys], allow_unused=True)
    assert set(got_grads) == set(params)
    errs = {f"output {k}": _max_error(got_out[k], want[k].detach().numpy()) for k in keys}
    for k, g in zip(t, wgrads, strict=True):
        want_g = np.zeros_like(params[k]) if g is None else g.numpy()
        errs[f"gradient of {k}"] = _max_error(got_grads[k], want_g)
    bad = {k: e for k, e in errs.items() if not e <= TOL}
    assert not bad, f"{what} {case}: {bad}"


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients(case, backend_name):
    check(case, run(case, backend_name), backend_name)


@pytest.fixture(scope="module")
def jax_results(request):
    """Every case on JAX float64 (jit), run once in a fresh interpreter."""
    return jax_float64_results("test_connection_arithmetic", "CASES", "run",
        only=selected_cases(request, "case", list(CASES)))


@pytest.mark.parametrize("case", jax_case_params(list(CASES)))
def test_outputs_and_gradients_jax(case, jax_results):
    check(case, jax_results.get(case, {}), "jax")


# -- how the blocks are added -----------------------------------------------------------------
def test_blocks_are_anonymous_and_named_after_their_class():
    m = Model()
    lin1, lin2 = Linear(3), Linear(3)
    m |= lin1(input="input")
    m |= lin2(input="input")
    expr = lin1.output + lin2.output * 2.0
    assert isinstance(expr, Expression) and repr(expr) == "(Linear.output + (Linear.output * 2.0))"
    assert len(m.blocks) == 2  # nothing added until connected
    m |= Relu()(input=expr, output="output")
    assert [type(b).__name__ for b, _ in m.blocks] == ["Linear", "Linear", "Multiply", "Add", "Relu"]
    assert m.output_keys == ("output_1", "output")  # the operators' outputs are internal wires
    c = ml.compile(m, ml.NumpyBackend(), shapes={"input": [2, 4]})
    assert [n.path for n in c.program.nodes] == ["linear_0", "linear_1", "multiply", "add", "relu"]
    assert list(c.program.constants) == ["multiply.right"]  # 2.0, folded in
    text = c.summary(print_info=False)
    assert "multiply (Multiply)" in text and "add (Add)" in text
    assert sorted(c.get_parameters()) == ["linear_0.bias", "linear_0.weight", "linear_1.bias",
                                          "linear_1.weight"]
    assert repr(m.input[1:, ..., None, ::-1]) == "Model.input[1:, ..., None, ::-1]"
    assert repr(m.input.sum(axis=1, keepdim=True)) == "Model.input.sum(axis=1, keepdim=True)"
    assert repr(np.ones(3) + m.input) == "(array[3] + Model.input)"  # NumPy defers to us
    assert repr(np.float64(2.0) * m.input) == "(2.0 * Model.input)"
    cast = m.input.cast(ml.float32)  # Cast's own numbers are tested with the primitives
    assert repr(cast) == "Model.input.cast('float32')" and type(cast.op).__name__ == "Cast"


def test_one_expression_one_block_per_model():
    m = Model()
    s = IOKey("x") + 1.0
    m |= Buffer()(input=s, output="a")
    m |= Buffer()(input=s * s, output="b")
    assert [type(b).__name__ for b, _ in m.blocks] == ["Add", "Buffer", "Multiply", "Buffer"]
    m.expose_keys(s=s)  # an expression already added: its wire
    other = Model()
    other |= Buffer()(input=s, output="c")  # another model gets its own block
    assert [type(b).__name__ for b, _ in other.blocks] == ["Add", "Buffer"]
    assert other.blocks[0][0] is not m.blocks[0][0]
    b = ml.NumpyBackend(dtype="float64")
    out = ml.compile(m, b, shapes={"x": [3]}).evaluate({}, {"x": [1.0, 2.0, 3.0]})
    np.testing.assert_array_equal(out["s"], [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(out["b"], [4.0, 9.0, 16.0])
    with pytest.raises(ValueError, match=r"expose_keys: the expression \(IOKey\('y'\) \* 2\.0\) is not part"):
        m.expose_keys(t=IOKey("y") * 2.0)


@pytest.mark.parametrize("name", ["numpy", "jax", "torch"])
def test_constants_take_the_model_dtype(name):
    b = BACKENDS[name](dtype="float32")
    m = Model()
    m |= Buffer()(input=IOKey("x") * 3 + True - np.arange(3), output="y")  # ints and bools: floats
    c = ml.compile(m, b, shapes={"x": [3]})
    y = c.evaluate({}, {"x": [1.0, 2.0, 3.0]})["y"]
    assert b.dtype_name(y) == "float32"
    np.testing.assert_array_equal(b.to_numpy(y), [4.0, 6.0, 8.0])


# -- bad input: named, and the model unchanged ----------------------------------------------------
def _state(m: Model):
    """Everything a failed call must leave as it was."""
    return ([(id(b), dict(mp)) for b, mp in m.blocks], dict(m.conns), m._last_output, dict(m._expr_wires),
            [(c.name, c.shape, None if c.value is None else c.value.tolist(), c.exposed, c.auto_output)
             for c in m.conns.values()], m.input_keys, m.output_keys)


def _base():
    m = Model()
    lin = Linear(3)
    m |= lin(input="x", output="h")
    return m, lin


@pytest.mark.parametrize("make, error, match", [
    (lambda m, lin: lin.output + "x", TypeError, r"unsupported operand for '\+' with Linear.output: str"),
    (lambda m, lin: m.x * object(), TypeError, r"unsupported operand for '\*' with Model.x: object"),
    (lambda m, lin: m.x - [1, "a"], TypeError, r"unsupported operand for '-'"),
    (lambda m, lin: m.x // 2, TypeError,
     r"'//' on connections \(Model.x\) is not offered: there is no FloorDivide"),
    (lambda m, lin: m.x[1.5], TypeError, r"Model.x\[...\]: unsupported index 1.5"),
    (lambda m, lin: m.x[True], TypeError, "unsupported index True"),
    (lambda m, lin: m.x[::0], TypeError, "unsupported index"),
    (lambda m, lin: m.x.sum(axis=m.h), TypeError, "must be static"),
    (lambda m, lin: m.x.prod(), AttributeError, r"Model.x.prod: not offered on connections"),
    (lambda m, lin: m.x.size, AttributeError, r"Model.x.size: not offered"),
    (lambda m, lin: list(m.x), TypeError, "'Terminal' object is not iterable"),
    (lambda m, lin: pow(m.x, 2, 3), TypeError, "modulo"),
    (lambda m, lin: m.x.reshape((2, -1, -1)), ValueError, "at most one -1"),
])
def test_bad_operands_are_named_when_the_expression_is_made(make, error, match):
    m, lin = _base()
    before = _state(m)
    with pytest.raises(error, match=match):
        make(m, lin)
    assert _state(m) == before


def _other_model_terminal(m, lin):
    other = Model()
    other |= Relu()(input="y", output="z")
    return m.x + other.y


@pytest.mark.parametrize("connect, error, match", [
    # a connection of another model that is not part of this one
    (lambda m, lin: Relu()(input=_other_model_terminal(m, lin)), ValueError,
     r"Relu.connect\(input=...\): in \(Model.x \+ Model.y\) \(Add.right\): Model.y is a connection of "
     "another model"),
    # a block not added to this model; the Multiply wired before it is taken back out
    (lambda m, lin: Add()(left=IOKey("new"), right=(m.x * 2) + Linear(2).output), ValueError,
     r"Add.connect\(right=...\): in \(\(Model.x \* 2\) \+ Linear.output\).*not \(yet\) part of this model"),
    # the same after a parameter role referred to by object became a wire of its block
    (lambda m, lin: Relu()(input=(lin.weight * 2).sum() + Linear(2).output), ValueError,
     r"Relu.connect\(input=...\): in \(\(Linear.weight \* 2\).sum\(\) \+ Linear.output\)"),
    # a declared shape that clashes with the named connection's
    (lambda m, lin: Buffer()(input=IOKey("new") + (m.h - IOKey("x", shape=[7])), output="o"), ValueError,
     r"Buffer.connect\(input=...\): in \(Model.h - IOKey\('x', shape=\[7\]\)\) \(Subtract.right\): "
     "shape mismatch"),
    # an expression is not an output
    (lambda m, lin: Relu()(input="x", output=m.x + 1), ValueError,
     "'output' is an output of Relu: it cannot take an expression"),
])
def test_connecting_bad_expressions_leaves_the_model_unchanged(connect, error, match):
    m, lin = _base()
    m.set_shapes(x=[2, 5])
    probe = m.h * 3.0
    m |= Buffer()(input=probe, output="p")  # an expression added before: its cache must stay
    before = _state(m)
    with pytest.raises(error, match=match):
        m |= connect(m, lin)
    assert _state(m) == before
    # and the model still compiles and runs as before the failed call
    c = ml.compile(m, ml.NumpyBackend(dtype="float64"))
    p = c.randomize_params()
    x = np.ones((2, 5))
    out = c.evaluate(p, {"x": x})
    np.testing.assert_allclose(out["p"], 3 * (x @ p["linear.weight"].T + p["linear.bias"]), rtol=1e-12)
    assert sorted(out) == ["h", "p"]


def test_a_failed_nested_model_add_leaves_both_models_unchanged():
    child = Model()
    child |= Linear(2)(input="x", output="y")
    parent = Model()
    before = _state(parent)
    with pytest.raises(ValueError, match="another model"):
        parent |= child(x=IOKey("x") + _stray())
    assert _state(parent) == before and not child._used
    parent |= child(x=IOKey("x") * 2)  # the child can still be added
    assert child._used


def _stray():
    other = Model()
    other |= Relu()(input="q")
    return other.q


def test_negative_steps_through_the_indexer_operator():
    # the Indexer block itself, NumPy and torch (torch slices take no negative step: it flips
    # first); JAX runs the same indices in the "indexing" case above
    x = np.arange(60.0).reshape(3, 4, 5)
    for name in ("numpy", "torch"):
        b = BACKENDS[name](dtype="float64")
        m = Model()
        m |= ml.Indexer((None, slice(None, None, -2), ..., slice(3, None, -1)))(input="x", output="y")
        c = ml.compile(m, b, shapes={"x": [3, 4, 5]}, trainable_keys=["x"])
        out, g = c.evaluate({"x": b.array(x)}, {}, output_gradients={"y": b.ones(1, 2, 4, 4)})
        np.testing.assert_array_equal(to_np(b, out["y"]), x[None, ::-2, ..., 3::-1])
        want = np.zeros_like(x)
        want[::-2, :, 3::-1] = 1
        np.testing.assert_array_equal(to_np(b, g["x"]), want)
