"""Checkpoints of data-parallel and sharded optimizer state, loadable at any world size.

:func:`save_sharded` has every rank write one file, ``shard-RRRRR-of-NNNNN.safetensors``
(the checkpoint format of :mod:`mithril.utils.checkpoint_io`: safetensors body, JSON
metadata, SHA-256 per tensor, atomic replace; no pickle), holding the parameters and slot
arrays of its run of tensors (:func:`.sharding.assign`, the tensors a sharded rank owns; a
replicated rank writes the same share, so saving is parallel in both modes). Because the
shards are whole tensors, loading at another world size is picking tensors by name:
:func:`load_sharded` reads every file, takes all parameters and the slots of the tensors it
will hold, and gives bit for bit the state that was saved (the weight averages' update
counts and the steps each tensor had no gradient at, ``OptimizerState.note_missed``,
included: saved by the rank that writes the tensor, merged at the load; the non-finite
steps in a row of ``max_consecutive_skips``, one count for all ranks, too).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, DTypeError, KeyMismatchError, ShapeError
from ..utils.checkpoint_format import (
    FLOAT_DTYPES,
    decode_metrics,
    encode_metrics,
    numpy_scalar,
    to_numpy,
)
from ..utils.checkpoint_format import FORMAT as CHECKPOINT_FORMAT
from ..utils.checkpoint_io import (
    MAX_INT,
    _fsync_folder,
    _keep_mode,
    loads_guarded,
    read_file,
    remove_stale_temporaries,
    write_file,
)
from ..utils.optimizers.averaging import counts_of, merged_counts, saved_counts
from . import process_group as pg
from .data_parallel import DataParallel, DistributedState, _dtype_name, _holder, _local_init
from .sharding import assign

#: the format tag of every shard's metadata
FORMAT = "mithril-sharded-1"
#: the fields every shard's metadata holds (later ones are optional: older shards lack them)
_FIELDS = ("world", "rank", "optimizer", "names", "shapes", "slots", "step", "num_skipped",
           "num_nonfinite", "values")
#: the counters every shard's metadata holds, each an int in [0, MAX_INT]
_COUNTERS = ("step", "num_skipped", "num_nonfinite", "consecutive_skips")
_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})\.safetensors$")
#: a shard written but not yet committed (renamed to its final name), or the shard a
#: commit replaces, kept until every rank has committed
_PENDING = re.compile(r"shard-\d{5}-of-\d{5}\.safetensors\.(?:pending|previous)-([0-9a-f]+)$")
#: the name of a pending shard as its temporary file holds it (``write_file``'s
#: ``.ckpt-<name>-<host>-<pid>-<random>.tmp``)
_WRITING = re.compile(r"shard-\d{5}-of-\d{5}\.safetensors\.pending-[0-9a-f]+")


def _collect(folder: str, params: Any, dp: Any, state: Any
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """This rank's metadata and tensors, everything checked (raises, writing nothing)."""
    if not isinstance(dp, DataParallel):
        raise TypeError(f"save_sharded: dp must be a DataParallel, got {type(dp).__name__}")
    if not isinstance(state, DistributedState):
        raise TypeError(f"save_sharded: state must be what DataParallel.init returned, got "
                        f"{type(state).__name__}")
    world, me = pg.world_size(), pg.rank()
    if state.world != world:
        raise ValueError(f"save_sharded: state was made for {state.world} ranks, the world "
                         f"has {world}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"save_sharded: {folder!r} exists and is not a folder")
    if not isinstance(params, Mapping):
        raise TypeError(f"save_sharded: params must be a dict of arrays, got "
                        f"{type(params).__name__}")
    names = state.names
    missing, unknown = [n for n in names if n not in params], sorted(set(params) - set(names))
    if missing or unknown:
        raise KeyMismatchError(f"save_sharded: params must hold exactly the parameters of "
                               f"init: missing {missing}, unknown {unknown}")
    want = _dtype_name(state._send)  # the dtype init saw (every slot and buffer's)
    for n, shape in zip(names, state.shapes):
        p = params[n]
        if not hasattr(p, "shape") or not hasattr(p, "dtype"):
            raise TypeError(f"save_sharded: params['{n}'] is a {type(p).__name__}, not an array")
        if tuple(p.shape) != shape:
            raise ShapeError(f"save_sharded: params['{n}'] has shape {tuple(p.shape)}, the "
                             f"state's parameter {shape}")
        if _dtype_name(p) != want:
            raise DTypeError(f"save_sharded: params['{n}'] has dtype {_dtype_name(p)}, the "
                             f"state's parameters {want}")
    if want not in FLOAT_DTYPES:
        raise DTypeError(f"save_sharded: parameters of dtype {want}; checkpoints hold "
                         f"{list(FLOAT_DTYPES)}")
    a, b = assign([int(np.prod(s, dtype=np.int64)) for s in state.shapes], world)[me]
    mine, local = names[a:b], state.local
    held = set(mine)
    counts = saved_counts(local) if counts_of(dp.optimizer, local) is not None else {}
    # to_numpy keeps 0-d arrays 0-d and stores bfloat16 as its exactly equal float32
    tensors = {f"params/{n}": to_numpy(params[n]) for n in mine}
    for s in local.slots:
        views = local.slot(s)
        for n in mine:
            tensors[f"slots/{s}/{n}"] = to_numpy(views[n])
    meta = {"format": FORMAT, "world": world, "rank": me,
            "optimizer": type(dp.optimizer).__name__, "shard_state": state.sharded,
            "names": list(names), "shapes": [list(s) for s in state.shapes], "dtype": want,
            "held": list(mine), "slots": sorted(local.slots), "step": local.step,
            "num_skipped": local.num_skipped, "num_nonfinite": local.num_nonfinite,
            # the non-finite steps in a row (max_consecutive_skips), alike on every rank
            "consecutive_skips": local.consecutive_skips,
            # (a run gone NaN under "propagate": non-finite ones by name, JSON has none)
            "values": encode_metrics(local.values),
            # what the averages' slots mean (their start: a slot before it is a copy)
            "averaging": {k: getattr(dp.optimizer, k, None) for k in _AVERAGING},
            # each average's updates so far, for the tensors this rank holds
            "averaged": {s: {n: c[n] for n in mine if n in c} for s, c in counts.items()},
            # the steps each of them had no gradient at (OptimizerState.note_missed)
            "missed": {n: m for n, m in local.missed_counts().items() if n in held}}
    return meta, tensors


#: the settings of the weight averages (ema / swa slots) a checkpoint records
_AVERAGING = ("ema_decay", "ema_every", "ema_start", "swa_start")


def _averaging_settings(opt: Any, first: dict[str, Any]) -> tuple[tuple[str, ...],
                                                                  dict[str, Any]]:
    """As ``Optimizer.load_state_dict``: the averages ``opt`` keeps that the checkpoint
    lacks (they start at the resume: slots copied from the parameters, start after the
    saved step) and the averaging settings to set on ``opt`` (the checkpoint's for an
    average it has, as its slot was made with them). A checkpoint saved before the settings
    were recorded: its averages are taken as made with ``opt``'s."""
    from ..utils.optimizers.averaging import EMA, SWA, resumed_averages

    saved = first.get("averaging")
    if not isinstance(saved, dict):
        saved = {k: getattr(opt, k, None) for k in _AVERAGING}
        saved["ema_decay"] = saved["ema_decay"] if EMA in first["slots"] else None
        saved["swa_start"] = saved["swa_start"] if SWA in first["slots"] else None
    started, kept = resumed_averages(opt, saved, int(first["step"]))
    settings = {}
    if saved.get("ema_decay") is not None and getattr(opt, "ema_decay", None) is not None:
        settings.update(ema_decay=saved["ema_decay"], ema_start=saved.get("ema_start", 1))
    if saved.get("swa_start") is not None and getattr(opt, "swa_start", None) is not None:
        settings["swa_start"] = saved["swa_start"]
    if (EMA in first["slots"] or SWA in first["slots"]) and saved.get("ema_every") is not None:
        settings["ema_every"] = saved["ema_every"]
    settings.update(kept)
    return started, {k: v for k, v in settings.items() if hasattr(opt, k)}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save_sharded(folder: str | os.PathLike, params: dict[str, Any], dp: DataParallel,
                 state: DistributedState) -> str:
    """Write this rank's share of ``params`` and ``state`` into ``folder`` (every rank calls
    it; returns this rank's file).

    As ``torch.distributed.checkpoint``, in phases agreed by all ranks: every rank checks
    everything (parameters against the state: names, shapes, dtypes); then each writes its
    shard under a temporary name (``shard-…safetensors.pending-<save id>``); only when
    every rank has written does each rename its own over the final name, keeping the shard
    it replaces (``….previous-<save id>``, a hard link) until every rank has renamed; then
    rank 0 removes the shards of an earlier save with another world size and the temporary
    files of saves killed part-way (each rank those its host's killed saves were writing:
    ``write_file``'s, of processes that no longer exist). A save refused or failed on any rank, a rename
    included, raises on every rank and leaves the earlier checkpoint in ``folder`` as it
    was (the renames are undone; a process killed while renaming can leave shards of two
    saves, which :func:`load_sharded` refuses)."""
    folder = os.fspath(folder)
    world, me = pg.world_size(), pg.rank()
    error: BaseException | None = None
    try:
        meta, tensors = _collect(folder, params, dp, state)
    except (TypeError, ValueError, KeyError, OSError) as e:
        error = e
    pg.agree("save_sharded", error)
    save_id = pg.all_gather_bytes(secrets.token_hex(8).encode())[0].decode()
    meta["save"] = save_id
    path = os.path.join(folder, f"shard-{me:05d}-of-{world:05d}.safetensors")
    pending = f"{path}.pending-{save_id}"
    try:
        os.makedirs(folder, exist_ok=True)
        write_file(pending, json.dumps(meta, allow_nan=False, default=numpy_scalar), tensors)
    except (OSError, ValueError, TypeError) as e:
        error = e
    try:
        pg.agree("save_sharded (writing)", error)
    except BaseException:
        _remove(pending)  # nothing was committed: the earlier checkpoint stands
        raise
    # commit: every rank has its complete shard on disk. The shard it replaces is kept
    # (a hard link) until every rank has renamed, so that a rename failing on one rank (a
    # reader holding the file open on Windows, a permission) is rolled back on all: else the
    # other ranks' new shards next to its old one made a folder load_sharded refuses
    previous = f"{path}.previous-{save_id}"
    had = committed = False
    try:
        if os.path.exists(path):
            _keep(path, previous)
            _keep_mode(pending, path)  # (a shard made private stays so)
            had = True
        os.replace(pending, path)
        committed = True
        _fsync_folder(folder)
    except OSError as e:
        error = e
    try:
        pg.agree("save_sharded (renaming the shards)", error)
    except BaseException:
        _roll_back(folder, path, pending, previous, had, committed)
        raise
    _remove(previous)
    # the temporary files of this host's saves killed while writing their pending shard
    remove_stale_temporaries(folder, pending, _WRITING.fullmatch)
    if me == 0:  # stale: another world size's shards, and files of saves killed part-way
        for f in glob.glob(os.path.join(folder, "shard-*-of-*.safetensors*")):
            m, p = _NAME.search(f), _PENDING.search(f)
            if (m and int(m.group(2)) != world) or (p and p.group(1) != save_id):
                _remove(f)
    pg.barrier("save_sharded")
    return path


def _keep(path: str, previous: str) -> None:
    """``previous`` ← ``path`` (a hard link: no copy; a copy where links are refused)."""
    try:
        os.link(path, previous)
    except OSError:
        import shutil

        shutil.copyfile(path, previous)


def _roll_back(folder: str, path: str, pending: str, previous: str, had: bool,
               committed: bool) -> None:
    """Undo this rank's part of a commit another rank failed: its previous shard back in
    place (or, where it had none, its new one removed). Where even that fails, the folder
    may hold shards of two saves (which :func:`load_sharded` refuses): said in the error."""
    try:
        if committed:
            if had:
                os.replace(previous, path)
            else:
                os.remove(path)
            _fsync_folder(folder)
        _remove(previous)
        _remove(pending)
    except OSError as e:
        raise CheckpointError(f"save_sharded: a rank failed to commit its shard, and putting "
                              f"back {path!r} failed too ({e}): {folder!r} may hold shards "
                              f"of two saves, which load_sharded refuses; the previous shard "
                              f"is {previous!r}") from e


def _read_all(folder: str) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    found: dict[int, dict[int, str]] = {}
    for f in glob.glob(os.path.join(folder, "shard-*-of-*.safetensors")):
        m = _NAME.search(f)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if len(found) != 1:
        raise CheckpointError(f"{folder!r} holds no sharded checkpoint" if not found else
                              f"{folder!r} mixes checkpoints of world sizes {sorted(found)}")
    (world, files), = found.items()
    if sorted(files) != list(range(world)):
        raise CheckpointError(f"{folder!r}: shards {sorted(set(range(world)) - set(files))} "
                              f"of {world} are missing")
    metas, arrays = [], {}
    for r in range(world):
        text, tensors = read_file(files[r])
        meta = loads_guarded(text, f"checkpoint {files[r]!r}: the metadata")
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT or not set(_FIELDS) <= set(meta):
            hint = (": a file of save_checkpoint, read by load_checkpoint"
                    if fmt == CHECKPOINT_FORMAT else "")
            raise CheckpointError(f"checkpoint {files[r]!r} is not a shard of save_sharded "
                                  f"(format {str(fmt)[:40]!r}, {FORMAT!r} expected, with the "
                                  f"fields {list(_FIELDS)}){hint}")
        for key in _COUNTERS:  # (before any is used: int() took 1.5, -1, 1e300)
            v = meta.get(key, 0)  # (consecutive_skips: absent before it was kept)
            if type(v) is not int or not 0 <= v <= MAX_INT:
                raise CheckpointError(f"checkpoint {files[r]!r}: '{key}' must be an int >= 0 "
                                      f"(at most 2**63 - 1), got {v!r:.80}")
        metas.append(meta)
        arrays.update(tensors)
    first = metas[0]
    for m in metas[1:]:
        for key in ("names", "shapes", "optimizer", "step", "consecutive_skips", "slots",
                    "save"):
            if m.get(key) != first.get(key):
                raise CheckpointError(f"{folder!r}: shard {m['rank']} disagrees with shard 0 "
                                      f"on {key} (files of different saves?)")
    return metas, arrays


def _native(a: np.ndarray, backend: str, dtype: str) -> Any:
    """A fresh array of ``backend`` holding ``a`` (a torch bfloat16 tensor where the saved
    parameters were bfloat16: stored as their exactly equal float32 values)."""
    if backend == "torch":
        import torch

        t = torch.from_numpy(np.array(a))
        return t.to(torch.bfloat16) if dtype == "bfloat16" else t
    return np.array(a)


def _held_missed(opt: Any, folder: str, metas: list[dict[str, Any]], held: Any
                 ) -> dict[str, int]:
    """The missed-step counts (:meth:`~mithril.utils.optimizers.OptimizerState.note_missed`)
    of the tensors ``held`` (this rank's names): every rank's ``"missed"`` merged (a shard
    saved before they were kept has none: 0), checked as ``Optimizer.load_state_dict``
    checks them: known names, ints >= 0, no more than the saved steps since the tensor's
    group joined (its ``step_offset``, resolved over all the parameters as the step does)."""
    from ..utils.optimizers.groups import resolve

    first = metas[0]
    merged: dict[str, Any] = {}
    for m in metas:
        part = m.get("missed", {})
        if not isinstance(part, dict):
            raise CheckpointError(f"{folder!r}: shard {m.get('rank')}'s 'missed' must be a dict "
                                  f"of parameter -> int, got {type(part).__name__}")
        merged.update(part)
    names = list(first["names"])
    unknown = sorted(set(merged) - set(names))
    if unknown:
        raise CheckpointError(f"{folder!r}: 'missed' names unknown parameters {unknown}")
    index, rows, _ = resolve(_holder(opt), names)
    where = {n: i for i, n in enumerate(names)}
    step = int(first["step"])
    for n, m in merged.items():
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise CheckpointError(f"{folder!r}: 'missed' of '{n}' must be an int >= 0, got "
                                  f"{m!r:.80}")
        joined = rows[index[where[n]]].get("step_offset", 0)
        if joined + m > step:
            raise CheckpointError(f"{folder!r}: 'missed' of '{n}' is {m}, beyond the "
                                  f"{step - joined} steps taken since it joined")
    return {n: m for n, m in merged.items() if n in set(held)}


def _held_slots(dp: DataParallel, folder: str, metas: list[dict[str, Any]],
                arrays: dict[str, Any], params: dict[str, Any]
                ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any], dict[str, int]]:
    """The saved slot arrays of the tensors this rank will hold, checked against what ``dp``'s
    optimizer makes for them (run on a copy: nothing of ``dp`` changes), the averaging
    settings to set on the optimizer (:func:`_averaging_settings`) and those tensors'
    missed-step counts (:func:`_held_missed`)."""
    first = metas[0]
    names, shapes = tuple(first["names"]), [tuple(s) for s in first["shapes"]]
    if dp.shard_state:
        a, b = assign([int(np.prod(s, dtype=np.int64)) for s in shapes], pg.world_size())[
            pg.rank()]
        names = names[a:b]
    opt = copy.copy(dp.optimizer)  # (a wrapper's copy copies its inner / base optimizer)
    started, settings = _averaging_settings(_holder(opt), first)
    _holder(opt).__dict__.update(settings)
    trial = _local_init(opt, {n: params[n] for n in names})
    missed = _held_missed(opt, folder, metas, names)
    if sorted(set(trial.slots) - set(started)) != first["slots"]:
        raise CheckpointError(f"{folder!r}: the checkpoint has slots {first['slots']}, "
                              f"{type(dp.optimizer).__name__} here {sorted(trial.slots)}")
    if set(first["values"]) != set(trial.values):
        raise CheckpointError(f"{folder!r}: the checkpoint has values "
                              f"{sorted(first['values'])}, this optimizer "
                              f"{sorted(trial.values)}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for s in trial.slots:
        if s in started:  # (init's copy of the parameters: the average starts here)
            continue
        out[s] = {}
        for n, view in trial.slot(s).items():
            src = arrays.get(f"slots/{s}/{n}")
            if src is None:
                raise CheckpointError(f"{folder!r}: no tensor 'slots/{s}/{n}'")
            if tuple(src.shape) != tuple(view.shape):
                raise CheckpointError(f"{folder!r}: slot '{s}' of '{n}' has shape "
                                      f"{tuple(src.shape)}, expected {tuple(view.shape)}")
            out[s][n] = src
    return out, settings, missed


def load_sharded(folder: str | os.PathLike, dp: DataParallel, backend: str = "numpy"
                 ) -> tuple[dict[str, Any], DistributedState]:
    """The parameters and this rank's state saved in ``folder`` by :func:`save_sharded` at
    any world size, for ``dp`` (an optimizer of the kind saved, with the hyperparameters
    wanted) at this world size; every rank calls it. ``backend``: ``"numpy"`` or
    ``"torch"`` (CPU) arrays. Everything is checked first, on every rank (the optimizer's
    slots on a copy of it); a load refused on any rank raises on every rank and changes
    nothing of ``dp``. Weight averages as ``Optimizer.load_state_dict``: one the checkpoint
    has keeps the checkpoint's settings (``ema_decay``, ``ema_every``, ``ema_start``,
    ``swa_start`` are set on ``dp.optimizer``); one ``dp.optimizer`` keeps and the checkpoint
    lacks starts at the resume (a copy of the parameters, its start the saved step + 1 unless
    later), as torch's ``AveragedModel`` created then."""
    folder = os.fspath(folder)
    error: BaseException | None = None
    try:
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        if not isinstance(dp, DataParallel):
            raise TypeError(f"load_sharded: dp must be a DataParallel, got {type(dp).__name__}")
        metas, arrays = _read_all(folder)
        first = metas[0]
        if first["optimizer"] != type(dp.optimizer).__name__:
            raise CheckpointError(f"{folder!r}: the checkpoint is of {first['optimizer']}, "
                                  f"not {type(dp.optimizer).__name__}")
        dtype = first.get("dtype", "")
        params = {}
        for n, shape in zip(first["names"], first["shapes"]):
            src = arrays.get(f"params/{n}")
            if src is None or list(src.shape) != list(shape):
                raise CheckpointError(f"{folder!r}: parameter '{n}' is missing or not of the "
                                      f"shape {tuple(shape)} recorded")
            params[n] = _native(src, backend, dtype)
        slots, settings, missed = _held_slots(dp, folder, metas, arrays, params)
        run = first.get("consecutive_skips", 0)  # (0: saved before it was kept; checked)
        parts = [m.get("averaged") for m in metas]  # (checked before anything changes)
        merged_counts(dp.optimizer, parts, list(first["names"]), step=int(first["step"]))
        try:  # (numbers, or "nan" / "inf" / "-inf": a run gone NaN)
            values = decode_metrics(first["values"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{folder!r}: 'values' must map names to numbers, got "
                                  f"{first['values']!r:.80}") from None
    except (TypeError, ValueError, KeyError, OSError, NotImplementedError) as e:
        error = e
    pg.agree("load_sharded", error)
    # (checked on the copy above; a wrapper's averages are its inner / base optimizer's)
    holder = _holder(dp.optimizer)
    before = dict(vars(holder))
    holder.__dict__.update(settings)
    try:  # (dp.init refuses what the sharded step cannot run: then nothing has changed)
        state = dp.init(params)
    except BaseException:
        vars(holder).clear()
        vars(holder).update(before)
        raise
    local = state.local
    for s, per in slots.items():
        views = local.slot(s)
        for n, src in per.items():
            views[n][...] = _native(src, backend, "")
    local.step = int(first["step"])
    local.num_skipped = int(first["num_skipped"])
    local.num_nonfinite = int(first["num_nonfinite"])
    local.consecutive_skips = run
    local.values = values
    # (None: saved before the counts were kept, inferred from the step when first used)
    local.averaged = merged_counts(dp.optimizer, parts, list(local.layout.names), local.step)
    local.set_missed(missed)  # (each tensor's own step count; none in an older checkpoint)
    return params, state
