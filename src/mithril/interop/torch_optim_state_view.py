"""``opt.state`` of a :class:`~mithril.interop.torch_optim.TorchOptimizer`: torch's layout
(per parameter ``step`` and its slots under torch's names) as a read-only view of the
optimizer's state. The slot tensors are live views of its buffers (writing them in place
changes the state); ``step`` is a live 0-d tensor too (:class:`StepCounts`: each step
counts it on, as torch's ``state[p]["step"] += 1``; one written in place, e.g.
``opt.state[p]["step"].zero_()`` to restart a parameter's bias corrections, is taken at the
next step or read: the parameter's own count). Setting or removing an entry raises, naming
what to do, where it was silently ignored (why: ``opt.state.clear()``, ``del opt.state[p]``
or ``opt.state[p]["exp_avg"] = zeros``, torch's ways to reset a state, changed nothing
here); ``opt.state[p]["exp_avg"] *= 0.5`` (in place, then set back as the same tensor) is
taken."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from ..utils.optimizers import Optimizer
from .torch_optim_complex import shown_as
from .torch_optim_state import live_offsets, own_steps, shown, slot_names_for_torch

__all__ = ["ParamStateView", "StateView", "StepCounts", "live_state"]

_WHY = ("opt.state of a mithril torch_optimizer is a view of the optimizer's state: write "
        "its tensors in place (opt.state[p]['exp_avg'].zero_(), opt.state[p]['step'].zero_()); "
        "to start afresh, make a new torch_optimizer (load_state_dict sets a whole state, "
        "each parameter's 'step' too)")


def _refuse(what: str) -> Any:
    def refused(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{what}: {_WHY}")
    return refused


def _set_same(what: str) -> Any:
    refused = _refuse(what)

    def setitem(self: Any, key: Any, value: Any) -> None:
        # ``opt.state[p]["exp_avg"] *= 0.5`` writes in place, then sets the same tensor back
        # (why: it raised after the write, the state changed by a call that failed)
        if dict.__contains__(self, key) and dict.__getitem__(self, key) is value:
            return
        refused(self, key, value)
    return setitem


def _read_only(spelled: str) -> Any:
    """A dict class whose every mutator raises, naming the call as written on ``spelled``
    (``opt.state`` / ``opt.state[p]``), but setting an entry back to itself."""
    def made(cls: type) -> type:
        for name, call in (("__delitem__", f"del {spelled}[key]"),
                           ("__ior__", f"{spelled} |= ..."),
                           *((m, f"{spelled}.{m}()") for m in (
                               "clear", "pop", "popitem", "setdefault", "update"))):
            setattr(cls, name, _refuse(call))
        cls.__setitem__ = _set_same(f"{spelled}[key] = value")  # type: ignore[attr-defined]
        return cls
    return made


@_read_only("opt.state[p]")
class ParamStateView(dict):
    """One parameter's entry: ``step`` and its slots, live views."""

    def __reduce__(self) -> tuple:  # (a copy is a plain dict)
        return dict, (dict(self),)


@_read_only("opt.state")
class StateView(defaultdict):
    """torch's ``opt.state``: a parameter without a state reads as an empty entry (not
    stored, as reading torch's stores one)."""

    def __missing__(self, key: Any) -> ParamStateView:
        return ParamStateView()

    def __reduce__(self) -> tuple:  # (a copy is a plain defaultdict of dicts)
        return defaultdict, (dict,), None, None, ((k, dict(v)) for k, v in self.items())


class StepCounts:
    """Each parameter's own step count as one tensor of torch's scalar dtype, whose 0-d
    views are ``opt.state[p]["step"]``: counted on after each step (:meth:`refresh`, one
    copy), and a value written into it in place taken as the parameter's count
    (:meth:`take`). Made at the first read of ``opt.state``: until then a step costs
    nothing more."""

    def __init__(self) -> None:
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        self.base = torch.zeros(0, dtype=dtype)  # (room for groups added later: see refresh)
        self.tensor = self.base
        self.seen: list[float] = []

    def take(self, opt: Optimizer, st: Any, names: Sequence[str]) -> None:
        """Set, as each parameter's own count, a value written into its ``step`` since the
        last :meth:`refresh` (checked first: a whole number from 0 to the steps since its
        group joined; else ``ValueError`` naming it, the written value undone and the state
        unchanged)."""
        if st is None or len(self.seen) != len(names):
            return
        now = self.tensor.tolist()
        if now == self.seen:
            return
        top = [st.step - k for k in live_offsets(opt, names)]
        missed = st.missed_counts()
        for i, (n, k, was) in enumerate(zip(names, now, self.seen)):
            if k == was:
                continue
            if getattr(opt, "reset_state", False):
                why = (f"{type(opt).__name__}(reset_state=True) keeps one count for all "
                       f"its parameters (its inner optimizer's restarts at each sync)")
            elif not (math.isfinite(k) and k == int(k) and 0 <= k <= top[i]):
                why = (f"a parameter's own count is a whole number from 0 to {top[i]} (the "
                       f"steps since its group joined)")
            else:
                missed[n] = int(top[i] - k)
                continue
            self.tensor.copy_(torch.tensor(self.seen, dtype=self.tensor.dtype))
            raise ValueError(f"opt.state[p]['step'] of parameter '{n}' written as {k!r} "
                             f"(it was {was!r}): refused, undone, nothing changed; {why}")
        st.set_missed({n: m for n, m in missed.items() if m})

    def refresh(self, opt: Optimizer, st: Any, names: Sequence[str]) -> torch.Tensor:
        """Write each parameter's own count into the tensor (longer by a group added: a
        slice of the same room, so that views taken before go on following, until more
        parameters than twice the first count need new room)."""
        counts = [float(k) for k in own_steps(opt, st, names)] if st is not None \
            else [0.0] * len(names)
        if len(counts) != self.tensor.numel():
            if len(counts) > self.base.numel():
                self.base = torch.zeros(max(2 * len(counts), 16), dtype=self.base.dtype)
            self.tensor = self.base[:len(counts)]
            self.tensor.copy_(torch.tensor(counts, dtype=self.tensor.dtype))
        elif counts != self.seen:
            self.tensor.copy_(torch.tensor(counts, dtype=self.tensor.dtype))
        self.seen = counts
        return self.tensor


def live_state(opt: Optimizer, st: Any, names: Sequence[str], params: Sequence[Any],
               steps: torch.Tensor) -> StateView:
    """torch's ``opt.state``: per parameter ``step`` (a view of ``steps``: each one's own
    count, :class:`StepCounts`) and live views of its slots (a complex parameter's as the
    complex tensor of its real view, as torch keeps them)."""
    if st is None:
        return StateView(dict)
    rename = slot_names_for_torch(opt)
    slots = {rename.get(s, s): st.slot(s) for s in shown(opt, st)}
    return StateView(dict, ((p, ParamStateView(
        {"step": steps[i],
         **{key: shown_as(per[name], p) for key, per in slots.items() if per[name].numel()}}))
        for i, (name, p) in enumerate(zip(names, params))))
