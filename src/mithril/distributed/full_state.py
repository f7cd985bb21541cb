"""The whole optimizer state of a data-parallel run on one rank, and back: what a checkpoint of
one file needs from ZeRO's sharded state.

:func:`gather_state` is torch FSDP's ``full_optim_state_dict(rank0_only=True)`` for
:class:`~.DataParallel`: every rank calls it; each sends its
``optimizer.state_dict(local)`` (the slots of the tensors it owns, its counters) to ``dst``
in one ``torch.distributed.gather`` (no pickle: a JSON header and the arrays' raw bytes),
and ``dst`` merges them into the :class:`~mithril.utils.optimizers.OptimizerState` one
process would hold, built and checked by the optimizer's own ``load_state_dict``. A
replicated state is already whole (nothing is sent). :func:`scatter_state` is the inverse:
from such a state (loaded by every rank from the same file) each rank's
:class:`~.DistributedState` at this world size, sharded or not, so that a checkpoint saved at
one world size resumes at another, or in one process.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from ..utils.optimizers.state import OptimizerState
from . import process_group as pg
from .data_parallel import DataParallel, DistributedState, _dtype_name, _local_init


def gather_bytes(data: bytes, dst: int = 0, what: str = "gather") -> list[bytes] | None:
    """Every rank's ``data`` on rank ``dst`` (rank order; None on the others): one
    all-gather of the lengths, then one ``torch.distributed.gather`` of the bytes (only
    ``dst`` receives them all)."""
    n = pg.world_size()
    if n == 1:
        return [data]
    sizes = np.zeros(n, dtype=np.int64)
    pg.all_gather(sizes, np.array([len(data)], dtype=np.int64), what)
    width = max(int(sizes.max()), 1)
    mine = np.zeros(width, dtype=np.uint8)
    mine[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    me = pg.rank()
    into = [np.zeros(width, dtype=np.uint8) for _ in range(n)] if me == dst else None
    pg._run(what, pg._dist().gather, pg.as_torch(mine),
            None if into is None else [pg.as_torch(b) for b in into], dst)
    if into is None:
        return None
    return [into[r][:int(sizes[r])].tobytes() for r in range(n)]


def encode(tree: Any) -> bytes:
    """``tree`` (dicts, lists, numbers, strings, NumPy arrays) as bytes without pickle: an
    8-byte header length, the JSON header (arrays replaced by their dtype, shape and offset),
    the arrays' bytes."""
    blobs: list[bytes] = []
    offset = 0

    def walk(x: Any) -> Any:
        nonlocal offset
        if isinstance(x, dict):
            return {"d": [[k, walk(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return {"l": [walk(v) for v in x]}
        if isinstance(x, np.ndarray) or (hasattr(x, "dtype") and hasattr(x, "shape")):
            a = np.asarray(x)
            a = a if a.flags.c_contiguous else a.copy()  # (ascontiguousarray makes 0-d 1-d)
            blobs.append(a.tobytes())
            ref = {"a": [a.dtype.name, list(a.shape), offset, a.nbytes]}
            offset += a.nbytes
            return ref
        if isinstance(x, np.generic):
            return x.item()
        return x

    head = json.dumps(walk(tree)).encode()
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def decode(data: bytes) -> Any:
    """The tree :func:`encode` wrote (arrays as NumPy arrays of their own memory)."""
    n = int.from_bytes(data[:8], "little")
    head, body = json.loads(data[8:8 + n]), memoryview(data)[8 + n:]

    def walk(x: Any) -> Any:
        if isinstance(x, dict) and "d" in x:
            return {k: walk(v) for k, v in x["d"]}
        if isinstance(x, dict) and "l" in x:
            return [walk(v) for v in x["l"]]
        if isinstance(x, dict) and "a" in x:
            dtype, shape, start, size = x["a"]
            if dtype == "bfloat16":
                import ml_dtypes

                dt = np.dtype(ml_dtypes.bfloat16)
            else:
                dt = np.dtype(dtype)
            return np.frombuffer(body[start:start + size], dtype=dt).reshape(shape).copy()
        return x

    return walk(head)


def merge_state_dicts(parts: list[dict[str, Any]], owned: list[list[str]],
                      names: list[str]) -> dict[str, Any]:
    """One state dict of the parameters ``names`` from each rank's ``state_dict`` of the
    tensors it ``owned``: the slots, weight-average counts and missed steps of each tensor
    from its owner; the step, the counters and the optimizer-wide values from the first rank
    that owns a tensor (alike on every rank that does: the sharded step agrees on them)."""
    lead = next((p for p, o in zip(parts, owned) if o), parts[0])
    out = {k: v for k, v in lead.items() if k not in ("slots", "averaged", "missed")}
    slots: dict[str, dict[str, Any]] = {s: {} for s in lead.get("slots", {})}
    averaged: dict[str, dict[str, int]] = {}
    missed: dict[str, int] = {}
    for part, own in zip(parts, owned):
        if not own:
            continue
        if set(part.get("slots", {})) != set(slots):
            raise ValueError(f"the ranks' states have different slots: "
                             f"{sorted(part.get('slots', {}))} and {sorted(slots)}")
        for s, per in part.get("slots", {}).items():
            slots[s].update(per)
        for s, per in (part.get("averaged") or {}).items():
            averaged.setdefault(s, {}).update(per)
        missed.update(part.get("missed") or {})
    out["slots"] = {s: {n: per[n] for n in names if n in per} for s, per in slots.items()}
    if "averaged" in lead:
        out["averaged"] = {s: {n: per[n] for n in names if n in per}
                           for s, per in averaged.items()}
    if "missed" in lead or missed:
        out["missed"] = {n: missed[n] for n in names if n in missed}
    return out


def gather_state(dp: DataParallel, state: DistributedState, params: dict[str, Any],
                 dst: int = 0) -> Any:
    """The whole :class:`~mithril.utils.optimizers.OptimizerState` of ``state`` (this run's
    ``params``, the same on every rank) on rank ``dst``, None on the others; every rank
    calls it at the same point. Replicated: ``state.local`` itself (no collective)."""
    if not isinstance(state, DistributedState):
        raise TypeError(f"gather_state: state must be what DataParallel.init returned, got "
                        f"{type(state).__name__}")
    if not state.sharded or state.world == 1:
        return state.local if pg.rank() == dst else None
    opt = dp.optimizer
    error: Exception | None = None
    try:  # (refused on one rank only, an EMA swapped in there: the others waited in the
        # gather until the timeout; now every rank raises, before anything is sent)
        sd = opt.state_dict(state.local)
    except (TypeError, ValueError, KeyError) as e:
        error = e
    pg.agree("gather_state", error)
    del sd["hyperparameters"]  # (alike on every rank: dst's own are used)
    mine = encode({"owned": list(state.owned), "sd": sd})
    every = gather_bytes(mine, dst, "gather_state (the optimizer state's shards)")
    if every is None:
        return None
    got = [decode(b) for b in every]
    merged = merge_state_dicts([g["sd"] for g in got], [g["owned"] for g in got],
                               list(state.names))
    merged["hyperparameters"] = opt.hyperparameters()  # (rank 0's own, not their JSON)
    return copy.copy(opt).load_state_dict(merged, params)


def scatter_state(dp: DataParallel, full: Any, params: dict[str, Any]) -> DistributedState:
    """This rank's :class:`~.DistributedState` of ``dp`` holding ``full`` (the whole state
    of ``params``, e.g. :func:`gather_state`'s, loaded from a checkpoint by every rank):
    replicated, ``full`` itself; sharded, the slots, counts and missed steps of the tensors
    this rank owns at this world size. Every rank calls it (``dp.init`` is a collective).
    ``full`` is checked first against what ``dp``'s optimizer makes for ``params`` (its slots,
    each slot's shape and dtype, its values); a refusal on any rank raises on every rank
    before ``dp.init``, nothing changed (before, a slot of another shape was broadcast into
    the sharded state silently, and a refusal came after ``dp.init`` on one rank only)."""
    error: Exception | None = None
    try:
        _check_full(dp, full, params)
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        error = e
    pg.agree("scatter_state", error)
    wrapped = dp.init(params)
    if not wrapped.sharded:
        wrapped.local = full
        return wrapped
    local = wrapped.local
    own = list(wrapped.owned)
    for s in local.slots:
        src, views = full.slot(s), local.slot(s)
        for n in own:
            views[n][...] = src[n]
    local.step, local.num_skipped = full.step, full.num_skipped
    local.num_nonfinite, local.consecutive_skips = full.num_nonfinite, full.consecutive_skips
    local.values = dict(full.values)
    if getattr(full, "averaged", None) is not None:
        where = full.layout.index
        local.averaged = {s: np.array([c[where[n]] for n in local.layout.names],
                                      dtype=np.int64) for s, c in full.averaged.items()}
    local.set_missed({n: m for n, m in full.missed_counts().items() if n in set(own)})
    return wrapped


def _check_full(dp: DataParallel, full: Any, params: dict[str, Any]) -> None:
    """Raise where ``full`` is not a state of ``dp``'s optimizer for ``params``: compared
    with what a copy of it makes for them (nothing of ``dp`` changes)."""
    name = type(dp.optimizer).__name__
    if not isinstance(full, OptimizerState):
        raise TypeError(f"scatter_state: full must be an OptimizerState (the whole state, "
                        f"e.g. gather_state's), got {type(full).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"scatter_state: params must be a dict of arrays, got "
                        f"{type(params).__name__}")
    trial = _local_init(copy.copy(dp.optimizer), params)
    if set(trial.slots) != set(full.slots) or full.kind != trial.kind:
        raise ValueError(f"the state has slots {sorted(full.slots)}, {name} here "
                         f"{sorted(trial.slots)}")
    if set(full.layout.names) != set(trial.layout.names):
        raise KeyMismatchError(f"scatter_state: the state holds the parameters "
                               f"{sorted(full.layout.names)}, params "
                               f"{sorted(trial.layout.names)}")
    if set(full.values) != set(trial.values):
        raise ValueError(f"scatter_state: the state has values {sorted(full.values)}, {name} "
                         f"here {sorted(trial.values)}")
    for s in trial.slots:
        got, want = full.slot(s), trial.slot(s)
        for n, w in want.items():
            g = got[n]
            if tuple(g.shape) != tuple(w.shape):
                raise ShapeError(f"scatter_state: slot '{s}' of '{n}' has shape "
                                 f"{tuple(g.shape)}; {name} makes {tuple(w.shape)} for "
                                 f"params['{n}'] of shape {tuple(params[n].shape)}")
            if type(g) is not type(w) or _dtype_name(g) != _dtype_name(w):
                raise DTypeError(f"scatter_state: slot '{s}' of '{n}' is a {type(g).__name__} "
                                 f"of {_dtype_name(g)}; the params make {type(w).__name__} of "
                                 f"{_dtype_name(w)}")
