"""Primitives that move elements without computing: Reshape, Transpose, Concat and Indexer
(static indices and slices). ``Split`` lives in :mod:`mithril.models.split` (importable from
here too)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .connection_types import TBD
from .model import IOKey
from .operator import Operator, ShapeError, fmt, restored_on_error, torch_of, unify


class Reshape(Operator):
    """The input with shape ``shape``; one entry may be -1 (or None): the size left over.

    As published, ``shape`` may hold shape wires (:mod:`mithril.models.shape_wires`):
    ``Reshape(shape=(x.shape[0], x.shape[1], -1))``, ``Reshape(x.shape[:3])``, and it may be
    given in ``connect(shape=...)`` (``Reshape().connect(input=..., shape=...)``). The
    connections the wires read are then extra inputs (``shape_ref0`` ...) that only give
    their shapes (no gradient). A size may also be a connection whose value the compiler
    knows (the published segformer's ``x.reshape((B, C, height, width))``: an extra input
    ``shape_value0`` ... read for its value; see :mod:`mithril.models.size_values`)."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, shape: Sequence[Any] | None = None) -> None:
        self._set_shape(shape)

    def _set_shape(self, shape: Any) -> None:
        from .shape_wires import ShapeArgs, ShapeWire, is_symbolic

        self.shape_args: ShapeArgs | None = None
        self.inputs = ("input",)
        if shape is None or shape is TBD:  # (published: Reshape(), the shape in connect)
            self.shape = None
            return
        if isinstance(shape, ShapeWire):
            shape = (shape,)
        from .expressions import ConnectionOps

        if isinstance(shape, ConnectionOps):  # a Shape / Size block's output: its value
            self._set_wired(shape)
            return
        self.__dict__.pop("value_inputs", None)
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"Reshape: shape must be a tuple or list of sizes (ints, -1, None "
                            f"or shape wires such as x.shape[0]), got {shape!r}")
        from .size_values import SizeValue, is_connection, size_values

        for d in shape:  # (a str or a float is no size: int('h') and int(1.5) are not one)
            if not isinstance(d, ShapeWire) and not is_connection(d) and d is not None and (
                    isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer))):
                raise TypeError(f"Reshape: a size is an int, -1, None or a shape wire (or a "
                                f"connection whose value is known at compile time), got {d!r}")
        if is_symbolic(shape) or any(is_connection(d) for d in shape):
            self.shape = size_values(tuple(
                -1 if d is None else d if isinstance(d, ShapeWire) or is_connection(d) else int(d)
                for d in shape))
            self.shape_args = ShapeArgs([d for d in self.shape if isinstance(d, ShapeWire)])
            # connections read for their values (see size_values.py): inputs after the wires'
            read = [d for d in self.shape if isinstance(d, SizeValue)]
            self.shape_args.refs += tuple(d.ref for d in read)
            self.shape_args.keys += tuple(d.key for d in read)
            if read:
                self.value_inputs = frozenset(d.key for d in read)
            self.inputs = ("input", *self.shape_args.keys)
            self.any_dtype_inputs = frozenset(self.inputs)
            statics = [d for d in self.shape if not isinstance(d, (ShapeWire, SizeValue))]
        else:
            self.shape = tuple(-1 if d is None else int(d) for d in shape)
            statics = list(self.shape)
        if sum(d == -1 for d in statics) > 1 or any(d < -1 for d in statics):
            raise ValueError(f"Reshape: at most one -1 (or None) and no other negative size, "
                             f"got {tuple(shape)}")

    def _set_wired(self, ref: Any) -> None:
        """``shape`` is a connection whose value the compiler knows (a ``Shape`` / ``Size``
        output): an input read for its value; ``ref`` (a connection object) is wired by the
        model the block is added to, a name by ``connect``."""
        from .shape_wires import ShapeArgs

        self.shape, self.shape_args = "wired", None
        if ref is not None:
            self.shape_args = ShapeArgs([])
            self.shape_args.refs, self.shape_args.keys = (ref,), ("shape",)
        self.inputs = ("input", "shape")
        self.any_dtype_inputs = frozenset(self.inputs)
        self.value_inputs = frozenset({"shape"})

    def connect(self, *args: Any, **connections: Any) -> Any:
        """Bind terminals; ``shape=`` (a tuple of sizes or shape wires) sets the shape, as the
        published ``Reshape().connect(shape=...)`` (``Reshape(shape)`` here otherwise);
        positionally ``input``, ``shape``, ``output``, as published."""
        if len(args) > 3:
            raise TypeError(f"Reshape.connect takes at most 3 positional connections (input, "
                            f"shape, output), got {len(args)}")
        for key, v in zip(("input", "shape", "output"), args, strict=False):
            if key in connections:
                raise TypeError(f"Reshape.connect got two values for {key!r}")
            connections[key] = v
        args = ()
        if "shape" not in connections:
            if self.shape is None:
                raise TypeError("Reshape: no shape given: Reshape(shape) or "
                                "Reshape().connect(input=..., shape=...)")
            return super().connect(*args, **connections)
        shape = connections.pop("shape")
        if self.shape is not None and shape is not TBD:
            given = "a connection" if self.shape == "wired" else list(self.shape)
            raise TypeError(f"Reshape: the shape is given twice (Reshape({given}) and "
                            "connect(shape=...))")
        before = (self.shape, self.shape_args, self.inputs, self.__dict__.get("any_dtype_inputs"),
                  self.__dict__.get("value_inputs"))
        if isinstance(shape, (str, IOKey)):  # a named wire: bound here, its value read at compile time
            self._set_wired(None)
            connections["shape"] = shape
        else:
            self._set_shape(shape)
        try:
            return super().connect(*args, **connections)
        except BaseException:
            self.shape, self.shape_args, self.inputs = before[:3]
            for key, v in (("any_dtype_inputs", before[3]), ("value_inputs", before[4])):
                if v is None:
                    self.__dict__.pop(key, None)
                else:
                    self.__dict__[key] = v
            raise

    def _target(self, shapes: Mapping[str, Any], values: Mapping[str, Any] | None = None) -> tuple | None:
        if self.shape is None:
            raise ShapeError("Reshape: no shape given: Reshape(shape) or "
                             "Reshape().connect(input=..., shape=...)")
        if self.shape == "wired":
            return _wired_sizes((values or {}).get("shape"))
        if self.shape_args is None:
            return self.shape
        from .shape_wires import resolve_sizes

        if "value_inputs" in self.__dict__:  # sizes given by connections
            from .size_values import resolve

            target = resolve(self.shape, self.shape_args.lookup(shapes), shapes, values or {},
                             "Reshape")
        else:
            target = resolve_sizes(self.shape, self.shape_args.lookup(shapes), "Reshape")
        if target is not None and sum(d == -1 for d in target) > 1:
            raise ShapeError(f"Reshape: at most one -1 in the shape, got {list(target)}")
        return target

    def infer_shape(self, shapes, values: Mapping[str, Any] | None = None):
        if self.shape == "wired" and "shape" not in (values or {}):
            raise ShapeError("Reshape: the value of 'shape' is computed by the run, so the "
                             "output's shape is not known at compile time: give sizes, shape "
                             "wires (x.shape[0]) or a Shape / Size block's output")
        if self.shape != "wired" and "value_inputs" in self.__dict__:
            from .size_values import check_known

            check_known(self.shape, values, "Reshape")
        s, target = shapes.get("input"), self._target(shapes, values)
        if s is None or target is None:
            return None if target is None else tuple(None if d == -1 else d for d in target)
        if any(d is None for d in s) or any(d is None for d in target):
            free = [d for d in target if d is None or d == -1]
            if len(free) == 1 and all(d is not None for d in s):  # that one is what is left
                known = math.prod(d for d in target if d is not None and d != -1)
                n = math.prod(s)
                if known == 0 or n % known:
                    raise ShapeError(f"cannot reshape {fmt(s)} into {list(target)}")
                return tuple(n // known if d is None or d == -1 else d for d in target)
            return tuple(None if d == -1 else d for d in target)
        known = math.prod(d for d in target if d != -1)
        n = math.prod(s)
        if -1 in target:
            if known == 0 or n % known:
                raise ShapeError(f"cannot reshape {fmt(s)} into {list(target)}")
            return tuple(n // known if d == -1 else d for d in target)
        if n != known:
            raise ShapeError(f"cannot reshape {fmt(s)} ({n} elements) into {list(target)}")
        return target

    def forward(self, xp: Any, input: Any, **refs: Any) -> Any:
        if self.shape == "wired":
            v = refs["shape"]
            return input.reshape(_wired_sizes(v.tolist() if hasattr(v, "tolist") else v))
        if self.shape_args is None:
            return input.reshape(self.shape)
        from .shape_wires import array_shapes

        values = None
        if "value_inputs" in self.__dict__:  # sizes given by connections: their values
            from .size_values import run_values

            values = run_values(refs, self.shape, "Reshape")
        return input.reshape(self._target(array_shapes(refs, self.shape_args.keys), values))

    def vjp(self, g, out, args, wrt):
        return {"input": g.reshape(args["input"].shape)}

    def __repr__(self) -> str:
        if self.shape == "wired":
            return "Reshape(shape=<connection>)"
        return f"Reshape({None if self.shape is None else list(self.shape)})"


def _wired_sizes(v: Any) -> tuple | None:
    """The sizes a Shape / Size output holds (None: not known yet), checked: integers, at
    most one -1."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.ndim > 1 or a.dtype.kind not in "iu":
        raise ShapeError(f"Reshape: 'shape' must hold integers (a Shape / Size output), got {a!r}")
    sizes = tuple(int(d) for d in a.reshape(-1))
    if sum(d == -1 for d in sizes) > 1 or any(d < -1 for d in sizes):
        raise ShapeError(f"Reshape: at most one -1 and no other negative size, got {list(sizes)}")
    return sizes


class Transpose(Operator):
    """Axes permuted by ``axes`` (default: reversed, as ``numpy.transpose``)."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, axes: Sequence[int] | None = None) -> None:
        self.axes = None if axes is None else tuple(int(a) for a in axes)

    def _perm(self, ndim: int) -> tuple[int, ...]:
        if self.axes is None:
            return tuple(reversed(range(ndim)))
        perm = tuple(a % ndim if -ndim <= a < ndim else -1 for a in self.axes)
        if sorted(perm) != list(range(ndim)):
            raise ShapeError(f"axes {list(self.axes)} are not a permutation of {ndim} axes")
        return perm

    def infer_shape(self, shapes):
        s = shapes.get("input")
        return None if s is None else tuple(s[a] for a in self._perm(len(s)))

    def forward(self, xp: Any, input: Any) -> Any:
        perm = self._perm(input.ndim)
        return input.permute(perm) if torch_of(xp) is not None else xp.transpose(input, perm)

    def vjp(self, g, out, args, wrt):
        return {"input": np.transpose(g, np.argsort(self._perm(g.ndim)))}

    def __repr__(self) -> str:
        return f"Transpose({None if self.axes is None else list(self.axes)})"


class Concat(Operator):
    """Arrays joined along ``axis``; ``axis=None`` (as published and ``numpy.concatenate``)
    flattens each first and joins the flat arrays.

    Two forms of its inputs: ``Concat(n)`` takes ``input1`` .. ``input<n>``; ``Concat()``,
    the published form, takes one ``input`` that is a list, given in ``connect(input=[a, b,
    ...])`` (names, ``IOKey``s, connections, expressions or constants; its gradient is one per
    element). A wire carries one array here, so the list's length fixes ``n``: the block then
    is ``Concat(n)`` (``input1`` .. ``input<n>`` bound to the list's elements in order).
    ``Concat()`` connected by name to ``input1`` .. ``input<k>`` is ``Concat(k)``."""

    def __init__(self, n: int | None = None, axis: int | None = 0) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"Concat: n must be a positive int (or None: a list input), got {n!r}")
        if axis is not None and (isinstance(axis, (bool, np.bool_))
                                 or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"Concat: axis must be an int or None, got {axis!r}")
        self.axis = None if axis is None else int(axis)
        self._set_n(n)

    def _set_n(self, n: int | None) -> None:
        self.n = None if n is None else int(n)
        self.inputs = ("input",) if n is None else tuple(f"input{i + 1}" for i in range(int(n)))

    def connect(self, *args: Any, **connections: Any) -> Any:
        """Bind terminals as any block does; ``input=[a, b, ...]`` (a list or tuple) binds the
        published list input: ``input1`` .. ``input<len>``, fixing ``n`` (see the class).
        As published, positionally ``input``, ``axis``, ``output``, and ``axis=`` (an int or
        None) sets the axis."""
        connections = self._named(args, connections, ("input", "axis", "output"))
        if "axis" not in connections:
            return self._connect(**connections)
        axis = connections.pop("axis")
        if axis is not None and (isinstance(axis, (bool, np.bool_))
                                 or not isinstance(axis, (int, np.integer))):
            raise TypeError(f"Concat.connect: axis must be an int or None, got {axis!r}")
        before = self.axis
        self.axis = None if axis is None else int(axis)
        try:
            return self._connect(**connections)
        except BaseException:
            self.axis = before  # a call that raises changes nothing
            raise

    def _connect(self, **connections: Any) -> Any:
        items = connections.get("input")
        if not isinstance(items, (list, tuple)):
            numbered = [int(k[5:]) for k in connections if k[:5] == "input" and k[5:].isdigit()]
            if self.n is not None or not numbered or min(numbered) < 1:
                return super().connect(**connections)
            # Concat() given input1 .. input<k> by name is Concat(k) (n once defaulted to 2)
            self._set_n(max(numbered))
            try:
                return super().connect(**connections)
            except BaseException:
                self._set_n(None)  # a call that raises changes nothing
                raise
        if not items:
            raise ValueError("Concat.connect(input=[...]): the list is empty")
        if self.n is not None and self.n != len(items):
            raise ValueError(f"Concat.connect(input=[...]): this Concat takes {self.n} inputs "
                             f"(input1 .. input{self.n}), got a list of {len(items)}")
        rest = {k: v for k, v in connections.items() if k != "input"}
        named = {f"input{i + 1}": v for i, v in enumerate(items)}
        before = self.n
        self._set_n(len(items))
        try:
            return super().connect(**named, **rest)
        except BaseException:
            self._set_n(before)  # a call that raises changes nothing
            raise

    __call__ = connect

    def infer_shape(self, shapes):
        if self.n is None:
            raise ShapeError("Concat() takes a list input: connect(input=[a, b, ...]), or "
                             "Concat(n) with input1 .. input<n>")
        ins = [shapes.get(k) for k in self.inputs]
        if any(s is None for s in ins):
            return None
        if self.axis is None:
            sizes = [None if any(d is None for d in s) else math.prod(s) for s in ins]
            return (None if None in sizes else sum(sizes),)
        r = len(ins[0])
        if not -r <= self.axis < r:
            raise ShapeError(f"axis {self.axis} is out of range for rank {r}")
        ax = self.axis % r
        out: tuple | None = None
        for k, s in zip(self.inputs, ins, strict=True):
            if len(s) != r:
                raise ShapeError(f"'{k}' has rank {len(s)}, '{self.inputs[0]}' rank {r}")
            rest = (*s[:ax], None, *s[ax + 1:])
            out = unify(out, rest, self.inputs[0], k)
        sizes = [s[ax] for s in ins]
        total = None if any(d is None for d in sizes) else sum(sizes)
        assert out is not None
        return (*out[:ax], total, *out[ax + 1:])

    def forward(self, xp: Any, **inputs: Any) -> Any:
        arrays = [inputs[k] for k in self.inputs]
        if self.axis is None:
            arrays = [a.reshape(-1) for a in arrays]
        torch = torch_of(xp)
        if torch is not None:
            return torch.cat(arrays, dim=self.axis or 0)
        return xp.concatenate(arrays, axis=self.axis or 0)

    def vjp(self, g, out, args, wrt):
        if self.axis is None:
            sizes = [args[k].size for k in self.inputs]
            parts = np.split(g, np.cumsum(sizes)[:-1])
            return {k: p.reshape(args[k].shape) for k, p in zip(self.inputs, parts, strict=True)
                    if k in wrt}
        sizes = [args[k].shape[self.axis] for k in self.inputs]
        parts = np.split(g, np.cumsum(sizes)[:-1], axis=self.axis)
        return {k: p for k, p in zip(self.inputs, parts, strict=True) if k in wrt}

    def __repr__(self) -> str:
        return f"Concat(n={self.n}, axis={self.axis})"


def _mask_axes(s: tuple, index: Any) -> tuple:
    """``s`` with the free dimensions that a boolean mask of ``index`` covers set to the
    mask's sizes (a mask fixes the axes it reads), so that they are checked, not free."""
    items = index if isinstance(index, tuple) else (index,)
    def width(i: Any) -> int:
        if i is None:
            return 0
        return np.ndim(i) if isinstance(i, np.ndarray) and i.dtype == bool else 1
    cut = next((k for k, i in enumerate(items) if i is Ellipsis), len(items))
    after = sum(width(i) for i in items[cut + 1:])
    out = list(s)
    for part, axis in ((items[:cut], 0), (items[cut + 1:], len(s) - after)):
        for i in part:
            if isinstance(i, np.ndarray) and i.dtype == bool:
                for k, n in enumerate(i.shape):
                    if 0 <= axis + k < len(out) and out[axis + k] is None:
                        out[axis + k] = n
            axis += width(i)
    return tuple(out)


def _index_shape(s: tuple, index: Any) -> tuple:
    """The shape of ``x[index]`` for ``x`` of partial shape ``s``: computed twice on
    stride-0 arrays with two different sizes standing for free dimensions; entries that
    differ depend on a free dimension and are free too."""
    s = _mask_axes(s, index)
    shape_at = lambda sizes: np.broadcast_to(np.empty((), np.int8), tuple(sizes))[index].shape  # noqa: E731
    try:
        a, b = (shape_at([fill if d is None else d for d in s]) for fill in (10007, 10009))
    except IndexError as e:
        raise ShapeError(f"index {index!r} does not fit shape {fmt(s)}: {e}") from None
    shape = [x if x == y else None for x, y in zip(a, b, strict=True)]
    # a slice of a free axis shorter than its bounds is clipped (x[:3] of 2 rows is 2 rows):
    # sizes just below each bound find the entries that depend on the free axis there too
    items = index if isinstance(index, tuple) else (index,)
    small = {max(abs(int(f)) - 1, 0) for i in items if isinstance(i, slice)
             for f in (i.start, i.stop) if f is not None}
    for k, n in ((k, n) for k, d in enumerate(s) if d is None for n in small):
        try:
            c = shape_at([n if j == k else 10007 if d is None else d for j, d in enumerate(s)])
        except IndexError:  # (an int index past n: the run refuses such an input)
            continue
        shape = [x if x == y else None for x, y in zip(shape, c, strict=True)]
    return tuple(shape)


def _as_index(i: Any) -> Any:
    """Integer lists as integer arrays (JAX refuses lists as indices); boolean lists and
    arrays stay boolean masks (cast to int they would read entries 0 and 1)."""
    if not isinstance(i, (list, np.ndarray)):
        return i
    a = np.asarray(i)
    if a.dtype == bool:
        return a
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"Indexer: an index array must hold ints or bools, got {a.dtype} ({i!r})")
    return a.astype(np.int64)


def _positive_steps(index: Any, shape: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
    """torch slices take no negative step: the axes that such slices of ``index`` read (to
    flip first) and the index with those slices as positive steps over the flipped axes
    (position ``p`` of an axis of size ``n`` is ``n - 1 - p`` once flipped)."""
    items = index if isinstance(index, tuple) else (index,)
    if not any(isinstance(i, slice) and i.step is not None and i.step < 0 for i in items):
        return (), index
    used = sum(np.ndim(i) if isinstance(i, np.ndarray) and i.dtype == bool else 1
               for i in items if i is not None and i is not Ellipsis)
    axis, flips, out = 0, [], []
    for i in items:
        if i is None or i is Ellipsis:
            axis += 0 if i is None else len(shape) - used
            out.append(i)
            continue
        if isinstance(i, slice) and i.step is not None and i.step < 0:
            n = shape[axis]
            start, stop, step = i.indices(n)
            flips.append(axis)
            i = slice(n - 1 - start, n - 1 - stop, -step)
        out.append(i)
        axis += np.ndim(i) if isinstance(i, np.ndarray) and i.dtype == bool else 1
    return tuple(flips), tuple(out)


#: an index whose shape wires' sizes are not known yet
_UNKNOWN = object()


class Indexer(Operator):
    """``input[index]`` for a fixed ``index``: an int, a slice (negative steps too), ``None``,
    ``...`` or a tuple of those (integer lists index too; their repeats add up in the
    gradient; a boolean list or array is a constant mask, as in NumPy)."""

    any_dtype_inputs = frozenset({"input"})

    def __init__(self, index: Any = TBD) -> None:
        self._configure(index)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As any block's; ``index=`` (published: a terminal) sets the index here: a static
        index or a ``Slice`` block's output (its slice); positionally ``input``, ``index``,
        ``output``, as published."""
        connections = self._named(args, connections, ("input", "index", "output"))
        if "index" not in connections:
            if self.index is TBD:
                raise TypeError("Indexer: no index given: Indexer(index) or "
                                "connect(input=..., index=...)")
            return super().connect(**connections)
        if self.index is not TBD:
            raise TypeError(f"Indexer: the index is given twice (Indexer({self.index!r}) and "
                            "connect(index=...))")
        from .connections import Terminal
        from .scalar_blocks import Slice

        index = connections.pop("index")
        if isinstance(index, Terminal) and isinstance(index.block, Slice):
            index = index.block.slice
        elif isinstance(index, Terminal):
            raise TypeError(f"Indexer.connect(index={index!r}): an index is static here (ints, "
                            "slices, None, ..., a Slice block's output), not a connection")
        with restored_on_error(self):
            self._configure(index)
            return super().connect(**connections)

    __call__ = connect

    def _configure(self, index: Any) -> None:
        from .shape_wires import ShapeArgs, ShapeWire

        self.shape_args = None
        if index is TBD:  # (published: Indexer(), the index in connect)
            self.index = TBD
            return
        if isinstance(index, list) and any(isinstance(i, (slice, type(None), type(Ellipsis)))
                                           for i in index):
            index = tuple(index)
        self.index = (tuple(_as_index(i) for i in index) if isinstance(index, tuple)
                      else _as_index(index))
        # shape wires as ints or slice ends (published: x[0:q.shape[2]]): the connections
        # they read are extra inputs (shape_ref0 ...), the index resolved from their shapes
        items = self.index if isinstance(self.index, tuple) else (self.index,)
        wires = [f for i in items for f in ((i.start, i.stop, i.step) if isinstance(i, slice)
                                            else (i,)) if isinstance(f, ShapeWire)]
        self.shape_args = ShapeArgs(wires) if wires else None
        if wires:
            self.inputs = ("input", *self.shape_args.keys)  # type: ignore[union-attr]
            self.any_dtype_inputs = frozenset(self.inputs)

    def _index(self, shapes: Mapping[str, Any]) -> Any:
        """The index with its shape wires' sizes (:data:`_UNKNOWN`: one not known yet; an
        index may itself be None, a new axis)."""
        if self.shape_args is None:
            return self.index
        from .shape_wires import ShapeWire

        lookup, unknown = self.shape_args.lookup(shapes), []

        def size(f: Any) -> Any:
            if not isinstance(f, ShapeWire):
                return f
            v = f.evaluate(lookup)
            unknown.extend([f] if v is None else [])
            return v

        def one(i: Any) -> Any:
            return slice(size(i.start), size(i.stop), size(i.step)) if isinstance(i, slice) \
                else size(i)

        out = tuple(map(one, self.index)) if isinstance(self.index, tuple) else one(self.index)
        return _UNKNOWN if unknown else out

    def _run_index(self, refs: Mapping[str, Any]) -> Any:
        if self.shape_args is None:
            return self.index
        from .shape_wires import array_shapes

        return self._index(array_shapes(refs, self.shape_args.keys))

    def infer_shape(self, shapes):
        if self.index is TBD:
            raise ShapeError("Indexer: no index given: Indexer(index) or connect(input=..., "
                             "index=...)")
        s, index = shapes.get("input"), self._index(shapes)
        return None if s is None or index is _UNKNOWN else _index_shape(s, index)

    def _ints_with_arrays(self) -> bool:
        """The index holds an int and an index array (list or mask): NumPy then reads the
        ints as index arrays too, and puts the result axes first when a slice, None or
        ``...`` separates them (``x[0, :, [1]]`` is (1, n)); torch selects the ints first
        ((n, 1))."""
        items = self.index if isinstance(self.index, tuple) else (self.index,)
        return (any(isinstance(i, np.ndarray) for i in items)
                and any(isinstance(i, (int, np.integer)) for i in items))

    def forward(self, xp: Any, input: Any, **refs: Any) -> Any:
        index = self._run_index(refs)
        torch = torch_of(xp)
        if torch is not None:
            if self._ints_with_arrays():  # NumPy's order: the positions NumPy reads, gathered
                pos = np.arange(math.prod(input.shape)).reshape(tuple(input.shape))[index]
                flat = torch.as_tensor(np.array(pos, np.int64, order="C"), device=input.device)
                return input.reshape(-1)[flat]
            flips, index = _positive_steps(index, tuple(input.shape))
            return (torch.flip(input, flips) if flips else input)[index]
        return input[index]

    def passes_value(self, values: Mapping[str, Any]) -> Any:
        """A static index of a known value (``x.shape[2:][0]``)."""
        v = values.get("input")
        return None if v is None or self.shape_args is not None else np.asarray(v)[self.index]

    def vjp(self, g, out, args, wrt):
        gx = np.zeros_like(args["input"])
        np.add.at(gx, self._run_index(args), g)
        return {"input": gx}

    def __repr__(self) -> str:
        return f"Indexer({self.index!r})"


from .split import Split, _Chunk  # noqa: E402,F401  (importable from here, as before)
