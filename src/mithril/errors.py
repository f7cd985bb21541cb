"""Errors raised by Mithril. Each subclasses the builtin a user would catch."""

from __future__ import annotations


class ShapeError(ValueError):
    """Two shapes that must agree do not (names both keys and both shapes)."""


class DTypeError(TypeError):
    """An array has the wrong dtype (names the key, the expected and the given dtype)."""


class InputValueError(ValueError):
    """An input's values break an operator's rule (class indices out of range), found by the
    operator's NumPy forward itself; ``evaluate`` then runs the compiler's value checks,
    which name the data key, and raises this only where they do not apply (values computed
    inside the model)."""


class KeyMismatchError(KeyError):
    """A key in ``params``, ``inputs``, ``gradients`` or optimizer state is missing or unknown."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(ValueError):
    """A checkpoint file is corrupted, truncated, altered or malformed (names the file, and
    the tensor or metadata field where known)."""
