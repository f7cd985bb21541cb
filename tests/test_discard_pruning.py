"""``compile(discard_keys=...)`` prunes as the published ``infer_ignore``: the blocks no output
left reads go, with the parameters they own and the inputs only they read (so
``parameter_shapes``, ``input_keys`` and ``randomize_params`` no longer list them), while a
discarded output another block reads, and a block that updates state, stay. What remains
computes what torch computes for the model without the discarded head, gradients included,
on NumPy, torch and JAX; a pruned key given to ``evaluate`` is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import BatchNorm1D, Linear, LogisticRegression, Model, Relu

_RNG = np.random.default_rng(7)
_X, _X2 = _RNG.standard_normal((4, 3)), _RNG.standard_normal((4, 5))
_G = _RNG.standard_normal((4, 2))
BACKENDS = [pytest.param(lambda: NumpyBackend(dtype="float64"), id="numpy"),
            pytest.param(lambda: TorchBackend(dtype="float64"), id="torch"),
            pytest.param(lambda: JaxBackend(dtype="float32"), id="jax")]


def _two_heads() -> Model:
    """y1 = relu(x W1ᵀ + b1) (x shared), y2 = x2 W2ᵀ + b2 + x W3ᵀ + b3, y3 = x2 W4ᵀ + b4."""
    m = Model()
    m |= Linear(2).connect(input="x", output=ml.IOKey("h1", expose=False))
    m |= Relu().connect(input="h1", output="y1")
    m |= Linear(2).connect(input="x2", output=ml.IOKey("h2", expose=False))
    m |= Linear(2).connect(input="x", output=ml.IOKey("h3", expose=False))
    m |= ml.Add().connect(left="h2", right="h3", output="y2")
    m |= Linear(2).connect(input="x2", output="y3")
    return m


def _compile(backend, **kw):
    return ml.compile(_two_heads(), backend, shapes={"x": [4, 3], "x2": [4, 5]}, **kw)


@pytest.mark.parametrize("make", BACKENDS)
def test_the_discarded_heads_blocks_inputs_and_parameters_go(make):
    backend = make()
    full = _compile(backend)
    c = _compile(backend, discard_keys=["y2", "y3"])
    assert set(full.parameter_shapes) == {f"linear_{i}.{r}" for i in range(4) for r in ("weight", "bias")}
    assert list(c.parameter_shapes) == ["linear_0.weight", "linear_0.bias"]
    assert c.input_keys == ("x",) and c.output_keys == ("y1",)
    assert [n.path for n in c.program.nodes] == ["linear_0", "relu"]
    assert c.program.pruned == ("x2", *(f"linear_{i}.{r}" for i in (1, 2, 3) for r in ("weight", "bias")))
    params = c.randomize_params()
    assert sorted(params) == ["linear_0.bias", "linear_0.weight"]
    # what remains is torch's relu(linear(x)), gradients included
    p = {k: backend.to_numpy(v).astype(np.float64) for k, v in params.items()}
    out, grads = c.evaluate(params, {"x": backend.array(_X)}, output_gradients={"y1": backend.array(_G)})
    w, b = (torch.tensor(p[f"linear_0.{r}"], requires_grad=True) for r in ("weight", "bias"))
    y = torch.relu(torch.tensor(_X) @ w.T + b)
    gw, gb = torch.autograd.grad(y, [w, b], torch.tensor(_G))
    tol = 1e-12 if backend.name != "jax" else 1e-5
    np.testing.assert_allclose(backend.to_numpy(out["y1"]), y.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(grads["linear_0.weight"]), gw.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(backend.to_numpy(grads["linear_0.bias"]), gb.numpy(), rtol=tol, atol=tol)


def test_a_pruned_key_given_to_evaluate_is_refused_by_name():
    """The published ignores keys it does not read; here a key nothing reads any more is an
    unknown key (it would otherwise be trained on a gradient of 0 without a word)."""
    backend = NumpyBackend(dtype="float64")
    c = _compile(backend, discard_keys=["y2", "y3"])
    params = c.randomize_params()
    with pytest.raises(ml.KeyMismatchError, match=r"\['x2'\] only fed blocks that compile\(discard_keys"):
        c.evaluate(params, {"x": _X, "x2": _X2})
    with pytest.raises(ml.KeyMismatchError, match=r"\['linear_1.weight'\] only fed blocks"):
        c.evaluate({**params, "linear_1.weight": np.zeros((2, 5))}, {"x": _X})
    out = c.evaluate(params, {"x": _X})  # (nothing changed by the refused calls)
    np.testing.assert_allclose(out["y1"], np.maximum(_X @ params["linear_0.weight"].T
                                                     + params["linear_0.bias"], 0), rtol=1e-12)


def test_a_shared_input_stays_and_only_the_unread_parameters_go():
    c = _compile(NumpyBackend(dtype="float64"), discard_keys=["y3"])
    assert c.input_keys == ("x", "x2") and c.program.pruned == ("linear_3.weight", "linear_3.bias")
    assert "linear_3.weight" not in c.parameter_shapes and "linear_2.weight" in c.parameter_shapes
    c = _compile(NumpyBackend(dtype="float64"), discard_keys=["y1", "y3"])
    assert c.input_keys == ("x", "x2") and "linear_0.weight" not in c.parameter_shapes


def test_key_sets_naming_a_pruned_key_are_accepted_and_unused():
    """A trainable, data or constant key only the discarded head reads compiles (the
    published ignores it) and is neither a parameter nor an input."""
    backend = NumpyBackend(dtype="float64")
    c = _compile(backend, discard_keys=["y2", "y3"], trainable_keys=["x2"])
    assert "x2" not in c.parameter_shapes and "x2" not in c.input_keys
    c = _compile(backend, discard_keys=["y2", "y3"], constant_keys={"x2": _X2})
    assert "x2" not in c.program.constants and c.input_keys == ("x",)
    c = _compile(backend, discard_keys=["y2", "y3"], data_keys=["linear_3.weight"])
    assert c.input_keys == ("x",)


def test_a_discarded_output_another_block_reads_stays_computed():
    """LogisticRegression's logit discarded: the probabilities still need it."""
    backend = NumpyBackend(dtype="float64")
    c = ml.compile(LogisticRegression(), backend, shapes={"input": [4, 3]}, discard_keys=["output"])
    assert c.output_keys == ("probs_output",) and list(c.parameter_shapes) == ["linear.weight", "linear.bias"]
    p = c.randomize_params()
    logit = torch.tensor(_X) @ torch.tensor(p["linear.weight"]).T + torch.tensor(p["linear.bias"])
    np.testing.assert_allclose(c.evaluate(p, {"input": _X})["probs_output"],
                               torch.sigmoid(logit).numpy(), rtol=1e-12)


def test_a_block_that_updates_state_stays():
    """A BatchNorm whose output is discarded still updates its running statistics, as
    torch's module does in training (its forward runs)."""
    m = Model()
    m |= Linear(3).connect(input="x", output="h")
    m |= BatchNorm1D(3).connect(input="h", output="bn")
    m |= Relu().connect(input="h", output="y")
    c = ml.compile(m, NumpyBackend(dtype="float64"), shapes={"x": [4, 3]}, discard_keys=["bn"])
    assert [n.path for n in c.program.nodes] == ["linear", "batch_norm1_d", "relu"]
    p = c.randomize_params()
    out, state = c.evaluate(p, {"x": _X}, state=c.initial_state_dict)
    assert set(out) == {"h", "y"}
    bn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    bn.train()
    bn(torch.tensor(out["h"]))
    np.testing.assert_allclose(state["batch_norm1_d.running_mean"], bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(state["batch_norm1_d.running_var"], bn.running_var.numpy(), rtol=1e-12)


def test_without_discard_keys_nothing_is_pruned():
    """An output nothing reads is still computed when no key is discarded."""
    c = _compile(NumpyBackend(dtype="float64"))
    assert len(c.program.nodes) == 6 and c.program.pruned == ()
