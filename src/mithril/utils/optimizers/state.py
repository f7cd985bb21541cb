"""The state a built-in optimizer keeps between steps."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from .layout import Layout


def scalar_arguments(opt: Any, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of ``opt.scalars(step, ...)``: each name of its
    ``scalar_values`` (some of its ``state_values``) with the value ``values`` (a state's
    ``values``) holds, or ``opt.state_value_init(name)`` where ``values`` is None or lacks
    it. Empty for an optimizer (or a row of one) without ``scalar_values``: its
    ``scalars(step)`` takes no keyword arguments."""
    names = getattr(opt, "scalar_values", ())
    if not names:
        return {}
    have = {} if values is None else values
    return {n: have[n] if n in have else opt.state_value_init(n) for n in names}


class OptimizerState:
    """Step count, skipped-step count, flat state slots (e.g. Adam's ``m``/``v``) and
    optimizer-wide scalars (``values``, e.g. a schedule-free weight sum).

    ``slots[name]`` is one flat buffer over all parameters (see :class:`Layout`);
    :meth:`slot` gives per-parameter views of it. (The jitted JAX engine holds them in
    chunks of that buffer, a :class:`~.engines.jax_chunks.ChunkedSlots` mapping: reading a
    slot gives its flat buffer all the same.) ``params_flat``/``param_views`` hold the
    flat parameter buffer an update writes in place (NumPy/torch) and the arrays it
    returned, so the next update can recognise them and skip copying.
    """

    def __init__(self, kind: str, layout: Layout, slots: dict[str, Any], engine: Any,
                 slot_layouts: dict[str, Layout] | None = None,
                 values: dict[str, float] | None = None) -> None:
        self.kind = kind
        self.layout = layout
        self.slots = slots
        self.engine = engine
        #: the layouts of slots whose per-parameter shapes are not the parameters' (one
        #: value per tensor, factored statistics, ...: ``Optimizer.slot_shape``)
        self.slot_layouts: dict[str, Layout] = dict(slot_layouts or {})
        #: optimizer-wide scalars kept between steps (``Optimizer.state_values``)
        self.values: dict[str, float] = dict(values or {})
        #: what the step being taken will commit if it is applied (see Optimizer.update)
        self.pending: Any = None
        self.step = 0
        self.num_skipped = 0
        self.num_nonfinite = 0  # steps applied that gave non-finite values ("propagate")
        self.nonfinite_values = False  # the last step left inf/NaN in params or state
        self.last_step_skipped = False
        self.last_grad_norm: float | None = None
        self.params_flat: Any = None
        self.param_views: dict[str, Any] | None = None
        self.groups: Any = None  # (key, row of each tensor, rows): see Optimizer.group_rows
        #: how the last plain step ran, for the next to repeat (engines/fast_step.py), and how
        #: many recipes in a row went unused (then none is made: something changes per step)
        self.fast: Any = None
        self.fast_waste = 0
        #: the average swapped in for evaluation ("ema" / "swa", see Optimizer.swap_ema):
        #: its slot then holds the training parameters
        self.swapped: str | None = None

    def returned(self, params: Any) -> bool:
        """Whether ``params`` are the very arrays the last update returned (the views of
        :attr:`params_flat`), in layout order: nothing to check or copy in."""
        views = self.param_views
        return (views is not None and len(views) == len(params)
                and list(params) == self.layout.name_list
                and all(map(operator.is_, params.values(), views.values())))

    def slot(self, name: str) -> dict[str, Any]:
        """Per-parameter arrays of state slot ``name`` (views on NumPy/torch, copies on JAX)."""
        if name not in self.slots:
            raise KeyError(f"optimizer state has no slot '{name}'; slots are {sorted(self.slots)}")
        if name == self.swapped:
            raise ValueError(f"the {name.upper()} is swapped in (swap_ema): its slot holds the "
                             f"training parameters until swap_ema swaps them back")
        return self.slot_layout(name).unflatten(self.slots[name])

    def slot_layout(self, name: str) -> Layout:
        """Where each parameter's part of slot ``name`` lies in its flat buffer."""
        return self.slot_layouts.get(name, self.layout)

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
