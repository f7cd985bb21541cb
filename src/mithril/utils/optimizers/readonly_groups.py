"""The read-only containers of an optimizer's parameter groups (:mod:`.groups`):
:class:`ParamGroups`, the list fixed when the optimizer is made or loads a state dict, and
:class:`ParamGroup`, one group's dict. Why read-only: torch's ``param_groups[i]["lr"] = ...``
and ``add_param_group`` would bypass the value checks and the count of changes the steps'
caches compare; each refusal names the call that does it instead."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ParamGroup(dict):
    """One of an optimizer's ``param_groups``: a dict the optimizer changes, read-only to
    its users. Setting a key as torch's ``param_groups[i]["lr"] = ...`` would bypass the
    checks and the count of changes the steps' caches compare: it is refused, naming the
    call that does it (``hyperparameter(name, group=i).set(value)``)."""

    def __init__(self, entry: Mapping[str, Any], index: int) -> None:
        super().__init__(entry)
        self.index = index

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        i = self.index
        given = args[0] if args else kwargs
        keys = [given] if isinstance(given, str) else list(given or kwargs) \
            if isinstance(given, Mapping) else []
        key = keys[0] if keys and isinstance(keys[0], str) else "name"
        call = (f"set_learning_rate(lr, group={i})" if key in ("lr", "learning_rate", "lr_scale")
                else f"hyperparameter({key!r}, group={i}).set(value)")
        raise TypeError(f"param_groups[{i}] is read-only: set a value with optimizer.{call}, "
                        f"which checks it (a group's parameters are fixed when the optimizer "
                        f"is made)")

    __setitem__ = __delitem__ = setdefault = pop = popitem = clear = update = _refuse
    __ior__ = _refuse

    def __missing__(self, key: Any) -> Any:
        """A key the group does not hold: torch's ``param_groups[i]["lr"]`` (a group keeps
        its learning rate as ``lr_scale``) or a hyperparameter it does not override (the
        optimizer's holds): a ``KeyError`` naming the call that reads its value."""
        i = self.index
        call = (f"get_learning_rate({i})" if key in ("lr", "learning_rate") else
                f"hyperparameter({key!r}, group={i}).get()")
        why = ("keeps its learning rate as 'lr_scale', its ratio to the optimizer's"
               if key in ("lr", "learning_rate") else
               f"holds only the hyperparameters it overrides ({sorted(k for k in self if k != 'params')})")
        raise KeyError(f"param_groups[{i}] has no {key!r}: it {why}; read the value with "
                       f"optimizer.{call}")

    def _set(self, key: str, value: Any) -> None:
        """The optimizer's own write (its caller counts the change)."""
        dict.__setitem__(self, key, value)

    def _drop(self, key: str) -> None:
        """The optimizer's own removal (its caller counts the change)."""
        dict.__delitem__(self, key)

    def _restore(self, saved: Mapping[str, Any]) -> None:
        """Back to ``saved`` (a refused change rolled back; its caller counts it)."""
        dict.clear(self)
        dict.update(self, saved)

    def __reduce__(self) -> tuple:  # (copies and pickles rebuild it without __setitem__)
        return ParamGroup, (dict(self), self.index)


class ParamGroups(list):
    """An optimizer's ``param_groups``: a list of :class:`ParamGroup`, fixed when the
    optimizer is made (or loads a state dict). Adding one as torch's ``add_param_group``
    does would be ignored by the steps' caches: it is refused, saying so."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("param_groups are fixed when the optimizer is made: give every group "
                        "to its constructor (param_groups=[...]), or load a state dict that "
                        "holds them")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __getitem__(self, i: Any) -> Any:
        try:
            return list.__getitem__(self, i)
        except IndexError:  # (torch's param_groups[0]["lr"] with no group given)
            raise IndexError(f"param_groups has {len(self)} group(s), no [{i}]: the parameters "
                             f"in no group take the optimizer's own hyperparameters (torch's "
                             f"default group): optimizer.get_learning_rate(), "
                             f"optimizer.hyperparameter(name).get()") from None

    def __reduce__(self) -> tuple:  # (copies and pickles rebuild it without append)
        return ParamGroups, (list(self),)
