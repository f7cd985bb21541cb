"""Transformer encoder and decoder blocks, as ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, activation=...,
layer_norm_eps=eps, batch_first=True, norm_first=..., bias=...)``. Each sub-layer f (self-
attention, cross-attention on ``memory``, the feed-forward Linear(d_model)(act(Linear(
dim_feedforward)(·)))) is wrapped as x + f(LayerNorm(x)) with ``norm_first=True`` (pre-norm,
our default) or LayerNorm(x + f(x)) with ``norm_first=False`` (post-norm, torch's default).

``dropout=p`` (default 0, where torch's is 0.1) as torch's layers: in training mode the
attentions drop attention probabilities (:class:`MultiHeadAttention`'s ``dropout``) and a
:class:`~mithril.models.dropout.Dropout` follows each sub-layer's f and the feed-forward's
activation; with p = 0 the blocks hold no Dropout (the graph of a block without dropout).

Parameter names map onto torch's modules as: ``layer_norm_<k>`` ↔ ``norm<k+1>``, the
attentions (``in_proj_weight``, ``in_proj_bias``, ``out_proj_weight`` ↔ ``out_proj.weight``,
``out_proj_bias`` ↔ ``out_proj.bias``) ``multi_head_attention`` ↔ ``self_attn`` in the
encoder, ``multi_head_attention_0`` ↔ ``self_attn`` and ``multi_head_attention_1`` ↔
``multihead_attn`` in the decoder, ``linear_0`` ↔ ``linear1`` and ``linear_1`` ↔ ``linear2``.
Init as torch's: LayerNorm ones / zeros, attention as :class:`MultiHeadAttention`, and the
feed-forward layers as ``nn.Linear`` (:class:`Linear` here: ``kaiming_uniform_(a=√5)`` weights,
U(±1/√fan_in) biases).

``activation="gelu"`` is torch's exact (erf) GELU, :class:`ExactGelu`; ``"relu"`` is ReLU; an
operator (instance or class) is used as given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import layers
from .activations import Gelu, Relu
from .arithmetic import Add
from .attention import MultiHeadAttention
from .attention_core import check_dropout
from .blocks import _make_activation
from .dropout import Dropout
from .model import IOKey, Model
from .norms import check_eps
from .operator import Operator


class ExactGelu(Gelu):
    """GELU with the Gaussian CDF, x·Φ(x) = ½·x·(1 + erf(x/√2)): torch's ``F.gelu`` default
    (``approximate="none"``) and ``jax.nn.gelu(approximate=False)``; :class:`Gelu`'s default."""

    def __init__(self) -> None:
        super().__init__(approximate=False)

    def __repr__(self) -> str:
        return "ExactGelu()"


class Linear(layers.Linear):
    """:class:`mithril.Linear` with ``torch.nn.Linear``'s default init: weight
    ``kaiming_uniform_(a=√5)`` = U(±1/√in_features), bias U(±1/√in_features)."""

    _fan_in: int | None = None

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        init = {"weight": "kaiming_uniform"}
        if self.use_bias:
            init["bias"] = f"fan_in_uniform:{self._fan_in}" if self._fan_in else "zeros"
        return init

    def param_shapes(self, shapes):
        out = super().param_shapes(shapes)
        if "weight" in out:
            self._fan_in = out["weight"][1]
        return out


def _wire(name: str) -> Any:
    """``output`` is the block's terminal; any other name is a wire inside it."""
    return name if name == "output" else IOKey(name, expose=False)


def _check_sizes(who: str, d_model: Any, dim_feedforward: Any, eps: Any) -> None:
    for name, v in (("d_model", d_model), ("dim_feedforward", dim_feedforward)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{who}: {name} must be a positive int, got {v!r}")
    check_eps(eps, who)  # the LayerNorms take any value (None failed late)


def _sublayer(block: Model, x: str, out: str, tag: str, f: Callable[[Model, str, Any], None],
              norm_first: bool, eps: float, use_bias: bool) -> None:
    """``out`` = x + f(LayerNorm(x)) (``norm_first``) or LayerNorm(x + f(x)); ``f(block,
    input, output)`` adds the sub-layer's blocks. torch's bias=False drops the LayerNorm's bias too."""
    norm = layers.LayerNorm(eps, use_bias=use_bias)
    if norm_first:
        block |= norm(input=x, output=_wire(f"{tag}_normed"))
        f(block, f"{tag}_normed", _wire(tag))
        block |= Add()(left=x, right=tag, output=_wire(out))
    else:
        f(block, x, _wire(tag))
        block |= Add()(left=x, right=tag, output=_wire(f"{tag}_sum"))
        block |= norm(input=f"{tag}_sum", output=_wire(out))


def _feedforward(d_model: int, dim_feedforward: int, activation: Any,
                 use_bias: bool, p: float = 0.0) -> Callable[[Model, str, Any], None]:
    def f(block: Model, x: str, out: Any) -> None:
        block |= Linear(dim_feedforward, use_bias=use_bias)(input=x, output=_wire("hidden"))
        act = "activated_undropped" if p else "activated"
        block |= _activation(activation)(input="hidden", output=_wire(act))
        if p:  # torch's TransformerEncoderLayer.dropout, between the two Linears
            block |= Dropout(p)(input=act, output=_wire("activated"))
        block |= Linear(d_model, use_bias=use_bias)(input="activated", output=out)
    return _dropped(f, p, "feedforward")


def _dropped(f: Callable[[Model, str, Any], None], p: float,
             tag: str) -> Callable[[Model, str, Any], None]:
    """The sub-layer ``f`` followed by ``Dropout(p)`` (torch's ``dropout1`` / ``2`` / ``3``);
    ``f`` itself for p = 0."""
    if not p:
        return f

    def g(block: Model, x: str, out: Any) -> None:
        f(block, x, _wire(f"{tag}_undropped"))
        block |= Dropout(p)(input=f"{tag}_undropped", output=out)
    return g


def _attention(attn: MultiHeadAttention, memory: str | None,
               masks: dict[str, str]) -> Callable[[Model, str, Any], None]:
    """Self-attention (``memory`` None) or cross-attention on ``memory``; ``masks``: the
    attention's mask terminals -> the block's."""
    def f(block: Model, x: str, out: Any) -> None:
        kv = memory or x
        block |= attn(query=x, key=kv, value=kv, output=out, **masks)
    return f


def _activation(activation: Any) -> Operator:
    if isinstance(activation, str) and activation == "gelu":
        return ExactGelu()
    if isinstance(activation, str) and activation == "relu":
        return Relu()
    if isinstance(activation, str):
        raise ValueError(f"TransformerBlock: activation must be 'relu', 'gelu' or an operator, got "
                         f"{activation!r}")
    return _make_activation(activation)


class TransformerBlock(Model):
    """Self-attention + feed-forward encoder block on (…, L, d_model), as
    ``nn.TransformerEncoderLayer`` (see the module docstring); pre-norm unless
    ``norm_first=False``. Terminals: ``input``, ``output``; with ``use_attn_mask``,
    ``attn_mask`` (torch's ``src_mask``), with ``use_key_padding_mask``, ``key_padding_mask``
    (…, L) (torch's ``src_key_padding_mask``), as :class:`MultiHeadAttention`'s (booleans True
    = masked, or floats added). ``dropout``: torch's, in training mode (module docstring)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int = 2048,
                 activation: Any = "relu", eps: float = 1e-5, is_causal: bool = False,
                 use_attn_mask: bool = False, use_bias: bool = True, *, norm_first: bool = True,
                 use_key_padding_mask: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        _check_sizes("TransformerBlock", d_model, dim_feedforward, eps)
        p = self.dropout = check_dropout(dropout, "TransformerBlock")
        self.d_model, self.num_heads, self.dim_feedforward = int(d_model), num_heads, int(dim_feedforward)
        self.norm_first = bool(norm_first)
        attn = MultiHeadAttention(num_heads, embed_dim=d_model, use_bias=use_bias,
                                  is_causal=is_causal, use_attn_mask=use_attn_mask,
                                  use_key_padding_mask=use_key_padding_mask, dropout=p)
        masks = {k: k for k in attn.inputs[3:]}
        _sublayer(self, "input", "residual", "attention",
                  _dropped(_attention(attn, None, masks), p, "attention"),
                  self.norm_first, eps, use_bias)
        _sublayer(self, "residual", "output", "feedforward",
                  _feedforward(self.d_model, self.dim_feedforward, activation, use_bias, p),
                  self.norm_first, eps, use_bias)


class TransformerDecoderBlock(Model):
    """Self-attention, cross-attention on ``memory`` and feed-forward, as
    ``nn.TransformerDecoderLayer(batch_first=True, dropout=0.0)`` (see the module docstring);
    pre-norm unless ``norm_first=False``. Terminals: ``input`` (torch's ``tgt``) (…, L,
    d_model), ``memory`` (…, S, d_model), ``output`` (…, L, d_model), and the masks switched
    on: ``tgt_mask`` (L, L) and ``tgt_key_padding_mask`` (…, L) on the self-attention,
    ``memory_mask`` (L, S) and ``memory_key_padding_mask`` (…, S) on the cross-attention, each
    as :class:`MultiHeadAttention`'s (booleans True = masked, or floats added).
    ``is_causal``: the self-attention is causal (torch's ``tgt_is_causal`` with the causal
    ``tgt_mask``); it excludes ``use_tgt_mask``. ``dropout``: torch's, in training mode."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int = 2048,
                 activation: Any = "relu", eps: float = 1e-5, is_causal: bool = False,
                 use_bias: bool = True, *, norm_first: bool = True, use_tgt_mask: bool = False,
                 use_memory_mask: bool = False, use_tgt_key_padding_mask: bool = False,
                 use_memory_key_padding_mask: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        _check_sizes("TransformerDecoderBlock", d_model, dim_feedforward, eps)
        p = self.dropout = check_dropout(dropout, "TransformerDecoderBlock")
        if is_causal and use_tgt_mask:
            raise ValueError("TransformerDecoderBlock: is_causal and use_tgt_mask exclude each "
                             "other; give one tgt_mask that combines both")
        self.d_model, self.num_heads, self.dim_feedforward = int(d_model), num_heads, int(dim_feedforward)
        self.norm_first = bool(norm_first)
        self_attn = MultiHeadAttention(num_heads, embed_dim=d_model, use_bias=use_bias,
                                       is_causal=is_causal, use_attn_mask=use_tgt_mask,
                                       use_key_padding_mask=use_tgt_key_padding_mask, dropout=p)
        cross = MultiHeadAttention(num_heads, embed_dim=d_model, use_bias=use_bias,
                                   use_attn_mask=use_memory_mask,
                                   use_key_padding_mask=use_memory_key_padding_mask, dropout=p)
        tgt = {"attn_mask": "tgt_mask", "key_padding_mask": "tgt_key_padding_mask"}
        mem = {"attn_mask": "memory_mask", "key_padding_mask": "memory_key_padding_mask"}
        _sublayer(self, "input", "residual", "attention",
                  _dropped(_attention(self_attn, None, {k: tgt[k] for k in self_attn.inputs[3:]}),
                           p, "attention"), self.norm_first, eps, use_bias)
        _sublayer(self, "residual", "residual2", "cross_attention",
                  _dropped(_attention(cross, "memory", {k: mem[k] for k in cross.inputs[3:]}),
                           p, "cross_attention"), self.norm_first, eps, use_bias)
        _sublayer(self, "residual2", "output", "feedforward",
                  _feedforward(self.d_model, self.dim_feedforward, activation, use_bias, p),
                  self.norm_first, eps, use_bias)
