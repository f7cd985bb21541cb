"""``opt.state`` of a :class:`~mithril.interop.torch_optim.TorchOptimizer`: torch's layout
(per parameter ``step`` and its slots under torch's names) as a read-only view of the
optimizer's state. The slot tensors are live views of its buffers (writing them in place
changes the state); ``step`` is a copy. Setting or removing an entry raises, naming what to
do, where it was silently ignored (why: ``opt.state.clear()``, ``del opt.state[p]`` or
``opt.state[p]["exp_avg"] = zeros``, torch's ways to reset a state, changed nothing here)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from ..utils.optimizers import Optimizer
from .torch_optim_state import own_steps, shown, slot_names_for_torch

__all__ = ["ParamStateView", "StateView", "live_state"]

_WHY = ("opt.state of a mithril torch_optimizer is a view of the optimizer's state: write "
        "its slot tensors in place (opt.state[p]['exp_avg'].zero_()); to start afresh, make a "
        "new torch_optimizer (load_state_dict sets a whole state, each parameter's 'step' too)")


def _refuse(what: str) -> Any:
    def refused(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{what}: {_WHY}")
    return refused


def _read_only(spelled: str) -> Any:
    """A dict class whose every mutator raises, naming the call as written on ``spelled``
    (``opt.state`` / ``opt.state[p]``)."""
    def made(cls: type) -> type:
        for name, call in (("__setitem__", f"{spelled}[key] = value"),
                           ("__delitem__", f"del {spelled}[key]"),
                           ("__ior__", f"{spelled} |= ..."),
                           *((m, f"{spelled}.{m}()") for m in (
                               "clear", "pop", "popitem", "setdefault", "update"))):
            setattr(cls, name, _refuse(call))
        return cls
    return made


@_read_only("opt.state[p]")
class ParamStateView(dict):
    """One parameter's entry: ``step`` (a copy) and live views of its slots."""

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


def live_state(opt: Optimizer, st: Any, names: Sequence[str], params: Sequence[Any]
               ) -> StateView:
    """torch's ``opt.state``: per parameter ``step`` and live views of its slots."""
    if st is None:
        return StateView(dict)
    rename = slot_names_for_torch(opt)
    slots = {rename.get(s, s): st.slot(s) for s in shown(opt, st)}
    return StateView(dict, ((p, ParamStateView(
        {"step": torch.tensor(float(k)),
         **{key: per[name] for key, per in slots.items() if per[name].numel()}}))
        for name, p, k in zip(names, params, own_steps(opt, st, names))))
