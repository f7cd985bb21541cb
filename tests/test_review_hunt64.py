"""Faults found reviewing the library (session 64), each with the numbers that show it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from mithril.utils import optimizers as o  # noqa: E402


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1}, {"clip_norm": 0.5}])
def test_adafactor_keeps_bfloat16_params_on_jax(kw: dict) -> None:
    """Adafactor's JAX update (tensor by tensor in one jitted program) returned float32
    params for bfloat16 ones (its traced parameter norm is float32, where NumPy's is a
    Python float): the params now keep their dtype, and equal NumPy's bfloat16 Adafactor
    (ml_dtypes) over three steps (with clipping to one bfloat16 ulp: the gradient is
    scaled in float32 there, in bfloat16 on NumPy)."""
    outs = {}
    for mod, xp, bf in (("jax", jnp, jnp.bfloat16), ("numpy", np, ml_dtypes.bfloat16)):
        rng = np.random.default_rng(0)
        p = {"w": xp.asarray(rng.standard_normal((4, 6)).astype(np.float32)).astype(bf),
             "b": xp.asarray(rng.standard_normal(6).astype(np.float32)).astype(bf)}
        opt = o.Adafactor(learning_rate=1e-2, **kw)
        s = opt.init(p)
        for _ in range(3):
            g = {k: xp.asarray(rng.standard_normal(v.shape).astype(np.float32)).astype(bf)
                 for k, v in p.items()}
            p, s = opt.update(p, g, s)
            assert all(str(v.dtype) == "bfloat16" for v in p.values()), (mod, p)
        outs[mod] = {k: np.asarray(v).astype(np.float32) for k, v in p.items()}
    ulp = 2.0 ** -7 if kw.get("clip_norm") else 0.0  # (bfloat16's eps)
    for k in outs["numpy"]:
        np.testing.assert_allclose(outs["jax"][k], outs["numpy"][k], rtol=ulp, atol=0,
                                   err_msg=k)
