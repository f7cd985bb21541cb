"""The step of a :class:`~.torch_optim.TorchOptimizer` whose mithril optimizer evaluates the
loss itself (LBFGS: its ``update`` takes ``closure=``): torch's ``step(closure)``, called as
often as the iterations and line search need, with each evaluation point written into the
parameters (their storage kept) before the closure runs and their ``.grad`` read back (zeros
where None, as ``torch.optim.LBFGS``). All or nothing: if the closure raises, returns no or a
non-finite loss, the parameters are written back and the optimizer state is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..utils.optimizers.lbfgs import TORCH_OPS
from .torch_optim_complex import real
from .torch_optim_params import dense


def closure_step(tw: Any, closure: Callable[[], Any] | None) -> Any:
    """``tw.step(closure)`` (``tw``: a TorchOptimizer) of an optimizer whose ``update``
    evaluates the loss itself (``update(params, None, state, closure=f)``, ``f(params) ->
    (loss, gradients)``):
    ``f`` writes the params it is given into the parameters, calls ``closure`` and
    reads their ``.grad`` (zeros where None for LBFGS, as torch.optim.LBFGS; left out for the
    others, as torch's SAM recipe, their missed step counted). On any error the
    parameters are written back and the state is unchanged."""
    name = type(tw._mithril).__name__
    if closure is None:
        raise TypeError(f"{name} evaluates the loss several times per step: call "
                        f"step(closure) with a closure that clears the gradients, "
                        f"computes the loss, calls loss.backward() and returns the loss "
                        f"(as for torch.optim.LBFGS)")
    if not callable(closure):
        raise TypeError(f"step(closure): closure must be callable, got "
                        f"{type(closure).__name__}")
    tw._take_counts()  # (first: a refused one changes nothing)
    tw._sync_all()
    names, params = tw._names, tw._params
    from ..utils.optimizers.lbfgs import LBFGS

    zeros = isinstance(tw._mithril, LBFGS)  # torch.optim.LBFGS reads a .grad None as zeros
    first: dict[str, Any] = {}  # the point the step starts from, and its loss

    def evaluate(point: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        with torch.no_grad():
            if "point" not in first:
                first["point"] = point  # the parameters' own values (a copy)
            else:
                first["wrote"] = True
                for p, x in zip(params, point.values()):
                    real(p).copy_(x)
        try:
            with torch.enable_grad():
                loss = closure()
        except Exception as e:
            e.add_note(f"(raised by the closure given to {name}'s step: parameters and "
                       f"optimizer state left unchanged)")
            raise
        if loss is None or isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise TypeError(f"{name}: the closure must return the loss (a number or a "
                            f"one-element tensor), got "
                            f"{'None' if loss is None else tuple(loss.shape)}")
        first.setdefault("loss", loss)
        if zeros:
            grads = {n: real(dense(p.grad)) if p.grad is not None else torch.zeros_like(real(p))
                     for n, p in zip(names, params)}
        else:  # a .grad None is left out (SAM: neither perturbed nor stepped, as torch's recipe)
            grads = {n: real(dense(p.grad)) for n, p in zip(names, params)
                     if p.grad is not None}
        first.setdefault("none", [n for n, p in zip(names, params) if p.grad is None])
        return (loss.detach() if isinstance(loss, torch.Tensor) else loss), grads

    current = {n: real(p) for n, p in zip(names, params)}  # (a complex one: its real view)
    try:
        state = tw._opt_state
        if state is None:
            state = tw._mithril.init(current)
        # drop-in: an LBFGS left at fused=None runs torch's own operations (its numbers)
        token = TORCH_OPS.set(True)
        try:
            new, state = tw._mithril.update(current, None, state, closure=evaluate)
        finally:
            TORCH_OPS.reset(token)
    except BaseException:
        if first.get("wrote"):
            with torch.no_grad():
                for p, x in zip(params, first["point"].values()):
                    real(p).copy_(x)
        raise
    with torch.no_grad():
        for p, x in zip(params, new.values()):
            real(p).copy_(x)
    tw._opt_state = state
    if not zeros and first["none"] and not state.last_step_skipped:
        state.note_missed(first["none"])  # (each parameter counts its own steps, as torch's)
    tw._count_on()
    return first["loss"]
