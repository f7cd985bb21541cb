"""torch.optim's own state dicts and :class:`~.torch_optim.TorchOptimizer`'s: what lets a
``torch.optim`` optimizer's state dict (not one that went through ours) load into the
wrapper, and ours into a ``torch.optim`` optimizer, where a parameter has not stepped yet.

torch keeps no ``state`` entry for a parameter that never had a gradient, and SGD's entries
hold no ``step``; its groups hold torch's values under torch's keys and its ids are numbers
(:func:`torchs`, :func:`torch_state`; :func:`~.torch_optim_state.parse_state_dict` rebuilds
the ``"mithril"`` entry from them). A parameter whose ``step`` is 0 starts fresh on a load
(:func:`is_zero`), and ours holds, for it, what torch's first step reads (:func:`unstepped`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..utils.optimizers import ASGD, SGD, Optimizer, Rprop


def is_zero(step: Any) -> bool:
    """Whether a state dict entry's ``step`` is 0 (one that is no number: not; it is
    refused by name later)."""
    try:
        return step is not None and float(step) == 0
    except (TypeError, ValueError, RuntimeError):
        return False


def torchs(groups: Any) -> bool:
    """Whether ``groups`` (a state dict's param groups without the "mithril" entry) are a
    ``torch.optim`` optimizer's: torch's ids (numbers; how many groups and parameters
    is checked later, as for ours)."""
    return (isinstance(groups, (list, tuple)) and bool(groups)
            and all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple))
                    and all(isinstance(i, int) for i in g["params"]) for g in groups))


def torch_state(state: Mapping[Any, Any], groups: Sequence[Mapping[str, Any]]
                ) -> dict[Any, Any]:
    """A ``torch.optim`` state dict's ``state`` as ours holds it: torch keeps no entry for a
    parameter that never had a gradient (here: ``step`` 0, its slots made fresh by
    :func:`~.torch_optim_state.complete`), and no ``step`` in SGD's (an entry holding a
    ``momentum_buffer`` has stepped: 1, which SGD's rule reads only as "not the first
    step")."""
    if not state:
        return {}
    out = {i: {"step": 0.0} for g in groups for i in g["params"]}
    for i, e in state.items():
        out[i] = e if not isinstance(e, Mapping) or "step" in e else {**e, "step": 1.0}
    return out


def unstepped(opt: Optimizer, entry: dict[str, Any], lr: float) -> None:
    """Make ``entry`` (a parameter's, which has not stepped yet) hold what a torch.optim
    optimizer that loads it reads as its own first step does: ASGD's ``eta`` = its ``lr``
    and ``mu`` = 1, Rprop's ``step_size`` = its ``lr`` (mithril's: 0 and 0, -1: set at the
    first step), and SGD's ``momentum_buffer`` left out (torch's first step copies the
    gradient where there is none, a zero buffer would be dampened). Why: torch.optim's
    Rprop that loaded ours stepped a never-stepped parameter by ``+1`` against the
    gradient. A load here starts such a parameter fresh
    (:func:`~.torch_optim_state.parse_state_dict`)."""
    if isinstance(opt, ASGD):
        entry["eta"] = torch.full_like(entry["eta"], lr)
        entry["mu"] = torch.ones_like(entry["mu"])
    elif isinstance(opt, Rprop):
        # (a complex parameter's: lr in both parts, as torch's)
        v = complex(lr, lr) if entry["step_size"].is_complex() else lr
        entry["step_size"] = torch.full_like(entry["step_size"], v)
    elif isinstance(opt, SGD):
        entry.pop("momentum_buffer", None)
