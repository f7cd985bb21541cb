"""Running a :class:`Program` with any array namespace, and the NumPy reverse pass."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..models.context import NodeContext, RunContext
from .program import Program


class Env(list):
    """The value of every wire (indexed by wire number), the :class:`NodeContext` each
    context operator got (by node path) and the residuals operators saved for their VJPs
    (by node index), for the NumPy backward pass."""

    contexts: dict[str, NodeContext]
    residuals: dict[int, Any]


def run_forward(prog: Program, xp: Any, params: Mapping[str, Any],
                inputs: Mapping[str, Any], run: RunContext | None = None,
                residuals: bool = False, shared_jit: bool = False) -> Env:
    """Evaluate every node; returns the value of every wire (indexed by wire number).
    ``run``: the mode, randomness and state context operators read, and where they write
    the new state (default: training mode, seed 0, step 0, no state). ``residuals`` (NumPy
    only: a forward that :func:`numpy_backward` will differentiate): nodes that a gradient
    flows through keep what their operator's ``forward_residuals`` saves, in
    ``env.residuals``, until their VJP runs; and intermediate wires that neither a later
    node nor a VJP reads are dropped (``None``) once the forward is past them.
    ``shared_jit`` (JAX, when called inside ``jax.jit``): equal operators share one traced
    forward (:func:`_traced_call`)."""
    traced = _traced_call if shared_jit else None
    env = Env([None] * len(prog.wire_names))
    env.contexts = {}
    env.residuals = {}
    if prog.has_context and run is None:
        run = RunContext()
    for name, w in prog.inputs.items():
        env[w] = inputs.get(name)
    for name, w in prog.param_wires.items():
        env[w] = params[name]
    for i, node in enumerate(prog.nodes):
        args = {k: env[w] for k, w in node.ins.items()}
        for k, pname in node.params.items():
            args[k] = params[pname]
        if node.op.context:
            ctx = env.contexts[node.path] = run.node(node.path, node.state, xp)  # type: ignore[union-attr]
            args["ctx"] = ctx
        if residuals and node.residuals:
            env[node.out], env.residuals[i] = node.op.forward_residuals(xp, **args)
        elif residuals and node.inplace:
            env[node.out] = node.op.forward_inplace(xp, **args)
        elif traced is not None and (fn := traced(node.op, args)) is not None:
            env[node.out] = fn(**args)
        else:
            env[node.out] = node.op.forward(xp, **args)
        if residuals:
            for w in node.drop:  # less memory held: fewer fresh pages to fault in
                env[w] = None
    return env


#: one ``jax.jit`` function per operator configuration (see :func:`_traced_call`); False:
#: an operator whose forward does not return one array
_JITTED: dict[tuple, Any] = {}


def _traced_call(op: Any, args: dict[str, Any]) -> Any:
    """Inside a ``jax.jit`` trace, ``op``'s forward as a ``jax.jit`` function shared by every
    operator of its class and configuration (its attributes, with their types), so that a
    model of 49 equal layers traces one layer's forward, not 49 (XLA inlines the calls:
    the same program); None where that does not apply (a context operator, an argument
    that is not a traced array, an attribute that cannot be hashed, an operator whose
    forward returned something else before)."""
    import jax
    import jax.numpy as jnp

    if op.context or not args or not all(isinstance(v, jax.core.Tracer) for v in args.values()):
        return None
    try:
        key = (type(op), tuple((k, _strict(v)) for k, v in sorted(vars(op).items())))
        fn = _JITTED.get(key)
    except TypeError:  # (an attribute that is a list, an array, ...)
        return None
    if fn is False:
        return None
    if fn is None:
        if len(_JITTED) >= 256:
            _JITTED.clear()

        def forward(**kw: Any) -> Any:
            out = op.forward(jnp, **kw)
            if not isinstance(out, jax.Array | jax.core.Tracer):
                raise _NotArray  # (a wire of another kind: traced in place instead)
            return out

        fn = _JITTED[key] = jax.jit(forward)

    def call(**kw: Any) -> Any:
        try:
            return fn(**kw)
        except _NotArray:
            _JITTED[key] = False
            return op.forward(jnp, **kw)

    return call


def _strict(v: Any) -> Any:
    """``v`` as a key that tells apart values that compare equal but index or compute
    differently: types inside tuples too (``Indexer((True, 0))`` adds an axis where
    ``Indexer((1, 0))`` picks row 1: both keyed as ``(1, 0)``, the second got the first's
    traced forward), slices by their fields and the sign of a float zero."""
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_strict(i) for i in v))
    if isinstance(v, slice):
        return (slice, _strict((v.start, v.stop, v.step)))
    if isinstance(v, float):
        return (type(v), v, math.copysign(1.0, v))
    return (type(v), v)


class _NotArray(Exception):
    """An operator's forward returned something other than one array (see _traced_call)."""


def _sole(g: Any) -> bool:
    """Whether ``g`` is a writeable NumPy array (not a view) that only the caller's one local
    name refers to: no cotangent slot, no user's dict, no other array shares its memory. The
    reference count of such an array is measured once (:data:`_SOLE_REFS`, through a call of
    the same depth) rather than assumed: interpreters count borrowed references differently."""
    return (type(g) is np.ndarray and g.base is None and g.flags.writeable
            and sys.getrefcount(g) == _SOLE_REFS)


def _calibrate() -> int:
    g = np.empty(1)
    return _count(g)


def _count(g: Any) -> int:  # as _sole: a caller's local, this parameter, getrefcount's argument
    return sys.getrefcount(g)


_SOLE_REFS = _calibrate()


def outputs_of(prog: Program, env: list[Any]) -> dict[str, Any]:
    return {name: env[w] for name, w in prog.outputs.items()}


def numpy_backward(prog: Program, env: Env, params: Mapping[str, np.ndarray],
                   cotangents: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reverse-mode pass with each operator's hand-written VJP. Residuals the forward kept
    (``run_forward(..., residuals=True)``) go to their node's VJP and are dropped from ``env``
    as it runs, so each lives only until its VJP is done; none is left afterwards. So are
    the intermediate wires (all but the outputs) once their producer's VJP is done: memory
    is reused as the pass goes (fresh pages are slow to fault in)."""
    cot: list[Any] = [None] * len(env)
    for name, g in cotangents.items():
        cot[prog.outputs[name]] = g
    grads: dict[str, np.ndarray] = {}
    saved: dict[int, Any] = getattr(env, "residuals", {})
    outputs = set(prog.outputs.values())
    for i in range(len(prog.nodes) - 1, -1, -1):
        node = prog.nodes[i]
        res = saved.pop(i, None)
        g = cot[node.out]
        out = env[node.out]
        if node.out not in outputs:  # its consumers' VJPs ran already; this one is the last
            env[node.out] = None
        if g is None or not node.wrt:
            continue
        cot[node.out] = None  # every consumer is done with it: free it as we go
        args = {k: env[w] for k, w in node.ins.items()}
        for k, pname in node.params.items():
            args[k] = params[pname]
        if node.op.context:
            args["ctx"] = env.contexts[node.path]
        if node.op.has_vjp_inplace and _sole(g):  # the pass alone holds g: write over it
            result = node.op.vjp_inplace(g, out, args, node.wrt)
        else:  # only operators with residuals take the keyword (None: the VJP recomputes them)
            kw = {"residuals": res} if node.op.has_residuals else {}
            result = node.op.vjp(g, out, args, node.wrt, **kw)
        for k, v in result.items():
            if k in node.params:
                pname = node.params[k]
                grads[pname] = v if pname not in grads else grads[pname] + v
            else:
                w = node.ins[k]
                cot[w] = v if cot[w] is None else cot[w] + v
        result = v = g = None  # the slots hold them now (see _sole)
    saved.clear()  # nodes no gradient reached
    for pname, w in prog.param_wires.items():
        if cot[w] is not None:
            grads[pname] = cot[w] if pname not in grads else grads[pname] + cot[w]
    for pname, p in params.items():
        if pname not in grads:
            grads[pname] = np.zeros_like(p)
    return {k: grads[k] for k in params}
