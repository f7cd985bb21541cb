"""The published Mithril's relational and logical primitives: ``Greater``, ``GreaterEqual``,
``Less``, ``LessEqual``, ``Equal``, ``NotEqual`` (``left`` ⋚ ``right``) and ``LogicalAnd``,
``LogicalOr``, ``LogicalXOr`` (``left``, ``right``), ``LogicalNot`` (``input``).

Each broadcasts its inputs as NumPy does and gives a bool array (a logical operator reads a
number as ``!= 0``, as ``numpy.logical_and`` and ``torch.logical_and``). As torch's
comparisons, they have no gradient: a parameter reached only through one gets a zero
gradient, and a cotangent for their bool output is refused (as for every integer or bool
output). On connections they are ``a > b``, ``a >= b``, ``a < b``, ``a <= b``, ``a & b``,
``a | b``, ``a ^ b``, ``~a`` and, as published, ``a.eq(b)`` / ``a.ne(b)`` (``==`` stays
Python's identity test, so connections can be dict keys and set members)."""

from __future__ import annotations

import operator as _ops
from collections.abc import Callable
from typing import Any, ClassVar

from .operator import Operator, torch_of
from .primitives import _Broadcasting


class _Relational(_Broadcasting):
    inputs = ("left", "right")
    any_dtype_inputs = frozenset(inputs)
    #: the output's dtype whatever the model's (read by the output-gradient dtype check)
    output_dtype: ClassVar[str] = "bool"
    _fn: ClassVar[Callable[[Any, Any], Any]]

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        return type(self)._fn(left, right)

    def vjp(self, g, out, args, wrt):  # piecewise constant, as torch: no gradient
        return {}


class Greater(_Relational):
    """left > right (bool)."""

    _fn = _ops.gt


class GreaterEqual(_Relational):
    """left >= right (bool)."""

    _fn = _ops.ge


class Less(_Relational):
    """left < right (bool)."""

    _fn = _ops.lt


class LessEqual(_Relational):
    """left <= right (bool)."""

    _fn = _ops.le


class Equal(_Relational):
    """left == right (bool), elementwise."""

    canonical_inputs = ("left", "right")  # (published: either is the canonical input)

    _fn = _ops.eq


class NotEqual(_Relational):
    """left != right (bool), elementwise."""

    canonical_inputs = ("left", "right")  # (published: either is the canonical input)

    _fn = _ops.ne


def _logical(xp: Any, name: str) -> Callable[..., Any]:
    t = torch_of(xp)
    return getattr(t if t is not None else xp, name)


class _Logical(_Relational):
    _name: ClassVar[str]
    canonical_inputs = ("left", "right")  # (published: either is the canonical input)

    def forward(self, xp: Any, left: Any, right: Any) -> Any:
        return _logical(xp, self._name)(left, right)


class LogicalAnd(_Logical):
    """left and right (bool; a number is read as != 0)."""

    _name = "logical_and"


class LogicalOr(_Logical):
    """left or right (bool; a number is read as != 0)."""

    _name = "logical_or"


class LogicalXOr(_Logical):
    """left xor right (bool; a number is read as != 0)."""

    _name = "logical_xor"


class LogicalNot(Operator):
    """not input (bool; a number is read as != 0)."""

    any_dtype_inputs = frozenset({"input"})
    output_dtype: ClassVar[str] = "bool"

    def forward(self, xp: Any, input: Any) -> Any:
        return _logical(xp, "logical_not")(input)

    def vjp(self, g, out, args, wrt):
        return {}
