"""Running a :class:`Program` with any array namespace, and the NumPy reverse pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..models.context import NodeContext, RunContext
from .program import Program


class Env(list):
    """The value of every wire (indexed by wire number), and the :class:`NodeContext` each
    context operator got (by node path), for the NumPy backward pass."""

    contexts: dict[str, NodeContext]


def run_forward(prog: Program, xp: Any, params: Mapping[str, Any],
                inputs: Mapping[str, Any], run: RunContext | None = None) -> Env:
    """Evaluate every node; returns the value of every wire (indexed by wire number).
    ``run``: the mode, randomness and state context operators read, and where they write
    the new state (default: training mode, seed 0, step 0, no state)."""
    env = Env([None] * len(prog.wire_names))
    env.contexts = {}
    if prog.has_context and run is None:
        run = RunContext()
    for name, w in prog.inputs.items():
        env[w] = inputs.get(name)
    for name, w in prog.param_wires.items():
        env[w] = params[name]
    for node in prog.nodes:
        args = {k: env[w] for k, w in node.ins.items()}
        for k, pname in node.params.items():
            args[k] = params[pname]
        if node.op.context:
            ctx = env.contexts[node.path] = run.node(node.path, node.state, xp)  # type: ignore[union-attr]
            args["ctx"] = ctx
        env[node.out] = node.op.forward(xp, **args)
    return env


def outputs_of(prog: Program, env: list[Any]) -> dict[str, Any]:
    return {name: env[w] for name, w in prog.outputs.items()}


def numpy_backward(prog: Program, env: Env, params: Mapping[str, np.ndarray],
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
        if node.op.context:
            args["ctx"] = env.contexts[node.path]
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
