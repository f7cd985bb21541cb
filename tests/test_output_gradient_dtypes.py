"""Output gradients that do not fit their output: a cotangent for an integer or bool output
(torch refuses ``backward`` into an integer tensor, ``jax.grad`` an int output; ``jax.vjp``
takes it and gives zeros), of the wrong shape or dtype, or for a key that is no output: each a clear library
error naming the key, raised before anything runs or changes, on NumPy, torch and JAX, with
torch's and JAX's own refusals checked side by side. The gradients of the float outputs
match torch autograd."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mithril as ml
from mithril.models import Buffer, Cast, Linear, Model

BACKENDS = (ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend)
rng = np.random.default_rng(0)
W = rng.standard_normal((2, 4)).astype(np.float32)
B = rng.standard_normal(2).astype(np.float32)
X = rng.standard_normal((3, 4)).astype(np.float32)
LABELS = np.array([2, 0, 1])
G = rng.standard_normal((3, 2)).astype(np.float32)


def _model() -> Model:
    """y = x W^T + b (float), lab = labels (int, moved by Buffer), yi = int64(y),
    yb = bool(y), xc = x (float, reached by no parameter), yd = dropout(y) (a training-mode
    call advances the step counter)."""
    m = Model()
    m |= Linear(2).connect(input="x", output="y")
    m |= Buffer().connect(input="labels", output="lab")
    m |= Cast("int64").connect(input="y", output="yi")
    m |= Cast("bool").connect(input="y", output="yb")
    m |= Buffer().connect(input="x", output="xc")
    m |= ml.models.Dropout(0.5).connect(input="y", output="yd")
    return m


def _compiled(backend_cls, shapes: bool = True):
    b = backend_cls()
    return b, ml.compile(_model(), b, shapes={"x": (3, 4), "labels": (3,)} if shapes else None)


def _params(b):
    return {"linear.weight": b.array(W), "linear.bias": b.array(B)}


def _data(b):
    return {"x": b.array(X), "labels": b.array(LABELS) if b.name != "numpy" else LABELS}


def test_peers_refuse_a_float_cotangent_for_an_integer_output():
    """What the peers do: torch's backward into an int tensor and jax.grad of an int output
    raise; jax.vjp's pullback takes a float cotangent for an int output silently."""
    w = torch.tensor(W, requires_grad=True)
    y = torch.tensor(X) @ w.T
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.backward(y.to(torch.int64), torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="only Tensors of floating point"):
        torch.tensor(LABELS).requires_grad_(True)
    with pytest.raises(TypeError, match="grad requires real-valued outputs"):
        jax.grad(lambda w: jnp.sum((jnp.asarray(X) @ w.T).astype(jnp.int32)))(jnp.asarray(W))
    # jax.vjp (0.10) takes the float cotangent and gives zeros: we refuse it, as torch does
    _, pullback = jax.vjp(lambda w: (jnp.asarray(X) @ w.T).astype(jnp.int32), jnp.asarray(W))
    np.testing.assert_array_equal(np.asarray(pullback(jnp.ones((3, 2), jnp.float32))[0]), 0)


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("key", ["lab", "yi", "yb"])
def test_integer_or_bool_output_cotangent_is_refused(backend_cls, key):
    """A float cotangent for an int / bool output: a DTypeError naming the output and both
    dtypes; the model's step, cached cotangents and the caller's arrays are unchanged, and
    the next call (without it) gives torch autograd's gradients."""
    b, c = _compiled(backend_cls)
    params, data = _params(b), _data(b)
    before = {k: b.to_numpy(v).copy() for k, v in params.items()}
    c.evaluate(params, data, output_gradients={"y": b.array(G)})  # advances the step
    step, last = c.step, c._last_cots
    assert step == 1
    # ('lab' is the labels as given: JAX's int32, or int64 where another test left x64 on)
    lab = str(b.to_numpy(data["labels"]).dtype)
    out_dtype = {"lab": lab, "yi": "int64", "yb": "bool"}[key]
    with pytest.raises(ml.DTypeError, match=f"output gradient '{key}': output '{key}' has dtype "
                                            f"{out_dtype}, which has no gradient \\(got a float32"):
        c.evaluate(params, data, output_gradients={"y": b.array(G), key: b.array(np.ones_like(G[:, 0] if key == "lab" else G))})
    assert c.step == step and c._last_cots is last
    for k, v in params.items():
        np.testing.assert_array_equal(b.to_numpy(v), before[k])
    _, grads = c.evaluate(params, data, output_gradients={"y": b.array(G)})
    assert c.step == step + 1
    w = torch.tensor(W, requires_grad=True)
    bias = torch.tensor(B, requires_grad=True)
    (torch.tensor(X) @ w.T + bias).backward(torch.tensor(G))
    np.testing.assert_allclose(b.to_numpy(grads["linear.weight"]), w.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.to_numpy(grads["linear.bias"]), bias.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda c: c.__name__)
def test_refused_on_the_first_call_of_a_model_compiled_without_shapes(backend_cls):
    """Without shapes the first evaluate builds the program; a refused call leaves it unbuilt."""
    b, c = _compiled(backend_cls, shapes=False)
    with pytest.raises(ml.DTypeError, match="output gradient 'yi'"):
        c.evaluate(_params(b), _data(b), output_gradients={"yi": np.ones((3, 2), np.float32)})
    with pytest.raises(ml.ShapeError, match="call evaluate"):
        c.program  # noqa: B018 - still deferred
    out = c.evaluate(_params(b), _data(b))
    np.testing.assert_allclose(b.to_numpy(out["y"]), X @ W.T + B, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda c: c.__name__)
def test_other_cotangent_mismatches(backend_cls):
    """Wrong shape: ShapeError; a key that is no output: KeyMismatchError; a float64
    cotangent for a float32 output: DTypeError; each naming the key."""
    b, c = _compiled(backend_cls)
    params, data = _params(b), _data(b)
    with pytest.raises(ml.ShapeError, match=r"output gradient 'y': expected shape \[3, 2\], got \[2, 3\]"):
        c.evaluate(params, data, output_gradients={"y": b.array(G.T.copy())})
    with pytest.raises(ml.KeyMismatchError, match=r"unknown key\(s\) \['x'\]"):
        c.evaluate(params, data, output_gradients={"x": b.array(X)})
    with pytest.raises(ml.DTypeError, match="output gradient 'y': expected dtype float32, got float64"):
        c.evaluate(params, data, output_gradients={"y": G.astype(np.float64)})
    # an integer cotangent for an integer output: still no gradient there
    with pytest.raises(ml.DTypeError, match="output 'lab' has dtype"):
        c.evaluate(params, data, output_gradients={"lab": LABELS})


@pytest.mark.parametrize("backend_cls", BACKENDS, ids=lambda c: c.__name__)
def test_float_output_no_parameter_reaches_gets_zero_gradients_as_jax_vjp(backend_cls):
    """A float output no parameter reaches (xc = x) takes a cotangent and contributes
    nothing, as jax.vjp gives zeros there (torch refuses backward into a tensor without a
    grad_fn: we follow JAX and the published Mithril)."""
    b, c = _compiled(backend_cls)
    gx = rng.standard_normal((3, 4)).astype(np.float32)
    _, grads = c.evaluate(_params(b), _data(b), output_gradients={"y": b.array(G), "xc": b.array(gx)})

    def f(w, bias):
        return jnp.asarray(X) @ w.T + bias, jnp.asarray(X) + 0 * jnp.sum(w)

    _, pullback = jax.vjp(f, jnp.asarray(W), jnp.asarray(B))
    gw, gb = pullback((jnp.asarray(G), jnp.asarray(gx)))
    np.testing.assert_allclose(b.to_numpy(grads["linear.weight"]), np.asarray(gw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.to_numpy(grads["linear.bias"]), np.asarray(gb), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.backward([torch.tensor(X)], [torch.tensor(gx)])
