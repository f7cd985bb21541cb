"""``max`` / ``min`` inside a ``tensor_update`` traced by JAX (``traced_ops.traceable_update``:
the optax transformation's program, the jitted tensorwise engine) follow Python's rule,
as the eager update (NumPy floats, torch's ``.item()``) does: the first argument unless a
later one is greater (smaller), so a NaN after the first is passed over."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

from mithril.utils.optimizers.traced_ops import traceable_update  # noqa: E402


def _extremes(a: Any, b: Any, c: Any) -> tuple:
    return max(a, b), min(a, b), max(a, b, c), min(a, b, c)


CASES = [(1.0, math.nan, 0.5), (math.nan, 1.0, 2.0), (1.0, 2.0, math.nan), (3.0, -1.0, 2.0),
         (-0.0, 0.0, -0.0)]


@pytest.mark.parametrize("a,b,c", CASES)
def test_as_python_on_floats(a: float, b: float, c: float) -> None:
    want = _extremes(a, b, c)
    traced = traceable_update(_extremes)
    got = jax.jit(lambda x, y, z: traced(x, y, z))(*map(jnp.float32, (a, b, c)))
    for w, g in zip(want, got):
        assert (math.isnan(w) and np.isnan(g)) or (w == float(g) and math.copysign(
            1, w) == math.copysign(1, float(g))), (want, got)
    # a Python float beside a traced one, either side
    got = jax.jit(lambda y: traced(a, y, c))(jnp.float32(b))
    assert [math.isnan(w) for w in want] == [bool(np.isnan(g)) for g in got]


def test_elementwise_on_arrays() -> None:
    traced = traceable_update(_extremes)
    x = jnp.asarray([1.0, np.nan, 3.0])
    y = jnp.asarray([np.nan, 2.0, 1.0])
    hi, lo, _, _ = traced(x, y, x)
    np.testing.assert_array_equal(np.asarray(hi), [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(np.asarray(lo), [1.0, np.nan, 1.0])
