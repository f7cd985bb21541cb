"""The pieces of :class:`~mithril.utils.training.TrainStep`'s one-program JAX step (and of
:class:`~mithril.distributed.jax_parallel.ShardedTrainStep`'s): the program's body, what
its steady state compares with, what tells it a hyperparameter changed, and the checks of
arrays an earlier step consumed and of states converted to and from it."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from ..errors import KeyMismatchError, ShapeError


class SteadyState:
    """What the fused JAX step's steady state compares with (see
    :meth:`TrainStep._steady_args`): the last step's returned params and state, and its
    data's keys, abstract values and signature."""

    __slots__ = ("opt_state", "ptuple", "keys", "avals", "aval", "sig", "value_index")

    @classmethod
    def of(cls, step: Any, opt_state: Any, ptuple: tuple, data: dict, sig: tuple
           ) -> SteadyState | None:
        vals = list(data.values())
        kind = type(vals[0]) if vals else None
        if kind is None or not all(type(v) is kind for v in vals) or not isinstance(
                vals[0], step._jax_array):
            return None  # host arrays are converted every step: not a steady state
        self = cls()
        self.opt_state, self.ptuple, self.keys, self.sig = opt_state, ptuple, tuple(data), sig
        from ..backends.jax_backend import aval_getter

        self.aval = aval_getter(kind)
        self.avals = list(map(self.aval, vals))
        self.value_index = tuple(i for i, k in enumerate(data) if k in step._value_keys)
        return self


def refuse_consumed(what: str, tree: Any) -> None:
    """A ``TypeError`` (as for any deleted array) naming the first JAX array of ``tree``
    whose buffer is gone, most likely consumed by an earlier step (donated to its program),
    before JAX fails on it inside a check or its runtime."""
    import jax

    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise TypeError(f"{what}{jax.tree_util.keystr(path)} is a deleted JAX array: was it "
                            f"consumed by an earlier step? (the step donates the params and "
                            f"opt_state it returned to the next one: pass the params and "
                            f"opt_state the last step returned)")


def committed(tree: Any) -> Any:
    """``tree`` with its JAX arrays committed to their devices (``jax.jit`` compiles again
    for committed arguments where it had uncommitted ones)."""
    import jax

    def commit(a: Any) -> Any:
        return jax.device_put(a, a.sharding) if isinstance(a, jax.Array) and not a.committed else a

    return jax.tree_util.tree_map(commit, tree)


def step_body(ev: Any, tx: Any, loss: str, with_ctx: bool, ptuple: tuple, opt_state: Any,
              inputs: dict, rng: Any, mstate: dict, training: bool) -> tuple:
    """Inside a JAX train-step program: forward, the gradients of ``loss`` for the parameters
    ``ptuple`` and the optimizer's update (``tx``, an optax transformation). Returns (new
    params tuple, new optimizer state, outputs, new model state (the old one where no
    operator keeps any), gradients)."""
    import jax.numpy as jnp

    cots = {loss: jnp.ones((), ptuple[0].dtype if ptuple else jnp.float32)}
    if with_ctx:
        out, grads, mstate = ev._fwd_vjp_ctx(ptuple, inputs, rng, mstate, cots,
                                             training=training)
    else:
        out, grads = ev._fwd_vjp(ptuple, inputs, cots)
    names = ev.names
    params = dict(zip(names, ptuple, strict=True))
    new_params, opt_state = tx.update(dict(zip(names, grads, strict=True)), opt_state, params,
                                      new_params=True)
    new = tuple(new_params[n] for n in names)
    return new, opt_state, out, mstate, grads


def gradients_norm(grads: list[Any]) -> Any:
    """``‖g‖₂`` over all gradients (traced): the engines' one-pass norm
    (:func:`~mithril.utils.optimizers.engines.jax_engine.global_norm`)."""
    from .optimizers.engines.jax_engine import global_norm

    return global_norm(grads)


VERSIONS = operator.itemgetter("_hyper_version", "_groups_version")


def optimizers_in(opt: Any) -> list[Any]:
    """``opt`` and the optimizers it holds (Lookahead's ``inner``, Muon's ``fallback``),
    recursively."""
    from .optimizers.base import Optimizer

    found = [opt]
    for v in vars(opt).values():
        if isinstance(v, Optimizer):
            found += optimizers_in(v)
    return found


def same_params(what: str, got: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """``got`` (name: shape) holds the parameters ``expected`` holds, of the same shapes."""
    missing, unknown = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unknown:
        raise KeyMismatchError(f"{what} does not hold the model's parameters: missing "
                               f"{missing}, unknown {unknown}")
    for n, shape in expected.items():
        if tuple(got[n]) != tuple(shape):
            raise ShapeError(f"{what}: '{n}' has shape {tuple(got[n])}, the parameter "
                             f"{tuple(shape)}")
