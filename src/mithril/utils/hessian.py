"""Hessian-vector products of a compiled model's scalar loss, and Hutchinson's estimate of
the Hessian's diagonal (what :class:`~mithril.utils.optimizers.Sophia` folds into its ν).

With ``L(p)`` the loss output ``loss`` of ``compiled`` on ``data`` as a function of every
parameter ``p`` (a dict), :func:`hessian_vector_product` gives ``H v = ∇²L(p) v`` for a dict
of vectors ``v`` of the parameters' shapes, and :func:`hutchinson_diagonal` gives ``u ⊙ (H u)``
for a Rademacher ``u`` (entries ±1, each with probability ½): an unbiased estimate of
``diag(H)`` (``E[u ⊙ Hu]_i = Σ_j H_ij E[u_i u_j] = H_ii``), optax's
``hutchinson_estimator_diag_hessian``.

Per backend:

* JAX: exact, ``jax.jvp`` of ``jax.grad`` of the compiled program's pure forward (forward
  over reverse), jitted once per (model, loss).
* torch: exact, double backward: the gradient of ``⟨∇L, v⟩`` (``create_graph=True``) through
  the evaluator's generated forward.
* NumPy: central differences of the gradients, ``(∇L(p + r·v) − ∇L(p − r·v)) / 2r`` with
  ``r = ε^⅓ · max(1, ‖p‖∞) / ‖v‖∞`` (ε the dtype's machine epsilon; ``fd_step=`` sets ``r``).
  The error is ``O(r²)`` from the third derivatives plus ``O(ε/r)`` from rounding, both about
  ``ε^⅔`` relative: ~1e-10 in float64, ~1e-5 in float32 (more where ``p ± r·v`` crosses a
  kink, a ReLU's or a max's). Two forward/backward passes per product.

Models with random or state-keeping operators (Dropout, BatchNorm) are refused: their loss is
not a function of the parameters alone.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError, ShapeError

__all__ = ["hessian_vector_product", "hutchinson_diagonal", "rademacher_like"]


def hessian_vector_product(compiled: Any, params: Mapping[str, Any], data: Mapping[str, Any],
                           vectors: Mapping[str, Any], *, loss: str | None = None,
                           fd_step: float | None = None) -> dict[str, Any]:
    """``∇²L(params)·vectors`` per parameter (arrays of the model's backend and dtype), ``L``
    the scalar output ``loss`` (default: ``final_cost`` or the single output, as
    ``evaluate(output_gradients=True)``) on ``data``. ``vectors``: exactly the parameters'
    keys, each an array of its parameter's shape (cast to the parameters' dtype). Exact on
    JAX and torch; central differences on NumPy, of step ``fd_step`` (see the module docs).
    Everything is checked before anything runs: errors name the key."""
    key, ps, ins, ev = _prepared(compiled, params, data, loss, "hessian_vector_product")
    vs = _checked_vectors(compiled, ps, vectors)
    return _hvp(compiled, key, ps, ins, ev, vs, data, fd_step)


def hutchinson_diagonal(compiled: Any, params: Mapping[str, Any], data: Mapping[str, Any],
                        seed_or_key: Any, *, loss: str | None = None,
                        fd_step: float | None = None) -> dict[str, Any]:
    """Hutchinson's estimate ``u ⊙ (∇²L u)`` of the Hessian's diagonal at ``params``, ``u``
    the Rademacher signs :func:`rademacher_like` draws from ``seed_or_key``. With a JAX PRNG
    key the signs are optax's (``optax.tree.random_like(key, params, jax.random.rademacher,
    dtype=float32)`` cast to the parameters' dtype), so a loop that splits its key as optax's
    estimator does (``key, sub = jax.random.split(key)``, then this with ``sub``) measures what
    ``optax.contrib.sophia`` measures. ``loss`` and ``fd_step`` as
    :func:`hessian_vector_product`."""
    key, ps, ins, ev = _prepared(compiled, params, data, loss, "hutchinson_diagonal")
    signs = rademacher_like(ps, seed_or_key, backend=compiled.backend)
    hv = _hvp(compiled, key, ps, ins, ev, signs, data, fd_step)
    return {n: signs[n] * hv[n] for n in ps}


def rademacher_like(params: Mapping[str, Any], seed_or_key: Any, *, backend: Any = None
                    ) -> dict[str, Any]:
    """Random ±1 arrays of the shapes and dtype of ``params`` (arrays of ``backend``, else of
    the params' own kind). ``seed_or_key``: a JAX PRNG key (optax's ``random_like``: the key
    split into one per parameter in sorted-name order, the pytree order of a dict), an int
    seed or a ``numpy.random.Generator`` (one draw per parameter in the dict's order; the
    generator advances). The same seed or key gives the same signs on every backend."""
    if not isinstance(params, Mapping):
        raise TypeError(f"rademacher_like: params must be a dict of arrays, got "
                        f"{type(params).__name__}")
    if backend is None:
        from .optimizers.checks import infer_backend

        backend = infer_backend(params)
    for n, p in params.items():
        if not backend.is_native(p):
            raise TypeError(f"rademacher_like: params['{n}'] is a {type(p).__name__}, not a "
                            f"{backend.name} array")
    shapes = {n: tuple(int(d) for d in p.shape) for n, p in params.items()}
    dtype = backend.dtype_name(next(iter(params.values()))) if params else "float32"
    if _is_jax_key(seed_or_key):
        import jax

        leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
        drawn = _jax_signs(tuple(leaves))(seed_or_key)
        host = {n: np.asarray(a) for n, a in jax.tree.unflatten(tree, drawn).items()}
    else:
        rng = _generator(seed_or_key)
        host = {n: np.where(rng.random(s) < 0.5, -1.0, 1.0).astype(np.float32)
                for n, s in shapes.items()}
    return {n: _on(backend, host[n].astype(_np_dtype(dtype)), params[n]) for n in params}


# -- checks ------------------------------------------------------------------------------------
def _prepared(compiled: Any, params: Any, data: Any, loss: str | None, who: str
              ) -> tuple[str, dict, dict, Any]:
    """The loss key, the checked params and inputs and the evaluator of ``compiled``."""
    prog = getattr(compiled, "program", None)
    if prog is None or not callable(getattr(compiled, "_prepare", None)):
        raise TypeError(f"{who}: compiled must be a compiled model (mithril.compile), got "
                        f"{type(compiled).__name__}")
    outs = prog.outputs
    if loss is None:  # ('final_cost' or the single output, as evaluate's; our own errors)
        key = "final_cost" if "final_cost" in outs else next(iter(outs)) if len(outs) == 1 \
            else None
        if key is None:
            raise KeyMismatchError(f"{who}: the model has outputs {sorted(outs)} and no "
                                   f"'final_cost': name the scalar one to differentiate "
                                   f"with loss=")
    elif not isinstance(loss, str) or loss not in outs:
        raise KeyMismatchError(f"{who}: loss {loss!r} is not an output of the model "
                               f"(outputs: {sorted(outs)})")
    else:
        key = loss
    hint = "" if loss is not None else " (name a scalar output with loss=)"
    shape = prog.output_shape(key)
    if shape is not None and tuple(shape) != ():
        raise ShapeError(f"{who}: the loss {key!r} must be a scalar output, it has shape "
                         f"{tuple(shape)}{hint}")
    if prog.has_context:
        raise TypeError(f"{who}: the model has random or state-keeping operators (Dropout, "
                        f"BatchNorm): its loss is not a function of the parameters alone")
    if not isinstance(params, Mapping) or not isinstance(data, Mapping):
        raise TypeError(f"{who}: params and data must be dicts keyed by name")
    ps, ins, used, _ = compiled._prepare(params, data, partial=False)
    if shape is None:  # (unknown when compiled: its shape for these inputs, before a run)
        got = compiled._check_concrete(ins).get(key)
        if got is not None and tuple(got) != ():
            raise ShapeError(f"{who}: the loss {key!r} must be a scalar output, it has shape "
                             f"{tuple(got)} for these inputs{hint}")
    return key, ps, ins, compiled._evaluator_of(used)


def _checked_vectors(compiled: Any, ps: dict[str, Any], vectors: Any) -> dict[str, Any]:
    """``vectors`` as arrays of the model's backend in the parameters' dtype, checked against
    them (keys, shapes)."""
    from .optimizers.checks import is_array

    if not isinstance(vectors, Mapping):
        raise TypeError(f"hessian_vector_product: vectors must be a dict of arrays keyed by "
                        f"parameter name, got {type(vectors).__name__}")
    missing = sorted(set(ps) - set(vectors))
    extra = sorted((k for k in vectors if k not in ps), key=str)
    if missing or extra:
        raise KeyMismatchError(f"hessian_vector_product: vectors' keys do not match the "
                               f"parameters: missing {missing}, unknown {extra}")
    backend, out = compiled.backend, {}
    for n, p in ps.items():
        v = vectors[n]
        if not is_array(v):
            raise TypeError(f"hessian_vector_product: vectors['{n}'] must be an array, got "
                            f"{type(v).__name__}")
        if tuple(v.shape) != tuple(p.shape):
            raise ShapeError(f"hessian_vector_product: vectors['{n}'] has shape "
                             f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")
        host = np.asarray(backend.to_numpy(v) if backend.is_native(v) else _host(v))
        if host.dtype.kind not in "fiu":
            raise TypeError(f"hessian_vector_product: vectors['{n}'] must be numeric, got "
                            f"{host.dtype}")
        out[n] = _on(backend, host.astype(_np_dtype(backend.dtype_name(p))), p)
    return out


# -- the products ------------------------------------------------------------------------------
def _hvp(compiled: Any, key: str, ps: dict, ins: dict, ev: Any, vs: dict, data: Any,
         fd_step: float | None) -> dict[str, Any]:
    name = compiled.backend.name
    if name == "jax":
        return _hvp_jax(ev, key, ps, ins, vs)
    if name == "torch":
        return _hvp_torch(ev, key, ps, ins, vs)
    return _hvp_differences(compiled, key, ps, data, vs, fd_step)


_JAX_HVP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hvp_jax(ev: Any, key: str, ps: dict, ins: dict, vs: dict) -> dict[str, Any]:
    import jax

    if getattr(ev, "_x64", False) and not jax.config.jax_enable_x64:
        from ..backends.jax_backend import refuse_x64_off

        refuse_x64_off()
    per = _JAX_HVP.setdefault(ev, {})
    fn = per.get(key)
    if fn is None:
        fwd = ev._fwd

        def hvp(pt: tuple, inputs: dict, vt: tuple) -> tuple:
            grad = jax.grad(lambda p: fwd(p, inputs)[key])
            return jax.jvp(grad, (pt,), (vt,))[1]

        fn = per[key] = jax.jit(hvp)
    names = ev.names
    out = fn(tuple(ps[n] for n in names), dict(ins), tuple(vs[n] for n in names))
    got = dict(zip(names, out, strict=True))
    return {n: got[n] for n in ps}


def _hvp_torch(ev: Any, key: str, ps: dict, ins: dict, vs: dict) -> dict[str, Any]:
    import torch

    leaves = {n: p.detach().requires_grad_(True) for n, p in ps.items()}
    names = list(leaves)
    with torch.enable_grad():
        value = ev._run(leaves, ins, None)[key]
        grads = (torch.autograd.grad(value, [leaves[n] for n in names], create_graph=True,
                                     allow_unused=True)
                 if value.requires_grad else [None] * len(names))
        terms = [(g * vs[n]).sum() for n, g in zip(names, grads)
                 if g is not None and g.requires_grad]
        second = (torch.autograd.grad(torch.stack(terms).sum(), [leaves[n] for n in names],
                                      allow_unused=True) if terms else [None] * len(names))
    return {n: torch.zeros_like(ps[n]) if h is None else h.detach()
            for n, h in zip(names, second)}


def _hvp_differences(compiled: Any, key: str, ps: dict, data: Any, vs: dict,
                     fd_step: float | None) -> dict[str, Any]:
    dtype = next(iter(ps.values())).dtype if ps else np.float64
    vmax = max((float(np.abs(v).max(initial=0.0)) for v in vs.values()), default=0.0)
    if vmax == 0.0:
        return {n: np.zeros_like(p) for n, p in ps.items()}
    if fd_step is None:
        pmax = max((float(np.abs(p).max(initial=0.0)) for p in ps.values()), default=0.0)
        r = float(np.finfo(dtype).eps) ** (1 / 3) * max(1.0, pmax) / vmax
    else:
        from .optimizers.checks import check_positive

        r = check_positive("fd_step", fd_step, allow_zero=False)

    def grad(sign: float) -> dict[str, Any]:
        at = {n: (p + (sign * r) * vs[n]).astype(p.dtype) for n, p in ps.items()}
        return compiled.evaluate(at, data, output_gradients={key: 1.0})[1]

    hi, lo = grad(1.0), grad(-1.0)
    return {n: ((hi[n] - lo[n]) / (2 * r)).astype(p.dtype) for n, p in ps.items()}


# -- helpers -----------------------------------------------------------------------------------
@functools.cache
def _jax_signs(shapes: tuple[tuple[int, ...], ...]) -> Any:
    """A jitted ``key -> [±1 float32 arrays of shapes]``: optax's ``random_like`` (the key
    split into one per leaf, ``jax.random.rademacher`` of each), one program per layout."""
    import jax
    import jax.numpy as jnp

    def draw(key: Any) -> list:
        keys = jax.random.split(key, len(shapes))
        return [jax.random.rademacher(k, s, jnp.float32) for k, s in zip(keys, shapes)]

    return jax.jit(draw)


def _is_jax_key(x: Any) -> bool:
    if type(x).__module__.split(".", 1)[0] not in ("jax", "jaxlib"):
        return False
    import jax

    dt = getattr(x, "dtype", None)
    return dt is not None and (jax.dtypes.issubdtype(dt, jax.dtypes.prng_key) or (
        dt == np.uint32 and tuple(x.shape) == (2,)))


def _generator(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed_or_key must be an int seed, a numpy.random.Generator or a JAX "
                        f"PRNG key, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _host(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _on(backend: Any, host: np.ndarray, like: Any) -> Any:
    """``host`` as an array of ``backend`` where ``like`` lives (its device)."""
    if backend.name == "torch":
        import torch

        wide = host.astype(np.float64 if host.dtype.itemsize == 8 else np.float32)
        return torch.from_numpy(np.ascontiguousarray(wide)).to(like.device, like.dtype)
    if backend.name == "jax":
        import jax

        return jax.device_put(host, list(like.devices())[0] if hasattr(like, "devices")
                              else None)
    return host
