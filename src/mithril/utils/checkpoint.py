"""Training checkpoints in one safetensors file: parameters, optimizer state, scheduler state.

Arrays go in the safetensors body (no pickle anywhere): ``params/<name>`` for every parameter and
``opt/<slot>/<name>`` for every optimizer state slot (e.g. ``opt/m/linear.weight`` for Adam).
Everything else is JSON stored in the safetensors header metadata under the key ``"mithril"``:
the optimizer's class, hyperparameters, step and skipped-step counts, ``scheduler.state_dict()``
and the caller's ``extra`` (any JSON-serialisable value). Arrays are converted through NumPy,
so a checkpoint written from one backend loads into any other::

    save_checkpoint("ckpt.safetensors", params, optimizer, state, scheduler, extra={"epoch": 3})
    ...
    ckpt = load_checkpoint("ckpt.safetensors", params_template=params, optimizer=optimizer,
                           scheduler=scheduler)
    params, state = ckpt["params"], ckpt["state"]

Loading restores the optimizer's hyperparameters and the scheduler (which also sets the
optimizer's learning rate), so training continues exactly - bitwise - as if uninterrupted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError, ShapeError

__all__ = ["FORMAT", "load_checkpoint", "save_checkpoint"]

#: format tag stored in every checkpoint
FORMAT = "mithril-checkpoint-1"
_META_KEY = "mithril"


def _to_numpy(x: Any) -> np.ndarray:
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: stored as (exact) float32
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d


def _dtype_name(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def _check_mapping(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of arrays, got {type(value).__name__}")


def save_checkpoint(path: str | os.PathLike, params: Mapping[str, Any], optimizer: Any = None,
                    state: Any = None, scheduler: Any = None, extra: Any = None) -> None:
    """Write ``params`` (and optionally the optimizer, its ``state``, a scheduler and ``extra``)
    to the safetensors file ``path`` (written atomically: a failed save leaves no partial file).

    ``optimizer`` alone saves its hyperparameters; with ``state`` (what ``optimizer.init`` /
    ``update`` returned) also the step counts and every state slot. ``extra`` must be
    JSON-serialisable (epoch, metrics, data-loader position, ...).
    """
    from safetensors.numpy import save_file

    from .optimizers import OptimizerState

    _check_mapping("params", params)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": FORMAT, "params": {}, "optimizer": None,
                            "scheduler": None, "extra": extra}
    for name, p in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {name!r}")
        arr = _to_numpy(p)
        tensors[f"params/{name}"] = arr
        meta["params"][name] = {"dtype": _dtype_name(p), "shape": list(arr.shape)}

    if state is not None and optimizer is None:
        raise ValueError("save_checkpoint: state given without its optimizer")
    if optimizer is not None:
        opt_meta: dict[str, Any] = {"class": type(optimizer).__name__,
                                    "hyperparameters": optimizer.hyperparameters(),
                                    "step": None, "num_skipped": None, "slots": []}
        if state is not None:
            if not isinstance(state, OptimizerState):
                raise TypeError(f"state must be what {type(optimizer).__name__}.init/update "
                                f"returned (an OptimizerState), got {type(state).__name__}; "
                                "save custom states through params or extra")
            if state.kind != type(optimizer).__name__:
                raise ValueError(f"state was made by {state.kind}, not by the given "
                                 f"{type(optimizer).__name__}")
            if set(state.layout.names) != set(params):
                raise KeyMismatchError(
                    f"optimizer state is for parameters {sorted(state.layout.names)}, "
                    f"params has {sorted(params)}")
            opt_meta.update(step=state.step, num_skipped=state.num_skipped,
                            num_nonfinite=state.num_nonfinite, slots=sorted(state.slots))
            for slot in state.slots:
                if "/" in slot:
                    raise ValueError(f"state slot names must not contain '/': {slot!r}")
                for name, v in state.slot(slot).items():
                    tensors[f"opt/{slot}/{name}"] = _to_numpy(v)
        meta["optimizer"] = opt_meta
    if scheduler is not None:
        meta["scheduler"] = {"class": type(scheduler).__name__, "state": scheduler.state_dict()}

    try:
        header = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: extra, hyperparameters and scheduler state must be "
                        f"JSON-serialisable (finite floats): {e}") from None

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: header})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="np") as f:
        header = (f.metadata() or {}).get(_META_KEY)
        if header is None:
            raise ValueError(f"{os.fspath(path)!r} is a safetensors file but not a mithril "
                             f"checkpoint (no '{_META_KEY}' metadata)")
        meta = json.loads(header)
        if meta.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {meta.get('format')!r} "
                             f"(expected {FORMAT!r})")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return meta, arrays


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


def load_checkpoint(path: str | os.PathLike, params_template: Mapping[str, Any] | None = None,
                    optimizer: Any = None, scheduler: Any = None, backend: Any = None
                    ) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns a dict with ``params`` (arrays of ``backend``; else the backend of
    ``params_template``, else of ``optimizer``, else NumPy), ``state`` (the rebuilt optimizer
    state when ``optimizer`` is given and the checkpoint holds one, else ``None``), ``step``,
    ``extra``, ``optimizer_state_dict`` (hyperparameters, step counts and NumPy slots, for
    ``optimizer.load_state_dict(d, params)`` later; ``None`` without optimizer state),
    ``scheduler_state_dict`` and the raw ``metadata``.

    ``params_template``: the checkpoint must have exactly its keys and shapes (else
    :class:`~mithril.errors.KeyMismatchError` / :class:`~mithril.errors.ShapeError`); arrays take
    the template's dtypes. ``optimizer``: must be of the saved class (else ``ValueError``); its
    hyperparameters are restored. ``scheduler``: restored with ``load_state_dict`` (which sets
    the optimizer's learning rate). Everything is validated before anything is modified.
    """
    meta, arrays = _read(path)
    pmeta: dict[str, Any] = meta["params"]
    names = list(pmeta)
    if params_template is not None:
        _check_mapping("params_template", params_template)
        missing = sorted(set(params_template) - set(names))
        unknown = sorted(set(names) - set(params_template))
        if missing or unknown:
            raise KeyMismatchError(f"checkpoint parameters do not match params_template: "
                                   f"missing in checkpoint {missing}, not in template {unknown}")
        for n in names:
            shape = tuple(int(d) for d in params_template[n].shape)
            if shape != tuple(pmeta[n]["shape"]):
                raise ShapeError(f"checkpoint parameter '{n}' has shape {tuple(pmeta[n]['shape'])} "
                                 f"but params_template['{n}'] has shape {shape}")
        names = list(params_template)  # the template's order

    ometa = _component_meta(meta, "optimizer", optimizer)
    smeta = _component_meta(meta, "scheduler", scheduler)

    backend = _resolve_backend(backend, params_template, optimizer, meta)
    params = {}
    for n in names:
        dtype = (backend.dtype_name(params_template[n]) if params_template is not None
                 else pmeta[n]["dtype"])
        params[n] = backend.array(arrays[f"params/{n}"], dtype)

    opt_sd = None
    if ometa is not None and ometa.get("step") is not None:
        slots = {s: {n: arrays[f"opt/{s}/{n}"] for n in pmeta} for s in ometa["slots"]}
        for s, per in slots.items():
            for n, a in per.items():
                if tuple(a.shape) != tuple(pmeta[n]["shape"]):
                    raise ShapeError(f"checkpoint slot '{s}' of '{n}' has shape {a.shape}, "
                                     f"the parameter {tuple(pmeta[n]['shape'])}")
        opt_sd = {"optimizer": ometa["class"], "hyperparameters": ometa["hyperparameters"],
                  "step": ometa["step"], "num_skipped": ometa["num_skipped"],
                  "num_nonfinite": ometa.get("num_nonfinite", 0), "slots": slots}

    state = None
    if optimizer is not None:
        old = dict(vars(optimizer))
        try:
            if opt_sd is None:  # hyperparameters only
                optimizer.load_state_dict({"optimizer": ometa["class"],
                                           "hyperparameters": ometa["hyperparameters"]})
            else:
                state = optimizer.load_state_dict(opt_sd, params)
                if set(state.slots) != set(opt_sd["slots"]):
                    raise ValueError(f"checkpoint has slots {sorted(opt_sd['slots'])} but "
                                     f"{type(optimizer).__name__} with the saved hyperparameters "
                                     f"uses {sorted(state.slots)}")
        except BaseException:
            vars(optimizer).clear()
            vars(optimizer).update(old)
            raise
    if scheduler is not None:
        scheduler.load_state_dict(smeta["state"])

    return {"params": params, "state": state, "step": None if ometa is None else ometa["step"],
            "extra": meta.get("extra"), "optimizer_state_dict": opt_sd,
            "scheduler_state_dict": None if smeta is None else smeta["state"], "metadata": meta}


def _component_meta(meta: Mapping[str, Any], kind: str, obj: Any) -> Any:
    """The checkpoint's metadata for ``kind`` ("optimizer"/"scheduler"), checked against
    the object it is to be loaded into (if any)."""
    m = meta.get(kind)
    if obj is not None:
        if m is None:
            raise ValueError(f"checkpoint holds no {kind} (saved without {kind}=...)")
        if m["class"] != type(obj).__name__:
            raise ValueError(f"checkpoint holds {kind} {m['class']}, cannot load it into "
                             f"{type(obj).__name__}")
    return m
