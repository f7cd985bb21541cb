"""How an optimizer saves and restores itself: :meth:`state_dict` / :meth:`load_state_dict`
(hyperparameters, counters and per-parameter slots as NumPy), checked before anything
changes."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import ShapeError
from .averaging import counts_of, loaded_counts, resumed_averages, saved_counts
from .checks import state_dict_count
from .groups import GROUP_KEYS
from .state import OptimizerState

#: the keys a state dict may have (one saved by a newer version with more is refused, not
#: resumed without them)
KEYS = frozenset({"optimizer", "hyperparameters", "step", "num_skipped", "num_nonfinite",
                  "consecutive_skips", "slots", "values", "averaged", "missed"})


def checked_head(opt: Any, d: Any) -> Mapping[str, Any]:
    """``d``'s hyperparameters, once ``d`` is a dict for ``opt``'s class with no key unknown
    to a state dict (a newer version's would be half restored); refused by name otherwise."""
    if not isinstance(d, Mapping):
        raise TypeError(f"state dict must be a dict, got {type(d).__name__}")
    if not isinstance(d.get("optimizer"), str) or d["optimizer"] != type(opt).__name__:
        raise ValueError(f"state dict is for {d.get('optimizer')!r:.80}, not "
                         f"{type(opt).__name__} (its 'optimizer')")
    unknown = sorted(map(repr, set(d) - KEYS))
    if unknown:
        raise KeyError(f"state dict key(s) {', '.join(unknown)} unknown to "
                       f"{type(opt).__name__} (a state dict has {sorted(KEYS)})")
    hp = d.get("hyperparameters")
    if not isinstance(hp, Mapping):
        raise TypeError("state dict 'hyperparameters' must be a dict")
    return hp


#: the domains a saved slot or optimizer-wide value may be restricted to (a class's
#: ``loaded_domains``): a test of the array, elementwise, and its text
_DOMAINS = {"positive": (lambda a: ~(a <= 0), "> 0"),
            "nonnegative": (lambda a: ~(a < 0), ">= 0"),
            "flag": (lambda a: (a == 0) | (a == 1), "0 or 1")}



def _differs(old: Any, new: Any) -> bool:
    """Whether a loaded hyperparameter ``new`` changes ``old`` (numbers by value)."""
    try:
        return float(old) != float(new)
    except (TypeError, ValueError):
        return old != new

class StateDictMixin:
    """The checkpoint half of :class:`~mithril.utils.optimizers.Optimizer`."""

    #: slots or state values whose saved values :meth:`load_state_dict` restricts, name ->
    #: a kind of ``_DOMAINS`` (a value no step could give: DAdaptAdamW's ``d`` <= 0, DoG's
    #: ``started`` flag 0.5); NaN passes where not a flag (a diverged run's state resumes)
    loaded_domains: dict[str, str] = {}

    def state_dict(self, state: OptimizerState | None = None, *, arrays: str = "numpy"
                   ) -> dict[str, Any]:
        """Hyperparameters (and, given ``state``, the step count, the skipped and non-finite
        step counters, the per-parameter slots and, under ``"missed"``, the parameters that
        missed steps and how many: :meth:`OptimizerState.note_missed`).

        ``arrays``: the slots' type, ``"numpy"`` (NumPy arrays) or ``"torch"`` (CPU torch
        tensors of the same dtypes and values; a bfloat16 state's are bfloat16). Everything
        else is a plain Python value, so a ``"torch"`` dict goes through ``torch.save`` and
        ``torch.load(weights_only=True)`` (torch's default) with no allowed globals; a NumPy
        array in a pickle needs ``numpy._core.multiarray._reconstruct``, which torch refuses
        unless allowed. :meth:`load_state_dict` takes either."""
        if arrays not in ("numpy", "torch"):
            raise ValueError(f"state_dict: arrays must be 'numpy' or 'torch', got {arrays!r:.40}")
        out: dict[str, Any] = {"optimizer": type(self).__name__,
                               "hyperparameters": self.hyperparameters()}
        if state is not None:
            out["step"] = state.step
            out["num_skipped"] = state.num_skipped
            out["num_nonfinite"] = state.num_nonfinite
            out["consecutive_skips"] = state.consecutive_skips
            host = _torch_tensor if arrays == "torch" else np.array
            own = getattr(state.engine, "slot_dtypes", {})  # (mu_dtype's: kept as they are)
            out["slots"] = {s: {n: _own_slot(v, arrays) if s in own or _torch_bf16(v) else
                                host(state.engine.to_numpy(v))
                                for n, v in state.slot(s).items()} for s in state.slots}
            if state.values:
                out["values"] = dict(state.values)
            if counts_of(self, state) is not None:  # each average's updates so far
                out["averaged"] = saved_counts(state)
            if state.missed is not None:  # (each parameter's own count, as torch's 'step')
                out["missed"] = state.missed_counts()
        return out

    def load_state_dict(self, d: Mapping[str, Any], params: Mapping[str, Any] | None = None
                        ) -> OptimizerState | None:
        """Restore hyperparameters; given ``params``, also rebuild and return the state.

        Everything is checked before anything changes: the keys (one this version does not
        know, a newer version's, is refused), the hyperparameters as the constructor checks
        them (unknown names are refused), every slot present with a numeric array (NumPy,
        torch or JAX) of each parameter's exact shape whose finite values the state's dtype
        holds, non-negative integer counters, each average's update counts and each
        parameter's missed steps at most the steps taken, and the values no step could give
        (:attr:`loaded_domains`: DAdaptAdamW's ``d`` <= 0, DoG's ``started`` not 0 or 1). On
        error this optimizer and ``d`` are left as they were.

        Weight averages (:mod:`.averaging`): one this optimizer was constructed with that a
        checkpoint saved with its state (``"step"``) lacks starts at the resume, as a fresh
        torch ``AveragedModel`` would: its settings are kept, its slot is a copy of
        ``params`` and its start (``ema_start`` / ``swa_start``) becomes the saved step + 1,
        unless later already. One the checkpoint has is restored with its settings,
        constructed with it or not. Hyperparameters alone (no ``"step"``) are set as given."""
        hp = checked_head(self, d)
        unknown = sorted(set(hp) - set(self.hyperparameters()) - set(GROUP_KEYS))
        if unknown:
            raise KeyError(f"state dict hyperparameter(s) {unknown} unknown to {type(self).__name__}")
        grouping = {k: hp[k] for k in GROUP_KEYS if k in hp}  # absent: no groups
        hp = {k: v for k, v in hp.items() if k not in GROUP_KEYS}
        for name, value in hp.items():  # (a value another optimizer sets: a Muon's fallback's)
            why = self._followed(name) if hasattr(self, "_followed") else None
            if why is not None and _differs(self.__dict__.get(name), value):
                raise ValueError(why)
        step = state_dict_count(d, "step") if "step" in d else None
        started, kept = resumed_averages(self, hp, step)
        hp.update(kept)
        trial = copy.copy(self)
        trial.__dict__.update(hp)
        plain = {k: v for k, v in trial.hyperparameters().items() if k not in GROUP_KEYS}
        try:  # the constructor's checks, where its signature takes the hyperparameters
            inspect.signature(type(self)).bind(**plain, **grouping)
        except TypeError:  # a subclass with its own constructor: as given
            if grouping:
                raise TypeError(f"{type(self).__name__}'s constructor takes no parameter "
                                f"groups") from None
        else:  # and its normalised values (floats, bools, groups)
            built = type(self)(**plain, **grouping)
            late = [(i, g["step_offset"]) for i, g in enumerate(built._groups or ())
                    if step is not None and g.get("step_offset", 0) > step]
            if late:  # no step could run from such a state
                raise ValueError(f"state dict param_groups[{late[0][0]}]['step_offset'] = "
                                 f"{late[0][1]} is beyond its step count {step}")
            hp = {k: v for k, v in vars(built).items() if k in hp}
            hp.update(_groups=built._groups, _wd_mask=built._wd_mask,
                      _wd_exclude=built._wd_exclude, _strict=built._strict,
                      _groups_version=self._groups_version + 1)
            trial.__dict__.update(hp)
        state = None
        if params is not None and "slots" in d:
            state = self._loaded_state(trial, d, params, started)
        self.__dict__.update(hp)
        return state

    @staticmethod
    def _loaded_state(trial: Any, d: Mapping[str, Any], params: Mapping[str, Any],
                      started: tuple[str, ...] = ()) -> OptimizerState:
        """The state of state dict ``d`` (which has ``"slots"``) for ``params``, built by
        ``trial`` (a copy of the optimizer, its hyperparameters loaded), every field checked;
        the ``started`` averages start here (see :meth:`load_state_dict`)."""
        if "step" not in d:
            raise KeyError("state dict has 'slots' but no 'step' (the steps they were made by)")
        state = trial.init(params)
        state.slots = trial._loaded_slots(d["slots"], state, started)
        state.values = trial._loaded_values(d.get("values", {}), state)
        for key, kind in trial.loaded_domains.items():  # (values no step could give)
            test, text = _DOMAINS[kind]
            saved = (d["slots"].get(key, {}) if key in state.slots else
                     {None: d["values"][key]} if key in state.values else {})
            for name, v in saved.items():
                where = (f"state dict value '{key}'" if name is None else
                         f"state dict slot '{key}' of '{name}'")
                a = _numeric(v, where)
                if not (ok := test(a)).all():
                    raise ValueError(f"{where} must be {text}, got {float(a[~ok].flat[0])}")
        state.step, state.num_skipped, state.num_nonfinite, state.consecutive_skips = (
            state_dict_count(d, k) for k in ("step", "num_skipped", "num_nonfinite",
                                             "consecutive_skips"))
        # (absent from a state dict saved before they were kept: inferred from the step)
        state.averaged = loaded_counts(trial, _within_step(d.get("averaged"), state.step),
                                       state, started)
        if d.get("missed") is not None:  # (absent: none missed, or saved before they were kept)
            state.set_missed(_loaded_missed(trial, d["missed"], state))
        # inf/NaN already in what is restored were reported when they appeared: as in the
        # run that saved it, they are not reported again
        eng = state.engine
        state.nonfinite_values = not (
            all(np.isfinite(eng.to_numpy(v)).all() for v in state.slots.values())
            and all(np.isfinite(eng.to_numpy(p)).all() for p in params.values()))
        return state

    @staticmethod
    def _loaded_values(saved: Any, state: OptimizerState) -> dict[str, float]:
        """The optimizer-wide scalars of a state dict: exactly those of ``state``, as floats."""
        if not isinstance(saved, Mapping) or set(saved) != set(state.values):
            got = sorted(saved, key=repr) if isinstance(saved, Mapping) else type(saved).__name__
            raise KeyError(f"state dict 'values' must have exactly {sorted(state.values)}, "
                           f"got {got}")
        out = {}
        for k, v in saved.items():
            bad = TypeError(f"state dict value '{k}' must be a number, got {v!r:.80}")
            try:
                a = _numeric(v, "")  # (a torch tensor on any device too)
            except TypeError:
                raise bad from None
            if a.shape != () or isinstance(v, bool):
                raise bad
            out[k] = float(a)
        return out

    @staticmethod
    def _loaded_slots(saved: Any, state: OptimizerState, started: tuple[str, ...] = ()
                      ) -> dict[str, Any]:
        """Flat slot buffers from a state dict's per-parameter arrays, checked against
        ``state`` (a fresh one for the same params), in ``state``'s order. The ``started``
        slots (averages that start at the resume) are ``state``'s own: the checkpoint must
        not have them."""
        lay = state.layout
        if not isinstance(saved, Mapping):
            raise TypeError("state dict 'slots' must be a dict of slot -> {param: array}")
        own = set(state.slots) - set(started)
        for label, names in (("unknown to", set(saved) - own), ("missing for", own - set(saved))):
            if names:
                raise KeyError(f"state dict 'slots': slot(s) {sorted(names, key=repr)} {label} "
                               f"{state.kind}")
        out = {s: state.slots[s] for s in state.slots if s in started}
        own = getattr(state.engine, "slot_dtypes", {})
        for slot, per_param in saved.items():
            lay = state.slot_layout(slot)
            if not isinstance(per_param, Mapping) or set(per_param) != set(lay.names):
                got = (sorted(per_param, key=repr) if isinstance(per_param, Mapping)
                       else type(per_param).__name__)
                raise KeyError(f"state dict slot '{slot}' must have exactly the parameters "
                               f"{sorted(lay.names)}, got {got}")
            arrays = {}
            dtype = np.asarray(state.engine.to_numpy(state.slots[slot])).dtype
            for name, shape in zip(lay.names, lay.shapes):
                where = f"state dict slot '{slot}' of '{name}'"
                a = _numeric(per_param[name], where)
                if slot in own:  # (another dtype only where it holds the slot's values exactly:
                    _check_own(a, per_param[name], own[slot], slot, where)  # a widened copy)
                if a.shape != tuple(shape):
                    what = "the parameter" if lay is state.layout else "the slot's"
                    raise ShapeError(f"{where} has shape {a.shape}, {what} {tuple(shape)}")
                if a.dtype != dtype:  # (a finite value the state's dtype cannot hold: refused)
                    with np.errstate(over="ignore", invalid="ignore"):
                        lost = np.isfinite(a) & ~np.isfinite(a.astype(dtype))
                    if lost.any():
                        raise ValueError(f"{where} holds {a[lost].flat[0]!r}, beyond the range "
                                         f"of the state's {dtype}")
                arrays[name] = a
            common = np.result_type(*arrays.values()) if arrays else dtype  # (mixed: the
            # flat buffer must hold each, not take the first's dtype: an int or float16 first
            # would round the others)
            flat = lay.flatten_numpy({n: a.astype(common, copy=False) for n, a in arrays.items()})
            out[slot] = (state.engine.from_numpy(flat, own[slot]) if slot in own else
                         state.engine.from_numpy(flat))
        return {s: out[s] for s in state.slots}


def _within_step(saved: Any, step: int) -> Any:
    """``saved`` (a state dict's ``"averaged"``), its names refused unless str and its
    counts where beyond ``step``: an average is updated at most once per step (its other
    checks: :func:`loaded_counts`)."""
    for s, per in (saved.items() if isinstance(saved, Mapping) else ()):
        keys = [s, *(per if isinstance(per, Mapping) else ())]
        if not all(isinstance(k, str) for k in keys):
            raise KeyError(f"state dict 'averaged' must name averages and parameters by "
                           f"str, got {next(k for k in keys if not isinstance(k, str))!r:.80}")
        for n, v in (per.items() if isinstance(per, Mapping) else ()):
            if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) \
                    and v > step:
                raise ValueError(f"state dict 'averaged' count of '{s}' for '{n}' is {v}, "
                                 f"beyond the {step} steps taken")
    return saved


def _loaded_missed(opt: Any, saved: Any, state: OptimizerState) -> dict[str, int]:
    """A state dict's ``"missed"`` (parameter -> steps it had no gradient at), checked
    against ``state`` (loaded, its ``step`` set) and ``opt``'s groups: known names, ints
    >= 0, none beyond the steps taken since its group joined."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"state dict 'missed' must be a dict of parameter -> int, got "
                        f"{type(saved).__name__}")
    unknown = sorted(set(saved) - set(state.layout.names), key=repr)
    if unknown:
        raise KeyError(f"state dict 'missed' names unknown parameters {unknown}")
    index, views = opt.group_rows(state)
    out = {}
    for name, m in saved.items():
        if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)) or m < 0:
            raise ValueError(f"state dict 'missed' of '{name}' must be an int >= 0, got {m!r}")
        joined = views[index[state.layout.index[name]]]._step_offset
        if joined + m > state.step:
            raise ValueError(f"state dict 'missed' of '{name}' is {m}, beyond the {state.step - joined} "
                             f"steps taken since it joined")
        out[name] = int(m)
    return out


def _torch_tensor(value: Any) -> Any:
    """A CPU torch tensor (its own copy) of the same dtype and values as the host array
    ``value``; an ml_dtypes bfloat16 (a JAX bfloat16 state's) as torch's bfloat16, bit for
    bit, other ml_dtypes floats as float32 (exact)."""
    import torch

    a = np.array(value)
    if a.dtype.kind == "V":
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        a = a.astype(np.float32)
    return torch.from_numpy(a)


def _dtype_name(value: Any) -> str:
    """The dtype name of a saved array (NumPy, ml_dtypes, torch, JAX, nested lists)."""
    dt = getattr(value, "dtype", None)
    if type(value).__module__.split(".", 1)[0] == "torch" and dt is not None:
        return str(dt).removeprefix("torch.")
    try:
        return np.dtype(dt).name if dt is not None else np.asarray(value).dtype.name
    except (TypeError, ValueError):
        return str(dt)


def _check_own(a: np.ndarray, saved: Any, dtype: str, slot: str, where: str) -> None:
    """A saved slot of a dtype of its own (``mu_dtype``): of that dtype, or of another whose
    values it holds exactly (a copy widened on the way, as ``torch_optimizer``'s float32
    ``exp_avg``); a state of another ``mu_dtype`` (a float32 moment) is refused."""
    got = _dtype_name(saved)
    if got == dtype:
        return
    from ...backends.numpy_backend import numpy_dtype

    with np.errstate(over="ignore", invalid="ignore"):
        back = a.astype(numpy_dtype(dtype)).astype(a.dtype)
    off = ~((back == a) | (np.isnan(back) & np.isnan(a))) if a.dtype.kind == "f" else back != a
    if off.any():
        raise TypeError(f"{where} has dtype {got} and values {dtype} cannot hold (e.g. "
                        f"{a[off].flat[0]!r}): the state keeps slot '{slot}' in {dtype} "
                        f"(mu_dtype={dtype!r}); a state of another mu_dtype does not resume "
                        f"in this one")


def _torch_bf16(view: Any) -> bool:
    """Whether ``view`` is a torch bfloat16 tensor (a torch bfloat16 state's slot: saved as
    bfloat16, as a JAX one's, where the engine's ``to_numpy`` widens it to float32)."""
    return type(view).__module__.split(".", 1)[0] == "torch" and \
        str(getattr(view, "dtype", "")) == "torch.bfloat16"


def _own_slot(view: Any, arrays: str) -> Any:
    """A slot of a dtype of its own (``mu_dtype``) saved in that dtype: a NumPy array
    (bfloat16 by ml_dtypes) or, ``arrays="torch"``, a CPU torch tensor (copies)."""
    if type(view).__module__.split(".", 1)[0] != "torch":
        return _torch_tensor(view) if arrays == "torch" else np.array(view)
    import torch

    t = view.detach().cpu().clone()
    if arrays == "torch" or t.dtype != torch.bfloat16:
        return t if arrays == "torch" else t.numpy()
    try:
        import ml_dtypes
    except ImportError:  # (a torch-only install: its exactly equal float32 values, which
        return t.float().numpy()  # load_state_dict takes back)
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def _numeric(value: Any, where: str) -> np.ndarray:
    """``value`` (a NumPy, torch or JAX array, or nested lists of numbers) as a NumPy array
    of a numeric dtype; a ``TypeError`` starting with ``where`` if it is none. bfloat16 and
    the other ml_dtypes floats (a JAX bfloat16 state's ``state_dict`` holds them, dtype kind
    'V' to NumPy; torch's, from ``arrays="torch"``) are widened to float32, which holds each
    of them exactly and which every engine's ``from_numpy`` takes."""
    try:
        if type(value).__module__.split(".", 1)[0] == "torch" and hasattr(value, "detach"):
            value = value.detach().cpu()  # (torch.load(map_location=...) puts it anywhere)
            if value.is_floating_point() and value.dtype.itemsize < 4 and \
                    str(value.dtype) != "torch.float16":
                value = value.float()  # bfloat16, the float8s: no NumPy dtype
        a = np.asarray(value)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:  # (ragged lists,
        raise TypeError(f"{where} is no array: {e}") from None  # a meta tensor, objects)
    if a.dtype.kind in "fiu":
        return a
    if a.dtype.kind == "V" and a.dtype.fields is None:
        try:
            import ml_dtypes

            ml_dtypes.finfo(a.dtype)
        except (ImportError, TypeError, ValueError):  # (an ml_dtypes integer type: refused)
            pass
        else:
            return a.astype(np.float32)
    raise TypeError(f"{where} is not numeric ({a.dtype})")
