"""List inputs: a model input that feeds the published ``Concat``'s list ``input`` holds a
list (or tuple) of arrays, as in the published Mithril (``Concat(axis=0)`` compiled alone
and evaluated with ``{"input": [a, b, c]}``).

A wire carries one array here, so in the program a list input ``x`` of k elements is k
input wires ``x[0]`` .. ``x[k-1]`` feeding ``Concat(k)`` (:func:`expand_list_inputs`). Its
length and its elements' shapes come from ``compile(shapes={"x": [[2, 3], [4, 3]]})``, from
``constant_keys={"x": [a, b]}``, or, for a model compiled without shapes, from the first
``evaluate``'s list. :class:`ListInputsMixin` packs and unpacks at the API: ``evaluate``
takes the list under ``x`` (in ``params`` when ``x`` is trainable) and returns the gradient
of a trainable list as a list of the elements' gradients (those of ``torch.cat``);
``input_keys``, ``parameter_shapes``, ``shapes`` and ``randomize_params`` name ``x`` once,
with a list of shapes or arrays. A list where one array is expected, one array where a list
is, or a list of another length is an error naming the key, raised before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError, ShapeError
from ..models.model import _as_shape
from ..models.shaping import Concat


class ListLengthError(ShapeError):
    """A list input's length is not known yet (a model compiled without shapes waits for
    its first ``evaluate``)."""


def element_names(name: str, k: int) -> tuple[str, ...]:
    return tuple(f"{name}[{i}]" for i in range(k))


def is_array_list(v: Any) -> bool:
    """``v`` is a list or tuple of arrays of rank 1 or more (not a nested list of numbers,
    nor of scalars such as ``np.float64``: those are one array)."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(len(getattr(e, "shape", ())) > 0
                                                               for e in v)


def _element_shapes(name: str, shapes: Mapping[str, Any], constants: Mapping[str, Any]) -> list | None:
    """The declared shapes of list input ``name``'s elements (their number is its length),
    from ``compile(shapes=...)`` or ``constant_keys``; ``None`` when neither gives them."""
    if name in constants:
        value = constants[name]
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError(f"compile(constant_keys=...): '{name}' is a list input (Concat's list "
                            f"input): give a non-empty list of arrays, got {type(value).__name__}")
        return [tuple(np.shape(e)) for e in value]
    if name not in shapes:
        return None
    given = shapes[name]
    if (not isinstance(given, (list, tuple)) or not given
            or not all(isinstance(s, (list, tuple)) for s in given)):
        raise ShapeError(f"compile(shapes=...): '{name}' is a list input (Concat's list input): "
                         f"give one shape per element, e.g. [[2, 3], [4, 3]], got {given!r}; or "
                         "connect(input=[a, b, ...]) one connection per element")
    return [_as_shape(f"{name}[{i}]", s) for i, s in enumerate(given)]


def expand_list_inputs(b: Any, top_wires: dict[str, int], shapes: Mapping[str, Any] | None,
                       constant_keys: Mapping[str, Any] | None, data_keys: tuple[str, ...],
                       trainable_keys: tuple[str, ...]) -> tuple[dict, dict, tuple, tuple, dict]:
    """Rewrite the flattened model ``b`` (a ``program._Builder``) so that every list-form
    ``Concat`` (``Concat()`` whose ``input`` is one wire) reads the elements of the model
    input bound to that wire: one input wire per element, named ``x[i]``, and ``Concat(k)``.
    ``top_wires`` is updated in place; returns the key sets with ``x`` replaced by its
    elements, and ``{x: its element names}``."""
    shapes, constants = dict(shapes or {}), dict(constant_keys or {})
    uses = [n for n in b.nodes if isinstance(n.op, Concat) and n.op.n is None]
    if not uses:
        return shapes, constants, data_keys, trainable_keys, {}
    top_of = {w: name for name, w in top_wires.items()}
    produced = {n.out for n in b.nodes}
    elements: dict[int, list[int]] = {}
    lists: dict[str, tuple[str, ...]] = {}
    for node in uses:
        w = node.ins["input"]
        name = top_of.get(w)
        if name is None or w in produced:
            raise ShapeError(f"{node.path}: Concat() takes a list input: connect(input=[a, b, ...]), "
                             "a model input given a list of arrays, or Concat(n) with input1 .. "
                             "input<n>")
        if w not in elements:
            other = [f"{n.path} ({type(n.op).__name__})" for n in b.nodes
                     if not (isinstance(n.op, Concat) and n.op.n is None) and w in n.ins.values()]
            if other:
                raise TypeError(f"'{name}' feeds Concat's list input and {', '.join(other)}, which "
                                "take(s) one array: give them separate inputs")
            found = _element_shapes(name, shapes, constants)
            if found is None:
                raise ListLengthError(f"cannot infer the length of list input '{name}' (Concat's "
                                      "list input): declare its elements' shapes, compile(shapes="
                                      f"{{'{name}': [[2, 3], [4, 3]]}}), or give its value")
            lists[name] = element_names(name, len(found))
            elements[w] = [b.wire(n, s) for n, s in zip(lists[name], found, strict=True)]
        node.op = Concat(len(elements[w]), axis=node.op.axis)
        node.ins = {f"input{i + 1}": e for i, e in enumerate(elements[w])}
    for name, elems in lists.items():
        top_wires.update(zip(elems, elements[top_wires.pop(name)], strict=True))
        shapes.pop(name, None)
        if name in constants:
            constants.update(zip(elems, constants.pop(name), strict=True))

    def expand(keys: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e for k in keys for e in lists.get(k, (k,)))
    return shapes, constants, expand(data_keys), expand(trainable_keys), lists


def _refuse_lists(d: Any, what: str) -> None:
    """A list of arrays given for a key that takes one array is refused by name (NumPy
    would stack it into one array)."""
    if isinstance(d, Mapping):
        for k, v in d.items():
            if type(v) in (list, tuple) and is_array_list(v):
                raise TypeError(f"{what} '{k}' takes one array, got a {type(v).__name__} of "
                                f"{len(v)} arrays (only a model input feeding Concat's list input "
                                "holds a list)")


class ListInputsMixin:
    """The list inputs of :mod:`this module <mithril.compiler.list_inputs>` at the API of
    :class:`~mithril.compiler.compiled_model.CompiledModel` (which holds the program)."""

    def _lists(self) -> dict[str, tuple[str, ...]]:
        prog = self._program  # type: ignore[attr-defined]
        return {} if prog is None else prog.lists  # (not built yet: the build checks the lists)

    def _pack(self, d: Mapping[str, Any]) -> dict[str, Any]:
        """``d`` (keyed by element names) with each list's elements as one list."""
        lists = self._lists()
        if not lists:
            return dict(d)
        of = {e: name for name, elems in lists.items() for e in elems}
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k in of:
                if of[k] not in out and all(e in d for e in lists[of[k]]):
                    out[of[k]] = [d[e] for e in lists[of[k]]]
            else:
                out[k] = v
        return out

    def _unpack(self, d: Mapping[str, Any] | None, what: str) -> Any:
        """``d`` with each list input's list as its elements, checked: a list where one array
        is expected, one array for a list input and a list of another length are refused."""
        if not isinstance(d, Mapping):
            return d
        lists = self._lists()
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k in lists:
                elems = lists[k]
                if not isinstance(v, (list, tuple)) or (v and not all(hasattr(e, "shape") or
                                                                      isinstance(e, list) for e in v)):
                    raise TypeError(f"{what} '{k}' is a list input of {len(elems)} arrays (Concat's "
                                    f"list input): give a list or tuple of arrays, got {type(v).__name__}")
                if len(v) != len(elems):
                    raise ShapeError(f"{what} '{k}': expected a list of {len(elems)} arrays, got "
                                     f"{len(v)}")
                out.update(zip(elems, v, strict=True))
            else:
                out[k] = v
        _refuse_lists({k: v for k, v in d.items() if k not in lists}, what)
        return out

    def _build_with_lists(self, params: Any, inputs: Any) -> bool:
        """Build a deferred program when the first call's inputs or params hold a list (their
        shapes are the elements'); True when it built one."""
        if self._program is not None:  # type: ignore[attr-defined]
            return False
        given = {**(params if isinstance(params, Mapping) else {}),
                 **(inputs if isinstance(inputs, Mapping) else {})}
        if not any(is_array_list(v) for v in given.values()):
            return False
        shapes = {k: [tuple(e.shape) for e in v] if is_array_list(v)
                  else tuple(getattr(v, "shape", None) or np.shape(v))
                  for k, v in given.items() if k in (inputs or {}) or is_array_list(v)}
        from .program import build_program  # (program.py imports this module)
        try:
            self._set_program(build_program(shapes=shapes, **self._build))  # type: ignore[attr-defined]
        except KeyMismatchError:
            return False  # (an unknown key: the call reports it)
        return True

    def evaluate(self, params: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, Any] | None = None,
                 output_gradients: Mapping[str, Any] | bool | None = None, **kw: Any) -> Any:
        """:meth:`CompiledModel.evaluate <mithril.compiler.compiled_model.CompiledModel.evaluate>`,
        a list input given (and a trainable one's gradient returned) as a list."""
        if not kw:  # (a loop's steady state, which holds no list: see .steady)
            got = self._steady_evaluate(params, inputs, output_gradients)  # type: ignore[attr-defined]
            if got is not None:
                return got
        if kw.get("data") is not None and inputs is None:
            inputs = kw.pop("data")
        _refuse_lists(output_gradients, "output gradient")  # (no output is a list)
        prog = self._program  # type: ignore[attr-defined]
        if prog is not None and not prog.lists:  # the common case: a list is only refused
            _refuse_lists(params, "parameter")
            _refuse_lists(inputs, "input")
            return super().evaluate(params, inputs, output_gradients, **kw)  # type: ignore[misc]
        built = self._build_with_lists(params, inputs)
        try:
            result = super().evaluate(self._unpack(params, "parameter"),  # type: ignore[misc]
                                      self._unpack(inputs, "input"), output_gradients, **kw)
        except BaseException:
            if built:
                self._unbuild()  # type: ignore[attr-defined]
            raise
        if isinstance(result, tuple) and output_gradients is not None and output_gradients is not False:
            return (result[0], self._pack(result[1]), *result[2:])
        return result

    @property
    def input_keys(self) -> tuple[str, ...]:
        keys = super().input_keys  # type: ignore[misc]
        return tuple(self._pack(dict.fromkeys(keys))) if self._lists() else keys

    @property
    def parameter_shapes(self) -> dict[str, Any]:
        return self._pack(super().parameter_shapes)  # type: ignore[misc]

    @property
    def shapes(self) -> dict[str, Any]:
        return self._pack(super().shapes)  # type: ignore[misc]

    def get_shapes(self) -> dict[str, Any]:
        return {k: [list(e) for e in s] if k in self._lists() else None if s is None else list(s)
                for k, s in self.shapes.items()}

    def randomize_params(self, excluded_keys: Any = None) -> dict[str, Any]:
        if excluded_keys is not None:
            lists = self._lists()
            excluded = [excluded_keys] if isinstance(excluded_keys, str) else list(excluded_keys)
            excluded_keys = [e for k in excluded for e in lists.get(k, (k,))]
        return self._pack(super().randomize_params(excluded_keys))  # type: ignore[misc]

    def reached_parameters(self, outputs: Any = None) -> tuple[str, ...]:
        reached = super().reached_parameters(outputs)  # type: ignore[misc]
        # (without lists: the program's cached tuple itself, which callers compare by identity)
        return tuple(self._pack(dict.fromkeys(reached))) if self._lists() else reached

    def get_parameters(self) -> dict[str, Any]:
        return self._pack(super().get_parameters())  # type: ignore[misc]
