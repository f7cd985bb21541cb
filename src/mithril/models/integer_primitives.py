"""Integer-valued elementwise primitives of the published Mithril: ``FloorDivide`` (of
integers or floats) and the bit shifts ``ShiftLeft`` / ``ShiftRight`` (of integers). Each
broadcasts its two inputs as NumPy does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputValueError
from .operator import Shape, torch_of, unbroadcast
from .primitives import _Broadcasting


class FloorDivide(_Broadcasting):
    """⌊numerator / denominator⌋, rounded towards −∞ (Python's ``//``), as the published
    Mithril's ``FloorDivide``, ``torch.floor_divide`` and ``numpy.floor_divide``: −7 // 2 is
    −4, 7.0 // −2.0 is −4.0, and of floats the result is Python's (1.0 // 0.1 is 9.0 where
    ⌊1.0 / 0.1⌋ is 10.0: the float 0.1 is a little more than a tenth). Either input may be integer or float
    (the result is float if one is). A float divided by 0 gives ±inf (0 / 0: NaN), as torch;
    an integer divided by 0 is an ``InputValueError`` naming the key (torch raises, NumPy
    gives 0). The function is piecewise constant: its gradient is 0 for both inputs, as
    JAX's and as torch's ``div(..., rounding_mode="floor")`` (torch's ``floor_divide`` has
    none)."""

    inputs = ("numerator", "denominator")
    any_dtype_inputs = frozenset(inputs)
    value_checked_inputs = frozenset({"denominator"})

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """An integer denominator holds no 0 when the numerator is an integer too."""
        den = arrays.get("denominator")
        if den is None or "int" not in dtypes.get("denominator", "") or \
                "float" in dtypes.get("numerator", "float"):
            return
        if bool((np.asarray(den) == 0).any()):
            raise InputValueError(f"FloorDivide: denominator '{names['denominator']}' holds 0: "
                                  "an integer floor division by zero is undefined")

    def forward(self, xp: Any, numerator: Any, denominator: Any) -> Any:
        torch = torch_of(xp)
        if torch is not None:  # (torch's floor_divide has no derivative; this one's is 0)
            return torch.div(numerator, denominator, rounding_mode="floor")
        with np.errstate(divide="ignore", invalid="ignore"):
            return xp.floor_divide(numerator, denominator)

    def vjp(self, g, out, args, wrt):
        return {k: unbroadcast(np.zeros_like(g), np.shape(args[k])) for k in wrt}


class _Shift(_Broadcasting):
    inputs = ("input", "shift")
    int_inputs = frozenset(inputs)
    _np: Any

    def vjp(self, g, out, args, wrt):  # integers: nothing to differentiate
        return {k: np.zeros(np.shape(args[k])) for k in wrt}


class ShiftLeft(_Shift):
    """input · 2^shift as a bit shift ``input << shift`` of integers, as the published
    Mithril's ``ShiftLeft``, ``torch.bitwise_left_shift`` and ``numpy.left_shift`` (a
    negative input shifts its two's complement: −1 << 2 is −4). A negative shift gives 0,
    as on every backend here. No gradient (integers)."""

    def forward(self, xp: Any, input: Any, shift: Any) -> Any:
        return xp.left_shift(input, shift) if torch_of(xp) is None else input << shift


class ShiftRight(_Shift):
    """⌊input / 2^shift⌋ as an arithmetic bit shift ``input >> shift`` of integers, as the
    published Mithril's ``ShiftRight``, ``torch.bitwise_right_shift`` and
    ``numpy.right_shift`` (the sign is kept: −1 >> 2 is −1). A negative shift gives 0 for a
    non-negative input, as on every backend here. No gradient (integers)."""

    def forward(self, xp: Any, input: Any, shift: Any) -> Any:
        return xp.right_shift(input, shift) if torch_of(xp) is None else input >> shift
