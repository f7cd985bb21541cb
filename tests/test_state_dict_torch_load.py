"""``state_dict(state, arrays="torch")`` goes through ``torch.save`` / ``torch.load(weights_only=
True)`` (torch's default since 2.6) with no allowed globals, and resumes bit for bit.

The default (NumPy) dict is refused by that load: pickled NumPy arrays need the global
``numpy._core.multiarray._reconstruct`` (and ``numpy.ndarray``, ``numpy.dtype``), which the
weights-only unpickler refuses unless allowed (``torch.serialization.safe_globals``). The
torch dict holds only what it accepts: CPU tensors and plain Python values (found with
``torch.serialization.get_unsafe_globals_in_checkpoint``: none). Tested on the NumPy, torch
and JAX backends (JAX also in bfloat16, whose slots go as torch bfloat16 bit for bit), with an
EMA, an SWA, a parameter group and a parameter that missed steps, and a Lookahead.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

import mithril.utils.optimizers as mo

SHAPES = {"w": (3, 4), "b": (4,)}
K, N = 3, 3


def native(backend: str, a, dtype: str):
    if backend == "torch":
        return torch.tensor(a, dtype=getattr(torch, dtype))
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a, dtype=dtype)
    return np.array(a, dtype=dtype)


def host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()
    return np.asarray(x).astype(np.float32) if str(np.asarray(x).dtype) == "bfloat16" \
        else np.array(x)


def make(kind: str):
    adam = mo.Adam(0.05, ema_decay=0.9, swa_start=2,
                   param_groups=[{"params": ["b"], "learning_rate": 0.01}])
    return mo.Lookahead(adam, sync_period=2) if kind == "lookahead" else adam


def run(kind: str, backend: str, dtype: str, save_at: int | None):
    """K + N steps ('b' without a gradient at steps 1 and 4, noted missed); with
    ``save_at``, the run goes through torch.save / torch.load there into fresh objects."""
    rng = np.random.default_rng(0)
    opt = make(kind)
    params = {k: native(backend, rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    state = opt.init(params)
    for t in range(K + N):
        if t == save_at:
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(state, arrays="torch"),
                        "params": {k: torch.from_numpy(host(v)) for k, v in params.items()}},
                       buf)
            buf.seek(0)
            assert torch.serialization.get_unsafe_globals_in_checkpoint(buf) == []
            buf.seek(0)
            ck = torch.load(buf, weights_only=True)
            opt = make(kind)
            opt.set_learning_rate(123.0)  # (restored by the load)
            params = {k: native(backend, v.numpy(), dtype) for k, v in ck["params"].items()}
            state = opt.load_state_dict(ck["opt"], params)
        g = {k: native(backend, rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
        if t in (1, 4):
            del g["b"]
        params, state = opt.update(params, g, state)
        if t in (1, 4):
            state.note_missed(["b"])
    return params, opt.state_dict(state)


@pytest.mark.parametrize("kind, backend, dtype", [
    ("adam", "numpy", "float64"), ("adam", "torch", "float32"), ("adam", "jax", "float32"),
    ("adam", "jax", "bfloat16"), ("lookahead", "numpy", "float32"),
    ("lookahead", "torch", "float64")])
def test_torch_save_and_weights_only_load_resume_bit_for_bit(kind, backend, dtype):
    want_params, want = run(kind, backend, dtype, None)
    got_params, got = run(kind, backend, dtype, K)
    assert got["missed"] == want["missed"] == {"b": 2}
    for k in ("step", "averaged", "hyperparameters", "consecutive_skips"):
        assert got.get(k) == want.get(k), k
    for k in SHAPES:
        np.testing.assert_array_equal(host(got_params[k]), host(want_params[k]))
    for s, per in want["slots"].items():
        for n, a in per.items():
            assert got["slots"][s][n].dtype == a.dtype
            np.testing.assert_array_equal(host(got["slots"][s][n]), host(a), err_msg=f"{s}/{n}")


def test_bfloat16_slots_go_as_torch_bfloat16_bit_for_bit():
    import jax.numpy as jnp

    opt = mo.Adam(0.1)
    params = {"w": jnp.asarray(np.linspace(-1, 1, 6), dtype=jnp.bfloat16)}
    params, state = opt.update(params, {"w": jnp.full(6, 0.3, jnp.bfloat16)}, opt.init(params))
    as_numpy, as_torch = opt.state_dict(state), opt.state_dict(state, arrays="torch")
    for s in state.slots:
        a, t = as_numpy["slots"][s]["w"], as_torch["slots"][s]["w"]
        assert str(a.dtype) == "bfloat16" and t.dtype == torch.bfloat16
        np.testing.assert_array_equal(t.view(torch.int16).numpy(), a.view(np.int16))


def test_the_numpy_dict_needs_allowed_globals():
    """What torch refuses in the default dict, and that the torch one needs nothing."""
    opt = mo.Adam(0.1)
    params = {"w": np.ones(3, np.float32)}
    params, state = opt.update(params, {"w": np.ones(3, np.float32)}, opt.init(params))
    buf = io.BytesIO()
    torch.save(opt.state_dict(state), buf)
    buf.seek(0)
    refused = torch.serialization.get_unsafe_globals_in_checkpoint(buf)
    assert "numpy._core.multiarray._reconstruct" in refused and "numpy.ndarray" in refused
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="_reconstruct"):
        torch.load(buf, weights_only=True)
    as_torch = opt.state_dict(state, arrays="torch")
    assert all(type(a) is torch.Tensor and a.device.type == "cpu"
               for per in as_torch["slots"].values() for a in per.values())
    assert {k: v for k, v in as_torch.items() if k != "slots"} == {
        k: v for k, v in opt.state_dict(state).items() if k != "slots"}
    as_torch["slots"]["m"]["w"] += 1  # (its own copy: the state is not changed)
    np.testing.assert_array_equal(state.slot("m")["w"], opt.state_dict(state)["slots"]["m"]["w"])
    with pytest.raises(ValueError, match="arrays must be 'numpy' or 'torch', got 'jax'"):
        opt.state_dict(state, arrays="jax")
