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
