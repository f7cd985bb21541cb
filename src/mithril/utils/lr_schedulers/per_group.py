"""Acting on several values at once: :func:`_apply` (all or nothing), and the constructor
wrapper every scheduler class gets (:func:`_per_group_constructor`), which builds one lane per
parameter group (``per_group=True`` or lists, as torch; see :class:`~.base.LRScheduler`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..optimizers.checks import describe
from . import lanes as lanes_mod
from . import start as start_mod

if TYPE_CHECKING:
    from .base import LRScheduler


def wrapper_hint(optimizer: Any) -> str:
    """The hint for a wrapper of a mithril optimizer given where the optimizer is meant
    (``torch_optimizer``'s, ``mlx_optimizer``'s), else ``""``."""
    if not hasattr(optimizer, "mithril_optimizer"):
        return ""
    return (f" (a {type(optimizer).__name__} wraps a mithril optimizer: pass its "
            f".mithril_optimizer, whose rate the wrapper follows)")


def _hyperparameter_owner(optimizer: Any) -> Any:
    """The mithril optimizer whose hyperparameters a scheduler on ``optimizer`` reaches:
    ``optimizer`` itself, or, for a wrapper that forwards its learning rate to a wrapped
    ``.optimizer`` without handing out hyperparameters itself (``Accumulate``), the wrapped
    one (its momentum cycled, its groups' lanes, as its rate is)."""
    if callable(getattr(optimizer, "hyperparameter", None)):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and callable(getattr(inner, "hyperparameter", None)) \
            and callable(getattr(inner, "get_learning_rate", None)):
        return inner
    return optimizer


def _apply(targets: Sequence[tuple[Any, float]]) -> None:
    """Set each ``(settable, value)`` in order, all or nothing: if one is refused, every one
    already set is put back (in the same order, which restores a group's learning rate after
    the optimizer's, whose change moves it) and the error propagates."""
    old = [(h, h.get_learning_rate()) for h, _ in targets]
    done = 0
    try:
        for h, value in targets:
            h.set_learning_rate(value)
            done += 1
    except Exception:
        for h, value in old[: done + 1]:
            try:
                h.set_learning_rate(value)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise


def _group_lanes(owner: str, optimizer: Any) -> list[Any]:
    """What each lane of a per-group scheduler drives: ``optimizer`` itself (the parameters
    in no group), then the same hyperparameter of ``param_groups[0]``, ``[1]``, ..."""
    from ..optimizers.groups import Hyperparameter

    if isinstance(optimizer, Hyperparameter):
        if optimizer.group is not None:
            raise ValueError(f"{owner}: per_group needs the optimizer, or a handle on one of its "
                             f"own hyperparameters (group=None), got {optimizer!r}")
        opt, name = optimizer.optimizer, optimizer.name
    else:
        opt, name = _hyperparameter_owner(optimizer), "learning_rate"
    if not callable(getattr(opt, "hyperparameter", None)) or not hasattr(opt, "param_groups"):
        raise TypeError(f"{owner}: per_group needs a mithril optimizer (with param_groups), got "
                        f"{type(opt).__name__}{wrapper_hint(opt)}")
    return [optimizer, *(opt.hyperparameter(name, group=i) for i in range(len(opt.param_groups)))]


def _snapshot(optimizer: Any) -> Callable[[], None]:
    """A function putting the hyperparameters of ``optimizer`` (the owner of a handle) and of
    its groups back as they are now."""
    opt = getattr(optimizer, "optimizer", optimizer)
    own = {k: v for k, v in vars(opt).items() if not k.startswith("_")} \
        if hasattr(opt, "__dict__") else {}
    groups = getattr(opt, "_groups", None)
    saved = [dict(g) for g in groups] if isinstance(groups, list) else None

    def restore() -> None:
        opt.__dict__.update(own)
        if saved is not None and opt._groups is groups:
            for g, before in zip(groups, saved, strict=True):
                g._restore(before)
            opt._groups_version += 1

    return restore


def _per_group_constructor(init: Callable) -> Callable:
    """``init`` taking ``per_group=True``, or one value per parameter group as a list for the
    arguments the class names in ``_GROUP_ARGS`` (as torch takes them), to build a scheduler
    acting on every group with its own base value, and ``base_lr=``, the scheduler's own base
    instead of the optimizer's rate (see :class:`LRScheduler`)."""
    sig = inspect.signature(init)
    takes_base = "base_lr" not in sig.parameters  # (CyclicLR's base_lr is its own argument)

    @functools.wraps(init)
    def wrapper(self: LRScheduler, *args: Any, per_group: bool = False, **kwargs: Any) -> None:
        depth = self.__dict__.get("_depth", 0)
        cls = type(self)
        base = kwargs.pop("base_lr", None) if takes_base and depth == 0 else None
        lists: dict[str, Sequence[Any]] = {}
        bound = None
        # (popped before binding: no constructor names them; checked once bound, below)
        at = {n: kwargs.pop(n) for n in start_mod.NAMES if n in kwargs} if depth == 0 else {}
        if depth == 0:
            try:
                bound = sig.bind(self, *args, **kwargs)
            except TypeError:
                bound = None  # init raises its own TypeError below
            if bound is not None:
                cls._normalize_arguments(bound.arguments)
                lists = {n: bound.arguments[n] for n in cls._GROUP_ARGS if n in bound.arguments
                         and isinstance(bound.arguments[n], (list, tuple))}
        if not isinstance(per_group, bool):
            raise TypeError(f"per_group must be a bool, got {describe(per_group)}")
        # a composite whose children act per group acts per group too (as torch's)
        grouped = bound is not None and bool(
            per_group or lists or lanes_mod.per_group_children(cls, bound.arguments))
        if base is not None:  # checked before anything is built (read by LRScheduler.__init__)
            self.__dict__["_base_given"] = cls._check_base_lr(base, grouped)
        args_seen = bound.arguments if bound is not None else None
        start = start_mod.start_step(cls, at, args_seen)
        restore = (start_mod.snapshot(cls, _optimizer_of(args_seen, cls._OPTIMIZER_ARG or first),
                                      args_seen) if start else None)
        if not grouped:
            held = _held_rates(_optimizer_of(args_seen, cls._OPTIMIZER_ARG or first)) \
                if depth == 0 and base is None else None
            self.__dict__["_depth"] = depth + 1
            try:
                init(self, *args, **kwargs)
            finally:
                self.__dict__["_depth"] = depth
                if depth == 0:
                    del self.__dict__["_depth"]
            if held is not None:
                held(cls.__name__)
        else:
            assert bound is not None
            _build_per_group(self, init, bound.arguments, lists, cls._OPTIMIZER_ARG or first)
        if restore is not None:  # last_step= / last_epoch=: n steps on, all or nothing
            try:
                start_mod.go_to(self, start)
            except Exception:
                restore()
                raise
        if depth == 0:  # from now on an attribute set is checked (see attributes.py)
            self.__dict__["_made"] = True

    names = list(sig.parameters)
    first = names[1] if len(names) > 1 else "optimizer"  # the optimizer's argument
    return wrapper


def _optimizer_of(arguments: Mapping[str, Any] | None, name: str) -> Any:
    """The optimizer among a constructor's bound ``arguments`` (a child's if not given)."""
    arguments = arguments or {}
    opt = arguments.get(name)
    if opt is None:
        children = lanes_mod.children_of(arguments.get("schedulers"))
        opt = children[0].optimizer if children else None
    return opt


def _held_rates(optimizer: Any) -> Callable[[str], None] | None:
    """For a scheduler of the learning rate of ``optimizer`` while that is 0 and some of its
    groups hold a rate of their own (no ratio to 0 holds one): a check to run once the
    scheduler is built, refusing it (everything put back) if it left the rate at 0. Moving
    the optimizer's rate, it would have set every group's to 0 at its first step, where
    torch's schedules each group from its own rate (``per_group=True``). A schedule of its
    own rates (``OneCycleLR``'s ``max_lr``, ``CyclicLR``'s) moves the rate off 0: taken.
    (why: ``Adam(0.0, param_groups=[{..., "lr": 0.01}])`` with ``StepLR(opt, ...)``, torch's
    frozen first group, stopped training every group)"""
    from ..optimizers.groups import Hyperparameter

    if isinstance(optimizer, Hyperparameter):
        if optimizer.name != "learning_rate" or optimizer.group is not None:
            return None
        optimizer = optimizer.optimizer
    opt = _hyperparameter_owner(optimizer)
    groups = getattr(opt, "_groups", None)
    if not isinstance(groups, list) or getattr(opt, "learning_rate", None) != 0:
        return None
    held = [(i, g["learning_rate"]) for i, g in enumerate(groups) if "learning_rate" in g]
    if not held:
        return None
    restore = _snapshot(opt)

    def check(owner: str) -> None:
        if opt.learning_rate != 0:
            return
        restore()
        i, lr = held[0]
        raise ValueError(f"{owner}: {type(opt).__name__}'s own learning rate is 0 and "
                         f"param_groups[{i}] has a rate of its own ({lr}): a schedule of the "
                         f"optimizer's rate moves the groups in proportion to it, which would "
                         f"set theirs to 0; pass per_group=True (or lists) to schedule each "
                         f"group from its own rate, as torch's")

    return check


def _build_per_group(self: LRScheduler, init: Callable, arguments: Mapping[str, Any],
                     lists: Mapping[str, Sequence[Any]], first: str) -> None:
    cls = type(self)
    owner = cls.__name__
    if not cls._acts_per_group():
        raise TypeError(f"{owner} cannot act per parameter group (per_group=True or lists); "
                        f"build one per group on optimizer.hyperparameter('learning_rate', "
                        f"group=i) and step them all")
    optimizer = arguments[first]
    lanes = _group_lanes(owner, optimizer)
    for name, values in lists.items():
        if len(values) != len(lanes):
            raise ValueError(
                f"{owner}: {name} has {len(values)} values; it needs one per parameter group, "
                f"{len(lanes)} here: the optimizer's own parameters (in no group) first, then "
                f"param_groups[0..{len(lanes) - 2}]")

    children = (lanes_mod.child_lanes(owner, cls, arguments, len(lanes))
                if cls._LANE_CHILDREN else None)

    def args(i: int) -> dict[str, Any]:
        a = {k: v for k, v in arguments.items() if k != "self"}
        a.update({name: values[i] for name, values in lists.items()})
        a[first] = lanes[i]
        if children is not None:  # lane i of a composite drives lane i of each child
            a.update(children(i))
        return a

    restore = _snapshot(optimizer)
    try:
        # the groups' schedulers first: each reads its group's value as its base before the
        # optimizer's own scheduler changes the optimizer's learning rate (which moves theirs)
        siblings = [cls(**args(i)) for i in range(1, len(lanes))]
        self.__dict__["_depth"] = 1
        try:
            init(self, **args(0))
        finally:
            del self.__dict__["_depth"]
        self._siblings = siblings
        _apply(self._current_targets())
    except Exception:
        restore()
        raise
    lanes_mod.detach(cls, arguments)
