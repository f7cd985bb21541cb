"""The attention weights of :class:`~mithril.models.attention.MultiHeadAttention`: what
``torch.nn.MultiheadAttention(..., need_weights=True)`` returns as its second output.

``AttentionWeights(num_heads, average_attn_weights=True, ...)`` takes the attention's query,
key, masks and in-projection (connect its ``in_proj_weight`` / ``in_proj_bias`` — or with
``kdim`` / ``vdim`` its ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` — to the same
names as the attention's, so they are one parameter) and gives softmax(q·kᵀ/√d + masks) per
head (…, num_heads, L, S), or their mean over the heads (…, L, S) with
``average_attn_weights=True``, as torch. A row whose keys are all masked is zeros (torch: NaN).
The value rows of the in-projection get zero gradient from it. float16 / bfloat16 inputs
are computed in float32 and rounded once on NumPy and JAX, as the attention's
(:mod:`.half_precision`).

With ``add_bias_kv`` (connect ``bias_k`` to the attention's; ``bias_v`` takes no part) and
``add_zero_attn`` the weights cover the extra keys too, (…, L, S + 1 or 2), as torch's. With
``dropout=p`` in training mode they are torch's returned ones, after dropout (p·m/(1 − p),
then the mean over the heads); give the attention and this block the same ``dropout_key`` so
that both draw the same mask (for a value batch no larger than the query's and key's).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .attention import MultiHeadAttention
from .attention_core import _swap, append_rows, attention_probs
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, backend_of, unbroadcast

#: the attention's parameters this block does not read
_UNUSED = ("out_proj_weight", "out_proj_bias", "bias_v")


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
        return {k: v for k, v in super().param_init.items() if k not in _UNUSED}

    def param_shapes(self, shapes):
        return {k: v for k, v in super().param_shapes(shapes).items() if k not in _UNUSED}

    def infer_shape(self, shapes):
        q, k = shapes.get("query"), shapes.get("key")
        if q is None or k is None:
            return None
        out = super().infer_shape({**shapes, "value": k[:-1] + (self.vdim or q[-1],)})
        if out is None:
            return None
        s = None if k[-2] is None else k[-2] + self.n_extra
        per_head = (*out[:-2], self.num_heads, q[-2], s)
        return per_head[:-3] + per_head[-2:] if self.average_attn_weights else per_head

    def _qk(self, xp: Any, query: Any, key: Any, in_proj: Any, b: Any,
            bias_k: Any) -> tuple[Any, Any, Any, Any]:
        """The projected query and key heads (the keys with ``bias_k`` and the zero key) and
        their (E, ·) weights."""
        w = self._in_weights(in_proj)
        e = w.shape[1] if not isinstance(w, tuple) else w[0].shape[0]
        wq, wk = (w[0], w[1]) if isinstance(w, tuple) else (w[:e], w[e:2 * e])
        q, k = query @ wq.T, key @ wk.T
        if b is not None:
            q, k = q + b[:e], k + b[e:2 * e]
        k = append_rows(xp, k, ([bias_k] if self.add_bias_kv else [])
                        + ([None] if self.add_zero_attn else []))
        return self._heads(q), self._heads(k), wq, wk

    @float32_forward
    def forward(self, xp: Any, query: Any, key: Any, in_proj_bias: Any = None,
                attn_mask: Any = None, key_padding_mask: Any = None, bias_k: Any = None,
                ctx: Any = None, **in_proj: Any) -> Any:
        xp = np if backend_of(xp) == "numpy" else xp
        q, k, _, _ = self._qk(xp, query, key, in_proj, in_proj_bias, bias_k)
        keep, add = self._masks(xp, attn_mask, key_padding_mask, q.shape[-2], k.shape[-2])
        p = attention_probs(xp, q, k, self._scale(q.shape[-1] * self.num_heads), keep, add)
        drop = self._drop(xp, ctx, p)
        if drop is not None:  # torch returns the weights after dropout
            p = p * drop
        return p.mean(-3) if self.average_attn_weights else p

    @float32_vjp
    def vjp(self, g, out, args, wrt):
        query, key, b = args["query"], args["key"], args.get("in_proj_bias")
        mask, pad = args.get("attn_mask"), args.get("key_padding_mask")
        q, k, wq, wk = self._qk(np, query, key, args, b, args.get("bias_k"))
        keep, add = self._masks(np, mask, pad, q.shape[-2], k.shape[-2])
        e = wq.shape[0]
        scale = self._scale(e)
        p = attention_probs(np, q, k, scale, keep, add)
        gp = g[..., None, :, :] / self.num_heads if self.average_attn_weights else g
        drop = self._drop(np, args.get("ctx"), p)  # the same mask as the forward's
        if drop is not None:
            gp = gp * drop
        gs = p * (gp - (gp * p).sum(axis=-1, keepdims=True))  # softmax backward
        gq = self._merge(unbroadcast((gs @ k) * scale, q.shape))
        gkh = unbroadcast((_swap(gs) @ q) * scale, k.shape)
        res: dict[str, Any] = {}
        gkh = self._extra_grads(res, wrt, [None, gkh, gkh], k.shape[-2])[1]
        gk = self._merge(gkh)
        s = k.shape[-2] - self.n_extra  # the masks' cotangents leave out the extra keys
        res.update(query=gq @ wq, key=gk @ wk)
        if "attn_mask" in wrt:
            res["attn_mask"] = unbroadcast(gs[..., :s], mask.shape)
        if "key_padding_mask" in wrt:
            res["key_padding_mask"] = unbroadcast(gs[..., :s], (*pad.shape[:-1], 1, 1,
                                                                pad.shape[-1])).reshape(pad.shape)
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
