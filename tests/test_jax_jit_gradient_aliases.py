"""The jitted JAX engine donates the params it returned; a gradient that *is* one of those
arrays (``opt.update(p, dict(p), st)``, or another parameter's array of the same shape) is
read from a copy: the step equals the NumPy engine's on the same numbers, where it raised
XLA's "buffer that was previously donated"."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import optimizer_engine

from mithril.utils.optimizers import SGD, Adam

pytest.importorskip("jax")


@pytest.mark.parametrize("Opt", [Adam, SGD], ids=lambda o: o.__name__)
def test_params_given_as_their_own_or_each_others_gradients(Opt):
    import jax.numpy as jnp

    start = {"a": np.arange(3, dtype=np.float32), "b": np.array([1.0, -2.0, 0.5], np.float32)}
    with optimizer_engine("jax-jit"):
        p = {k: jnp.asarray(v) for k, v in start.items()}
        opt = Opt(learning_rate=0.1)
        st = opt.init(p)
        p, st = opt.update(p, {k: jnp.full(3, 0.5, jnp.float32) for k in p}, st)
        p, st = opt.update(p, dict(p), st)  # each its own gradient (the fast path)
        p, st = opt.update(p, {"a": p["b"], "b": p["a"]}, st)  # each the other's
        got = {k: np.asarray(v) for k, v in p.items()}
    q = {k: v.copy() for k, v in start.items()}
    ref = Opt(learning_rate=0.1)
    s = ref.init(q)
    q, s = ref.update(q, {k: np.full(3, 0.5, np.float32) for k in q}, s)
    q, s = ref.update(q, {k: v.copy() for k, v in q.items()}, s)
    q, s = ref.update(q, {"a": q["b"].copy(), "b": q["a"].copy()}, s)
    for k in q:
        np.testing.assert_allclose(got[k], q[k], rtol=1e-6, atol=1e-7)
    assert st.step == 3
