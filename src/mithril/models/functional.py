"""A block's call as a connection: the published Mithril's functional API.

``block(...)`` (``block.connect(...)``) returns a :class:`Bound`: the block with how its
terminals connect. It plays two roles:

* a block to add: ``model |= Linear(3)(input="x")``, ``model += Relu()``;
* a connection: the block's output (a :class:`~mithril.models.connections.Terminal` of it),
  given to another block's call, combined in expressions (``a + b``, ``out.reshape(...)``,
  ``out.shape``) or to :func:`create`. A model that reaches it this way adds the call's
  block first, with its own connections (which may be calls too, added the same way): its
  *home* is then that model, and its output is reachable there only.

As published, a call of a block with several outputs (``Split(3)``, a model with several
outputs) returns them in order: ``out[i]`` is the ``i``-th (:class:`CallOutput`), and ``a, b
= block(...)`` unpacks them; given as a connection as a whole it is refused (which one is
meant?). A block with one output indexes its value (``out[0]`` is an ``Indexer``).

``Model.create(*outputs, name=None, **named)`` (:func:`create`) makes a new model of every
call the outputs reach: ``IOKey("input")`` names its inputs (an unnamed ``IOKey()`` input
is named after the terminal it feeds: ``left``, ``right``); the positional outputs are the
canonical output (``cout``, the first) and, when their calls left them unnamed, get the
name ``output`` (``output_1``, ...); a keyword output is exposed under its name. Outputs of
the calls left unnamed and not asked for are internal wires. The model is frozen: adding to
it raises; build around it instead (``outer |= created(input=...)``). Every check comes
before anything changes: a call that raises leaves each call and block as it was.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import KeyMismatchError
from .connection_types import TBD
from .connections import Connection, IOKey, Terminal
from .expressions import Expression, wire_expression
from .list_terminals import call_outputs, expose_list, list_inputs, list_outputs
from .list_wires import ListWire
from .operator import Operator, input_values

if TYPE_CHECKING:
    from .model import Block, Model

Given = str | IOKey | Terminal | Expression


def param_keys(block: Any) -> tuple[str, ...]:
    """The parameter roles of an operator (``weight``, ``bias``); none for a model."""
    return tuple(getattr(block, "param_init", None) or ()) if isinstance(block, Operator) else ()


def _as_given(key: str, v: Any) -> Given:
    """A name, IOKey, connection (a terminal, a call's result) or expression as is; a number,
    list or array: a constant (``IOKey(value=v)``)."""
    if isinstance(v, (str, IOKey, Terminal, Expression)):
        return v
    from .shape_wires import ShapeWire, as_expression

    if isinstance(v, ShapeWire):
        return as_expression(v, key)
    if isinstance(v, (bool, int, float, list, tuple, np.ndarray, np.generic)):
        arr = np.asarray(v)
        if arr.dtype.kind in "biuf":
            return IOKey(value=arr)
    raise TypeError(f"connection for '{key}' must be a str name, an IOKey, a connection "
                    f"(block.input, model.cout, a block's call: Linear(3)(input=x)), an "
                    f"expression of connections (lin.output + 1) or a constant number/array, "
                    f"got {type(v).__name__}")


class Bound(Terminal):
    """A block together with how its terminals connect (what ``block.connect(...)`` and
    ``block(...)`` return): a block to add (``model |= bound``) and, as a connection, its
    output (see the module docstring). ``home`` is the model it was added to (None: not yet)."""

    __slots__ = ("connections", "home", "outs")

    def __init__(self, block: Block, connections: dict[str, Any]) -> None:
        # (values given to the block's constructor: defaults, as published's Add(right=1))
        connections = {**input_values(block), **connections}
        allowed = (*block.terminals, *param_keys(block), *list_inputs(block))
        unknown = set(connections) - set(allowed)
        if unknown:
            raise KeyMismatchError(f"{type(block).__name__} has no terminal(s) {sorted(unknown)}; "
                           f"its terminals are {list(allowed)}")
        connections = {k: _as_given(k, v) for k, v in connections.items() if v is not TBD}
        for k, v in connections.items():
            if isinstance(v, IOKey) and v.value is not None and k in block.output_keys:
                raise ValueError(f"'{k}' is an output of {type(block).__name__}: it cannot take a value")
            if isinstance(v, Expression) and k in block.output_keys:
                raise ValueError(f"'{k}' is an output of {type(block).__name__}: it cannot take an "
                                 f"expression ({v!r}); connect the expression to an input")
        outs = call_outputs(block)  # (a created model's list output: one, as published)
        super().__init__(block, outs[0] if len(outs) == 1 else None)
        self.connections, self.home, self.outs = connections, None, outs

    def check_keys(self) -> None:
        """The block still has the terminals this call connects (a model's renamed since:
        ``rename_key``): a ``KeyMismatchError`` naming them, not a connection left out."""
        gone = [k for k in self.connections if k not in self.block.terminals and k not in
                param_keys(self.block) and k not in list_inputs(self.block)]
        if gone:
            raise KeyMismatchError(f"{self!r} connects {gone}, which {type(self.block).__name__} "
                                   f"no longer has (renamed since the call?); its terminals are "
                                   f"{list(self.block.terminals)}")

    def __getitem__(self, index: Any) -> Any:
        """A block with several outputs: its ``index``-th output; one output: its value
        indexed (an ``Indexer`` expression)."""
        if len(self.outs) <= 1:
            return super().__getitem__(index)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or \
                not -len(self.outs) <= index < len(self.outs):
            raise IndexError(f"{self!r} returns {len(self.outs)} outputs {list(self.outs)}: "
                             f"index them with an int in [-{len(self.outs)}, {len(self.outs)}), "
                             f"got {index!r}")
        return CallOutput(self, self.outs[int(index)])

    def __iter__(self) -> Iterator[CallOutput]:
        return iter([CallOutput(self, k) for k in self.outs[:len(self)]])

    def __bool__(self) -> bool:  # (a connection is an object, not a container: always true)
        return True

    def __len__(self) -> int:
        """The number of outputs of a call of a block with several (published: its list)."""
        if len(self.outs) <= 1:
            raise TypeError(f"{self!r} has {len(self.outs)} output(s): a call unpacks only into "
                            "the outputs of a block with several")
        return len(self.outs)

    def __repr__(self) -> str:
        return f"{type(self.block).__name__}(...)" + (f".{self.key}" if self.key else "")


class CallOutput(Terminal):
    """One output of a call of a block with several outputs (``Split(3)(input=x)[0]``)."""

    __slots__ = ("call",)

    def __init__(self, call: Bound, key: str) -> None:
        super().__init__(call.block, key)
        self.call = call

    def __repr__(self) -> str:
        return f"{type(self.block).__name__}(...).{self.key}"


def pull_call(model: Model, given: Terminal, what: str) -> None:
    """Where ``given`` is a call's output: make sure its call is part of ``model``, adding
    it (inside :meth:`Model._add`, which undoes it if anything raises) when it has no home
    yet (its outputs left unnamed are then internal wires). A call that another model holds,
    or one that names no single output, is refused."""
    call = given if isinstance(given, Bound) else given.call if isinstance(given, CallOutput) \
        else None
    if call is None:
        return
    if given.key is None:
        if not call.outs:
            raise ValueError(f"{what}: {given!r} has no output to connect")
        raise ValueError(f"{what}: {given!r} returns {len(call.outs)} outputs {list(call.outs)}: "
                         "give one of them (out[0], or unpack: a, b = block(...))")
    if call.home is model:
        return
    if call.home is not None:
        raise ValueError(f"{what}: {given!r} is the output of a call that is part of another "
                         f"model ({call.home!r}); a call's output is reachable only in the "
                         "model it was added to: call a new block here")
    if model._touched is None:
        raise ValueError(f"{what}: {given!r} is the output of a call that is not part of this "
                         "model: connect it to a block added to it (model |= Relu()(input=out)) "
                         "or add it first (model |= out)")
    model._add_block(call, chain=False)
    mapping = next(m for b, m in reversed(model.blocks) if b is call.block) \
        if not any(b is call.block for b, _ in model._list_blocks) else {}
    for c in mapping.values():  # (its outputs left unnamed feed this block: internal wires)
        if c.auto_output:
            model._demote(c)


def _named_inputs(model: Model, start: int = 0, added: bool = False) -> None:
    """Name the inputs an unnamed ``IOKey()`` fed (published: ``Add()(left=IOKey(), ...)``
    makes inputs ``left`` and ``right``): each after the terminal it feeds first (of the
    blocks from ``start`` on: those just added). ``added`` (``model |= ...``): only the wires
    of ``IOKey()`` objects that feed no parameter role (such a wire is a parameter named by
    its path, as one a block's ``weight`` terminal made)."""
    new = model.blocks[start:]
    if not any(c.name is None and c.value is None for _, m in new for c in m.values()):
        return
    keys = {id(c) for k, c in model._expr_wires.values() if isinstance(k, IOKey)}
    produced = model._produced()
    for block, mapping in new:
        for key, c in mapping.items():
            if added and (id(c) not in keys or key in param_keys(block)):
                continue
            if c.name is None and c.value is None and id(c) not in produced \
                    and key not in block.output_keys:
                c.name = model._fresh_name(key)
                model.conns[c.name] = c


def _order_inputs(model: Model) -> None:
    """As published, a created model's inputs in the order its blocks take them (its blocks
    come dependencies first, each block's inputs in its terminals' order), whatever the order
    the calls were reached in: ``created(x, y)`` binds them in that order. A tuple input's
    elements stay together, in order, where the first of them is read."""
    first: dict[int, Any] = {}
    for _, mapping in model.blocks:
        for c in mapping.values():
            first.setdefault(id(c), (len(first), 0))
    for _, elems in list_inputs(model).values():
        at = min(first.get(id(model.conns[e]), (len(first), 0))[0] for e in elems)
        first.update({id(model.conns[e]): (at, i) for i, e in enumerate(elems)})
    inputs = set(model.input_keys)
    items = list(model.conns.items())
    ins = sorted((it for it in items if it[0] in inputs),
                 key=lambda it: first.get(id(it[1]), (len(first), 0)))
    model.conns.clear()
    model.conns.update(ins + [it for it in items if it[0] not in inputs])


def create(cls: type[Model], outputs: tuple[Any, ...], named: dict[str, Any],
           name: str | None) -> Model:
    """``Model.create(*outputs, name=None, **named)``: see the module docstring."""
    if not outputs and not named:
        raise ValueError("Model.create: give the output(s) of the model: Model.create(out) or "
                         "Model.create(name=out), with out a block's call (Linear(3)(input=x))")
    from .shape_wires import ShapeWire, as_expression

    given = [(k, as_expression(o, k or "output") if isinstance(o, ShapeWire) else o)
             for k, o in [(None, o) for o in outputs] + list(named.items())]
    for key, o in given:
        where = f"Model.create({key or 'output'}=...)" if key else "Model.create"
        if isinstance(o, IOKey) or not isinstance(o, (Terminal, Expression)):
            what = "an input" if isinstance(o, IOKey) else type(o).__name__
            raise TypeError(f"{where}: an output is a block's call (Linear(3)(input=x)), one of "
                            f"its outputs or an expression of them, got {what} ({o!r})")
    model = cls(name=name)
    with model._undoable():
        from .shape_wires import bind_shape_refs

        wires = [wire_expression(model, o, where) if isinstance(o, Expression)
                 else model._resolve(o, where, lists=True)
                 for key, o in given for where in [f"Model.create({key or 'output'}=...)"]]
        bind_shape_refs(model, 0)  # (an output's expression reading shapes: x.reshape(x.shape))
        produced = model._produced()
        for (key, o), c in zip(given, wires, strict=True):
            if isinstance(c, ListWire) and key is None:
                raise TypeError(f"Model.create: {o!r} is a {c.kind}: a list output is given by "
                                "name (Model.create(hidden_states=ToTuple(n)(...)))")
            if isinstance(c, ListWire):
                continue  # (its elements: checked when exposed)
            if id(c) not in produced:
                raise ValueError(f"Model.create: output {key or 'output'} ({o!r}) is computed by "
                                 "no block: it is an input of the model, not an output")
        for c in list(model.conns.values()):  # (calls' outputs left unnamed: internal wires)
            if c.auto_output:
                model._demote(c)
        _named_inputs(model)
        _order_inputs(model)
        for c in wires[:len(outputs)]:
            if c.name is None:
                c.name = model._fresh_name("output")
                model.conns[c.name] = c
            c.exposed = True
        shown = wires[:len(outputs)] + [
            expose_list(model, key, c, f"Model.create({key}=...)") if isinstance(c, ListWire)
            else _expose(model, key, c) for (key, _), c in zip(
                given[len(outputs):], wires[len(outputs):], strict=True)]
        model._cout = model._last_output = shown[0]
        from ..compiler.program import _child_names

        _child_names(model, f"Model.create(name={name!r})" if name else "Model.create's model")
    model._frozen = True
    return model


def _expose(model: Model, key: str, c: Connection) -> Connection:
    """Output ``key`` of a created model: the wire ``c`` under that name, or a ``Buffer``
    copying it when it is named otherwise (another output); the wire named ``key``."""
    from .primitives import Buffer

    if model.conns.get(key) is c:
        c.exposed = True
        return c
    if key in model.conns or key in model._lists:
        raise ValueError(f"Model.create({key}=...): '{key}' names another connection of the "
                         "model (an input or a named output of a call)")
    if c.name is None:
        c.name, model.conns[key] = key, c
        c.exposed = True
        return c
    model._add_block(Buffer().connect(input=Terminal(model, c.name, c), output=key), chain=False)
    return model.conns[key]


def rename_keys(model: Model, renames: list[tuple[Any, str]], what: str = "rename_key") -> None:
    """Rename connections of ``model`` all at once (published ``Model.rename_key``): each
    given as its name, a connection of the model, or the ``IOKey`` object a call was given (an
    unnamed ``IOKey()`` input included); the names swap freely among them. Everything is
    checked before anything is renamed; a model already part of another is refused (its
    parent connects it by its terminals' names)."""
    if model._used:
        raise ValueError(f"{what}: {model!r} is part of a model already, which connects it by "
                         "its terminals' names: rename before adding it")
    todo: dict[int, tuple[Connection, str]] = {}
    for given, key in renames:
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"{what}: a key is a non-empty str without '.', got {key!r}")
        if isinstance(given, IOKey) and given.name is None:
            cached = model._expr_wires.get(id(given))
            if cached is None or cached[0] is not given:
                raise KeyMismatchError(f"{what}: the IOKey() object given is not a connection "
                                       "of this model (no call of it was given that object)")
            c = cached[1]
        else:
            c = model._resolve(given.name if isinstance(given, IOKey) else given, what)
        if c.name is None or model.conns.get(c.name) is not c:
            raise ValueError(f"{what}: {given!r} is an internal wire of the model: name it with "
                             "expose_keys(name=conn)")
        if id(c) in todo:
            raise ValueError(f"{what}: '{c.name}' is renamed twice")
        held = [k for k, (_, els) in {**list_outputs(model), **list_inputs(model)}.items()
                if c.name in els]
        if held:
            raise ValueError(f"{what}: '{c.name}' is an element of the tuple '{held[0]}', named "
                             "after it: its elements keep their names")
        todo[id(c)] = (c, key)
    new = [k for _, k in todo.values()]
    for key in new:
        other = model.conns.get(key)
        if new.count(key) > 1 or key in model._lists or (other is not None and id(other) not in todo):
            raise KeyMismatchError(f"{what}: key '{key}' is already used by another connection "
                                   f"of the model; its connections are {list(model.conns)}")
    items = [(todo[id(c)][1] if id(c) in todo else n, c) for n, c in model.conns.items()]
    model.conns.clear()
    model.conns.update(items)
    for c, key in todo.values():
        c.name, c.auto_output = key, False


def functional(func: Callable[..., Any]) -> Callable[..., Bound]:
    """The published ``@functional`` decorator: ``func(a, b, *, option=...)`` returning a
    call's output (or a tuple of them) becomes a block of its own. Each call
    ``f(x, y, name=None, option=...)`` runs ``func`` on fresh inputs named after its
    parameters, makes a model of the result (:func:`create`; unnamed, it is named after
    ``func`` in its parent: ``my_lin``, ``my_lin_0``...), and returns that model called on
    ``x, y`` (positionally or by the parameters' names). The other keywords go to ``func``."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(func).parameters.values() if p.kind in kinds]
    from .model import Model

    # (found by pickle as ``<func>.block``: the module's attribute of func's name is the wrapper)
    block = type(func.__name__, (Model,), {"__module__": func.__module__,
                                           "__qualname__": f"{func.__qualname__}.block",
                                           "__doc__": f"The model of @functional {func.__name__}."})

    @functools.wraps(func)
    def wrapper(*args: Any, name: str | None = None, **kwargs: Any) -> Bound:
        who = f"@functional {func.__name__}"
        if len(args) > len(names):
            raise TypeError(f"{who} takes {len(names)} connection(s) {names}, got {len(args)}")
        given = dict(zip(names, args, strict=False))
        for key in [k for k in kwargs if k in names]:
            if key in given:
                raise TypeError(f"{who}: connection '{key}' given twice")
            given[key] = kwargs.pop(key)
        if missing := [n for n in names if n not in given]:
            raise TypeError(f"{who}: connection(s) {missing} not given")
        # (fresh inputs under names of their own, renamed at the end: an input func makes
        # under an argument's name is then a clash, not the same wire)
        temps = [IOKey(f"__{n}") for n in names]
        result = func(*temps, **kwargs)
        model = block.create(*(result if isinstance(result, tuple) else (result,)), name=name)
        unused = [n for n, k in zip(names, temps, strict=True) if k.name not in model.conns]
        if unused:
            raise ValueError(f"{who}: argument(s) {unused} reach no output of what it returns")
        rename_keys(model, list(zip(temps, names, strict=True)), who)
        return model(**given)

    wrapper.block = block  # type: ignore[attr-defined]
    return wrapper


class _CallableModule(types.ModuleType):
    """This module is also the published decorator (``from mithril.models import functional``
    gives the module: the package's attribute of that name)."""

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Bound]:
        return functional(func)


sys.modules[__name__].__class__ = _CallableModule
