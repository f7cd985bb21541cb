"""A mithril optimizer's own state dict (``optimizer.state_dict(state)``: what
``save_checkpoint`` keeps and ``load_checkpoint`` returns as ``optimizer_state_dict``) given
to a torch drop-in's ``load_state_dict``: turned into the torch-shaped one the drop-in saves
itself, so that a run checkpointed with ``save_checkpoint`` resumes under
``torch_optimizer`` (the groups' values shown are the checkpoint's, as torch's load sets
them)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .torch_optim_complex import reals
from .torch_optim_groups import mithril_index, packed_groups
from .torch_optim_lbfgs import torch_layout, torch_lbfgs_state
from .torch_optim_state import export

__all__ = ["is_own", "torch_shaped"]


def is_own(sd: Mapping[str, Any]) -> bool:
    """Whether ``sd`` is a mithril optimizer's own state dict, not a torch-shaped one."""
    return "optimizer" in sd and "hyperparameters" in sd and "param_groups" not in sd \
        and "state" not in sd


def torch_shaped(tw: Any, sd: Mapping[str, Any]) -> dict[str, Any]:
    """``sd`` as the state dict the drop-in ``tw`` would have saved in that state. Checked
    by a copy of the wrapped optimizer (its load names what is wrong); nothing changes."""
    trial = copy.copy(tw._mithril)
    params = dict(zip(tw._names, (p.detach() for p in reals(tw._params))))
    try:
        st = trial.load_state_dict(sd, params)
    except (TypeError, ValueError, KeyError) as e:
        raise type(e)(f"state dict refused (nothing changed): {e}") from e
    packed = packed_groups(tw)
    index = mithril_index(tw._group_names) if tw._grouped else [None] * len(packed)
    for g, j in zip(packed, index):
        if j is None and tw._grouped:  # (an empty group: it shows the values it has)
            continue
        for key, ours in tw._keys:
            try:
                values = [trial._hyperparameter_value(n, j) for n in ours]
            except (AttributeError, KeyError):  # (a key the optimizer holds no value of)
                continue
            g[key] = values[0] if len(values) == 1 else tuple(values)
    lrs = [g["lr"] for g in packed for _ in g["params"]]
    state, meta = export(trial, st, tw._names, lrs, tw._params)
    if torch_layout(trial) and st is not None:  # (torch.optim.LBFGS's layout)
        state = torch_lbfgs_state(st, tw._names)
    meta["param_names"] = list(tw._names)
    packed[0]["mithril"] = meta
    return {"state": state, "param_groups": packed, "mithril": meta}
