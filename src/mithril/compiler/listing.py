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
