"""Hessian-vector products and Hutchinson's diagonal estimate (mithril.utils.hessian) on a
small MLP + cross-entropy, float64: against ``torch.autograd.functional.hvp`` of the same
torch model, against central differences of the gradients, across backends (JAX and torch
exact, NumPy's differences ~1e-10), and the Hutchinson estimate against optax's
``hutchinson_estimator_diag_hessian`` with the same key; bad input refused by name."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from conftest import jax_float64

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.hessian import hessian_vector_product, hutchinson_diagonal, rademacher_like

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
OBSERVED: dict[str, float] = {}
W0, B0, W1, B1 = ("mlp.linear_0.weight", "mlp.linear_0.bias", "mlp.linear_1.weight",
                  "mlp.linear_1.bias")


def mlp_model(dropout: bool = False) -> ml.Model:
    model = ml.Model()
    model |= ml.MLP(["tanh", None], [5, 3])(input="input", output="logits")
    if dropout:
        model |= ml.Dropout(0.5)(input="logits", output=ml.IOKey("dropped", expose=False))
    model |= ml.CrossEntropy()(input="dropped" if dropout else "logits", target="target",
                               output=ml.IOKey("loss"))
    model |= ml.Softmax()(input="logits", output=ml.IOKey("probs"))
    return model


def torch_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p[W0].T + p[B0])
    return F.cross_entropy(h @ p[W1].T + p[B1], y)


def jnp_loss(p: dict, x, y):
    h = jnp.tanh(x @ p[W0].T + p[B0])
    logits = h @ p[W1].T + p[B1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def setup(seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    shapes = {W0: (5, 4), B0: (5,), W1: (3, 5), B1: (3,)}
    p0 = {k: rng.standard_normal(s) * 0.7 for k, s in shapes.items()}
    x, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    v0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return p0, x, y, v0


def ours(name: str, what: str, seed: int = 0, key_or_seed=None) -> dict[str, np.ndarray]:
    """Our product (``what="hvp"``) or Hutchinson estimate (``"diag"``) on backend ``name``."""
    p0, x, y, v0 = setup(seed)
    be = BACKENDS[name](dtype="float64")
    c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
    p = {k: be.array(v) for k, v in p0.items()}
    data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
    if what == "hvp":
        out = hessian_vector_product(c, p, data, {k: be.array(v) for k, v in v0.items()},
                                     loss="loss")
    else:
        out = hutchinson_diagonal(c, p, data, key_or_seed, loss="loss")
    assert all(type(v) is type(p[W0]) and str(v.dtype).endswith("float64")
               for v in out.values())
    return {k: np.array(be.to_numpy(v)) for k, v in out.items()}


def torch_hvp(seed: int = 0) -> dict[str, np.ndarray]:
    p0, x, y, v0 = setup(seed)
    tp = {k: torch.tensor(v) for k, v in p0.items()}

    def f(*ps):
        return torch_loss(dict(zip(tp, ps)), torch.tensor(x), torch.tensor(y))

    _, hv = torch.autograd.functional.hvp(f, tuple(tp.values()),
                                          tuple(torch.tensor(v0[k]) for k in tp))
    return {k: h.numpy() for k, h in zip(tp, hv)}


def diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_hvp_equals_torch_autograd_functional_hvp(name):
    with jax_float64():
        err = diff(ours(name, "hvp"), torch_hvp())
    OBSERVED[f"hvp/{name}"] = err
    assert err <= (1e-9 if name == "numpy" else 1e-13), err


def test_hvp_equals_central_differences_of_the_gradients():
    """The exact product (JAX) against (∇L(p + εv) − ∇L(p − εv)) / 2ε of torch's gradients
    at ε = 1e-5 (error ~ε²·‖∇³L‖)."""
    p0, x, y, v0 = setup(1)
    eps = 1e-5

    def grad(sign):
        tp = {k: torch.tensor(p0[k] + sign * eps * v0[k], requires_grad=True) for k in p0}
        g = torch.autograd.grad(torch_loss(tp, torch.tensor(x), torch.tensor(y)),
                                list(tp.values()))
        return {k: t.numpy() for k, t in zip(tp, g)}

    hi, lo = grad(1.0), grad(-1.0)
    fd = {k: (hi[k] - lo[k]) / (2 * eps) for k in p0}
    with jax_float64():
        assert diff(ours("jax", "hvp", 1), fd) <= 1e-8


def test_hvp_across_backends():
    with jax_float64():
        got = {n: ours(n, "hvp", 2) for n in BACKENDS}
    assert diff(got["torch"], got["jax"]) <= 1e-14
    assert diff(got["numpy"], got["jax"]) <= 1e-9


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_hutchinson_equals_optax_estimator_with_the_same_key(name):
    """optax splits its state's key and draws the signs from the second half: ours draws
    them from the key it is given, so it is given that half."""
    p0, x, y, _ = setup(3)
    key = jax.random.PRNGKey(11)
    with jax_float64():
        est = optax.contrib.hutchinson_estimator_diag_hessian(key)
        pj = {k: jnp.asarray(v) for k, v in p0.items()}
        obj = functools.partial(jnp_loss, x=jnp.asarray(x), y=jnp.asarray(y))
        theirs, new = est.update(None, est.init(pj), pj, obj_fn=obj)
        next_key, sub = jax.random.split(key)
        assert np.array_equal(np.asarray(new.key), np.asarray(next_key))
        got = ours(name, "diag", 3, sub)
    theirs = {k: np.asarray(v) for k, v in theirs.items()}
    err = diff(got, theirs)
    OBSERVED[f"hutchinson/{name}"] = err
    assert err <= (3e-9 if name == "numpy" else 1e-13), err  # (NumPy: 8.6e-10 seen)


def test_rademacher_signs_are_optax_random_like_and_the_same_on_every_backend():
    p0, *_ = setup()
    key = jax.random.PRNGKey(5)
    with jax_float64():
        want = optax.tree.random_like(key, {k: jnp.asarray(v) for k, v in p0.items()},
                                      jax.random.rademacher, dtype=jnp.float32)
        for be in BACKENDS.values():
            b = be(dtype="float64")
            got = rademacher_like({k: b.array(v) for k, v in p0.items()}, key)
            assert all(np.array_equal(b.to_numpy(got[k]), np.asarray(want[k])) for k in p0)
            by_seed = rademacher_like({k: b.array(v) for k, v in p0.items()}, 3)
            first = rademacher_like(p0, np.random.default_rng(3))
            assert all(np.array_equal(b.to_numpy(by_seed[k]), first[k]) for k in p0)
    assert {float(v) for a in first.values() for v in np.ravel(a)} == {-1.0, 1.0}


def test_hutchinson_averages_to_the_hessian_diagonal():
    """Unbiased: the mean over 1000 draws is within a few standard errors of diag(H) (JAX's
    jax.hessian of the same loss)."""
    p0, x, y, _ = setup(4)
    with jax_float64():
        pj = {k: jnp.asarray(v) for k, v in p0.items()}
        hess = jax.hessian(functools.partial(jnp_loss, x=jnp.asarray(x), y=jnp.asarray(y)))(pj)
        diag = {k: np.diagonal(np.asarray(hess[k][k]).reshape(v.size, v.size)).reshape(v.shape)
                for k, v in p0.items()}
        be = JaxBackend(dtype="float64")
        c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
        p = {k: be.array(v) for k, v in p0.items()}
        data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
        keys = jax.random.split(jax.random.PRNGKey(0), 1000)
        draws = {k: [] for k in p0}
        for k in keys:
            for n, v in hutchinson_diagonal(c, p, data, k, loss="loss").items():
                draws[n].append(np.asarray(v))
    for n in p0:
        d = np.stack(draws[n])
        se = d.std(0) / np.sqrt(len(d)) + 1e-12
        assert (np.abs(d.mean(0) - diag[n]) <= 5 * se).all(), n


def test_float32_backends_agree():
    p0, x, y, v0 = setup(5)
    got = {}
    for name, cls in BACKENDS.items():
        be = cls(dtype="float32")
        c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
        p = {k: be.array(v.astype(np.float32)) for k, v in p0.items()}
        data = {"input": be.array(x.astype(np.float32)), "target": be.array(y, be.int_dtype)}
        hv = hessian_vector_product(c, p, data, {k: v.astype(np.float32) for k, v in v0.items()},
                                    loss="loss")
        assert all(str(v.dtype).endswith("float32") for v in hv.values())
        got[name] = {k: np.asarray(be.to_numpy(v), np.float64) for k, v in hv.items()}
    assert diff(got["torch"], got["jax"]) <= 1e-5
    assert diff(got["numpy"], got["jax"]) <= 1e-3  # (differences in float32: ~ε^⅔)


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_is_refused_by_name():
    p0, x, y, v0 = setup()
    be = NumpyBackend(dtype="float64")
    c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
    data = {"input": x, "target": y}
    cases = [
        ({k: v for k, v in v0.items() if k != B1}, KeyMismatchError,
         rf"missing \['{B1}'\]"),
        ({**v0, "extra": v0[B1]}, KeyMismatchError, r"unknown \['extra'\]"),
        ({**v0, W0: np.ones((4, 5))}, ShapeError, rf"vectors\['{W0}'\] has shape \(4, 5\)"),
        ({**v0, B0: [1.0] * 5}, TypeError, rf"vectors\['{B0}'\] must be an array"),
        ({**v0, B0: np.array(["a"] * 5)}, TypeError, rf"vectors\['{B0}'\] must be numeric"),
        ([1.0], TypeError, "vectors must be a dict"),
    ]
    for vectors, err, msg in cases:
        with pytest.raises(err, match=msg):
            hessian_vector_product(c, p0, data, vectors, loss="loss")
    with pytest.raises(KeyMismatchError, match="loss 'nope' is not an output"):
        hessian_vector_product(c, p0, data, v0, loss="nope")
    with pytest.raises(ShapeError, match="'probs' must be a scalar output"):
        hessian_vector_product(c, p0, data, v0, loss="probs")
    with pytest.raises(KeyMismatchError, match="final_cost"):  # (two outputs: name the loss)
        hessian_vector_product(c, p0, data, v0)
    with pytest.raises(KeyMismatchError, match="target"):
        hessian_vector_product(c, p0, {"input": x}, v0, loss="loss")
    with pytest.raises(TypeError, match=rf"params\['{W0}'\] is a ndarray, not a torch"):
        rademacher_like(p0, 0, backend=TorchBackend(dtype="float64"))
    with pytest.raises(TypeError, match="seed_or_key must be"):
        hutchinson_diagonal(c, p0, data, 1.5, loss="loss")
    with pytest.raises(TypeError, match="compiled model"):
        hessian_vector_product(object(), p0, data, v0, loss="loss")
    dropped = ml.compile(mlp_model(dropout=True), be, shapes={"input": [8, 4]})
    with pytest.raises(TypeError, match="Dropout, BatchNorm"):
        hutchinson_diagonal(dropped, p0, data, 0, loss="loss")
    assert c.step == 0 and dropped.step == 0


def test_numpy_fd_step_is_checked_and_used():
    p0, x, y, v0 = setup()
    c = ml.compile(mlp_model(), NumpyBackend(dtype="float64"), shapes={"input": [8, 4]})
    data = {"input": x, "target": y}
    with pytest.raises(ValueError, match="fd_step"):
        hessian_vector_product(c, p0, data, v0, loss="loss", fd_step=-1.0)
    coarse = hessian_vector_product(c, p0, data, v0, loss="loss", fd_step=1e-2)
    fine = hessian_vector_product(c, p0, data, v0, loss="loss")
    assert 1e-7 < diff(coarse, fine) < 1e-2  # (O(r²) of a coarse step)
    zero = hessian_vector_product(c, p0, data, {k: np.zeros_like(v) for k, v in v0.items()},
                                  loss="loss")
    assert all(not v.any() for v in zero.values())
