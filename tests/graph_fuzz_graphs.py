"""Random small model graphs for the graph fuzzer (:mod:`tests.test_graph_fuzz`).

A :class:`Graph` is plain data: leaves (trainable float inputs ``x<i>`` and integer data
inputs ``k<i>``, each with a shape) and a list of nodes, each an operation on earlier nodes,
with the nodes read as outputs and those given a cotangent. The same graph is built two
ways: as a Mithril :class:`~mithril.models.Model` (connection arithmetic, indexing, shaping,
reductions, and the blocks ``Relu``, ``Tanh``, ``Sigmoid``, ``Linear`` with named and
so shared parameters, ``Where``) by :func:`build_model`, and as the same formula on torch
tensors (autograd: the reference) by :func:`torch_outputs`.

:func:`graphs` is the hypothesis strategy. Its values stay in ranges where every operator
is smooth: a divisor, a square root's and a log's argument and a power's base are
``x * x + 0.5``; an exponent and an ``exp``'s argument go through ``tanh``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

import mithril as ml
from mithril.models import Buffer, IOKey, Linear, Model, Relu, Sigmoid, Tanh, Where

MAX_SIZE = 36  # elements per node: keeps central differences cheap
POWERS = (-1.5, -1.0, 0.5, 2.0, 3.0)


@dataclasses.dataclass
class Graph:
    """``leaves``: name -> (shape, "float" | "data" | "int") (a trainable input, a float or
    an integer data input); ``free``: data leaves compiled with some dimensions None; ``nodes``: (op, ...) tuples on earlier
    node indices; ``outputs``: the node of each output ``out<i>``; ``cots``: the outputs given
    a cotangent (indices into ``outputs``); ``fd_ok``: central differences apply (no
    rounding to float32 inside)."""

    leaves: dict[str, tuple[tuple[int, ...], str]]
    nodes: list[tuple]
    shapes: list[tuple[int, ...]]
    outputs: list[int]
    cots: list[int]
    fd_ok: bool = True
    free: dict[str, tuple] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        lines = [f"leaves={self.leaves}"]
        lines += [f"  n{i} {s}: {n}" for i, (n, s) in enumerate(zip(self.nodes, self.shapes, strict=True))]
        lines.append(f"outputs={self.outputs} cots={self.cots} fd_ok={self.fd_ok}")
        return "\n".join(lines)

    def reached(self) -> set[int]:
        """The nodes some output reads."""
        seen: set[int] = set()
        todo = list(self.outputs)
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo += operands(self.nodes[i])
        return seen

    def used_leaves(self) -> dict[str, tuple[tuple[int, ...], str]]:
        names = {self.nodes[i][1] for i in self.reached() if self.nodes[i][0] == "leaf"}
        return {k: v for k, v in self.leaves.items() if k in names}


def operands(node: tuple) -> list[int]:
    """The node indices ``node`` reads."""
    op = node[0]
    if op == "leaf":
        return []
    if op in ("bin", "where", "concat"):
        return [node[2], node[3]] if op == "bin" else [node[1], node[2], node[3]][op == "concat":]
    if op == "const":
        return [node[2]]
    if op in ("unary", "reduce"):
        return [node[2]]
    return [node[1]]  # index, reshape, transpose, linear, castf


# -- shapes ----------------------------------------------------------------------------------
def _probe(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape)


def result_shape(node: tuple, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of ``node`` (computed by NumPy on zeros)."""
    return tuple(np.shape(_numpy_apply(node, [_probe(s) for s in shapes])))


def _numpy_apply(node: tuple, vals: list[np.ndarray]) -> np.ndarray:
    op = node[0]
    if op == "bin":
        a, b = vals[node[2]], vals[node[3]]
        return a @ b if node[1] == "matmul" else a + b
    if op == "const":
        a, c = vals[node[2]], np.asarray(node[3])
        return (c @ a if node[4] else a @ c) if node[1] == "matmul" else a + c
    if op == "where":
        return np.where(vals[node[1]], vals[node[2]], vals[node[3]])
    if op == "concat":
        return np.concatenate([vals[node[2]], vals[node[3]]], axis=node[1])
    if op == "unary":
        return vals[node[2]]
    if op == "index":
        return vals[node[1]][node[2]]
    if op == "reshape":
        return vals[node[1]].reshape(node[2])
    if op == "transpose":
        return np.transpose(vals[node[1]], node[2])
    if op == "reduce":
        return np.sum(vals[node[2]], axis=node[3], keepdims=node[4])
    if op == "linear":
        return vals[node[1]] @ np.zeros((vals[node[1]].shape[-1], node[2]))
    return vals[node[1]]  # castf


# -- the strategy ------------------------------------------------------------------------------
def _broadcastable(draw: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts with ``shape`` to ``shape`` or beyond: a suffix of it with some
    dimensions 1, maybe with new leading dimensions (rank at most 4)."""
    keep = len(shape) - draw(st.integers(0, len(shape)))  # (drawn small: mostly all of it)
    tail = tuple(d if draw(st.booleans()) else 1 for d in shape[len(shape) - keep:])
    extra = draw(st.integers(0, max(0, 4 - len(shape)))) if keep == len(shape) and draw(
        st.integers(0, 3)) == 0 else 0  # (new leading dims only above the whole shape)
    return tuple(draw(st.integers(1, 2)) for _ in range(extra)) + tail


def _shape(draw: Any) -> tuple[int, ...]:
    """Rank 0 to 3, mostly 2 (hypothesis would otherwise favour scalars)."""
    rank = draw(st.sampled_from([2, 2, 3, 1, 0]))
    return tuple(draw(st.integers(1, 3)) for _ in range(rank))


def _index(draw: Any, shape: tuple[int, ...]) -> Any:
    """A static index for ``shape`` that selects at least one element: ints, slices (any
    step), None, ``...``, at most one integer list or boolean mask."""
    items: list[Any] = []
    advanced = False
    n_axes = draw(st.integers(0, len(shape)))
    from_back = draw(st.booleans())  # ``x[..., i]``: the items index the last axes
    for n in (shape[len(shape) - n_axes:] if from_back else shape[:n_axes]):
        kind = draw(st.sampled_from(["int", "slice", "slice", "none", "list", "mask"]))
        if kind == "none":
            items.append(None)
        if kind == "int" or (kind in ("list", "mask") and advanced):
            items.append(draw(st.integers(-n, n - 1)))
        elif kind in ("slice", "none"):
            step = draw(st.sampled_from([None, 1, 2, -1, -2]))
            start = draw(st.one_of(st.none(), st.integers(-n, n - 1)))
            stop = draw(st.one_of(st.none(), st.integers(-n - 1, n)))
            sl = slice(start, stop, step)
            empty_ok = draw(st.integers(0, 5)) == 0  # now and then an empty array
            items.append(sl if empty_ok or len(range(*sl.indices(n))) else slice(None))
        elif kind == "list":
            advanced = True
            items.append(draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=3)))
        else:
            advanced = True
            mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            mask[draw(st.integers(0, n - 1))] = True
            items.append(mask)
    if from_back:
        items.insert(0, Ellipsis)
    elif draw(st.booleans()):
        items.append(Ellipsis)
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), None)
    if len(items) == 1 and draw(st.booleans()):
        return items[0]
    return tuple(items)


def _reshape(draw: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape of the same size (at most rank 4), maybe with one -1."""
    n = math.prod(shape)
    if n == 0:
        return draw(st.sampled_from([(0,), (2, 0), (0, 1, 3)]))
    factors, rest, p = [], n, 2
    while rest > 1:
        while rest % p == 0:
            factors.append(p)
            rest //= p
        p += 1
    rank = draw(st.integers(0 if n == 1 else 1, 4))
    dims = [1] * max(rank, 1)
    for p in factors:
        dims[draw(st.integers(0, len(dims) - 1))] *= p
    out = tuple(dims[:rank]) if rank else ()
    if out and draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 1))
        out = out[:i] + (-1,) + out[i + 1:]
    return out


@st.composite
def graphs(draw: Any, max_ops: int = 8, with_cast32: bool = False) -> Graph:
    """A random :class:`Graph` (see the module docstring)."""
    leaves: dict[str, tuple[tuple[int, ...], str]] = {}
    nodes: list[tuple] = []
    shapes: list[tuple[int, ...]] = []
    floats: list[int] = []
    ints: list[int] = []
    fd_ok = True

    def add(node: tuple, is_int: bool = False) -> int:
        shape = leaves[node[1]][0] if node[0] == "leaf" else result_shape(node, shapes)
        nodes.append(node)
        shapes.append(shape)
        (ints if is_int else floats).append(len(nodes) - 1)
        return len(nodes) - 1

    def leaf(shape: tuple[int, ...], kind: str = "float") -> int:
        name = f"{dict(float='x', data='d', int='k')[kind]}{len(leaves)}"
        leaves[name] = (shape, kind)
        return add(("leaf", name), kind == "int")

    def unary(name: str, i: int) -> int:
        return add(("unary", name, i))

    def pick(candidates: list[int]) -> int:
        return candidates[draw(st.integers(0, len(candidates) - 1))]

    for _ in range(draw(st.integers(1, 3))):
        leaf(_shape(draw), "data" if draw(st.integers(0, 3)) == 0 else "float")
    if draw(st.integers(0, 2)) == 0:
        leaf(_shape(draw), "int")
    ops = ["add", "sub", "mul", "div", "pow", "matmul", "neg", "abs", "exp", "sqrt", "log",
           "square", "relu", "tanh", "sigmoid", "index", "reshape", "transpose", "reduce",
           "linear", "where", "castf", "roundtrip", "concat"] + (["cast32"] if with_cast32 else [])
    for _ in range(draw(st.integers(2, max_ops))):
        op = draw(st.sampled_from(ops))
        a = floats[-1] if draw(st.booleans()) else pick(floats)  # chains (linear -> relu) too
        sa = shapes[a]
        if op in ("add", "sub", "mul", "div", "pow"):
            mode = draw(st.sampled_from(["node", "leaf", "scalar", "array"]))
            partners = [j for j in floats if _broadcasts(sa, shapes[j])]
            if mode == "node" and partners:
                b = pick(partners)
            elif mode in ("scalar", "array"):
                c = (draw(st.sampled_from([-2.0, -0.5, 1.0, 2.5, 3]))
                     if mode == "scalar" else np.round(np.linspace(-1.5, 2.0, math.prod(
                         s := _broadcastable(draw, sa))).reshape(s), 3))
                if op == "pow":  # a positive base to a fixed power, or 2.5 ** tanh(x)
                    base = draw(st.sampled_from(["pos", "pos", "any", "tanh"]))
                    if base == "any":  # any sign, to a whole power
                        add(("const", "pow", a, draw(st.sampled_from([2.0, 3, 1.0])), False))
                    elif base == "pos":
                        add(("const", "pow", unary("pos", a), draw(st.sampled_from(POWERS)), False))
                    else:
                        add(("const", "pow", unary("tanh", a), 2.5, True))
                    continue
                if op == "div" and mode == "array":
                    c = np.abs(c) + 0.5
                left = draw(st.booleans()) and op != "div"
                add(("const", op, a, c, left))
                continue
            else:
                b = leaf(_broadcastable(draw, sa), "data" if draw(st.integers(0, 3)) == 0 else "float")
            if draw(st.booleans()):
                a, b = b, a
            if op == "div":
                b = unary("pos", b)
            elif op == "pow":
                a, b = unary("pos", a), unary("tanh", b)
            if math.prod(np.broadcast_shapes(shapes[a], shapes[b])) <= MAX_SIZE:
                add(("bin", op, a, b))
        elif op == "matmul":
            if len(sa) < 2:
                continue
            m = draw(st.integers(1, 3))
            rights = [j for j in floats if len(shapes[j]) >= 2 and shapes[j][-2] == sa[-1]
                      and _broadcasts(sa[:-2], shapes[j][:-2])]
            mode = draw(st.sampled_from(["node", "leaf", "const"]))
            if mode == "const":
                left = draw(st.booleans())
                c = (np.round(np.linspace(-1.0, 1.5, m * sa[-2]), 3).reshape(m, sa[-2]) if left
                     else np.round(np.linspace(-1.0, 1.5, sa[-1] * m), 3).reshape(sa[-1], m))
                add(("const", "matmul", a, c, left))
                continue
            b = pick(rights) if mode == "node" and rights else leaf(
                (*_broadcastable(draw, sa[:-2])[-2:], sa[-1], m))
            if math.prod(np.broadcast_shapes(sa[:-2], shapes[b][:-2])) * sa[-2] * shapes[b][-1] <= MAX_SIZE:
                add(("bin", "matmul", a, b))
        elif op in ("neg", "abs", "square", "relu", "tanh", "sigmoid", "roundtrip", "cast32"):
            if op == "cast32":
                fd_ok = False
            unary(op, a)
        elif op == "exp":
            unary("exp", unary("tanh", a))
        elif op in ("sqrt", "log"):
            unary(op, unary("pos", a))
        elif op == "index":
            add(("index", a, _index(draw, sa)))
        elif op == "reshape":
            add(("reshape", a, _reshape(draw, sa)))
        elif op == "transpose":
            axes = None if draw(st.booleans()) else tuple(
                p - len(sa) * draw(st.booleans()) for p in draw(st.permutations(range(len(sa)))))
            add(("transpose", a, axes))
        elif op == "reduce":
            kind = draw(st.sampled_from(["sum", "mean", "max", "min"]))
            axis: Any = None
            if sa and draw(st.integers(0, 2)):
                chosen = draw(st.lists(st.integers(0, len(sa) - 1), min_size=1, unique=True))
                chosen = [c - len(sa) * draw(st.booleans()) for c in chosen]
                axis = chosen[0] if len(chosen) == 1 and draw(st.booleans()) else tuple(chosen)
            axes = range(len(sa)) if axis is None else np.atleast_1d(axis) % len(sa)
            if kind in ("max", "min") and any(sa[i] == 0 for i in axes):
                kind = "sum"  # (no maximum of no values: a ShapeError, tested on its own)
            add(("reduce", kind, a, axis, draw(st.booleans())))
        elif op == "linear":
            if not sa:
                continue
            d = draw(st.integers(1, 3))
            add(("linear", a, d, f"w{sa[-1]}x{d}", f"b{d}" if draw(st.booleans()) else None))
        elif op == "where":
            k = pick(ints) if ints and draw(st.booleans()) else leaf(_broadcastable(draw, sa), "int")
            b = pick([j for j in floats if _broadcasts(sa, shapes[j])] or [a])
            if _broadcasts(np.broadcast_shapes(sa, shapes[b]), shapes[k]):
                add(("where", k, a, b))
        elif op == "concat":
            if not sa:
                continue
            axis = draw(st.integers(-len(sa), len(sa) - 1))
            fits = [j for j in floats if len(shapes[j]) == len(sa) and all(
                x == y for i, (x, y) in enumerate(zip(shapes[j], sa, strict=True)) if i != axis % len(sa))]
            if draw(st.booleans()) and fits:
                b = pick(fits)
            else:
                other = list(sa)
                other[axis] = draw(st.integers(1, 3))
                b = leaf(tuple(other))
            if (sa[axis] + shapes[b][axis]) * math.prod(sa) // sa[axis] <= MAX_SIZE:
                add(("concat", axis, a, b) if draw(st.booleans()) else ("concat", axis, b, a))
        elif op == "castf":
            if not ints:
                leaf(_shape(draw), "int")
            k = pick(ints)
            move = draw(st.sampled_from(["", "transpose", "index", "reshape"]))
            if move == "transpose" and shapes[k]:  # an integer array moved before the cast
                k = add(("transpose", k, None), True)
            elif move == "index":
                k = add(("index", k, _index(draw, shapes[k])), True)
            elif move == "reshape":
                k = add(("reshape", k, _reshape(draw, shapes[k])), True)
            add(("castf", k))
    if not floats:
        leaf(())
    last = max((i for i in floats if nodes[i][0] != "leaf"), default=floats[-1])  # the deepest
    outputs = [last] + draw(st.lists(st.sampled_from(floats), max_size=3))
    cots = sorted({0} | set(draw(st.lists(st.integers(0, len(outputs) - 1), max_size=3))))
    free = {k: tuple(None if draw(st.booleans()) else d for d in s)
            for k, (s, kind) in leaves.items() if kind != "float" and s and draw(st.booleans())}
    return Graph(leaves, nodes, shapes, outputs, cots, fd_ok, free)


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(a, b)
    except ValueError:
        return False
    return True


# -- building ----------------------------------------------------------------------------------
_SYMBOLS = {"add": "__add__", "sub": "__sub__", "mul": "__mul__", "div": "__truediv__",
            "pow": "__pow__", "matmul": "__matmul__"}


def _mithril_node(m: Model, node: tuple, c: list[Any], dtype: str, i: int) -> Any:
    """The connection (or expression) of ``node`` in ``m``; ``c``: those of earlier nodes."""
    op = node[0]
    if op == "leaf":
        return IOKey(node[1])
    if op == "bin":
        return getattr(c[node[2]], _SYMBOLS[node[1]])(c[node[3]])
    if op == "const":
        name = _SYMBOLS[node[1]]
        const = node[3]
        return getattr(c[node[2]], name.replace("__", "__r", 1) if node[4] else name)(const)
    if op == "unary":
        x, kind = c[node[2]], node[1]
        simple = {"neg": lambda: -x, "abs": lambda: abs(x), "exp": x.exp, "sqrt": x.sqrt,
                  "pos": lambda: x * x + 0.5, "log": None, "square": None,
                  "roundtrip": lambda: x.cast("int64").cast(dtype),
                  "cast32": lambda: x.cast("float32").cast(dtype)}
        if simple.get(kind) is not None:
            return simple[kind]()
        from mithril.models import Log, Square

        block = {"relu": Relu, "tanh": Tanh, "sigmoid": Sigmoid, "log": Log, "square": Square}[kind]()
        m |= block(input=x, output=IOKey(f"h{i}", expose=False))
        return block.output
    if op == "index":
        return c[node[1]][node[2]]
    if op == "reshape":
        return c[node[1]].reshape(node[2])
    if op == "transpose":
        return c[node[1]].T if node[2] is None else c[node[1]].transpose(node[2])
    if op == "reduce":
        return getattr(c[node[2]], node[1])(axis=node[3], keepdim=node[4])
    if op == "linear":
        lin = Linear(node[2], use_bias=node[4] is not None)
        terms = {"input": c[node[1]], "weight": node[3], "output": IOKey(f"h{i}", expose=False)}
        if node[4] is not None:
            terms["bias"] = node[4]
        m |= lin(**terms)
        return lin.output
    if op == "where":
        w = Where()
        m |= w(cond=c[node[1]], input1=c[node[2]], input2=c[node[3]],
               output=IOKey(f"h{i}", expose=False))
        return w.output
    if op == "concat":
        from mithril.models import Concat

        cat = Concat(2, axis=node[1])
        m |= cat(input1=c[node[2]], input2=c[node[3]], output=IOKey(f"h{i}", expose=False))
        return cat.output
    return c[node[1]].cast(dtype)  # castf


def build_model(g: Graph, dtype: str) -> Model:
    """``g`` as a Mithril model with outputs ``out0``, ``out1``, ... (only the nodes an output
    reads are built)."""
    m = Model()
    reached = g.reached()
    c: list[Any] = []
    for i, node in enumerate(g.nodes):
        c.append(_mithril_node(m, node, c, dtype, i) if i in reached else None)
    for k, i in enumerate(g.outputs):
        m |= Buffer()(input=c[i], output=f"out{k}")
    return m


def compile_graph(g: Graph, backend: Any, dtype: str, jit: bool = True) -> Any:
    """``g`` compiled on ``backend`` (float ``dtype``): float leaves trainable, the others
    data, those of ``g.free`` with free dimensions, unless a parameter's shape then cannot
    be inferred (a ``Linear`` on a free last dimension): then all fixed."""
    used = g.used_leaves()
    trainable = [k for k, (_, kind) in used.items() if kind == "float"]
    if g.free:
        try:
            return ml.compile(build_model(g, dtype), backend, trainable_keys=trainable, jit=jit,
                              shapes={k: list(g.free.get(k, s)) for k, (s, _) in used.items()})
        except ml.ShapeError as e:
            if "cannot infer" not in str(e) and "needs a known shape" not in str(e):
                raise
    return ml.compile(build_model(g, dtype), backend, trainable_keys=trainable, jit=jit,
                      shapes={k: list(s) for k, (s, _) in used.items()})


# -- the torch reference -----------------------------------------------------------------------
def _idx(t: torch.Tensor, index: Any) -> torch.Tensor:
    """``t[index]`` with NumPy's semantics (negative steps too): the positions NumPy picks,
    gathered from the flat tensor (autograd adds repeats up)."""
    pos = np.arange(t.numel()).reshape(tuple(t.shape))[index]
    return t.reshape(-1)[torch.from_numpy(np.array(pos, np.int64))].reshape(pos.shape)


def _dims(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def torch_node(node: tuple, v: list[Any], params: dict[str, torch.Tensor],
               data: dict[str, torch.Tensor]) -> torch.Tensor:
    """``node`` on torch tensors (float64)."""
    op = node[0]
    if op == "leaf":
        return params[node[1]] if node[1] in params else data[node[1]]
    if op == "bin":
        a, b = v[node[2]], v[node[3]]
        return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
                "pow": torch.pow, "matmul": torch.matmul}[node[1]](a, b)
    if op == "const":
        a, k = v[node[2]], node[3]
        c = torch.tensor(np.asarray(k, dtype=np.float64)) if not isinstance(k, (int, float)) else float(k)
        left, right = (c, a) if node[4] else (a, c)
        fn = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
              "div": lambda x, y: x / y, "pow": lambda x, y: x ** y, "matmul": lambda x, y: x @ y}
        return fn[node[1]](left, right)
    if op == "unary":
        x, kind = v[node[2]], node[1]
        return {"neg": lambda: -x, "abs": x.abs, "exp": x.exp, "sqrt": x.sqrt, "log": x.log,
                "pos": lambda: x * x + 0.5, "square": lambda: x * x, "relu": x.relu,
                "tanh": x.tanh, "sigmoid": x.sigmoid,
                "roundtrip": lambda: x.to(torch.int64).to(x.dtype),
                "cast32": lambda: x.float().to(x.dtype)}[kind]()
    if op == "index":
        return _idx(v[node[1]], node[2])
    if op == "reshape":
        return v[node[1]].reshape(node[2])
    if op == "transpose":
        x = v[node[1]]
        axes = tuple(reversed(range(x.ndim))) if node[2] is None else tuple(a % x.ndim for a in node[2])
        return x.permute(axes)
    if op == "reduce":
        x = v[node[2]]
        dims = _dims(node[3], x.ndim)
        if not dims:
            return x.clone()
        f = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}[node[1]]
        return f(x, dim=dims, keepdim=node[4])
    if op == "linear":
        y = v[node[1]] @ params[node[3]].T
        return y if node[4] is None else y + params[node[4]]
    if op == "where":
        return torch.where(v[node[1]] != 0, v[node[2]], v[node[3]])
    if op == "concat":
        return torch.cat([v[node[2]], v[node[3]]], dim=node[1])
    return v[node[1]].to(torch.float64)  # castf


def torch_outputs(g: Graph, params: dict[str, torch.Tensor],
                  data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    reached = g.reached()
    v: list[Any] = []
    for i, node in enumerate(g.nodes):
        v.append(torch_node(node, v, params, data) if i in reached else None)
    return {f"out{k}": v[i] for k, i in enumerate(g.outputs)}
