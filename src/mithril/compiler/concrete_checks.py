"""The checks of a call's inputs against the program with their concrete shapes and
values (:meth:`ConcreteChecksMixin._check_concrete`), before a backend runs them."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ShapeError
from ..models.operator import fmt, unify
from .program import Program, infer_output, known_constant


def _same(x: Any) -> Any:
    return x


def _check_roles(node: Any, in_shapes: Mapping[str, Any], names: Mapping[str, str]) -> None:
    """A parameter role given as a wire (a data or constant ``Linear`` weight) against the
    shape its operator takes for these inputs: a weight of another input width is a
    ``ShapeError`` here, not the backend's matmul error."""
    roles = [k for k in node.op.param_init if k in node.ins]
    if roles:
        want = node.op.param_shapes(in_shapes)
        for k in roles:
            if k in want:
                unify(in_shapes[k], want[k], f"{names[k]}",
                      f"{node.path}.{k} (its shape for these inputs)")


def _is_traced(x: Any) -> bool:
    """``x`` is a JAX tracer (``evaluate`` called inside ``jax.jit``): it has no values."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


class ConcreteChecksMixin:
    """The concrete checks of :class:`~mithril.compiler.compiled_model.CompiledModel` (it
    supplies ``program`` and ``backend``). ``_value_hooks`` is, after each check, the value
    checks it ran or would repeat for those inputs' signature
    (``(hook, shapes, dtypes, names, refs)``; :mod:`.steady` keeps them)."""

    _value_hooks: tuple = ()

    def _value_inputs(self, op: Any, every: bool = False) -> frozenset[str]:
        """The inputs of ``op`` whose values are checked before a run: on NumPy not those its
        forward checks itself (``numpy_checked_inputs``), unless ``every``."""
        keys = op.value_checked_inputs
        if keys and not every and self.backend.name == "numpy":
            return keys - op.numpy_checked_inputs
        return keys

    def _check_concrete(self, inputs: Mapping[str, Any], prog: Program | None = None,
                        every_value: bool = False) -> dict[str, Any]:
        """The shape rules again with the concrete input shapes, so free dimensions are bound
        (5 rows of logits against 3 labels is a ``ShapeError``), and each operator's own
        ``check_inputs(shapes, dtypes, arrays, names)`` hook, if it has one: dtype-aware shape
        rules and value checks (class indices in range) on the concrete inputs, before the
        backend runs them (under ``jax.jit`` nothing can raise on values). ``arrays`` holds the
        native top-level inputs an operator lists in ``value_checked_inputs`` (none when traced;
        no NumPy copy: a check reads a scalar or two); ``names`` maps its keys to the wires
        they read. ``prog``: the program to check (default: the whole one). On NumPy, values
        an operator's forward checks itself are read only with ``every_value`` (after that
        forward refused them: the message names the data key). Returns the outputs' shapes
        for these inputs (None where a rule cannot tell)."""
        p, b = prog or self.program, self.backend
        # JAX: a reduction on a JAX array compiles a program per shape (tens of ms); on the
        # host, labels are read in place
        host = np.asarray if b.name == "jax" else _same
        # all but the value checks are a function of the inputs' shapes and dtypes: a
        # signature that passed before (a training loop repeats one every step) runs only the
        # hooks that read values, with the shapes, dtypes and names they had then
        key = (id(p), tuple((k, v.shape, v.dtype) for k, v in inputs.items()))
        cache = self.__dict__.setdefault("_checked", {})
        hit = None if every_value else cache.get(key)
        if hit is not None and hit[0] is p:
            self._value_hooks = hit[1]
            for hook, in_shapes, dtypes, names, refs in hit[1]:
                arrays = {k: host(inputs[t]) for k, t in refs if not _is_traced(inputs[t])}
                if arrays:
                    hook(in_shapes, dtypes, arrays, names)
            return hit[2]
        value_hooks: list[tuple] = []
        shapes: list[Any] = list(p.wire_shapes)
        top = {w: k for k, w in p.inputs.items()}
        for k, w in p.inputs.items():
            shapes[w] = tuple(int(d) for d in inputs[k].shape)
        # (Size's output and integer constants, for Arange: as compile seeds them)
        values: dict[int, Any] = {p.inputs[k]: v for k, v in p.constants.items()
                                  if k in p.inputs and known_constant(v)}
        for node in p.nodes:
            in_shapes = {k: shapes[w] for k, w in node.ins.items()}
            names = {k: p.wire_names[w] for k, w in node.ins.items()}
            hook = getattr(node.op, "check_inputs", None)
            if hook is not None:
                dtypes = {k: b.dtype_name(inputs[top[w]]) for k, w in node.ins.items() if w in top}
                read = self._value_inputs(node.op, every_value)
                arrays = {k: host(inputs[top[w]]) for k in read
                          if (w := node.ins.get(k)) in top and not _is_traced(inputs[top[w]])}
                hook(in_shapes, dtypes, arrays, names)
                refs = tuple((k, top[w]) for k in read if (w := node.ins.get(k)) in top)
                if refs:
                    value_hooks.append((hook, in_shapes, dtypes, names, refs))
            pshapes = {k: p.param_shapes[n] for k, n in node.params.items()}
            try:
                _check_roles(node, in_shapes, names)
                out = infer_output(node, {**in_shapes, **pshapes}, values)
                shapes[node.out] = unify(shapes[node.out], out, p.wire_names[node.out],
                                         f"{node.path}.output (inferred)")
            except ShapeError as e:
                wires = ", ".join(f"'{k}' <- '{names[k]}' {fmt(in_shapes[k])}" for k in names)
                raise ShapeError(f"{node.path} ({type(node.op).__name__}): {e} "
                                 f"(inputs: {wires})") from None
        out_shapes = {k: shapes[w] for k, w in p.outputs.items()}
        if every_value:
            return out_shapes
        if len(cache) >= 32:
            cache.clear()
        self._value_hooks = hooks = tuple(value_hooks)
        cache[key] = (p, hooks, out_shapes)
        return out_shapes
