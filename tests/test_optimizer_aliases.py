"""``lr=`` and ``eps=``: the names torch and optax users type, accepted beside ours."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import mithril.utils.optimizers as mo

BUILT_IN = [mo.SGD, mo.Adam, mo.AdamW, mo.RMSProp, mo.AdaGrad]


@pytest.mark.parametrize("cls", BUILT_IN)
def test_lr_alias_equals_learning_rate(cls):
    a, b = cls(lr=0.05), cls(learning_rate=0.05)
    assert a.hyperparameters() == b.hyperparameters()
    p = {"w": np.linspace(-1, 1, 6).reshape(2, 3)}
    g = {"w": np.linspace(0.3, -0.2, 6).reshape(2, 3)}
    pa, _ = a.update({"w": p["w"].copy()}, g, a.init(p))
    pb, _ = b.update({"w": p["w"].copy()}, g, b.init(p))
    np.testing.assert_array_equal(pa["w"], pb["w"])
    assert "learning_rate" in inspect.signature(cls).parameters  # the signature shows ours


@pytest.mark.parametrize("cls", [mo.Adam, mo.AdamW, mo.RMSProp, mo.AdaGrad])
def test_eps_alias(cls):
    assert cls(eps=1e-6).epsilon == 1e-6 == cls(epsilon=1e-6).epsilon


@pytest.mark.parametrize("cls", BUILT_IN)
def test_both_names_refused(cls):
    with pytest.raises(TypeError, match="learning_rate= or lr="):
        cls(lr=0.1, learning_rate=0.2)


def test_alias_values_checked_as_ours():
    with pytest.raises(ValueError, match="learning_rate"):
        mo.Adam(lr=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        mo.Adam(eps=0.0)
    with pytest.raises(TypeError):
        mo.SGD(eps=1e-8)  # SGD has no epsilon: no alias either
