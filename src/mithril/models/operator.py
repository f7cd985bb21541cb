"""The primitive operator: the one place an operation is defined.

An :class:`Operator` states, for one operation,

* its terminals: data inputs (``inputs``) and one output ``"output"``;
* its trainable parameters and their shapes (:meth:`param_shapes`) and initialisers;
* its shape rule (:meth:`infer_shape`);
* its forward computation, written once against an array namespace ``xp``
  (``numpy``, ``jax.numpy`` or the small numpy-compatible torch namespace);
* its vector-Jacobian product for the NumPy backend (:meth:`vjp`); JAX and
  torch differentiate the forward themselves;
* optionally, what that VJP reuses from the forward (residuals, as ``jax.custom_vjp``'s
  ``fwd`` returning ``(out, residuals)``): :meth:`forward_residuals` computes the NumPy forward
  and the residuals together, and ``vjp(..., residuals=...)`` receives them. The compiled
  NumPy program keeps them only in a forward that will be differentiated, and drops each
  as soon as its VJP has run. A VJP called without them (``residuals=None``) recomputes them.
  With its residuals a VJP often no longer reads some of its terminals (a convolution's
  input, once its im2col matrix is saved): :attr:`vjp_ignores` names them, and that pass
  drops an activation as soon as no later forward step or VJP reads it; an elementwise
  operator may then also run in place (:meth:`forward_inplace`) over an input that is a
  fresh array (:attr:`fresh_output`) nothing else reads, and its VJP over a cotangent
  the pass alone holds (:meth:`vjp_inplace`).

Shapes are tuples whose entries are ``int`` or ``None`` (a free dimension, e.g. batch).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from ..errors import ShapeError

Shape = tuple  # tuple[int | None, ...]


def unify(a: Shape | None, b: Shape | None, where_a: str, where_b: str) -> Shape | None:
    """Merge two partial shapes; ``None`` entries match anything."""
    if a is None:
        return b
    if b is None:
        return a
    if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b, strict=True)):
        raise ShapeError(f"shape mismatch: '{where_a}' has shape {fmt(a)} but '{where_b}' has shape {fmt(b)}")
    return tuple(x if x is not None else y for x, y in zip(a, b, strict=True))


def fmt(shape: Shape | None) -> str:
    return "unknown" if shape is None else "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


def broadcast_shapes(a: Shape, b: Shape, where: str) -> Shape:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == 1:
            out.append(y)
        elif y == 1:
            out.append(x)
        elif x is None:  # a free dim against n > 1 must be 1 or n: the result is n
            out.append(y)
        elif y is None or x == y:
            out.append(x)
        else:
            raise ShapeError(f"{where}: shapes {fmt(a)} and {fmt(b)} do not broadcast")
    return tuple(reversed(out))


def pair_shape(shapes: Mapping[str, Shape | None], who: str) -> Shape | None:
    """The elementwise shape of a loss of ``input`` and ``target``: the two broadcast, as
    torch's ``F.mse_loss`` / ``F.l1_loss`` and the published losses (``target=0.0``); one
    unknown takes the other's. Shapes that differ (but for a 0-d target) warn as torch
    does: (N, 1) against (N,) broadcasts to (N, N), rarely what is meant."""
    a, b = shapes.get("input"), shapes.get("target")
    if a is None or b is None:
        return unify(a, b, "input", "target")
    try:
        s = broadcast_shapes(a, b, who)
    except ShapeError:
        raise ShapeError(f"shape mismatch: 'input' has shape {fmt(a)} but 'target' has shape "
                         f"{fmt(b)}, nor do they broadcast") from None
    if len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b)):
        return unify(a, b, "input", "target")
    if len(b) > 0:  # (a 0-d target, target=0.0, broadcasts as meant: no warning)
        import warnings

        warnings.warn(f"{who}: 'target' of shape {fmt(b)} broadcasts against 'input' of shape "
                      f"{fmt(a)} to {fmt(s)} (as torch's: likely not what is meant)",
                      UserWarning, stacklevel=2)
    return s


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``g`` down to ``shape`` (the VJP of numpy broadcasting). A half-precision ``g``
    is summed in float32, as torch's reductions accumulate: a float16 partial sum overflows
    to inf where the total fits (-32768 - 32768 + 8192), and a loss scaler then skips a step
    torch takes."""
    if g.shape == shape:
        return g
    acc = np.float32 if g.dtype.itemsize < 4 and g.dtype.kind == "f" or \
        g.dtype.name == "bfloat16" else None
    lead = tuple(range(g.ndim - len(shape)))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i - len(shape)] != 1)
    if not (lead or axes):
        return g
    out = g.sum(axis=lead + tuple(a + len(lead) for a in axes), dtype=acc, keepdims=True)
    return out.reshape(shape).astype(g.dtype, copy=False)


def div_count(g: np.ndarray, n: int) -> np.ndarray:
    """``g / n`` for an element count ``n`` (a mean's VJP). float16's largest finite value is
    65504: a larger Python int divided into a float16 array becomes inf (NEP 50), and the
    gradient 0; such a quotient is taken in float32 (exact rounding: float32 has the bits)."""
    if np.asarray(g).dtype == np.float16 and n > 65504:
        return (np.asarray(g, np.float32) / n).astype(np.float16)
    return g / n


def takes_name(cls: type) -> None:
    """Make ``cls.__init__`` take the published ``name=`` (its path segment), unless it
    takes a ``name`` of its own (:meth:`Operator.__init_subclass__`, and ``Model``'s), and
    values of the block's inputs (``Add(right=1)``, as published): see :func:`_taking_name`."""
    init = cls.__dict__.get("__init__")
    if init is not None and not hasattr(init, "__wrapped__"):
        cls.__init__ = _taking_name(init, "name" not in _own_params(init))  # type: ignore[misc]


def _taking_name(init: Any, name_too: bool = True) -> Any:
    """``init`` that also takes ``name=`` (``name_too``; checked before anything is built;
    the outermost class's ``__init__`` sets it) and, as keywords, values of the block's inputs
    and parameter roles (:func:`set_input_values`): the keywords ``init`` does not take, or,
    where it takes ``**kwargs`` (to name torch's arguments it refuses), those that name the
    class's inputs or parameter roles."""
    params = _own_params(init)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        from .declarations import check_block_name

        name = kwargs.pop("name", None) if name_too else None
        keys = _class_inputs(type(self)) if var_kw else None
        # (where init takes **kwargs to name torch's arguments it refuses, a bool is one of
        # those, torch's Linear(bias=False), not a value of the bias)
        values = {k: kwargs.pop(k) for k in list(kwargs)
                  if k not in params and (keys is None or k in keys and
                                          not isinstance(kwargs[k], (bool, np.bool_)))}
        if name_too:
            check_block_name(name, type(self).__name__)
        init(self, *args, **kwargs)
        if name is not None:
            self.__dict__["name"] = name
        if values:
            set_input_values(self, values)

    return __init__


def _class_inputs(cls: type) -> frozenset[str]:
    """The inputs and parameter roles a class states as class attributes."""
    ins, roles = getattr(cls, "inputs", ()), getattr(cls, "param_init", None)
    return frozenset((ins if isinstance(ins, tuple) else ()) +
                     (tuple(roles) if isinstance(roles, Mapping) else ()))


def _own_params(init: Any) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(init).parameters


def set_input_values(block: Any, values: Mapping[str, Any]) -> None:
    """Keep ``values`` (input / parameter role -> value, name, IOKey or connection: what
    ``connect`` takes) as ``block``'s defaults for ``connect`` (the published
    ``Add(right=1)``: a value of the operator's input); a connection given to ``connect`` wins.
    A key that is no input of the block is the ``TypeError`` Python gives an unknown keyword,
    naming the block's parameters and inputs."""
    from .functional import _as_given, param_keys

    outs = set(block.output_keys)
    inputs = [k for k in (*block.terminals, *param_keys(block)) if k not in outs]
    for key, v in values.items():
        if key not in inputs:
            own = [k for k, p in inspect.signature(type(block)).parameters.items()
                   if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            raise TypeError(f"{type(block).__name__}() got an unexpected keyword argument "
                            f"{key!r}: it is neither a parameter of {type(block).__name__} "
                            f"({', '.join(own) or 'none'}) nor one of its inputs {inputs}")
        _as_given(key, v)  # (a value connect would refuse is refused here)
    block.__dict__["_input_values"] = dict(values)


def input_values(block: Any) -> dict[str, Any]:
    """The values given to ``block``'s constructor for its inputs (:func:`set_input_values`)."""
    return dict(block.__dict__.get("_input_values") or {})


class Operator:
    """Base class of primitive operations (see module docstring). Every operator takes the
    published ``name=`` (its parameters' path segment, as a ``Model``'s) and, as published,
    values of its inputs as keywords (``Add(right=1)``, ``Concat(input=[...])``: defaults of
    ``connect``): each class's ``__init__`` is wrapped to take them (the wrapper keeps the
    class's own signature; :func:`takes_name`)."""

    def __init__(self, *, name: str | None = None, **values: Any) -> None:
        from .declarations import check_block_name

        if check_block_name(name, type(self).__name__) is not None:
            self.__dict__["name"] = name
        if values:  # (a subclass's own __init__ is wrapped to take them: takes_name)
            set_input_values(self, values)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        takes_name(cls)

    inputs: ClassVar[tuple[str, ...]] = ("input",)
    #: inputs that take integer arrays (everything else takes the backend float dtype)
    int_inputs: ClassVar[frozenset[str]] = frozenset()
    #: inputs that take either integer or float arrays
    any_dtype_inputs: ClassVar[frozenset[str]] = frozenset()
    #: initialiser name per parameter: "glorot", "normal", "zeros" or "ones"
    param_init: ClassVar[Mapping[str, str]] = {}
    #: True: ``forward`` takes a keyword ``ctx`` (a :class:`~mithril.models.context.NodeContext`:
    #: the mode, randomness and state) and ``vjp`` finds it in ``args["ctx"]``
    context: ClassVar[bool] = False
    #: True: the operator draws random bits (the compiled model's step counter advances)
    random: ClassVar[bool] = False
    #: initialiser per state array ("zeros", "ones" or "int_zeros"); shapes from ``state_shapes``
    state_init: ClassVar[Mapping[str, str]] = {}
    #: optional hooks read by the compiler (``None``: none; also keeps those look-ups off
    #: ``__getattr__``): ``check_inputs(shapes, dtypes, arrays, names)`` on concrete inputs,
    #: the inputs it reads values of, and parameters read by name from other blocks
    check_inputs: ClassVar[Any] = None
    #: ``passes_value(values)``: the output's value at compile time from its inputs' known
    #: values (``values``: those known, by input key; None: not known), for blocks that read
    #: a value then (a Reshape's sizes through a Buffer); None: the output's value is unknown
    passes_value: ClassVar[Any] = None
    #: terminals (inputs, parameter roles, "output") the NumPy VJP never reads when it has
    #: its residuals: it gets ``None`` for them in a pass that kept residuals
    vjp_ignores: ClassVar[frozenset[str]] = frozenset()
    #: the NumPy forward's output is new memory: no input and no residual shares it (so a
    #: consumer with :meth:`forward_inplace` may overwrite it once nothing else reads it)
    fresh_output: ClassVar[bool] = False
    value_checked_inputs: ClassVar[frozenset[str]] = frozenset()
    #: of those, the ones whose value rules the NumPy forward enforces itself, before
    #: anything is computed from them (raising :class:`~mithril.errors.InputValueError`):
    #: the NumPy backend does not read them before a run (a training step's Python), and
    #: runs the value checks only when the forward refuses them, to name the data key
    numpy_checked_inputs: ClassVar[frozenset[str]] = frozenset()
    param_names: ClassVar[Any] = None
    #: the terminals ``connect`` takes positionally, in the published signature's order
    #: (None: the inputs, then ``"output"``, as the published primitives')
    positional: ClassVar[tuple[str, ...] | None] = None
    #: the inputs ``model += block`` may wire to the previous output, the first one not given
    #: in ``connect`` (None: the first input only); the published commutative operators
    #: (``Add``, ``Multiply``, ...) take ``("left", "right")``: ``+= Add().connect(left=x)``
    #: wires ``right``
    canonical_inputs: ClassVar[tuple[str, ...] | None] = None

    def connect(self, *args: Any, **connections: Any) -> Any:
        """Bind terminals (and parameter roles) to names, ``IOKey``s, connections or
        constants; positional ones in :attr:`positional` order (``Add().connect("a", "b",
        "out")``, ``Linear(4).connect("input")``, as published)."""
        from .model import Bound

        return Bound(self, self._named(args, connections))

    def _named(self, args: tuple, connections: dict[str, Any],
               order: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``connections`` with the positional ``args`` named in ``order`` (else
        :attr:`positional`, else the inputs then ``"output"``): :func:`named_connections`."""
        if not args:
            return connections
        return named_connections(f"{type(self).__name__}.connect",
                                 order or self.positional or (*self.inputs, "output"),
                                 args, connections)

    def __call__(self, *args: Any, **connections: Any) -> Any:
        """``connect`` (the subclass's own, where it defines one: ``Reshape()(input=x,
        shape=...)``)."""
        return self.connect(*args, **connections)

    def __getattr__(self, name: str) -> Any:
        """``op.input``, ``op.output``, ``op.weight``: a terminal or parameter role as an object
        (:class:`~mithril.models.model.Terminal`) for ``connect(...)`` and ``expose_keys``."""
        d = self.__dict__
        if not name.startswith("_") and "_resolving" not in d:
            d["_resolving"] = True  # terminals / param_init may read attributes not set yet
            try:
                roles: tuple[str, ...] = tuple(self.terminals)
                try:
                    roles += tuple(self.param_init)
                except AttributeError:
                    pass
            finally:
                del d["_resolving"]
            if name in roles:
                from .model import Terminal

                return Terminal(self, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def cin(self) -> Any:
        """The canonical input (its first input) as a connection object, as ``Model.cin``."""
        from .model import Terminal, cin_key

        return Terminal(self, cin_key(self))

    @property
    def cout(self) -> Any:
        """The canonical output as a connection object, as ``Model.cout``."""
        from .model import Terminal, cout_key

        return Terminal(self, cout_key(self))

    @property
    def terminals(self) -> tuple[str, ...]:
        return (*self.inputs, "output")

    @property
    def output_keys(self) -> tuple[str, ...]:
        return ("output",)

    def param_shapes(self, shapes: Mapping[str, Shape | None]) -> dict[str, Shape]:
        """Shapes of this operator's parameters given its input shapes."""
        return {}

    def state_shapes(self, shapes: Mapping[str, Shape | None]) -> dict[str, Shape]:
        """Shapes of this operator's state arrays (keys of ``state_init``) given its input shapes."""
        return {}

    def infer_shape(self, shapes: Mapping[str, Shape | None]) -> Shape | None:
        """Output shape from input (and parameter) shapes; ``None`` if unknown."""
        return shapes.get(self.inputs[0])

    def forward(self, xp: Any, **args: Any) -> Any:
        raise NotImplementedError

    def vjp(self, g: np.ndarray, out: np.ndarray, args: Mapping[str, np.ndarray],
            wrt: frozenset[str]) -> dict[str, np.ndarray]:
        """Cotangents of the inputs/parameters named in ``wrt`` for output cotangent ``g``.
        An operator that overrides :meth:`forward_residuals` takes a keyword ``residuals``
        too: what its ``forward_residuals`` returned, or ``None`` (then it recomputes them)."""
        raise NotImplementedError(f"{type(self).__name__} has no NumPy VJP")

    def forward_residuals(self, xp: Any, **args: Any) -> tuple[Any, Any]:
        """The NumPy forward of a pass that will be differentiated: ``(output, residuals)``,
        where ``residuals`` is whatever :meth:`vjp` reuses (saved activations, argmax indices,
        softmax probabilities). ``output`` must equal :meth:`forward`'s. The default saves
        nothing; operators whose VJP would redo forward work override it."""
        return self.forward(xp, **args), None

    def forward_inplace(self, xp: Any, **args: Any) -> Any:
        """The NumPy forward written over ``args[inputs[0]]``, for operators that can (an
        elementwise ReLU): the compiled program calls it in a forward that keeps residuals
        when that input is a fresh array (:attr:`fresh_output`) no one reads afterwards, and
        saves allocating (and faulting in) a new one."""
        raise NotImplementedError

    def vjp_inplace(self, g: Any, out: Any, args: Mapping[str, Any], wrt: Any) -> dict[str, Any]:
        """:meth:`vjp` written over the cotangent ``g``, for operators that can (an
        elementwise ReLU): the NumPy pass calls it when ``g`` is an array it alone holds
        (no other reference, not a view), which saves allocating a new one."""
        raise NotImplementedError

    @property
    def has_inplace(self) -> bool:
        return type(self).forward_inplace is not Operator.forward_inplace

    @property
    def has_vjp_inplace(self) -> bool:
        return type(self).vjp_inplace is not Operator.vjp_inplace

    @property
    def has_residuals(self) -> bool:
        """The operator overrides :meth:`forward_residuals` (its VJP takes ``residuals=``)."""
        return type(self).forward_residuals is not Operator.forward_residuals

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def backend_of(xp: Any) -> str:
    """``"numpy"``, ``"jax"`` or ``"torch"``: which array namespace an operator forward got."""
    if xp is np:
        return "numpy"
    if getattr(xp, "__name__", "").startswith("jax"):
        return "jax"
    if getattr(getattr(xp, "t", None), "__name__", "") == "torch":
        return "torch"
    return "numpy"  # a numpy-compatible namespace


def torch_of(xp: Any) -> Any:
    """The ``torch`` module when ``xp`` is the torch backend's namespace, else ``None``."""
    return xp.t if backend_of(xp) == "torch" else None


def stop_gradient(xp: Any, x: Any) -> Any:
    """``x`` as a constant for autodiff (JAX ``lax.stop_gradient``, torch ``detach``; NumPy
    as is: its VJPs are written by hand): for a shift such as the max of a log-sum-exp,
    whose gradient cancels exactly, so that no backward work is traced for it."""
    kind = backend_of(xp)
    if kind == "jax":
        import jax

        return jax.lax.stop_gradient(x)
    return x.detach() if kind == "torch" else x


def functional_of(xp: Any) -> Any:
    """``torch.nn.functional`` when ``xp`` is the torch backend's namespace, else ``None``: an
    operator's forward uses torch's fused kernel (``F.linear``, ``F.layer_norm``, ...) through it
    on torch and keeps its NumPy / JAX forward otherwise::

        F = functional_of(xp)
        if F is not None:
            return F.linear(input, weight, bias)
    """
    return getattr(xp, "F", None) if backend_of(xp) == "torch" else None


def _category(dtype: Any) -> int:
    """0 bool, 1 integer, 2 float (NumPy / JAX dtypes, ml_dtypes' bfloat16, torch dtypes)."""
    if getattr(dtype, "is_floating_point", None) is not None:  # a torch dtype
        return 2 if dtype.is_floating_point else 0 if str(dtype) == "torch.bool" else 1
    kind = np.dtype(dtype).kind
    return 0 if kind == "b" else 1 if kind in "iu" else 2


def promote(a: Any, b: Any) -> tuple[Any, Any]:
    """Two operands of a binary operator in one dtype, by torch's rule for a tensor and a
    number on every backend: the operand of the lower category (bool < integer < float) takes
    the other's dtype (an int constant times a float32 tensor stays float32: NumPy alone
    would make it float64), and within a category a 0-d operand (an expression's constant)
    takes the other's dtype (``x.cast(float32) * 2.5`` in a float64 model stays float32).
    Operands of one dtype are returned as they are; two arrays of one category and
    different dtypes keep the backend's own promotion."""
    da, db = a.dtype, b.dtype
    if da == db:
        return a, b
    ca, cb = _category(da), _category(db)
    if ca == cb:
        if (a.ndim == 0) == (b.ndim == 0):
            return a, b
        to_a = b.ndim == 0
    else:
        to_a = ca > cb
    return (a, _as(b, da)) if to_a else (_as(a, db), b)


def _as(x: Any, dtype: Any) -> Any:
    return x.astype(dtype) if hasattr(x, "astype") else x.to(dtype)  # (torch: .to)


def named_connections(who: str, order: Sequence[str], args: tuple,
                      connections: dict[str, Any]) -> dict[str, Any]:
    """``connections`` with the positional ``args`` named in ``order`` (a block's
    ``connect``, ``who``); too many of them, or a terminal given twice, is a ``TypeError``."""
    if len(args) > len(order):
        raise TypeError(f"{who} takes at most {len(order)} positional connections "
                        f"({', '.join(order)}), got {len(args)}")
    for key in order[:len(args)]:
        if key in connections:
            raise TypeError(f"{who} got two values for {key!r}")
    return {**dict(zip(order, args)), **connections}


@contextmanager
def restored_on_error(obj: Any) -> Iterator[None]:
    """Run the block with ``obj``'s attributes restored if it raises (a ``connect`` that
    configures its block first: a refused call changes nothing)."""
    before = dict(obj.__dict__)
    try:
        yield
    except BaseException:
        obj.__dict__.clear()
        obj.__dict__.update(before)
        raise
