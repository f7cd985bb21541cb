"""Fixes of the sixty-fifth session's review that fall outside the hunters' own files."""

from __future__ import annotations

import numpy as np
import pytest

import mithril as ml

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}


def _draws(name: str, dtype: str) -> np.ndarray:
    from mithril.models import Randn

    m = ml.Model()
    m |= Randn(shape=(4000,), key=7).connect(output="z")
    m.expose_keys("z")
    be = BACKENDS[name](dtype=dtype)
    out = ml.compile(m, be, inference=True).evaluate({}, {})
    return np.asarray(be.to_numpy(out["z"]), dtype=np.float64)


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_randn_in_half_precision_is_the_wide_draw_rounded(name, dtype):
    """Randn in float16 / bfloat16 gives the float64 draws to the half dtype's rounding (one
    ulp), on every backend (JAX drew in the half dtype: 2**24 is inf in float16, so every
    value was inf or NaN, and bfloat16's uniforms lost their bits)."""
    want = _draws("numpy", "float64")
    got = _draws(name, dtype)
    assert np.isfinite(got).all()
    ulp = 2.0 ** (-10 if dtype == "float16" else -7)
    np.testing.assert_allclose(got, want, rtol=ulp, atol=1e-6)  # atol: float32 cos near its zeros
