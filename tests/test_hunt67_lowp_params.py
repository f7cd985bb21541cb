"""Mithril optimizers run directly on low-precision parameters (no MixedPrecisionTrainer),
side by side with optax and torch.optim."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch

from mithril.utils.optimizers import Adam, AdamW, NAdam

BF16 = ml_dtypes.bfloat16
AS = {"numpy": {"float32": np.float32, "bfloat16": BF16, "float16": np.float16},
      "jax": {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16},
      "torch": {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}}


def _arr(backend: str, a: np.ndarray, dtype: str) -> Any:
    if backend == "torch":
        return torch.tensor(a).to(AS["torch"][dtype])
    if backend == "jax":
        return jnp.asarray(a, AS["jax"][dtype])
    return a.astype(AS["numpy"][dtype])


def _f32(a: Any) -> np.ndarray:
    return a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a).astype(np.float32)


def _problem(steps: int = 10) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 7)).astype(np.float32),
              "b": rng.standard_normal(7).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(steps)]
    return params, grads


def _optax(tx: Any, params: dict, grads: list[dict], dtype: Any) -> dict:
    q = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    s = tx.init(q)
    for g in grads:
        u, s = tx.update({k: jnp.asarray(v, dtype) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
    return {k: _f32(v) for k, v in q.items()}


MU_CASES = {  # ours with mu_dtype=M, optax's with mu_dtype=M
    "adam": (lambda M: Adam(0.05, convention="optax", mu_dtype=M),
             lambda M: optax.adam(0.05, mu_dtype=M)),
    "adamw": (lambda M: AdamW(0.05, weight_decay=0.1, convention="optax", mu_dtype=M),
              lambda M: optax.adamw(0.05, weight_decay=0.1, mu_dtype=M)),
    "amsgrad": (lambda M: Adam(0.05, amsgrad=True, convention="optax", mu_dtype=M),
                lambda M: optax.amsgrad(0.05, mu_dtype=M)),
    "nadam": (lambda M: NAdam(0.05, convention="optax", mu_dtype=M),
              lambda M: optax.nadam(0.05, mu_dtype=M)),
}


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("name", sorted(MU_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mu_dtype_equal_to_the_parameters_dtype(dtype, name, backend):
    """``mu_dtype`` naming the parameters' own dtype (optax users write
    ``mu_dtype=jnp.float32`` for float32 parameters): the step is optax's mu_dtype order,
    which numba cannot compile (float32: a numba TypingError at the first update) and which
    the jitted JAX engine ran with its scalars rounded to bfloat16 (β₂ = 0.999 is 1.0
    there: 1 − β₂ᵗ = 0, so bfloat16 parameters never moved). Now the array engine runs it:
    equal to optax's (bit for bit on NumPy and JAX, to rounding on torch)."""
    ours, theirs = MU_CASES[name]
    params, grads = _problem()
    want = _optax(theirs(AS["jax"][dtype]), params, grads, AS["jax"][dtype])
    opt = ours(dtype)
    p = {k: _arr(backend, v, dtype) for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, {k: _arr(backend, v, dtype) for k, v in g.items()}, state)
    got = {k: _f32(v) for k, v in p.items()}
    start = {k: _f32(_arr("numpy", v, dtype)) for k, v in params.items()}
    assert max(np.abs(got[k] - start[k]).max() for k in got) > 0.2  # (it moved)
    for k in got:
        assert str(p[k].dtype).removeprefix("torch.") == dtype
        assert str(state.slot("m")[k].dtype).removeprefix("torch.") == dtype
        if backend == "torch":  # (torch's own order of the same operations)
            np.testing.assert_allclose(got[k], want[k], atol=2e-2 if dtype == "bfloat16"
                                       else 1e-6)
        else:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("name", sorted(MU_CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_optax_transformation_mu_dtype_on_half_parameters(dtype, name):
    """``optax_transformation(Adam(..., mu_dtype=M))`` on parameters of that half dtype: its
    leaf math got β₁, β₂ and the step rounded to the parameters' dtype, and made optax's
    bias corrections 1 − βᵗ from them: in bfloat16 β₂ = 0.999 is 1, so 1 − β₂ᵗ = 0 and the
    parameters never moved; in float16 the update was inf/NaN. Now the scalars are float32
    there, as optax's bias corrections are: the first update within 1e-2 of optax's in
    float32 (from the same half-precision values), as optax's own bfloat16 one, and 10
    bfloat16 steps within a few bfloat16 ulps of optax's (the moment is computed in float32
    where optax rounds β₁·m first: see docs/optimizers.md)."""
    from mithril.interop import optax_transformation

    ours, theirs = MU_CASES[name]
    jdt = AS["jax"][dtype]
    params, grads = _problem()
    start = {k: _f32(_arr("numpy", v, dtype)) for k, v in params.items()}
    g1 = [{k: _f32(_arr("numpy", v, dtype)) for k, v in grads[0].items()}]
    ref = _optax(theirs(None), start, g1, jnp.float32)
    first = _optax(optax_transformation(ours(dtype)), params, grads[:1], jdt)
    for k in first:
        err = np.abs((first[k] - start[k]) - (ref[k] - start[k])).max()
        assert err < 1e-2, (k, err)  # (the update is 0.05 in size)
    if dtype == "bfloat16":
        want = _optax(theirs(jdt), params, grads, jdt)
        got = _optax(optax_transformation(ours(dtype)), params, grads, jdt)
        for k in got:
            assert np.abs(got[k] - start[k]).max() > 0.2  # (it moved)
            np.testing.assert_allclose(got[k], want[k], atol=2e-2)
