"""Backends: array creation, seeding, dtypes, torch in-place updates, JAX compilation caching."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, run_python, to_np

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend

# float64 on JAX turns on x64 for the whole process: tested in a subprocess below
IN_PROCESS_DTYPES = [(name, dt) for name in BACKENDS
                     for dt in ("float16", "bfloat16", "float32", "float64")
                     if (name, dt) != ("jax", "float64")]


def _mlp():
    model = ml.MLP(["relu", None], [6, 3])
    model.set_shapes(input=[None, 4])
    return model


# -- creation ------------------------------------------------------------------------------------
def test_creation_functions(backend):
    b = backend
    for fn in (b.randn, b.rand, b.zeros, b.ones):
        a, c = fn(2, 3), fn((2, 3))
        assert b.is_native(a) and tuple(a.shape) == (2, 3) == tuple(c.shape)
        assert b.dtype_name(a) == "float32"
    np.testing.assert_array_equal(to_np(b, b.zeros(3, 2)), 0)
    np.testing.assert_array_equal(to_np(b, b.ones(4)), 1)
    u = to_np(b, b.rand(1000))
    assert u.min() >= 0 and u.max() < 1 and 0.4 < u.mean() < 0.6
    n = to_np(b, b.randn(4000))
    assert abs(n.mean()) < 0.1 and 0.9 < n.std() < 1.1
    x = b.randn(3, 5)
    for like, value in ((b.zeros_like, 0), (b.ones_like, 1)):
        y = like(x)
        assert b.is_native(y) and tuple(y.shape) == (3, 5) and b.dtype_name(y) == "float32"
        np.testing.assert_array_equal(to_np(b, y), value)
    assert tuple(b.randn().shape) == ()
    ints = b.randint(0, 5, 100)
    assert "int" in b.dtype_name(ints) and set(np.unique(to_np(b, ints))) <= set(range(5))


def test_array_and_to_numpy_round_trip(backend):
    b = backend
    data = np.arange(6.0).reshape(2, 3)
    a = b.array(data)
    assert b.is_native(a) and b.dtype_name(a) == "float32"
    back = b.to_numpy(a)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_array_equal(back, data)
    assert b.dtype_name(b.array([[1.5, 2.5]])) == "float32"
    i = b.array([1, 2, 3])
    assert "int" in b.dtype_name(i)
    np.testing.assert_array_equal(b.to_numpy(i), [1, 2, 3])
    assert b.dtype_name(b.array(data, dtype="float16")) == "float16"
    s = b.array(np.float64(2.5))
    assert tuple(s.shape) == () and float(b.to_numpy(s)) == 2.5
    for low in ("float16", "bfloat16"):  # native floats of another dtype take the backend's
        assert b.dtype_name(b.array(b.array(data, dtype=low))) == "float32"


def test_set_seed_reproduces_draws_on_every_backend():
    draws = {}
    for name, cls in BACKENDS.items():
        b = cls(seed=5)
        first = (to_np(b, b.randn(3, 4)), to_np(b, b.rand(5)))
        b.set_seed(5)
        again = (to_np(b, b.randn(3, 4)), to_np(b, b.rand(5)))
        for x, y in zip(first, again, strict=True):
            np.testing.assert_array_equal(x, y)
        b.set_seed(6)
        assert not np.allclose(first[0], to_np(b, b.randn(3, 4)))
        draws[name] = first
    for name in ("jax", "torch"):  # one generator behind every backend
        for x, y in zip(draws["numpy"], draws[name], strict=True):
            np.testing.assert_array_equal(x, y)


def test_to_torch():
    import jax.numpy as jnp
    import torch

    tb = TorchBackend()
    for src in (np.arange(4.0), jnp.arange(4.0), torch.arange(4.0), [0.0, 1.0, 2.0, 3.0]):
        t = tb.to_torch(src)
        assert isinstance(t, torch.Tensor) and t.device == tb.device
        np.testing.assert_array_equal(t.numpy(), [0, 1, 2, 3])


def test_invalid_dtype_is_refused(backend_cls):
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend_cls(dtype="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend_cls(dtype="float8")


# -- dtypes --------------------------------------------------------------------------------------
def test_dtype_constants_are_the_names():
    assert (ml.float16, ml.bfloat16, ml.float32, ml.float64) == (
        "float16", "bfloat16", "float32", "float64")
    assert NumpyBackend(dtype=ml.float16).dtype == "float16"
    assert NumpyBackend(dtype=np.dtype("float64")).dtype == "float64"


@pytest.mark.parametrize("name, dtype", IN_PROCESS_DTYPES)
def test_dtype_end_to_end(name, dtype):
    b = BACKENDS[name](dtype=getattr(ml, dtype), seed=0)
    assert b.dtype == dtype
    for arr in (b.randn(2, 3), b.rand(2), b.zeros(2), b.ones(2), b.array([1.0, 2.0]),
                b.zeros_like(b.randn(2)), b.ones_like(b.randn(2))):
        assert b.dtype_name(arr) == dtype
    compiled = ml.compile(_mlp(), b)
    params = compiled.get_parameters()
    assert {b.dtype_name(p) for p in params.values()} == {dtype}
    x = {"input": b.randn(5, 4)}
    out = compiled.evaluate(params, x)["output"]
    outs, grads = compiled.evaluate(params, x, output_gradients={"output": b.ones(5, 3)})
    assert b.dtype_name(out) == b.dtype_name(outs["output"]) == dtype
    assert {b.dtype_name(g) for g in grads.values()} == {dtype}
    # the values agree with float64 NumPy within the dtype's precision
    ref_b = NumpyBackend(dtype="float64")
    ref = ml.compile(_mlp(), ref_b)
    ref_p = {k: to_np(b, v) for k, v in params.items()}
    ref_out = ref.evaluate(ref_p, {"input": to_np(b, x["input"])})["output"]
    tol = {"float16": 1e-2, "bfloat16": 6e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(to_np(b, out), ref_out, rtol=tol, atol=tol)


def test_jax_float64_in_a_subprocess():
    out = run_python("""
        import numpy as np, jax, mithril as ml
        from mithril.backends import JaxBackend, NumpyBackend
        b = JaxBackend(dtype=ml.float64, seed=0)
        assert jax.config.jax_enable_x64
        model = ml.MLP(["tanh", None], [6, 3]); model.set_shapes(input=[None, 4])
        c = ml.compile(model, b)
        p = c.get_parameters()
        x = {"input": b.randn(5, 4)}
        out, g = c.evaluate(p, x, output_gradients={"output": b.ones(5, 3)})
        assert {str(v.dtype) for v in (*p.values(), *g.values(), out["output"], b.rand(2))} == {"float64"}
        model = ml.MLP(["tanh", None], [6, 3]); model.set_shapes(input=[None, 4])
        n = NumpyBackend(dtype="float64", seed=0)
        cn = ml.compile(model, n)
        ref_out, ref_g = cn.evaluate(cn.get_parameters(), {"input": n.randn(5, 4)},
                                     output_gradients={"output": n.ones(5, 3)})
        np.testing.assert_allclose(np.asarray(out["output"]), ref_out["output"], rtol=1e-12)
        for k in ref_g:
            np.testing.assert_allclose(np.asarray(g[k]), ref_g[k], rtol=1e-12, atol=1e-14)
        print("ok")
    """)
    assert out.strip() == "ok"


# -- torch: parameters are leaves a torch.optim optimizer updates in place -----------------------
def test_torch_parameters_work_with_torch_optim():
    import torch

    b = TorchBackend(seed=0)
    compiled = ml.compile(_mlp(), b)
    params = compiled.get_parameters()
    assert all(p.is_leaf for p in params.values())
    x = {"input": b.randn(8, 4)}
    before = compiled.evaluate(params, x)["output"].clone()
    snapshot = {k: v.clone() for k, v in params.items()}

    opt = torch.optim.SGD(params.values(), lr=0.1)
    outputs, grads = compiled.evaluate(params, x, output_gradients={"output": b.ones(8, 3)})
    assert not outputs["output"].requires_grad and all(not g.requires_grad for g in grads.values())
    for name, grad in grads.items():
        params[name].grad = b.to_torch(grad)
    ids = {k: id(v) for k, v in params.items()}
    opt.step()
    for k, v in params.items():
        assert id(v) == ids[k]  # updated in place
        torch.testing.assert_close(v, snapshot[k] - 0.1 * grads[k])
    # the compiled model holds the same tensors: the next evaluate sees the update
    again = compiled.get_parameters()
    assert all(again[k] is params[k] for k in params)
    after = compiled.evaluate(params, x)["output"]
    assert not torch.allclose(before, after)
    expected = compiled.evaluate({k: v.clone() for k, v in params.items()}, x)["output"]
    torch.testing.assert_close(after, expected)
    # sum(output) went down: the step followed the negative gradient
    assert after.sum() < before.sum()


def test_torch_adam_over_several_steps_lowers_the_loss():
    import torch

    b = TorchBackend(seed=1)
    compiled = ml.compile(_mlp(), b)
    params = compiled.get_parameters()
    x, target = b.randn(16, 4), b.randn(16, 3)
    opt = torch.optim.Adam([{"params": list(params.values())}], lr=0.01)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = compiled.evaluate(params, {"input": x})["output"]
        losses.append(float(((out - target) ** 2).mean()))
        _, grads = compiled.evaluate(params, {"input": x},
                                     output_gradients={"output": 2 * (out - target) / out.numel()})
        for name, grad in grads.items():
            params[name].grad = b.to_torch(grad)
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


# -- JAX: one compilation per input shape -----------------------------------------------------------
class CountingTanh(ml.Tanh):
    """Tanh that counts how often its forward runs in Python (once per JAX trace)."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, xp, input):
        self.calls += 1
        return super().forward(xp, input)


@pytest.mark.parametrize("jit", [True, False])
def test_jax_compiles_once_per_input_shape(jit):
    counter = CountingTanh()
    model = ml.Model()
    model += ml.Linear(3)
    model += counter
    b = JaxBackend()
    compiled = ml.compile(model, b, shapes={"input": [None, 4]}, jit=jit)
    params = compiled.get_parameters()
    x8, x5 = b.randn(8, 4), b.randn(5, 4)
    for _ in range(3):
        compiled.evaluate(params, {"input": x8})
    assert counter.calls == (1 if jit else 3)
    for _ in range(3):
        compiled.evaluate(params, {"input": x8}, output_gradients={"output": b.ones(8, 3)})
    assert counter.calls == (2 if jit else 6)  # forward+VJP is its own function
    for _ in range(3):
        compiled.evaluate(params, {"input": x5})
        compiled.evaluate(params, {"input": x5}, output_gradients={"output": b.ones(5, 3)})
    assert counter.calls == (4 if jit else 12)  # a new batch size: one more trace of each
    # new parameter values (same shapes) reuse the compiled functions
    params = {k: v * 2 for k, v in params.items()}
    compiled.evaluate(params, {"input": x8}, output_gradients={"output": b.ones(8, 3)})
    compiled.evaluate(params, {"input": np.ones((8, 4), np.float32)})  # converted, same shape
    assert counter.calls == (4 if jit else 14)
