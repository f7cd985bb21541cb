"""The published Mithril's ``mithril.framework`` import line (``from mithril.framework import
IOKey, Tensor``), for programs written for it: the same objects as :mod:`mithril.models`'.
The published module also holds its logical and physical internals, which are not offered."""

from __future__ import annotations

from .models import IOKey, Tensor

__all__ = ["IOKey", "Tensor"]
