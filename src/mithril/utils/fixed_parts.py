"""Objects whose parts are chosen once: what a program, a state or an engine was built for.

A class lists those attributes in ``_FIXED`` and sets ``self._made = True`` at the end of its
constructor; from then on setting one raises an ``AttributeError`` naming how to make a new
one (``_MAKER``), instead of changing an attribute that what was built from it would not
follow (a step's cached cotangents, a sharded state's layout, a trainer's master params).
"""

from __future__ import annotations

from typing import Any, ClassVar


class FixedParts:
    """The ``__setattr__`` of a class with parts fixed once it is made (module docs)."""

    _FIXED: ClassVar[tuple[str, ...]] = ()
    #: how to make a new one with other parts (named in the error)
    _MAKER: ClassVar[str] = ""
    #: what the error calls the object ("the step", "it")
    _WHAT: ClassVar[str] = "it"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._FIXED and "_made" in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.{name} is fixed when {self._WHAT} is "
                                 f"made (what was built from it follows it): make a new one, "
                                 f"{self._MAKER}")
        object.__setattr__(self, name, value)
