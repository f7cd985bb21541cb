"""A readable listing of a compiled program: what ``compile(..., file_path=...)`` writes.

The published Mithril generates Python source for the backend and writes it to
``file_path``. Here the NumPy and torch backends run the operator list as straight-line
Python generated from it on first use (:mod:`.codegen`: calls of the operators' own methods,
nothing worth reading), and JAX jits it, so the file lists that program instead: inputs,
constants, parameters, state, one line per operator and the outputs, every line a comment,
so a ``.py`` path still holds a valid (empty) Python module.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..models.operator import fmt
from .program import Program

HEADER = ("Mithril program listing, written by compile(..., file_path=...). The backend runs the\n"
          "operators below in this order (JaxBackend with jit=True jits them).")


def program_listing(prog: Program | None, backend: Any, jit: bool, note: str = "") -> str:
    """The listing of ``prog`` compiled for ``backend`` (``None``: not built yet, ``note``
    says why)."""
    lines = [*HEADER.splitlines(), f"backend: {backend!r}, jit={jit}"]
    if prog is None:
        lines += ["", note]
        return "".join(f"# {ln}".rstrip() + "\n" for ln in lines)

    def shape(w: int) -> str:
        return fmt(prog.wire_shapes[w])

    consts = prog.constants
    lines += ["", "inputs:"]
    lines += [f"  {k}: {shape(w)} {prog.input_kinds.get(k, 'float')}"
              for k, w in prog.inputs.items() if k not in consts] or ["  (none)"]
    if consts:
        lines += ["constants:"] + [f"  {k}: {fmt(tuple(v.shape))}" for k, v in consts.items()]
    lines += ["parameters:"]
    lines += [f"  {k}: {fmt(s)} (init {prog.param_init.get(k, '?')})"
              for k, s in prog.param_shapes.items()] or ["  (none)"]
    if prog.state_shapes:
        lines += ["state:"] + [f"  {k}: {fmt(s)}" for k, s in prog.state_shapes.items()]
    lines += ["", "operators (output wire, its shape = operator(terminal=wire or parameter, ...)):"]
    for node in prog.nodes:
        args = [f"{k}={prog.wire_names[w]}" for k, w in node.ins.items()]
        args += [f"{k}={p}" for k, p in node.params.items()]
        args += [f"{k}=<state {s}>" for k, s in node.state.items()]
        lines.append(f"  {prog.wire_names[node.out]} {shape(node.out)} = {node.path} "
                     f"({type(node.op).__name__})({', '.join(args)})")
    lines += ["", "outputs:"]
    lines += [f"  {k} = {prog.wire_names[w]} {shape(w)}" for k, w in prog.outputs.items()]
    return "".join(f"# {ln}".rstrip() + "\n" for ln in lines)


def write_listing(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` (its folder must exist)."""
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(text)


def summary_text(prog: Program, backend: Any, depth: int | None, shapes: bool,
                 name: str | None, *, inference: bool, seed: int, step: int) -> str:
    """:meth:`~mithril.CompiledModel.summary`'s table: a row per operator, or per block
    ``depth`` levels down (its last operator's output shape, its parameter count), the
    total, and a line each for the mode, the randomness and the state where the program
    has them."""
    groups: dict[str, list[Any]] = {}
    for node in prog.nodes:
        key = ".".join(node.path.split(".")[:depth]) if depth else node.path
        groups.setdefault(key, []).append(node)
    rows = [("layer", "output shape", "parameters")]
    for key, nodes in groups.items():
        n = sum(int(np.prod(prog.param_shapes[q])) for q in {q for nd in nodes for q in nd.params.values()})
        kind = type(nodes[0].op).__name__ if len(nodes) == 1 and nodes[0].path == key else "block"
        rows.append((f"{key} ({kind})", fmt(prog.wire_shapes[nodes[-1].out]), str(n)))
    if not shapes:
        rows = [(r[0], r[2]) for r in rows]
    total = sum(int(np.prod(s)) for s in prog.param_shapes.values())
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(ln) for ln in lines))
    if name is not None:
        lines.insert(0, str(name))
    lines.append(f"total parameters: {total}  (backend: {backend!r})")
    if prog.has_context:
        mode = "inference" if inference else "training"
        lines.append(f"mode: {mode} by default (evaluate(..., training=...) per call)")
    if prog.has_random:
        lines.append(f"randomness: seed {seed}, step {step} (one step per "
                     "training-mode evaluate; masks are the same on every backend)")
    if prog.state_shapes:
        n = sum(int(np.prod(s)) for s in prog.state_shapes.values())
        lines.append(f"state: {len(prog.state_shapes)} arrays, {n} values "
                     "(evaluate(..., state=...) returns the new state)")
    return "\n".join(lines)

