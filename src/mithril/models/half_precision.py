"""The half-precision rule for statistics: one place for every norm, softmax and loss.

torch (CPU and CUDA) computes a norm's mean and variance, a softmax's or log-softmax's
log-sum-exp and a reduction's sum of float16 / bfloat16 inputs in float32 (its "opmath"
type) and rounds the result to the input dtype once; JAX's ``jax.nn`` and flax's norms
upcast too. Computed in float16 itself, a sum of squares over 4096 values of 10 already
overflows (65504), and each rounded partial result costs ulps. So an operator whose NumPy /
JAX forward computes such a statistic wraps it in :func:`float32_forward` and its NumPy VJP
in :func:`float32_vjp`: for a float16 or bfloat16 input they run the method on float32
copies of the float arrays and round its output (or gradients) to the input's dtype once.
A loss of an elementwise term (squared error, Huber) keeps the term in the input dtype and
takes only its mean or sum in float32 (:func:`accumulate`), as torch's ``mse_loss`` does.
Other dtypes pass through untouched (float32 and float64 results are bitwise as before),
and so does the torch backend, whose forwards are torch's own kernels, except where an
operator asks for it (``float32_forward(on_torch=...)``): torch has no CPU float16 /
bfloat16 kernel for ``ctc_loss``, ``multi_margin_loss``, ``multilabel_margin_loss`` or
``avg_pool3d``, and some half kernels overflow (``cosine_embedding_loss``'s |a|², a
label-smoothed ``cross_entropy``'s sum over the classes); ``torch.autocast`` runs these in
float32, and so does such an operator, its gradients (autograd's, through the casts)
rounded once to the input's dtype too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .operator import backend_of

try:
    import ml_dtypes

    _BF16: tuple[Any, ...] = (np.dtype(ml_dtypes.bfloat16),)
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    _BF16 = ()

#: the dtypes computed in float32 (NumPy dtypes: JAX arrays carry them too)
HALF = frozenset({np.dtype(np.float16), *_BF16})


def is_half(x: Any) -> bool:
    """Whether ``x`` is a float16 / bfloat16 NumPy or JAX array (or scalar)."""
    return getattr(x, "dtype", None) in HALF


def _torch_half(x: Any) -> bool:
    """Whether ``x`` is a float16 / bfloat16 torch tensor."""
    return str(getattr(x, "dtype", "")) in ("torch.float16", "torch.bfloat16")


def widen(x: Any) -> Any:
    """``x`` in float32 when it is a half-precision array (or torch tensor), else ``x``."""
    dt = getattr(x, "dtype", None)
    if dt in HALF:
        return x.astype(np.float32)
    return x.float() if getattr(dt, "is_floating_point", False) and dt.itemsize == 2 else x


def narrow(y: Any, dtype: Any) -> Any:
    """``y`` rounded to ``dtype`` (once); ``y`` itself when it has it already."""
    if y is None or getattr(y, "dtype", None) == dtype:
        return y
    if hasattr(y, "astype"):
        return y.astype(dtype)
    return y.to(dtype) if hasattr(y, "to") else np.asarray(y, dtype)  # (a torch tensor)


def accumulate(fn: Callable[[Any], Any], x: Any) -> Any:
    """``fn(x)`` (a sum or mean, e.g. ``xp.mean``) of a half-precision ``x`` accumulated in
    float32 and rounded to its dtype once; ``fn(x)`` itself otherwise."""
    return narrow(fn(x.astype(np.float32)), x.dtype) if getattr(x, "dtype", None) in HALF \
        else fn(x)


def _widens(op: Any, x: Any) -> bool:
    """Whether ``op`` computes with a float32 copy of ``x``: a half-precision ``x``, unless
    the operator's ``half_in_float32`` property says no (a cutoff that is the input dtype's
    own). (Looked up on the class: a missing instance attribute runs Operator.__getattr__.)"""
    if not _torch_half(x) and getattr(x, "dtype", None) not in HALF:
        return False
    hook = getattr(type(op), "half_in_float32", None)
    return hook is None or bool(hook.fget(op))


def float32_forward(method: Callable[..., Any] | None = None, *,
                    on_torch: bool | Callable[[Any], bool] = False) -> Any:
    """Wrap an operator's ``forward`` / ``forward_residuals`` (``(self, xp, **arrays)``):
    with a half-precision first input on NumPy or JAX, every half array argument is taken
    in float32 and the output rounded to the input's dtype (``forward_residuals``: the
    output only; its residuals stay float32 for :func:`float32_vjp`). On torch only with
    ``@float32_forward(on_torch=True)`` (or a predicate of the operator): torch's own kernel
    then runs on float32 copies and autograd rounds the gradients through the casts."""
    if method is None:
        return functools.partial(float32_forward, on_torch=on_torch)
    residuals = method.__name__ == "forward_residuals"

    @functools.wraps(method)
    def wrapper(self: Any, xp: Any, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else kwargs.get(self.inputs[0])
        if not _widens(self, first) or (backend_of(xp) == "torch" and not (
                on_torch(self) if callable(on_torch) else on_torch)):
            return method(self, xp, *args, **kwargs)
        out = method(self, xp, *map(widen, args), **{k: widen(v) for k, v in kwargs.items()})
        if residuals:
            return narrow(out[0], first.dtype), out[1]
        return narrow(out, first.dtype)

    return wrapper


def float32_vjp(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an operator's NumPy ``vjp`` (``(self, g, out, args, wrt, ...)``): with a
    half-precision cotangent, ``g``, ``out`` and the float arguments are taken in float32 and
    each gradient is rounded once to its argument's dtype (else the cotangent's)."""

    @functools.wraps(method)
    def wrapper(self: Any, g: Any, out: Any, args: Any, wrt: Any, *rest: Any, **kw: Any) -> Any:
        if not _widens(self, g):
            return method(self, g, out, args, wrt, *rest, **kw)
        grads = method(self, widen(g), widen(out), {k: widen(v) for k, v in args.items()},
                       wrt, *rest, **kw)
        return {k: narrow(v, args[k].dtype if is_half(args.get(k)) else g.dtype)
                for k, v in grads.items()}

    return wrapper
