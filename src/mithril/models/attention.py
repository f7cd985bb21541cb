"""Attention with torch's layouts and numerics: ``MultiHeadAttention`` (``ScaledDotProduct``,
``F.scaled_dot_product_attention`` as a block, lives in :mod:`.scaled_dot_product` and is
re-exported here).

``MultiHeadAttention`` is ``torch.nn.MultiheadAttention(batch_first=True)``:
one operator whose parameters are torch's, under torch's names with ``_`` for ``.``:
``in_proj_weight`` (3E, E) with the query, key and value rows in that order (with ``kdim`` /
``vdim`` other than E, torch's ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``
instead), ``in_proj_bias`` (3E,), ``out_proj_weight`` (E, E) and ``out_proj_bias`` (E,). So
copying a torch module's ``state_dict`` in is a rename. Its ``attn_mask`` follows torch's
``MultiheadAttention`` (not ``ScaledDotProduct``'s): booleans mark the pairs that may **not**
attend (True: masked) and floats are added; it broadcasts to (…, num_heads, L, S), e.g.
(L, S) or (N, num_heads, L, S);
``key_padding_mask`` (…, S) masks keys per batch entry.
Init as torch: ``xavier_uniform_`` of ``in_proj_weight`` (Glorot over its (3E, E) shape),
``kaiming_uniform_(a=√5)`` of ``out_proj_weight`` (U(±1/√E)) and zero biases.
``add_bias_kv=True``: learned ``bias_k`` and ``bias_v`` (1, 1, E) appended to the projected
keys and values (S -> S + 1); ``add_zero_attn=True``: then a row of zeros per head (S + 1 more);
the masks take part for the new keys (``attn_mask`` gets a False / 0 column,
``key_padding_mask`` a False / 0 entry), as torch pads them. ``dropout=p``: in training mode
the attention probabilities are multiplied by m / (1 − p) before the weighted sum, m ∈ {0, 1}
per (batch, head, query, key), P(m = 0) = p, as torch's (inverted dropout; inference mode:
none); the mask is counter based as :class:`~mithril.models.dropout.Dropout`'s (the same on
every backend for a seed and step; ``dropout_key`` names the stream in place of the block's
path, so that :class:`~mithril.models.attention_weights.AttentionWeights` can draw the same).

The softmax subtracts each row's maximum first, so large scores never overflow. Forward per
backend: ``F.scaled_dot_product_attention`` on torch, the same formula in ``jax.numpy`` and
NumPy. A NumPy forward that will be differentiated keeps the attention probabilities (and,
for ``MultiHeadAttention``, the projected heads and the merged attention output) as residuals,
so the VJPs redo none of the forward (softmax backward: p·(gp − Σ gp·p)). Self-attention (one
wire connected to query, key and value) takes one (3E, E) projection matmul forward and
backward.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .attention_core import (
    _check_mask_dtype,
    _is_bool,
    _mask_fits,
    _masks,
    _rank_at_least,
    _same,
    append_rows,
    attend,
    attend_vjp,
    attention_probs,
    check_dropout,
    dropout_factor,
    pad_keys,
)
from .half_precision import float32_forward, float32_vjp
from .operator import (
    Operator,
    ShapeError,
    backend_of,
    broadcast_shapes,
    fmt,
    functional_of,
    unbroadcast,
)
from .scaled_dot_product import ScaledDotProduct  # noqa: F401 (re-exported: its old home)


# -- MultiHeadAttention ------------------------------------------------------------------------
class MultiHeadAttention(Operator):
    """``torch.nn.MultiheadAttention(E, num_heads, batch_first=True)`` (see the module
    docstring): query (…, L, E), key (…, S, E), value (…, S, E) -> (…, L, E), with E inferred
    from the query (``embed_dim``, when given, is checked against it). For self-attention
    connect one wire to query, key and value. ``is_causal`` masks as ``ScaledDotProduct``;
    ``use_attn_mask`` adds an ``attn_mask`` input (booleans: True masks, as torch's module).
    ``use_key_padding_mask`` adds torch's ``key_padding_mask`` input (…, S): per batch entry
    and key, booleans (True: the key is padding, ignored) or floats added to its scores; it
    combines with ``attn_mask`` / ``is_causal`` (a pair is kept if both keep it, float masks
    add). ``kdim`` / ``vdim`` (with ``embed_dim``): key and value features other than E; as
    torch's, the in-projection is then three weights ``q_proj_weight`` (E, E),
    ``k_proj_weight`` (E, kdim) and ``v_proj_weight`` (E, vdim), each ``xavier_uniform_``.
    ``add_bias_kv`` (parameters ``bias_k``, ``bias_v`` (1, 1, E), as torch's), ``add_zero_attn``
    and ``dropout`` (on the attention probabilities in training mode; ``dropout_key``: the
    name its random stream is drawn under, default the block's path) as torch's (see the
    module docstring)."""

    any_dtype_inputs = frozenset({"attn_mask", "key_padding_mask"})
    vjp_ignores = frozenset({"output"})

    def __init__(self, num_heads: int, embed_dim: int | None = None, use_bias: bool = True,
                 is_causal: bool = False, use_attn_mask: bool = False,
                 use_key_padding_mask: bool = False, *, kdim: int | None = None,
                 vdim: int | None = None, dropout: float = 0.0, add_bias_kv: bool = False,
                 add_zero_attn: bool = False, dropout_key: str | None = None) -> None:
        who = type(self).__name__
        self.dropout = check_dropout(dropout, who)
        for name, flag in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"{who}: {name} must be True or False, got {flag!r}")
        if dropout_key is not None and not isinstance(dropout_key, str):
            raise ValueError(f"{who}: dropout_key must be a str or None, got {dropout_key!r}")
        if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) \
                or num_heads <= 0:
            raise ValueError(f"MultiHeadAttention: num_heads must be a positive int, got {num_heads!r}")
        if embed_dim is not None:
            if not isinstance(embed_dim, (int, np.integer)) or isinstance(embed_dim, bool) \
                    or embed_dim <= 0:
                raise ValueError(f"MultiHeadAttention: embed_dim must be a positive int, got "
                                 f"{embed_dim!r}")
            if embed_dim % num_heads:
                raise ValueError(f"MultiHeadAttention: embed_dim ({embed_dim}) must be divisible "
                                 f"by num_heads ({num_heads})")
        if is_causal and use_attn_mask:
            raise ValueError("MultiHeadAttention: is_causal and use_attn_mask exclude each other; "
                             "give one attn_mask that combines both")
        for name, d in (("kdim", kdim), ("vdim", vdim)):
            if d is not None and (not isinstance(d, (int, np.integer)) or isinstance(d, bool)
                                  or d <= 0 or embed_dim is None):
                raise ValueError(f"MultiHeadAttention: {name} must be a positive int given with "
                                 f"embed_dim (as torch's), got {name}={d!r}, embed_dim={embed_dim!r}")
        # torch's layout: one (3E, E) in-projection unless the key / value widths differ
        self.kdim, self.vdim = (None if d is None else int(d) for d in (kdim, vdim))
        self.separate = any(d is not None and d != embed_dim for d in (kdim, vdim))
        self.num_heads = int(num_heads)
        self.embed_dim = None if embed_dim is None else int(embed_dim)
        self.use_bias, self.is_causal, self.use_attn_mask = bool(use_bias), bool(is_causal), \
            bool(use_attn_mask)
        self.use_key_padding_mask = bool(use_key_padding_mask)
        self.inputs = ("query", "key", "value") + (("attn_mask",) if use_attn_mask else ()) \
            + (("key_padding_mask",) if use_key_padding_mask else ())
        self.add_bias_kv, self.add_zero_attn = bool(add_bias_kv), bool(add_zero_attn)
        self.dropout_key = dropout_key
        if self.dropout:  # reads the mode and draws random bits (the step counter advances)
            self.context = self.random = True  # type: ignore[misc]

    @property
    def n_extra(self) -> int:
        """Keys appended to the S given: ``bias_k`` and / or the zero key."""
        return int(self.add_bias_kv) + int(self.add_zero_attn)

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        """torch's: ``xavier_uniform_`` in-projection, ``kaiming_uniform_(a=√5)`` out-projection,
        zero biases, ``xavier_normal_`` ``bias_k`` / ``bias_v``."""
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if self.separate \
            else ("in_proj_weight",)
        init = {**dict.fromkeys(names, "glorot"), "out_proj_weight": "kaiming_uniform"}
        if self.use_bias:
            init.update(in_proj_bias="zeros", out_proj_bias="zeros")
        if self.add_bias_kv:  # torch's xavier_normal_ of (1, 1, E): N(0, 1/E)
            init.update(bias_k="xavier_normal", bias_v="xavier_normal")
        return init

    def _embed(self, shapes) -> int | None:
        who = "MultiHeadAttention"
        q, k, v = (shapes.get(n) for n in ("query", "key", "value"))
        for name, s in (("query", q), ("key", k), ("value", v)):
            _rank_at_least(s, 2, name, who, "…, length, embed_dim")
        e = q[-1] if q is not None else None
        if e is not None and self.embed_dim is not None and e != self.embed_dim:
            raise ShapeError(f"{who}: 'query' has {e} features but embed_dim is {self.embed_dim}")
        if e == 0:  # as torch's embed_dim > 0 (1/√0 and the init's 1/fan failed unnamed)
            raise ShapeError(f"{who}: 'query' must have embed_dim > 0 features (its last "
                             f"dimension), got {fmt(q)}")
        if e is not None and e % self.num_heads:
            raise ShapeError(f"{who}: embed_dim ({e}, the last dimension of 'query') must be "
                             f"divisible by num_heads ({self.num_heads})")
        for name, s, d in (("key", k, self.kdim), ("value", v, self.vdim)):
            if s is not None and d is not None and s[-1] is not None and s[-1] != d:
                raise ShapeError(f"{who}: '{name}' must have {name[0]}dim = {d} features (its last "
                                 f"dimension), got {fmt(s)}")
            if s is not None and d is None and not _same(e, s[-1]):
                raise ShapeError(f"{who}: '{name}' must have the query's embed_dim ({e}) as its "
                                 f"last dimension (or give {name[0]}dim and embed_dim), got {fmt(s)}")
        if k is not None and v is not None and not _same(k[-2], v[-2]):
            raise ShapeError(f"{who}: 'key' and 'value' must have the same length (axis -2), "
                             f"got {fmt(k)} and {fmt(v)}")
        return e

    def param_shapes(self, shapes):
        e = self._embed(shapes)
        if e is None:
            return {}
        if self.separate:
            out = {"q_proj_weight": (e, e), "k_proj_weight": (e, self.kdim or e),
                   "v_proj_weight": (e, self.vdim or e)}
        else:
            out = {"in_proj_weight": (3 * e, e)}
        out["in_proj_bias"] = (3 * e,)
        if self.add_bias_kv:
            out.update(bias_k=(1, 1, e), bias_v=(1, 1, e))
        out.update({"out_proj_weight": (e, e), "out_proj_bias": (e,)})  # torch's order
        return out if self.use_bias else {k: v for k, v in out.items()
                                          if k not in ("in_proj_bias", "out_proj_bias")}

    def infer_shape(self, shapes):
        e = self._embed(shapes)
        q, k, v = (shapes.get(n) for n in ("query", "key", "value"))
        if q is None or k is None or v is None:
            return None
        batch = broadcast_shapes(broadcast_shapes(q[:-2], k[:-2], "'query' and 'key'"), v[:-2],
                                 "'query'/'key' and 'value'")
        m = shapes.get("attn_mask") if self.use_attn_mask else None
        scores = (*batch, self.num_heads, q[-2], k[-2])
        if m is not None:
            _mask_fits(m, scores, "MultiHeadAttention", "(…, num_heads, L, S) (torch's (N·num_heads, "
                       "L, S) per-head mask is (N, num_heads, L, S) here)")
        pad = shapes.get("key_padding_mask") if self.use_key_padding_mask else None
        if pad is not None:
            if len(pad) < 1 or not _same(pad[-1], k[-2]):
                raise ShapeError(f"MultiHeadAttention: 'key_padding_mask' must be (…, S) with S "
                                 f"= {k[-2]} keys (the length of 'key' {fmt(k)}), got {fmt(pad)}")
            _mask_fits((*pad[:-1], 1, 1, pad[-1]), scores, "MultiHeadAttention",
                       "(…, num_heads, L, S), as (…, 1, 1, S)", "key_padding_mask")
        return (*batch, q[-2], e)

    def check_inputs(self, shapes, dtypes, arrays, names) -> None:
        _check_mask_dtype(dtypes, names, "MultiHeadAttention")
        _check_mask_dtype(dtypes, names, "MultiHeadAttention", "key_padding_mask")

    # -- pieces shared by forward and VJP ----------------------------------------------------
    def _heads(self, x: Any) -> Any:
        """(…, L, E) -> (…, heads, L, E / heads)."""
        h = self.num_heads
        return x.reshape((*x.shape[:-1], h, x.shape[-1] // h)).swapaxes(-3, -2)

    @staticmethod
    def _merge(x: Any) -> Any:
        """(…, heads, L, d) -> (…, L, heads·d)."""
        x = x.swapaxes(-3, -2)
        return x.reshape((*x.shape[:-2], x.shape[-2] * x.shape[-1]))

    @staticmethod
    def _self(query: Any, key: Any, value: Any) -> bool:
        return query is key and key is value

    @staticmethod
    def _in_weights(args: Any) -> Any:
        """The in-projection: the (3E, E) ``in_proj_weight``, or with kdim / vdim the tuple
        (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``)."""
        w = args.get("in_proj_weight")
        return w if w is not None else tuple(args[f"{r}_proj_weight"] for r in "qkv")

    def _project(self, query: Any, key: Any, value: Any, w: Any, b: Any,
                 F: Any = None) -> tuple[Any, Any, Any]:
        """The q, k, v projections (``w``: see :meth:`_in_weights`; ``F``:
        torch.nn.functional, whose ``linear`` fuses the bias; self-attention projects once
        with the whole (3E, E) in-projection)."""
        fused = not isinstance(w, tuple)
        e = w.shape[1] if fused else w[0].shape[0]
        if fused and self._self(query, key, value):
            if F is not None:
                return F.linear(query, w, b).split(e, dim=-1)
            qkv = query @ w.T
            if b is not None:
                qkv = qkv + b
            return qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        ws = [w[i * e:(i + 1) * e] for i in range(3)] if fused else w
        bs = [None] * 3 if b is None else [b[i * e:(i + 1) * e] for i in range(3)]
        if F is not None:
            return tuple(F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))
        out = []
        for x, wi, bi in zip((query, key, value), ws, bs):
            y = x @ wi.T
            out.append(y if bi is None else y + bi)
        return out[0], out[1], out[2]

    def _scale(self, e: int) -> float:
        return 1.0 / math.sqrt(e // self.num_heads)

    def _masks(self, xp: Any, attn_mask: Any, pad: Any, n_query: int,
               n_key: int) -> tuple[Any, Any]:
        """``(keep, add)`` of ``attn_mask`` / ``is_causal`` and the key padding mask (…, S),
        as (…, 1, 1, S): booleans True mark padding (not kept), floats add. ``n_key``: the
        keys with the extra ones (:attr:`n_extra`), for which every mask is padded with
        "take part" (True / 0), as torch pads them."""
        n, s = self.n_extra, n_key - self.n_extra
        keep, add = _masks(attn_mask, self.is_causal, n_query, s, True)
        keep, add = pad_keys(xp, keep, s, n, True), pad_keys(xp, add, s, n, 0)
        if pad is None:
            return keep, add
        pad = pad_keys(xp, pad[..., None, None, :], s, n, False if _is_bool(pad) else 0)
        if not _is_bool(pad):
            return keep, pad if add is None else add + pad
        if isinstance(keep, np.ndarray) and backend_of(xp) == "torch":  # the causal triangle
            keep = xp.t.as_tensor(keep, device=pad.device)
        return ~pad if keep is None else ~pad & keep, add

    def _extend(self, xp: Any, k: Any, v: Any, bias_k: Any, bias_v: Any) -> tuple[Any, Any]:
        """The projected keys and values (…, S, E) with ``bias_k`` / ``bias_v`` and the zero
        row appended (torch's order)."""
        if not self.n_extra:
            return k, v
        bias = self.add_bias_kv
        zero = [None] if self.add_zero_attn else []
        return (append_rows(xp, k, ([bias_k] if bias else []) + zero),
                append_rows(xp, v, ([bias_v] if bias else []) + zero))

    def _drop(self, xp: Any, ctx: Any, p: Any, v: Any = None) -> Any:
        """The dropout factor over the probabilities ``p`` (…, heads, L, S) (at the batch
        shape of the output: ``v``'s batch axes too), or None when no dropout applies."""
        if not self.dropout or ctx is None or not ctx.training:
            return None
        shape = tuple(p.shape) if v is None else \
            np.broadcast_shapes(tuple(p.shape), (*v.shape[:-2], 1, 1))
        return dropout_factor(xp, ctx, shape, self.dropout, self.dropout_key, p)

    @float32_forward
    def forward(self, xp: Any, query: Any, key: Any, value: Any, out_proj_weight: Any,
                in_proj_bias: Any = None, out_proj_bias: Any = None, attn_mask: Any = None,
                key_padding_mask: Any = None, bias_k: Any = None, bias_v: Any = None,
                ctx: Any = None, **in_proj: Any) -> Any:
        kind = backend_of(xp)
        if kind == "numpy":
            return self.forward_residuals(xp, query, key, value, out_proj_weight, in_proj_bias,
                                          out_proj_bias, attn_mask, key_padding_mask, bias_k,
                                          bias_v, ctx, **in_proj)[0]
        F = functional_of(xp)
        q, k, v = self._project(query, key, value, self._in_weights(in_proj), in_proj_bias, F)
        k, v = self._extend(xp, k, v, bias_k, bias_v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        e = out_proj_weight.shape[0]
        training = self.dropout and ctx is not None and ctx.training
        if training:  # the probabilities themselves, for the mask to multiply
            keep, add = self._masks(xp, attn_mask, key_padding_mask, q.shape[-2], k.shape[-2])
            p = attention_probs(xp, q, k, self._scale(e), keep, add)
            o = (p * self._drop(xp, ctx, p, v)) @ v
        elif F is not None and attn_mask is None and key_padding_mask is None and not self.n_extra:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal,
                                               scale=self._scale(e))
        else:
            keep, add = self._masks(xp, attn_mask, key_padding_mask, q.shape[-2], k.shape[-2])
            o = attend(xp, q, k, v, self._scale(e), keep, add)
        if F is not None:
            return F.linear(self._merge(o), out_proj_weight, out_proj_bias)
        y = self._merge(o) @ out_proj_weight.T
        return y if out_proj_bias is None else y + out_proj_bias

    @float32_forward
    def forward_residuals(self, xp: Any, query: Any, key: Any, value: Any, out_proj_weight: Any,
                          in_proj_bias: Any = None, out_proj_bias: Any = None,
                          attn_mask: Any = None, key_padding_mask: Any = None,
                          bias_k: Any = None, bias_v: Any = None, ctx: Any = None,
                          **in_proj: Any) -> tuple[Any, Any]:
        """NumPy: the output and ``(q, k, v, p, o, drop)``: the projected heads (the keys and
        values with the extra rows), the attention probabilities, the merged attention
        output (the out-projection's input) and the dropout factor (None without dropout).
        ``in_proj``: ``in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight``,
        ``v_proj_weight``."""
        q, k, v = self._project(query, key, value, self._in_weights(in_proj), in_proj_bias)
        k, v = self._extend(np, k, v, bias_k, bias_v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        keep, add = self._masks(np, attn_mask, key_padding_mask, q.shape[-2], k.shape[-2])
        p = attention_probs(np, q, k, self._scale(out_proj_weight.shape[0]), keep, add)
        drop = self._drop(np, ctx, p, v)
        o = self._merge((p if drop is None else p * drop) @ v)
        y = o @ out_proj_weight.T
        if out_proj_bias is not None:
            y += out_proj_bias
        return y, (q, k, v, p, o, drop)

    def _extra_grads(self, res: dict, wrt: Any, heads: list, n_key: int) -> list:
        """``bias_k`` / ``bias_v``'s cotangents (into ``res``) from those of the key and value
        heads (…, heads, S + extra, d), which come back without the extra rows."""
        if not self.n_extra:
            return heads
        s = n_key - self.n_extra
        if self.add_bias_kv:
            for name, gh in (("bias_k", heads[1]), ("bias_v", heads[2])):
                if name in wrt:
                    row = gh[..., s, :]  # (…, heads, d) -> (1, 1, E)
                    res[name] = row.reshape((-1, row.shape[-2] * row.shape[-1])).sum(
                        axis=0).reshape(1, 1, -1)
        return [heads[0], heads[1][..., :s, :], heads[2][..., :s, :]]

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        query, key, value = args["query"], args["key"], args["value"]
        w, b, wo = self._in_weights(args), args.get("in_proj_bias"), args["out_proj_weight"]
        mask, pad = args.get("attn_mask"), args.get("key_padding_mask")
        e = wo.shape[0]
        if residuals is None:
            residuals = self.forward_residuals(np, **args)[1]
        q, k, v, p, o, drop = residuals
        keep, add = self._masks(np, mask, pad, q.shape[-2], k.shape[-2])
        res: dict[str, np.ndarray] = {}
        g2 = g.reshape(-1, e)
        if "out_proj_weight" in wrt:
            res["out_proj_weight"] = g2.T @ o.reshape(-1, e)
        if "out_proj_bias" in wrt:
            res["out_proj_bias"] = g2.sum(axis=0)
        gq, gk, gv, gs = attend_vjp(self._heads(g @ wo), q, k, v, self._scale(e), keep, add, p,
                                    drop)
        s = k.shape[-2] - self.n_extra  # the masks' cotangents leave out the extra keys
        if "attn_mask" in wrt and not _is_bool(mask):
            res["attn_mask"] = unbroadcast(gs[..., :s], mask.shape)
        if "key_padding_mask" in wrt and not _is_bool(pad):  # a float one: (…, 1, 1, S)
            res["key_padding_mask"] = unbroadcast(gs[..., :s], (*pad.shape[:-1], 1, 1,
                                                                pad.shape[-1])).reshape(pad.shape)
        heads = [unbroadcast(gx, x.shape) for gx, x in ((gq, q), (gk, k), (gv, v))]
        heads = self._extra_grads(res, wrt, heads, k.shape[-2])
        if not self.separate and self._self(query, key, value):
            # the three heads' cotangents straight into one (…, L, 3, heads, d) array: the
            # (…, L, 3E) cotangent of the fused projection, in one copy
            gqkv = np.empty((*query.shape[:-1], 3, self.num_heads, e // self.num_heads),
                            dtype=heads[0].dtype)
            for i, gh in enumerate(heads):
                np.copyto(gqkv[..., i, :, :], gh.swapaxes(-3, -2))
            gqkv = gqkv.reshape((*query.shape[:-1], 3 * e))
            gflat = gqkv.reshape(-1, 3 * e)
            if "in_proj_weight" in wrt:
                res["in_proj_weight"] = gflat.T @ query.reshape(-1, e)
            if "in_proj_bias" in wrt:
                res["in_proj_bias"] = gflat.sum(axis=0)
            # one cotangent per key, even where the keys are one wire (the pass adds them):
            # three wires may carry one array, and each must get its own part
            for i, name in enumerate(("query", "key", "value")):
                if name in wrt:
                    res[name] = gqkv[..., i * e:(i + 1) * e] @ w[i * e:(i + 1) * e]
            return res
        grads = [self._merge(gh) for gh in heads]
        ins = (query, key, value)
        ws = w if self.separate else [w[i * e:(i + 1) * e] for i in range(3)]
        gws, gb = [], None if b is None else np.zeros_like(b)
        for i, (name, gx, x) in enumerate(zip(("query", "key", "value"), grads, ins)):
            gflat = gx.reshape(-1, e)
            gws.append(gflat.T @ x.reshape(-1, x.shape[-1]))
            if gb is not None:
                gb[i * e:(i + 1) * e] = gflat.sum(axis=0)
            if name in wrt:
                res[name] = gx @ ws[i]
        if self.separate:
            res.update({f"{r}_proj_weight": gw for r, gw in zip("qkv", gws)
                        if f"{r}_proj_weight" in wrt})
        elif "in_proj_weight" in wrt:
            res["in_proj_weight"] = np.concatenate(gws)
        if "in_proj_bias" in wrt and gb is not None:
            res["in_proj_bias"] = gb
        return res

    def __repr__(self) -> str:
        return (f"MultiHeadAttention({self.num_heads}, embed_dim={self.embed_dim}, "
                f"use_bias={self.use_bias}, is_causal={self.is_causal}, "
                f"use_attn_mask={self.use_attn_mask}"
                + (", use_key_padding_mask=True" if self.use_key_padding_mask else "")
                + "".join(f", {n}={d}" for n, d in (("kdim", self.kdim), ("vdim", self.vdim)) if d)
                + (f", dropout={self.dropout}" if self.dropout else "")
                + (", add_bias_kv=True" if self.add_bias_kv else "")
                + (", add_zero_attn=True" if self.add_zero_attn else "")
                + (f", dropout_key={self.dropout_key!r}" if self.dropout_key is not None else "")
                + ")")
