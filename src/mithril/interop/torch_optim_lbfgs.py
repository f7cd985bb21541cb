"""LBFGS's state dict in ``torch.optim.LBFGS``'s own layout, both ways, for
:class:`~mithril.interop.torch_optim.TorchOptimizer` (``convention="torch"``).

torch keeps LBFGS's state as one entry, ``state[<first parameter's id>]``, of flat tensors
over all the parameters in their order (a complex one as ``torch.view_as_real``): ``d``,
``prev_flat_grad``, the history as lists, oldest first, ``old_dirs`` (the gradient
changes, mithril's ``y{i}``) and ``old_stps`` (the steps, ``s{i}``), ``ro`` (0-d tensors,
``1/(y·s)``), ``H_diag`` (a 0-d tensor), ``t`` and ``prev_loss`` (floats), ``func_evals``
and ``n_iter`` (ints); ``al`` is scratch. mithril keeps the same numbers as per-parameter
slots and optimizer-wide values: :func:`torch_lbfgs_state` writes torch's layout (so that
``torch.optim.LBFGS.load_state_dict`` of ours goes on as our run would), and
:func:`ours_from_torch` turns one in torch's layout (torch's own, or ours after a
``torch.optim.LBFGS`` that loaded it stepped on) into the per-parameter layout with a
``"mithril"`` entry that :func:`~.torch_optim_state.parse_state_dict` reads.

torch counts no steps and keeps not the loss its last step returned: where the dict's
``"mithril"`` entry (ours, also kept in its first group) still matches its state, its
counters and ``last_loss`` are taken; otherwise the count is the fewest steps that explain
the state (one past the entry's, or 1 for torch's own) and ``last_loss`` is ``prev_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..utils.optimizers import LBFGS, Optimizer
from .torch_optim_state import to_tensor

#: the keys of ``torch.optim.LBFGS``'s state entry
TORCH_KEYS = ("func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
              "prev_flat_grad", "prev_loss", "al")
_FLAT = ("d", "prev_flat_grad")


def torch_layout(opt: Optimizer) -> bool:
    """Whether ``opt``'s state dict is in ``torch.optim.LBFGS``'s layout."""
    return isinstance(opt, LBFGS) and opt.convention == "torch"


def torch_lbfgs_state(st: Any, names: Sequence[str]) -> dict[int, dict[str, Any]]:
    """The ``state`` entry of a state dict of the LBFGS state ``st`` (not None), as
    ``torch.optim.LBFGS`` keeps it (module docs; copies)."""
    v = st.values
    n_iter, n = int(v["n_iter"]), int(v["history"])
    entry: dict[str, Any] = {"func_evals": int(v["func_evals"]), "n_iter": n_iter}
    if not n_iter:  # (torch's first step stopped at once: no direction yet)
        return {0: entry}

    def flat(slot: str) -> torch.Tensor:
        per = st.slot(slot)
        return torch.cat([to_tensor(np.array(st.engine.to_numpy(per[k]))).reshape(-1)
                          for k in names])

    d = flat("d")
    entry.update(d=d, t=float(v["t"]), old_dirs=[flat(f"y{i}") for i in range(n)],
                 old_stps=[flat(f"s{i}") for i in range(n)],
                 ro=[torch.tensor(float(v[f"ro{i}"]), dtype=d.dtype) for i in range(n)],
                 H_diag=torch.tensor(float(v["H_diag"]), dtype=d.dtype),
                 prev_flat_grad=flat("prev_flat_grad"), prev_loss=float(v["prev_loss"]))
    return {0: entry}


def _whole(key: str, x: Any) -> int:
    try:
        f = float(x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x)
    except (TypeError, ValueError, RuntimeError):
        f = math.nan
    if not (math.isfinite(f) and f == int(f) and f >= 0) or isinstance(x, bool):
        raise ValueError(f"state dict: torch.optim.LBFGS's state '{key}' must be a whole "
                         f"number >= 0, got {x!r:.60}")
    return int(f)


def _number(key: str, x: Any) -> float:
    try:
        if isinstance(x, torch.Tensor):
            if x.numel() != 1:
                raise ValueError
            x = x.item()
        if isinstance(x, (bool, str)):
            raise ValueError
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"state dict: torch.optim.LBFGS's state '{key}' must be a number "
                         f"(or one-element tensor), got {x!r:.60}") from None


def _flat(key: str, x: Any, total: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() != total \
            or not (x.is_floating_point()):
        got = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"state dict: torch.optim.LBFGS's state '{key}' must be a flat "
                         f"real tensor of {total} elements (every parameter's, in order), "
                         f"got {got}")
    return x.detach()


def ours_from_torch(opt: Optimizer, sd: Mapping[str, Any], names: Sequence[str],
                    params: Sequence[torch.Tensor]) -> Mapping[str, Any]:
    """``sd`` with its ``state`` in the per-parameter layout and a ``"mithril"`` entry, if
    it is in ``torch.optim.LBFGS``'s layout (else ``sd`` as it is); ``params``: the
    parameters (a complex one as its real view). Raises ``ValueError`` / ``TypeError``
    naming the entry at fault; changes nothing."""
    if not torch_layout(opt) or not isinstance(sd, Mapping):
        return sd
    state, groups = sd.get("state"), sd.get("param_groups")
    if not (isinstance(state, Mapping) and isinstance(groups, (list, tuple))
            and groups and isinstance(groups[0], Mapping)
            and isinstance(groups[0].get("params"), (list, tuple)) and groups[0]["params"]):
        return sd
    if not state:  # (torch's before any step: no "mithril" entry, nothing to restore)
        if "mithril" in sd or "mithril" in groups[0] or not all(
                isinstance(i, int) for i in groups[0]["params"]):
            return sd
        return {**sd, "mithril": {"optimizer": type(opt).__name__, "step": 0,
                                  "hyperparameters": opt.state_dict(None)["hyperparameters"]}}
    if not any(isinstance(e, Mapping) and ("n_iter" in e or "func_evals" in e)
               for e in state.values()):
        return sd  # (ours per parameter: an older save)
    first = groups[0]["params"][0]
    if set(state) != {first}:
        raise ValueError(f"state dict in torch.optim.LBFGS's layout must have one 'state' "
                         f"entry, under the first parameter's id {first!r}, got "
                         f"{sorted(state, key=repr)}")
    entry = state[first]
    if not isinstance(entry, Mapping):
        raise TypeError(f"state dict 'state'[{first!r}] must be a dict, got "
                        f"{type(entry).__name__}")
    unknown = sorted(set(entry) - set(TORCH_KEYS), key=repr)
    if unknown:
        raise KeyError(f"state dict 'state'[{first!r}] (torch.optim.LBFGS's layout) has "
                       f"unknown keys {unknown}; torch's are {list(TORCH_KEYS)}")
    n_iter = _whole("n_iter", entry.get("n_iter", 0))
    func_evals = _whole("func_evals", entry.get("func_evals", 0))
    meta = sd.get("mithril")
    if meta is None:
        meta = groups[0].get("mithril")
    if meta is not None and not (isinstance(meta, Mapping)
                                 and meta.get("optimizer") == type(opt).__name__):
        return sd  # (another optimizer's: parse_state_dict names it)
    hp = meta.get("hyperparameters") if meta else None
    if not isinstance(hp, Mapping):
        hp = opt.state_dict(None)["hyperparameters"]
    h = groups[0].get("history_size", hp.get("history_size", opt.history_size))
    if not isinstance(h, int) or isinstance(h, bool) or h < 1:
        raise ValueError(f"state dict param_groups[0]['history_size'] must be a whole "
                         f"number >= 1, got {h!r}")
    total = sum(int(p.numel()) for p in params)
    values = {"n_iter": float(n_iter), "func_evals": float(func_evals), "t": 0.0,
              "H_diag": 1.0, "prev_loss": 0.0, "history": 0.0,
              **{f"ro{i}": 0.0 for i in range(h)}}
    flats: dict[str, torch.Tensor] = {}
    if n_iter:
        missing = [k for k in TORCH_KEYS[2:-1] if k not in entry]
        if missing:
            raise KeyError(f"state dict 'state'[{first!r}] (torch.optim.LBFGS's layout, "
                           f"n_iter {n_iter}) lacks {missing}")
        lists = [entry[k] for k in ("old_dirs", "old_stps", "ro")]
        if not all(isinstance(x, (list, tuple)) for x in lists) or len(
                {len(x) for x in lists}) != 1 or len(lists[0]) > h:
            got = [len(x) if isinstance(x, (list, tuple)) else type(x).__name__
                   for x in lists]
            raise ValueError(f"state dict: torch.optim.LBFGS's 'old_dirs', 'old_stps' and "
                             f"'ro' must be lists of one length, at most history_size {h}, "
                             f"got {got}")
        n = len(lists[0])
        for k in _FLAT:
            flats[k] = _flat(k, entry[k], total)
        for i in range(n):
            flats[f"y{i}"] = _flat(f"old_dirs[{i}]", entry["old_dirs"][i], total)
            flats[f"s{i}"] = _flat(f"old_stps[{i}]", entry["old_stps"][i], total)
            values[f"ro{i}"] = _number(f"ro[{i}]", entry["ro"][i])
        values.update(t=_number("t", entry["t"]), H_diag=_number("H_diag", entry["H_diag"]),
                      prev_loss=_number("prev_loss", entry["prev_loss"]), history=float(n))
    saved = meta.get("values") if meta else None
    same = (isinstance(saved, Mapping) and saved.get("n_iter") == values["n_iter"]
            and saved.get("func_evals") == values["func_evals"])
    count = meta.get("step", 0) if meta else 0
    if same:
        values["last_loss"] = saved.get("last_loss", values["prev_loss"])
        counters = {k: meta.get(k, 0) for k in ("step", "num_skipped", "num_nonfinite",
                                               "consecutive_skips")}
    else:  # (torch's own, or one that went on from ours: module docs)
        values["last_loss"] = values["prev_loss"]
        step = (count + 1 if isinstance(count, int) else 1) if meta else int(func_evals > 0)
        counters = {"step": step}
    ours = {k: v for k, v in (meta or {}).items() if k not in ("values", "missed")}
    ours.update(optimizer=type(opt).__name__, hyperparameters=hp, values=values, **counters)
    step = torch.tensor(float(ours["step"]) if isinstance(ours["step"], (int, float))
                        else 0.0)
    ids = [i for g in groups if isinstance(g, Mapping)
           for i in (g.get("params") if isinstance(g.get("params"), (list, tuple)) else ())]
    new_state: dict[Any, dict[str, Any]] = {i: {"step": step.clone()} for i in ids}
    if len(ids) == len(params):
        start = 0
        for i, p in zip(ids, params):
            size = int(p.numel())
            for slot, x in flats.items():
                new_state[i][slot] = x[start:start + size].reshape(p.shape)
            start += size
    return {**sd, "state": new_state, "mithril": ours}
