"""torch ``state_dict`` names for the recurrent layers (:mod:`mithril.models.recurrent`):
torch's ``<role>_l<k>[_reverse]`` ↔ our ``l<k>[_reverse].<role>`` (``recurrence.<role>`` for
one layer and direction, or a cell), and the checked conversion of a torch ``state_dict``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import KeyMismatchError
from .operator import ShapeError, fmt

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
ROLES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _TorchNames:
    """Name mapping to / from torch's ``state_dict`` (shared by the cells and the sequences)."""

    kind: ClassVar[str]
    hidden_size: int
    bias: bool
    proj_size: int = 0  # LSTM's projection: weight_hr (P, H), weight_hh (G·H, P)

    def _torch_pairs(self) -> list[tuple[str, str, str, int]]:
        """(torch name, mithril name relative to this block, role, ``weight_ih``'s input
        features or 0: any)."""
        raise NotImplementedError

    def torch_names(self, prefix: str = "") -> dict[str, str]:
        """``{torch name: mithril parameter name}`` for this block, e.g. ``weight_ih_l1_reverse
        -> prefix + "l1_reverse.weight_ih"``, ``weight_ih_l0 -> prefix + "recurrence.weight_ih"``
        (one layer, one direction), ``weight_ih -> prefix + "recurrence.weight_ih"`` (a cell). ``prefix``: the block's path in the compiled
        model followed by a dot (``"lstm."`` when it is a block ``lstm`` of the compiled model;
        ``""`` when it is the compiled model itself)."""
        return {t: prefix + m for t, m, _, _ in self._torch_pairs()}

    def params_from_torch(self, state_dict: Mapping[str, Any], prefix: str = "",
                          backend: Any = None) -> dict[str, Any]:
        """This block's parameters from the ``state_dict()`` of the matching ``torch.nn``
        module (``torch.nn.LSTM(I, H, num_layers, bias, bidirectional=...)``, ...), keyed by
        mithril name (see :meth:`torch_names` for ``prefix``): NumPy arrays, or ``backend``'s
        arrays when a backend is given; new arrays, never views of the torch tensors (as
        :func:`mithril.interop.params_from_torch`'s). Missing or unexpected keys (``proj_size``'s
        ``weight_hr_*``, another ``num_layers``) are a ``KeyMismatchError``, a wrong shape a
        ``ShapeError``, before anything is converted."""
        pairs = self._torch_pairs()
        want = {t for t, _, _, _ in pairs}
        who = type(self).__name__
        missing, unexpected = sorted(want - set(state_dict)), sorted(set(state_dict) - want)
        if missing or unexpected:
            raise KeyMismatchError(f"{who}.params_from_torch: missing key(s) {missing}, unexpected "
                                   f"key(s) {unexpected} (expected {sorted(want)})")
        gh, h, p = GATES[self.kind] * self.hidden_size, self.hidden_size, self.proj_size
        for t, _, role, i in pairs:
            shape = tuple(state_dict[t].shape)
            expect: tuple[int | None, ...] = {
                "weight_ih": (gh, i or None), "weight_hh": (gh, p or h),
                "weight_hr": (p, h)}.get(role, (gh,))
            if len(shape) != len(expect) or any(e is not None and e != d for d, e in zip(shape, expect)):
                raise ShapeError(f"{who}.params_from_torch: '{t}' must have shape {fmt(expect)}, "
                                 f"got {fmt(shape)}")
        out = {}
        for t, m, _, _ in pairs:
            v = _numpy_copy(state_dict[t])
            out[prefix + m] = v if backend is None else backend.array(v)
        return out


def _numpy_copy(v: Any) -> np.ndarray:
    """A new NumPy array of a torch tensor's or an array's values (a view would follow the
    torch module's in-place updates, ``optimizer.step()``); torch's bfloat16 as ml_dtypes'
    (NumPy has none: the NumPy backend's bfloat16)."""
    if not hasattr(v, "detach"):
        return np.array(v, copy=True)
    v = v.detach().cpu()
    if str(v.dtype) != "torch.bfloat16":
        return v.numpy().copy()
    import ml_dtypes

    return v.float().numpy().astype(ml_dtypes.bfloat16)  # (exact: via float32)
