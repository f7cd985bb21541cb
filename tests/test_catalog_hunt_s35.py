"""Bugs found by running the optimizer catalog side by side with torch.optim, optax and
Keras 3 over odd settings (the thirty-fifth session's hunt). Each test compares real numbers
with the peer in the same test."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import host, native
from optimizer_parity import on, rel_err

import mithril.utils.optimizers as mo


@pytest.mark.parametrize("backend", ["numpy", "jax-jit", "torch-ops"])
def test_adaptive_clip_with_an_empty_parameter_matches_optax(backend):
    # an empty (4, 0) parameter has 0 units: reshape(-1, 0) raised on the jitted JAX engine
    # and the tensor-op engine; optax.adaptive_grad_clip leaves it alone
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((3, 2)), "e": np.zeros((4, 0)), "f": np.zeros((2, 0, 3))}
    grads = [{"w": rng.standard_normal((3, 2)) * 5, "e": np.zeros((4, 0)),
              "f": np.zeros((2, 0, 3))} for _ in range(3)]
    p0 = {k: v.astype(np.float32) for k, v in p0.items()}
    grads = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads]
    tx = optax.chain(optax.adaptive_grad_clip(0.1), optax.sgd(0.5))
    ref = {k: jnp.asarray(v) for k, v in p0.items()}
    ostate = tx.init(ref)
    with on(backend, "float32"):
        opt = mo.SGD(0.5, adaptive_clip=0.1)
        params = {k: native(backend, v) for k, v in p0.items()}
        state = opt.init(params)
        for g in grads:
            params, state = opt.update(params, {k: native(backend, v) for k, v in g.items()},
                                       state)
            upd, ostate = tx.update({k: jnp.asarray(v) for k, v in g.items()}, ostate, ref)
            ref = optax.apply_updates(ref, upd)
    for k in p0:
        assert host(params[k]).shape == p0[k].shape
    assert rel_err(host(params["w"]), np.asarray(ref["w"])) <= 1e-6
