"""The checkpoint format's constants and checks, shared by save and load (save refuses what
load would refuse): see :mod:`mithril.utils.checkpoint` for the format itself."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, DTypeError
from . import checkpoint_accumulate as accumulate
from .checkpoint_io import MAX_INT

#: format tag stored in every checkpoint
FORMAT = "mithril-checkpoint-2"
#: parameter dtypes a checkpoint holds (-> the dtype code they are stored with)
FLOAT_DTYPES = {"float16": "float16", "bfloat16": "float32", "float32": "float32",
                "float64": "float64"}
_TOP = ("format", "params", "optimizer", "scheduler", "extra")
#: optional top-level fields: the model's state (BatchNorm's running statistics), name ->
#: dtype and shape, each stored as ``model/<name>``; the Accumulate's window; ``metrics``
#: (name -> number, a non-finite one as the string "nan", "inf" or "-inf": JSON has none)
_TOP_OPTIONAL = ("model_state", "accumulate", "metrics")
#: how a non-finite metric is stored
_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
STATE_DTYPES = {**FLOAT_DTYPES, "int32": "int32", "int64": "int64"}
_OPT = ("class", "hyperparameters", "step", "num_skipped", "num_nonfinite", "slots")
#: optional optimizer fields: per-parameter shapes of the slots whose shapes are not the
#: parameters' (slot -> name -> shape), and the names of the optimizer-wide values (each
#: stored as a float64 scalar tensor ``optv/<name>``), and the non-finite steps in a row
#: (``consecutive_skips``: 0 where absent, a checkpoint from before it was kept)
_OPT_OPTIONAL = ("slot_shapes", "values", "averaged", "missed", "consecutive_skips")
_COUNTERS = ("step", "num_skipped", "num_nonfinite")


def to_numpy(x: Any) -> np.ndarray:
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "torch":
        import torch

        x = x.detach()
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: stored as (exact) float32
            x = x.float()
        x = x.cpu().numpy()
    a = np.asarray(x, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a  # JAX's ml_dtypes


def dtype_name(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def encode_metrics(metrics: Any) -> dict[str, Any]:
    """``metrics`` (name -> real number: a Python, NumPy, torch or JAX scalar) as stored in the
    metadata: floats, a non-finite one as its name in :data:`_NONFINITE`; ``TypeError``
    naming a bad entry."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metrics: names must be str, got {k!r}")
        try:
            a = to_numpy(v)
        except Exception:  # (anything NumPy cannot take: refused below by name)
            a = np.asarray(None)
        if a.shape != () or a.dtype.kind not in "iuf":
            raise TypeError(f"metrics['{k}'] is {_short(v)}, not a real number (a scalar)")
        f = float(a)
        out[k] = f if np.isfinite(f) else ("nan" if f != f else "inf" if f > 0 else "-inf")
    return out


def decode_metrics(stored: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of :func:`encode_metrics`, as floats again."""
    return {k: _NONFINITE[v] if isinstance(v, str) else float(v) for k, v in stored.items()}


def numpy_scalar(x: Any) -> Any:
    """A NumPy number (``np.int64(3)``, ``np.float32(0.5)``, ``np.bool_``) as the Python one
    it equals (torch.save would keep it; JSON has no such type)."""
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":
        return x.item()
    raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")


def json_field(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False, default=numpy_scalar)
        return True
    except (TypeError, ValueError):
        return False


def saved_hyperparameters(optimizer: Any, state: Any) -> dict[str, Any]:
    """``optimizer.hyperparameters()``, a callable group, mask or exclusion saved as the names
    it matches in ``state``'s parameters. ``update`` records those; the one-program JAX step
    matches them on its own copy of the optimizer, so a checkpoint of its state would hold the
    function. Matched on a copy: the optimizer is left as it is."""
    from .optimizers import OptimizerState
    from .optimizers.groups import resolve

    hyper = optimizer.hyperparameters()
    if json_field(hyper) or not isinstance(state, OptimizerState) or \
            not hasattr(optimizer, "param_groups"):
        return hyper
    named = copy.copy(optimizer)
    with warnings.catch_warnings():  # (a group matching nothing warned when the step began)
        warnings.simplefilter("ignore")
        resolve(named, state.layout.name_list)
    return named.hyperparameters()


def trial_scheduler(scheduler: Any, optimizer: Any, trial_opt: Any) -> Any:
    """A deep copy of ``scheduler`` driving a copy of its optimizer (``trial_opt`` if that is
    ``optimizer``), to try a state on; ``None`` if it cannot be copied."""
    target = getattr(scheduler, "optimizer", None)
    memo: dict[int, Any] = {}
    try:  # (torch's schedulers over torch_optimizer's wrapper, which refuses copies, included)
        if target is not None and target is optimizer and trial_opt is not None:
            memo[id(target)] = trial_opt
        elif target is not None:
            memo[id(target)] = wrapper = copy.copy(target)
            if trial_opt is not None and vars(wrapper).get("optimizer") is optimizer:
                vars(wrapper)["optimizer"] = trial_opt  # (an Accumulate's copy shared it)
        return copy.deepcopy(scheduler, memo)
    except Exception:  # an uncopyable scheduler or optimizer: the real load is rolled back
        return None


_SHARDED = ("a DataParallel's state: save the whole state on one rank (full = "
            "mithril.distributed.full_state.gather_state(dp, state, params); on rank 0 "
            "save_checkpoint(path, params, dp.optimizer, full)) or one file per rank "
            "(mithril.distributed.save_sharded(folder, params, dp, state))")


def check_optimizer(optimizer: Any) -> None:
    """``TypeError`` naming ``optimizer``'s type unless it is one a checkpoint can hold (it
    has ``hyperparameters`` and ``load_state_dict``: a mithril optimizer)."""
    if all(callable(getattr(optimizer, a, None)) for a in ("hyperparameters",
                                                            "load_state_dict")):
        return
    kind = type(optimizer).__name__
    if kind == "DataParallel":
        raise TypeError(f"save_checkpoint: optimizer is a DataParallel, which a checkpoint "
                        f"does not hold: pass dp.optimizer; for {_SHARDED}")
    raise TypeError(f"save_checkpoint: optimizer must be a mithril optimizer "
                    f"(mithril.utils.optimizers) or an Accumulate of one, got {kind}")


def state_error(optimizer: Any, state: Any) -> TypeError:
    """The error of a ``state`` that is not ``optimizer``'s ``OptimizerState``, saying what
    to save instead where the state's type tells."""
    kind = type(state).__name__
    hint = ("the one-program JAX step's state: save step.to_optimizer_state(opt_state, "
            "params), and resume with step.from_optimizer_state(loaded['state'])"
            if kind == "OptaxState" else
            "an Accumulate's state: pass the Accumulate itself as optimizer (its window is "
            "saved with it)" if kind == "AccumulateState" else
            _SHARDED if kind == "DistributedState" else
            "save custom states through params or extra")
    return TypeError(f"state must be what {type(optimizer).__name__}.init/update returned "
                     f"(an OptimizerState), got {kind}: {hint}")


#: how a non-finite float of a scheduler's state or of ``extra`` is stored (JSON has none):
#: torch's ReduceLROnPlateau keeps ``mode_worse`` = inf, and ``best`` = inf before its first
#: step; a training loop's ``extra={"best_loss": inf}``
_FLOAT = "mithril_float"


def floats_to_json(value: Any) -> Any:
    """``value`` (a scheduler's ``state_dict()``) with every non-finite float as
    ``{"mithril_float": "inf" | "-inf" | "nan"}`` (ours store them as strings already;
    torch's keep the floats, which ``json.dumps(allow_nan=False)`` refused)."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return {_FLOAT: "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"}
    if isinstance(value, dict):
        return {k: floats_to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [floats_to_json(v) for v in value]
    return value


def floats_from_json(value: Any) -> Any:
    """The inverse of :func:`floats_to_json` (on parsed JSON, nested at most ``MAX_DEPTH``
    levels)."""
    if isinstance(value, dict):
        if set(value) == {_FLOAT} and value[_FLOAT] in ("inf", "-inf", "nan"):
            return float(value[_FLOAT])
        return {k: floats_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [floats_from_json(v) for v in value]
    return value


def check_mapping(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of arrays, got {type(value).__name__}")


def check_float_array(what: str, x: Any) -> str:
    """The dtype name of array ``x``; ``TypeError``/``DTypeError`` naming ``what`` unless it
    is a float16/bfloat16/float32/float64 NumPy, torch or JAX array."""
    return check_array(what, x, "", FLOAT_DTYPES)


def check_name(kind: str, name: str) -> None:
    """``ValueError`` naming the ``kind`` ("parameter") name ``name`` unless it has a UTF-8
    form, as safetensors stores tensor names (a lone surrogate such as ``"\\ud800"`` has none:
    safetensors raised a bare ``UnicodeEncodeError`` that named nothing)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{kind} name {name!r} is not valid Unicode (a lone surrogate at "
                         f"index {e.start}): a checkpoint stores names as UTF-8") from None


def check_array(what: str, x: Any, name: str, dtypes: Mapping[str, str]) -> str:
    """:func:`check_float_array` for the dtypes ``dtypes`` (and, with ``name``, a name that
    must be a str without '/')."""
    from .optimizers.checks import is_array

    if name != "" and (not isinstance(name, str) or "/" in name):
        raise TypeError(f"{what}: names must be str without '/', got {name!r}")
    if not is_array(x):
        raise TypeError(f"{what} is a {type(x).__name__}, not a NumPy, torch or JAX array")
    dt = dtype_name(x)
    if dt not in dtypes:
        raise DTypeError(f"{what} has dtype {dt}; checkpoints hold {', '.join(dtypes)} arrays")
    return dt


# ---------------------------------------------------------------------------------------------
# metadata checks (shared by save and load: save refuses what load would refuse)
# ---------------------------------------------------------------------------------------------


def _counter(value: Any, field: str, where: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise CheckpointError(f"{where}: metadata field '{field}' must be an integer in "
                              f"[0, 2**63), got {_short(value)}")
    return value


def _check_counts(value: Any, field: str, where: str) -> None:
    """``value`` is an object: parameter name -> counter (the optimizer's load checks the
    names and the counts against its state)."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: metadata field '{field}' is {_short(value)}, not an "
                              f"object: parameter -> count")
    for n, v in value.items():
        _counter(v, f"{field}.{n}", where)


def _short(value: Any) -> str:
    if type(value) is int and abs(value) > MAX_INT:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_ints(value: Any, field: str, where: str) -> None:
    """Every integer nested in ``value`` lies in int64's range (iteratively: no recursion)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif type(v) is int and not -MAX_INT - 1 <= v <= MAX_INT:
            raise CheckpointError(f"{where}: metadata field '{field}' holds {_short(v)}, "
                                  f"outside int64's range")


def _plain_json(v: Any) -> bool:
    """A number, bool, string or null, or lists / string-keyed objects of those (the JSON
    parse has bounded the depth)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(map(_plain_json, v))
    return isinstance(v, dict) and all(isinstance(k, str) and _plain_json(x) for k, x in v.items())


def check_meta(meta: Any, where: str) -> dict[str, Any]:
    """``meta`` (the parsed metadata) checked field by field; ``CheckpointError`` naming
    ``where`` and the field on the first problem."""
    def bad(field: str, what: str) -> CheckpointError:
        field = field if len(field) <= 120 else field[:117] + "..."
        return CheckpointError(f"{where}: metadata field '{field}' {what}")

    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: the metadata must be a JSON object, got "
                              f"{type(meta).__name__}")
    missing = [k for k in _TOP if k not in meta]
    unknown = sorted(set(meta) - {*_TOP, *_TOP_OPTIONAL})
    if missing or unknown:
        raise CheckpointError(f"{where}: metadata fields missing {missing}, unknown "
                              f"{[k[:40] for k in unknown]}")
    if meta["format"] != FORMAT:
        raise bad("format", f"is {_short(meta['format'])}; this version reads {FORMAT!r}")
    for field, dtypes in (("params", FLOAT_DTYPES), ("model_state", STATE_DTYPES)):
        if field not in meta:
            continue
        if not isinstance(meta[field], dict):
            raise bad(field, "must be an object: name -> {dtype, shape}")
        for n, m in meta[field].items():
            if not isinstance(m, dict) or set(m) != {"dtype", "shape"}:
                raise bad(f"{field}.{n}", "must be an object with exactly dtype and shape")
            if not isinstance(m["dtype"], str) or m["dtype"] not in dtypes:
                raise bad(f"{field}.{n}.dtype", f"is {_short(m['dtype'])}, not one of "
                                                f"{list(dtypes)}")
            if not isinstance(m["shape"], list) or not all(
                    type(d) is int and 0 <= d <= MAX_INT for d in m["shape"]):
                raise bad(f"{field}.{n}.shape", f"is {_short(m['shape'])}, not a list of "
                                                f"non-negative integers")
    opt = meta["optimizer"]
    if opt is not None:
        if not isinstance(opt, dict) or not set(_OPT) <= set(opt) <= {*_OPT, *_OPT_OPTIONAL}:
            raise bad("optimizer", f"must be null or an object with exactly the fields {_OPT} "
                                   f"(and optionally {_OPT_OPTIONAL})")
        if not isinstance(opt["class"], str) or not opt["class"]:
            raise bad("optimizer.class", f"is {_short(opt['class'])}, not a class name")
        hp = opt["hyperparameters"]
        if not isinstance(hp, dict):
            raise bad("optimizer.hyperparameters", "must be an object")
        for k, v in hp.items():
            if not _plain_json(v):
                raise bad(f"optimizer.hyperparameters.{k}", f"is {_short(v)}, not a number, "
                                                            f"bool, string, null, or a list or "
                                                            f"object of those (parameter groups)")
        _check_ints(hp, "optimizer.hyperparameters", where)
        if opt["step"] is None:
            if opt["num_skipped"] is not None or opt["num_nonfinite"] is not None or \
                    opt["slots"] != [] or set(opt) & set(_OPT_OPTIONAL):
                raise bad("optimizer", f"without a step (hyperparameters only) must have "
                                       f"num_skipped and num_nonfinite null, no slots and none "
                                       f"of {_OPT_OPTIONAL}")
        else:
            for c in _COUNTERS:
                _counter(opt[c], f"optimizer.{c}", where)
            if "consecutive_skips" in opt:
                _counter(opt["consecutive_skips"], "optimizer.consecutive_skips", where)
            slots = opt["slots"]
            if not isinstance(slots, list) or not all(
                    isinstance(s, str) and s and "/" not in s for s in slots) or \
                    len(set(slots)) != len(slots):
                raise bad("optimizer.slots", f"is {_short(slots)}, not a list of distinct "
                                             f"names without '/'")
            values = opt.get("values", [])
            if not isinstance(values, list) or not all(
                    isinstance(v, str) and v and "/" not in v for v in values) or \
                    len(set(values)) != len(values):
                raise bad("optimizer.values", f"is {_short(values)}, not a list of distinct "
                                              f"names without '/'")
            _check_counts(opt.get("missed", {}), "optimizer.missed", where)
            averaged = opt.get("averaged")
            if averaged is not None:  # (None or absent: saved before they were kept)
                if not isinstance(averaged, dict):
                    raise bad("optimizer.averaged", f"is {_short(averaged)}, not an object: "
                                                    f"average -> parameter -> count")
                for s, per in averaged.items():
                    _check_counts(per, f"optimizer.averaged.{s}", where)
            shapes = opt.get("slot_shapes", {})
            if not isinstance(shapes, dict) or not set(shapes) <= set(slots):
                raise bad("optimizer.slot_shapes", "must be an object: slot (one of "
                                                   "optimizer.slots) -> parameter -> shape")
            for sl, per in shapes.items():
                if not isinstance(per, dict) or set(per) != set(meta["params"]) or not all(
                        isinstance(d, list) and all(type(x) is int and 0 <= x <= MAX_INT
                                                    for x in d) for d in per.values()):
                    raise bad(f"optimizer.slot_shapes.{sl}", "must give every parameter a "
                                                             "list of non-negative integers")
    sched = meta["scheduler"]
    if sched is not None:
        if not isinstance(sched, dict) or set(sched) != {"class", "state"}:
            raise bad("scheduler", "must be null or an object with exactly class and state")
        if not isinstance(sched["class"], str) or not sched["class"]:
            raise bad("scheduler.class", f"is {_short(sched['class'])}, not a class name")
        if not isinstance(sched["state"], dict):
            raise bad("scheduler.state", "must be an object (the scheduler's state_dict)")
        _check_ints(sched["state"], "scheduler.state", where)
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict):
        raise bad("metrics", "must be an object: name -> number")
    for k, v in metrics.items():
        if not (v in _NONFINITE if isinstance(v, str) else
                isinstance(v, (int, float)) and not isinstance(v, bool)):
            raise bad(f"metrics.{k}", f"is {_short(v)}, not a number (or \"nan\", \"inf\", "
                                      f"\"-inf\")")
    accumulate.check_meta(meta, bad, FLOAT_DTYPES, MAX_INT)
    return meta


def check_tensors(meta: dict[str, Any], arrays: Mapping[str, np.ndarray], where: str) -> None:
    """The stored tensors are exactly those the metadata describes, with its shapes and the
    dtypes its parameter dtypes are stored as."""
    expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    for n, m in meta["params"].items():
        expected[f"params/{n}"] = (tuple(m["shape"]), (FLOAT_DTYPES[m["dtype"]],))
    for n, m in meta.get("model_state", {}).items():
        expected[f"model/{n}"] = (tuple(m["shape"]), (STATE_DTYPES[m["dtype"]],))
    opt = meta["optimizer"]
    if opt is not None and opt["step"] is not None:
        shapes = opt.get("slot_shapes", {})
        for s in opt["slots"]:
            for n, m in meta["params"].items():
                shape = shapes[s][n] if s in shapes else m["shape"]
                expected[f"opt/{s}/{n}"] = (tuple(shape), ("float16", "float32", "float64"))
        for v in opt.get("values", []):
            expected[f"optv/{v}"] = ((), ("float64",))
    expected.update(accumulate.expected(meta, FLOAT_DTYPES))
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"{where}: the stored tensors do not match the metadata: missing "
                              f"{missing[:10]}, not described {unknown[:10]}")
    for k, (shape, dtypes) in expected.items():
        a = arrays[k]
        if a.shape != shape:
            raise CheckpointError(f"{where}: tensor '{k}' is stored with shape {a.shape}, the "
                                  f"metadata says {shape}")
        if a.dtype.name not in dtypes:
            raise CheckpointError(f"{where}: tensor '{k}' is stored as {a.dtype.name}, "
                                  f"expected {' or '.join(dtypes)}")
