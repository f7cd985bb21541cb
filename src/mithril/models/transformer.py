"""A pre-LayerNorm transformer encoder block, as ``torch.nn.TransformerEncoderLayer(d_model,
nhead, dim_feedforward, dropout=0.0, activation=..., batch_first=True, norm_first=True)``::

    h = input + MultiHeadAttention(LayerNorm(input))          # self-attention
    output = h + Linear(d_model)(act(Linear(dim_feedforward)(LayerNorm(h))))

Parameter names map onto torch's module as: ``layer_norm_0`` ↔ ``norm1``,
``multi_head_attention`` ↔ ``self_attn`` (``in_proj_weight``, ``in_proj_bias``,
``out_proj_weight`` ↔ ``out_proj.weight``, ``out_proj_bias`` ↔ ``out_proj.bias``),
``layer_norm_1`` ↔ ``norm2``, ``linear_0`` ↔ ``linear1`` and ``linear_1`` ↔ ``linear2``.
Init as torch's: LayerNorm ones / zeros, attention as :class:`MultiHeadAttention`, and the
feed-forward layers as ``nn.Linear`` (:class:`Linear` here: ``kaiming_uniform_(a=√5)`` weights,
U(±1/√fan_in) biases).

``activation="gelu"`` is torch's exact (erf) GELU, :class:`ExactGelu`; ``"relu"`` is ReLU; an
operator (instance or class) is used as given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import layers
from .activations import Gelu, Relu
from .arithmetic import Add
from .attention import MultiHeadAttention
from .blocks import _make_activation
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
    """Pre-LayerNorm self-attention + feed-forward block on (…, L, d_model) (see the module
    docstring). Terminals: ``input``, ``output`` and, with ``use_attn_mask``, ``attn_mask``
    (as :class:`MultiHeadAttention`'s: booleans True = masked, or floats added)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int = 2048,
                 activation: Any = "relu", eps: float = 1e-5, is_causal: bool = False,
                 use_attn_mask: bool = False, use_bias: bool = True) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("dim_feedforward", dim_feedforward)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TransformerBlock: {name} must be a positive int, got {v!r}")
        check_eps(eps, "TransformerBlock")  # the LayerNorms take any value (None failed late)
        self.d_model, self.num_heads, self.dim_feedforward = int(d_model), num_heads, int(dim_feedforward)

        def wire(name: str) -> IOKey:
            return IOKey(name, expose=False)

        attn = MultiHeadAttention(num_heads, embed_dim=d_model, use_bias=use_bias,
                                  is_causal=is_causal, use_attn_mask=use_attn_mask)
        # torch's bias=False removes the LayerNorms' biases too
        self |= layers.LayerNorm(eps, use_bias=use_bias)(input="input", output=wire("norm1"))
        mask = {"attn_mask": "attn_mask"} if use_attn_mask else {}
        self |= attn(query="norm1", key="norm1", value="norm1", output=wire("attention"), **mask)
        self |= Add()(left="input", right="attention", output=wire("residual"))
        self |= layers.LayerNorm(eps, use_bias=use_bias)(input="residual", output=wire("norm2"))
        self |= Linear(self.dim_feedforward, use_bias=use_bias)(input="norm2", output=wire("hidden"))
        self |= _activation(activation)(input="hidden", output=wire("activated"))
        self |= Linear(self.d_model, use_bias=use_bias)(input="activated", output=wire("feedforward"))
        self |= Add()(left="residual", right="feedforward", output="output")
