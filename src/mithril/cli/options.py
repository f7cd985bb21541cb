"""Every tunable the commands share: optimizer hyperparameters, scheduler settings, warm-up.

One registry (:data:`OPTIONS`) drives three things, so they cannot drift apart:

* the argparse flags (``--weight-decay`` for the option ``weight_decay``);
* the ``name:key=value,...`` specs of ``--scheduler`` and ``mithril compare --configs``;
* which optimizer or scheduler each setting applies to (giving ``--beta1`` to SGD is an
  error, not a silently ignored flag).

The objects built here are the library's own: :mod:`mithril.utils.optimizers` and
:mod:`mithril.utils.lr_schedulers`; their ``ValueError`` messages are passed on as they are.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..utils import lr_schedulers as lrs
from ..utils.optimizers import SGD, AdaGrad, Adam, AdamW, Optimizer, RMSProp
from .argtypes import MAX_INT, bounded_int, finite_float
from .errors import CLIError

#: every integer setting (step counts, patience, milestones, ...) is in [0, 1e9]
OPTION_INT = bounded_int(0, MAX_INT)


@dataclass(frozen=True)
class Option:
    """One setting: its config key, value kind and help text."""

    name: str
    kind: str  # "float" | "int" | "bool" | "ints" | "choice"
    help: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str, where: str) -> Any:
        """The value of ``text`` (from a ``key=value`` spec; ``none`` unsets an option of
        :data:`OFF_OPTIONS`, e.g. charlm's default ``clip_norm``)."""
        if self.name in OFF_OPTIONS and text.strip().lower() == "none":
            return None
        try:
            if self.kind == "float":
                float(text)  # not a number: the ValueError below
                return finite_float(text)
            if self.kind == "int":
                int(text)
                return OPTION_INT(text)
            if self.kind == "bool":
                low = text.strip().lower()
                if low in ("", "1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.kind == "ints":
                items = text.strip().strip("[]").replace("/", ",").split(",")
                values = [int(x) for x in items if x.strip()]  # ValueError: not integers
                return [OPTION_INT(str(v)) for v in values]
        except ValueError:
            raise CLIError(f"{where}: {self.name}={text!r} is not a valid {self.kind_text}") from None
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"{where}: {self.name}={text!r}: {exc}") from None
        if text not in self.choices:
            raise CLIError(f"{where}: {self.name}={text!r}; choose from {', '.join(self.choices)}")
        return text

    @property
    def kind_text(self) -> str:
        return {"float": "number", "int": "integer", "bool": "boolean (true/false)",
                "ints": "list of integers such as [100,200]"}.get(self.kind, self.kind)


def _opt(name: str, kind: str, help: str, **kw: Any) -> Option:
    return Option(name, kind, help, **kw)


#: optimizer hyperparameters (keys of the optimizer specs and flags of ``mithril train``)
OPTIMIZER_OPTIONS = [
    _opt("lr", "float", "learning rate (default: 1e-3 for adam/adamw/rmsprop, 0.05 for sgd "
         "and adagrad; the others: see docs/cli-train.md)", metavar="LR"),
    _opt("momentum", "float", "momentum μ (sgd, rmsprop: default 0; also lars, muon, "
         "sign-sgd, signum)", metavar="MU"),
    _opt("nesterov", "bool", "Nesterov momentum (sgd; needs --momentum > 0)"),
    _opt("dampening", "float", "momentum dampening τ (sgd; default 0)", metavar="TAU"),
    _opt("beta1", "float", "first-moment decay β₁ (adam, adamw: default 0.9; and the other "
         "optimizers with a beta1)", metavar="B1"),
    _opt("beta2", "float", "second-moment decay β₂ (adam, adamw: default 0.999; and the other "
         "optimizers with a beta2)", metavar="B2"),
    _opt("amsgrad", "bool", "AMSGrad variant (adam, adamw)"),
    _opt("decay", "float", "squared-gradient decay α (rmsprop; default 0.9)", metavar="ALPHA"),
    _opt("centered", "bool", "centered RMSProp (rmsprop)"),
    _opt("lr_decay", "float", "learning-rate decay per step (adagrad; default 0)", metavar="D"),
    _opt("eps", "float", "ε added to the denominator (adam, adamw, rmsprop, adagrad: "
         "default 1e-8; and the other optimizers with an epsilon)", metavar="EPS"),
    _opt("weight_decay", "float", "weight decay: coupled L2 (g ← g + wd·p), decoupled for "
         "adamw (default 0; adamw 1e-2)", metavar="WD"),
]

#: options every optimizer takes (fused into its update)
COMMON_OPTIONS = [
    _opt("clip_norm", "float", "clip the global gradient norm to this value (torch "
         "clip_grad_norm_ convention); none: no clipping (charlm's default is 1)",
         metavar="N"),
    _opt("clip_eps", "float", "the global-norm clip's floor: scale min(1, N/(norm + E)); "
         "default 1e-6 as torch, 0 as optax's clip_by_global_norm and Keras's "
         "global_clipnorm", metavar="E"),
    _opt("clip_value", "float", "clamp every gradient element to ±this value", metavar="V"),
    _opt("centralize", "bool", "gradient centralization, before any clipping: each gradient "
         "of 2+ axes less its mean over all axes but the first (optax centralize)"),
    _opt("normalize_grad", "float", "scale the gradients to this global norm, g·S/(norm + "
         "--normalize-eps), after --centralize and before clipping (optax "
         "normalize_by_update_norm; contrib.normalize: 1 with --normalize-eps 0)", metavar="S"),
    _opt("normalize_eps", "float", "--normalize-grad's ε (default 1e-6)", metavar="E"),
    _opt("nonfinite", "choice", "what to do with an inf/NaN gradient (default: propagate, "
         "with a warning; skip: skip the step; raise: stop; unchecked: apply it unread, as "
         "torch.optim)", choices=("skip", "raise", "propagate", "unchecked")),
]

#: scheduler settings (lengths are in optimizer steps, i.e. batches; plateau counts epochs)
SCHEDULER_OPTIONS = [
    _opt("step_size", "int", "step: decay every this many steps (default: a third of the run)",
         metavar="N"),
    _opt("gamma", "float", "step/multistep/exponential: decay factor (default 0.1; exponential: "
         "reaches 1%% of the lr at the end)", metavar="G"),
    _opt("milestones", "ints", "multistep: steps at which to decay (default: 50%% and 75%% of "
         "the run)", metavar="STEP"),
    _opt("t_max", "float", "cosine: half-period in steps (default: the whole run)", metavar="T"),
    _opt("eta_min", "float", "cosine, cosine-restarts: lowest lr (default 0)", metavar="LR"),
    _opt("t_0", "int", "cosine-restarts: length of the first cycle (default: a quarter of the "
         "run)", metavar="T"),
    _opt("t_mult", "int", "cosine-restarts: cycle-length multiplier (default 1)", metavar="K"),
    _opt("max_lr", "float", "onecycle: peak lr (default: --lr)", metavar="LR"),
    _opt("pct_start", "float", "onecycle: fraction of the run spent warming up (default 0.3)",
         metavar="P"),
    _opt("anneal_strategy", "choice", "onecycle: annealing shape (default cos)",
         choices=("cos", "linear")),
    _opt("div_factor", "float", "onecycle: initial lr = max_lr / this (default 25)", metavar="D"),
    _opt("final_div_factor", "float", "onecycle: final lr = initial lr / this (default 1e4)",
         metavar="D"),
    _opt("three_phase", "bool", "onecycle: symmetric three-phase variant"),
    _opt("factor", "float", "plateau: multiply the lr by this on a plateau (default 0.5)",
         metavar="F"),
    _opt("patience", "int", "plateau: epochs without improvement before decaying (default 2)",
         metavar="N"),
    _opt("threshold", "float", "plateau: relative improvement that counts (default 1e-4)",
         metavar="T"),
    _opt("cooldown", "int", "plateau: epochs to wait after a decay (default 0)", metavar="N"),
    _opt("min_lr", "float", "plateau: lowest lr (default 0)", metavar="LR"),
    # optax's / Keras's decays (their argument names) and warmup-stable-decay
    _opt("transition_steps", "float", "exponential-decay: steps per factor --decay-rate; "
         "polynomial-decay: length of the decay (default: the run, after --transition-begin)",
         metavar="T"),
    _opt("decay_rate", "float", "exponential-decay: factor per --transition-steps (default "
         "0.01: 1%% of the lr at the end; > 1 grows); inverse-time-decay: r of "
         "lr / (1 + r·t/T) (default 1)", metavar="R"),
    _opt("transition_begin", "int", "exponential-decay, polynomial-decay: steps at the base "
         "lr before the decay starts (default 0)", metavar="N"),
    _opt("staircase", "bool", "exponential-decay, inverse-time-decay: decay in whole steps of "
         "--transition-steps / --decay-steps"),
    _opt("end_value", "float", "exponential-decay: a floor (a ceiling when --decay-rate > 1; "
         "default none); polynomial-decay: the lr at the end of the decay (default 0)",
         metavar="LR"),
    _opt("power", "float", "polynomial-decay: power of (1 - t/T) (default 1: linear)",
         metavar="P"),
    _opt("cycle", "bool", "polynomial-decay: restart the decay after every --transition-steps, "
         "each time stretched to the next multiple (Keras's cycle)"),
    _opt("decay_steps", "float", "inverse-time-decay: T of lr / (1 + r·t/T) (default: a tenth "
         "of the run); wsd: length of the final decay (default: the last 20%% of the run, or "
         "what --stable-steps leaves)", metavar="T"),
    _opt("stable_steps", "int", "wsd: steps at the base lr before the decay (default: the run "
         "minus --decay-steps; its warm-up is --warmup-steps)", metavar="N"),
    _opt("final_lr", "float", "wsd: lr at the end of the decay and after (default 0)",
         metavar="LR"),
    _opt("decay_type", "choice", "wsd: shape of the decay (default linear)",
         choices=("linear", "cosine", "1-sqrt")),
    _opt("exponent", "float", "wsd: power of the decay's shape (default 1)", metavar="P"),
]

WARMUP_OPTIONS = [
    _opt("warmup_steps", "int", "linear warm-up over this many steps before the schedule "
         "(default 0)", metavar="N"),
    _opt("warmup_start_lr", "float", "lr at the first warm-up step (default 0)", metavar="LR"),
    _opt("switch_at", "ints", "with several --scheduler names: the steps at which the next one "
         "takes over (a sequence)", metavar="STEP"),
]

OPTIONS: dict[str, Option] = {o.name: o for o in
                              OPTIMIZER_OPTIONS + COMMON_OPTIONS + SCHEDULER_OPTIONS + WARMUP_OPTIONS}
ALIASES = {"learning_rate": "lr", "epsilon": "eps", "wd": "weight_decay", "alpha": "decay",
           "rho": "decay", "t0": "t_0", "tmax": "t_max"}


# -- optimizers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerKind:
    cls: type[Optimizer]
    default_lr: float
    #: CLI option -> constructor argument (the flags' order in error messages; the settings
    #: themselves come from the constructor's signature, see :mod:`.optimizer_catalog`)
    args: Mapping[str, str]


_ADAM_ARGS = {"lr": "learning_rate", "beta1": "beta1", "beta2": "beta2", "eps": "epsilon",
              "weight_decay": "weight_decay", "amsgrad": "amsgrad"}
OPTIMIZERS: dict[str, OptimizerKind] = {
    "adam": OptimizerKind(Adam, 1e-3, _ADAM_ARGS),
    "adamw": OptimizerKind(AdamW, 1e-3, _ADAM_ARGS),
    "sgd": OptimizerKind(SGD, 0.05, {"lr": "learning_rate", "momentum": "momentum",
                                     "nesterov": "nesterov", "dampening": "dampening",
                                     "weight_decay": "weight_decay"}),
    "rmsprop": OptimizerKind(RMSProp, 1e-3, {"lr": "learning_rate", "decay": "decay",
                                             "eps": "epsilon", "momentum": "momentum",
                                             "centered": "centered",
                                             "weight_decay": "weight_decay"}),
    "adagrad": OptimizerKind(AdaGrad, 0.05, {"lr": "learning_rate", "eps": "epsilon",
                                             "lr_decay": "lr_decay",
                                             "weight_decay": "weight_decay"}),
}


def check_name(kind: str, name: str, table: Iterable[str]) -> str:
    if name not in table:
        raise CLIError(f"unknown {kind} {name!r}; choose from {', '.join(table)}")
    return name


def build_optimizer(name: str, settings: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None) -> Optimizer:
    """The optimizer ``name`` of the whole catalog with ``settings``: see
    :func:`.optimizer_catalog.build_optimizer` (the five above keep their flags, order and
    default learning rates there)."""
    from .optimizer_catalog import build_optimizer as build  # (it imports this module)

    return build(name, settings, extra)


# -- schedulers ----------------------------------------------------------------------------
Builder = Callable[[Any, Mapping[str, Any], int, float], lrs.LRScheduler]


def _multistep_default(n: int) -> list[int]:
    first = max(1, n // 2)
    return [first, max(first + 1, (3 * n) // 4)]


def _t_max(p: Mapping[str, Any], n: int) -> float | int:
    return _count(p.get("t_max", n))


def _count(t: Any) -> Any:
    """A step count given as a number: an ``int`` where it is a whole one (else as it is, for
    the scheduler to accept or refuse)."""
    return int(t) if isinstance(t, float) and t.is_integer() else t


def _decay_length(p: Mapping[str, Any], n: int) -> Any:
    """``--transition-steps``, by default the run after ``--transition-begin``."""
    return _count(p.get("transition_steps", max(1, n - p.get("transition_begin", 0))))


def _wsd(o: Any, p: Mapping[str, Any], n: int) -> lrs.WSD:
    """Stable then decay over the ``n`` steps (the warm-up is ``--warmup-steps``'): the decay
    the last 20%, or what the one given leaves of the run."""
    decay, stable = _count(p.get("decay_steps")), p.get("stable_steps")
    if decay is None:
        decay = n // 5 if stable is None else max(n - stable, 0)
    if stable is None:
        stable = max(n - decay, 0) if isinstance(decay, int) else 0
    return lrs.WSD(o, 0, stable, decay, 0.0, p.get("final_lr", 0.0),
                   p.get("decay_type", "linear"), p.get("exponent", 1.0))


SCHEDULERS: dict[str, tuple[tuple[str, ...], Builder]] = {
    # name: (options it takes, builder(optimizer, settings, length in steps, base lr))
    "none": ((), lambda o, p, n, lr: lrs.ExponentialLR(o, gamma=1.0)),
    "step": (("step_size", "gamma"), lambda o, p, n, lr: lrs.StepLR(
        o, step_size=p.get("step_size", max(1, n // 3)), gamma=p.get("gamma", 0.1))),
    "multistep": (("milestones", "gamma"), lambda o, p, n, lr: lrs.MultiStepLR(
        o, milestones=p.get("milestones") or _multistep_default(n), gamma=p.get("gamma", 0.1))),
    "exponential": (("gamma",), lambda o, p, n, lr: lrs.ExponentialLR(
        o, gamma=p.get("gamma", 0.01 ** (1 / max(1, n))))),
    "cosine": (("t_max", "eta_min"), lambda o, p, n, lr: lrs.CosineAnnealingLR(
        o, T_max=_t_max(p, n), eta_min=p.get("eta_min", 0.0))),
    "cosine-restarts": (("t_0", "t_mult", "eta_min"), lambda o, p, n, lr:
                        lrs.CosineAnnealingWarmRestarts(o, T_0=p.get("t_0", max(1, n // 4)),
                                                        T_mult=p.get("t_mult", 1),
                                                        eta_min=p.get("eta_min", 0.0))),
    "onecycle": (("max_lr", "pct_start", "anneal_strategy", "div_factor", "final_div_factor",
                  "three_phase"), lambda o, p, n, lr: lrs.OneCycleLR(
        o, max_lr=p.get("max_lr", lr), total_steps=n, pct_start=p.get("pct_start", 0.3),
        anneal_strategy=p.get("anneal_strategy", "cos"), div_factor=p.get("div_factor", 25.0),
        final_div_factor=p.get("final_div_factor", 1e4),
        three_phase=p.get("three_phase", False), cycle_momentum=p.get("cycle_momentum", False),
        base_momentum=p.get("base_momentum", 0.85), max_momentum=p.get("max_momentum", 0.95))),
    "plateau": (("factor", "patience", "threshold", "cooldown", "min_lr"),
                lambda o, p, n, lr: lrs.ReduceLROnPlateau(
        o, mode="min", factor=p.get("factor", 0.5), patience=p.get("patience", 2),
        threshold=p.get("threshold", 1e-4), cooldown=p.get("cooldown", 0),
        min_lr=p.get("min_lr", 0.0))),
}
SCHEDULERS.update({
    "exponential-decay": (("transition_steps", "decay_rate", "transition_begin", "staircase",
                           "end_value"), lambda o, p, n, lr: lrs.ExponentialDecay(
        o, _decay_length(p, n), p.get("decay_rate", 0.01), p.get("transition_begin", 0),
        p.get("staircase", False), p.get("end_value"))),
    "polynomial-decay": (("transition_steps", "end_value", "power", "transition_begin",
                          "cycle"), lambda o, p, n, lr: lrs.PolynomialDecay(
        o, _decay_length(p, n), p.get("end_value", 0.0), p.get("power", 1.0),
        p.get("transition_begin", 0), p.get("cycle", False))),
    "inverse-time-decay": (("decay_steps", "decay_rate", "staircase"),
                           lambda o, p, n, lr: lrs.InverseTimeDecay(
        o, _count(p.get("decay_steps", max(1, n // 10))), p.get("decay_rate", 1.0),
        p.get("staircase", False))),
    "wsd": (("stable_steps", "decay_steps", "final_lr", "decay_type", "exponent"),
            lambda o, p, n, lr: _wsd(o, p, n)),
})
SCHEDULER_NAMES = tuple(SCHEDULERS)


def parse_spec(text: str, what: str, names: Sequence[str],
               special: Mapping[str, Callable[[str], Any]] | None = None
               ) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> ``(name, {option: value})``.

    Keys are option names (``weight_decay``, ``weight-decay`` and a few aliases such as
    ``learning_rate``); a bare key sets a boolean option; list values are written
    ``[100,200]`` or ``100/200``. ``special`` maps extra keys to their parsers.
    """
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    check_name(what, name, names)
    values: dict[str, Any] = {}
    for item in _split_items(rest):
        key, eq, raw = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        key = ALIASES.get(key, key)
        where = f"{what} {text!r}"
        if key in values:  # (the last would win silently)
            raise CLIError(f"{where}: {key} given more than once")
        if special and key in special:
            values[key] = special[key](raw.strip())
            continue
        if key not in OPTIONS:
            raise CLIError(f"{where}: unknown setting {key!r}")
        opt = OPTIONS[key]
        if not eq and opt.kind != "bool":
            raise CLIError(f"{where}: {key} needs a value ({key}=...)")
        values[key] = opt.parse(raw.strip(), where)
    return name, values


def _split_items(text: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i for i in (s.strip() for s in items) if i]


class Schedule:
    """The learning-rate schedule of a run, driven by the training loop.

    ``after_step()`` follows every optimizer update and ``after_epoch(loss)`` every epoch
    (only ``plateau`` listens to it, with the epoch's mean training loss). After the last of
    ``total_steps`` updates the schedule is not advanced: no step uses that rate, and one-cycle
    would extrapolate past its end (to a negative rate with linear annealing).
    """

    def __init__(self, per_step: lrs.LRScheduler | None, plateau: lrs.ReduceLROnPlateau | None,
                 warmup_steps: int, total_steps: int, description: str) -> None:
        self.per_step, self.plateau = per_step, plateau
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.description = description
        self.steps = 0

    def after_step(self) -> None:
        self.steps += 1
        if self.per_step is None or self.steps >= self.total_steps:
            return
        if self.plateau is None or self.steps <= self.warmup_steps:
            self.per_step.step()

    def after_epoch(self, train_loss: float) -> None:
        if self.plateau is not None and self.steps >= self.warmup_steps:
            self.plateau.step(train_loss)


#: the schedulers that can cycle the momentum (``--momentum-cycle``)
MOMENTUM_CYCLING = ("onecycle",)


def build_schedule(optimizer: Any, specs: Sequence[tuple[str, Mapping[str, Any]]],
                   settings: Mapping[str, Any], total_steps: int,
                   momentum_cycle: tuple[float, float] | None = None) -> Schedule:
    """The schedule for ``specs`` (one ``(name, own settings)`` per scheduler: several make a
    sequence switching at ``switch_at``) over ``total_steps``, with the warm-up and
    scheduler options in ``settings`` applying to every scheduler that takes them.
    ``momentum_cycle``: ``(base, max)`` momentum of a one-cycle scheduler that cycles the
    optimizer's momentum (or beta1) too (``--momentum-cycle``)."""
    lr = optimizer.get_learning_rate()
    warmup = settings.get("warmup_steps") or 0
    if warmup < 0:
        raise CLIError(f"--warmup-steps must be >= 0, got {warmup}")
    if warmup and warmup >= total_steps:
        raise CLIError(f"--warmup-steps ({warmup}) must be smaller than the number of training "
                       f"steps ({total_steps})")
    if not warmup and settings.get("warmup_start_lr") is not None:  # (else: ignored)
        raise CLIError(f"--warmup-start-lr only applies with a warm-up (--warmup-steps N > 0), "
                       f"got --warmup-start-lr {settings['warmup_start_lr']:g} and no warm-up")
    specs = list(specs) or [("none", {})]
    names = [n for n, _ in specs]
    for n in names:
        check_name("scheduler", n, SCHEDULERS)
    # flags given for the whole run must apply to at least one scheduler of it
    for opt in SCHEDULER_OPTIONS:
        if settings.get(opt.name) is not None and not any(opt.name in SCHEDULERS[n][0]
                                                          for n in names):
            raise CLIError(f"{opt.flag} does not apply to --scheduler {' '.join(names)}"
                           + _takes(names))
    for n, own in specs:
        for key in own:
            if key not in SCHEDULERS[n][0]:
                raise CLIError(f"{key} is not a setting of scheduler {n}" + _takes([n]))
    if momentum_cycle is not None and not any(n in MOMENTUM_CYCLING for n in names):
        raise CLIError(f"--momentum-cycle needs --scheduler onecycle (momentum cycling is part "
                       f"of the one-cycle policy; without --scheduler it is chosen for you), "
                       f"got --scheduler {' '.join(names)}")
    length = total_steps - warmup
    switch_at = list(settings.get("switch_at") or [])
    if len(specs) > 1 and "plateau" in names:
        raise CLIError("plateau follows the epoch loss and cannot be part of a scheduler "
                       "sequence; use it alone (with --warmup-steps if you like)")
    if len(switch_at) != len(specs) - 1:
        raise CLIError(f"{len(specs)} schedulers need {len(specs) - 1} --switch-at step(s), "
                       f"got {len(switch_at)}")
    rel = [s - warmup for s in switch_at]
    bounds = [0, *rel, length]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise CLIError(f"--switch-at {' '.join(map(str, switch_at))} must be increasing steps "
                       f"after the warm-up ({warmup}) and before the end ({total_steps})")

    def make(i: int) -> lrs.LRScheduler:
        name, own = specs[i]
        applies = {k: settings[k] for k in SCHEDULERS[name][0] if settings.get(k) is not None}
        applies.update({k: v for k, v in own.items() if k in SCHEDULERS[name][0]})
        if momentum_cycle is not None and name in MOMENTUM_CYCLING:
            applies.update(cycle_momentum=True, base_momentum=momentum_cycle[0],
                           max_momentum=momentum_cycle[1])
        optimizer.set_learning_rate(lr)
        try:
            return SCHEDULERS[name][1](optimizer, applies, bounds[i + 1] - bounds[i], lr)
        except (ValueError, TypeError) as exc:
            msg = str(exc)  # the scheduler's message names its argument: name the flag too
            flags = [OPTIONS[k].flag for k in SCHEDULERS[name][0]  # (torch's T_max, T_0)
                     if msg.lower().startswith(k + " ")]
            hint = f" ({flags[0]})" if flags else ""
            raise CLIError(f"invalid setting for scheduler {name}: {msg}{hint}") from None

    children = [make(i) for i in range(len(specs))]  # each sets the lr of its step 0
    plateau = children[0] if names == ["plateau"] else None
    if names == ["none"] or plateau is not None:
        main = None
        optimizer.set_learning_rate(lr)
    elif len(children) == 1:
        main = children[0]
    else:
        main = lrs.SequentialLR(optimizer, children, rel)
    per_step = main
    if warmup:
        start = settings.get("warmup_start_lr")
        try:
            per_step = lrs.LinearWarmupScheduler(optimizer, warmup, 0.0 if start is None else start,
                                                 lr, after_scheduler=main)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"invalid warm-up (--warmup-steps {warmup} from --warmup-start-lr "
                           f"{start or 0.0:g}): {exc}") from None
    if per_step is not None and plateau is None:
        _check_rates(per_step, total_steps)
    desc = " → ".join(names) if len(names) > 1 else names[0]
    if warmup:
        desc = f"warm-up {warmup} steps → {desc}"
    return Schedule(per_step, plateau, warmup, total_steps, desc)


def _check_rates(scheduler: lrs.LRScheduler, total_steps: int) -> None:
    """Every step's rate must be a valid learning rate (closed forms: checked up front rather
    than failing in the middle of training)."""
    for t in range(total_steps):
        try:
            lr = scheduler.get_lr_at(t)
        except OverflowError:
            lr = math.inf
        except ValueError as exc:
            raise CLIError(f"the schedule has no valid learning rate at step {t}: {exc}") from None
        if not (math.isfinite(lr) and lr >= 0):
            raise CLIError(f"the schedule gives learning rate {lr} at step {t}; check its settings")


def _takes(names: Sequence[str]) -> str:
    parts = []
    for n in dict.fromkeys(names):
        keys = SCHEDULERS[n][0]
        parts.append(f"{n} takes " + (", ".join(OPTIONS[k].flag for k in keys) if keys
                                      else "no settings"))
    return " (" + "; ".join(parts) + ")"


# -- argparse --------------------------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, title: str, options: Sequence[Option]) -> None:
    """Add ``options`` as flags (default ``None`` = not given) in a group called ``title``."""
    group = parser.add_argument_group(title)
    for o in options:
        if o.kind == "bool":
            group.add_argument(o.flag, dest=o.name, action="store_true", default=None, help=o.help)
        elif o.kind == "ints":
            group.add_argument(o.flag, dest=o.name, type=OPTION_INT, nargs="+", metavar=o.metavar,
                               help=o.help)
        elif o.kind == "choice":
            group.add_argument(o.flag, dest=o.name, choices=o.choices, help=o.help)
        elif o.name in OFF_OPTIONS:
            group.add_argument(o.flag, dest=o.name, type=float_or_off, metavar=o.metavar,
                               help=o.help)
        else:
            group.add_argument(o.flag, dest=o.name,
                               type=finite_float if o.kind == "float" else OPTION_INT,
                               metavar=o.metavar, help=o.help)


#: options whose flag takes ``none`` (a job's default turned off: charlm's --clip-norm 1)
OFF_OPTIONS = frozenset({"clip_norm"})


def float_or_off(text: str) -> float | str:
    """A finite number, or ``none`` (kept as the string ``"none"``: set, so a job's default
    does not replace it, and left out of the settings)."""
    if text.strip().lower() == "none":
        return "none"
    return finite_float(text)


def settings_from(ns: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """The options given on the command line (unset ones, and ``none``, are left out)."""
    return {o.name: getattr(ns, o.name) for o in options
            if getattr(ns, o.name, None) not in (None, "none")}
