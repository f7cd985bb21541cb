"""The published Mithril's own test cases of the blocks added last (FloorDivide, Prod,
ShiftLeft, ShiftRight, MDSCore, MDS, GaussProcessRegressionCore, RNNCell and LSTMCell as
PublishedRNNCell / PublishedLSTMCell) run through ``test_published_conformance.run_case``
with those blocks mapped (NumPy and torch here; JAX in a subprocess, slow); the integer
primitives against torch and NumPy; bad arguments refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_published_conformance as conformance
import torch
from conftest import run_python, shared_file

import mithril as ml
from mithril.backends import NumpyBackend, TorchBackend
from mithril.errors import InputValueError

#: published name -> ours, for the conformance table
NEW_BLOCKS = {"FloorDivide": ml.FloorDivide, "Prod": ml.Prod, "ShiftLeft": ml.ShiftLeft,
              "ShiftRight": ml.ShiftRight, "MDSCore": ml.MDSCore, "MDS": ml.MDS,
              "GaussProcessRegressionCore": ml.GaussProcessRegressionCore,
              "RNNCell": ml.PublishedRNNCell, "LSTMCell": ml.PublishedLSTMCell}
#: the cases they build and match, per file
NEW_CASES = {
    "primitives_directed_test.json": [
        *(f"test_floor_div_{i}" for i in range(1, 7)), *(f"test_prod_{i}" for i in range(1, 5)),
        *(f"test_shift_left_{i}" for i in range(1, 4)), *(f"test_shift_right_{i}" for i in range(1, 4))],
    "models_directed_test.json": [
        *(f"test_mds_core_{i}" for i in range(1, 5)), "test_mds_2",
        "test_rnn_cell_1", "test_rnn_cell_2", "test_lstm_cell_1"],
}
#: their published gradients in ``k`` are not those of the published definition (torch
#: autograd through its Cholesky gives ours); the second's also ignore its own cotangents
GPR_CASES = ("test_GaussProcessRegressionLayer", "test_GaussProcessRegressionLayer_2")


def _cases(file: str) -> dict:
    return json.loads(shared_file("conformance", "published", file).read_text())


@pytest.fixture
def mapped(monkeypatch):
    for name, ctor in NEW_BLOCKS.items():
        monkeypatch.setitem(conformance.BLOCKS, name, ctor)


@pytest.mark.parametrize("backend", [NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")],
                         ids=["numpy", "torch"])
def test_published_cases_match(mapped, backend):
    for file, names in NEW_CASES.items():
        cases = _cases(file)
        got = {n: conformance.run_case(cases[n], backend) for n in names}
        assert got == dict.fromkeys(names, "ok"), (file, got)


def test_gpr_cases_match_but_for_the_kernel_gradient(mapped):
    """Outputs and the gradients of label, s, mu and k_star match the published data (with
    all three outputs' cotangents 1, as the published runner took them); k's gradient there
    differs from torch autograd of the published definition in its antisymmetric part only."""
    cases = _cases("models_directed_test.json")
    for name in GPR_CASES:  # (the runner takes each case's own cotangents)
        assert "grad k" in conformance.run_case(cases[name], NumpyBackend(dtype="float64"))
    case = cases[GPR_CASES[0]]
    ins = {k: np.asarray(v, np.float64) for k, v in case["inputs"].items()}
    m = ml.Model()
    m |= ml.GaussProcessRegressionCore()
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={k: v.shape for k, v in ins.items()},
                   trainable_keys=set(ins))
    ones = {k: np.ones(c.shapes[k]) for k in ("loss", "predictions", "confidence")}
    out, grads = c.evaluate(ins, {}, output_gradients=ones)
    want = case["results"]["grad"]
    for k in ("label", "s", "mu", "k_star"):
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-12, atol=1e-12)
    gk, wk = grads["k"], np.asarray(want["k"])
    np.testing.assert_allclose(gk + gk.T, wk + wk.T, rtol=1e-12, atol=1e-12)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in ins.items()}
    from test_published_new_blocks import _gpr

    y = _gpr(t, {})
    (tk,) = torch.autograd.grad(sum(v.sum() for v in y.values()), [t["k"]])
    np.testing.assert_allclose(gk, tk.numpy(), rtol=1e-12, atol=1e-12)


def _run(block, backend, data):
    m = ml.Model()
    m |= block(**{k: k for k in data}, output="output")
    c = ml.compile(m, backend, shapes={k: v.shape for k, v in data.items()})
    return backend.to_numpy(c.evaluate({}, {k: backend.array(v) for k, v in data.items()})["output"])


_INTS = np.array([[-9, -1, 0, 1, 7, 1 << 20]], dtype=np.int64)
_SHIFTS = np.array([[0], [1], [3], [-1]], dtype=np.int64)


@pytest.mark.parametrize("backend", [NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")],
                         ids=["numpy", "torch"])
def test_shifts_and_integer_floor_division_as_torch(backend):
    x, s = torch.tensor(_INTS), torch.tensor(_SHIFTS)
    data = {"input": _INTS, "shift": _SHIFTS}
    np.testing.assert_array_equal(_run(ml.ShiftLeft(), backend, data), (x << s).numpy())
    np.testing.assert_array_equal(_run(ml.ShiftRight(), backend, data), (x >> s).numpy())
    np.testing.assert_array_equal(_run(ml.ShiftLeft(), backend, data), np.left_shift(_INTS, _SHIFTS))
    den = np.array([[3], [-2], [5], [1]], dtype=np.int64)
    got = _run(ml.FloorDivide(), backend, {"numerator": _INTS, "denominator": den})
    np.testing.assert_array_equal(got, torch.floor_divide(x, torch.tensor(den)).numpy())
    assert got.dtype.kind == "i"
    # floats: Python's // (1.0 // 0.1 is 9.0), ±inf and NaN for a zero denominator, as torch
    num, den = np.array([1.0, -7.0, 7.5, 1.0, -1.0, 0.0]), np.array([0.1, 2.0, -2.0, 0.0, 0.0, 0.0])
    got = _run(ml.FloorDivide(), backend, {"numerator": num, "denominator": den})
    want = torch.div(torch.tensor(num), torch.tensor(den), rounding_mode="floor").numpy()
    np.testing.assert_array_equal(got, want)
    assert got[0] == 9.0


def test_integer_floor_division_by_zero_is_refused_by_name():
    m = ml.Model()
    m |= ml.FloorDivide()(numerator="a", denominator="b", output="output")
    for backend in (NumpyBackend(), TorchBackend()):
        c = ml.compile(m, backend, shapes={"a": [3], "b": [3]})
        with pytest.raises(InputValueError, match="FloorDivide: denominator 'b' holds 0"):
            c.evaluate({}, {"a": backend.array(np.array([1, 2, 3])), "b": backend.array(np.array([1, 0, 2]))})


def test_shift_takes_integers_only():
    m = ml.Model()
    m |= ml.ShiftLeft()(input="x", shift="s", output="output")
    c = ml.compile(m, NumpyBackend(), shapes={"x": [2], "s": [2]})
    with pytest.raises(ml.DTypeError, match="'x'"):
        c.evaluate({}, {"x": np.array([1.0, 2.0]), "s": np.array([1, 2])})


@pytest.mark.parametrize("make, error, match", [
    (lambda: ml.Prod(axis="rows"), TypeError, "Prod: axis must be None, an int or a tuple of ints"),
    (lambda: ml.Prod(axis=(0, 0)), ValueError, "Prod: axis must not repeat an axis"),
    (lambda: ml.Prod(keepdim=1), TypeError, "Prod: keepdim must be a bool"),
    (lambda: ml.Sum(axis=[True]), TypeError, "Sum: axis must be None"),
    (lambda: ml.MDS(prediction_dim=0), ValueError, "MDS: prediction_dim must be a positive int"),
    (lambda: ml.MDS(2, input_type="coords"), ValueError, "MDS: input_type must be one of"),
    (lambda: ml.MDSCore(robust="yes"), TypeError, "MDSCore: robust must be a bool"),
    (lambda: ml.RowsOf("middle"), ValueError, "RowsOf: part must be 'head' or 'tail'"),
])
def test_bad_arguments_are_refused_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("block, shapes, match", [
    (ml.Prod(axis=2), {"input": [3, 4]}, "Prod: axis 2 is out of range for an input of rank 2"),
    (ml.GaussProcessRegressionCore(), {"label": [3, 1], "s": [1], "k": [3, 2], "k_star": [3, 3],
                                      "mu": [3, 1]}, "'input' must be a square matrix"),
    (ml.PublishedRNNCell(), {"input": [4, 1, 2], "prev_hidden": [3, 1, 3], "w_ih": [3, 2],
                             "w_hh": [3, 3], "bias_h": [3], "w_ho": [2, 3], "bias_o": [2]},
     "RowsOf: 'like' \\[4, 1, 2\\] has more rows than 'input' \\[3, 1, 3\\]"),
    (ml.FloorDivide(), {"numerator": [3], "denominator": [4]}, "do not broadcast"),
])
def test_bad_shapes_are_refused_by_name(block, shapes, match):
    m = ml.Model()
    m |= block
    with pytest.raises(ml.ShapeError, match=match):
        ml.compile(m, NumpyBackend(), shapes=shapes)


@pytest.mark.slow
def test_published_cases_and_shifts_on_jax():
    """The same published cases on JAX float64 (x64 is process-global: a subprocess)."""
    here = Path(__file__).resolve().parent
    res = json.loads(run_python(f"""
        import json, sys
        sys.path.insert(0, {str(here)!r})
        import test_published_conformance as c
        import test_published_new_blocks_cases as t
        from mithril.backends import JaxBackend
        c.BLOCKS.update(t.NEW_BLOCKS)
        b = JaxBackend(dtype="float64")
        print(json.dumps({{f: {{n: c.run_case(t._cases(f)[n], b) for n in names}}
                          for f, names in t.NEW_CASES.items()}}))
    """, timeout=600).strip().splitlines()[-1])
    for file, names in NEW_CASES.items():
        assert res[file] == dict.fromkeys(names, "ok"), (file, res[file])
