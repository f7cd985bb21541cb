"""Sharpness-aware minimization (Foret et al., 2021) and ASAM (Kwon et al., 2021) around any
base optimizer: each update takes the base optimizer's step with the gradient at a point
``rho`` away from the parameters, uphill."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .base import _without_none
from .checks import check_flag, check_positive, check_update, describe, to_float
from .outer_wrapper import OuterWrapper, check_base, check_grads, copied, vdot
from .state import OptimizerState


def _check_rho(value: Any) -> float:
    return check_positive("rho", value)


def _check_eps(value: Any) -> float:
    return check_positive("eps", value)


class SAM(OuterWrapper):
    """SAM around ``base_optimizer`` (any optimizer here but LBFGS). One ``update`` is the
    common PyTorch recipe's ``first_step`` + ``second_step`` (davda54/sam), which is
    ``optax.contrib.sam(base, chain(normalize(), sgd(rho)), sync_period=2,
    opaque_mode=True)``::

        g  = ∇L(w)                            (``gradients``, or the closure's at w)
        e  = rho · g / (‖g‖ + eps)            ‖·‖: the global norm over the gradients
        (ASAM, adaptive=True: e = rho · w²·g / (‖|w|·g‖ + eps), elementwise)
        g' = ∇L(w + e)                        (the closure's, at the perturbed point)
        w  ← base step at w with g'           (the base optimizer's update and state)

    The gradient at the perturbed point comes from ``closure(params) -> (loss, gradients)``
    (as LBFGS's; a closure may also return the gradients alone, as optax's ``grad_fn``),
    called with new arrays (never written afterwards); ``update(params, gradients, state,
    closure=f)`` takes the gradients at ``params`` you already have, ``update(params, None,
    state, closure=f)`` evaluates them with ``f`` too (what
    :func:`~mithril.interop.torch_optimizer`'s ``step(closure)`` does: a torch loop's
    ``opt.step(closure)``, the closure clearing the gradients, computing the loss and calling
    ``backward()``). ``state.last_loss`` is the closure's loss at the perturbed point (None
    if it gave none). ``eps`` is torch's 1e-12 by default; ``eps=0`` is optax's
    ``normalize()`` (a zero gradient then gives NaN, as there).

    Why this API: optax's default ``opaque_mode=False`` alternates an adversarial and an
    outer update over two calls, each with the gradient at the params it returned; that is
    the same computation as this one update (its outer step sees only the second gradient),
    but hands the perturbed params back to the training loop, where evaluation, averaging or
    BatchNorm statistics would see them. Here the perturbation never leaves ``update``, as in
    optax's ``opaque_mode=True`` and the torch recipe.

    The state is the base optimizer's, under ``"SAM"``: the learning rate,
    schedulers, parameter groups, weight decay, clipping and ``nonfinite`` are the base's;
    ``state_dict`` / ``load_state_dict`` are the base's under ``"SAM"``.

    ``gradients`` may leave parameters out (those a loss does not reach), as the torch recipe
    treats a ``.grad`` None: they are not perturbed and not in ‖g‖, their gradients from the
    closure at the perturbed point are not used (mithril's ``evaluate`` gives zeros there),
    and the base optimizer's step leaves them out (values and slots as they were; the caller
    counts their missed step, as :func:`~mithril.utils.training.make_train_step` does).
    Where ``gradients`` is None, the closure's at ``params`` tell which have one. The
    closure's gradients at the perturbed point must cover those. A call that raises (no
    closure, a closure that raises or returns too few or unknown names, other shapes or
    dtype) changes neither the params nor the state.
    """

    OWN = ("rho", "adaptive", "eps")

    def __init__(self, base_optimizer: Any, rho: float = 0.05, adaptive: bool = False,
                 eps: float = 1e-12) -> None:
        self.__dict__["base_optimizer"] = check_base(base_optimizer, "SAM")
        self.rho = _check_rho(rho)
        self.adaptive = check_flag("adaptive", adaptive)
        self.eps = _check_eps(eps)
        self._backend = base_optimizer._backend

    def check_own(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        checks = {"rho": _check_rho, "adaptive": lambda v: check_flag("adaptive", v),
                  "eps": _check_eps}
        return {k: checks[k](v) for k, v in hp.items() if k in checks}

    def loaded(self, state: OptimizerState) -> OptimizerState:
        state.last_loss = None
        return super().loaded(state)

    def perturbation(self, params: Mapping[str, Any], gradients: Mapping[str, Any]
                     ) -> dict[str, Any]:
        """``e`` of the class docs, per parameter (new arrays)."""
        scaled = ({n: abs(params[n]) * g for n, g in gradients.items()} if self.adaptive
                  else gradients)
        with np.errstate(all="ignore"):  # (eps=0 and a zero gradient: NaN, as optax's)
            norm = math.sqrt(vdot(scaled, scaled))
            scale = self.rho / (norm + self.eps) if norm + self.eps else math.nan
            if self.adaptive:
                return {n: params[n] * params[n] * g * scale for n, g in gradients.items()}
            return {n: g * scale for n, g in gradients.items()}

    def update(self, params: Mapping[str, Any], gradients: Mapping[str, Any] | None,
               state: OptimizerState, closure: Callable | None = None, *,
               loss: Any = None) -> tuple[dict[str, Any], OptimizerState]:
        """One SAM step (class docs): ``closure(params) -> (loss, gradients)`` evaluates at
        the perturbed params (and at ``params`` where ``gradients`` is None). ``loss``: the
        loss at ``params``, if you have it (LBFGS's contract, what make_train_step passes;
        SAM does not need it). On any error neither ``params`` nor ``state`` has changed."""
        if closure is None:
            raise TypeError("SAM.update needs closure=: a function params -> (loss, gradients) "
                            "giving the gradients at the perturbed params it is called with")
        if not callable(closure):
            raise TypeError(f"SAM: closure must be callable, got {describe(closure)}")
        if loss is not None:
            to_float("SAM: loss", loss)
        check_update(self, params, {}, state)  # (the params against the state, first)
        # (a copy: a closure may write the points it is given into the params, as the torch
        # drop-in's does, and the base step must start from the params as they were)
        params = {n: copied(p) for n, p in params.items()}
        if gradients is None:
            _, gradients = self._evaluate(closure, params, params, state, "at params")
        else:
            gradients = _without_none(gradients)  # (None: no gradient this step)
            check_grads(self, params, gradients, state, "gradients")
        e = self.perturbation(params, gradients)
        # (those without a gradient stay where they are, in new arrays too)
        point = {n: params[n] + e[n] if n in e else copied(params[n]) for n in params}
        loss, adv = self._evaluate(closure, point, params, state, "at the perturbed params",
                                   gradients)
        params, state = self.base_update(params, {n: adv[n] for n in gradients}, state)
        state.last_loss = loss
        return params, state

    def _evaluate(self, closure: Callable, point: dict[str, Any], params: Mapping[str, Any],
                  state: OptimizerState, where: str, need: Any = None) -> tuple[Any, Any]:
        out = closure(point)
        loss = None
        if isinstance(out, (tuple, list)) and len(out) == 2:
            loss, out = out
            if loss is not None:
                to_float("SAM: the closure's loss", loss)
        what = f"the closure's gradients ({where})"
        if not isinstance(out, Mapping):
            raise TypeError(f"SAM: the closure must return (loss, gradients) or gradients (a "
                            f"dict of arrays), got {describe(out)}")
        check_grads(self, params, out, state, what, need)
        return loss, out
