"""The public backend objects called directly, side by side with NumPy, torch and jax.numpy:
array creation, randomness, conversions from other frameworks, devices and copies."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

BACKENDS = (ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend)


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", np.int16, ml.int64])
def test_continuous_draws_refuse_an_integer_dtype(backend_cls, dtype):
    # torch.rand / torch.randn / jax.random.uniform / normal refuse an integer dtype; the
    # helpers truncated the samples instead (rand: all zeros)
    with pytest.raises(NotImplementedError):
        torch.rand(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="float"):
        jax.random.normal(jax.random.PRNGKey(0), (4,), dtype=jax.numpy.int32)
    b = backend_cls(seed=0)
    for call in (lambda: b.rand(4, dtype=dtype), lambda: b.randn(4, dtype=dtype),
                 lambda: b.rand_uniform(0, 5, 4, dtype=dtype)):
        with pytest.raises(ml.DTypeError, match="float dtype"):
            call()
    # nothing was drawn: the stream continues as NumPy's from the seed
    np.testing.assert_allclose(b.to_numpy(b.rand(4)),
                               np.random.default_rng(0).random(4), rtol=1e-6)
    b64 = backend_cls(dtype="float64", seed=1)
    np.testing.assert_array_equal(b64.to_numpy(b64.randn(3, dtype="float64")),
                                  np.random.default_rng(1).standard_normal(3))


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_randint_refuses_bounds_outside_its_dtype(backend_cls):
    # torch and NumPy refuse a range the dtype cannot hold; the helper wrapped the draws
    with pytest.raises(RuntimeError, match="out of bounds"):
        torch.randint(0, 300, (3,), dtype=torch.uint8)
    with pytest.raises(ValueError, match="out of bounds"):
        np.random.default_rng(0).integers(0, 2**40, 3, dtype=np.int32)
    b = backend_cls(seed=0)
    for low, high, dt in ((0, 300, "uint8"), (0, 2**40, "int32"), (-1, 3, "uint8"),
                          (0, 3, "bool"), (-129, 0, "int8")):
        with pytest.raises(ValueError, match=f"range of {dt}"):
            b.randint(low, high, 3, dtype=dt)
    with pytest.raises(TypeError, match="low must be an int"):
        b.randint(0.5, 10, 3)  # (torch refuses a float bound; NumPy would truncate it)
    with pytest.raises(TypeError):
        torch.randint(0.5, 10, (3,))
    # nothing was drawn; in-range bounds give NumPy's integers, in the dtype asked for
    want = np.random.default_rng(0).integers(0, 256, 5)
    got = b.randint(0, 256, 5, dtype="uint8")
    assert b.dtype_name(got) == "uint8"
    np.testing.assert_array_equal(b.to_numpy(got), want)
    np.testing.assert_array_equal(b.to_numpy(b.randint(np.int64(2), 4, 3, key=3)),
                                  np.random.default_rng(3).integers(2, 4, 3))
    assert b.to_numpy(b.randint(0, 2, 4, dtype="bool", key=0)).dtype == np.bool_


def test_a_device_that_is_not_here_is_refused_when_the_backend_is_made():
    # torch.device("cuda") is accepted on a machine without CUDA; the backend then failed at
    # its first tensor, deep inside (AssertionError: Torch not compiled with CUDA enabled)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    torch.device("cuda")  # (torch accepts the name) ...
    with pytest.raises(AssertionError):
        torch.zeros(2, device="cuda")  # ... and fails at the first tensor
    for device in ("cuda", "cuda:0", 0, "gpu"):
        with pytest.raises(ValueError, match=r"TorchBackend\(device=.*no such torch device"):
            ml.TorchBackend(device=device)
    b = ml.TorchBackend(dtype="float64")
    with pytest.raises(ValueError, match=r"to_device\(device='cuda'\).*devices present: \['cpu'\]"):
        b.to_device(b.ones(2), "cuda")
    assert ml.TorchBackend(device=None).device == torch.device("cpu")  # (the default)
    assert b.to_device(b.ones(2), "cpu").device.type == "cpu"
    # JAX names its platforms: a missing one is a ValueError naming the argument too
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(RuntimeError):
            jax.local_devices(backend="cuda")
        with pytest.raises(ValueError, match=r"JaxBackend\(device='cuda'\).*platforms present"):
            ml.JaxBackend(device="cuda")
        with pytest.raises(ValueError, match=r"to_device\(device='gpu'\)"):
            ml.JaxBackend().to_device(np.ones(2), "gpu")
    # a backend made for the CPU runs a model on it as before
    from mithril.models import Linear

    compiled = ml.compile(Linear(3), ml.TorchBackend(dtype="float64", device="cpu"),
                          shapes={"input": [2, 4]})
    params = compiled.get_parameters()
    x = np.arange(8.0).reshape(2, 4)
    out = compiled.evaluate(params, {"input": x})["output"]
    w, bias = params["linear.weight"], params["linear.bias"]
    np.testing.assert_allclose(out.numpy(), x @ w.numpy().T + bias.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend_cls", [ml.NumpyBackend, ml.JaxBackend])
def test_torch_tensors_into_the_numpy_and_jax_backends(backend_cls):
    # np.asarray refuses a bfloat16 tensor and one that requires grad: array() and to_numpy()
    # raised torch's TypeError / RuntimeError; they take them as torch's .detach() values
    bf = torch.tensor([1.5, -2.25, 3.140625, 1e-3], dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        np.asarray(bf)
    want_bf = bf.float().numpy()
    b = backend_cls(dtype="float64")
    got = b.array(bf)  # float data in the backend dtype, the same values
    assert b.dtype_name(got) == "float64"
    np.testing.assert_array_equal(b.to_numpy(got), want_bf.astype(np.float64))
    kept = b.array(bf, dtype="bfloat16")  # the same bits
    assert b.dtype_name(kept) == "bfloat16"
    np.testing.assert_array_equal(b.to_numpy(kept).astype(np.float32), want_bf)
    assert b.to_numpy(bf).astype(np.float32).tolist() == want_bf.tolist()
    w = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True).reshape(2, 3)
    with pytest.raises(RuntimeError, match="requires grad"):
        np.asarray(w)
    np.testing.assert_array_equal(b.to_numpy(b.array(w)), w.detach().numpy())
    np.testing.assert_array_equal(b.to_numpy(w), w.detach().numpy())
    i = torch.arange(4, dtype=torch.int32)
    assert b.dtype_name(b.array(i)) == "int32"
    # a model evaluated on the backend with torch tensors as its input
    from mithril.models import Linear

    c = ml.compile(Linear(2), b, shapes={"input": [2, 3]})
    params = c.get_parameters()
    out = c.evaluate(params, {"input": b.array(w)})["output"]
    ref = torch.nn.functional.linear(w.detach(), torch.tensor(np.array(params["linear.weight"])),
                                     torch.tensor(np.array(params["linear.bias"])))
    np.testing.assert_allclose(b.to_numpy(out), ref.numpy(), rtol=1e-12)


def _aligned(n: int, dtype: type) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    buf = np.empty(n * size + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + n * size].view(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_jax_backend_array_does_not_alias_the_callers_buffer(dtype):
    # jnp.asarray(a, dtype=...) on the CPU keeps a 64-byte aligned host buffer (a torch
    # tensor's, a large NumPy array's) without a copy: the "immutable" jax.Array then changed
    # when the caller wrote into its buffer (a reused batch buffer); jnp.array copies
    b = ml.JaxBackend(dtype=dtype)
    u = _aligned(256, np.dtype(dtype).type)
    u[:] = 1.0
    ref = jax.numpy.array(u)
    x = b.array(u)
    u[0] = 100.0
    assert float(ref[0]) == 1.0 and float(x[0]) == 1.0
    t = torch.ones(256, dtype=getattr(torch, dtype))
    y = b.array(t)
    t[0] = 7.0
    assert float(y[0]) == 1.0
    # the same input array gives the same output after the caller wrote the tensor again
    from mithril.models import Linear

    c = ml.compile(Linear(2), b, shapes={"input": [128, 2]}, jit=False)
    params = c.get_parameters()
    batch = torch.ones(128, 2, dtype=getattr(torch, dtype))
    xb = b.array(batch)
    first = np.array(c.evaluate(params, {"input": xb})["output"])
    batch.fill_(5.0)
    np.testing.assert_array_equal(np.array(c.evaluate(params, {"input": xb})["output"]), first)
    w, bias = (np.asarray(params[k], dtype=np.float64) for k in ("linear.weight", "linear.bias"))
    np.testing.assert_allclose(first, np.ones((128, 2)) @ w.T + bias,
                               rtol=1e-6 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_a_backend_deep_copies_and_pickles(backend_cls):
    # the NumPy backend copied and pickled; torch's and JAX's raised (cannot pickle 'module'
    # object / 'Device' object), and so did copy.deepcopy of an optimizer bound to them,
    # where copy.deepcopy(torch.optim.Adam(...)) works
    import copy
    import pickle

    from mithril.utils.optimizers import Adam

    copy.deepcopy(torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1))
    b = backend_cls(dtype="float64", seed=11)
    b.randn(4)  # (the copy continues the stream from here)
    want = np.random.default_rng(11)
    want.standard_normal(4)
    want = want.standard_normal(5)
    for clone in (copy.deepcopy(b), pickle.loads(pickle.dumps(b))):
        assert type(clone) is backend_cls and clone.dtype == "float64" and clone.seed == 11
        assert str(clone.get_device()) == str(b.get_device())
        np.testing.assert_array_equal(clone.to_numpy(clone.randn(5)), want)
        assert clone.is_native(clone.ones(2)) and clone.dtype_name(clone.ones(2)) == "float64"
    np.testing.assert_array_equal(b.to_numpy(b.randn(5)), want)  # (the original's own stream)
    opt = Adam(lr=0.1)
    params = {"w": b.ones(3)}
    state = opt.init(params)
    params, state = opt.update(params, {"w": b.ones(3)}, state)
    twin = copy.deepcopy(opt)  # (an optimizer bound to the backend)
    assert twin.hyperparameters() == opt.hyperparameters()
    fresh = {"w": b.ones(3)}
    fresh, _ = twin.update(fresh, {"w": b.ones(3)}, twin.init(fresh))
    ref = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    torch_opt = torch.optim.Adam([ref], lr=0.1)
    ref.grad = torch.ones(3, dtype=torch.float64)
    torch_opt.step()
    for p in (params, fresh):
        np.testing.assert_allclose(b.to_numpy(p["w"]), ref.detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_the_backend_dtype_as_a_numpy_torch_or_jax_dtype(backend_cls):
    # the helpers took dtype=np.float64 / torch.float64 / jnp.float64; the backend itself
    # refused them (ValueError "dtype must be one of ..."), where torch and NumPy take them
    import ml_dtypes

    assert torch.zeros(2, dtype=torch.float64).dtype == torch.float64
    for dt, name in ((np.float64, "float64"), (torch.float64, "float64"),
                     (jax.numpy.float64, "float64"), (np.dtype("float16"), "float16"),
                     (torch.bfloat16, "bfloat16"), (ml_dtypes.bfloat16, "bfloat16"),
                     (ml.float64, "float64")):
        b = backend_cls(dtype=dt, seed=2)
        assert b.dtype == name and b.dtype_name(b.randn(3)) == name
        np.testing.assert_allclose(b.to_numpy(b.randn(3)).astype(np.float64),
                                   np.random.default_rng(2).standard_normal(6)[3:],
                                   rtol=1e-2 if name in ("float16", "bfloat16") else 1e-15)
    for bad in (np.int32, torch.int64, "int32", "complex64"):
        with pytest.raises(ValueError, match="dtype must be one of"):
            backend_cls(dtype=bad)
    with pytest.raises(ValueError, match="disagree"):
        backend_cls(dtype=np.float64, precision=32)


def test_numpy_backend_takes_the_published_device_argument():
    # the published NumpyBackend(device="cpu", ...) raised TypeError (unexpected keyword)
    b = ml.NumpyBackend(device="cpu", dtype="float64")
    assert b.get_device() == "cpu" and b.dtype == "float64"
    for be in (ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend):  # one spelling for all three
        assert be(dtype="float64", seed=0, device="cpu").dtype == "float64"
    with pytest.raises(ValueError, match=r"NumpyBackend\(device='cuda'\).*CPU only"):
        ml.NumpyBackend(device="cuda")


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_relu_sort_and_topk_helpers_equal_torch(backend_cls):
    # relu turned NaN into 0 (torch.relu, jax.nn.relu and the Relu block keep it); a
    # descending sort negated its input: unsigned values wrapped ([3, 0, 200] sorted to
    # [0, 200, 3]), bool was refused, and NaN went last where torch puts it first (topk too)
    b = backend_cls(dtype="float64")
    x = np.array([[-3.0, 0.0, np.nan, 2.0], [1.0, -np.inf, np.inf, 5.0]])
    t = torch.tensor(x)
    np.testing.assert_array_equal(b.to_numpy(b.relu(b.array(x))), torch.relu(t).numpy())
    np.testing.assert_array_equal(np.asarray(jax.nn.relu(x)), torch.relu(t).numpy())
    np.testing.assert_array_equal(b.to_numpy(b.sort(b.array(x), descending=True)),
                                  torch.sort(t, descending=True).values.numpy())
    np.testing.assert_array_equal(b.to_numpy(b.sort(b.array(x), axis=0, descending=True)),
                                  torch.sort(t, dim=0, descending=True).values.numpy())
    np.testing.assert_array_equal(b.to_numpy(b.topk(b.array(x), 2)), torch.topk(t, 2).values.numpy())
    for data, dt in (([3, 0, 200, 17], torch.uint8), ([True, False, True], torch.bool),
                     ([5, -7, 2**40, 0], torch.int64)):
        ref = torch.sort(torch.tensor(data, dtype=dt), descending=True).values.numpy()
        got = b.to_numpy(b.sort(b.array(np.array(data, dtype=ref.dtype)), descending=True))
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)
    ref = torch.topk(torch.tensor([3, 0, 200, 17], dtype=torch.uint8), 2).values.numpy()
    np.testing.assert_array_equal(b.to_numpy(b.topk(b.array(np.array([3, 0, 200, 17], np.uint8)), 2)),
                                  ref)
    np.testing.assert_array_equal(b.to_numpy(b.sort(b.array(x))), torch.sort(t).values.numpy())


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_zeros_like_keeps_the_dtype_of_another_frameworks_array(backend_cls):
    # "zeros with input's shape and (unless dtype) dtype": an array of another framework
    # (or a NumPy one on torch / JAX) was first converted to the backend float dtype, so a
    # float16 or float32 input gave float64 zeros, where np / torch / jnp.zeros_like keep it
    b = backend_cls(dtype="float64")
    inputs = (np.ones((2, 3), np.float16), np.ones(4, np.float32), torch.ones(2, dtype=torch.float32),
              jax.numpy.ones(3, jax.numpy.float32), np.arange(3, dtype=np.int16))
    for x in inputs:
        want = np.zeros_like(np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x))
        assert str(jax.numpy.zeros_like(np.asarray(want)).dtype) == want.dtype.name
        for fn, fill in ((b.zeros_like, 0), (b.ones_like, 1)):
            got = fn(x)
            assert b.is_native(got) and b.dtype_name(got) == want.dtype.name, (x, fn)
            np.testing.assert_array_equal(b.to_numpy(got), want + fill)
        assert b.dtype_name(b.zeros_like(x, dtype="float64")) == "float64"
    # a list has no dtype of its own: floats in the backend dtype, as array() gives them
    assert b.dtype_name(b.ones_like([1.0, 2.0])) == "float64"
    assert b.dtype_name(b.zeros_like(b.array(np.ones(2), dtype="float16"))) == "float16"


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_multinomial_refuses_what_torch_refuses_before_drawing(backend_cls):
    # a 0-d probs was an IndexError (tuple index out of range), a zero row NumPy's "contain
    # NaN" after a RuntimeWarning, num_samples=0 an empty result: torch refuses them all
    b = backend_cls(seed=5)
    bad = ((np.array(1.0), 1, False), (np.array([[0.0, 0.0]]), 1, True),
           (np.array([[-1.0, 2.0]]), 1, True), (np.array([[np.nan, 2.0]]), 1, True),
           (np.array([[1.0, 2.0]]), 0, True), (np.array([[1.0, 2.0]]), 1.5, True))
    for probs, n, repl in bad:
        with pytest.raises((RuntimeError, TypeError)):
            torch.multinomial(torch.tensor(probs), n, replacement=repl)
        with pytest.raises(ValueError, match=r"multinomial\(\): (probs|num_samples)"):
            b.multinomial(probs, n, replacement=repl)
    # two draws without replacement from a row with one category above 0: NumPy refuses
    # (after drawing the rows before it), torch's 2-d kernel then picks a 0-probability one
    with pytest.raises(ValueError, match="non-zero"):
        np.random.default_rng(0).choice(2, 2, replace=False, p=[1.0, 0.0])
    with pytest.raises(ValueError, match="fewer than num_samples=2"):
        b.multinomial(np.array([[0.2, 0.8], [1.0, 0.0]]), 2)
    # nothing was drawn; the stream continues as NumPy's from the seed
    np.testing.assert_allclose(b.to_numpy(b.rand(3)), np.random.default_rng(5).random(3),
                               rtol=1e-6)
    # an empty batch of rows, a torch tensor that requires grad, a certain category
    assert tuple(b.multinomial(np.ones((0, 3)), 2).shape) == tuple(
        torch.multinomial(torch.ones(0, 3), 2).shape)
    p = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    np.testing.assert_array_equal(b.to_numpy(b.multinomial(p, 3, replacement=True)),
                                  torch.multinomial(p.detach(), 3, replacement=True).numpy())


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_rand_uniform_refuses_bounds_that_are_not_finite(backend_cls):
    # torch's uniform_ refuses them ("from / to is out of bounds"); the helper raised NumPy's
    # OverflowError "high - low range exceeds valid bounds", naming neither argument
    b = backend_cls(seed=4)
    for lo, hi in ((float("nan"), 1.0), (0.0, float("inf")), (-np.inf, 0.0),
                   (np.array([0.0, np.nan]), np.ones(2))):
        with pytest.raises(RuntimeError, match="out of bounds"):
            torch.empty(2).uniform_(float(np.ravel(lo)[-1]), float(np.ravel(hi)[-1]))
        with pytest.raises(ValueError, match=r"rand_uniform\(\): low and high must be finite"):
            b.rand_uniform(lo, hi, 2)
    np.testing.assert_allclose(b.to_numpy(b.rand_uniform(-1.0, 3.0, 4)),
                               np.random.default_rng(4).uniform(-1.0, 3.0, 4), rtol=1e-6)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_pad_widths_as_numpy_pad(backend_cls):
    # the torch backend cropped for a negative width (F.pad's meaning) where np.pad and
    # jnp.pad refuse it, and every backend truncated a float width where they refuse it
    b = backend_cls(dtype="float64")
    x = np.arange(6.0).reshape(2, 3)
    for pw, err in ((-1, ValueError), (((0, -1), (1, 1)), ValueError), (1.5, TypeError),
                    (True, TypeError)):
        for ref in (np.pad, jax.numpy.pad):
            with pytest.raises(err):
                ref(x, pw)
        with pytest.raises(err, match=r"pad\(\): pad_width"):
            b.pad(b.array(x), pw)
    for pw in (1, ((0, 1), (2, 0)), [[1, 1]], np.array([0, 2])):
        np.testing.assert_array_equal(b.to_numpy(b.pad(b.array(x), pw)), np.pad(x, pw))


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_mean_of_integers_and_bools_is_a_float_on_every_backend(backend_cls):
    # b.mean(pred == labels), an accuracy, raised on the torch backend only (torch.mean
    # refuses integers and bools); NumPy and JAX give a float
    with pytest.raises(RuntimeError, match="mean"):
        torch.mean(torch.tensor([True, False]))
    b = backend_cls(dtype="float64")
    pred, labels = np.array([0, 2, 1, 1]), np.array([0, 1, 1, 1])
    acc = b.mean(b.array(pred) == b.array(labels))
    assert b.dtype_name(acc) == "float64" and float(b.to_numpy(acc)) == np.mean(pred == labels)
    xi = np.arange(12).reshape(3, 4)
    for axis, keep in ((None, False), (0, True), (-1, False), ((0, 1), True)):
        got = b.mean(b.array(xi), axis=axis, keepdim=keep)
        want = np.mean(xi, axis=axis, keepdims=keep)
        assert tuple(got.shape) == want.shape
        np.testing.assert_allclose(b.to_numpy(got), want, rtol=1e-15)
    assert b.dtype_name(b.mean(b.array(np.ones(3), dtype="float16"))) == "float16"  # (floats stay)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_float_functions_of_integers_take_the_backend_float_dtype(backend_cls):
    # torch computes sin / exp / ... of integers in its default float32 and JAX in float32
    # for int32 (the JAX backend's integers), so a float64 backend gave float32 results
    assert torch.sin(torch.arange(3)).dtype == torch.float32
    assert jax.numpy.sin(jax.numpy.arange(3, dtype=jax.numpy.int32)).dtype == jax.numpy.float32
    xi = np.array([0, 1, 2, 7])
    refs = {"sin": np.sin(xi), "cos": np.cos(xi), "tanh": np.tanh(xi), "exp": np.exp(xi),
            "sqrt": np.sqrt(xi), "log": np.log(xi + 1.0), "sigmoid": 1 / (1 + np.exp(-xi)),
            "softplus": np.log1p(np.exp(xi)), "softmax": np.exp(xi) / np.exp(xi).sum()}
    for dt in ("float32", "float64"):
        b = backend_cls(dtype=dt)
        x = b.arange(4) * 0 + b.array(xi, b.int_dtype)  # (the backend's own integers)
        for name, want in refs.items():
            arg = b.array(xi + 1, b.int_dtype) if name == "log" else x
            got = getattr(b, name)(arg)
            assert b.dtype_name(got) == dt, (name, b.dtype_name(got))
            np.testing.assert_allclose(b.to_numpy(got), want, rtol=1e-6 if dt == "float32" else 1e-14)
        half = b.array(np.array([0.5]), dtype="float16")  # (floats keep their dtype)
        assert b.dtype_name(b.exp(half)) == "float16"


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_a_helpers_key_is_an_int_seed(backend_cls):
    # key=1.5 drew from seed 1, key="3" from seed 3, key=True from seed 1 and key=-1 raised
    # NumPy's "expected non-negative integer"; a JAX PRNG key, which JaxBackend(seed=key)
    # takes, was a TypeError from int()
    b = backend_cls(seed=0)
    for bad, err in ((1.5, TypeError), ("3", TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(err, match="key must be"):
            b.randn(2, key=bad)
    want = np.random.default_rng(3).standard_normal(4)
    np.testing.assert_allclose(b.to_numpy(b.randn(4, key=np.int64(3))), want, rtol=1e-6)
    if backend_cls is ml.JaxBackend:
        np.testing.assert_allclose(b.to_numpy(b.randn(4, key=jax.random.PRNGKey(3))), want,
                                   rtol=1e-6)
    # no draw touched the backend's own stream
    np.testing.assert_allclose(b.to_numpy(b.rand(2)), np.random.default_rng(0).random(2),
                               rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_same_seed_gives_the_same_half_precision_draws_on_every_backend(dtype):
    # torch rounds float64 to a half dtype through float32 (twice), NumPy and JAX once: the
    # same seed gave other float16 / bfloat16 parameters and randn draws on torch
    v = np.array([1.0 + 2**-8 + 2**-30])
    assert torch.tensor(v).to(torch.bfloat16).item() == 1.0  # (twice rounded)
    assert float(jax.numpy.asarray(v, dtype=jax.numpy.bfloat16)[0]) == 1.0078125  # (once)
    from mithril.models import Linear

    draws, params = [], []
    for backend_cls in BACKENDS:
        b = backend_cls(dtype=dtype, seed=0)
        draws.append(np.asarray(b.to_numpy(b.randn(200_000)), dtype=np.float32))
        c = ml.compile(Linear(256), b, shapes={"input": [2, 512]})
        params.append(np.asarray(b.to_numpy(c.get_parameters()["linear.weight"]), np.float32))
    ref = np.random.default_rng(0).standard_normal(200_000)
    import ml_dtypes

    want = np.asarray(ref, dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    for got in draws:
        np.testing.assert_array_equal(got, want.astype(np.float32))
    for got in params[1:]:
        np.testing.assert_array_equal(got, params[0])
