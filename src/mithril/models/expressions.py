"""Arithmetic and indexing on connection objects: expressions that become operator blocks.

Connection objects (a block's terminals such as ``lin.output``, ``model.cout``,
``model.input``, and :class:`~mithril.models.connections.IOKey`) take Python's operators, as in
the published Mithril::

    model |= Relu()(input=lin1.output + lin2.output * 2.0, output="output")
    model |= Buffer()(input=model.x[:, 0].sum(axis=-1), output="s")

An operator on connection objects builds an :class:`Expression`: an operator (one of the
existing blocks: ``Add``, ``Subtract``, ``Multiply``, ``Divide``, ``Power``,
``MatrixMultiply``, ``Negate``, ``Absolute``, ``Sqrt``, ``Exponential``, ``Indexer``,
``Transpose``, ``Reshape``, ``Sum``, ``Mean``, ``Max``, ``Min``, ``Cast``, ``Floor``,
``Clamp``) and its operands:
connection objects, other expressions and constants. Nothing is added to any model then. When
an expression is connected to a block's terminal (``model |= block(input=expr)`` or
``block.connect(input=expr)``), its operators are added to that model, sub-expressions first,
as anonymous blocks: their outputs are internal wires, and each block is named after its class
like any other (``add``, ``multiply_1``, ``indexer``: the rows of ``summary()``). The operands
are wired as ``connect(...)`` would wire them:

* a terminal object: the wire it refers to (the model's own connections and its direct
  children's terminals, as in ``connect(...)``);
* an ``IOKey``: the named connection (created as an input if new), or its constant value;
* a number, list or NumPy array: a constant input folded in at compile time; a float one in
  the model's float dtype, an integer one an integer (int64; int32 on JAX), a boolean one a
  float. Two operands of different dtypes meet as torch's tensor and number do
  (:func:`~mithril.models.operator.promote`): ``x * 2`` keeps a float32 ``x`` float32, and
  integer arithmetic stays integer (``(pos > 0).cast(ml.int16) * 16``, T5's buckets).

Connected twice to one model, the same expression object is added once (its output wire is
reused); connected to another model, it is added there again. Binary operators broadcast as
NumPy does. Indices, axes, shapes and dtypes are static (fixed when the expression is made),
as the operators' constructor arguments are.

What an operator computes (its shape rule, its forward on every backend and its NumPy VJP)
lives in its operator class only; this module only builds blocks. Bad input is refused with
the operator and the connection named: an unsupported operand type or index when the
expression is made, a connection the model cannot reach when it is connected (the model is
then unchanged). Comparisons, ``//``, ``&``, ``|``, ``^``, ``~``, shifts and the published
``size`` / ``prod`` / ``var`` are not offered (there is no such
operator here): they raise a ``TypeError`` or ``AttributeError`` saying so. ``shape`` is:
every connection object's ``.shape`` (an ``IOKey``'s too) is a shape wire
(:mod:`mithril.models.shape_wires`).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .expression_indices import _check_index, _index_text
from .operator import Operator

if TYPE_CHECKING:  # model.py imports this module: no runtime import back
    from .model import Connection, Model

#: operator class -> the module that defines it (imported when first used: shaping.py
#: imports model.py, which imports this module)
_MODULES = {
    "Add": "arithmetic", "Multiply": "arithmetic", "MatrixMultiply": "arithmetic",
    "Subtract": "primitives", "Divide": "primitives", "Power": "primitives",
    "Negate": "primitives", "Absolute": "primitives", "Sqrt": "primitives",
    "Exponential": "primitives", "Cast": "primitives",
    "Sum": "reductions", "Mean": "reductions", "Max": "reductions", "Min": "reductions",
    "Indexer": "shaping", "Transpose": "shaping", "Reshape": "shaping",
    "ToTensor": "scalar_blocks", "Item": "scalar_blocks",
    "Sine": "unary_primitives", "Cosine": "unary_primitives",
    "Floor": "published_elementwise", "Clamp": "published_elementwise", "Where": "primitives",
    **dict.fromkeys(("Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual",
                     "LogicalAnd", "LogicalOr", "LogicalXOr", "LogicalNot"), "comparisons"),
}

#: operators of the published Mithril's connections that have no operator here
_NOT_OFFERED_OPS = {
    "//": "FloorDivide", "<<": "ShiftLeft", ">>": "ShiftRight",
}
_NOT_OFFERED_METHODS = frozenset({
    "size", "prod", "var", "len", "atleast_1d",
})

Operand = Union["ConnectionOps", np.ndarray]


def _op(name: str, *args: Any, **kwargs: Any) -> Operator:
    module = importlib.import_module(f"{__package__}.{_MODULES[name]}")
    return getattr(module, name)(*args, **kwargs)


def _text(v: Any) -> str:
    """How an operand reads in an expression's repr."""
    if isinstance(v, np.ndarray):
        return repr(v.item()) if v.ndim == 0 else f"array{list(v.shape)}"
    from .connections import IOKey

    if isinstance(v, IOKey) and v.name is None and v.value is not None:
        return _text(v.value)
    return repr(v)


def _has_connection(v: Any) -> bool:
    if isinstance(v, ConnectionOps):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_connection(i) for i in v)
    if isinstance(v, slice):
        return any(_has_connection(i) for i in (v.start, v.stop, v.step))
    return False


def _static(value: Any, what: str, receiver: ConnectionOps) -> None:
    """A ``TypeError`` if an argument (index, axis, shape) is a connection: they are fixed here."""
    if _has_connection(value):
        raise TypeError(f"{receiver!r}{what}: the argument must be static (numbers, slices, "
                        "None, ...), not a connection: indices, axes and shapes are fixed when "
                        "the expression is made")


def _constant(v: Any, symbol: str, this: ConnectionOps) -> Operand:
    """An operand as given (a connection object) or as a float constant array."""
    if isinstance(v, ConnectionOps):  # (an unnamed IOKey(): a new input, one wire per object)
        return v
    from .shape_wires import ShapeWire, as_operand

    if isinstance(v, ShapeWire):  # (x.shape[2] met with a connection: Size(2) of x)
        return as_operand(v, symbol)
    if isinstance(v, (bool, int, float, list, tuple, np.ndarray, np.generic)) and not _has_connection(v):
        try:
            arr = np.asarray(v)
        except ValueError:  # ragged lists
            arr = np.asarray(0, dtype=object)
        if arr.dtype.kind == "b":
            return arr.astype(np.float64)
        if arr.dtype.kind in "iuf":  # (an int stays an int: Operator's promote)
            return arr
    raise TypeError(f"unsupported operand for '{symbol}' with {this!r}: {type(v).__name__} "
                    f"{v!r:.60}; an operand is a connection (a block's terminal, model.cout, an "
                    "IOKey, an expression) or a number / numeric list or array")


def _operand(v: Any, symbol: str, this: ConnectionOps) -> Operand:
    """A comparison's or logical operator's operand: as :func:`_constant`, but a number
    keeps its kind (``mask & True`` stays bool, ``pos >= 3`` compares integers)."""
    if isinstance(v, (bool, int, float, list, tuple, np.ndarray, np.generic)) and not _has_connection(v):
        arr = np.asarray(v) if not isinstance(v, (list, tuple)) or v else np.asarray(v, float)
        if arr.dtype.kind in "biuf":
            return arr
    return _constant(v, symbol, this)


class ConnectionOps:
    """Python operators and array methods on connection objects (a mixin of ``Terminal``,
    ``IOKey`` and :class:`Expression`): each returns an :class:`Expression`; nothing is added
    to a model until the expression is connected. See the module docstring."""

    __slots__ = ()

    @property
    def shape(self) -> Any:
        """As published (``x.shape``, ``expr.shape``, ``IOKey("x").shape``): the shape of this
        connection's value as a shape wire (:mod:`.shape_wires`, known at compile time)."""
        from .shape_wires import shape_of

        return shape_of(self)

    #: NumPy arrays and scalars defer to the reflected operators (``2.0 * conn``,
    #: ``np.ones(3) + conn``) instead of broadcasting over the connection as an object
    __array_ufunc__ = None

    # -- binary arithmetic (broadcasting) ---------------------------------------------------
    def _binary(self, other: Any, name: str, keys: tuple[str, str], symbol: str,
                reflected: bool = False) -> Expression:
        b = _constant(other, symbol, self)
        left, right = (b, self) if reflected else (self, b)
        return Expression(_op(name), {keys[0]: left, keys[1]: right},
                          f"({_text(left)} {symbol} {_text(right)})")

    def __add__(self, other: Any) -> Expression:
        return self._binary(other, "Add", ("left", "right"), "+")

    def __radd__(self, other: Any) -> Expression:
        return self._binary(other, "Add", ("left", "right"), "+", reflected=True)

    def __sub__(self, other: Any) -> Expression:
        return self._binary(other, "Subtract", ("left", "right"), "-")

    def __rsub__(self, other: Any) -> Expression:
        return self._binary(other, "Subtract", ("left", "right"), "-", reflected=True)

    def __mul__(self, other: Any) -> Expression:
        return self._binary(other, "Multiply", ("left", "right"), "*")

    def __rmul__(self, other: Any) -> Expression:
        return self._binary(other, "Multiply", ("left", "right"), "*", reflected=True)

    def __truediv__(self, other: Any) -> Expression:
        return self._binary(other, "Divide", ("numerator", "denominator"), "/")

    def __rtruediv__(self, other: Any) -> Expression:
        return self._binary(other, "Divide", ("numerator", "denominator"), "/", reflected=True)

    def __pow__(self, other: Any, modulo: Any = None) -> Expression:
        if modulo is not None:
            raise TypeError(f"pow({self!r}, ..., modulo): a modulo is not offered")
        return self._binary(other, "Power", ("base", "exponent"), "**")

    def __rpow__(self, other: Any) -> Expression:
        return self._binary(other, "Power", ("base", "exponent"), "**", reflected=True)

    def __matmul__(self, other: Any) -> Expression:
        return self._binary(other, "MatrixMultiply", ("left", "right"), "@")

    def __rmatmul__(self, other: Any) -> Expression:
        return self._binary(other, "MatrixMultiply", ("left", "right"), "@", reflected=True)

    # -- unary ------------------------------------------------------------------------------
    def _unary(self, op: Operator, text: str) -> Expression:
        return Expression(op, {"input": self}, text)

    def __neg__(self) -> Expression:
        return self._unary(_op("Negate"), f"-{_text(self)}")

    def __abs__(self) -> Expression:
        return self.abs()

    def abs(self) -> Expression:
        """|x| (``Absolute``: gradient 0 at 0)."""
        return self._unary(_op("Absolute"), f"abs({_text(self)})")

    def sqrt(self) -> Expression:
        """√x (``Sqrt``)."""
        return self._unary(_op("Sqrt"), f"{_text(self)}.sqrt()")

    def exp(self) -> Expression:
        """e^x (``Exponential``)."""
        return self._unary(_op("Exponential"), f"{_text(self)}.exp()")

    def sin(self) -> Expression:
        """sin x (``Sine``), as published (the flux timestep embedding)."""
        return self._unary(_op("Sine"), f"{_text(self)}.sin()")

    def cos(self) -> Expression:
        """cos x (``Cosine``)."""
        return self._unary(_op("Cosine"), f"{_text(self)}.cos()")

    def floor(self) -> Expression:
        """⌊x⌋ (``Floor``; gradient 0, as torch.floor's)."""
        return self._unary(_op("Floor"), f"{_text(self)}.floor()")

    def clamp(self, min: Any = None, max: Any = None) -> Expression:  # noqa: A002
        """min(max(x, min), max), torch.clamp's values and gradient: number bounds are a
        ``Clamp``; a bound that is a connection or a shape wire (``H_in - 1``: its ``Size``)
        is a ``Where`` (x < min: min; x > max: max), its gradient torch's for tensor bounds."""
        text = f"{_text(self)}.clamp({min!r}, {max!r})"
        if all(v is None or (isinstance(v, (int, float, np.integer, np.floating))
                             and not isinstance(v, (bool, np.bool_))) for v in (min, max)):
            return self._unary(_op("Clamp", min, max), text)
        out: Expression = self  # type: ignore[assignment]
        for bound, less in ((min, True), (max, False)):
            if bound is not None:
                b = _constant(bound, "clamp", self)
                out = Expression(_op("Where"), {"cond": out < b if less else out > b,
                                                "input1": b, "input2": out}, text)
        return out

    def cast(self, dtype: Any) -> Expression:
        """The values in ``dtype`` (``Cast``)."""
        if isinstance(dtype, DtypeOf):  # (another connection's dtype: read from its wire)
            return Expression(_op("Cast", dtype), {"input": self, "dtype_ref": dtype.conn},
                              f"{_text(self)}.cast({dtype!r})")
        _static(dtype, f".cast({dtype!r})", self)
        return self._unary(_op("Cast", dtype), f"{_text(self)}.cast({dtype!r})")

    def dtype(self) -> DtypeOf:
        """As published, this connection's dtype, for ``Cast().connect(dtype=x.dtype())``."""
        return DtypeOf(self)

    def tensor(self) -> Expression:
        """The published scalar-to-tensor conversion (``ToTensor``: the array as it is here)."""
        return self._unary(_op("ToTensor"), f"{_text(self)}.tensor()")

    def item(self) -> Expression:
        """The one element as a 0-d array (``Item``)."""
        return self._unary(_op("Item"), f"{_text(self)}.item()")

    # -- moving elements --------------------------------------------------------------------
    def __getitem__(self, index: Any) -> Expression:
        """``x[index]`` (``Indexer``): ints, slices (negative steps too), None, ``...`` and
        integer lists, or a tuple of those. Connections among a tuple's items (``x[rows,
        cols]``, the published CLIP's pooling; ``x[i]``, ``x[i, ...]``) index by the arrays they
        carry (``GatherIndexer``), as NumPy's and torch's advanced indexing."""
        items = index if isinstance(index, tuple) else (index,)  # (x[i]: x[i, ...])
        if any(isinstance(i, ConnectionOps) for i in items):
            from .gather_index import SLOT, GatherIndexer

            conns = [i for i in items if isinstance(i, ConnectionOps)]
            template = tuple(SLOT if isinstance(i, ConnectionOps) else i for i in items)
            _static(template, f"[{_index_text(index)}]", self)
            try:
                op = GatherIndexer(template)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{self!r}[{_index_text(index)}]: {e}") from None
            operands = {"input": self, **{f"index{k}": c for k, c in enumerate(conns)}}
            return Expression(op, operands, f"{_text(self)}[{_index_text(index)}]")
        _check_index(index, self)
        return self._unary(_op("Indexer", index), f"{_text(self)}[{_index_text(index)}]")

    @property
    def T(self) -> Expression:  # noqa: N802 - NumPy's and the published name
        """The axes reversed (``Transpose()``)."""
        return self._unary(_op("Transpose"), f"{_text(self)}.T")

    def transpose(self, axes: Sequence[int] | None = None) -> Expression:
        """The axes permuted by ``axes`` (``Transpose(axes)``; None: reversed)."""
        _static(axes, f".transpose({axes!r})", self)
        return self._unary(_op("Transpose", axes), f"{_text(self)}.transpose({axes!r})")

    def reshape(self, *shape: Any, **kw: Any) -> Expression:
        """The values in ``shape`` (``Reshape``): ``x.reshape((2, -1))``, ``x.reshape(2, -1)``
        or, as published, ``x.reshape(shape=(B, L, -1))``; one entry may be -1 (or None). A
        size may be a shape wire or a connection whose value is known at compile time (the
        published segformer's ``x.reshape((B, C, height, width))``: ``mithril.models.
        size_values``)."""
        if kw:
            if set(kw) != {"shape"} or shape:
                raise TypeError(f"{_text(self)}.reshape: takes the shape once, positionally or "
                                f"as shape=..., got {len(shape)} positional and {sorted(kw)}")
            shape = (kw["shape"],)
        if len(shape) == 1 and isinstance(shape[0], ConnectionOps):  # a Shape / Size output
            return self._unary(_op("Reshape", shape[0]), f"{_text(self)}.reshape({shape[0]!r})")
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        # a size may be a connection whose value the compiler knows (size_values.py)
        _static([d for d in shape if not isinstance(d, ConnectionOps)], f".reshape({shape!r})", self)
        return self._unary(_op("Reshape", shape), f"{_text(self)}.reshape({shape!r})")

    def split(self, split_size: int, axis: int = 0) -> list[Expression]:
        """As published, ``split_size`` equal pieces along ``axis`` (``Split``), here a list of
        expressions: ``x.split(2, axis=1)[0]`` is the first half (the flux auto-encoder's
        ``diagonal_gaussian``), ``Concat().connect(input=x.split(...))`` joins them."""
        from .split import _Chunk

        if isinstance(split_size, bool) or not isinstance(split_size, (int, np.integer)) \
                or split_size < 1:
            raise ValueError(f"{_text(self)}.split: split_size must be a positive int, got "
                             f"{split_size!r}")
        _static(axis, f".split(axis={axis!r})", self)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"{_text(self)}.split: axis must be an int, got {axis!r}")
        n, ax = int(split_size), int(axis)
        return [self._unary(_Chunk(i, n, ax), f"{_text(self)}.split({n}, axis={ax})[{i}]")
                for i in range(n)]

    # -- reductions -------------------------------------------------------------------------
    def _reduce(self, name: str, axis: Any, keepdim: bool) -> Expression:
        _static(axis, f".{name.lower()}(axis={axis!r})", self)
        args = ", ".join([*([f"axis={axis!r}"] if axis is not None else []),
                          *(["keepdim=True"] if keepdim else [])])
        return self._unary(_op(name, axis=axis, keepdim=keepdim), f"{_text(self)}.{name.lower()}({args})")

    def sum(self, axis: int | Sequence[int] | None = None, keepdim: bool = False) -> Expression:
        """Σ over ``axis`` (``Sum``; None: all axes)."""
        return self._reduce("Sum", axis, keepdim)

    def mean(self, axis: int | Sequence[int] | None = None, keepdim: bool = False) -> Expression:
        """The mean over ``axis`` (``Mean``)."""
        return self._reduce("Mean", axis, keepdim)

    def max(self, axis: int | Sequence[int] | None = None, keepdim: bool = False) -> Expression:
        """The maximum over ``axis`` (``Max``; ties share the gradient)."""
        return self._reduce("Max", axis, keepdim)

    def min(self, axis: int | Sequence[int] | None = None, keepdim: bool = False) -> Expression:
        """The minimum over ``axis`` (``Min``)."""
        return self._reduce("Min", axis, keepdim)

    # -- comparisons and logic (bool results, no gradient; comparisons.py) -----------------
    def _compare(self, other: Any, name: str, symbol: str, reflected: bool = False) -> Expression:
        b = _operand(other, symbol, self)
        left, right = (b, self) if reflected else (self, b)
        return Expression(_op(name), {"left": left, "right": right},
                          f"({_text(left)} {symbol} {_text(right)})")

    def __lt__(self, other: Any) -> Expression:
        return self._compare(other, "Less", "<")

    def __le__(self, other: Any) -> Expression:
        return self._compare(other, "LessEqual", "<=")

    def __gt__(self, other: Any) -> Expression:
        return self._compare(other, "Greater", ">")

    def __ge__(self, other: Any) -> Expression:
        return self._compare(other, "GreaterEqual", ">=")

    def eq(self, other: Any) -> Expression:
        """Elementwise ``==`` (``Equal``), as published: ``==`` itself stays Python's identity
        test (connections are dict keys and set members)."""
        return self._compare(other, "Equal", "==")

    def ne(self, other: Any) -> Expression:
        """Elementwise ``!=`` (``NotEqual``), as published (see :meth:`eq`)."""
        return self._compare(other, "NotEqual", "!=")

    def __and__(self, other: Any) -> Expression:
        return self._compare(other, "LogicalAnd", "&")

    def __rand__(self, other: Any) -> Expression:
        return self._compare(other, "LogicalAnd", "&", reflected=True)

    def __or__(self, other: Any) -> Expression:
        return self._compare(other, "LogicalOr", "|")

    def __ror__(self, other: Any) -> Expression:
        return self._compare(other, "LogicalOr", "|", reflected=True)

    def __xor__(self, other: Any) -> Expression:
        return self._compare(other, "LogicalXOr", "^")

    def __rxor__(self, other: Any) -> Expression:
        return self._compare(other, "LogicalXOr", "^", reflected=True)

    def __invert__(self) -> Expression:
        return self._unary(_op("LogicalNot"), f"~{_text(self)}")

    # -- not offered ------------------------------------------------------------------------
    def _not_offered(self, symbol: str, *_: Any) -> Any:
        raise TypeError(f"'{symbol}' on connections ({self!r}) is not offered: there is no "
                        f"{_NOT_OFFERED_OPS[symbol]} operator here")

    def __floordiv__(self, other: Any) -> Any:
        return self._not_offered("//")

    __rfloordiv__ = __floordiv__

    def __lshift__(self, other: Any) -> Any:
        return self._not_offered("<<")

    __rlshift__ = __lshift__

    def __rshift__(self, other: Any) -> Any:
        return self._not_offered(">>")

    __rrshift__ = __rshift__

    #: not iterable (``iter(conn)`` is a TypeError, and ``Iterable`` does not match): with
    #: ``__getitem__`` alone, Python would iterate ``x[0], x[1], ...`` without end
    __iter__ = None

    def __getattr__(self, name: str) -> Any:
        if name in _NOT_OFFERED_METHODS:
            raise AttributeError(f"{self!r}.{name}: not offered on connections here (the "
                                 "published Mithril's scalar and shape connections have no "
                                 "counterpart: shapes are fixed at compile time)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class DtypeOf:
    """``conn.dtype()``: the dtype ``conn`` has when the model runs; ``Cast().connect(dtype=...)``
    takes it (the published ``x.dtype()``)."""

    __slots__ = ("conn",)

    def __init__(self, conn: ConnectionOps) -> None:
        self.conn = conn

    def __repr__(self) -> str:
        return f"{_text(self.conn)}.dtype()"


class Expression(ConnectionOps):
    """An operator applied to operands, not yet part of any model (see the module docstring).

    ``op`` is the operator (a template: each model it is connected to gets its own copy),
    ``operands`` maps the operator's input terminals to connection objects, other expressions
    or constant arrays, and ``text`` is how it reads (``(Linear.output + 2.0)``)."""

    __slots__ = ("op", "operands", "text", "shape_decl")

    def __init__(self, op: Operator, operands: dict[str, Operand], text: str) -> None:
        self.op, self.operands, self.text = op, operands, text
        self.shape_decl: tuple | None = None

    def set_shapes(self, shape: Sequence[int | None]) -> Expression:
        """Declare the shape of this expression's value (published ``hidden_states[i].
        set_shapes([1, 64, 128, 128])``), checked against what the model infers when it is
        connected (``None`` entries are free)."""
        from .declarations import _as_shape

        self.shape_decl = _as_shape(self.text, shape)
        return self

    def __repr__(self) -> str:
        return self.text

    def __bool__(self) -> bool:
        # (``if a > b:`` would otherwise always be true: the comparison is computed by the run)
        raise TypeError(f"the truth value of {self.text} is known only when the model runs: "
                        "use it as a block's input (Where(cond=...)), not in an if / and / or")


def _leaf(model: Model, v: Operand, where: str) -> Connection:
    """The wire of ``model`` for one operand that is not an expression."""
    from .connections import IOKey, Terminal
    from .model import Model

    if isinstance(v, np.ndarray):
        return model._given(IOKey(value=v), is_output=False)
    if isinstance(v, IOKey):
        return model._given(v, is_output=False)
    assert isinstance(v, Terminal)
    if (isinstance(v.block, Model) and v.block is not model and v.conn is not None
            and not model._owns(v.conn) and not any(b is v.block for b, _ in model.blocks)):
        raise ValueError(f"{where}: {v!r} is a connection of another model, which is not part "
                         "of this one: add that model first (model |= other), or combine "
                         "connections of this model and its direct children only")
    return model._resolve(v, where, lists=True)


def wire_expression(model: Model, expr: Expression, where: str) -> Connection:
    """Add ``expr``'s operators to ``model`` (sub-expressions first) and return the wire that
    carries its value: an unnamed internal connection. An expression already added to
    ``model`` is not added again. ``where`` (``"Relu.connect(input=...)"``) starts the
    messages of errors; the caller (``Model._add``) restores the model if this raises."""
    cached = model._expr_wires.get(id(expr))
    if cached is not None and cached[0] is expr:
        return cached[1]
    from .connections import Connection

    mapping: dict[str, Connection] = {}
    for key, v in expr.operands.items():
        if isinstance(v, Expression):
            mapping[key] = wire_expression(model, v, where)
            continue
        context = f"{where}: in {expr!r} ({type(expr.op).__name__}.{key})"
        try:
            mapping[key] = _leaf(model, v, context)
        except (KeyError, ValueError, TypeError) as e:
            if context in str(e):
                raise
            raise type(e)(f"{context}: {e}") from None
    from .list_wires import ListWire

    lists = [k for k, c in mapping.items() if isinstance(c, ListWire)]
    if lists:  # a ToList / ToTuple output: indexed here, when the model is built
        lw = mapping[lists[0]]
        if type(expr.op).__name__ != "Indexer" or lists != ["input"] or \
                getattr(expr.op, "shape_args", None) is not None:
            raise TypeError(f"{where}: in {expr!r}: {lw.kind}s (ToList / ToTuple outputs) are "
                            "indexed (lst[0], lst[1:]) or fed to Concat(), not computed with")
        got = lw.index(expr.op.index, f"{where}: in {expr!r}")
    else:
        got = mapping["output"] = Connection(None)
        model.blocks.append((copy.copy(expr.op), mapping))
    if expr.shape_decl is not None and not isinstance(got, ListWire):  # (set_shapes)
        from .operator import unify

        got.shape = unify(got.shape, expr.shape_decl, f"{expr!r} (wired)", f"{expr!r} (set_shapes)")
    model._expr_wires[id(expr)] = (expr, got)
    return got
