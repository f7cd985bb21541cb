"""The names of an optimizer's constructor arguments: the aliases it accepts (torch's and
optax's ``lr=`` / ``eps=``), and, for a name it does not take (another library's, a near
spelling, another optimizer's), the hint its ``TypeError`` / ``AttributeError`` gives.
:func:`_constructor` wraps every optimizer's ``__init__`` with both (and the parameter
groups' check once the outermost constructor is done)."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

#: names torch and optax users type, and ours (the guide's)
ALIASES = {"lr": "learning_rate", "eps": "epsilon"}


#: other libraries' names of hyperparameters (torch's, Keras')
_OTHER_NAMES = {**ALIASES, "betas": "beta1 and beta2", "beta_1": "beta1", "beta_2": "beta2",
                "beta_3": "beta3", "global_clipnorm": "clip_norm", "clipnorm": "clip_tensor_norm",
                "clipvalue": "clip_value", "use_ema": "ema_decay", "ema_momentum": "ema_decay",
                "k": "sync_period", "alpha": "slow_step_size",  # (a Lookahead's, torch-contrib)
                "memory_size": "history_size",  # (optax.lbfgs's)
                "b1": "beta1", "b2": "beta2", "b3": "beta3"}  # (optax's)
#: where ours of those is another rule than the peer's: what gives the peer's exactly
_EXACTLY = {"global_clipnorm": " Its default is torch's rule, min(1, c/(‖g‖ + 1e-6)): "
                               "Keras's and optax's exact c/max(‖g‖, c) is clip_norm=c, "
                               "clip_eps=0.0"}
#: other libraries' options that are a wrapper or a recipe here, not an argument
_RECIPES = {
    "gradient_accumulation_steps": "wrap the optimizer: mithril.utils.accumulation."
                                   "Accumulate(optimizer, k)",
    "loss_scale_factor": "a fixed loss scale: multiply the loss by it and divide the "
                         "gradients by it before update (mithril.utils.mixed_precision."
                         "LossScaler / MixedPrecisionTrainer: a dynamic one)",
    "ema_overwrite_frequency": "give ema_decay=, then every k steps set the params to "
                               "ema_params(state)",
    "mask": "optax's weight-decay mask= is weight_decay_mask= here (a pytree of bools, a "
            "function of the params, or name patterns)",
}

#: other libraries' constructor arguments with no counterpart here (the constructor's hint;
#: not an attribute's, which may be anything the caller's own)
_NO_COUNTERPART = {"name": "Keras's name=: an optimizer here has no name, drop it"}


@functools.cache
def _catalog_takes() -> dict[str, tuple[str, ...]]:
    """Each hyperparameter name some optimizer's constructor takes -> those optimizers."""
    takes: dict[str, list[str]] = {}
    from .base import Optimizer  # (the base imports this module)

    todo = list(Optimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("mithril."):
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    takes.setdefault(p.name, []).append(cls.__name__)
    return {k: tuple(sorted(set(v))) for k, v in takes.items()}


def _meant(opt: Any, name: str) -> str:
    """What a new attribute ``name`` of ``opt`` looks meant for: the hyperparameter(s) of
    ``opt`` (another library's name, a near spelling), or one of another optimizer of the
    catalog (``Adam().momentum``); "" for a name of its own (a subclass's cache)."""
    known = {"learning_rate", *opt.flat_hyperparameters()}  # (a Lookahead's inner's)
    return _meant_among(known, type(opt).__name__, name)


def _meant_among(known: set[str], who: str, name: str) -> str:
    import difflib

    if name in _RECIPES:
        return _RECIPES[name]
    other = _OTHER_NAMES.get(name, "")
    if other and all(k in known for k in other.split(" and ")):
        return f"did you mean {other}?{_EXACTLY.get(name, '')}"
    if near := " or ".join(difflib.get_close_matches(name, known, 2, cutoff=0.8)):
        return f"did you mean {near}?"
    if owners := _catalog_takes().get(name):
        more = f" and {len(owners) - 4} more" if len(owners) > 4 else ""
        return (f"{', '.join(owners[:4])}{more} take it; {who}'s are in "
                f"its hyperparameters()")
    return ""


def _takes(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes: its constructor's and, where that passes
    ``**options`` on, its bases'."""
    out, todo = set(), [cls]
    while todo:
        c = todo.pop()
        params = list(inspect.signature(c.__init__).parameters.values())[1:]
        out |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if any(p.kind is p.VAR_KEYWORD for p in params):
            todo += [b for b in c.__bases__ if b is not object]
    return out


def _constructor(init: Callable) -> Callable:
    """``init`` accepting ``lr=`` / ``eps=`` for ``learning_rate`` / ``epsilon`` where it
    takes those (the signature shown stays ours), and checking the parameter groups once
    the outermost constructor is done (they may override any hyperparameter it sets)."""
    takes = set(inspect.signature(init).parameters)
    aliases = {a: n for a, n in ALIASES.items() if n in takes and a not in takes}

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kw: Any) -> None:
        for alias, name in aliases.items():
            if alias in kw:
                if name in kw:
                    raise TypeError(f"{type(self).__name__}: give {name}= or {alias}=, not both")
                kw[name] = kw.pop(alias)
        depth = self.__dict__.get("_depth", 0)
        self.__dict__["_depth"] = depth + 1
        try:
            init(self, *args, **kw)
        except TypeError as e:  # another library's name (clipnorm=, betas=): say ours
            bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if depth or bad is None or bad.group(1) not in kw:
                raise
            cls = type(self)
            hint = _NO_COUNTERPART.get(bad.group(1)) or _meant_among(
                _takes(cls), cls.__name__, bad.group(1))
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument "
                            f"'{bad.group(1)}'" + (f" ({hint})" if hint else "")) from None
        finally:
            self.__dict__["_depth"] = depth
        if depth == 0:
            del self.__dict__["_depth"]
            self._finish_groups()

    return wrapper
