"""``optax_transformation(...).update(..., missed=m)``: each leaf's rules count its own steps,
``t − missed`` (what the one-program train step passes for parameters that missed steps:
torch.optim's per-parameter ``step``). For an optimizer whose update of a leaf depends on
that leaf alone (no global clipping), a leaf that missed ``m`` of ``c`` steps is updated as
the same leaf alone at count ``c − m``; traced and host-computed scalars (``scalars=
"host"``, a ``jax.pure_callback`` given each row's count) alike, elementwise and two-pass."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

from mithril.interop import optax_transformation  # noqa: E402
from mithril.utils.optimizers import LAMB, AdamW  # noqa: E402

MAKERS = {"adamw": lambda: AdamW(learning_rate=1e-2, weight_decay=0.1),
          "lamb": lambda: LAMB(learning_rate=1e-2, weight_decay=0.5)}  # (decay: the count shows)


def _state(tx, params, count: int, rng):
    """A state at ``count`` with random (positive second-moment-like) slots."""
    s = tx.init(params)
    slots = {k: {n: jnp.asarray(np.abs(rng.standard_normal(p.shape)).astype(np.float32))
                 for n, p in params.items()} for k in s.slots}
    return s._replace(count=jnp.asarray(count, jnp.int32), slots=slots)


@pytest.mark.parametrize("mode", ["traced", "host"])
@pytest.mark.parametrize("name", MAKERS)
def test_a_leaf_that_missed_steps_counts_its_own(name: str, mode: str) -> None:
    rng = np.random.default_rng(0)
    params = {"b": jnp.asarray(rng.standard_normal(3), jnp.float32),
              "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    grads = {n: jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
             for n, p in params.items()}
    tx = optax_transformation(MAKERS[name](), scalars=mode)
    state = _state(tx, params, 5, rng)
    missed = jnp.asarray([3, 0], jnp.int32)  # "b" (first in the flattening order) missed 3
    got, new = jax.jit(lambda g, s, p, m: tx.update(g, s, p, missed=m, new_params=True))(
        grads, state, params, missed)
    for n, count in (("b", 2), ("w", 5)):
        alone = state._replace(count=jnp.asarray(count, jnp.int32),
                               slots={k: {n: v[n]} for k, v in state.slots.items()})
        want, _ = tx.update({n: grads[n]}, alone, {n: params[n]}, new_params=True)
        np.testing.assert_allclose(np.asarray(got[n]), np.asarray(want[n]), rtol=1e-6,
                                   atol=0, err_msg=n)
    plain, _ = tx.update(grads, state, params, new_params=True)  # (the count matters: b differs without it)
    assert not np.allclose(np.asarray(plain["b"]), np.asarray(got["b"]), rtol=1e-5)
    assert int(new.count) == 6


def test_missed_of_another_length_is_refused() -> None:
    tx = optax_transformation(AdamW(1e-2))
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"missed=.*one count per parameter \(2\)"):
        tx.update(params, tx.init(params), params, missed=jnp.zeros(3, jnp.int32))
