"""The physical model: a logical :class:`~mithril.models.Model` flattened into a list of
operator nodes over numbered wires, topologically sorted, with every shape inferred.

Parameter names are the block path plus the parameter role, e.g. ``mlp.linear_0.weight``:
a child is named after its class in snake_case, suffixed ``_i`` only when its parent
holds several blocks of that class, or by its ``name=`` (``Model(name="mlp")``) when given.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from ..models.model import Connection, Model, _as_shape, param_keys
from ..models.operator import Operator, Shape, broadcast_shapes, fmt, unify
from .input_kinds import check_float_trainable, consumers_of, input_kind
from .list_inputs import expand_list_inputs
from .param_roles import name_param_roles


@dataclass
class Node:
    op: Operator
    path: str
    ins: dict[str, int]          # data input key -> wire
    params: dict[str, str]       # parameter key -> parameter name
    out: int
    wrt: frozenset[str] = frozenset()  # keys whose cotangent the NumPy backward needs
    state: dict[str, str] = field(default_factory=dict)  # state key -> state name
    #: a NumPy forward that will be differentiated keeps this node's residuals for its VJP
    #: (the operator saves some, and a gradient flows through the node)
    residuals: bool = False
    #: wires that forward drops right after this node: no later node and no VJP reads them
    drop: tuple[int, ...] = ()
    #: that forward may run this node in place over its first input (``forward_inplace``)
    inplace: bool = False


@dataclass
class Program:
    nodes: list[Node]
    wire_names: list[str]
    wire_shapes: list[Shape | None]
    inputs: dict[str, int]
    outputs: dict[str, int]
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    param_init: dict[str, str] = field(default_factory=dict)
    input_kinds: dict[str, str] = field(default_factory=dict)  # "float" | "int" | "any"
    #: constants (``IOKey(value=...)``) by input name: fed with the inputs, not given by callers
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    #: inputs made trainable (``compile(trainable_keys=...)``): parameters fed to their wire
    param_wires: dict[str, int] = field(default_factory=dict)
    #: model state (BatchNorm's running statistics) by name, and its initialisers
    state_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    state_init: dict[str, str] = field(default_factory=dict)
    #: some operator reads the mode / randomness / state (``Operator.context``)
    has_context: bool = False
    #: some operator draws random bits (``Operator.random``)
    has_random: bool = False
    #: what ``discard_keys`` left unread: the inputs (data / constant parameter roles
    #: included) only the dropped blocks read, then those blocks' own parameters (by their
    #: would-be names); an ``evaluate`` given one refuses it as an unknown key
    pruned: tuple[str, ...] = ()
    #: list inputs (the published Concat's list input) by name: their element inputs' names
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: reached_params's answers, by output set
    _reached: dict[frozenset[str], tuple[str, ...]] = field(default_factory=dict, init=False,
                                                           repr=False, compare=False)

    def reached_params(self, outputs: Iterable[str]) -> tuple[str, ...]:
        """The parameters (in ``param_shapes`` order) that some output of ``outputs`` (known
        output names) depends on: the nodes are walked backwards from the outputs' wires
        through the inputs a gradient flows to (``Node.wrt``), taking the parameters each
        node met reads and the trainable inputs (``param_wires``) met. Structural: one met
        through a zero derivative (a dead ReLU) counts, as torch gives it a zero ``.grad``.
        Cached per set of outputs."""
        key = frozenset(outputs)
        got = self._reached.get(key)
        if got is None:
            live = {self.outputs[k] for k in key}
            names: set[str] = set()
            for node in reversed(self.nodes):  # (topological order: consumers first)
                if node.out in live:
                    live.update(w for k, w in node.ins.items() if k in node.wrt)
                    names.update(node.params.values())
            names.update(n for n, w in self.param_wires.items() if w in live)
            got = self._reached[key] = tuple(n for n in self.param_shapes if n in names)
        return got

    def input_shape(self, name: str) -> Shape | None:
        return self.wire_shapes[self.inputs[name]]

    def output_shape(self, name: str) -> Shape | None:
        return self.wire_shapes[self.outputs[name]]


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _child_names(model: Model, prefix: str) -> list[str]:
    """Each child's path segment: its ``name=`` if given (as published), else its class in
    snake_case, suffixed ``_i`` among the unnamed siblings of that class when there are several."""
    given = [n if isinstance(n := getattr(b, "__dict__", {}).get("name"), str) else None
             for b, _ in model.blocks]
    counts = Counter(type(b).__name__ for (b, _), g in zip(model.blocks, given, strict=True) if g is None)
    seen: Counter[str] = Counter()
    names = []
    for (block, _), g in zip(model.blocks, given, strict=True):
        if g is None:
            cls = type(block).__name__
            g = _snake(cls) + (f"_{seen[cls]}" if counts[cls] > 1 else "")
            seen[cls] += 1
        names.append(g)
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:  # (a name given twice, or one that an unnamed sibling's default also takes)
        raise ValueError(f"two blocks of {prefix or 'the model'} are both named {twice[0]!r}: "
                         "give siblings different name= (their parameters are named after them)")
    return names


class _Builder:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.shapes: list[Shape | None] = []
        self.nodes: list[Node] = []
        self.consts: dict[int, np.ndarray] = {}
        self.paths: dict[int, str] = {}  # id(operator) -> its path (each instance once)
        #: unnamed wires declared not differentiable (set_differentiability({lin.weight: False}))
        self.frozen: set[int] = set()

    def wire(self, name: str, shape: Shape | None) -> int:
        self.names.append(name)
        self.shapes.append(shape)
        return len(self.names) - 1

    def conn_wire(self, c: Connection, name: str) -> int:
        w = self.wire(name, c.shape)
        if c.value is not None:
            self.consts[w] = c.value
        if c.name is None and c.differentiable is False:
            self.frozen.add(w)
        return w

    def merge_shape(self, w: int, shape: Shape | None, where: str) -> None:
        self.shapes[w] = unify(self.shapes[w], shape, self.names[w], where)

    def flatten(self, model: Model, outer: Mapping[int, int], prefix: str) -> None:
        """``outer`` maps id(connection) of ``model``'s terminals to wires of the parent."""
        wires: dict[int, int] = dict(outer)
        for name, c in model.conns.items():
            where = f"{prefix}.{name}" if prefix else name
            if id(c) in wires:
                self.merge_shape(wires[id(c)], c.shape, where)
                if c.value is not None:
                    self.consts[wires[id(c)]] = c.value
            else:
                wires[id(c)] = self.conn_wire(c, where)
        for (block, mapping), child in zip(model.blocks, _child_names(model, prefix), strict=True):
            path = f"{prefix}.{child}" if prefix else child
            for key, c in mapping.items():
                if id(c) not in wires:  # internal wire
                    wires[id(c)] = self.conn_wire(c, f"{path}.{key}")
            if isinstance(block, Operator):  # parameter roles given in connect(...) are wires too
                first = self.paths.setdefault(id(block), path)
                if first != path:  # (one model refuses it when added; two sub-models meet here)
                    raise ValueError(
                        f"{block!r} is used twice, as '{first}' and '{path}': one instance is "
                        f"one node with its own parameters; create a new instance, or share "
                        f"parameters by name (connect(weight='w'))")
                keys = (*block.inputs, *(k for k in param_keys(block) if k in mapping))
                self.nodes.append(Node(block, path, {k: wires[id(mapping[k])] for k in keys},
                                       {}, wires[id(mapping["output"])]))
            else:
                inner = {id(block.conns[k]): wires[id(c)] for k, c in mapping.items()}
                self.flatten(block, inner, path)


def _fill_constant(b: _Builder, prog: Program, w: int, want: Shape, where: str, uses: int) -> None:
    """Broadcast the constant on wire ``w`` (a number for ``Linear``'s weight) to the
    parameter shape ``want``, as a float array: the operator's forward and VJP read a float
    parameter of its own shape on every backend. Refused where that shape has a free dimension
    or where other blocks read the same constant (they would see the broadcast array)."""
    value = b.consts[w]
    if value.dtype.kind in "biu":
        value = value.astype(np.float64)  # an int weight is a float parameter's value
    if tuple(value.shape) != want and (any(d is None for d in want) or uses > 1):
        why = "has a free dimension" if uses <= 1 else "is read by other blocks as well"
        raise ShapeError(f"{where}: a constant of shape {fmt(tuple(b.consts[w].shape))} cannot be "
                         f"broadcast to the parameter's shape {fmt(want)} (it {why}); give the "
                         "constant that whole shape")
    full = np.array(np.broadcast_to(value, want))  # a copy: its own, writable array
    b.consts[w] = prog.constants[b.names[w]] = full
    b.shapes[w] = want


def _check_disjoint(groups: Mapping[str, tuple[str, ...]]) -> None:
    """A key in two of ``compile``'s key sets (a constant that is also data, ...) is a
    ``ValueError`` naming the keys and the sets, as in the published Mithril: which role
    it would get is otherwise an accident of the order they are applied in."""
    seen: dict[str, list[str]] = {}
    for what, keys in groups.items():
        for key in dict.fromkeys(keys):
            seen.setdefault(key, []).append(what)
    common = {k: v for k, v in seen.items() if len(v) > 1}
    if common:
        detail = "; ".join(f"'{k}' in {' and '.join(v)}" for k, v in common.items())
        raise ValueError("compile: constant, data, trainable and discard keys must be disjoint "
                         f"sets; common keys: {detail}")


def build_program(model: Model | Operator, shapes: Mapping[str, object] | None = None,
                  trainable_keys: Iterable[str] = (), *, data_keys: Iterable[str] = (),
                  constant_keys: Mapping[str, object] | None = None,
                  discard_keys: Iterable[str] = ()) -> Program:
    """Flatten ``model``, sort it, and infer every wire and parameter shape. Inputs named in
    ``trainable_keys`` become parameters (their shapes must be known): they are given with
    the parameters and get gradients. A wire that feeds a parameter role (``connect(weight=
    "w")``) is a parameter under its name unless named in ``data_keys`` (then a data input)
    or given a value. ``constant_keys`` folds in values for inputs; ``discard_keys`` drops
    outputs."""
    data_keys, trainable_keys, discard_keys = tuple(data_keys), tuple(trainable_keys), tuple(discard_keys)
    _check_disjoint({"constant_keys": tuple(constant_keys or ()), "data_keys": data_keys,
                     "trainable_keys": trainable_keys, "discard_keys": discard_keys})
    if isinstance(model, Operator):
        top = Model()
        top |= model
        model = top
    finalize = getattr(model, "_finalize_for_compile", None)
    if finalize is not None:  # a TrainModel adds its losses and final_cost now
        finalize()
    b = _Builder()
    b.flatten(model, {}, "")
    terminals = set(model.terminals) | set(model.output_keys)
    top_wires = {name: i for i, name in enumerate(b.names) if name in terminals}
    # parameters named in constant_keys / data_keys by their compiled names (param_roles.py)
    extra, data_keys, trainable_keys = name_param_roles(b, top_wires, constant_keys, data_keys,
                                                        trainable_keys, model, tuple(shapes or ()))
    top_wires.update(extra)
    shapes, constant_keys, data_keys, trainable_keys, lists = expand_list_inputs(
        b, top_wires, shapes, constant_keys, data_keys, trainable_keys)
    for key, shape in shapes.items():
        if key not in top_wires:
            raise KeyMismatchError(f"compile(shapes=...): model has no terminal '{key}' (nor "
                                   f"a parameter of that name); its terminals are "
                                   f"{sorted(top_wires)}")
        b.merge_shape(top_wires[key], _as_shape(key, shape), f"{key} (compile shapes)")

    nodes = _toposort(b.nodes, b.names)
    produced = {n.out for n in nodes}
    inputs = {n: w for n, w in top_wires.items() if w not in produced}
    outputs = {n: w for n, w in top_wires.items() if w in produced}
    for key, value in (constant_keys or {}).items():
        if key not in inputs:
            raise KeyMismatchError(f"compile(constant_keys=...): '{key}' is not an input; the inputs "
                                   f"are {sorted(inputs)}")
        value = np.asarray(value)
        b.merge_shape(inputs[key], tuple(value.shape), f"{key} (compile constant_keys)")
        b.consts[inputs[key]] = value
    for w in b.consts:
        if w in produced:
            raise ValueError(f"connection '{b.names[w]}' has a value but is an output")
        inputs[b.names[w]] = w
    data = set(data_keys)
    for key in sorted(data - set(inputs)):
        raise KeyMismatchError(f"compile(data_keys=...): '{key}' is not an input; the inputs are "
                               f"{sorted(inputs)}")
    for key in discard_keys:
        if key not in outputs:
            raise KeyMismatchError(f"compile(discard_keys=...): '{key}' is not an output; the outputs "
                                   f"are {sorted(outputs)}")
        del outputs[key]
    pruned: tuple[str, ...] = ()
    if discard_keys:  # as the published infer_ignore: what no output left reads goes too
        kept, live = _prune(nodes, outputs)
        unread = tuple(n for n, w in inputs.items() if w not in live)
        for name in unread:
            del inputs[name]
        b.consts = {w: v for w, v in b.consts.items() if w in live}
        trainable_keys = tuple(k for k in trainable_keys if k not in unread)
        stay = {id(n) for n in kept}
        pruned = unread + tuple(f"{n.path}.{k}" for n in nodes if id(n) not in stay  # their parameters
                                for k in n.op.param_init if k not in n.ins and k not in _optional_params(n.op))
        nodes = kept
    prog = Program(nodes, b.names, b.shapes, inputs, outputs)
    prog.constants = {b.names[w]: v for w, v in b.consts.items()}
    prog.pruned = pruned
    prog.lists = lists
    # wires feeding a parameter role: parameters (named as the wire), unless data or constant
    slot_wires: dict[int, tuple[Node, str]] = {}
    for node in nodes:
        for k, w in node.ins.items():
            if k in param_keys(node.op):
                slot_wires.setdefault(w, (node, k))
    top_of = {w: n for n, w in inputs.items()}
    wire_params = {w: top_of.get(w, b.names[w]) for w in slot_wires
                   if w not in produced and w not in b.consts and top_of.get(w) not in data}
    for name in wire_params.values():
        inputs.pop(name, None)
    consumers = consumers_of(nodes)
    for key in trainable_keys:
        if key not in inputs or key in prog.constants:
            raise KeyMismatchError(f"compile(trainable_keys=...): '{key}' is not an input; the "
                                   f"inputs are {sorted(k for k in inputs if k not in prog.constants)}")
        w = prog.param_wires[key] = inputs.pop(key)
        check_float_trainable(model, key, w, consumers)
        if b.shapes[w] is None or any(d is None for d in b.shapes[w]):
            raise ShapeError(f"trainable input '{key}' needs a known shape, got {fmt(b.shapes[w])}; "
                             "declare it with compile(..., shapes=...)")
        prog.param_shapes[key] = tuple(int(d) for d in b.shapes[w])
        prog.param_init[key] = "normal"

    _check_int_fed(nodes, b.names)
    for name, w in inputs.items():
        prog.input_kinds[name] = input_kind(model, name, w, consumers)
        got = np.asarray(b.consts[w]).dtype if w in b.consts else None
        if got is not None and prog.input_kinds[name] == "int" and got.kind not in "iu":
            raise DTypeError(f"constant '{name}': it feeds integer inputs (indices), so it must "
                             f"have an integer dtype, as data must; got {got}")

    differentiable: set[int] = set(prog.param_wires.values()) | set(wire_params)  # depend on a parameter
    # wires whose values are known now (Size's output; an integer constant: Arange's start)
    values: dict[int, object] = {w: v for w, v in b.consts.items() if known_constant(v)}
    for node in nodes:
        in_shapes = {k: b.shapes[w] for k, w in node.ins.items()}
        with _blame(node, b):
            pshapes = dict(node.op.param_shapes(in_shapes))
        # parameters an operator reads by name (shared with the block that made them)
        shared = getattr(node.op, "param_names", None) or {}
        for key, pname in shared.items():
            if pname not in prog.param_shapes and pname in inputs and key not in node.ins:
                node.ins[key] = inputs[pname]  # compiled as data or a constant: read that input
                in_shapes[key] = b.shapes[inputs[pname]]
                continue
            if pname not in prog.param_shapes:
                raise KeyMismatchError(f"{node.path} ({type(node.op).__name__}): '{pname}' names no "
                                       f"parameter; the parameters are {sorted(prog.param_shapes)}")
            node.params[key] = pname
            pshapes[key] = prog.param_shapes[pname]
        for key in [k for k in pshapes if k in node.ins]:  # a parameter role given as a wire
            w, want = node.ins[key], pshapes.pop(key)
            if w in b.consts:  # a constant need only broadcast to the parameter's shape
                got = tuple(b.consts[w].shape)
                full = broadcast_shapes(want, got, f"{node.path}.{key}")
                if len(full) == len(want) and all(d is None or d == f for d, f in zip(want, full)):
                    want = full  # (a free dimension the constant gives: Linear's input width)
                if full != tuple(want):
                    raise ShapeError(f"{node.path}.{key}: a constant of shape {fmt(got)} does not "
                                     f"broadcast to the parameter's shape {fmt(want)}")
                if got != tuple(want) or b.consts[w].dtype.kind in "biu":
                    _fill_constant(b, prog, w, tuple(want), f"{node.path}.{key}",
                                   len(consumers.get(w, ())))
            else:
                b.merge_shape(w, want, f"{node.path}.{key}")
            in_shapes[key] = b.shapes[w]
        for key in node.op.param_init:
            if key in pshapes or key in node.ins:
                continue
            if key in _optional_params(node.op):
                continue
            first = node.op.inputs[0]
            raise ShapeError(
                f"cannot infer the shape of parameter '{node.path}.{key}': the shape of "
                f"'{b.names[node.ins[first]]}' is {fmt(in_shapes[first])}; declare input shapes "
                f"with model.set_shapes(...) or compile(..., shapes=...)")
        for key, shape in pshapes.items():
            if key in shared:
                continue
            pname = f"{node.path}.{key}"
            _check_own_name(pname, "parameter", inputs, outputs, prog)
            node.params[key] = pname
            prog.param_shapes[pname] = tuple(int(d) for d in shape)
            prog.param_init[pname] = node.op.param_init[key]
        with _blame(node, b):
            out = infer_output(node, {**in_shapes, **pshapes}, values)
        b.merge_shape(node.out, out, f"{node.path}.output (inferred)")
        with _blame(node, b):
            sshapes = dict(node.op.state_shapes(in_shapes))
        for key, shape in sshapes.items():
            _check_own_name(f"{node.path}.{key}", "state array", inputs, outputs, prog)
            sname = node.state[key] = f"{node.path}.{key}"
            prog.state_shapes[sname] = tuple(int(d) for d in shape)
            prog.state_init[sname] = node.op.state_init[key]
        node.wrt = frozenset(node.params) | {k for k, w in node.ins.items() if w in differentiable}
        if node.wrt:
            differentiable.add(node.out)
        node.residuals = bool(node.wrt) and node.op.has_residuals
    for w, name in wire_params.items():
        node, key = slot_wires[w]
        shape = b.shapes[w]
        if shape is None or any(d is None for d in shape):
            raise ShapeError(f"cannot infer the shape of parameter '{name}' ({node.path}.{key}): "
                             f"got {fmt(shape)}; declare it: compile(..., shapes={{{name!r}: "
                             "[...]})")
        if name in prog.param_shapes:
            raise KeyMismatchError(f"parameter name '{name}' is used twice")
        prog.param_wires[name] = w
        prog.param_shapes[name] = tuple(int(d) for d in shape)
        prog.param_init[name] = node.op.param_init[key]
    prog.has_context = any(n.op.context for n in nodes)
    prog.has_random = any(n.op.random for n in nodes)
    _plan_drops(prog)
    return prog


def known_constant(v: Any) -> bool:
    """An integer constant whose value blocks may read at compile time (a size, an end, a
    list of sizes): 0-d or 1-d."""
    return np.ndim(v) <= 1 and np.asarray(v).dtype.kind in "iu"


def infer_output(node: Node, shapes: dict, values: dict[int, object]) -> Shape | None:
    """The node's output shape; an operator that reads values at compile time
    (``value_inputs``: ``Arange``'s ``stop`` from a ``Size`` block) gets those it has, and
    one that knows its output's value from shapes (``static_value``: ``Size``) gives it
    (``None`` until those shapes are known; a wire of another block is not in ``values``)."""
    op = node.op
    wanted = getattr(op, "value_inputs", None)
    if wanted:
        out = op.infer_shape(shapes, values={k: values[w] for k, w in node.ins.items()
                                             if k in wanted and w in values})
    else:
        out = op.infer_shape(shapes)
    known = getattr(op, "static_value", None)
    if known is not None:  # (None: known once the shapes are)
        values[node.out] = known(shapes)
    elif op.passes_value is not None:  # (a Buffer passes its input's on)
        v = op.passes_value({k: values[w] for k, w in node.ins.items() if w in values})
        if v is not None:
            values[node.out] = v
    return out


def _check_own_name(name: str, what: str, inputs: Mapping[str, int],
                    outputs: Mapping[str, int], prog: Program) -> None:
    """A parameter / state array is named by its path (``linear.weight``): a terminal or a
    parameter named so already (an input ``IOKey("linear.weight")``) is refused, naming both,
    rather than one of them shadowing the other in the compiled model's names."""
    other = "input" if name in inputs else "output" if name in outputs else \
        "trainable input" if name in prog.param_wires else None
    if other is not None:
        raise KeyMismatchError(f"the {what} '{name}' (named by its path) and the model's {other} "
                               f"'{name}' have one name; rename the {other} (an IOKey name "
                               "without '.', or name the block otherwise: Linear(2, name=...))")


def _check_int_fed(nodes: list[Node], names: list[str]) -> None:
    """A comparison's bool output fed to an integer input (``x[x > 0]``: an index the model
    computes; an ``Embedding`` index) is a ``TypeError`` naming both, not the backend's
    error at the first run (a mask selects as many elements as its values say: no shape)."""
    bools = {n.out: n for n in nodes if getattr(n.op, "output_dtype", None) == "bool"}
    for node in nodes:
        for k, w in node.ins.items():
            if k in node.op.int_inputs and w in bools:
                raise TypeError(
                    f"{node.path}.{k} ({type(node.op).__name__}) takes integer indices, but "
                    f"'{names[w]}' is the bool output of {bools[w].path}: a mask the model "
                    "computes selects a number of elements known only from its values, which "
                    "a compiled program cannot shape; Where(cond, x, 0) keeps the shape")


def _prune(nodes: list[Node], outputs: Mapping[str, int]) -> tuple[list[Node], set[int]]:
    """The nodes (in order) that some output of ``outputs`` reads, directly or through
    other nodes, and those that update state (BatchNorm's running statistics, kept as
    the published keeps state updates); and the wires those nodes and outputs read. The
    parameters of the nodes dropped are never made, and the inputs only they read are no
    longer inputs (the published ``infer_ignore`` after ``discard_keys``)."""
    live = set(outputs.values())
    kept: set[int] = set()
    produced = {n.out for n in nodes}
    while True:
        for node in reversed(nodes):  # (topological order: consumers first)
            if id(node) not in kept and (node.out in live or node.op.state_init):
                kept.add(id(node))
                live.update(node.ins.values())
        held = [n for n in nodes if id(n) in kept]
        # a block whose parameter a kept block reads (a TrainModel's regularizer: by name, or
        # its role's wire read as an input) stays, else the parameter would not be made
        refs = {p for n in held for p in (getattr(n.op, "param_names", None) or {}).values()}
        roles = {w for n in held for k, w in n.ins.items() if k in param_keys(n.op)}
        more = [n for n in nodes if id(n) not in kept and (
            any(f"{n.path}.{k}" in refs for k in n.op.param_init)
            or any(w in live and w not in roles and w not in produced
                   for k, w in n.ins.items() if k in param_keys(n.op)))]
        if not more:
            return held, live
        for n in more:
            kept.add(id(n))
            live.update(n.ins.values())


def _plan_drops(prog: Program) -> None:
    """``node.drop`` for a NumPy forward that keeps residuals: each intermediate wire goes
    after its last forward reader unless some VJP reads it (every terminal of an operator
    but its ``vjp_ignores``). Inputs, parameters and outputs always stay."""
    keep = set(prog.outputs.values()) | set(prog.inputs.values()) | set(prog.param_wires.values())
    last: dict[int, int] = {}
    for i, node in enumerate(prog.nodes):
        last[node.out] = i  # a wire nobody reads goes right away
        for w in node.ins.values():
            last[w] = i
        if node.wrt:  # (a node with residuals to keep gets them in this pass)
            ignores = node.op.vjp_ignores
            keep.update(w for k, w in node.ins.items() if k not in ignores)
            if "output" not in ignores:
                keep.add(node.out)
    drops: dict[int, list[int]] = {}
    for w, i in last.items():
        if w not in keep:
            drops.setdefault(i, []).append(w)
    producer = {n.out: n for n in prog.nodes}
    readers: dict[int, int] = {}
    for node in prog.nodes:
        for w in set(node.ins.values()):
            readers[w] = readers.get(w, 0) + 1
    for i, node in enumerate(prog.nodes):
        node.drop = tuple(drops.get(i, ()))
        # in place: a fresh array that only this node reads, and nothing after it
        w = node.ins.get(node.op.inputs[0]) if node.op.inputs else None
        node.inplace = (node.op.has_inplace and w in node.drop and readers.get(w) == 1
                        and list(node.ins.values()).count(w) == 1
                        and w in producer and producer[w].op.fresh_output)


@contextmanager
def _blame(node: Node, b: _Builder) -> Iterator[None]:
    """Re-raise an operator's ShapeError with the node and the wires it reads."""
    try:
        yield
    except ShapeError as e:
        wires = ", ".join(f"'{k}' <- '{b.names[w]}' {fmt(b.shapes[w])}" for k, w in node.ins.items())
        raise ShapeError(f"{node.path} ({type(node.op).__name__}): {e} (inputs: {wires})") from None


def _optional_params(op: Operator) -> set[str]:
    off = set()
    if getattr(op, "use_bias", True) is False:
        off.add("bias")
    if getattr(op, "use_scale", True) is False:
        off.add("weight")
    return off


def _toposort(nodes: list[Node], names: list[str]) -> list[Node]:
    producer: dict[int, Node] = {}
    for n in nodes:
        if n.out in producer:
            raise ValueError(f"connection '{names[n.out]}' is produced by both "
                             f"'{producer[n.out].path}' and '{n.path}'")
        producer[n.out] = n
    order: list[Node] = []
    state: dict[int, int] = {}  # 1 visiting, 2 done

    def visit(n: Node) -> None:
        s = state.get(id(n))
        if s == 2:
            return
        if s == 1:
            raise ValueError(f"the model has a cycle through '{n.path}'")
        state[id(n)] = 1
        for w in n.ins.values():
            if w in producer:
                visit(producer[w])
        state[id(n)] = 2
        order.append(n)

    for n in nodes:
        visit(n)
    return order
