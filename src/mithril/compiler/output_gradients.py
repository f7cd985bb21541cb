"""The output gradients of a call of a compiled model (``evaluate(...,
output_gradients=...)``): their keys, shapes and dtypes checked against the program's
outputs, Python numbers made into arrays once, and the gradients handed back each in its
own buffer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from ..models.operator import fmt
from .array_checks import _given, cast_dtype
from .array_checks import shape_matches as _shape_matches

if TYPE_CHECKING:
    from ..backends.backend import Backend
    from .program import Program


def _check_keys(given: Mapping[str, Any], expected: Mapping[str, Any] | tuple, what: str,
                allow_missing: bool = False) -> None:
    if given.keys() == (expected.keys() if isinstance(expected, Mapping) else set(expected)):
        return
    exp = set(expected)
    unknown = sorted(set(given) - exp)
    missing = [] if allow_missing else sorted(exp - set(given))
    if unknown or missing:
        parts = [f"unknown key(s) {unknown}" if unknown else "", f"missing key(s) {missing}" if missing else ""]
        raise KeyMismatchError(f"{what}: " + "; ".join(p for p in parts if p)
                               + f" (expected keys: {sorted(exp)})")


def output_dtypes(prog: Program, inputs: Mapping[str, Any], backend: Backend) -> dict[str, str]:
    """The dtype name of each output of ``prog`` for this call's (checked) ``inputs``.

    The rule: a ``Cast`` gives its dtype, as does an operator declaring an ``output_dtype``
    (comparisons: bool; ``Arange``, ``Size``, ``Shape``: int64); an operator whose one data input takes any dtype
    (``Buffer``, ``Reshape``, ``Transpose``, an indexer: they move elements) keeps that
    input's; every other operator computes in the model's float dtype. An input's dtype is
    its array's; a parameter's is the model's."""
    from ..models.primitives import Cast

    model = str(backend.dtype).removeprefix("torch.")
    dt = {w: backend.dtype_name(inputs[k]) if k in inputs else model for k, w in prog.inputs.items()}
    dt.update({w: model for w in prog.param_wires.values()})
    for node in prog.nodes:
        op = node.op
        fixed = getattr(op, "output_dtype", None)
        if isinstance(op, Cast):  # (to another wire's dtype, x.dtype(): that wire's)
            dt[node.out] = dt.get(node.ins["dtype_ref"], model) if "dtype_ref" in node.ins \
                else op.dtype
        elif fixed is not None:
            dt[node.out] = fixed
        elif tuple(op.inputs) == ("input",) and "input" in op.any_dtype_inputs and "input" in node.ins:
            dt[node.out] = dt.get(node.ins["input"], model)
        else:
            dt[node.out] = model
    return {k: dt.get(w, model) for k, w in prog.outputs.items()}


def _differentiable(name: str) -> bool:
    return name.startswith(("float", "bfloat"))


class OutputGradientsMixin:
    """The output-gradient half of :class:`~mithril.compiler.compiled_model.CompiledModel`
    (it supplies ``program``, ``backend``, ``_check_array`` and ``_last_cots``)."""

    @staticmethod
    def _check_bound(cots: Mapping[str, Any], out_shapes: Mapping[str, Any]) -> None:
        """Each output gradient against its output's shape for this call's inputs: a free
        dimension is bound there (a (1, 3) cotangent for a (2, 3) output is a ``ShapeError``,
        not a broadcast)."""
        for k, g in cots.items():
            shape = out_shapes.get(k)
            if shape is not None and not _shape_matches(tuple(g.shape), shape):
                raise ShapeError(f"output gradient '{k}': expected shape {fmt(shape)} (the "
                                 f"output's for these inputs), got {fmt(tuple(g.shape))}")

    def _check_differentiable(self, output_gradients: Mapping[str, Any], inputs: Mapping[str, Any],
                              prog: Program) -> None:
        """A ``DTypeError`` naming the output and both dtypes for a cotangent given to an
        integer or bool output, checked before anything runs. Such an output has no
        gradient: torch refuses ``backward`` into an integer tensor and ``jax.grad`` an integer
        output (``jax.vjp`` takes a float cotangent there and gives zeros); leave it out of
        ``output_gradients`` (zero cotangents are implied). Keys that are no output are left to :meth:`_cotangents`."""
        if not isinstance(output_gradients, Mapping):
            return
        keys = [k for k in output_gradients if k in prog.outputs]
        if not keys:
            return
        # a loop calls with inputs of the same dtypes: the walk is done once for them
        sig = tuple(self.backend.dtype_name(inputs[k]) for k in prog.inputs
                    if k in inputs and prog.input_kinds.get(k) != "float")
        last = getattr(self, "_last_out_dtypes", None)
        if last is None or last[0] is not prog or last[1] != sig:
            last = self._last_out_dtypes = (prog, sig, output_dtypes(prog, inputs, self.backend))
        for k in keys:
            have = last[2][k]
            if not _differentiable(have):
                g = output_gradients[k]
                raise DTypeError(f"output gradient '{k}': output '{k}' has dtype {have}, which has "
                                 f"no gradient (got a {_given(g, self.backend, g)} cotangent); "
                                 "leave it out of output_gradients (torch refuses backward into an "
                                 "integer tensor)")

    def _cotangents(self, output_gradients: Mapping[str, Any]) -> dict[str, Any]:
        # Python numbers (a loss's 1.0): their arrays are made once (no pass writes over a
        # cotangent another reference holds, see codegen)
        try:
            key = tuple((k, type(g), g) for k, g in output_gradients.items()
                        if type(g) in (float, int)) if isinstance(output_gradients, dict) else ()
        except TypeError:
            key = ()
        if key and len(key) == len(output_gradients):
            last = self._last_cots
            if last is not None and last[0] == key:
                return last[1]
        else:
            key = ()
        _check_keys(output_gradients, self.program.outputs, "output_gradients", allow_missing=True)
        cots = {}
        for k, g in output_gradients.items():
            if g is None or isinstance(g, (bool, np.bool_, str, bytes)):  # (None read as NaN)
                raise TypeError(f"output gradient '{k}': expected an array or a number, got "
                                f"{g!r}; leave the output out of output_gradients for a zero "
                                "cotangent")
            pattern = self.program.output_shape(k)
            if not self.backend.is_native(g) and np.ndim(g) == 0 and pattern in ((), None):
                # a Python or NumPy number (a native one may live on a GPU: kept as it is)
                g = self.backend.array(np.asarray(g, dtype=np.float64))
            cots[k] = self._check_array("output gradient", k, g, pattern, "float",
                                        self.backend.native_dtype(), cast_dtype(self.program, k))
        if key:
            self._last_cots = (key, cots)
        return cots


def _distinct(grads: dict[str, Any], cots: dict[str, Any]) -> dict[str, Any]:
    """``grads`` with each gradient its own buffer, as torch's autograd gives: a VJP may pass
    its cotangent through (``Add``'s, with no broadcast), so two parameters' gradients could
    be one array, or the caller's output gradient, and an in-place change of one (torch's
    ``clip_grad_norm_``) would change the others. JAX arrays cannot change: kept."""
    ids = set(map(id, grads.values()))
    if len(ids) == len(grads) and ids.isdisjoint(map(id, cots.values())):
        return grads  # (the usual: every gradient its own array; one pass in C)
    seen = {id(g) for g in cots.values()}
    out = grads
    for k, g in grads.items():
        if type(g) is not np.ndarray and not hasattr(g, "clone"):
            continue
        if id(g) in seen:
            if out is grads:
                out = dict(grads)
            out[k] = g.copy() if type(g) is np.ndarray else g.clone()
        seen.add(id(g))
    return out

