"""Logical models: what is connected to what.

A :class:`Model` holds blocks (operators or other models) wired by named
connections. ``model |= block`` adds a block wired as its ``connect(...)`` call
says; ``model += block`` also wires the block's first input to the output of the
block added before it. A block's terminal left unnamed becomes a terminal of
the model under the same key (made unique with a suffix if taken); with ``+=`` the
newest block's output takes over the name ``"output"`` from the previous one.
Named connections that some block produces are the model's outputs; the others
are its inputs. Nothing here knows about backends: see :mod:`mithril.compile`.

Names given explicitly win over names made up for outputs left unnamed: an
explicit ``output="output"`` takes the name from the output an earlier block got
by default, which becomes an internal wire (as in the published Mithril, where
an output left unnamed is not a terminal). A nested model's named wire that it
both produces and consumes itself stays inside it: it is reachable from the
parent only when named in ``child.connect(...)``.

Connections are also objects: ``lin.input``, ``lin.output``, ``lin.weight`` (a
:class:`Terminal`) and ``model.cin`` / ``model.cout`` (the canonical input and output, which
``+=`` wires; :meth:`Model.set_cin` / :meth:`Model.set_cout` choose them). ``connect(...)``
takes a name, an :class:`IOKey`, such an object (the wire it refers to, named or not) or a
constant number / array. A parameter role given in ``connect(weight=...)`` is a wire: a name
(two blocks naming the same share it), a constant, or a connection; it stays a parameter
(under that name) unless it is a constant or compiled as a data key.

Connection objects and ``IOKey`` also take Python's operators and indexing
(``lin1.output + lin2.output * 2.0``, ``model.input[:, 0]``, ``x.T``, ``x.sum(axis=1)``): the
result is an expression (:mod:`mithril.models.expressions`) whose operator blocks are added to
the model it is connected to, when it is connected.

A block's call (``Linear(3)(input=x)``, what ``connect`` returns) is also a connection: its
block's output, which the model that reaches it adds first; ``Model.create(out)`` makes a
frozen model of the calls ``out`` reaches (the published functional API:
:mod:`mithril.models.functional`). ``+=`` of a block whose canonical input ``connect`` gives
while another input is left unnamed (``+= Subtract().connect(left=x)``) is refused, as
published (nothing to wire the previous output to).

A call that raises (``|=``, ``+=``, ``Model.create``) leaves the model (and the calls it
reached) as it was. The connection objects
(``IOKey``, ``Connection``, ``Terminal``) live in :mod:`mithril.models.connections` and are
importable from here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

from ..errors import KeyMismatchError
from .canonical import cin_key, cout_key
from .connection_types import check_fed, kinds_of, merged, type_name
from .connections import Connection, IOKey, Terminal
from .declarations import _as_shape, _declare, check_block_name
from .expressions import Expression, wire_expression
from .functional import Bound, Given, _named_inputs, create, param_keys, pull_call, rename_keys
from .list_terminals import bind_list_inputs, is_list_value, list_input, list_of_call
from .list_wires import ListWire, ToList, add_list_block, check_lists_read, expand_lists
from .operator import Operator, named_connections, takes_name, unify

__all__ = ["Bound", "Connection", "IOKey", "Model", "Terminal", "cin_key",
           "cout_key", "param_keys"]


Block = Union[Operator, "Model"]


class Model:
    """A composition of operators and models with named terminals. ``name`` (as published)
    names this model where it is a child: its parameters are then ``<name>.<role path>``
    (``Model(name="mlp")`` in a parent: ``mlp.linear_0.weight``) instead of the snake_case
    class name (``model_0``); siblings may not share a name."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        takes_name(cls)  # (every block takes name=, as published)

    def __init__(self, name: str | None = None) -> None:
        self.name = check_block_name(name, type(self).__name__)
        self.blocks: list[tuple[Block, dict[str, Connection]]] = []
        self.conns: dict[str, Connection] = {}
        self._last_output: Connection | None = None
        self._cin: Connection | None = None
        self._cout: Connection | None = None
        self._used = False
        #: id(expression) -> (expression, the wire carrying its value) for the expressions
        #: added to this model (one expression object is added once)
        self._expr_wires: dict[int, tuple[Expression, Connection]] = {}
        #: during ``_add``: the (mapping, key) of parameter roles that became wires (to undo)
        self._new_roles: list[tuple[dict[str, Connection], str]] | None = None
        #: during ``_add``: (connection, kinds, differentiable) before a declaration changed them
        self._declared: list[tuple[Connection, Any, Any]] | None = None
        #: ToList / ToTuple outputs (:mod:`mithril.models.list_wires`): named ones by name, and
        #: every such block with its list
        self._lists: dict[str, Any] = {}
        self._list_blocks: list[tuple[Any, Any]] = []
        #: made by ``Model.create``: nothing more is added to it
        self._frozen = False
        #: during ``_add``: (block, its __dict__ (an operator's) or None, its ``_used``, the
        #: call added, that call's home) for each block added, to undo
        self._touched: list[tuple[Any, Any, Any, Any, Any]] | None = None

    def __getattr__(self, name: str) -> Terminal:
        """``model.input``: a terminal (or a named internal wire) of this model as an object."""
        conns = self.__dict__.get("conns")
        lists = self.__dict__.get("_lists") or {}
        if not name.startswith("_") and name in lists:
            return Terminal(self, name, lists[name])  # (a ToList / ToTuple output)
        if name.startswith("_") or conns is None or name not in conns:
            raise AttributeError(f"{type(self).__name__} has no attribute or connection {name!r}")
        return Terminal(self, name, conns[name])

    # -- terminals -----------------------------------------------------------------
    def _produced(self) -> set[int]:
        return {id(m[k]) for b, m in self.blocks for k in b.output_keys}

    def _consumed(self) -> set[int]:
        return {id(m[k]) for b, m in self.blocks for k in b.terminals if k not in b.output_keys}

    @property
    def input_keys(self) -> tuple[str, ...]:
        produced = self._produced()
        return tuple(n for n, c in self.conns.items()
                     if c.exposed and c.value is None and id(c) not in produced)

    @property
    def output_keys(self) -> tuple[str, ...]:
        produced = self._produced()
        return tuple(n for n, c in self.conns.items() if c.exposed and id(c) in produced)

    @property
    def terminals(self) -> tuple[str, ...]:
        return tuple(n for n, c in self.conns.items() if c.exposed and c.value is None)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.input_keys

    #: the terminals ``connect`` takes positionally, in the published signature's order (a
    #: composite block's, e.g. ``LinearSVM``); None: by name only
    positional: tuple[str, ...] | None = None

    def connect(self, *args: Any, **connections: Any) -> Bound:
        """Bind terminals by name (or, for a block with :attr:`positional`, in that order)."""
        if args:
            who = f"{type(self).__name__}.connect"
            order = type(self).positional
            if order is None:
                raise TypeError(f"{who} takes its connections by name here (its terminals: "
                                f"{list(self.terminals)}), got {len(args)} positional")
            connections = named_connections(who, order, args, connections)
        return Bound(self, connections)

    def __call__(self, *args: Any, **connections: Any) -> Bound:
        """``connect`` (as the subclass defines it); as published, positional connections of a
        model without :attr:`positional` nor a ``connect`` of its own bind its inputs in order
        (``created(x, y)``)."""
        if args and type(self).positional is None and type(self).connect is Model.connect:
            connections = named_connections(f"{type(self).__name__}(...)", self.input_keys,
                                            args, connections)
            args = ()
        return self.connect(*args, **connections)

    def summary(self, *args: Any, **kwargs: Any) -> None:
        """The published logical-model summary: not offered (shapes are known once compiled)."""
        raise TypeError("Model.summary: a logical model has no shapes here until compiled; call "
                        "ml.compile(model, backend, shapes=...).summary()")

    @classmethod
    def create(cls, *outputs: Any, name: str | None = None, **named: Any) -> Model:
        """As published, a new frozen model of every block call ``outputs`` reach: the
        positional ones are its canonical output (named ``output`` when left unnamed), the
        keyword ones its outputs under those names (:mod:`mithril.models.functional`)."""
        return create(cls, outputs, named, name)

    def _finalize_for_compile(self) -> None:
        """Called by ``compile``: every ToList / ToTuple list is read by some block."""
        check_lists_read(self)

    # -- canonical input and output ----------------------------------------------------
    @property
    def cin(self) -> Terminal:
        """The canonical input: set by :meth:`set_cin`, else the first block's first input."""
        c = self._cin
        if c is None and self.blocks:
            block, mapping = self.blocks[0]
            key = cin_key(block)
            c = mapping.get(key) if key is not None else None
            if c is not None and id(c) in self._produced():
                c = None
        if c is None:
            ins = self.input_keys
            if not ins:
                raise KeyMismatchError(f"{self!r} has no input")
            c = self.conns[ins[0]]
        return Terminal(self, c.name, c)

    @property
    def cout(self) -> Terminal:
        """The canonical output: set by :meth:`set_cout`, else the last block's output."""
        c = self._cout if self._cout is not None else self._last_output
        if c is None:
            raise KeyMismatchError(f"{self!r} has no output")
        return Terminal(self, c.name, c)

    def set_cin(self, conn: str | Terminal) -> Model:
        self._cin = self._resolve(conn, "set_cin")
        return self

    def set_cout(self, conn: str | Terminal) -> Model:
        self._cout = self._resolve(conn, "set_cout")
        return self

    def rename_key(self, connection: str | Terminal | IOKey, key: str) -> None:
        """As published: the connection (its name, object, or the IOKey a call was given) is
        named ``key`` (:func:`~mithril.models.functional.rename_keys`)."""
        rename_keys(self, [(connection, key)])

    def expose_keys(self, *conns: str | Terminal, **named: str | Terminal) -> Model:
        """Make connections (internal wires, a block's terminals, ``IOKey(expose=False)`` names)
        terminals of this model: outputs when a block produces them. ``name=conn`` names an
        unnamed wire; a wire already named otherwise gets a ``Buffer`` output ``name``."""
        from .primitives import Buffer

        for name, given in [(None, c) for c in conns] + list(named.items()):
            c = self._resolve(given, "expose_keys")
            if name is None:
                name = c.name or (given.key if isinstance(given, Terminal) else None)
                if name is None:
                    raise ValueError("expose_keys: an unnamed wire needs a name: expose_keys(name=conn)")
            if self.conns.get(name, c) is not c:
                raise ValueError(f"expose_keys: '{name}' names another connection of this model")
            if c.name == name or c.name is None:
                c.name, self.conns[name] = name, c
                c.exposed, c.auto_output = True, False
            else:  # named otherwise: an output that copies it
                last = self._last_output
                Model._add(self, Buffer().connect(input=Terminal(self, c.name, c), output=name), chain=False)
                self._last_output = last
        return self

    def _owns(self, c: Connection) -> bool:
        """``c`` is a wire of this model (a TrainModel shares its model's wires)."""
        return any(v is c for v in self.conns.values()) or any(
            v is c for _, m in self.blocks for v in m.values())

    def _resolve(self, given: str | Terminal | Expression, what: str, lists: bool = False) -> Connection:
        """The wire of this model a name, a :class:`Terminal` or an expression already added
        to it refers to; a ToList / ToTuple output (a ``ListWire``) only where ``lists``
        (a block's connection, an expression's operand)."""
        c = self._resolve_any(given, what)
        if not lists and isinstance(c, ListWire):
            raise TypeError(f"{what}: {given!r} is a {c.kind} (ToList / ToTuple output), not a "
                            "connection: a list feeds Concat() or is indexed (lst[0])")
        return c

    def _resolve_any(self, given: str | Terminal | Expression, what: str) -> Connection:
        if isinstance(given, Expression):
            cached = self._expr_wires.get(id(given))
            if cached is not None and cached[0] is given:
                return cached[1]
            raise ValueError(f"{what}: the expression {given!r} is not part of this model; "
                             "connect it to a block first, e.g. model |= Buffer()(input=expr, "
                             "output=\"name\")")
        if isinstance(given, str):
            if given in self._lists:
                return self._lists[given]
            if given not in self.conns:
                raise KeyMismatchError(f"{what}: this model has no connection '{given}'; "
                                       f"its connections are {list(self.conns)}")
            return self.conns[given]
        if not isinstance(given, Terminal):
            raise TypeError(f"{what}: expected a name or a connection, got {type(given).__name__}")
        pull_call(self, given, what)  # (a block's call: its block is added first)
        if given.block is self or (given.conn is not None and self._owns(given.conn)):
            if given.conn is not None:
                return given.conn
            return self._resolve_any(str(given.key), what)
        for block, lw in self._list_blocks:
            if block is given.block and given.key == "output":
                return lw
        for block, mapping in self.blocks:
            if block is given.block:
                key = given.key
                if key not in mapping and key in param_keys(block):
                    mapping[key] = Connection(None)  # a parameter, referred to: now a wire
                    if self._new_roles is not None:
                        self._new_roles.append((mapping, key))
                if key not in mapping:
                    lw = list_of_call(block, str(key), mapping)  # (a created model's list)
                    if lw is not None:
                        return lw
                    raise KeyMismatchError(f"{what}: {given!r} is not a terminal of its block")
                return mapping[key]
        raise ValueError(f"{what}: {given!r} belongs to a block that is not (yet) part of this "
                         "model; add that block first (connections reach direct children only)")

    # -- composition -------------------------------------------------------------
    def _named(self, name: str) -> Connection:
        c = self.conns.get(name)
        if c is None:
            c = self.conns[name] = Connection(name)
        return c

    def _demote(self, c: Connection) -> None:
        """``c`` (an output named by default) becomes an internal wire: its name is freed."""
        if c.name is not None and self.conns.get(c.name) is c:
            del self.conns[c.name]
        c.name, c.auto_output = None, False

    def _given(self, given: Given, is_output: bool, where: Any = None) -> Connection:
        """The connection for a name given in ``connect(...)``. An explicit output name takes
        the name from an output that only had it by default (it becomes an internal wire).
        An expression adds its operator blocks; ``where`` (block, key) names it in errors."""
        if isinstance(given, Terminal):
            return self._resolve(given, "connect", lists=True)
        if isinstance(given, Expression):
            block, key = where if where is not None else (None, "?")
            return wire_expression(self, given, f"{type(block).__name__}.connect({key}=...)")
        key = given if isinstance(given, IOKey) else IOKey(given)
        if is_list_value(key.value):  # (a tuple of inputs: IOKey(value=tuple(TBD ...)))
            return list_input(self, key, is_output)
        if key.name in self._lists:
            if is_output or key.value is not None:
                raise ValueError(f"'{key.name}' is a {self._lists[key.name].kind} (ToList / "
                                 "ToTuple output): it is not an output name, nor takes a value")
            return self._lists[key.name]
        if key.name is None and not is_output and key.value is None:
            # (one IOKey() object is one wire, as published: Add()(left=k, right=k))
            cached = self._expr_wires.get(id(key))
            c = cached[1] if cached is not None and cached[0] is key else Connection(None)
            self._expr_wires[id(key)] = (key, c)
        elif key.name is None:
            c = Connection(None)
        else:
            prev = self.conns.get(key.name)
            if is_output and prev is not None and prev.auto_output:
                self._demote(prev)
            c = self._named(key.name)
        if key.value_shape is not None:
            c.shape = unify(c.shape, key.value_shape, f"{key.name} (declared before)",
                            f"{key.name} (IOKey)")
        if key.value is not None:
            if is_output:
                raise ValueError(f"'{key.name}' is an output: it cannot take a value")
            c.value = key.value
        if key.expose is not None:
            c.exposed = bool(key.expose)
        _declare(c, key.kinds, key.differentiable, key.name or "?", is_output, self._declared)
        return c

    def _fresh_name(self, key: str) -> str:
        if key not in self.conns:
            return key
        i = 1
        while f"{key}_{i}" in self.conns:
            i += 1
        return f"{key}_{i}"

    def _snapshot(self) -> Any:
        """What ``_add`` may change, to put back if it raises (see :meth:`_restore`): new
        blocks are appended and parameter roles that become wires are logged, so this costs
        the named connections only."""
        conns = dict(self.conns)
        attrs = [(c, c.name, c.shape, c.value, c.exposed, c.auto_output) for c in conns.values()]
        self._new_roles, self._declared = [], []
        return (len(self.blocks), conns, attrs, dict(self._expr_wires), self._last_output,
                self._cout, dict(self._lists), len(self._list_blocks))

    def _restore(self, snap: Any) -> None:
        n_blocks, conns, attrs, wires, last, cout, lists, n_lists = snap
        self._lists.clear()
        self._lists.update(lists)
        del self._list_blocks[n_lists:]
        del self.blocks[n_blocks:]
        self.conns.clear()
        self.conns.update(conns)
        for c, name, shape, value, exposed, auto_output in attrs:
            c.name, c.shape, c.value, c.exposed, c.auto_output = name, shape, value, exposed, auto_output
        for c, kinds, diff in reversed(self._declared or ()):
            c.kinds, c.differentiable = kinds, diff
        for mapping, key in self._new_roles or ():
            del mapping[key]
        self._expr_wires.clear()
        self._expr_wires.update(wires)
        self._last_output, self._cout = last, cout

    def _add(self, item: Block | Bound, chain: bool) -> Model:
        """Add ``item`` (a block, or a block bound by ``connect(...)``), and the calls its
        connections reach; if anything raises, the model and those are left as they were."""
        if self._frozen:
            raise AttributeError(f"{self!r} was made by Model.create and is frozen: nothing is "
                                 "added to it; use it in a new model (outer |= created(...))")
        with self._undoable():
            n_blocks = len(self.blocks)
            self._add_block(item, chain)
            _named_inputs(self, n_blocks, True)  # (an unnamed IOKey() input: after what it feeds)
        return self

    @contextlib.contextmanager
    def _undoable(self) -> Iterator[None]:
        """A change to this model (``_add``, ``Model.create``) that, if anything raises, leaves
        the model and the calls it pulled in as they were (:meth:`_snapshot`, the touched
        blocks' log)."""
        snap = self._snapshot()
        self._touched = []
        try:
            yield
        except BaseException:
            self._restore(snap)
            self._undo_touched()
            raise
        finally:
            self._new_roles = self._declared = self._touched = None

    def _undo_touched(self) -> None:
        for block, before, was_used, call, home in reversed(self._touched or ()):
            if before is not None:  # (an operator's configuration a connection set: Concat's n)
                block.__dict__.clear()
                block.__dict__.update(before)
            if isinstance(block, Model) and block is not self:
                block._used = bool(was_used)
            if call is not None:
                call.home = home

    def _add_block(self, item: Block | Bound, chain: bool) -> Model:
        call = item if isinstance(item, Bound) else None
        bound = call if call is not None else Bound(item, {})
        bound.check_keys()  # (a model renamed since the call: rename_key)
        block = bound.block
        if block is self:
            raise ValueError("a model cannot contain itself")
        if getattr(block, "_used", False) or any(b is block for b, _ in self.blocks):
            raise ValueError(f"{block!r} is already part of a model; create a new instance")
        if call is not None and call.home is not None:
            raise ValueError(f"{call!r}: this call was added to {call.home!r} already")
        if self._touched is not None:
            self._touched.append((block, dict(block.__dict__) if isinstance(block, Operator)
                                  else None, getattr(block, "_used", None), call,
                                  None if call is None else call.home))
        if call is not None:
            call.home = self
        if isinstance(block, ToList):
            if any(b is block for b, _ in self._list_blocks):
                raise ValueError(f"{block!r} is already part of a model; create a new instance")
            add_list_block(self, bound, chain)
            return self
        if isinstance(block, Model):
            block._used = True
        mapping: dict[str, Connection] = {}
        n_blocks = len(self.blocks)
        refs = getattr(block, "shape_args", None) if isinstance(block, Operator) else None
        ref_keys = frozenset(refs.keys) if refs is not None else frozenset()
        outs = block.output_keys
        first_in = cin_key(block)
        # a nested model's named wires that it produces and consumes itself stay inside it
        hidden = set()
        if isinstance(block, Model):
            consumed = block._consumed()
            hidden = {k for k in outs if id(block.conns[k]) in consumed and k not in bound.connections
                      and block.conns[k] is not block._cout}
        # ``+=`` wires the canonical output: the one chosen with set_cout, else the latest
        prev_out = self._cout if self._cout is not None else self._last_output
        if chain and first_in is not None and first_in in bound.connections:
            # (published: a commutative operator's other operand: += Add().connect(left=x))
            given_in, first_in = first_in, next((k for k in getattr(
                block, "canonical_inputs", None) or () if k not in bound.connections), None)
            free = [k for k in block.terminals if k not in outs and k not in ref_keys
                    and k not in bound.connections]
            if first_in is None and prev_out is not None:
                # (published: "Submodel must have single available canonical input")
                rest = (f"its input(s) {free} are left unnamed: give them too "
                        f"(right=model.cout), or add it with |=") if free else \
                    "nothing is left to wire it to: add it with |="
                raise KeyMismatchError(
                    f"{type(block).__name__}: += wires the previous output to its canonical "
                    f"input '{given_in}', which connect(...) gives; {rest}")
        bind_list_inputs(self, block, bound.connections, mapping)  # (a created model's tuple)
        if chain and prev_out is not None and first_in is not None \
                and first_in not in bound.connections:
            mapping[first_in] = prev_out
        for key in (*block.terminals, *(k for k in param_keys(block) if k in bound.connections)):
            if key in mapping or (key in ref_keys and key not in bound.connections):
                continue  # (shape wires' inputs: bound below, to what they read)
            if key in bound.connections:
                mapping[key] = self._given(bound.connections[key], key in outs, (block, key))
            elif key in hidden:
                mapping[key] = Connection(None)
            elif key in outs:
                prev = self.conns.get(key)
                if chain and prev is not None and prev.auto_output and prev is prev_out:
                    del self.conns[key]  # demote the previous block's auto-named output
                    prev.name, prev.auto_output = None, False
                c = self._named(self._fresh_name(key))
                c.auto_output = True
                mapping[key] = c
            else:
                mapping[key] = self._named(self._fresh_name(key))
        expand_lists(self, block, mapping)  # (a list fed to Concat(): Concat(n))
        for key, c in mapping.items():
            if isinstance(block, Model):  # a child's declarations hold for the wire it is bound to
                inner = block.conns[key]
                _declare(c, inner.kinds, inner.differentiable, c.name or key, False, self._declared)
            if key not in outs:
                check_fed(c.kinds, c.name, block, key)
        self.blocks.append((block, mapping))
        if len(self.blocks) > n_blocks + 1 or ref_keys:  # (what shape wires read)
            from .shape_wires import bind_shape_refs

            bind_shape_refs(self, n_blocks)
        out_key = cout_key(block, hidden)
        if out_key is not None:
            self._last_output = mapping[out_key]
            if chain:
                self._cout = None  # after ``+=`` the new block's output is the canonical one
        return self

    def __ior__(self, item: Block | Bound) -> Model:
        return self._add(item, chain=False)

    def __iadd__(self, item: Block | Bound) -> Model:
        return self._add(item, chain=True)

    def set_differentiability(self, config: Mapping[str | Terminal, bool] | None = None, /,
                              **kwargs: bool) -> Model:
        """As published: whether inputs of this model get gradients, by name or connection
        (``set_differentiability(x=True)``, ``set_differentiability({model.x: False})``);
        the same as ``IOKey(differentiable=...)`` (see :class:`IOKey`). Everything is
        checked before anything is set."""
        todo = []
        for given, flag in (*(config or {}).items(), *kwargs.items()):
            c = self._resolve(given, "set_differentiability")
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"set_differentiability: the value for '{c.name}' must be a bool, "
                                f"got {flag!r}")
            if id(c) in self._produced():
                raise ValueError(f"set_differentiability: '{c.name}' is computed by a block: its "
                                 "gradient follows from its inputs'")
            todo.append((c, bool(flag)))
        for c, flag in todo:  # (set each as given: a later call may change an earlier one)
            if flag and c.value is not None:
                raise ValueError(f"set_differentiability: '{c.name}' is a constant: it gets no "
                                 "gradient")
            if flag and c.kinds is not None and "float" not in c.kinds:
                raise TypeError(f"set_differentiability: '{c.name}' is {type_name(c.kinds)}; a "
                                "differentiable connection is Tensor[float]")
        for c, flag in todo:
            c.differentiable = flag
            if flag:
                c.kinds = frozenset({"float"})
        return self

    def set_types(self, config: Mapping[str | Terminal, Any] | None = None, /, **kwargs: Any) -> Model:
        """As published: tensor types of connections, by name or connection
        (``set_types(x=Tensor[int])``), as ``IOKey(type=...)`` (intersected with what was
        declared, checked against what each feeds). Everything is checked before anything is set."""
        new: dict[int, tuple[Connection, Any]] = {}
        for given, t in (*(config or {}).items(), *kwargs.items()):
            c = self._resolve(given, "set_types")
            kinds = new.get(id(c), (c, c.kinds))[1]
            new[id(c)] = (c, merged(kinds, kinds_of(t, str(c.name)), str(c.name)))
        todo = list(new.values())
        for c, kinds in todo:
            for block, mapping in self.blocks:
                for key in (k for k, v in mapping.items() if v is c and k not in block.output_keys):
                    check_fed(kinds, c.name, block, key)
        for c, kinds in todo:
            c.kinds = kinds
        return self

    # -- shapes ------------------------------------------------------------------
    def set_shapes(self, config: Mapping[str | Terminal, Sequence[int | None]] | None = None, /,
                   **shapes: Sequence[int | None]) -> Model:
        """Declare shapes, e.g. ``set_shapes(input=[None, 784])`` (None: a free dimension), or
        as published by name or connection: ``set_shapes({model.input: [None, 784], lin.output:
        [None, 10]})``. Everything is checked before anything is set."""
        new: dict[int, tuple[Connection, Any]] = {}
        for given, shape in (*(config or {}).items(), *shapes.items()):
            if isinstance(given, str) and given not in self.conns:
                raise KeyMismatchError(f"set_shapes: model has no terminal '{given}'; "
                                       f"its terminals are {list(self.conns)}")
            c = self._resolve(given, "set_shapes")
            key = c.name or repr(given)
            before = new.get(id(c), (c, c.shape))[1]
            new[id(c)] = (c, unify(before, _as_shape(key, shape), f"{key} (declared before)", key))
        for c, shape in new.values():
            c.shape = shape
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inputs={list(self.input_keys)}, outputs={list(self.output_keys)})"
