"""The state a built-in optimizer keeps between steps."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from ...errors import KeyMismatchError
from .engines.common import is_finite
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


class DeviceReport:
    """A step's global gradient norm and finite probe still on the device (the engines that
    queue their work: the jitted JAX engine, torch's fused kernels): ``read()`` waits for
    them and returns ``(norm, finite)`` as Python values. Under ``nonfinite="propagate"``
    the step is applied whatever they say, so the host need not wait for them: the state
    reads them later (:meth:`OptimizerState.settle`), while the device runs on."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], tuple[float, bool]]) -> None:
        self.read = read


class _Outcome:
    """An attribute of :class:`OptimizerState` that a step's deferred report decides (kept
    as ``_<name>``): reading or setting it first reads the report (``_settle``)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = "_" + name

    def __get__(self, state: Any, owner: type | None = None) -> Any:
        if state is None:
            return self
        if state._report is not None:
            state._settle(4)  # (note_applied, _settle, __get__, the caller)
        return getattr(state, self.attr)

    def __set__(self, state: Any, value: Any) -> None:
        if state._report is not None:
            state._settle(4)
        setattr(state, self.attr, value)


class OptimizerState:
    """Step count, skipped-step count, flat state slots (e.g. Adam's ``m``/``v``) and
    optimizer-wide scalars (``values``, e.g. a schedule-free weight sum).

    Under ``nonfinite="propagate"`` an engine that queues its work on a device (the jitted
    JAX engine, torch's fused kernels) leaves a step's norm and finite probe there: they
    are read when the next update is queued, or when :attr:`last_grad_norm`,
    :attr:`num_nonfinite` or :attr:`nonfinite_values` is read (or :meth:`settle` called),
    whichever comes first; the step's warning, if any, is issued then.

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
        self._held: dict[str, Any] | None = None  # see hold_values
        self.values = dict(values or {})
        #: what the step being taken will commit if it is applied (see Optimizer.update)
        self.pending: Any = None
        self.step = 0
        self.num_skipped = 0
        #: non-finite steps in a row, skipped or not (optax apply_if_finite's
        #: ``notfinite_count``; 0 after a finite step): see ``max_consecutive_skips``
        self.consecutive_skips = 0
        #: the last applied step's report still on the device: (report, step, optimizer name)
        self._report: tuple[DeviceReport, int, str] | None = None
        self._num_nonfinite = 0  # steps applied that gave non-finite values ("propagate")
        self._nonfinite_values = False  # the last step left inf/NaN in params or state
        self._last_grad_norm: float | None = None
        self.last_step_skipped = False
        self.params_flat: Any = None
        self.param_views: dict[str, Any] | None = None
        self.groups: Any = None  # (key, row of each tensor, rows): see Optimizer.group_rows
        #: per tensor (layout order), the applied steps it had no gradient at, whose count
        #: its rules leave out (torch.optim's per-parameter ``step``; None: all 0): see
        #: :meth:`note_missed`; ``own_rows`` the rows it gives (an :class:`~.own_rows.OwnRows`)
        self.missed: np.ndarray | None = None
        self.own_rows: Any = None
        self._missed_at: dict[tuple, tuple] = {}  # names -> their positions: note_missed
        #: how the last plain step ran, for the next to repeat (engines/fast_step.py), and how
        #: many recipes in a row went unused (then none is made: something changes per step)
        self.fast: Any = None
        self.fast_waste = 0
        #: the average swapped in for evaluation ("ema" / "swa", see Optimizer.swap_ema):
        #: its slot then holds the training parameters
        self.swapped: str | None = None

    # a step's outcomes: reading or setting one first reads a deferred report
    last_grad_norm = _Outcome("The last step's global gradient norm (float; None before any "
                              "step).")
    num_nonfinite = _Outcome("Steps applied (``\"propagate\"``) with a non-finite gradient, or "
                             "that made params or state non-finite from finite gradients.")
    nonfinite_values = _Outcome("Whether the last step left inf/NaN in params or state.")

    def settle(self) -> None:
        """Read the last step's deferred report now (a wait for the device): the norm and
        counters up to date, its warning issued. Nothing to do if none is pending."""
        self._settle(4)

    def _settle(self, stacklevel: int) -> None:
        # stacklevel: the warning's, so that it points at the caller's code
        pending, self._report = self._report, None
        if pending is not None:
            report, step, name = pending
            norm, finite = report.read()
            self.note_applied(name, norm, finite, step, stacklevel=stacklevel)

    def defer(self, report: DeviceReport, step: int, name: str) -> None:
        """Hold applied step ``step``'s ``report`` until it is needed (the previous one is
        read first: outcomes are counted in step order). Called by ``Optimizer.update``."""
        if self._report is not None:
            self._settle(6)  # (note_applied, _settle, defer, _record, update, the caller)
        self._report = (report, step, name)

    def note_applied(self, name: str, norm: float | None, finite: bool, step: int | None = None,
                     stacklevel: int = 4) -> None:
        """Count an applied step's outcome (``"propagate"``): a non-finite gradient every
        time, non-finite values from finite gradients once, until a step gives finite values
        again; each with a ``RuntimeWarning`` (``step``: a deferred report's, named in it)."""
        self._last_grad_norm = norm
        bad_grad = not is_finite(norm)
        if bad_grad or (not finite and not self._nonfinite_values):
            self._num_nonfinite += 1
            what = (f"non-finite gradient (global norm {norm})" if bad_grad else
                    "finite gradients, but the step made params or state non-finite (a "
                    "learning rate or other hyperparameter too large for the dtype?)")
            at = "" if step is None else f" at step {step}"
            warnings.warn(f"{name}: {what} applied{at}; params may now be non-finite "
                          f"(nonfinite='skip' or 'raise' guard against this)",
                          RuntimeWarning, stacklevel=stacklevel)
        self._nonfinite_values = not finite

    def note_missed(self, names: Iterable[str]) -> None:
        """Count one more missed step for each parameter ``names`` (they had no gradient at
        the step just applied): their bias corrections, decays and first-step rules then
        count only their own steps, as torch.optim counts each parameter's ``step``
        (:mod:`.groups`). ``torch_optimizer`` calls it; a plain ``update`` does not (one
        count per state, as optax)."""
        if isinstance(names, (str, bytes)):  # (its characters were taken as the names)
            raise TypeError(f"note_missed takes an iterable of parameter names, got the "
                            f"string {names!r:.80} (one name: [{names!r:.80}])")
        names = tuple(names)
        # (a loop names the same parameters step after step, or a few sets in turn)
        known = self.__dict__.setdefault("_missed_at", {})
        try:
            seen, hashable = known.get(names), True
        except TypeError:  # (an unhashable name: refused below, by _index)
            seen, hashable = None, False
        if seen is None:
            at = self.layout.index
            idx = list(dict.fromkeys(  # (each once, as missed[idx] += 1 counts them)
                at[n] if isinstance(n, str) and n in at else self._index(n, "note_missed")
                for n in names))
            if len(known) >= 8:
                known.clear()
            seen = (idx, np.array(idx, dtype=np.int64))
            if hashable:
                known[names] = seen
        idx = seen[0]
        if not idx:
            return
        missed = self.missed
        if missed is None:
            missed = self.missed = np.zeros(len(self.layout.names), dtype=np.int64)
        if len(idx) <= 16:  # (a few items: ~0.1 us each, where fancy indexing costs ~2)
            for i in idx:
                missed[i] += 1
        else:
            missed[seen[1]] += 1
        # their rows: the same ones, their offsets raised, while the same tensors miss
        # steps (else made anew); a recipe that reads the rows anew at each step holds
        own = self.own_rows
        if own is not None:
            own.bump(idx)
        self._recipe_rows_changed()

    def set_missed(self, missed: Mapping[str, int] | None) -> None:
        """Set every parameter's missed-step count (name -> int >= 0; those left out: 0),
        as a state dict keeps them (checked by its loader)."""
        counts = np.zeros(len(self.layout.names), dtype=np.int64)
        for n, m in (missed or {}).items():
            if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)) or \
                    not 0 <= m <= self.step:
                raise ValueError(f"set_missed: the count of '{n}' must be an int in [0, "
                                 f"step={self.step}], got {m!r:.40}")
            counts[self._index(n, "set_missed")] = m
        self.missed = counts if counts.any() else None
        if self.own_rows is not None:  # (made anew, from its views)
            self.own_rows.current = False
        self._recipe_rows_changed()

    def _recipe_rows_changed(self) -> None:
        """Drop the recipe of a plain step (:attr:`fast`) unless it reads the rows of the
        scalar table anew at every step (``follows_rows``: the fused NumPy / torch one);
        the jitted JAX engine's holds them (see ``engines/fast_step.py``)."""
        if not getattr(self.fast, "follows_rows", False):
            self.fast = None

    def _index(self, name: Any, caller: str) -> int:
        """The layout position of parameter ``name``; a ``KeyMismatchError`` naming it if
        this state has none of that name."""
        i = self.layout.index.get(name) if isinstance(name, str) else None
        if i is None:
            raise KeyMismatchError(f"{caller}: {name!r:.80} is not a parameter of this state "
                                   f"({len(self.layout.names)} parameters)")
        return i

    def missed_counts(self) -> dict[str, int]:
        """The parameters that missed steps and how many (empty where none did)."""
        if self.missed is None:
            return {}
        return {n: int(m) for n, m in zip(self.layout.name_list, self.missed.tolist()) if m}

    @property
    def values(self) -> dict[str, float]:
        """Optimizer-wide scalars kept between steps (``Optimizer.state_values``, e.g.
        Prodigy's ``d``), as floats. An engine that computes them on its device keeps them
        there between steps (:meth:`hold_values`): read here, they are brought back first
        (a wait for the device)."""
        if self._held is not None:
            held, self._held = self._held, None
            self._values = {k: float(np.asarray(v)) for k, v in held.items()}
        return self._values

    @values.setter
    def values(self, values: dict[str, float]) -> None:
        self._held, self._values = None, values

    def hold_values(self, values: dict[str, Any]) -> None:
        """Keep a step's new :attr:`values` as the device's 0-d arrays (the jitted JAX
        engine's program computed them): the next step takes them as they are, and
        nothing waits for them unless :attr:`values` is read."""
        self._held = dict(values)

    def held_values(self) -> dict[str, Any] | None:
        """The values :meth:`hold_values` kept, still on the device; None once read back
        (or set) as floats."""
        return self._held

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
