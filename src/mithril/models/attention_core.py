"""The attention core shared by :mod:`.attention`'s operators and :mod:`.attention_weights`:
masks as torch builds them (boolean keep-masks and additive float masks, causal lower
triangles), the row-max-subtracted softmax of the scores, the weighted sum and its NumPy VJP,
the shape checks of a mask against the scores it broadcasts to, and what
``nn.MultiheadAttention``'s ``add_bias_kv`` / ``add_zero_attn`` / ``dropout`` add: extra key
and value rows, the masks padded for them, and the attention-weight dropout factor."""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from ..errors import DTypeError
from .context import keep_threshold, random_bits
from .operator import ShapeError, backend_of, broadcast_shapes, fmt, stop_gradient, torch_of


def _swap(x: Any) -> Any:
    return x.swapaxes(-1, -2)


def causal_keep(n_query: int, n_key: int) -> np.ndarray:
    """torch's causal mask as booleans (True: attend): the lower triangle of (L, S)."""
    return np.tril(np.ones((n_query, n_key), dtype=bool))


def _masks(mask: Any, is_causal: bool, n_query: int, n_key: int, true_masks: bool) -> tuple[Any, Any]:
    """``(keep, add)``: a boolean keep-mask (or ``None``) and a float mask to add (or ``None``).
    ``true_masks``: a boolean ``mask`` marks the masked pairs (torch's MultiheadAttention)."""
    keep = add = None
    if mask is not None:
        if _is_bool(mask):
            keep = ~mask if true_masks else mask
        else:
            add = mask
    if is_causal:
        keep = causal_keep(n_query, n_key)
    return keep, add


def _is_bool(x: Any) -> bool:
    return "bool" in str(x.dtype)


def attention_probs(xp: Any, q: Any, k: Any, scale: float, keep: Any, add: Any) -> Any:
    """softmax(q·kᵀ·scale + add) over the keys, ``keep`` False entries excluded (max-subtracted;
    a row with nothing kept is all zeros). NumPy, ``jax.numpy`` or the torch backend's."""
    if xp is np:
        return _probs_numpy(q, k, scale, keep, add)
    t = torch_of(xp)
    if t is not None:
        return _probs_torch(t, q, k, scale, keep, add)
    s = (q @ _swap(k)) * scale
    if add is not None:
        s = s + add.astype(s.dtype)
    if keep is not None:
        s = xp.where(keep, s, -np.inf)
    m = xp.max(s, axis=-1, keepdims=True, initial=-np.inf)  # no keys (S = 0): zeros, as torch
    m = stop_gradient(xp, xp.where(xp.isfinite(m), m, 0))  # softmax does not depend on the shift
    e = xp.exp(s - m)
    den = xp.sum(e, axis=-1, keepdims=True)
    return e / xp.where(den == 0, 1, den)


def _probs_numpy(q: np.ndarray, k: np.ndarray, scale: float, keep: Any, add: Any) -> np.ndarray:
    """:func:`attention_probs` on NumPy, the same operations in place on the one (…, L, S)
    array (a mask that broadcasts it to a larger batch gets a new one)."""
    s = q @ _swap(k)
    s *= scale
    if add is not None:
        add = add.astype(s.dtype, copy=False)
        if np.broadcast_shapes(s.shape, add.shape) == s.shape:
            s += add
        else:
            s = s + add
    if keep is not None:
        if np.broadcast_shapes(s.shape, keep.shape) == s.shape:
            np.copyto(s, -np.inf, where=~keep)
        else:
            s = np.where(keep, s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)  # no keys (S = 0): zeros, as torch
    np.copyto(m, 0, where=~np.isfinite(m))
    s -= m
    e = np.exp(s, out=s)
    den = e.sum(axis=-1, keepdims=True)
    np.copyto(den, 1, where=den == 0)
    e /= den
    return e


def _probs_torch(t: Any, q: Any, k: Any, scale: float, keep: Any, add: Any) -> Any:
    """:func:`attention_probs` with torch's functions (zeros where a row keeps nothing)."""
    s = (q @ _swap(k)) * scale
    if add is not None:
        s = s + add.to(s.dtype)
    if keep is not None:
        keep = t.as_tensor(keep, device=s.device) if isinstance(keep, np.ndarray) else keep
        s = s.masked_fill(~keep, -float("inf"))
    m = s.amax(dim=-1, keepdim=True) if s.shape[-1] else t.zeros_like(s[..., :1])
    m = t.where(t.isfinite(m), m, t.zeros_like(m)).detach()  # the shift does not matter
    e = t.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    return e / t.where(den == 0, t.ones_like(den), den)


def attend(xp: Any, q: Any, k: Any, v: Any, scale: float, keep: Any, add: Any) -> Any:
    """softmax(q·kᵀ·scale + add)·v, per backend (``keep``: NumPy booleans or the backend's)."""
    if backend_of(xp) == "torch":
        import torch.nn.functional as F

        torch = xp.t
        if keep is not None and isinstance(keep, np.ndarray):
            keep = torch.as_tensor(keep, device=q.device)
        mask = add
        if keep is not None:
            mask = keep if add is None else add.masked_fill(~keep, -math.inf)
        if mask is not None and not _is_bool(mask) and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return attention_probs(xp, q, k, scale, keep, add) @ v


def attend_vjp(g: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
               keep: Any, add: Any, p: np.ndarray | None = None,
               drop: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """NumPy cotangents ``(gq, gk, gv, gs)`` of :func:`attend` (``gs``: of the scores, which is
    the float mask's), each still at the broadcast batch shape; ``p``: the probabilities, if
    already computed; ``drop``: the dropout factor the probabilities were multiplied by
    before the weighted sum (:func:`dropout_factor`), if any."""
    if p is None:
        p = attention_probs(np, q, k, scale, keep, add)
    gv = _swap(p if drop is None else p * drop) @ g
    gs = g @ _swap(v)                                     # the probabilities' cotangent
    if drop is not None:
        gs = gs * drop
    dot = (gs * p).sum(axis=-1, keepdims=True)
    if np.broadcast_shapes(gs.shape, p.shape) == gs.shape:  # the scores': in place
        gs -= dot
        gs *= p
    else:  # a mask broadcast the probabilities to a larger batch
        gs = p * (gs - dot)
    return (gs @ k) * scale, (_swap(gs) @ q) * scale, gv, gs


def _check_mask_dtype(dtypes: Any, names: Any, who: str, key: str = "attn_mask") -> None:
    dt = dtypes.get(key)
    if dt is not None and "bool" not in dt and "float" not in dt:
        raise DTypeError(f"{who}: input '{names[key]}' ({key}) must be booleans or floats, got "
                         f"dtype {dt}")


def _rank_at_least(s: Any, n: int, key: str, who: str, layout: str) -> None:
    if s is not None and len(s) < n:
        raise ShapeError(f"{who}: '{key}' must have rank >= {n} ({layout}), got shape {fmt(s)}")


def _mask_fits(m: Any, scores: tuple, who: str, layout: str, key: str = "attn_mask") -> None:
    """``attn_mask`` of shape ``m`` broadcasts to the ``scores`` shape, not past it: a mask
    with more or larger batch axes made NumPy / JAX return more than the shape rule said
    (and torch's kernel refuse it deep inside), where torch's SDPA refuses such a mask."""
    out = broadcast_shapes(m, scores, f"'{key}' and the scores {layout}")
    if len(m) > len(scores) or any(o is not None and d is not None and o != d
                                   for o, d in zip(out, scores, strict=True)):
        raise ShapeError(f"{who}: '{key}' of shape {fmt(m)} must broadcast to the scores "
                         f"{layout} {fmt(scores)}, not enlarge them (as torch)")


def _same(a: int | None, b: int | None) -> bool:
    return a is None or b is None or a == b


# -- add_bias_kv, add_zero_attn and dropout (torch's nn.MultiheadAttention options) -----------
def cat(xp: Any, xs: list[Any], axis: int) -> Any:
    """``xs`` joined along ``axis`` on any backend."""
    t = torch_of(xp)
    return t.cat(xs, dim=axis) if t is not None else xp.concatenate(xs, axis=axis)


def append_rows(xp: Any, x: Any, rows: list[Any]) -> Any:
    """``x`` (…, S, E) with ``rows`` appended along S, each an (E,)-sized array broadcast over
    the batch axes, ``None`` a row of zeros: torch's ``bias_k`` / ``bias_v`` and zero rows."""
    if not rows:
        return x
    t = torch_of(xp)
    shape = (*x.shape[:-2], 1, x.shape[-1])
    parts = [x]
    for r in rows:
        if r is None:
            parts.append(t.zeros(shape, dtype=x.dtype, device=x.device) if t is not None
                         else xp.zeros(shape, dtype=x.dtype))
        else:
            r = r.reshape(-1)
            parts.append(r.expand(shape) if t is not None else xp.broadcast_to(r, shape))
    return cat(xp, parts, -2)


def pad_keys(xp: Any, m: Any, n_key: int, n: int, fill: Any) -> Any:
    """A mask ``m`` (…, S or 1) over the keys with ``n`` columns of ``fill`` appended (as
    torch pads ``attn_mask`` / ``key_padding_mask`` for the extra keys: they take part);
    a last axis of 1 is broadcast to the ``n_key`` keys first, so that the new columns keep
    ``fill``."""
    if m is None or n == 0:
        return m
    t = torch_of(xp)
    if isinstance(m, np.ndarray) or t is None:
        mod = np if isinstance(m, np.ndarray) else xp
        m = mod.broadcast_to(m, (*m.shape[:-1], n_key))
        return mod.concatenate([m, mod.full((*m.shape[:-1], n), fill, dtype=m.dtype)], axis=-1)
    m = m.expand(*m.shape[:-1], n_key)
    return t.cat([m, t.full((*m.shape[:-1], n), fill, dtype=m.dtype, device=m.device)], dim=-1)


def check_dropout(p: Any, who: str) -> float:
    """``p`` as a float in [0, 1) (torch's attention dropout), or a ValueError naming it."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(p)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{who}: dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def dropout_factor(xp: Any, ctx: Any, shape: tuple[int, ...], p: float, key: str | None,
                   like: Any) -> Any:
    """The dropout factor over attention weights of ``shape``: 1/(1 − p) where kept, 0 where
    dropped, in ``like``'s dtype (and on its device). Element i is kept when the top 24 of
    its random bits (:func:`~mithril.models.context.random_bits` of the run's seed and step)
    reach p·2²⁴, as :class:`~mithril.models.dropout.Dropout`'s; the salt is the CRC-32 of
    ``key``, or of the block's path when ``key`` is None."""
    salt = ctx.salt if key is None else zlib.crc32(key.encode())
    t = torch_of(xp)
    bits = random_bits(ctx.xp, tuple(int(d) for d in shape), ctx.run.seed, ctx.run.step, salt,
                       like.device if t is not None else None)
    keep = (bits >> 8) >= keep_threshold(p)
    scale = 1.0 / (1.0 - p)
    if t is not None:
        return keep.to(like.dtype) * scale
    if backend_of(xp) == "jax":
        return keep.astype(like.dtype) * xp.asarray(scale, like.dtype)
    return keep.astype(like.dtype) * like.dtype.type(scale)
