"""The published Mithril's ``no_grad_inference_test.json`` (``../shared/conformance/published``):
a model of three inputs declared differentiable (``assigned_differentiabilities``, here
``Model.set_differentiability``) and three outputs, evaluated with output gradients for only
some outputs. The others need no gradient: nothing flows back from them. As the published
``test_no_grad_inference``, the outputs and the gradients (one per declared input, no more)
must match; here also torch autograd's with ``grad_outputs`` for the same outputs only, and
``CompiledModel.reached_parameters`` names the inputs those outputs reach.

Built with the same reading of the published model specs as the models_directed cases
(``test_mithril_api._build`` with the conformance table), compiled with no ``trainable_keys``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared_file
from test_mithril_api import _build
from test_published_conformance import BLOCKS

import mithril as ml

CASES = json.loads(shared_file("conformance", "published", "no_grad_inference_test.json").read_text())
#: NumPy and torch in float64 at the published tolerance; JAX in float32 (x64 is
#: process-global), whose results here are exact too (small integers)
BACKENDS = {"numpy": lambda: ml.NumpyBackend(dtype="float64"),
            "torch": lambda: ml.TorchBackend(dtype="float64"),
            "jax": lambda: ml.JaxBackend(dtype="float32")}
TOL = 1e-14


def _torch_reference(inputs: dict, cots: dict) -> tuple[dict, dict]:
    """The cases' model in torch: output1 = i1·i2 + (i2 + i3), output2 = (i2 + i3)·(i1·i3),
    output3 = i1·i3; gradients of the outputs given cotangents only."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in inputs.items()}
    s = t["input2"] + t["input3"]
    outs = {"output1": t["input1"] * t["input2"] + s, "output2": s * (t["input1"] * t["input3"]),
            "output3": t["input1"] * t["input3"]}
    keys = list(cots)
    grads = torch.autograd.grad([outs[k] for k in keys], list(t.values()),
                                [torch.tensor(cots[k], dtype=torch.float64) for k in keys],
                                allow_unused=True)
    return ({k: v.detach().numpy() for k, v in outs.items()},
            {k: g.numpy() for k, g in zip(t, grads, strict=True) if g is not None})


@pytest.mark.parametrize("backend_name", list(BACKENDS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_no_grad_inference_case(name, backend_name):
    case = CASES[name]
    b = BACKENDS[backend_name]()
    inputs = {k: np.asarray(v, dtype=np.float64) for k, v in case["inputs"].items()}
    cots = {k: np.asarray(v, dtype=np.float64) for k, v in case["output_grads"].items()}
    model = _build(case["model"], inputs, BLOCKS)[0]
    compiled = ml.compile(model, b, shapes={k: v.shape for k, v in inputs.items()})
    declared = {k for k, flag in case["model"]["assigned_differentiabilities"] if flag}
    assert set(compiled.parameter_shapes) == declared and compiled.input_keys == ()
    assert set(compiled.reached_parameters(cots)) == set(case["results"]["grad"])
    out, grads = compiled.evaluate({k: b.array(v) for k, v in inputs.items()}, {},
                                   output_gradients={k: b.array(v) for k, v in cots.items()})
    want_out, want_grads = _torch_reference(inputs, cots)
    assert set(out) == set(case["results"]["eval"]) and set(grads) == set(case["results"]["grad"])
    tol = TOL if backend_name != "jax" else 0.0
    for k, v in case["results"]["eval"].items():
        np.testing.assert_allclose(b.to_numpy(out[k]), v, rtol=tol, atol=tol)
        np.testing.assert_allclose(b.to_numpy(out[k]), want_out[k], rtol=tol, atol=tol)
    for k, v in case["results"]["grad"].items():
        np.testing.assert_allclose(b.to_numpy(grads[k]), v, rtol=tol, atol=tol)
        np.testing.assert_allclose(b.to_numpy(grads[k]), want_grads[k], rtol=tol, atol=tol)


def test_an_output_reaching_fewer_inputs():
    """The cases' model with a cotangent for output3 = input1·input3 alone: input2 is not
    reached (reached_parameters leaves it out) and its gradient is 0, as torch's (which
    gives None there: it is unused)."""
    case = CASES["test_no_grad_1"]
    inputs = {k: np.asarray(v, dtype=np.float64) for k, v in case["inputs"].items()}
    compiled = ml.compile(_build(case["model"], inputs, BLOCKS)[0], ml.NumpyBackend(dtype="float64"),
                          shapes={k: v.shape for k, v in inputs.items()})
    assert compiled.reached_parameters("output3") == ("input1", "input3")
    _, grads = compiled.evaluate(inputs, {}, output_gradients={"output3": np.array([2.0])})
    _, want = _torch_reference(inputs, {"output3": [2.0]})
    assert set(want) == {"input1", "input3"}
    for k in ("input1", "input3"):
        np.testing.assert_allclose(grads[k], want[k], rtol=0, atol=0)
    np.testing.assert_array_equal(grads["input2"], [0.0])
