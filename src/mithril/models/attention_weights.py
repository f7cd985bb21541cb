"""The attention weights of :class:`~mithril.models.attention.MultiHeadAttention`: what
``torch.nn.MultiheadAttention(..., need_weights=True)`` returns as its second output.

``AttentionWeights(num_heads, average_attn_weights=True, ...)`` takes the attention's query,
key, masks and in-projection (connect its ``in_proj_weight`` / ``in_proj_bias`` — or with
``kdim`` / ``vdim`` its ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` — to the same
names as the attention's, so they are one parameter) and gives softmax(q·kᵀ/√d + masks) per
head (…, num_heads, L, S), or their mean over the heads (…, L, S) with
``average_attn_weights=True``, as torch. A row whose keys are all masked is zeros (torch: NaN).
The value rows of the in-projection get zero gradient from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attention import MultiHeadAttention
from .attention_core import _swap, attention_probs
from .operator import Operator, backend_of, torch_of, unbroadcast


def _probs_torch(t: Any, q: Any, k: Any, scale: float, keep: Any, add: Any) -> Any:
    """:func:`attention_probs` with torch's functions (zeros where a row keeps nothing)."""
    s = (q @ _swap(k)) * scale
    if add is not None:
        s = s + add.to(s.dtype)
    if keep is not None:
        keep = t.as_tensor(keep, device=s.device) if isinstance(keep, np.ndarray) else keep
        s = s.masked_fill(~keep, -float("inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = t.where(t.isfinite(m), m, t.zeros_like(m)).detach()  # the shift does not matter
    e = t.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    return e / t.where(den == 0, t.ones_like(den), den)


class AttentionWeights(MultiHeadAttention):
    """torch's ``need_weights=True`` weights of a :class:`MultiHeadAttention` (see the module
    docstring): inputs ``query`` (…, L, E), ``key`` (…, S, E or kdim) and the masks switched
    on; the same options as the attention's, and ``average_attn_weights``."""

    vjp_ignores = frozenset()
    forward_residuals = Operator.forward_residuals  # no residuals: its VJP recomputes

    def __init__(self, num_heads: int, average_attn_weights: bool = True, **options: Any) -> None:
        super().__init__(num_heads, **options)
        self.average_attn_weights = bool(average_attn_weights)
        self.inputs = ("query", "key", *self.inputs[3:])  # the values take no part

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        return {k: v for k, v in super().param_init.items() if not k.startswith("out_proj")}

    def param_shapes(self, shapes):
        return {k: v for k, v in super().param_shapes(shapes).items() if not k.startswith("out_proj")}

    def infer_shape(self, shapes):
        q, k = shapes.get("query"), shapes.get("key")
        if q is None or k is None:
            return None
        out = super().infer_shape({**shapes, "value": k[:-1] + (self.vdim or q[-1],)})
        if out is None:
            return None
        per_head = (*out[:-2], self.num_heads, q[-2], k[-2])
        return per_head[:-3] + per_head[-2:] if self.average_attn_weights else per_head

    def _qk(self, query: Any, key: Any, in_proj: Any, b: Any) -> tuple[Any, Any, Any, Any]:
        """The projected query and key heads and their (E, ·) weights."""
        w = self._in_weights(in_proj)
        e = w.shape[1] if not isinstance(w, tuple) else w[0].shape[0]
        wq, wk = (w[0], w[1]) if isinstance(w, tuple) else (w[:e], w[e:2 * e])
        q, k = query @ wq.T, key @ wk.T
        if b is not None:
            q, k = q + b[:e], k + b[e:2 * e]
        return self._heads(q), self._heads(k), wq, wk

    def forward(self, xp: Any, query: Any, key: Any, in_proj_bias: Any = None,
                attn_mask: Any = None, key_padding_mask: Any = None, **in_proj: Any) -> Any:
        q, k, _, _ = self._qk(query, key, in_proj, in_proj_bias)
        keep, add = self._masks(xp, attn_mask, key_padding_mask, q.shape[-2], k.shape[-2])
        scale = self._scale(q.shape[-1] * self.num_heads)
        t = torch_of(xp)
        p = _probs_torch(t, q, k, scale, keep, add) if t is not None else \
            attention_probs(np if backend_of(xp) == "numpy" else xp, q, k, scale, keep, add)
        return p.mean(-3) if self.average_attn_weights else p

    def vjp(self, g, out, args, wrt):
        query, key, b = args["query"], args["key"], args.get("in_proj_bias")
        mask, pad = args.get("attn_mask"), args.get("key_padding_mask")
        q, k, wq, wk = self._qk(query, key, args, b)
        keep, add = self._masks(np, mask, pad, q.shape[-2], k.shape[-2])
        e = wq.shape[0]
        scale = self._scale(e)
        p = attention_probs(np, q, k, scale, keep, add)
        gp = g[..., None, :, :] / self.num_heads if self.average_attn_weights else g
        gs = p * (gp - (gp * p).sum(axis=-1, keepdims=True))  # softmax backward
        gq = self._merge(unbroadcast((gs @ k) * scale, q.shape))
        gk = self._merge(unbroadcast((_swap(gs) @ q) * scale, k.shape))
        res: dict[str, Any] = {"query": gq @ wq, "key": gk @ wk}
        if "attn_mask" in wrt:
            res["attn_mask"] = unbroadcast(gs, mask.shape)
        if "key_padding_mask" in wrt:
            res["key_padding_mask"] = unbroadcast(gs, (*pad.shape[:-1], 1, 1, pad.shape[-1])
                                                  ).reshape(pad.shape)
        gwq, gwk = (gx.reshape(-1, e).T @ x.reshape(-1, x.shape[-1]) for gx, x in ((gq, query), (gk, key)))
        if self.separate:
            res.update(q_proj_weight=gwq, k_proj_weight=gwk,
                       v_proj_weight=np.zeros_like(args["v_proj_weight"]))
        else:
            res["in_proj_weight"] = np.concatenate([gwq, gwk, np.zeros_like(gwq)])
        if b is not None:
            res["in_proj_bias"] = np.concatenate([gq.reshape(-1, e).sum(axis=0),
                                                  gk.reshape(-1, e).sum(axis=0), np.zeros(e, b.dtype)])
        return {n: x for n, x in res.items() if n in wrt}

    def __repr__(self) -> str:
        return "AttentionWeights" + super().__repr__().removeprefix("MultiHeadAttention")[:-1] \
            + f", average_attn_weights={self.average_attn_weights})"
