"""Checkpoints of data-parallel and sharded optimizer state, loadable at any world size.

:func:`save_sharded` has every rank write one file, ``shard-RRRRR-of-NNNNN.safetensors``
(the checkpoint format of :mod:`mithril.utils.checkpoint_io`: safetensors body, JSON
metadata, SHA-256 per tensor, atomic replace; no pickle), holding the parameters and slot
arrays of its run of tensors (:func:`.sharding.assign`, the tensors a sharded rank owns; a
replicated rank writes the same share, so saving is parallel in both modes). Because the
shards are whole tensors, loading at another world size is picking tensors by name:
:func:`load_sharded` reads every file, takes all parameters and the slots of the tensors it
will hold, and gives bit for bit the state that was saved.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import numpy as np

from ..utils.checkpoint_io import read_file, write_file
from . import process_group as pg
from .data_parallel import DataParallel, DistributedState, _host
from .sharding import assign

_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors$")


def _barrier() -> None:
    if pg.world_size() > 1:
        pg._dist().barrier()


def save_sharded(folder: str | os.PathLike, params: dict[str, Any], dp: DataParallel,
                 state: DistributedState) -> str:
    """Write this rank's share of ``params`` and ``state`` into ``folder`` (every rank calls
    it; returns this rank's file). Files of an earlier save with another world size are
    removed first, by rank 0."""
    folder = os.fspath(folder)
    world, me = pg.world_size(), pg.rank()
    os.makedirs(folder, exist_ok=True)
    if me == 0:
        for f in glob.glob(os.path.join(folder, "shard-*-of-*.safetensors")):
            m = _NAME.search(f)
            if m and int(m.group(2)) != world:
                os.remove(f)
    _barrier()
    names = state.names
    a, b = assign([int(np.prod(s, dtype=np.int64)) for s in state.shapes], world)[me]
    mine = names[a:b]
    local = state.local
    tensors: dict[str, np.ndarray] = {}
    for n in mine:
        tensors[f"params/{n}"] = np.ascontiguousarray(_host(params[n]))
    for s in local.slots:
        views = local.slot(s)
        for n in mine:
            tensors[f"slots/{s}/{n}"] = np.ascontiguousarray(_host(views[n]))
    meta = {"format": "mithril-sharded-1", "world": world, "rank": me,
            "optimizer": type(dp.optimizer).__name__, "shard_state": state.sharded,
            "names": list(names), "shapes": [list(s) for s in state.shapes],
            "held": list(mine), "slots": sorted(local.slots), "step": local.step,
            "num_skipped": local.num_skipped, "num_nonfinite": local.num_nonfinite,
            "values": dict(local.values)}
    path = os.path.join(folder, f"shard-{me:05d}-of-{world:05d}.safetensors")
    write_file(path, json.dumps(meta), tensors)
    _barrier()
    return path


def _read_all(folder: str) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    found = {}
    for f in glob.glob(os.path.join(folder, "shard-*-of-*.safetensors")):
        m = _NAME.search(f)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if len(found) != 1:
        raise ValueError(f"{folder!r} holds no sharded checkpoint" if not found else
                         f"{folder!r} mixes checkpoints of world sizes {sorted(found)}")
    (world, files), = found.items()
    if sorted(files) != list(range(world)):
        raise ValueError(f"{folder!r}: shards {sorted(set(range(world)) - set(files))} of "
                         f"{world} are missing")
    metas, arrays = [], {}
    for r in range(world):
        text, tensors = read_file(files[r])
        metas.append(json.loads(text))
        arrays.update(tensors)
    first = metas[0]
    for m in metas[1:]:
        for key in ("names", "shapes", "optimizer", "step", "slots"):
            if m[key] != first[key]:
                raise ValueError(f"{folder!r}: shard {m['rank']} disagrees with shard 0 on "
                                 f"{key} (files of different saves?)")
    return metas, arrays


def load_sharded(folder: str | os.PathLike, dp: DataParallel, backend: str = "numpy"
                 ) -> tuple[dict[str, Any], DistributedState]:
    """The parameters and this rank's state saved in ``folder`` by :func:`save_sharded` at
    any world size, for ``dp`` (an optimizer of the kind saved, with the hyperparameters
    wanted) at this world size; every rank calls it. ``backend``: ``"numpy"`` or
    ``"torch"`` (CPU) arrays."""
    metas, arrays = _read_all(os.fspath(folder))
    first = metas[0]
    if first["optimizer"] != type(dp.optimizer).__name__:
        raise ValueError(f"the checkpoint is of {first['optimizer']}, not "
                         f"{type(dp.optimizer).__name__}")

    def native(a: np.ndarray) -> Any:
        if backend == "torch":
            import torch

            return torch.from_numpy(np.array(a))
        if backend != "numpy":
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        return np.array(a)

    params = {n: native(arrays[f"params/{n}"]) for n in first["names"]}
    state = dp.init(params)
    local = state.local
    if sorted(local.slots) != first["slots"]:
        raise ValueError(f"the checkpoint has slots {first['slots']}, this optimizer "
                         f"{sorted(local.slots)}")
    for s in local.slots:
        views = local.slot(s)
        for n, view in views.items():
            src = arrays[f"slots/{s}/{n}"]
            if tuple(src.shape) != tuple(view.shape):
                raise ValueError(f"slot '{s}' of '{n}' has shape {src.shape}, expected "
                                 f"{tuple(view.shape)}")
            view[...] = native(src)
    local.step = int(first["step"])
    local.num_skipped = int(first["num_skipped"])
    local.num_nonfinite = int(first["num_nonfinite"])
    if set(first["values"]) != set(local.values):
        raise ValueError(f"the checkpoint has values {sorted(first['values'])}, this "
                         f"optimizer {sorted(local.values)}")
    local.values = {k: float(v) for k, v in first["values"].items()}
    return params, state
