"""The steady state of a training loop's calls of a compiled model.

A loop calls ``evaluate(params, batch, output_gradients={"loss": 1.0})`` (or a train step)
with arrays of the same keys, types, shapes and dtypes at every step. The first such call
runs every check; what they depend on (keys, array types, shapes, dtypes, the output
gradients' Python numbers) is then kept here, and a later call that matches it runs only
what reads the arrays' values (class indices in range), then the evaluator. Anything that
does not match takes the full path, which raises the errors: a call refused here changes
nothing, as the full path's refusal does not.

Why: in a small model's step the checks' Python is a large share of the time, and more so
inside a loop than alone (the forward and backward passes run in between and evict the
interpreter's caches): ~60 µs of a 360 µs torch step (MLP [64, 128, 128, 10], batch 128)
went into them, against ~3 µs for the checks kept here.

Only NumPy and torch take it (a JAX call may be traced: its checks stay as they are), for a
program without context operators (Dropout, BatchNorm: their mode, step and state are
per-call arguments), the whole program (every input given), arrays that the checks took as
they were (no conversion: a NumPy array given to torch is converted at every call).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from .output_gradients import _distinct

_fixed = operator.attrgetter("__class__", "shape", "dtype")


def _meta(x: Any) -> tuple:
    """What a call's array is checked for, short of its values: its class (a NumPy array
    given to torch is converted by the full path; a subclass keeps its own class here),
    shape, dtype and device (a torch tensor on another device than the kept call's)."""
    return (*_fixed(x), getattr(x, "device", None))


def metadata(arrays: Mapping[str, Any]) -> list[tuple] | None:
    """Each array's class, shape and dtype, in order (None where a value is not an array)."""
    try:
        return list(map(_meta, arrays.values()))
    except AttributeError:
        return None


class SteadyInputs:
    """The inputs of the last call that passed every check unconverted: their keys and
    metadata, the value checks to repeat (``(check, refs)``: ``check(arrays)`` with
    ``arrays`` keyed as its operator names them, ``refs`` the (operator key, input key)
    pairs), and the program's constants."""

    __slots__ = ("keys", "meta", "checks", "consts")

    def __init__(self, inputs: Mapping[str, Any], checks: list[tuple[Callable, tuple]],
                 consts: Mapping[str, Any]) -> None:
        self.keys = tuple(inputs)
        self.meta = metadata(inputs)
        self.checks = tuple(checks)
        self.consts = dict(consts)

    def __call__(self, inputs: Any) -> dict[str, Any] | None:
        """``inputs`` with the constants, value-checked (raising as the full path does), when
        they match; else None (nothing checked: the full path's turn)."""
        if type(inputs) is not dict or tuple(inputs) != self.keys:
            return None
        try:
            if list(map(_meta, inputs.values())) != self.meta:
                return None
        except AttributeError:
            return None
        for check, refs in self.checks:
            check({k: inputs[t] for k, t in refs})
        if not self.consts:
            return inputs  # (an evaluator only reads it)
        ins = dict(inputs)
        ins.update(self.consts)
        return ins


class SteadyCall:
    """What :meth:`~.compiled_model.CompiledModel.evaluate` keeps of its last fully checked
    call: the parameters' keys and metadata, the inputs (:class:`SteadyInputs`), the output
    gradients as given (Python numbers) and as arrays, and the evaluator."""

    __slots__ = ("pkeys", "pmeta", "inputs", "given", "types", "cots", "ev", "true")

    def __init__(self, params: Mapping[str, Any], inputs: SteadyInputs,
                 given: Mapping[str, Any] | None, cots: dict[str, Any] | None, ev: Any) -> None:
        self.pkeys = tuple(params)
        self.pmeta = metadata(params)
        self.inputs = inputs
        self.given = None if given is None else list(given.items())
        self.types = None if given is None else list(map(type, given.values()))
        self.cots, self.ev = cots, ev
        #: what ``output_gradients=True`` stood for in the kept call (None: not given so)
        self.true: dict[str, Any] | None = None

    def matches(self, params: Any, output_gradients: Any) -> bool:
        """Whether ``params`` and ``output_gradients`` are those of the kept call (the same
        keys and metadata; the same Python numbers, or None both)."""
        if type(params) is not dict or tuple(params) != self.pkeys:
            return False
        given = self.given
        if output_gradients is None or given is None:
            if output_gradients is not given:
                return False
        elif (type(output_gradients) is not dict
              or list(map(type, output_gradients.values())) != self.types
              or list(output_gradients.items()) != given):  # (numbers only: compared by value)
            return False
        try:
            return list(map(_meta, params.values())) == self.pmeta
        except AttributeError:
            return False


def python_numbers(output_gradients: Any) -> bool:
    """Whether ``output_gradients`` is a dict of Python floats and ints (a loss's 1.0): what
    a steady call may compare by value."""
    return type(output_gradients) is dict and bool(output_gradients) and all(
        type(g) in (float, int) for g in output_gradients.values())


def lean_check(hook: Callable, shapes: Any, dtypes: Any, names: Any) -> Callable | None:
    """``check(arrays)``: an operator's value check for a steady call. The operator's
    ``steady_check(shapes, dtypes, names)`` when it has one (the same rule and message, the
    shape logic done once; None: nothing to check for this signature), else its
    ``check_inputs`` hook with this signature's arguments."""
    make = getattr(getattr(hook, "__self__", None), "steady_check", None)
    if make is not None:
        return make(shapes, dtypes, names)
    return lambda arrays: hook(shapes, dtypes, arrays, names)


#: the backends whose calls keep a steady state
_BACKENDS = ("numpy", "torch")


class SteadyCallsMixin:
    """The steady state of :class:`~mithril.compiler.compiled_model.CompiledModel`'s calls:
    ``_steady`` and ``_steady_fwd`` (:class:`SteadyCall`, kept by ``evaluate`` with output
    gradients and without: a loop may take turns) and ``_steady_ins`` (a
    :class:`SteadyInputs`, kept by ``evaluate`` and by a train step); all are dropped with the
    program they were made for."""

    _steady: SteadyCall | None = None
    _steady_fwd: SteadyCall | None = None
    _steady_ins: SteadyInputs | None = None

    def _steady_evaluate(self, params: Any, inputs: Any, output_gradients: Any) -> Any:
        """``evaluate(params, inputs, output_gradients)``'s result by the steady path, or None
        where the call is not the kept one's kind (nothing was checked or run)."""
        s = self._steady_fwd if output_gradients is None else self._steady
        if s is None:
            return None
        if output_gradients is True:
            output_gradients = s.true
        if not s.matches(params, output_gradients):
            return None
        ins = s.inputs(inputs)
        if ins is None:
            return None
        if s.cots is None:
            return self._evaluate(params, ins, None, None, s.ev)
        out, grads = self._evaluate(params, ins, s.cots, None, s.ev)
        return out, _distinct(grads, s.cots)

    def _keep_steady(self, given: tuple, params: dict[str, Any], inputs: dict[str, Any],
                     output_gradients: Any, cots: Any) -> None:
        """Keep a call that passed every check (``given``: its params, inputs and output
        gradients as the caller gave them; ``params``, ``inputs``: as checked, with the
        constants) for the next, where the steady path can repeat it."""
        gp, gi, gog = given
        if self.backend.name not in _BACKENDS or not (
                output_gradients is None or python_numbers(output_gradients)):
            return
        kept = self._keep_steady_inputs(gi, inputs, checked=True)
        if kept is None or type(gp) is not dict or len(gp) != len(params) \
                or not all(params.get(k) is v for k, v in gp.items()) or metadata(gp) is None:
            return
        s = SteadyCall(gp, kept, output_gradients, cots, self._eval)
        if output_gradients is None:
            self._steady_fwd = s
        else:
            s.true = output_gradients if gog is True else None
            self._steady = s

    def _keep_steady_inputs(self, given: Any, inputs: dict[str, Any], checked: bool = False
                            ) -> SteadyInputs | None:
        """Keep the inputs ``given`` (checked as ``inputs``, with the constants) for the
        steady path when the checks took every array as it was; returns what was kept.
        ``checked``: the concrete checks of ``inputs`` were the last made (their value checks
        are known; else they are looked up, running them once more)."""
        p = self.program
        if (self.backend.name not in _BACKENDS or p.has_context or p.state_shapes
                or type(given) is not dict
                or len(given) + len(self._consts) != len(inputs)
                or not all(inputs.get(k) is v for k, v in given.items())
                or metadata(given) is None):
            return None
        if not checked:
            self._check_concrete(inputs, p)  # (its value checks for this signature)
        checks = []
        for hook, shapes, dtypes, names, refs in self._value_hooks:
            check = lean_check(hook, shapes, dtypes, names)
            if check is not None:
                checks.append((check, refs))
        self._steady_ins = kept = SteadyInputs(given, checks, self._consts)
        return kept

    def _steady_inputs(self, inputs: Any) -> dict[str, Any] | None:
        """``inputs`` checked by the steady path (with the constants), or None where they are
        not of the kept kind (nothing was checked)."""
        s = self._steady_ins
        return None if s is None else s(inputs)
