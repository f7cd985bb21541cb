"""Position embeddings added to a sequence (…, L, D): learned and sinusoidal.

``PositionalEmbedding(max_len, dim)`` adds rows 0 … L−1 of a learned table ``weight``
(max_len, dim), initialised N(0, 1) as ``torch.nn.Embedding`` (the torch equivalent is
``x + nn.Embedding(max_len, dim)(torch.arange(L))``).

``PositionalEncoding(hidden_dim, max_len=5000)`` (the published Mithril's name) adds the fixed
sinusoidal table of "Attention is all you need", as the torch tutorials build it:
pe[p, 2i] = sin(p · 10000^(−2i/D)), pe[p, 2i+1] = cos(p · 10000^(−2i/D)). The table is built
in float64 NumPy and cast to the input's dtype; it has no parameters and no gradient.

A sequence longer than the table (L > max_len) is a ``ShapeError`` naming both lengths, raised
when the model is compiled with that length or, for a free length, by ``evaluate`` before
anything runs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .operator import Operator, ShapeError, backend_of, fmt


def _positive(value: Any, name: str, who: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")
    return int(value)


def _check_sequence(s: Any, max_len: int, dim: int, who: str) -> None:
    if s is None:
        return
    if len(s) < 2:
        raise ShapeError(f"{who}: 'input' must have rank >= 2 (…, length, {dim}), got shape {fmt(s)}")
    if s[-1] is not None and s[-1] != dim:
        raise ShapeError(f"{who}: 'input' must have {dim} features (last axis), got shape {fmt(s)}")
    if s[-2] is not None and s[-2] > max_len:
        raise ShapeError(f"{who}: sequence length {s[-2]} (axis -2 of 'input' {fmt(s)}) is longer "
                         f"than the position table (max_len={max_len})")


def sinusoidal_table(length: int, dim: int) -> np.ndarray:
    """The (length, dim) float64 sinusoidal position table (odd ``dim``: one more sine column)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    pe = np.zeros((length, dim))
    pe[:, 0::2] = np.sin(position * div)
    pe[:, 1::2] = np.cos(position * div[: dim // 2])
    return pe


class PositionalEmbedding(Operator):
    """input + weight[:L] for input (…, L, dim); ``weight`` (max_len, dim) is learned, N(0, 1)."""

    param_init = {"weight": "normal"}

    def __init__(self, max_len: int, dim: int) -> None:
        self.max_len = _positive(max_len, "max_len", "PositionalEmbedding")
        self.dim = _positive(dim, "dim", "PositionalEmbedding")

    def param_shapes(self, shapes):
        return {"weight": (self.max_len, self.dim)}

    def infer_shape(self, shapes):
        s = shapes.get("input")
        _check_sequence(s, self.max_len, self.dim, "PositionalEmbedding")
        return s

    def forward(self, xp: Any, input: Any, weight: Any) -> Any:
        return input + weight[: input.shape[-2]]

    def vjp(self, g, out, args, wrt):
        res = {}
        if "input" in wrt:
            res["input"] = g
        if "weight" in wrt:
            gw = np.zeros_like(args["weight"])
            gw[: g.shape[-2]] = g.sum(axis=tuple(range(g.ndim - 2)))  # (an empty g too)
            res["weight"] = gw
        return res

    def __repr__(self) -> str:
        return f"PositionalEmbedding({self.max_len}, {self.dim})"


class PositionalEncoding(Operator):
    """input + the fixed sinusoidal table's first L rows, for input (…, L, hidden_dim)."""

    def __init__(self, hidden_dim: int, max_len: int = 5000) -> None:
        self.hidden_dim = _positive(hidden_dim, "hidden_dim", "PositionalEncoding")
        self.max_len = _positive(max_len, "max_len", "PositionalEncoding")
        self._tables: dict[tuple, Any] = {}  # per (backend, length, dtype, device)

    def infer_shape(self, shapes):
        s = shapes.get("input")
        _check_sequence(s, self.max_len, self.hidden_dim, "PositionalEncoding")
        return s

    def table(self, xp: Any, like: Any) -> Any:
        """The first ``like.shape[-2]`` rows as an array of ``like``'s backend, dtype, device."""
        n, kind = like.shape[-2], backend_of(xp)
        key = (kind, n, str(like.dtype), str(like.device) if kind == "torch" else "")
        t = self._tables.get(key)
        if t is None:
            pe = sinusoidal_table(n, self.hidden_dim)
            if kind == "torch":
                t = xp.t.as_tensor(pe, dtype=like.dtype, device=like.device)
            else:  # NumPy, or a constant under jax.jit
                t = pe.astype(like.dtype)
            self._tables[key] = t
        return t

    def forward(self, xp: Any, input: Any) -> Any:
        return input + self.table(xp, input)

    def vjp(self, g, out, args, wrt):
        return {"input": g}

    def __repr__(self) -> str:
        return f"PositionalEncoding({self.hidden_dim}, max_len={self.max_len})"
