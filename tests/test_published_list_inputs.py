"""List inputs at evaluate, as the published Mithril: a model input that feeds ``Concat``'s
list ``input`` holds a list (or tuple) of arrays; a trainable one's gradient is a list.

Outputs and each element's gradient against ``torch.cat`` and torch autograd on the three
backends, and against central differences; the list's length from ``compile(shapes=...)``,
``constant_keys`` or the first ``evaluate``; the refusals (a list for an array input, an
array for a list input, another length, a bad element) name the key and change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, central_differences, to_np

import mithril as ml
from mithril.models import Buffer, Concat, IOKey, Model, Relu

RNG = np.random.default_rng(11)
SHAPES = {0: [(2, 3), (4, 3), (1, 3)], 1: [(2, 1), (2, 4)], -1: [(3, 2, 1), (3, 2, 5), (3, 2, 2)],
          None: [(1, 4), (4, 1), (2, 3, 1)]}


def _torch_cat(arrays, axis, cot):
    """torch.cat of ``arrays`` (flattened first for axis None), and each one's gradient."""
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = torch.cat([t.reshape(-1) for t in ts] if axis is None else ts, dim=axis or 0)
    return out.detach().numpy(), [g.numpy() for g in torch.autograd.grad(out, ts, torch.tensor(cot))]


@pytest.mark.parametrize("axis", list(SHAPES), ids=str)
@pytest.mark.parametrize("name", list(BACKENDS))
def test_concat_alone_takes_a_list_and_gives_a_list_gradient(name, axis):
    """The published wiring: Concat(axis) compiled alone, its ``input`` trainable and given a
    list (a tuple on torch) at evaluate; the output and the list of gradients as torch.cat's
    (float32, exact)."""
    b = BACKENDS[name](dtype="float32")
    arrays = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES[axis]]
    compiled = ml.compile(Concat(axis=axis), b, shapes={"input": [list(s) for s in SHAPES[axis]]},
                          trainable_keys=["input"])
    assert compiled.input_keys == () and list(compiled.parameter_shapes) == ["input"]
    assert compiled.parameter_shapes["input"] == SHAPES[axis]
    assert compiled.get_shapes()["input"] == [list(s) for s in SHAPES[axis]]
    want = np.concatenate([a.reshape(-1) for a in arrays] if axis is None else arrays, axis=axis or 0)
    cot = RNG.standard_normal(want.shape).astype(np.float32)
    given = [b.array(a) for a in arrays]
    out, grads = compiled.evaluate({"input": tuple(given) if name == "torch" else given}, {},
                                   output_gradients={"output": b.array(cot)})
    want, want_grads = _torch_cat(arrays, axis, cot)
    np.testing.assert_array_equal(to_np(b, out["output"]), want)
    assert isinstance(grads["input"], list) and len(grads["input"]) == len(arrays)
    for g, w in zip(grads["input"], want_grads, strict=True):
        np.testing.assert_array_equal(to_np(b, g), w)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_list_data_input_inside_a_model_built_at_first_evaluate(name):
    """A model input 'xs' bound to Concat's input inside a model, compiled without shapes:
    built at the first evaluate for the list's length and shapes; data, not trainable."""
    b = BACKENDS[name](dtype="float32")
    model = Model()
    model |= Concat(axis=1).connect(input="xs", output=IOKey("joined", expose=False))
    model |= Relu().connect(input="joined", output="output")
    compiled = ml.compile(model, b)
    arrays = [RNG.standard_normal((3, k)).astype(np.float32) for k in (1, 2, 4)]
    out = compiled.evaluate({}, {"xs": [b.array(a) for a in arrays]})
    np.testing.assert_array_equal(to_np(b, out["output"]), np.maximum(np.concatenate(arrays, 1), 0))
    assert compiled.input_keys == ("xs",) and compiled.shapes["xs"] == [(3, 1), (3, 2), (3, 4)]
    with pytest.raises(ml.ShapeError, match="input 'xs': expected a list of 3 arrays, got 2"):
        compiled.evaluate({}, {"xs": arrays[:2]})  # built: the length is fixed now


def test_a_trainable_list_built_from_the_first_params():
    """As the published runner calls it: Concat compiled with trainable_keys and no shapes,
    the list given in params only; built for its shapes (float64, vs torch autograd)."""
    b = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(Concat(axis=-1), b, trainable_keys=["input"])
    arrays = [RNG.standard_normal(s) for s in SHAPES[-1]]
    cot = RNG.standard_normal((3, 2, 8))
    out, grads = compiled.evaluate({"input": arrays}, {}, output_gradients={"output": cot})
    want, want_grads = _torch_cat(arrays, -1, cot)
    np.testing.assert_array_equal(out["output"], want)
    for g, w in zip(grads["input"], want_grads, strict=True):
        np.testing.assert_array_equal(g, w)
    assert compiled.parameter_shapes == {"input": SHAPES[-1]}


def test_a_declared_differentiable_list_and_central_differences():
    """IOKey('xs', differentiable=True) on the list makes it trainable with no trainable_keys;
    float64 NumPy: each element's gradient of sum(w · concat) by central differences."""
    b = ml.NumpyBackend(dtype="float64")
    model = Model()
    model |= Concat(axis=None).connect(input=IOKey("xs", differentiable=True), output="output")
    compiled = ml.compile(model, b, shapes={"xs": [list(s) for s in SHAPES[None]]})
    assert list(compiled.parameter_shapes) == ["xs"]
    arrays = [RNG.standard_normal(s) for s in SHAPES[None]]
    w = RNG.standard_normal(compiled.shapes["output"])
    _, grads = compiled.evaluate({"xs": arrays}, {}, output_gradients={"output": w})
    flat = {f"x{i}": a for i, a in enumerate(arrays)}
    fd = central_differences(lambda p: float(np.sum(w * compiled.evaluate(
        {"xs": [p[f"x{i}"] for i in range(len(arrays))]}, {})["output"])), flat, 1e-6)
    for i, g in enumerate(grads["xs"]):
        np.testing.assert_allclose(g, fd[f"x{i}"], rtol=1e-8, atol=1e-8)


def test_a_constant_list_and_randomized_list_parameters():
    """constant_keys={'xs': [a, b]} folds the list in; randomize_params / get_parameters give
    a trainable list as a list, of its elements' shapes."""
    b = ml.NumpyBackend(dtype="float64")
    a, c = np.ones((1, 2)), np.arange(4.0).reshape(2, 2)
    folded = ml.compile(Concat(axis=0), b, constant_keys={"input": [a, c]})
    assert folded.input_keys == ()
    np.testing.assert_array_equal(folded.evaluate({}, {})["output"], np.concatenate([a, c]))
    trained = ml.compile(Concat(axis=0), b, shapes={"input": [[1, 2], [2, 2]]}, trainable_keys=["input"])
    params = trained.randomize_params()
    assert [p.shape for p in params["input"]] == [(1, 2), (2, 2)]
    assert [p.shape for p in trained.get_parameters()["input"]] == [(1, 2), (2, 2)]
    assert trained.randomize_params(excluded_keys=["input"]) == {}


def test_wrong_lists_are_refused_by_name_and_change_nothing():
    """An array for a list input, a list of another length, an element of another shape, a
    list for an array input, a flat shape for a list, a list input that also feeds another
    block, and a list of unknown length: each an error naming the key; a refused call
    leaves the model as it was (a deferred one still deferred, parameters unchanged)."""
    b = ml.NumpyBackend(dtype="float64")
    compiled = ml.compile(Concat(axis=0), b, shapes={"input": [[2, 3], [1, 3]]}, trainable_keys=["input"])
    params = compiled.randomize_params()
    before = [p.copy() for p in params["input"]]
    ok = {"input": params["input"]}
    for bad, err, msg in (
            (np.ones((3, 3)), TypeError, "parameter 'input' is a list input of 2 arrays .* got ndarray"),
            (params["input"][:1], ml.ShapeError, "parameter 'input': expected a list of 2 arrays, got 1"),
            ([params["input"][0], np.ones((1, 2))], ml.ShapeError,
             r"parameter 'input\[1\]': expected shape \[1, 3\], got \[1, 2\]")):
        with pytest.raises(err, match=msg):
            compiled.evaluate({"input": bad}, {}, output_gradients={"output": np.ones((3, 3))})
    with pytest.raises(TypeError, match="output gradient 'output' takes one array, got a list of 2"):
        compiled.evaluate(ok, {}, output_gradients={"output": [np.ones((1, 3)), np.ones((2, 3))]})
    assert all(np.array_equal(p, q) for p, q in zip(params["input"], before, strict=True))
    assert compiled.evaluate(ok, {})["output"].shape == (3, 3)

    plain = Model()
    plain |= Relu().connect(input="x", output="y")
    with pytest.raises(TypeError, match="input 'x' takes one array, got a list of 2 arrays"):
        ml.compile(plain, b, shapes={"x": [2]}).evaluate({}, {"x": [np.ones(2), np.ones(2)]})
    with pytest.raises(ml.ShapeError, match="'input' is a list input .* one shape per element"):
        ml.compile(Concat(axis=0), b, shapes={"input": [2, 3]})
    both = Model()
    both |= Concat(axis=0).connect(input="xs", output="output")
    both |= Buffer().connect(input="xs", output="copy")
    with pytest.raises(TypeError, match="'xs' feeds Concat's list input and buffer \\(Buffer\\)"):
        ml.compile(both, b, shapes={"xs": [[2], [3]]})
    with pytest.raises(ml.ShapeError, match="cannot infer the length of list input 'input'"):
        ml.compile(Concat(axis=0), b, shapes={"output": [5]})  # shapes given: not deferred

    deferred = ml.compile(Concat(axis=0), b)  # built at the first evaluate ...
    with pytest.raises(ml.ShapeError, match="one shape per element"):
        deferred.evaluate({}, {"input": np.ones((2, 3))})  # ... which refuses an array
    with pytest.raises(ml.ShapeError, match="cannot infer the length"):
        deferred.program  # noqa: B018 - still deferred
    with pytest.raises(ml.ShapeError, match="'input2' has rank 1, 'input1' rank 2"):
        deferred.evaluate({}, {"input": [np.ones((2, 3)), np.ones(3)]})
    with pytest.raises(ml.ShapeError, match="cannot infer the length"):
        deferred.program  # noqa: B018
    np.testing.assert_array_equal(deferred.evaluate({}, {"input": [np.ones((1, 3)), np.zeros((2, 3))]})["output"],
                                  np.r_[np.ones((1, 3)), np.zeros((2, 3))])
