"""Checks of what users give the optimizers: hyperparameters, the backend of their params,
the counters of a state dict, and an update's params, gradients and state (checked before
anything is written). Each error names the value at fault."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ...errors import KeyMismatchError, ShapeError
from .state import OptimizerState


def is_array(x: Any) -> bool:
    """Whether ``x`` is a NumPy, torch or JAX array."""
    mod = type(x).__module__.split(".", 1)[0]
    return isinstance(x, np.ndarray) or (mod in ("torch", "jax", "jaxlib") and hasattr(x, "dtype"))


def infer_backend(params: Mapping[str, Any]) -> Any:
    """A backend matching the arrays in ``params`` (dtype and device of the first one)."""
    from ...backends import JaxBackend, NumpyBackend, TorchBackend

    if not params:
        return NumpyBackend()
    name, x = next(iter(params.items()))
    mod = type(x).__module__.split(".", 1)[0]
    if not is_array(x):
        raise TypeError(f"params['{name}'] is a {type(x).__name__}, not a NumPy, JAX or torch "
                        f"array (cannot infer a backend)")
    dt = str(x.dtype).removeprefix("torch.")
    dt = dt if dt in ("float16", "bfloat16", "float32", "float64") else "float32"
    if mod == "torch":
        return TorchBackend(dtype=dt, device=str(x.device))
    if mod in ("jax", "jaxlib"):
        return JaxBackend(dtype=dt) if dt != "float64" else JaxBackend(dtype="float64")
    if isinstance(x, np.ndarray):
        return NumpyBackend(dtype=dt)
    raise TypeError(f"params['{name}'] is a {type(x).__name__}: cannot infer a backend")


#: the dtypes a slot may be kept in (optax's ``mu_dtype``)
SLOT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_mu_dtype(value: Any) -> str | None:
    """optax's ``mu_dtype`` (the first moment kept in a dtype of its own) as a dtype name
    of :data:`SLOT_DTYPES`, or None: a name, a NumPy / ml_dtypes / JAX dtype or scalar type
    (``jnp.bfloat16``) or a torch dtype; anything else is refused by name."""
    if value is None:
        return None
    if type(value).__module__.split(".", 1)[0] == "torch":
        name = str(value).removeprefix("torch.")  # (torch.bfloat16 has no NumPy dtype)
    else:
        try:
            import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy (ships with JAX)
        except ImportError:  # pragma: no cover
            pass
        try:
            name = np.dtype(value).name
        except (TypeError, ValueError):
            raise TypeError(f"mu_dtype={value!r:.60} is not a dtype (one of {SLOT_DTYPES}, "
                            f"a NumPy, JAX or torch dtype)") from None
    if name not in SLOT_DTYPES:
        raise TypeError(f"mu_dtype={name}: not a floating-point dtype a slot can be kept in "
                        f"{SLOT_DTYPES}")
    return name


#: the largest integer a hyperparameter or counter may hold (int64's largest): larger ones
#: are refused as "too large" (they could not be converted to a float, stored in an int64
#: or raised to a power without overflowing)
MAX_INT = 2**63 - 1


def unwrapped(state: Any) -> Any:
    """``state.inner`` for an :class:`~mithril.utils.accumulation.AccumulateState`, else
    ``state``: an optimizer's state readers (``ema_params``, ``eval_params``, ...) take the
    state of an ``Accumulate`` wrapping it, as optax's readers look through ``MultiSteps``."""
    from ..accumulation import AccumulateState

    return state.inner if isinstance(state, AccumulateState) else state


def describe(value: Any) -> str:
    """``repr(value)``, shortened for huge integers and long texts (``repr`` of an int with
    more than 4300 digits raises, and a 400-digit number makes an unreadable message)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
            and abs(int(value)) > MAX_INT:
        return f"an integer of {abs(int(value)).bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def to_float(name: str, value: Any) -> float:
    """``float(value)`` for a number (a Python, NumPy or 0-d array scalar); ``TypeError``
    naming ``name`` for anything else (strings and bools included: ``float("0.1")`` and
    ``float(True)`` would pass), ``ValueError`` for a number too large for a float."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    if callable(value):  # an optax / Keras schedule (a function of the step): a scheduler here
        raise TypeError(f"{name} must be a number, got {describe(value)}: for a schedule give "
                        f"its initial value and step a scheduler of mithril.utils.lr_schedulers "
                        f"after each update (docs/optimizers.md, \"From optax or Keras\", lists "
                        f"each optax / Keras schedule's)" + (
                            "; optax_transformation(opt, learning_rate=schedule) takes an optax "
                            "schedule as it is" if "learning_rate" in name else
                            "; one drives any hyperparameter through optimizer.hyperparameter("
                            "name, group)"))
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large: got {describe(value)} (not representable as "
                         f"a float)") from None
    except Exception:  # TypeError, ValueError, torch's RuntimeError for a many-element tensor
        raise TypeError(f"{name} must be a number, got {describe(value)}") from None


def check_int(name: str, value: Any, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """An integer (Python or NumPy; bools and floats refused with ``TypeError``) in
    ``[minimum, maximum]`` (``ValueError`` otherwise, naming ``name``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {describe(value)}")
    v = int(value)
    if v > maximum:
        raise ValueError(f"{name} is too large: got {describe(value)} (at most {maximum})")
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


def check_positive(name: str, value: Any, allow_zero: bool = True) -> float:
    """A finite number ``>= 0`` (``> 0`` unless ``allow_zero``) as a float; ``TypeError`` for
    a non-number, ``ValueError`` (naming ``name``) for one out of range or too large."""
    v = to_float(name, value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, "
                         f"got {describe(value)}")
    return v


def rounds_to_zero(x: float, dtype: str) -> bool:
    """Whether ``x`` > 0 becomes 0 in ``dtype`` (float16's smallest subnormal is ~6e-8)."""
    return x > 0 and dtype == "float16" and float(np.float16(x)) == 0.0


def state_dict_count(d: Mapping[str, Any], key: str) -> int:
    """A non-negative integer counter of a state dict (0 where absent), at most ``MAX_INT``."""
    v = d.get(key, 0)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"state dict '{key}' must be a non-negative int, got {describe(v)}")
    if v > MAX_INT:
        raise ValueError(f"state dict '{key}' is too large: got {describe(v)} (at most {MAX_INT})")
    return int(v)


def switched_on(value: Any) -> bool:
    """Whether a hyperparameter that switches a term on when non-zero (a momentum) is
    non-zero. A value that is no Python number is a traced one (an optax transformation's
    program reads it per step), never 0: a 0 picks another update rule, and is not traced."""
    return not isinstance(value, numbers.Real) or value != 0


def check_choice(name: str, value: Any, choices: tuple[str, ...], why: str = "") -> str:
    """``value`` if it is one of the strings ``choices``, else a ValueError naming them
    (``why``: what the message adds, e.g. which peer lacks the others)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}{why}, got {describe(value)}")
    return value


def refuse_unless(convention: str, owner: str, **given: Any) -> None:
    """Arguments that only ``owner``'s convention has (RAdam's ``eps_root`` is optax's):
    each one given (not None) under another ``convention`` is a ValueError naming it."""
    for name, value in given.items():
        if convention != owner and value is not None:
            raise ValueError(f"{name}={describe(value)}: only the {owner} convention has it "
                             f"(convention={owner!r}), not {convention!r}")


def check_flag(name: str, value: Any) -> bool:
    """A bool hyperparameter (``bool("no")`` would be True: only bools, 0 and 1 pass)."""
    if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return bool(value)


def check_unit(name: str, value: Any) -> float:
    """A number in ``[0, 1)`` as a float (errors as :func:`check_positive`)."""
    v = check_positive(name, value)
    if not v < 1:
        raise ValueError(f"{name} must be in [0, 1), got {describe(value)}")
    return v


def check_uniform(params: Mapping[str, Any], what: str, key: Callable[[Any], str]) -> None:
    """Raise a TypeError naming the odd parameters out when ``key`` differs among ``params``
    (the smaller groups; the largest is taken as meant)."""
    groups: dict[str, list[str]] = {}
    for name, p in params.items():
        if not is_array(p):
            raise TypeError(f"params['{name}'] is a {type(p).__name__}, not a NumPy, JAX or "
                            f"torch array")
        groups.setdefault(key(p), []).append(name)
    if len(groups) > 1:
        ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
        odd = [n for _, names in ranked[1:] for n in names]
        listing = "; ".join(f"{k}: {names}" for k, names in ranked)
        raise TypeError(f"params mix {what}s ({listing}): one optimizer needs one {what}; the "
                        f"odd one(s) out: {odd}")


def check_state_kind(opt: Any, state: Any) -> None:
    """``state`` is an ``OptimizerState`` made by ``opt``'s kind of optimizer (its slots)."""
    if not isinstance(state, OptimizerState):
        raise TypeError(f"state must be what {type(opt).__name__}.init returned, "
                        f"got {type(state).__name__}")
    own = {*opt.full_slot_names(), *opt.tensor_slots}
    if state.kind != type(opt).__name__ or set(state.slots) != own:
        raise ValueError(f"state was made by {state.kind} with slots {sorted(state.slots)}, "
                         f"not by this {type(opt).__name__} (slots {sorted(own)})")


def refuse_traced(who: str, *trees: Mapping[str, Any]) -> None:
    """A TypeError naming the jittable way where an array of ``trees`` is a JAX tracer
    (``opt.update`` inside the user's ``jax.jit``): the engines keep their state on the
    host, outside any trace. The first entry of each only (all of a traced function's
    arguments are traced): no cost per tensor."""
    import sys

    jax = sys.modules.get("jax")
    if jax is None:
        return
    for tree in trees:
        first = next(iter(tree.items()), None) if isinstance(tree, Mapping) else None
        if first is not None and isinstance(first[1], jax.core.Tracer):
            raise TypeError(
                f"{who}: '{first[0]}' is traced ({type(first[1]).__name__}: inside jax.jit, "
                f"grad or vmap); the optimizer's state lives outside any trace. In a jitted "
                f"program use mithril.interop.optax_transformation(optimizer) (pure, "
                f"jittable init / update), or mithril.utils.training.make_train_step")


def _epsilon_elementwise(opt: Any) -> bool:
    """Whether ``opt``'s epsilon (a wrapper's: its held optimizer's) is added to a float16
    element (class attribute ``epsilon_elementwise``, default True)."""
    while (held := getattr(type(opt), "HELD", None)) and held in vars(opt):
        opt = vars(opt)[held]
    return getattr(opt, "epsilon_elementwise", True)


def check_update(opt: Any, params: Mapping[str, Any], gradients: Mapping[str, Any],
                 state: Any) -> tuple[Any, bool]:
    """What ``opt.update`` checks first: raise on bad input before anything is touched.
    Returns what the engine's ``prepare`` found (e.g. the gradients' addresses) for its
    ``step``, and whether ``params`` are the very arrays the previous update returned
    (nothing to copy in)."""
    refuse_traced(f"{type(opt).__name__}.update", params, gradients)
    check_state_kind(opt, state)
    if state.swapped is not None:
        raise ValueError(f"the {state.swapped.upper()} is swapped in (swap_ema): call "
                         f"swap_ema(params, state) again to swap the training parameters "
                         f"back before an update")
    if not isinstance(gradients, Mapping):
        raise TypeError(f"gradients must be a dict of arrays, got {type(gradients).__name__}")
    lay, eng = state.layout, state.engine
    if lay.dtype == "float16" and _epsilon_elementwise(opt):
        # the optimizer's epsilon, then each group's own (a group's used to pass unchecked:
        # NaN parameters at the first zero gradient). Not where ε enters a float64 sum only
        # (DoG's, DoWG's, LARS's: refused, while optax's ran bit for bit)
        groups = getattr(opt, "param_groups", None) or ()
        for where, eps in (("", getattr(opt, "epsilon", None)),
                           *((f"param_groups[{i}]: ", g.get("epsilon"))
                             for i, g in enumerate(groups))):
            if isinstance(eps, float) and rounds_to_zero(eps, lay.dtype):
                raise ValueError(f"{where}epsilon={eps!r} is 0 in float16: a zero gradient would "
                                 f"give 0/0 = NaN parameters. Use epsilon >= 6e-8 (1e-4 is usual "
                                 f"for float16), or float32 master weights "
                                 f"(MixedPrecisionTrainer)")
    if eng.backend.name != opt._backend.name:
        raise ValueError(f"state was made for {eng.backend.name} arrays, but this "
                         f"{type(opt).__name__} works on {opt._backend.name} arrays")
    atype, dtype, shapes, index = eng.array_type, eng.native_dtype, lay.shapes, lay.index
    prepared = eng.prepare(gradients)  # None unless every gradient (any order), well-typed
    # the params first (unless they are the arrays the previous update returned): with a
    # state of other params, the gradients would be blamed for the state's shapes
    returned = state.returned(params)
    if not returned:
        _check_params(opt, params, state)
    if prepared is None:
        if not gradients.keys() <= index.keys():
            raise KeyMismatchError(f"gradients for unknown parameter(s) "
                                   f"{sorted(set(gradients) - set(lay.names))}")
        for name, g in gradients.items():
            if not isinstance(g, atype):
                raise TypeError(f"gradients['{name}'] is a {type(g).__name__}, not a "
                                f"{opt._backend.name} array")
            shape = shapes[index[name]]
            if tuple(g.shape) != shape:
                raise ShapeError(f"gradients['{name}'] has shape {tuple(g.shape)} but the "
                                 f"parameter has shape {shape}")
            if g.dtype != dtype:
                raise TypeError(f"gradients['{name}'] has dtype {opt._backend.dtype_name(g)} "
                                f"but the parameter has dtype {lay.dtype}")
    return prepared, returned


def _check_params(opt: Any, params: Mapping[str, Any], state: Any) -> None:
    """``params`` against the optimizer ``state``: the same keys, array type, dtype, shapes."""
    lay, eng = state.layout, state.engine
    atype, dtype, shapes, index = eng.array_type, eng.native_dtype, lay.shapes, lay.index
    views = state.param_views or {}
    if params.keys() != index.keys():
        missing = sorted(set(lay.names) - set(params))
        unknown = sorted(set(params) - set(lay.names))
        raise KeyMismatchError(f"params do not match the optimizer state: missing {missing}, "
                               f"unknown {unknown}")
    jax_arrays = eng.backend.name == "jax"
    for name, p in params.items():
        if name in views and p is views[name]:
            continue
        if jax_arrays and isinstance(p, atype) and p.is_deleted():
            raise TypeError(f"params['{name}'] is a deleted JAX array: was it consumed by an "
                            f"earlier update? (the jitted JAX engine donates the params it "
                            f"returned to the next update: pass the params the last update "
                            f"returned)")
        if not isinstance(p, atype) or p.dtype != dtype:
            raise TypeError(f"params['{name}'] must be a {opt._backend.name} array of dtype "
                            f"{lay.dtype}, got {type(p).__name__} {getattr(p, 'dtype', '')}")
        if tuple(p.shape) != shapes[index[name]]:
            raise ShapeError(f"params['{name}'] has shape {tuple(p.shape)} but the state was "
                             f"built for {shapes[index[name]]}")
