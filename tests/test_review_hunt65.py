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


@pytest.mark.parametrize("max_lr", [[0.1, 0.0], [0.0, 0.0]])
def test_one_cycle_with_a_frozen_group_is_torchs(max_lr):
    """OneCycleLR with max_lr 0 for a group (or all) holds that group at 0 and schedules the
    others, as torch's (it was refused: no division by zero in torch there)."""
    import torch

    from mithril.utils.lr_schedulers import OneCycleLR
    from mithril.utils.optimizers import SGD

    opt = SGD(learning_rate=0.1, param_groups=[{"params": ["b"]}])
    ours = OneCycleLR(opt, max_lr, 20, per_group=True)
    m = torch.nn.Linear(1, 1)
    topt = torch.optim.SGD([{"params": [m.weight]}, {"params": [m.bias]}], lr=0.1)
    theirs = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr, 20, cycle_momentum=False)
    for step in range(21):
        want = [g["lr"] for g in topt.param_groups]
        np.testing.assert_allclose([opt.get_learning_rate(), opt.get_learning_rate(0)], want,
                                   rtol=1e-13, atol=0, err_msg=f"step {step}")
        if step < 20:
            topt.step()
            theirs.step()
            ours.step()
