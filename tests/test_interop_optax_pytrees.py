"""``optax_transformation`` on the pytrees JAX programs hold their parameters in, side by side
with optax's own optimizer: nested dicts, lists and tuples, NamedTuples, a class registered
with ``jax.tree_util.register_pytree_node_class`` (no key names: its leaves are named by
index), int dict keys, None leaves, empty subtrees, 0-d leaves and leaves of mixed dtypes
(bfloat16 and float32 in one tree), in float32 and (slow) float64; and what is refused, by
name: integer / bool / complex leaves, a state for other params (another structure, a
changed shape), gradients of another structure. flax is not installed here: its
``FrozenDict`` is not tried (a ``flax.struct`` dataclass node: see
tests/test_interop_optax_combinators.py)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from mithril.interop import optax_transformation  # noqa: E402
from mithril.utils.optimizers import LAMB, SGD, Adam, AdamW  # noqa: E402

STEPS = 4


@pytest.fixture(params=["float32", pytest.param("float64", marks=pytest.mark.slow)])
def dtype(request):
    """float32, and float64 with ``jax_enable_x64`` on (restored after; slow: every program
    compiles again)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param == "float64")
    yield jnp.dtype(request.param)
    jax.config.update("jax_enable_x64", before)


@pytest.fixture
def x32():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)


class Pair(NamedTuple):
    x: Any
    y: Any


@jax.tree_util.register_pytree_node_class
class Box:
    """A pytree node without key names (``tree_flatten``, not ``..._with_keys``)."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def tree_flatten(self) -> tuple:
        return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux: Any, children: Any) -> Box:
        return cls(*children)


def params_of(dt: Any) -> dict:
    """Every kind of node at once (one compile per optimizer), and a bfloat16 leaf."""
    rng = np.random.default_rng(0)

    def a(*shape: int, d: Any = dt) -> Any:
        return jnp.asarray(rng.standard_normal(shape), d)

    return {"nested": {"deep": {"w": a(3, 2)}, "b": a(2)},
            "seq": [a(3), (a(), a(2, 1, 2))],
            "pair": Pair(a(4), Pair(a(), None)),
            "box": Box(a(3), [a(2)]),
            "ints": {0: a(2), 1: a()},
            "none": None, "empty": {}, "empty_list": [], "empty_tuple": (),
            "half": a(4, d=jnp.bfloat16)}


def loss(p: Any) -> Any:
    return sum(jnp.sum(jnp.sin(3 * x.astype(jnp.float32)) + x.astype(jnp.float32) ** 2)
               for x in jax.tree.leaves(p))


def trajectory(tx: Any, params: Any) -> list:
    @jax.jit
    def step(p, s):
        # (each gradient in its param's dtype, as jax.grad of a loss of the params gives)
        g = jax.tree.map(lambda d, x: d.astype(x.dtype), jax.grad(loss)(p), p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state, out = tx.init(params), []
    for _ in range(STEPS):
        params, state = step(params, state)
        out.append(params)
    return out


CASES = {  # ours, optax's
    "adam": (lambda: Adam(1e-2), lambda: optax.adam(1e-2)),
    "sgd_nesterov": (lambda: SGD(1e-2, momentum=0.9, nesterov=True),  # (host scalars)
                     lambda: optax.sgd(1e-2, 0.9, nesterov=True)),
    "lamb": (lambda: LAMB(1e-2, weight_decay=0.1),  # (two passes: per-leaf norms)
             lambda: optax.lamb(1e-2, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kind_of_node_matches_optax(case, dtype):
    ours, theirs = CASES[case]
    p0 = params_of(dtype)
    ref, got = trajectory(theirs(), p0), trajectory(optax_transformation(ours()), p0)
    tol = 1e-12 if dtype == jnp.float64 else 2e-6
    for a, b in zip(ref, got):
        assert jax.tree.structure(a) == jax.tree.structure(b) == jax.tree.structure(p0)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert x.dtype == y.dtype
            # bfloat16: the same rounding of the same step (one ulp at most)
            t = 2 ** -7 * float(jnp.max(jnp.abs(x))) if x.dtype == jnp.bfloat16 else tol
            np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(x, np.float64),
                                       rtol=0, atol=t)
    moved = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(got[-1]))]
    assert min(moved) > 1e-3  # every leaf moved, the 0-d ones and the bfloat16 one too


def test_the_state_has_the_params_structure_for_tree_map_params(x32):
    """``optax.tree_utils.tree_map_params`` (how a state gets the params' sharding) finds
    our slots as it finds optax's moments: the same leaves mapped."""
    p0 = params_of(jnp.float32)

    class Mapped:  # (not a pytree: a leaf of the mapped state)
        def __init__(self, x: Any) -> None:
            self.shape = tuple(x.shape)

    def shapes(tx: Any) -> list:
        mapped = optax.tree_utils.tree_map_params(tx, Mapped, tx.init(p0),
                                                  transform_non_params=lambda _: None)
        return [x.shape for x in jax.tree.leaves(mapped) if isinstance(x, Mapped)]

    ours, theirs = shapes(optax_transformation(Adam(1e-2))), shapes(optax.adam(1e-2))
    assert len(ours) == len(theirs) == 2 * len(jax.tree.leaves(p0))
    assert sorted(ours) == sorted(theirs)


def test_what_is_refused_is_named(x32):
    tx = optax_transformation(AdamW(1e-2))
    p = {"w": jnp.ones((2, 3)), "b": [jnp.zeros(2), Pair(jnp.asarray(0.5), None)]}
    g = jax.tree.map(jnp.ones_like, p)
    state = tx.init(p)
    for bad, key, dt in (("mask", "mask", jnp.bool_), ("steps", "steps", jnp.int32),
                         ("z", "z", jnp.complex64)):
        with pytest.raises(TypeError, match=rf"params\['{key}'\] has dtype {jnp.dtype(dt)}"):
            tx.init({**p, bad: jnp.zeros(2, dt)})
    with pytest.raises(ValueError, match=r"slot 'm' does not have the params' structure"):
        tx.update({"w": g["w"]}, state, {"w": p["w"]})  # a state of other params
    bigger = {**p, "w": jnp.ones((2, 4))}
    with pytest.raises(ValueError, match=r"slot 'm' for 'w' has shape \(2, 3\), expected "
                                         r"\(2, 4\)"):
        tx.update(jax.tree.map(jnp.ones_like, bigger), state, bigger)
    with pytest.raises(ValueError, match=r"updates \(gradients\) do not have the params' "
                                         r"structure"):
        tx.update({"w": g["w"]}, state, p)
    with pytest.raises(ValueError, match=r"update for 'b/0' has shape \(3,\), the parameter "
                                         r"\(2,\)"):
        tx.update({**g, "b": [jnp.ones(3), g["b"][1]]}, state, p)
    updates, new = tx.update(g, state, p)  # what raised changed nothing: the state steps
    assert int(new.count) == 1 and float(jnp.max(jnp.abs(updates["w"]))) > 1e-3


def test_params_cast_after_init_are_refused_by_name(x32):
    """Regression: params cast to bfloat16 after ``init`` (float32) silently turned the
    state's slots into bfloat16 (``m``: float32 -> bfloat16 after one update; optax keeps its
    float32 moments), and a ``lax.scan`` / ``MultiSteps`` carry then failed deep in JAX; now
    a ``ValueError`` names the slot, the key and both dtypes."""
    tx = optax_transformation(Adam(1e-2))
    state = tx.init({"w": jnp.ones(3)})
    half = {"w": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"slot 'm' for 'w' has dtype float32, the parameter "
                                         r"bfloat16"):
        tx.update(half, state, half)
    ref = optax.adam(1e-2)
    _, ref_state = ref.update(half, ref.init({"w": jnp.ones(3)}), half)
    assert ref_state[0].mu["w"].dtype == jnp.float32  # what optax keeps
