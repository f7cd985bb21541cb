"""``ScaledDotProduct``: ``torch.nn.functional.scaled_dot_product_attention`` as a block.

softmax(query·keyᵀ·scale + mask)·value over query (…, L, E), key (…, S, E) and value
(…, S, Ev), with ``scale`` = 1/√E by default. ``is_causal=True`` masks the strict upper
triangle of the (L, S) scores (query i sees keys j ≤ i; top-left aligned when L ≠ S, as
torch). ``use_attn_mask=True`` adds an ``attn_mask`` input that broadcasts to (…, L, S):
booleans (True: the pair takes part, as ``F.scaled_dot_product_attention``) or floats (added
to the scores; ``-inf`` masks). A row with every key masked gives zeros, as torch.

The softmax subtracts each row's maximum first. Forward per backend:
``F.scaled_dot_product_attention`` on torch (without a mask), the same formula in
``jax.numpy`` and NumPy; a NumPy forward that will be differentiated keeps the attention
probabilities as residuals, so the VJP redoes none of the forward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .attention_core import (
    _check_mask_dtype,
    _mask_fits,
    _masks,
    _rank_at_least,
    _same,
    attend,
    attend_vjp,
    attention_probs,
)
from .half_precision import float32_forward, float32_vjp
from .operator import (
    Operator,
    ShapeError,
    backend_of,
    broadcast_shapes,
    fmt,
    torch_of,
    unbroadcast,
)


# -- ScaledDotProduct --------------------------------------------------------------------------
class ScaledDotProduct(Operator):
    """softmax(query·keyᵀ·scale [+ mask])·value, as ``F.scaled_dot_product_attention`` (see
    the module docstring): query (…, L, E), key (…, S, E), value (…, S, Ev) -> (…, L, Ev),
    leading dimensions broadcast. ``scale`` defaults to 1/√E. ``is_causal`` and
    ``use_attn_mask`` exclude each other (as torch); for both, pass a combined mask.
    ``enable_gqa`` (grouped-query attention, as torch's): query (…, Hq, L, E) and key / value
    (…, Hk, S, ·) with Hk dividing Hq; query head j reads key / value head j // (Hq / Hk)."""

    any_dtype_inputs = frozenset({"attn_mask"})
    vjp_ignores = frozenset({"output"})

    def __init__(self, is_causal: bool = False, scale: float | None = None,
                 use_attn_mask: bool = False, *, enable_gqa: bool = False) -> None:
        if is_causal and use_attn_mask:
            raise ValueError("ScaledDotProduct: is_causal and use_attn_mask exclude each other "
                             "(as torch); give one attn_mask that combines both")
        if scale is not None and (isinstance(scale, (bool, np.bool_)) or not isinstance(
                scale, (int, float, np.integer, np.floating))):  # NumPy scalars as torch
            raise ValueError(f"ScaledDotProduct: scale must be a number or None, got {scale!r}")
        self.is_causal, self.use_attn_mask = bool(is_causal), bool(use_attn_mask)
        self.scale = None if scale is None else float(scale)
        self.enable_gqa = bool(enable_gqa)
        self.inputs = ("query", "key", "value") + (("attn_mask",) if use_attn_mask else ())

    def infer_shape(self, shapes):
        who = "ScaledDotProduct"
        q, k, v = (shapes.get(n) for n in ("query", "key", "value"))
        for name, s in (("query", q), ("key", k), ("value", v)):
            _rank_at_least(s, 2, name, who, "…, length, features")
        if q is not None and k is not None and not _same(q[-1], k[-1]):
            raise ShapeError(f"{who}: 'query' and 'key' must have the same last dimension, got "
                             f"{fmt(q)} and {fmt(k)}")
        if k is not None and v is not None and not _same(k[-2], v[-2]):
            raise ShapeError(f"{who}: 'key' and 'value' must have the same length (axis -2), "
                             f"got {fmt(k)} and {fmt(v)}")
        if self.enable_gqa:
            for name, s in (("query", q), ("key", k), ("value", v)):
                _rank_at_least(s, 3, name, who, "…, heads, length, features; enable_gqa")
            hq, hk = (None if s is None else s[-3] for s in (q, k))
            if k is not None and v is not None and not _same(k[-3], v[-3]):
                raise ShapeError(f"{who}: 'key' and 'value' must have the same heads (axis -3) "
                                 f"with enable_gqa, got {fmt(k)} and {fmt(v)}")
            if hq is not None and hk is not None and (hq % hk if hk else hq):  # 0 divides only 0
                raise ShapeError(f"{who}: enable_gqa: the heads of 'key' / 'value' ({hk}, axis -3) "
                                 f"must divide the heads of 'query' {fmt(q)}, got {fmt(k)}")
            if q is not None and k is not None and v is not None:  # as if repeated to Hq heads
                k, v = ((*s[:-3], q[-3], *s[-2:]) for s in (k, v))
        if q is None or k is None or v is None:
            return None
        batch = broadcast_shapes(broadcast_shapes(q[:-2], k[:-2], "'query' and 'key'"), v[:-2],
                                 "'query'/'key' and 'value'")
        m = shapes.get("attn_mask") if self.use_attn_mask else None
        if m is not None:
            _mask_fits(m, (*batch, q[-2], k[-2]), "ScaledDotProduct", "(…, L, S)")
        return (*batch, q[-2], v[-1])

    def check_inputs(self, shapes, dtypes, arrays, names) -> None:
        _check_mask_dtype(dtypes, names, "ScaledDotProduct")

    def _scale(self, q: Any) -> float:
        """``scale``, or 1/√E; with no features (E = 0) every score is an empty sum, 0, and
        the weights are uniform, as torch's (its 1/√0 = inf never meets a score; ours would
        make them 0·inf = NaN), so any finite default does."""
        if self.scale is not None:
            return self.scale
        return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0

    def _groups(self, query: Any, key: Any) -> int:
        """Query heads per key / value head (1 without ``enable_gqa``, or with no heads)."""
        return query.shape[-3] // key.shape[-3] if self.enable_gqa and key.shape[-3] else 1

    def _repeat(self, xp: Any, g: int, *xs: Any) -> tuple[Any, ...]:
        """Each head of ``xs`` repeated ``g`` times in place (axis -3), as torch's GQA."""
        if g == 1:
            return xs
        t = torch_of(xp)
        return tuple(x.repeat_interleave(g, dim=-3) if t is not None else xp.repeat(x, g, axis=-3)
                     for x in xs)

    @float32_forward
    def forward(self, xp: Any, query: Any, key: Any, value: Any, attn_mask: Any = None) -> Any:
        kind = backend_of(xp)
        if kind == "numpy":
            return self.forward_residuals(xp, query, key, value, attn_mask)[0]
        key, value = self._repeat(xp, self._groups(query, key), key, value)
        if kind == "torch" and attn_mask is None:
            import torch.nn.functional as F

            return F.scaled_dot_product_attention(query, key, value, is_causal=self.is_causal,
                                                  scale=self._scale(query))
        keep, add = _masks(attn_mask, self.is_causal, query.shape[-2],
                           key.shape[-2], true_masks=False)
        return attend(xp, query, key, value, self._scale(query), keep, add)

    @float32_forward
    def forward_residuals(self, xp: Any, query: Any, key: Any, value: Any,
                          attn_mask: Any = None) -> tuple[Any, Any]:
        """NumPy: the output and the attention probabilities."""
        key, value = self._repeat(np, self._groups(query, key), key, value)
        keep, add = _masks(attn_mask, self.is_causal, query.shape[-2], key.shape[-2], False)
        p = attention_probs(np, query, key, self._scale(query), keep, add)
        return p @ value, p

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
        keep, add = _masks(mask, self.is_causal, q.shape[-2], k.shape[-2], False)
        p = residuals if residuals is not None else self.forward_residuals(np, **args)[1]
        n = self._groups(q, k)
        gq, gk, gv, gs = attend_vjp(g, q, *self._repeat(np, n, k, v), self._scale(q), keep, add, p)
        if n > 1:  # each key / value head's cotangent sums over the query heads that read it
            gk, gv = (x.reshape((*x.shape[:-3], x.shape[-3] // n, n, *x.shape[-2:])).sum(axis=-3)
                      for x in (gk, gv))
        res = {"query": unbroadcast(gq, q.shape), "key": unbroadcast(gk, k.shape),
               "value": unbroadcast(gv, v.shape)}
        if "attn_mask" in wrt and add is not None:
            res["attn_mask"] = unbroadcast(gs, mask.shape)
        return {n: x for n, x in res.items() if n in wrt}

    def __repr__(self) -> str:
        return (f"ScaledDotProduct(is_causal={self.is_causal}, scale={self.scale}, "
                f"use_attn_mask={self.use_attn_mask}"
                + (", enable_gqa=True)" if self.enable_gqa else ")"))
