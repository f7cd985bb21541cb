"""Attribute access through a wrapper to the optimizer it holds (a Lookahead's ``inner``, a
SAM's, ScheduleFree's or Mechanize's ``base_optimizer``)."""

from __future__ import annotations

from typing import Any, ClassVar


class HeldHyperparameters:
    """A hyperparameter of the held optimizer that is not the wrapper's own (:attr:`OWN`)
    reads and sets through the wrapper: ``la.beta1``, ``sam.beta1 = 0.5`` (set on the held
    optimizer and checked there, as any attribute set). A property of the wrapper with a
    setter keeps its name (the learning rate's, ``nonfinite``). Why: reading raised an
    AttributeError, and setting stored a value no step read."""

    #: the attribute that holds the wrapped optimizer
    HELD: ClassVar[str]
    #: the wrapper's own hyperparameters
    OWN: ClassVar[tuple[str, ...]]

    def _held_name(self, name: str) -> bool:
        """Whether attribute ``name`` is the held optimizer's hyperparameter."""
        held = self.__dict__.get(self.HELD)
        return (held is not None and name[:1] != "_" and name not in self.OWN
                and name in held.flat_hyperparameters())

    def __getattr__(self, name: str) -> Any:
        # (only where normal lookup fails)
        if self._held_name(name):
            return getattr(self.__dict__[self.HELD], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        prop = getattr(type(self), name, None)
        if self._held_name(name) and not (isinstance(prop, property) and prop.fset):
            setattr(self.__dict__[self.HELD], name, value)
        else:
            super().__setattr__(name, value)
