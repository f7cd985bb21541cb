"""A :class:`Program` as straight-line Python: one generated function per program (and per
set of output cotangents), doing exactly what :func:`~.interpret.run_forward` and
:func:`~.interpret.numpy_backward` do, in the same order, with the same operator calls.

Why: an eager backend re-runs the whole operator list on every step, and interpreting it
(a loop over nodes, a dict of arguments built per node, the wire list, the cotangent
bookkeeping) costs ~25% of a small MLP's NumPy step. The generated function holds every
wire in a local variable, calls each operator's bound method with its keywords spelled
out, frees an activation or cotangent (``name = None``) exactly where the interpreter does,
and decides statically which cotangents can be present. Nothing in the source comes from a
user's string but through ``repr`` (parameter and input names are literals; identifiers are
wire and node numbers), and its text is registered with :mod:`linecache`, so a traceback
through it shows the line that failed.
"""

from __future__ import annotations

import itertools
import linecache
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..models.context import RunContext
from .interpret import _sole
from .program import Program

_counter = itertools.count()


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ns: dict[str, Any] = {"RunContext": RunContext, "_sole": _sole,
                                   "_zeros_like": np.zeros_like}

    def __call__(self, line: str, depth: int = 1) -> None:
        self.lines.append("    " * depth + line)

    def const(self, name: str, value: Any) -> str:
        self.ns[name] = value
        return name

    def build(self, fn: str, what: str) -> Callable:
        text = "\n".join(self.lines) + "\n"
        filename = f"<mithril {what} #{next(_counter)}>"
        # a traceback through the generated function shows its lines
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        exec(compile(text, filename, "exec"), self.ns)  # noqa: S102 - our own generated code
        f = self.ns[fn]
        f.source = text
        weakref.finalize(f, linecache.cache.pop, filename, None)  # (its lines go with it)
        return f


def _forward(src: _Source, prog: Program, residuals: bool, index: dict[str, int]) -> None:
    """The forward's statements (into ``src``): wires ``w<n>``, parameters ``p<j>``, node
    contexts ``x<i>``, residuals ``r<i>`` (as :func:`~.interpret.run_forward`)."""
    if prog.has_context:
        src("if run is None:")
        src("run = RunContext()", 2)
    for name, w in prog.inputs.items():
        src(f"w{w} = inputs.get({name!r})")
    for name, w in prog.param_wires.items():
        src(f"w{w} = params[{name!r}]")
    for name, j in index.items():
        src(f"p{j} = params[{name!r}]")
    bound = {*prog.inputs.values(), *prog.param_wires.values(), *(n.out for n in prog.nodes)}
    loose = sorted({w for n in prog.nodes for w in n.ins.values()} - bound)
    if loose:  # read but never given a value (None, as the interpreter's wire list holds)
        src(" = ".join(f"w{w}" for w in loose) + " = None")
    for i, node in enumerate(prog.nodes):
        args = ", ".join(_args(node, i, index))
        if node.op.context:
            st = src.const(f"S{i}", node.state)
            src(f"x{i} = run.node({node.path!r}, {st}, xp)")
        if residuals and node.residuals:
            f = src.const(f"F{i}", node.op.forward_residuals)
            src(f"w{node.out}, r{i} = {f}(xp, {args})")
        elif residuals and node.inplace:
            f = src.const(f"F{i}", node.op.forward_inplace)
            src(f"w{node.out} = {f}(xp, {args})")
        else:
            f = src.const(f"F{i}", node.op.forward)
            src(f"w{node.out} = {f}(xp, {args})")
        if residuals and node.drop:
            src(" = ".join(f"w{w}" for w in node.drop) + " = None")


def _param_index(prog: Program) -> dict[str, int]:
    """The operators' parameters, numbered: parameter ``name`` is the local ``p<j>``."""
    names = dict.fromkeys(p for n in prog.nodes for p in n.params.values())
    return {name: j for j, name in enumerate(names)}


def _args(node: Any, i: int, index: dict[str, int]) -> list[str]:
    out = [f"{k}=w{w}" for k, w in node.ins.items()]
    out += [f"{k}=p{index[p]}" for k, p in node.params.items()]
    if node.op.context:
        out.append(f"ctx=x{i}")
    return out


def _outputs(prog: Program) -> str:
    return "{" + ", ".join(f"{k!r}: w{w}" for k, w in prog.outputs.items()) + "}"


def forward_plan(prog: Program) -> Callable:
    """``f(xp, params, inputs, run) -> outputs``: :func:`~.interpret.run_forward` (without
    residuals) followed by :func:`~.interpret.outputs_of`, as one generated function."""
    src = _Source()
    src("def forward(xp, params, inputs, run):", 0)
    _forward(src, prog, False, _param_index(prog))
    src(f"return {_outputs(prog)}")
    return src.build("forward", "forward")


def forward_vjp_plan(prog: Program, cot_keys: tuple[str, ...]) -> Callable:
    """``f(xp, params, inputs, cots, run) -> (outputs, grads)`` for cotangents given for
    exactly the outputs ``cot_keys`` (in that order): :func:`~.interpret.run_forward` with
    residuals, then :func:`~.interpret.numpy_backward`, as one generated function (the
    same calls, in the same order, each array freed where they free it; bit for bit the
    same results)."""
    src = _Source()
    src("def forward_vjp(xp, params, inputs, cots, run):", 0)
    index = _param_index(prog)
    _forward(src, prog, True, index)
    src(f"out = {_outputs(prog)}")
    _backward(src, prog, cot_keys, index)
    return src.build("forward_vjp", "forward_vjp")


def _backward(src: _Source, prog: Program, cot_keys: tuple[str, ...],
              index: dict[str, int]) -> None:
    """The reverse pass's statements (as :func:`~.interpret.numpy_backward`): cotangents
    ``c<wire>``, parameter gradients ``G<j>``. A local's state is tracked statically:
    absent (never assigned: its node is skipped), or possibly present (checked)."""
    outputs = set(prog.outputs.values())
    maybe: set[int] = set()  # cotangent wires that may hold an array
    for name in cot_keys:
        w = prog.outputs[name]
        src(f"c{w} = cots[{name!r}]")
        maybe.add(w)
    grads: dict[str, int] = {}  # parameter -> j of its local G<j> (assigned: may hold one)
    pending: list[str] = []  # cotangent locals to bind to None up front (see below)
    body: list[str] = []
    emit = body.append

    assigned = {f"c{prog.outputs[name]}" for name in cot_keys}  # locals some line sets

    def accumulate(target: str, key: str) -> None:  # (a VJP may leave a key out)
        if target not in assigned:  # nothing set it before this line: it is None here
            assigned.add(target)
            emit(f"        {target} = res.get({key!r})")
            return
        emit(f"        v = res.get({key!r})")
        emit("        if v is not None:")
        emit(f"            {target} = v if {target} is None else {target} + v")

    for i in range(len(prog.nodes) - 1, -1, -1):
        node = prog.nodes[i]
        o = node.out
        if node.residuals:
            emit(f"    r = r{i}")
            emit(f"    r{i} = None")
        present = o in maybe and bool(node.wrt)
        if present:
            emit(f"    g = c{o}")
            emit(f"    o = w{o}")
        if o not in outputs:  # its consumers' VJPs ran already: this one is the last
            emit(f"    w{o} = None")
        if not present:
            if node.residuals:
                emit("    r = None")
            continue
        emit("    if g is not None:")
        emit(f"        c{o} = None")
        pairs = [f"{k!r}: w{w}" for k, w in node.ins.items()]
        pairs += [f"{k!r}: p{index[p]}" for k, p in node.params.items()]
        if node.op.context:
            pairs.append(f"'ctx': x{i}")
        emit("        a = {" + ", ".join(pairs) + "}")
        wrt = src.const(f"WRT{i}", node.wrt)
        vjp = src.const(f"V{i}", node.op.vjp)
        kw = ", residuals=r" if node.op.has_residuals else ""
        if node.op.has_vjp_inplace:
            vin = src.const(f"VI{i}", node.op.vjp_inplace)
            emit("        if _sole(g):  # the pass alone holds g: write over it")
            emit(f"            res = {vin}(g, o, a, {wrt})")
            emit("        else:")
            emit(f"            res = {vjp}(g, o, a, {wrt}{kw})")
        else:
            emit(f"        res = {vjp}(g, o, a, {wrt}{kw})")
        shared = (len(set(node.ins.values())) < len(node.ins)
                  or len(set(node.params.values())) < len(node.params))
        if shared:  # one wire or parameter under two keys: the result's own order, as
            # numpy_backward adds them (3+ terms round differently in another order)
            emit("        for k, v in res.items():")
            for k, p in node.params.items():
                j = index[p]
                assigned.add(f"G{j}")
                emit(f"            if k == {k!r}:")
                emit(f"                G{j} = v if G{j} is None else G{j} + v")
                emit("                continue")
                if p not in grads:
                    grads[p] = j
                    pending.append(f"G{j}")
            for k, w in node.ins.items():
                assigned.add(f"c{w}")
                emit(f"            if k == {k!r}:")
                emit(f"                c{w} = v if c{w} is None else c{w} + v")
                emit("                continue")
                if w not in maybe:
                    maybe.add(w)
                    pending.append(f"c{w}")
        else:
            for k in [k for k in (*node.ins, *node.params) if k in node.wrt]:
                if k in node.params:
                    p = node.params[k]
                    j = index[p]
                    accumulate(f"G{j}", k)
                    if p not in grads:
                        grads[p] = j
                        pending.append(f"G{j}")
                else:
                    w = node.ins[k]
                    accumulate(f"c{w}", k)
                    if w not in maybe:
                        maybe.add(w)
                        pending.append(f"c{w}")
        emit("        res = v = g = a = o = None  # the locals hold them now (see _sole)")
        if node.residuals:
            emit("    r = None")
    if pending:
        src(" = ".join(pending) + " = None")
    src.lines.extend(body)
    for pname, w in prog.param_wires.items():
        if w in maybe:
            j = grads[pname] = len(index) + len(grads)  # (a name no node parameter has)
            src(f"G{j} = None")
            src(f"if c{w} is not None:")
            src(f"G{j} = c{w} if G{j} is None else G{j} + c{w}", 2)
    # in the order of ``params`` (zeros where no gradient came): spelled out for the
    # program's own order, the usual one
    names = list(prog.param_shapes)
    src(f"if list(params) == {src.const('NAMES', names)}:")
    src("return out, {" + ", ".join(
        f"{n!r}: _zeros_like(params[{n!r}]) if G{grads[n]} is None else G{grads[n]}"
        if n in grads else f"{n!r}: _zeros_like(params[{n!r}])" for n in names) + "}", 2)
    src("got = {" + ", ".join(f"{p!r}: G{j}" for p, j in grads.items()) + "}")
    src("grads = {}")
    src("for k, p in params.items():")
    src("v = got.get(k)", 2)
    src("grads[k] = _zeros_like(p) if v is None else v", 2)
    src("return out, grads")
