"""Running a :class:`Program` with any array namespace, and the NumPy reverse pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .program import Program


def run_forward(prog: Program, xp: Any, params: Mapping[str, Any],
                inputs: Mapping[str, Any]) -> list[Any]:
    """Evaluate every node; returns the value of every wire (indexed by wire number)."""
    env: list[Any] = [None] * len(prog.wire_names)
    for name, w in prog.inputs.items():
        env[w] = inputs.get(name)
    for name, w in prog.param_wires.items():
        env[w] = params[name]
    for node in prog.nodes:
        args = {k: env[w] for k, w in node.ins.items()}
        for k, pname in node.params.items():
            args[k] = params[pname]
        env[node.out] = node.op.forward(xp, **args)
    return env


def outputs_of(prog: Program, env: list[Any]) -> dict[str, Any]:
    return {name: env[w] for name, w in prog.outputs.items()}


def numpy_backward(prog: Program, env: list[Any], params: Mapping[str, np.ndarray],
                   cotangents: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reverse-mode pass with each operator's hand-written VJP."""
    cot: list[Any] = [None] * len(env)
    for name, g in cotangents.items():
        cot[prog.outputs[name]] = g
    grads: dict[str, np.ndarray] = {}
    for node in reversed(prog.nodes):
        g = cot[node.out]
        if g is None or not node.wrt:
            continue
        args = {k: env[w] for k, w in node.ins.items()}
        for k, pname in node.params.items():
            args[k] = params[pname]
        for k, v in node.op.vjp(g, env[node.out], args, node.wrt).items():
            if k in node.params:
                pname = node.params[k]
                grads[pname] = v if pname not in grads else grads[pname] + v
            else:
                w = node.ins[k]
                cot[w] = v if cot[w] is None else cot[w] + v
    for pname, w in prog.param_wires.items():
        if cot[w] is not None:
            grads[pname] = cot[w] if pname not in grads else grads[pname] + cot[w]
    for pname, p in params.items():
        if pname not in grads:
            grads[pname] = np.zeros_like(p)
    return {k: grads[k] for k in params}
