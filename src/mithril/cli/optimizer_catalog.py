"""Every optimizer of :mod:`mithril.utils.optimizers` by a CLI name, with its settings.

The catalog is derived, not hand-written: every class of the library's ``__all__`` that is
an :class:`~mithril.utils.optimizers.Optimizer` gets a name in the CLI's style (lower case,
dashes: ``Lion`` -> ``lion``, ``ScheduleFreeAdamW`` -> ``schedule-free-adamw``, ``SignSGD``
-> ``sign-sgd``), and its settings are its constructor's arguments (``learning_rate`` is
``lr`` and ``epsilon`` is ``eps``, as the flags call them). A new optimizer in the library
thus appears here by itself.

Settings come from the flags of :data:`.options.OPTIMIZER_OPTIONS` where the optimizer takes
them (``--beta1`` for Lion; ``--momentum`` for Lion is an error) and from the spec form
``NAME:KEY=VALUE,...`` (``lion:beta1=0.95,beta2=0.98``), whose values are parsed by the
argument's annotation and default (floats, ints, booleans, ``none``, tuples written
``[a,b]`` or ``a/b``, an optimizer name for ``fallback``/``inner``) and validated by the
constructor. Some optimizers are special:

* the wrappers take another one: ``lookahead:inner=sgd,sync_period=5``,
  ``sam:base_optimizer=sgd,rho=0.1``, ``mechanize:base_optimizer=adam`` (default: adam);
  the settings that are not the wrapper's own (and the flags) go to the inner optimizer
  (SAM's second gradient: the training step evaluates the model again at the perturbed
  parameters);
* ``lbfgs`` needs a closure that re-evaluates the loss several times per step, which the
  training loop (one gradient per batch) cannot give: it is refused with that reason;
* ``dpsgd`` (DP-SGD) takes per-example gradients: the training step computes them
  (:func:`~mithril.utils.training.make_train_step`) for models without Dropout or
  BatchNorm, in one process; it cannot be a wrapper's inner optimizer
  (``differentially-private``, the wrapper around any optimizer, is refused here for now).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..utils import optimizers as _optimizers
from ..utils.optimizers import Optimizer
from .errors import CLIError
from .options import (
    ALIASES,
    COMMON_OPTIONS,
    OPTIMIZER_OPTIONS,
    OPTIMIZERS,
    OPTIONS,
    SCHEDULER_OPTIONS,
    WARMUP_OPTIONS,
    _split_items,
)

#: names the generic rule (a dash before each capitalised word) gets wrong
_NAME_OVERRIDES = {"AdaGrad": "adagrad", "AdaBelief": "adabelief", "AdEMAMix": "ademamix",
                   "SimplifiedAdEMAMix": "simplified-ademamix", "DoWG": "dowg",
                   "AcProp": "acprop", "GaLore": "galore"}
#: constructor argument -> CLI key where they differ (the flags' names)
_KEY_OF_ARG = {"learning_rate": "lr", "epsilon": "eps"}
#: constructor arguments that are not hyperparameters (engine and placement choices), or
#: not a value a command line spells (Muon's / GaLore's per-parameter axes)
_NOT_SETTINGS = {"backend", "fused", "weight_dimension_numbers"}
#: run settings (schedule, warm-up): a constructor argument of that name gets this prefix
#: (schedule-free's own ``warmup_steps`` is ``optimizer_warmup_steps``; ``--warmup-steps``
#: stays the schedule's warm-up)
_RUN_KEYS = {o.name for o in SCHEDULER_OPTIONS + WARMUP_OPTIONS}
_CLASH_PREFIX = "optimizer_"

#: the CLI's learning rate where the class's default does not suit the digits MLP (2 epochs
#: of each, tests/test_cli_optimizer_catalog.py: the loss falls). The learning-rate-free ones
#: (prodigy, dog, dowg, cocob: a multiplier of 1) and the schedule-free ones keep theirs;
#: dog's default init_step (1e-6) makes it start slowly (it takes off after ~4 epochs)
DEFAULT_LR: dict[str, float] = {
    **{name: kind.default_lr for name, kind in OPTIMIZERS.items()},
    # trust-ratio (layer-wise) methods: the rate scales the weights' norm
    "lamb": 1e-2, "lars": 1.0, "novograd": 1e-2,
    # sign-based: every element moves by the rate; lion's 1e-4 is for large models
    "lion": 1e-3,
    # SGD-like: the CLI's sgd rate and the like; ftrl's 1e-3 barely moves
    "optimistic-gd": 0.05, "asgd": 0.05, "ftrl": 0.1,
    # radam's first steps are un-adapted momentum SGD; muon as in Keller Jordan's runs
    "radam": 1e-2, "muon": 0.02,
    # Adam in a rotated (SVD) basis: 1e-3 moves the digits MLP too slowly in 2 epochs
    "galore": 1e-2,
    # DP-SGD: clipped (C = 1) and noised gradients, plain SGD (2 epochs: ~85 % test accuracy)
    "dpsgd": 1.0,
}
#: a wrapper's inner optimizer when ``inner=`` / ``base_optimizer=`` is not given
DEFAULT_INNER = "adam"
#: optimizers the training loop cannot drive, and why
REFUSED = {"lbfgs": "L-BFGS needs a closure that re-evaluates the loss several times per "
                    "step (and a full batch); the training loop takes one gradient per batch. "
                    "Use mithril.utils.optimizers.LBFGS (convention='torch' or 'optax') from Python "
                    "with step(closure)"}
#: the optimizers whose ``update`` takes per-example gradients (DP-SGD): the training step
#: computes them itself (``make_train_step``), for a model without Dropout or BatchNorm
PER_EXAMPLE = ("dpsgd", "differentially-private")


def cli_name(class_name: str) -> str:
    """The CLI's name of an optimizer class: lower case, a dash before each capitalised word
    or acronym (``ScheduleFreeAdamW`` -> ``schedule-free-adamw``, ``SignSGD`` -> ``sign-sgd``),
    but ``AdamW``, ``NAdam``, ``RMSProp`` stay one word."""
    if class_name in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[class_name]
    return re.sub(r"(?<=[a-z])(?=[A-Z][a-z]|[A-Z]{2})", "-", class_name).lower()


def _catalog() -> dict[str, type[Optimizer]]:
    found = {}
    for attr in _optimizers.__all__:
        cls = getattr(_optimizers, attr)
        if isinstance(cls, type) and issubclass(cls, Optimizer) and cls is not Optimizer:
            found[cli_name(attr)] = cls
    # the CLI's original five first (their order in help texts), then alphabetical
    return {**{n: found[n] for n in OPTIMIZERS}, **dict(sorted(found.items()))}


#: CLI name -> optimizer class, every one of the library's catalog
CATALOG: dict[str, type[Optimizer]] = _catalog()
NAMES = tuple(CATALOG)


@dataclass(frozen=True)
class Setting:
    """One constructor argument as a CLI key."""

    key: str  #: the CLI key (``lr``, ``beta1``, ``optimizer_warmup_steps``)
    arg: str  #: the constructor argument (``learning_rate``)
    annotation: str
    default: Any

    def parse(self, text: str, where: str) -> Any:
        """The value of ``text`` for this argument (its range is the constructor's to check)."""
        opt = OPTIONS.get(self.key)
        ann, low = self.annotation, text.strip().lower()
        sequence = "tuple" in ann or "Sequence" in ann or isinstance(self.default, tuple)
        if opt is not None and opt in OPTIMIZER_OPTIONS and not sequence:
            return opt.parse(text, where)  # the flag's own type and checks
        if low == "none" and ("None" in ann or self.default is None):
            return None
        try:
            if self.arg in ("fallback", "inner") or ann in ("Any", "Optimizer"):
                return resolve_name(text, where=f"{self.key} optimizer")
            if "bool" in ann or isinstance(self.default, bool):
                return _bool(low)
            if sequence:  # Adafactor's epsilon=[none,1e-3], Rprop's etas=0.5/1.2
                items = text.strip().strip("[]()").replace("/", ",").split(",")
                return tuple(_scalar(x.strip()) for x in items if x.strip())
            if ann.startswith("int") or isinstance(self.default, int):
                return int(text)
            if ann.startswith("float") or isinstance(self.default, float):
                return float(text)
        except ValueError:
            raise CLIError(f"{where}: {self.key}={text!r} is not a valid value of "
                           f"{self.key} ({ann})") from None
        return text.strip()


def _bool(low: str) -> bool:
    if low in ("", "1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(low)


def _scalar(text: str) -> Any:
    """A tuple item: ``none``, a number, or a word (DoG's ``init_step=[heuristic,1e-6]``)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def settings_of(cls: type[Optimizer]) -> dict[str, Setting]:
    """CLI key -> :class:`Setting` for each hyperparameter of ``cls``'s constructor."""
    out: dict[str, Setting] = {}
    hints = getattr(cls.__init__, "__annotations__", {})
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) \
                or p.name in _NOT_SETTINGS:
            continue
        key = _KEY_OF_ARG.get(p.name, p.name)
        if key in _RUN_KEYS:
            key = _CLASH_PREFIX + key
        ann = hints.get(p.name, "Any")  # a string: the library uses postponed annotations
        out[key] = Setting(key, p.name, ann if isinstance(ann, str) else getattr(
                               ann, "__name__", str(ann)),
                           None if p.default is inspect.Parameter.empty else p.default)
    return out


#: CLI name -> its settings
SETTINGS: dict[str, dict[str, Setting]] = {n: settings_of(c) for n, c in CATALOG.items()}
#: the wrappers (Lookahead, SAM, Mechanize) -> the key naming the optimizer they wrap: a
#: wrapper's spec keys are its own settings and its inner optimizer's
WRAPPERS: dict[str, str] = {n: k for n, s in SETTINGS.items() for k, v in s.items()
                            if v.arg in ("inner", "base_optimizer")}
LOOKAHEAD = "lookahead"


def inner_name(name: str, settings: Mapping[str, Any]) -> str | None:
    """The catalog name of the optimizer wrapper ``name`` wraps (None: not a wrapper)."""
    return (settings.get(WRAPPERS[name]) or DEFAULT_INNER) if name in WRAPPERS else None


def resolve_name(text: str, where: str = "optimizer", flag: str | None = None) -> str:
    """The catalog name ``text`` means (case, ``_`` for ``-`` and dash-less forms such as
    ``signsgd`` are accepted); an unknown one is a :class:`CLIError` listing the names (with
    ``flag``, in argparse's words for a bad choice: ``argument --optimizer: invalid choice``)."""
    name = text.strip().lower().replace("_", "-")
    if name in CATALOG:
        return name
    bare = {n.replace("-", ""): n for n in CATALOG}
    if name.replace("-", "") in bare:
        return bare[name.replace("-", "")]
    usable = [n for n in NAMES if n not in REFUSED]  # (a refused name is not a choice)
    if flag is not None:
        raise CLIError(f"argument {flag}: invalid choice: {text.strip()!r} (choose from "
                       f"{', '.join(map(repr, usable))})")
    raise CLIError(f"unknown {where} {text.strip()!r}; choose from {', '.join(usable)}")


def keys_text(name: str, inner: str | None = None) -> str:
    """``"lr, beta1, ..."``: the keys optimizer ``name`` takes in its spec."""
    keys = list(SETTINGS[name])
    if name in WRAPPERS:
        keys = [k for k in keys if k != WRAPPERS[name]] + [WRAPPERS[name]]
        keys += [f"{k} (of {inner or DEFAULT_INNER})"
                 for k in SETTINGS[inner or DEFAULT_INNER] if k not in SETTINGS[name]]
    return ", ".join(keys + [o.name for o in COMMON_OPTIONS])


def parse_optimizer_spec(text: str, run_keys: bool = False,
                         special: Mapping[str, Any] | None = None,
                         flag: str | None = None) -> tuple[str, dict[str, Any]]:
    """``"NAME"`` or ``"NAME:KEY=VALUE,..."`` -> ``(catalog name, {key: value})``.

    Keys are the optimizer's constructor arguments as CLI keys (``lr``, ``eps``, ``beta1``,
    ...; ``-`` may stand for ``_``) and the common options (``clip_norm``, ...); for
    a wrapper (``lookahead``, ``sam``, ``mechanize``) also ``inner`` / ``base_optimizer``
    and the inner optimizer's keys (the wrapper's own win a clash: Mechanize's ``eps``). ``run_keys``: the schedule
    and warm-up settings are accepted too (``mithril compare``'s configs); ``special``: extra
    keys and their parsers (``scheduler``); ``flag``: the flag the spec came from (an unknown
    name is then argparse's "invalid choice"). A bare key sets a boolean. An unknown key or a
    bad value is a :class:`CLIError` naming it and the keys the optimizer takes."""
    head, _, rest = text.partition(":")
    name = resolve_name(head, flag=flag)
    where = f"optimizer {text!r}"
    items = []
    for item in _split_items(rest):
        key, eq, raw = item.partition("=")
        items.append((key.strip().lower().replace("-", "_"), eq, raw.strip()))
    keys = [ALIASES.get(k, k) if k not in SETTINGS[name] else k for k, _, _ in items]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # (the last would win silently)
        raise CLIError(f"{where}: {', '.join(twice)} given more than once")
    inner = None
    if name in WRAPPERS:
        wk = WRAPPERS[name]
        for key, _eq, raw in items:
            if key == wk:
                inner = SETTINGS[name][wk].parse(raw, where)
                if inner is None:
                    raise CLIError(f"{where}: {wk}=none: {name} needs an optimizer to wrap "
                                   f"(default: {DEFAULT_INNER})")
        if inner in WRAPPERS or inner in REFUSED or inner in PER_EXAMPLE:
            raise CLIError(f"{where}: {wk}={inner} cannot be {name}'s inner optimizer")
    own = {**(SETTINGS[inner or DEFAULT_INNER] if name in WRAPPERS else {}), **SETTINGS[name]}
    values: dict[str, Any] = {}
    for key, eq, raw in items:
        if special and key in special:
            values[key] = special[key](raw)
            continue
        if key not in own:
            key = ALIASES.get(key, key)
        if key in own:
            setting = own[key]
            if not eq and not ("bool" in setting.annotation
                               or isinstance(setting.default, bool)):
                raise CLIError(f"{where}: {key} needs a value ({key}=...)")
            values[key] = setting.parse(raw, where)
            continue
        allowed = COMMON_OPTIONS + (SCHEDULER_OPTIONS + WARMUP_OPTIONS if run_keys else [])
        opt = next((o for o in allowed if o.name == key), None)
        if opt is None:
            raise CLIError(f"{where}: unknown setting {key!r}; {name} takes "
                           f"{keys_text(name, inner)}")
        if not eq and opt.kind != "bool":
            raise CLIError(f"{where}: {key} needs a value ({key}=...)")
        values[key] = opt.parse(raw, where)
    return name, values


def optimizer_keys(name: str, settings: Mapping[str, Any]) -> list[str]:
    """The keys of ``settings`` that set optimizer ``name``'s hyperparameters (for labels)."""
    inner = inner_name(name, settings)
    own = {**(SETTINGS[inner] if inner else {}), **SETTINGS[name]}
    return [k for k in own if k != WRAPPERS.get(name)] + [o.name for o in COMMON_OPTIONS]


def typed(key: str, spec: Collection[str]) -> str:
    """How the user gave the setting ``key``: its flag, or the key of a spec (``spec``: the
    keys given in one; ``mithril cache warm`` and ``compare --configs`` have no such flags)."""
    return OPTIONS[key].flag if key in OPTIONS and key not in spec else key


def _kwargs(name: str, settings: Mapping[str, Any], extra: Mapping[str, Any],
            flags: bool, spec: Collection[str] = ()) -> dict[str, Any]:
    """Constructor arguments of ``name`` from ``settings`` (flags that do not apply: an
    error) and ``extra``."""
    own = SETTINGS[name]
    kwargs: dict[str, Any] = {}
    if "lr" in own:
        kwargs["learning_rate"] = DEFAULT_LR.get(name, own["lr"].default)
    kwargs.update(extra)
    for opt in OPTIMIZER_OPTIONS:  # the flags: each must apply
        if flags and settings.get(opt.name) is not None and opt.name not in own:
            # the original five list their flags in their table's order
            order = list(OPTIMIZERS[name].args) if name in OPTIMIZERS else list(own)
            flagged = [k for k in order if k in OPTIONS]
            takes = ", ".join(OPTIONS[k].flag for k in flagged) or "no such flag"
            others = [k for k in own if k not in flagged]
            more = (f"; its other settings go in --optimizer {name}:KEY=VALUE,...: "
                    f"{', '.join(others)}") if others else ""
            raise CLIError(f"{opt.flag} does not apply to optimizer {name} (it takes "
                           f"{takes}{more})")
    # Muon's exclude_weight_decay and weight_decay do not reach its fallback (whose own
    # settings cover the parameters it updates: the biases), so --no-decay-on and
    # --weight-decay (which apply to every parameter) go to the fallback as well
    nested = {k: v for k, v in extra.items() if k == "exclude_weight_decay"}
    if "fallback" in own and settings.get("weight_decay") is not None:
        nested["weight_decay"] = settings["weight_decay"]
    for key, setting in own.items():
        if settings.get(key) is not None or (key in settings and key not in OPTIONS):
            value = settings[key]
            if setting.arg in ("fallback", "inner") and isinstance(value, str):
                value = _build(value, {}, nested, flags=False)
            kwargs[setting.arg] = value
        elif setting.arg == "fallback" and nested:
            # the default fallback (Muon's AdamW()), rebuilt with the exemption
            default = type(getattr(CATALOG[name](), "fallback", None)).__name__
            if cli_name(default) in CATALOG:
                kwargs[setting.arg] = _build(cli_name(default), {}, nested, flags=False)
    for key, needs in (("clip_eps", "clip_norm"), ("normalize_eps", "normalize_grad")):
        if settings.get(key) is not None and settings.get(needs) is None:  # (else: ignored)
            given = f"{key}={settings[key]:g}" if key in spec else \
                f"{OPTIONS[key].flag} {settings[key]:g}"
            raise CLIError(f"{typed(key, spec)} only applies with {typed(needs, spec)} (it "
                           f"is that rule's epsilon), got {given} without it")
    for opt in COMMON_OPTIONS:
        if settings.get(opt.name) is not None:
            kwargs[opt.name] = settings[opt.name]
    return kwargs


def _build(name: str, settings: Mapping[str, Any], extra: Mapping[str, Any],
           flags: bool = True, spec: Collection[str] = ()) -> Optimizer:
    if name in REFUSED:
        raise CLIError(f"optimizer {name} is not supported by mithril train/compare: "
                       f"{REFUSED[name]}")
    cls = CATALOG[name]
    common = [typed(o.name, spec) for o in COMMON_OPTIONS if settings.get(o.name) is not None]
    if name == "dpsgd" and common:  # (its SGD is built inside: it takes none of these)
        raise CLIError(f"{', '.join(common)} do{'es' * (len(common) == 1)} not apply to "
                       f"optimizer dpsgd: it clips each example's gradient to l2_norm_clip "
                       f"(--optimizer dpsgd:l2_norm_clip=1.0,noise_multiplier=1.1)")
    if name == "dpsgd" and extra:
        flags = {"ema_decay": "--ema", "ema_start": "--ema",  # (--ema-start goes with --ema)
                 "exclude_weight_decay": "--no-decay-on"}
        given = sorted({flags.get(k, k) for k in extra})
        raise CLIError(f"{' and '.join(given)} do{'es' * (len(given) == 1)} not apply "
                       f"to optimizer dpsgd (its SGD is its own); from Python, "
                       f"DifferentiallyPrivate(SGD(..., ema_decay=...)) takes them")
    if name in WRAPPERS:  # its own settings; the rest (and the flags) make the inner one
        wk = WRAPPERS[name]
        own = {k: v for k, v in settings.items() if k in SETTINGS[name] and k != wk}
        rest = {k: v for k, v in settings.items() if k not in own and k != wk}
        inner = _build(inner_name(name, settings) or DEFAULT_INNER, rest, extra, flags, spec)
        kwargs = {SETTINGS[name][k].arg: v for k, v in own.items()}
        return cls(inner, **kwargs)
    return cls(**_kwargs(name, settings, extra, flags, spec))


def build_optimizer(name: str, settings: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None,
                    spec: Collection[str] = ()) -> Optimizer:
    """The optimizer ``name`` (a catalog name) with the settings in ``settings`` (``None``
    values are unset; flags that do not apply to it are an error), its CLI default learning
    rate (:data:`DEFAULT_LR`) unless ``lr`` is set, and ``extra``: constructor arguments
    every optimizer takes (``ema_decay``, ``exclude_weight_decay``, ...), passed as they are.
    The constructor's ``ValueError``/``TypeError`` becomes a :class:`CLIError` naming the
    optimizer (and the flag, where the message names its argument; ``spec``: the keys given
    in a ``NAME:KEY=VALUE`` spec, which errors name as keys, not flags)."""
    name = resolve_name(name)
    try:
        return _build(name, settings, dict(extra or {}), spec=spec)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        inner = inner_name(name, settings)
        own = {**SETTINGS[name], **(SETTINGS[inner] if inner else {})}
        named = [s.key for s in own.values()
                 if msg.startswith((s.arg + " ", s.arg + "=", s.arg + "["))]
        hint = ""
        if named:
            key = named[0]
            hint = f" ({OPTIONS[key].flag})" if key in OPTIONS and key not in spec \
                else f" (key {key})"
        raise CLIError(f"invalid hyperparameter for {name}: {msg}{hint}") from None


def check_data_parallel(optimizer: Optimizer, shard_state: bool) -> None:
    """Whether :class:`~mithril.distributed.DataParallel` can wrap ``optimizer`` (closure
    optimizers such as sam cannot; with ``shard_state``, optimizers with optimizer-wide values
    such as prodigy or dog shard their state too, their sums all-reduced), as a
    :class:`CLIError` naming the flag, before any process starts."""
    import copy

    from ..distributed import DataParallel

    try:
        DataParallel(copy.copy(optimizer), shard_state=shard_state)
    except (NotImplementedError, ValueError) as exc:
        flag = "--shard-state" if shard_state else "--nprocs"
        raise CLIError(f"{flag}: {exc}") from None
