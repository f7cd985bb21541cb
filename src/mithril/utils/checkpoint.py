"""Training checkpoints in one safetensors file: parameters, optimizer state, scheduler state.

Arrays go in the safetensors body (no pickle anywhere): ``params/<name>`` for every parameter and
``opt/<slot>/<name>`` for every optimizer state slot (e.g. ``opt/m/linear.weight`` for Adam),
float16/float32/float64 only (torch and JAX bfloat16 arrays are stored as the exactly equal
float32 values, the metadata keeping ``"bfloat16"``). Everything else is JSON stored in the
safetensors header metadata under the key ``"mithril"``: ``format`` (:data:`FORMAT`),
``params`` (name -> dtype and shape), ``optimizer`` (class, hyperparameters, ``step``,
``num_skipped``, ``num_nonfinite``, ``consecutive_skips`` where not 0, slot names, where
kept ``averaged`` (each average's updates per parameter) and ``missed`` (the parameters that
missed steps, and how many: ``OptimizerState.note_missed``); the
per-parameter shapes of slots shaped otherwise, e.g. one value per tensor, as ``slot_shapes``; the names of optimizer-wide
values, each stored as a float64 scalar ``optv/<name>``), ``scheduler`` (class and
``scheduler.state_dict()``), the caller's ``extra`` (any JSON value), ``metrics`` (name ->
number, where given) and, when saved with ``model_state=``, ``model_state`` (name -> dtype and shape of the model's state arrays,
BatchNorm's running statistics: stored as ``model/<name>``, their integers as int32/int64). Arrays are converted
through NumPy, so a checkpoint written from one backend loads into any other::

    save_checkpoint("ckpt.safetensors", params, optimizer, state, scheduler, extra={"epoch": 3})
    ...
    ckpt = load_checkpoint("ckpt.safetensors", params_template=params, optimizer=optimizer,
                           scheduler=scheduler)
    params, state = ckpt["params"], ckpt["state"]

Loading restores the optimizer's hyperparameters and the scheduler (which also sets the
optimizer's learning rate), so training continues exactly - bitwise - as if uninterrupted.

Integrity (format ``mithril-checkpoint-2``, details in :mod:`mithril.utils.checkpoint_io`):
every tensor has a SHA-256 digest in the header, and the header has one of its own; sizes are
checked before anything is allocated, then the digests, then that the metadata, the stored
tensors, ``params_template``, the optimizer and the scheduler agree. Every problem of the file
is a :class:`~mithril.errors.CheckpointError` (a ``ValueError``) naming the file and the field
or tensor. Format ``mithril-checkpoint-1`` (no digest) is refused.
:class:`CheckpointManager` keeps a folder of them, rotated by step or by a metric.

Atomicity: :func:`save_checkpoint` checks everything first, then writes a temporary file
``.ckpt-<name>-<host>-<pid>-<random>.tmp`` next to ``path``, flushes and ``fsync``-s it,
``os.replace``-s it over ``path`` and ``fsync``-s the folder. A save that raises leaves
``path`` as it was and removes its temporary file; one killed part-way leaves ``path`` as it was
and its temporary file, which the next save to the same ``path`` removes (it removes the
temporary files of that ``path`` written on this host by processes that no longer exist).
A load that raises changes nothing: not the optimizer, not the scheduler, not any file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, DTypeError, KeyMismatchError, ShapeError
from . import checkpoint_accumulate as accumulate
from . import checkpoint_io
from .accumulation import Accumulate
from .checkpoint_format import (
    FORMAT,
    STATE_DTYPES,
    check_array,
    check_float_array,
    check_mapping,
    check_meta,
    check_name,
    check_optimizer,
    check_tensors,
    decode_metrics,
    encode_metrics,
    floats_from_json,
    floats_to_json,
    json_field,
    numpy_scalar,
    saved_hyperparameters,
    state_error,
    to_numpy,
    trial_scheduler,
)
from .checkpoint_io import MAX_DEPTH, depth, loads_guarded, read_file, read_metadata, write_file
from .optimizers.averaging import counts_of, saved_counts, started_averages

__all__ = ["FORMAT", "CheckpointError", "CheckpointManager", "load_checkpoint",
           "save_checkpoint"]

# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, params: Mapping[str, Any], optimizer: Any = None,
                    state: Any = None, scheduler: Any = None, extra: Any = None, *,
                    model_state: Mapping[str, Any] | None = None,
                    metrics: Mapping[str, Any] | None = None) -> None:
    """Write ``params`` (and optionally the optimizer, its ``state``, a scheduler and ``extra``)
    to the safetensors file ``path``, atomically (see the module docstring): a save that
    raises, or is killed, leaves the previous file at ``path`` as it was.

    ``optimizer`` alone saves its hyperparameters; with ``state`` (what ``optimizer.init`` /
    ``update`` returned) also the step counts and every state slot. ``extra`` must be
    JSON-serialisable (epoch, metrics, data-loader position, ...; NumPy numbers are saved as
    the Python numbers they equal; NaN and infinities, ``best_loss = inf``, as
    ``{"mithril_float": "inf"}`` and read back as floats, as torch.save keeps them), nested
    at most 64 levels.
    ``model_state``: the model's state as ``evaluate(..., state=...)`` returns it (BatchNorm's
    running statistics and ``num_batches_tracked``, as torch's ``state_dict`` holds a model's
    buffers). ``metrics``: name -> real number (``{"val_loss": 0.31}``; NaN and infinities
    kept), read back as ``load_checkpoint(...)["metrics"]`` and by :class:`CheckpointManager`.
    Parameters must be float16/bfloat16/float32/float64 arrays, model state arrays
    those or int32/int64. Everything is checked before anything is written.
    """
    path = os.fspath(path)
    write_file(path, *_encoded(path, params, optimizer, state, scheduler, extra,
                               model_state=model_state, metrics=metrics))


def _encoded(path: str, params: Mapping[str, Any], optimizer: Any, state: Any,
             scheduler: Any, extra: Any, *, model_state: Mapping[str, Any] | None,
             metrics: Mapping[str, Any] | None) -> tuple[str, dict[str, np.ndarray]]:
    """The metadata JSON and the tensors :func:`save_checkpoint` writes, everything checked
    (what :meth:`CheckpointManager.save` checks of a step it does not keep)."""
    from .optimizers import OptimizerState

    check_mapping("params", params)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "params": {}, "optimizer": None,
                            "scheduler": None, "extra": extra}
    for name, p in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {name!r}")
        check_name("parameter", name)
        dt = check_float_array(f"params['{name}']", p)
        arr = to_numpy(p)
        tensors[f"params/{name}"] = arr
        meta["params"][name] = {"dtype": dt, "shape": list(arr.shape)}
    if model_state is not None:
        check_mapping("model_state", model_state)
        meta["model_state"] = {}
        for name, x in model_state.items():
            if isinstance(name, str):  # (else refused by check_array)
                check_name("model state", name)
            dt = check_array(f"model_state['{name}']", x, name, STATE_DTYPES)
            tensors[f"model/{name}"] = arr = to_numpy(x)
            meta["model_state"][name] = {"dtype": dt, "shape": list(arr.shape)}
    if metrics is not None:
        meta["metrics"] = encode_metrics(metrics)

    if state is not None and optimizer is None:
        raise ValueError("save_checkpoint: state given without its optimizer")
    if isinstance(optimizer, Accumulate):  # the wrapped optimizer's, and the window
        optimizer, state, meta["accumulate"], acc_tensors = accumulate.parts(
            optimizer, state, params, check_float_array, to_numpy)
        tensors.update(acc_tensors)
    if optimizer is not None:
        check_optimizer(optimizer)
        opt_meta: dict[str, Any] = {"class": type(optimizer).__name__,
                                    "hyperparameters": saved_hyperparameters(optimizer, state),
                                    "step": None, "num_skipped": None, "num_nonfinite": None,
                                    "slots": []}
        if state is not None:
            if not isinstance(state, OptimizerState):
                raise state_error(optimizer, state)
            if state.kind != type(optimizer).__name__:
                raise ValueError(f"state was made by {state.kind}, not by the given "
                                 f"{type(optimizer).__name__}")
            if set(state.layout.names) != set(params):
                raise KeyMismatchError(
                    f"optimizer state is for parameters {sorted(state.layout.names)}, "
                    f"params has {sorted(params)}")
            opt_meta.update(step=state.step, num_skipped=state.num_skipped,
                            num_nonfinite=state.num_nonfinite, slots=sorted(state.slots))
            if state.consecutive_skips:  # (optional: absent reads as 0)
                opt_meta["consecutive_skips"] = state.consecutive_skips
            if counts_of(optimizer, state) is not None:  # each average's updates so far
                opt_meta["averaged"] = saved_counts(state)
            if state.missed is not None:  # (each parameter's own count: note_missed)
                opt_meta["missed"] = state.missed_counts()
            if state.slot_layouts:
                opt_meta["slot_shapes"] = {s: {n: list(shp) for n, shp in zip(lay.names, lay.shapes)}
                                           for s, lay in sorted(state.slot_layouts.items())}
            if state.values:
                opt_meta["values"] = sorted(state.values)
                for v, x in state.values.items():
                    if "/" in v:
                        raise ValueError(f"state value names must not contain '/': {v!r}")
                    tensors[f"optv/{v}"] = np.asarray(x, dtype=np.float64)
            for slot in state.slots:
                if "/" in slot:
                    raise ValueError(f"state slot names must not contain '/': {slot!r}")
                for name, v in state.slot(slot).items():
                    arr = to_numpy(v)
                    if arr.dtype.name not in ("float16", "float32", "float64"):
                        raise DTypeError(f"optimizer state slot '{slot}' of '{name}' has dtype "
                                         f"{arr.dtype}, not a float")
                    tensors[f"opt/{slot}/{name}"] = arr
        meta["optimizer"] = opt_meta
    if scheduler is not None:
        meta["scheduler"] = {"class": type(scheduler).__name__,
                             "state": floats_to_json(scheduler.state_dict())}

    if depth(extra) >= MAX_DEPTH:
        raise ValueError(f"save_checkpoint: extra nests deeper than {MAX_DEPTH - 1} levels")
    meta["extra"] = floats_to_json(extra)  # (after the depth check: it recurses)
    try:
        header = json.dumps(meta, allow_nan=False, default=numpy_scalar)
    except (TypeError, ValueError, RecursionError) as e:
        hyper = (meta["optimizer"] or {}).get("hyperparameters", {})
        bad = [f"the optimizer's {k!r}" for k, v in hyper.items() if not json_field(v)] + \
            [k for k in ("scheduler", "extra") if not json_field(meta[k])]
        raise TypeError(f"save_checkpoint: extra, hyperparameters and scheduler state must be "
                        f"JSON-serialisable (a hyperparameter a finite float): {e}"
                        + (f" (in {', '.join(bad)})" if bad else "")) from None
    where = f"save_checkpoint({path!r})"
    checked = check_meta(loads_guarded(header, f"{where}: the metadata"), where)
    check_tensors(checked, tensors, where)  # never write what load_checkpoint would refuse
    if optimizer is not None:  # (an attribute set out of range, unchecked: opt.beta1 = 1.5)
        try:
            copy.copy(optimizer).load_state_dict(
                {"optimizer": type(optimizer).__name__,
                 "hyperparameters": checked["optimizer"]["hyperparameters"]})
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{where}: {type(optimizer).__name__}'s hyperparameters would "
                             f"not load back: {e}") from None
    return header, tensors


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _resolve_backend(backend: Any, template: Mapping[str, Any] | None, optimizer: Any,
                     meta: dict[str, Any]) -> Any:
    if backend is not None:
        return backend
    from ..backends import NumpyBackend
    from .optimizers import infer_backend

    if template:
        return infer_backend(template)
    if optimizer is not None and getattr(optimizer, "_backend", None) is not None:
        return optimizer._backend
    dtypes = {m["dtype"] for m in meta["params"].values()}
    dt = dtypes.pop() if len(dtypes) == 1 else "float32"
    return NumpyBackend(dtype=dt if dt in ("float16", "float32", "float64") else "float32")


def _component_meta(meta: Mapping[str, Any], kind: str, obj: Any, where: str) -> Any:
    """The checkpoint's metadata for ``kind`` ("optimizer"/"scheduler"), checked against
    the object it is to be loaded into (if any)."""
    m = meta[kind]
    if obj is not None:
        if m is None:
            raise ValueError(f"{where} holds no {kind} (saved without {kind}=...)")
        if m["class"] != type(obj).__name__:
            raise ValueError(f"{where}: checkpoint holds {kind} {m['class']}, cannot load it "
                             f"into {type(obj).__name__}")
    return m


def _refused(where: str, field: str, by: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"{where}: metadata field '{field}' is refused by {by}: {e}")


def load_checkpoint(path: str | os.PathLike, params_template: Mapping[str, Any] | None = None,
                    optimizer: Any = None, scheduler: Any = None, backend: Any = None, *,
                    model_state_template: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns a dict with ``params`` (arrays of ``backend``; else the backend of
    ``params_template``, else of ``optimizer``, else NumPy), ``state`` (the rebuilt optimizer
    state when ``optimizer`` is given and the checkpoint holds one, else ``None``), ``step``,
    ``extra``, ``optimizer_state_dict`` (hyperparameters, step counts and NumPy slots, for
    ``optimizer.load_state_dict(d, params)`` later; ``None`` without optimizer state),
    ``scheduler_state_dict``, ``model_state`` (arrays of the backend, in their saved dtypes
    or ``model_state_template``'s, whose keys and shapes they must have, e.g. the compiled
    model's ``initial_state_dict``; ``None`` when saved without), ``metrics`` (floats; ``None``
    when saved without) and the raw ``metadata``.

    A corrupted, truncated, altered or malformed file raises
    :class:`~mithril.errors.CheckpointError` (a ``ValueError``) naming the file and the
    tensor or field. ``params_template``: the checkpoint must have exactly its keys and the
    shapes of its (float) arrays (else :class:`~mithril.errors.KeyMismatchError` /
    :class:`~mithril.errors.ShapeError`); arrays take the template's dtypes (a float64
    checkpoint loaded with a float32 template is rounded to float32: build the template in
    the saved dtype, ``metadata["params"][name]["dtype"]``, to keep every bit; a value beyond
    a float16 template's range becomes inf, as with torch's ``copy_``). ``optimizer``:
    must be of the saved class (else ``ValueError``); its hyperparameters are restored.
    ``scheduler``: restored with ``load_state_dict`` (which sets the optimizer's learning
    rate). Everything is validated - the optimizer's and the scheduler's states tried on
    copies - before anything is modified; a load that raises changes nothing.
    """
    path = os.fspath(path)
    where = f"checkpoint {path!r}"
    meta_json, arrays = read_file(path)
    meta = check_meta(loads_guarded(meta_json, f"{where}: the metadata"), where)
    check_tensors(meta, arrays, where)
    accumulate.refuse_plain(meta, optimizer, where)
    acc = optimizer if isinstance(optimizer, Accumulate) else None
    if acc is not None:
        optimizer = acc.optimizer
    pmeta: dict[str, Any] = meta["params"]
    names = list(pmeta)
    if params_template is not None:
        check_mapping("params_template", params_template)
        missing = sorted(set(params_template) - set(names))
        unknown = sorted(set(names) - set(params_template))
        if missing or unknown:
            raise KeyMismatchError(f"{where}: parameters do not match params_template: "
                                   f"missing in checkpoint {missing}, not in template {unknown}")
        for n in params_template:
            check_float_array(f"params_template['{n}']", params_template[n])
            shape = tuple(int(d) for d in params_template[n].shape)
            a = arrays[f"params/{n}"]
            if shape != a.shape:
                raise ShapeError(f"{where}: parameter '{n}' has shape {a.shape} but "
                                 f"params_template['{n}'] has shape {shape}")
        names = list(params_template)  # the template's order

    mstate = meta.get("model_state")
    if model_state_template is not None:
        check_mapping("model_state_template", model_state_template)
        if mstate is None:
            raise ValueError(f"{where} holds no model state (saved without model_state=...)")
        got = {n: tuple(m["shape"]) for n, m in mstate.items()}
        want = {n: tuple(int(d) for d in x.shape) for n, x in model_state_template.items()}
        if set(got) != set(want):
            raise KeyMismatchError(f"{where}: model state does not match model_state_template: "
                                   f"missing in checkpoint {sorted(set(want) - set(got))}, "
                                   f"not in template {sorted(set(got) - set(want))}")
        for n, shp in want.items():
            if got[n] != shp:
                raise ShapeError(f"{where}: model state '{n}' has shape {got[n]} but "
                                 f"model_state_template['{n}'] has shape {shp}")
    ometa = _component_meta(meta, "optimizer", optimizer, where)
    smeta = _component_meta(meta, "scheduler", scheduler, where)
    if smeta is not None:  # (a copy: the raw metadata is returned as stored)
        smeta = {**smeta, "state": floats_from_json(smeta["state"])}

    backend = _resolve_backend(backend, params_template, optimizer, meta)
    params = {}
    for n in names:
        dtype = (backend.dtype_name(params_template[n]) if params_template is not None
                 else pmeta[n]["dtype"])
        params[n] = backend.array(arrays[f"params/{n}"], dtype)
    model_state = None if mstate is None else {
        n: backend.array(arrays[f"model/{n}"], backend.dtype_name(model_state_template[n])
                         if model_state_template is not None else m["dtype"])
        for n, m in mstate.items()}

    opt_sd = None
    if ometa is not None and ometa["step"] is not None:
        slots = {s: {n: arrays[f"opt/{s}/{n}"] for n in pmeta} for s in ometa["slots"]}
        opt_sd = {"optimizer": ometa["class"], "hyperparameters": ometa["hyperparameters"],
                  "step": ometa["step"], "num_skipped": ometa["num_skipped"],
                  "num_nonfinite": ometa["num_nonfinite"], "slots": slots,
                  "consecutive_skips": ometa.get("consecutive_skips", 0),
                  "values": {v: float(arrays[f"optv/{v}"]) for v in ometa.get("values", [])},
                  "averaged": ometa.get("averaged"),  # (None: from before it was kept)
                  "missed": ometa.get("missed")}  # (checked by the optimizer's load)

    # try everything on copies: the optimizer's hyperparameters and state, then the scheduler
    state, trial_opt = None, None
    if optimizer is not None:
        hp_sd = {"optimizer": ometa["class"], "hyperparameters": ometa["hyperparameters"]}
        if opt_sd is not None:  # an average the optimizer keeps and the run lacks starts here
            hp_sd["step"] = ometa["step"]
        trial_opt = copy.copy(optimizer)
        try:
            trial_opt.load_state_dict(hp_sd)
        except (ValueError, TypeError, KeyError) as e:
            raise _refused(where, "optimizer.hyperparameters", type(optimizer).__name__,
                           e) from e
        if opt_sd is not None:
            try:
                state = copy.copy(optimizer).load_state_dict(opt_sd, params)
            except (ValueError, KeyError) as e:  # a TypeError is about params_template
                raise _refused(where, "optimizer", type(optimizer).__name__, e) from e
            started = started_averages(optimizer, ometa["hyperparameters"], ometa["step"])
            if set(state.slots) - set(started) != set(opt_sd["slots"]):
                raise CheckpointError(f"{where}: metadata field 'optimizer.slots' is "
                                      f"{sorted(opt_sd['slots'])} but {type(optimizer).__name__} "
                                      f"with the saved hyperparameters uses {sorted(state.slots)}")
    if scheduler is not None:
        if not type(scheduler).__module__.startswith("mithril."):  # torch's takes any dict
            want, got = set(scheduler.state_dict()), set(smeta["state"])
            if want - got and got - want:  # (ours read into torch's StepLR; a key added or
                # dropped by another torch version is let through, as torch does)
                raise CheckpointError(f"{where}: metadata field 'scheduler.state' has the keys "
                                      f"of another {smeta['class']}: missing "
                                      f"{sorted(want - got)}, unknown {sorted(got - want)}")
        trial_sched = trial_scheduler(scheduler, optimizer, trial_opt)
        if trial_sched is not None:
            try:
                trial_sched.load_state_dict(smeta["state"])
            except (ValueError, TypeError, KeyError) as e:
                raise _refused(where, "scheduler.state", type(scheduler).__name__, e) from e

    if acc is not None and state is not None:  # (a sum beyond its buffer's range: refused)
        accumulate.check_range(meta, arrays, backend, params, where)

    # apply: optimizer, then scheduler (which sets the learning rate); undo all on failure
    old = dict(vars(optimizer)) if optimizer is not None else None
    try:
        if optimizer is not None:
            optimizer.load_state_dict(hp_sd)
        if scheduler is not None:
            scheduler.load_state_dict(smeta["state"])  # restores itself if it raises
    except BaseException:
        if optimizer is not None:
            vars(optimizer).clear()
            vars(optimizer).update(old)
        raise

    if acc is not None:  # (cannot fail: the window's fields were checked with the rest)
        state = accumulate.restore(acc, meta, arrays, state, backend, params)
    return {"params": params, "state": state, "step": None if ometa is None else ometa["step"],
            "extra": floats_from_json(meta["extra"]), "optimizer_state_dict": opt_sd,
            "scheduler_state_dict": None if smeta is None else smeta["state"],
            "model_state": model_state, "metrics": None if "metrics" not in meta else
            decode_metrics(meta["metrics"]), "metadata": meta}


# ---------------------------------------------------------------------------------------------
# a folder of rotating checkpoints
# ---------------------------------------------------------------------------------------------


class CheckpointManager:
    """A folder of checkpoints, one per saved step (``<prefix>-<step:08d>.safetensors``,
    each written by :func:`save_checkpoint`: atomic, verified), rotated as orbax's
    ``CheckpointManager(max_to_keep)`` keeps the latest, and by a metric as Lightning's
    ``ModelCheckpoint(save_top_k, monitor, mode, save_last)`` and Keras'
    ``ModelCheckpoint(save_best_only=True)`` (orbax's ``best_fn`` writes every step and keeps
    the later of equal ones)::

        manager = CheckpointManager("ckpts", max_to_keep=2, best_metric="val_loss",
                                    keep_latest=True)
        manager.save(step, params, optimizer, state, scheduler, metrics={"val_loss": 0.3})
        ckpt = load_checkpoint(manager.latest(), params_template=params, ...)  # after a restart

    Which files are kept: without ``best_metric``, the ``max_to_keep`` latest steps (all
    with ``max_to_keep=None``). With ``best_metric``, the ``max_to_keep`` best by that metric
    (``best_mode`` ``"min"`` or ``"max"``; between equal values the earlier step, as a new
    one must be strictly better in Keras and Lightning; a NaN metric, or a file saved without
    it, is never among the best: Keras' ``np.less(nan, best)`` is False), and with ``keep_latest`` also the latest step, whatever its metric (Lightning's
    ``save_last``: what a resume after preemption needs). A save that would not be kept is
    not written (:meth:`save` checks it and returns ``None``): with ``max_to_keep=1`` and no
    ``keep_latest`` a step is written only when its metric is strictly better than the kept
    one's, as ``save_best_only``. Files that leave the set are removed after the new file is
    in place, so a save killed at any point leaves at least the files there were before; the
    next save removes what a killed one left over. Other files in the folder are left alone.
    """

    def __init__(self, folder: str | os.PathLike, max_to_keep: int | None = None, *,
                 best_metric: str | None = None, best_mode: str = "min",
                 keep_latest: bool = False, prefix: str = "ckpt") -> None:
        if max_to_keep is not None and (type(max_to_keep) is not int or max_to_keep < 1):
            raise ValueError(f"CheckpointManager: max_to_keep must be None or an int >= 1, got "
                             f"{max_to_keep!r}")
        if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
            raise TypeError(f"CheckpointManager: best_metric must be a metric's name (a str), "
                            f"got {best_metric!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"CheckpointManager: best_mode must be 'min' or 'max', got "
                             f"{best_mode!r}")
        if not isinstance(keep_latest, bool):
            raise TypeError(f"CheckpointManager: keep_latest must be a bool, got {keep_latest!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[\w.=+-]+", prefix):
            raise ValueError(f"CheckpointManager: prefix must be a file-name part of letters, "
                             f"digits, '_', '.', '=', '+', '-', got {prefix!r}")
        self.folder, self.max_to_keep = os.fspath(folder), max_to_keep
        self.best_metric, self.best_mode = best_metric, best_mode
        self.keep_latest, self.prefix = keep_latest, prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.safetensors")
        #: step -> its checkpoint's metrics (None: saved without), in step order
        self._metrics: dict[int, dict[str, float] | None] = {}
        self.reload()

    def reload(self) -> None:
        """List the folder again (another process saved into it); each file's header is read
        and verified (``CheckpointError`` naming a damaged one), its tensors are not."""
        found: dict[int, dict[str, float] | None] = {}
        names = os.listdir(self.folder) if os.path.isdir(self.folder) else []
        for name in names:
            m = self._pattern.fullmatch(name)
            if m is None or name != os.path.basename(self.path(int(m.group(1)))):
                continue  # (not a name of ours: "ckpt-5.safetensors" is no step's)
            path = os.path.join(self.folder, name)
            where = f"checkpoint {path!r}"
            meta = check_meta(loads_guarded(read_metadata(path), f"{where}: the metadata"),
                              where)
            found[int(m.group(1))] = decode_metrics(meta["metrics"]) if "metrics" in meta \
                else None
        self._metrics = dict(sorted(found.items()))

    def path(self, step: int) -> str:
        """The file of ``step``'s checkpoint (whether or not it exists)."""
        return os.path.join(self.folder, f"{self.prefix}-{step:08d}.safetensors")

    def steps(self) -> list[int]:  # (in order)
        return list(self._metrics)

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics ``step`` was saved with (``None``: without); ``KeyError`` naming the
        step and those kept if it is not."""
        if step not in self._metrics:
            raise KeyError(f"CheckpointManager: no checkpoint of step {step!r} in "
                           f"{self.folder!r} (steps kept: {self.steps()})")
        m = self._metrics[step]
        return None if m is None else dict(m)

    def latest(self) -> str | None:
        """The latest step's file (to resume from), ``None`` if there is none."""
        return self.path(max(self._metrics)) if self._metrics else None

    def best(self) -> str | None:
        """The file with the best ``best_metric`` (between equal values the earlier step);
        without ``best_metric`` the latest; ``None`` if no checkpoint has a (non-NaN) one."""
        if self.best_metric is None:
            return self.latest()
        ranked = self._ranked(self._metrics)
        return self.path(ranked[0]) if ranked else None

    def _value(self, metrics: dict[str, float] | None) -> float:
        v = math.nan if metrics is None else metrics.get(self.best_metric, math.nan)
        return -v if self.best_mode == "max" else v

    def _ranked(self, entries: Mapping[int, dict[str, float] | None]) -> list[int]:
        """The steps with a (non-NaN) ``best_metric``, best first (earlier steps first
        between equal values)."""
        valued = [(self._value(m), s) for s, m in entries.items()]
        return [s for v, s in sorted(x for x in valued if not math.isnan(x[0]))]

    def _kept(self, entries: Mapping[int, dict[str, float] | None]) -> set[int]:
        steps = sorted(entries)
        if self.best_metric is None:
            return set(steps if self.max_to_keep is None else steps[-self.max_to_keep:])
        keep = set(steps) if self.max_to_keep is None else \
            set(self._ranked(entries)[:self.max_to_keep])
        if self.keep_latest and steps:
            keep.add(steps[-1])
        return keep

    def save(self, step: int, params: Mapping[str, Any], optimizer: Any = None,
             state: Any = None, scheduler: Any = None, extra: Any = None, *,
             model_state: Mapping[str, Any] | None = None,
             metrics: Mapping[str, Any] | None = None) -> str | None:
        """:func:`save_checkpoint` of ``step`` (an int after every step kept) into the folder,
        then the rotation (see the class); returns the file written, or ``None`` where the
        rotation would not keep it (checked all the same: what save_checkpoint refuses
        raises on any step). Everything is checked first: a save that raises writes and
        removes nothing."""
        if type(step) is not int and not isinstance(step, np.integer):
            raise TypeError(f"CheckpointManager.save: step must be an int, got {step!r}")
        step = int(step)
        if step < 0:
            raise ValueError(f"CheckpointManager.save: step must be >= 0, got {step}")
        if self._metrics and step <= max(self._metrics):
            raise ValueError(f"CheckpointManager.save: step {step} is not after the latest "
                             f"checkpoint's, {max(self._metrics)}, in {self.folder!r} (resumed "
                             f"from an earlier one? save into another folder)")
        got = None if metrics is None else decode_metrics(encode_metrics(metrics))
        if self.best_metric is not None and (got is None or self.best_metric not in got):
            raise KeyMismatchError(f"CheckpointManager.save: metrics must hold "
                                   f"'{self.best_metric}' (best_metric), got "
                                   f"{None if got is None else sorted(got)}")
        entries = {**self._metrics, step: got}
        keep = self._kept(entries)
        if step not in keep:  # (checked all the same: bad input raises on every step)
            _encoded(self.path(step), params, optimizer, state, scheduler, extra,
                     model_state=model_state, metrics=metrics)
            return None
        made = _missing_folders(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        try:
            save_checkpoint(self.path(step), params, optimizer, state, scheduler, extra,
                            model_state=model_state, metrics=metrics)
        except BaseException:
            for folder in made:  # (a refused save leaves no trace, not even the folders)
                try:
                    os.rmdir(folder)
                except OSError:  # (something else wrote there meanwhile: kept)
                    break
            raise
        self._metrics = {s: m for s, m in entries.items() if s in keep}
        for s in sorted(set(entries) - keep):
            try:
                os.remove(self.path(s))
            except FileNotFoundError:  # (removed by hand, or by another manager)
                pass
        # (a killed save's temporary file, of any step: a resumed run may not save that step)
        checkpoint_io.remove_stale_temporaries(self.folder, self.path(step), self._pattern.fullmatch)
        return self.path(step)


def _missing_folders(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would create, deepest first."""
    out, here = [], os.path.abspath(folder)
    while not os.path.isdir(here):
        out.append(here)
        up = os.path.dirname(here)
        if up == here:
            break
        here = up
    return out
