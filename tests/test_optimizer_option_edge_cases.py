"""Optimizer options at their edges, against the peer in each test: adaptive clipping of a
parameter without elements (optax), EMA and SWA together (torch's AveragedModel, each average
its own buffer) and a group's float16 epsilon that rounds to zero (refused as the optimizer's)."""

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


@pytest.mark.parametrize("backend, dtype", [("torch-ops", "float64"), ("torch", "bfloat16"),
                                            ("numpy", "float64")])
def test_ema_and_swa_together_match_torch_averaged_models(backend, dtype):
    # the tensor-op engine (torch on CUDA; forced here on CPU) wrapped one host buffer
    # for both averages: the EMA and the SWA mean were one array, averaged twice a step
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    rng = np.random.default_rng(3)
    p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(8)]
    tdt = getattr(torch, dtype)
    model = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.tensor(v, dtype=tdt))
                                    for k, v in p0.items()})
    topt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    swa_model = AveragedModel(model)
    with on(backend, "float64" if dtype == "float64" else "float32"):
        opt = mo.SGD(0.1, momentum=0.9, ema_decay=0.7, swa_start=3)

        def nat(v):
            return native(backend, v) if dtype == "float64" else torch.tensor(v, dtype=tdt)

        params = {k: nat(v) for k, v in p0.items()}
        state = opt.init(params)
        for t, g in enumerate(grads, start=1):
            params, state = opt.update(params, {k: nat(v) for k, v in g.items()}, state)
            for k, p in model.items():
                p.grad = torch.tensor(g[k], dtype=tdt)
            topt.step()
            ema_model.update_parameters(model)
            if t >= 3:
                swa_model.update_parameters(model)
    tol = 1e-12 if dtype == "float64" else 2e-2
    ema, swa = opt.ema_params(state), opt.swa_params(state)
    for k in p0:
        want_ema = ema_model.module[k].detach().double().numpy()
        want_swa = swa_model.module[k].detach().double().numpy()
        got_ema, got_swa = (host(a[k].double() if hasattr(a[k], "double") else a[k])
                            for a in (ema, swa))
        assert rel_err(got_ema, want_ema) <= tol, k
        assert rel_err(got_swa, want_swa) <= tol, k


@pytest.mark.parametrize("wrap", [False, True])
def test_a_groups_float16_epsilon_that_rounds_to_zero_is_refused_as_the_optimizers(wrap):
    # torch.optim.Adam on float16 with eps=1e-9 (0 in float16) gives NaN on a zero gradient;
    # the optimizer-wide epsilon was refused for that, a group's passed and gave NaN params
    import torch

    p = torch.ones(3, dtype=torch.float16, requires_grad=True)
    p.grad = torch.zeros(3, dtype=torch.float16)
    torch.optim.Adam([p], lr=0.01, eps=1e-9).step()
    assert torch.isnan(p).all()

    inner = mo.Adam(0.01, epsilon=1e-4, param_groups=[{"params": ["b"], "epsilon": 1e-9}])
    opt = mo.Lookahead(inner) if wrap else inner
    params = {"w": np.ones(3, np.float16), "b": np.ones(3, np.float16)}
    state = opt.init(params)
    zeros = {"w": np.zeros(3, np.float16), "b": np.zeros(3, np.float16)}
    with pytest.raises(ValueError, match=r"param_groups\[0\]: epsilon=1e-09 is 0 in float16"):
        opt.update(params, zeros, state)
    assert state.step == 0
    np.testing.assert_array_equal(params["b"], np.ones(3, np.float16))
    with pytest.raises(ValueError, match=r"^epsilon=1e-09 is 0 in float16"):
        mo.Adam(0.01, epsilon=1e-9).update(params, zeros, mo.Adam(0.01, epsilon=1e-9).init(params))
    inner.hyperparameter("epsilon", group=0).set_learning_rate(1e-4)  # a valid one steps
    params, state = opt.update(params, zeros, state)
    assert state.step == 1 and np.isfinite(params["b"]).all()
