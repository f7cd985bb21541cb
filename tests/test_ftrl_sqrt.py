"""Ftrl's default power (−½) runs a square root instead of a general power: the same numbers
to rounding; another power gets the general kernel."""

from __future__ import annotations

import numpy as np

from mithril.utils.optimizers import Ftrl
from mithril.utils.optimizers import ftrl as ftrl_module


def run(opt, steps=20, seed=0):
    rng = np.random.default_rng(seed)
    params = {"a": rng.standard_normal(37), "b": rng.standard_normal((5, 7))}
    state = opt.init(params)
    for _ in range(steps):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        params, state = opt.update(params, grads, state)
    return {k: np.array(v) for k, v in params.items()}


def test_square_root_kernel_equals_the_general_power(monkeypatch):
    kw = dict(learning_rate=0.05, l1_regularization_strength=0.01,
              l2_regularization_strength=0.02, l2_shrinkage_regularization_strength=0.01)
    assert Ftrl(**kw).kernel_math() is ftrl_module._ftrl_sqrt
    fast = run(Ftrl(**kw))
    monkeypatch.setattr(Ftrl, "kernel_math", lambda self: ftrl_module._ftrl)
    slow = run(Ftrl(**kw))
    for k in fast:
        np.testing.assert_allclose(fast[k], slow[k], rtol=1e-13, atol=1e-15)


def test_another_power_gets_the_general_kernel():
    assert Ftrl(0.05, learning_rate_power=-0.3).kernel_math() is ftrl_module._ftrl
    assert Ftrl(0.05, learning_rate_power=0.0).kernel_math() is ftrl_module._ftrl
