"""Mithril optimizers run directly on half-precision parameters, second pass (the first:
tests/test_hunt67_lowp_params.py): the parameter-free optimizers, ``torch_optimizer``'s
dtype checks, and side-by-side runs with optax and torch.optim."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import mithril.utils.optimizers as mo

AS = {"jax": {"bfloat16": jnp.bfloat16, "float16": jnp.float16},
      "torch": {"bfloat16": torch.bfloat16, "float16": torch.float16}}


def _arr(backend: str, a: np.ndarray, dtype: str) -> Any:
    if backend == "torch":
        return torch.tensor(a).to(AS["torch"][dtype])
    if backend == "jax":
        return jnp.asarray(a, AS["jax"][dtype])
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)


def _f32(a: Any) -> np.ndarray:
    return a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a).astype(np.float32)


def _problem(steps: int = 5, zero_first: bool = False) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 7)).astype(np.float32),
              "b": rng.standard_normal(7).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(steps)]
    if zero_first:
        grads[0] = {k: np.zeros_like(v) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("case", ["dog", "ldog", "lars", "lookahead_dog"])
def test_epsilon_of_a_sum_is_not_refused_in_float16(case, backend):
    """DoG's ε (default 1e-8) is added to the float64 running sum of squared gradient norms,
    LARS's to the trust ratio's (1 where a norm is 0): neither is a float16 element's 0/0. Yet ``update`` on float16 parameters refused them ("epsilon=1e-08 is 0 in
    float16", the Adam check) where ``optax.contrib.dog()`` runs, finite. Now they step:
    finite from a zero first gradient too (optax's DoG is NaN there: its float16 sum + 1e-8
    is 0), and equal to optax's on the same float16 parameters bit for bit (the Adam check
    itself stays: tests/test_optimizer_errors.py)."""
    ours, theirs = {
        "dog": (lambda: mo.DoG(init_step=("distance", 0.1)),
                lambda: optax.contrib.dog(init_step=("distance", 0.1))),
        "ldog": (lambda: mo.DoG(layer_wise=True), None),
        "lars": (lambda: mo.LARS(0.1, epsilon=1e-10),
                 lambda: optax.lars(0.1, eps=1e-10)),
        "lookahead_dog": (lambda: mo.Lookahead(mo.DoG(learning_rate=1.0)), None),
    }[case]
    for zero_first in (True, False):
        params, grads = _problem(zero_first=zero_first)
        opt = ours()
        p = {k: _arr(backend, v, "float16") for k, v in params.items()}
        state = opt.init(p)
        for g in grads:
            p, state = opt.update(p, {k: _arr(backend, v, "float16") for k, v in g.items()},
                                  state)
        got = {k: _f32(v) for k, v in p.items()}
        assert all(np.isfinite(v).all() for v in got.values())
        assert all(str(v.dtype).removeprefix("torch.") == "float16" for v in p.values())
    if theirs is not None:  # (with a zero first gradient optax's DoG is NaN: its float16
        # sum + 1e-8 is 0, ours a float64 1e-8; so from random gradients)
        tx = theirs()
        q = {k: jnp.asarray(v, jnp.float16) for k, v in params.items()}
        s = tx.init(q)
        for g in grads:
            u, s = tx.update({k: jnp.asarray(v, jnp.float16) for k, v in g.items()}, s, q)
            q = optax.apply_updates(q, u)
        for k in got:
            np.testing.assert_array_equal(got[k], _f32(q[k]))
        start = {k: _f32(_arr("numpy", v, "float16")) for k, v in params.items()}
        assert max(np.abs(got[k] - start[k]).max() for k in got) > 0  # (it moved)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_torch_optimizer_refuses_float8_parameters_at_construction(dtype):
    """``torch_optimizer`` refused an integer parameter at construction, but took a float8
    one (``is_floating_point()``) and refused it only at the first ``step()``, after the
    forward and backward. Now refused at construction too, naming the parameter and the
    dtypes it takes; as is a float8 one added by ``add_param_group`` (nothing added)."""
    from mithril.interop import torch_optimizer

    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    bad = torch.nn.Parameter(torch.zeros(3).to(dtype))
    with pytest.raises(TypeError, match=rf"parameter 'f8' has dtype {dtype}; .*float16, "
                                        rf"bfloat16, float32 or float64"):
        torch_optimizer(mo.SGD(0.1), [("w", w), ("f8", bad)])
    opt = torch_optimizer(mo.SGD(0.1), [w])
    with pytest.raises(TypeError, match=rf"'param1' has dtype {dtype}"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1
    w.grad = torch.ones(3, dtype=torch.float16)
    opt.step()
    assert (w.detach() == -0.1).all()


def _agc64(g: np.ndarray, p: np.ndarray, c: float, eps: float = 1e-3) -> np.ndarray:
    """optax adaptive_grad_clip of a 2-D tensor in float64 (units: the columns)."""
    g, p = g.astype(np.float64), p.astype(np.float64)
    gn, pn = np.sqrt((g * g).sum(0)), np.sqrt((p * p).sum(0))
    bound = np.maximum(pn, eps) * c
    return g * np.where(gn < bound, 1.0, bound / np.maximum(gn, 1e-6))


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_adaptive_clip_of_float16_gradients_does_not_overflow(backend):
    """``adaptive_clip`` on float16: each unit's Σ g² was summed in float16, inf past 65504
    (a unit norm past 256, 100 gradients of 60), so the factor c·‖p‖/inf was 0: the unit's
    gradient became 0 and the parameters never moved, on every backend and without a
    warning (optax's float16 ``adaptive_grad_clip`` does the same: kept below; torch's
    norms of float16 accumulate in float32, e.g. ``clip_grad_norm_``). Now the norms are
    float32: the clipped gradient and the step are those of float64 from the same float16
    values, to float16 rounding, and float16 comes back."""
    from mithril.utils.optimizers.clipping import adaptive_clip

    rng = np.random.default_rng(0)
    w = rng.standard_normal((100, 20)).astype(np.float32)
    g = (60 * rng.standard_normal((100, 20))).astype(np.float32)
    w16, g16 = w.astype(np.float16), g.astype(np.float16)
    want = _agc64(g16, w16, 0.01)
    assert np.sqrt((want ** 2).sum(0)).min() > 0.05  # (the bound: 0.01·‖p_u‖ ≈ 0.1)
    tx = optax.adaptive_grad_clip(0.01)  # (optax's float16: all zero)
    theirs, _ = tx.update({"w": jnp.asarray(g16)}, tx.init({"w": jnp.asarray(w16)}),
                          {"w": jnp.asarray(w16)})
    assert np.abs(_f32(theirs["w"])).max() == 0

    clipped = adaptive_clip(_arr(backend, g, "float16"), _arr(backend, w, "float16"), 0.01)
    assert str(clipped.dtype).removeprefix("torch.") == "float16"
    np.testing.assert_allclose(_f32(clipped), want, rtol=2e-3, atol=1e-6)

    opt = mo.SGD(1.0, adaptive_clip=0.01)
    p = {"w": _arr(backend, w, "float16")}
    out, state = opt.update(p, {"w": _arr(backend, g, "float16")}, opt.init(p))
    step = _f32(out["w"]) - w16.astype(np.float32)
    np.testing.assert_allclose(step, -want, atol=2e-3)  # (float16 ulp at |w| <= 4: 4e-3)
    assert np.abs(step).max() > 0.01


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch", "optax_transformation"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_decoupled_weight_decay_factor_is_not_rounded_to_half(dtype, backend):
    """Decoupled weight decay on half-precision parameters: ``p·(1 − lr·wd)`` took the keep
    factor as a NumPy / JAX weak scalar, rounded to the parameters' dtype first (bfloat16
    0.99 is 0.98828: 17% more decay than asked, 0.999 is 1: none), on NumPy, the jitted
    JAX engine (its later fast steps too), ``optax_transformation`` and torch's parameter
    groups; torch.optim.AdamW (``param.mul_(1 − lr·wd)``, in float32) and optax's
    ``adamw`` do not. Now ``p·keep`` is rounded once: with zero gradients (Adam's step 0)
    10 steps of ``AdamW`` (and of a second group with its own decay) equal the float64
    product rounded each step, and torch.optim.AdamW bit for bit."""
    from mithril.interop import optax_transformation

    rng = np.random.default_rng(0)
    w = (10 * rng.standard_normal(1000)).astype(np.float32)
    decays = {"w": 0.1, "v": 0.3}  # lr·wd: 0.01 and 0.03

    def make() -> Any:
        return mo.AdamW(0.1, weight_decay=0.1, epsilon=1e-4,
                        param_groups=[{"params": ["v"], "weight_decay": 0.3}])

    kind = "jax" if backend == "optax_transformation" else backend
    p = {k: _arr(kind, w, dtype) for k in decays}
    zeros = {k: _arr(kind, np.zeros_like(w), dtype) for k in decays}
    opt = make()
    if backend == "optax_transformation":
        tx = optax_transformation(opt)
        s = tx.init(p)
        for _ in range(10):
            u, s = tx.update(zeros, s, p)
            p = optax.apply_updates(p, u)
    else:
        state = opt.init(p)
        for _ in range(10):
            p, state = opt.update(p, zeros, state)
    for k, wd in decays.items():
        want = _arr("numpy", w, dtype)
        for _ in range(10):
            want = (want.astype(np.float64) * (1 - 0.1 * wd)).astype(want.dtype)
        assert str(p[k].dtype).removeprefix("torch.") == dtype
        np.testing.assert_array_equal(_f32(p[k]), want.astype(np.float32))
        ref = torch.nn.Parameter(torch.tensor(w).to(AS["torch"][dtype]))
        peer = torch.optim.AdamW([ref], lr=0.1, weight_decay=wd, eps=1e-4, foreach=False)
        for _ in range(10):
            ref.grad = torch.zeros_like(ref)
            peer.step()
        np.testing.assert_array_equal(_f32(p[k]), _f32(ref.detach()))
