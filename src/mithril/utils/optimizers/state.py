"""The state a built-in optimizer keeps between steps."""

from __future__ import annotations

from typing import Any

import numpy as np

from .layout import Layout


class OptimizerState:
    """Step count, skipped-step count and flat state slots (e.g. Adam's ``m``/``v``).

    ``slots[name]`` is one flat buffer over all parameters (see :class:`Layout`);
    :meth:`slot` gives per-parameter views of it. ``params_flat``/``param_views`` hold the
    flat parameter buffer an update writes in place (NumPy/torch) and the arrays it
    returned, so the next update can recognise them and skip copying.
    """

    def __init__(self, kind: str, layout: Layout, slots: dict[str, Any], engine: Any) -> None:
        self.kind = kind
        self.layout = layout
        self.slots = slots
        self.engine = engine
        self.step = 0
        self.num_skipped = 0
        self.num_nonfinite = 0  # steps applied that gave non-finite values ("propagate")
        self.nonfinite_values = False  # the last step left inf/NaN in params or state
        self.last_step_skipped = False
        self.last_grad_norm: float | None = None
        self.params_flat: Any = None
        self.param_views: dict[str, Any] | None = None
        self.groups: Any = None  # (key, row of each tensor, rows): see Optimizer.group_rows
        #: the average swapped in for evaluation ("ema" / "swa", see Optimizer.swap_ema):
        #: its slot then holds the training parameters
        self.swapped: str | None = None

    def slot(self, name: str) -> dict[str, Any]:
        """Per-parameter arrays of state slot ``name`` (views on NumPy/torch, copies on JAX)."""
        if name not in self.slots:
            raise KeyError(f"optimizer state has no slot '{name}'; slots are {sorted(self.slots)}")
        if name == self.swapped:
            raise ValueError(f"the {name.upper()} is swapped in (swap_ema): its slot holds the "
                             f"training parameters until swap_ema swaps them back")
        return self.layout.unflatten(self.slots[name])

    def __getitem__(self, name: str) -> Any:
        if name == "step":
            return self.step
        return self.slot(name)

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Flat host copies of every slot, e.g. for saving."""
        if self.swapped is not None:
            self.slot(self.swapped)  # refuses, saying why
        return {k: np.array(self.engine.to_numpy(v)) for k, v in self.slots.items()}

    def __repr__(self) -> str:
        return (f"OptimizerState({self.kind}, step={self.step}, slots={sorted(self.slots)}, "
                f"params={len(self.layout.names)}, skipped={self.num_skipped})")
