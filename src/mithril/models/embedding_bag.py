"""``EmbeddingBag``, as ``torch.nn.EmbeddingBag`` / ``F.embedding_bag``: the sum, mean or
max of the embedding rows of each bag of indices, without materialising the lookups per bag.

Bags are the rows of a 2-D ``input`` (B, S), or runs of a 1-D ``input`` (M,) cut by
``offsets`` (B,) (bag b is input[offsets[b]:offsets[b + 1]], the last to the end), or with
``include_last_offset`` by offsets (B + 1,) (torch's CSR form, whose last entry is M; as
torch's kernels, forward and backward, the last entry is not read beyond its check ≤ M: the
last bag always runs to the end of the input). Entries equal to ``padding_idx`` are left out of their bag (not
summed, not counted by the mean, never the max); an empty bag gives zeros. "sum" may weight
each entry by ``per_sample_weights`` (input's shape; differentiable, as torch's). "max" is
per feature; its gradient goes to the bag's first maximal entry (torch's strict ``>``).

NumPy and JAX: a (B, M) membership matrix of the flattened entries (a matmul for sum and
mean, a masked argmax for max); torch runs ``F.embedding_bag``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputValueError, ShapeError
from .operator import Operator, Shape, backend_of, fmt, functional_of


class EmbeddingBag(Operator):
    """Reduced lookups of bags of indices into a learnable ``weight`` (num_embeddings,
    embedding_dim), N(0, 1) initialised (the padding row zeros), as torch's
    ``nn.EmbeddingBag(num_embeddings, embedding_dim, mode="mean", padding_idx=None,
    include_last_offset=False)`` (the semantics: the module docstring).

    Inputs: ``input``, integer indices in [0, num_embeddings), (B, S) or (M,); ``offsets``
    (integers, (B,) or (B + 1,)) when ``offsets=True`` (then ``input`` is 1-D; offsets[0] = 0,
    non-decreasing, at most M); ``per_sample_weights`` (``input``'s shape) when
    ``per_sample_weights=True`` (mode "sum" only, as torch). Output (B, embedding_dim).
    torch's ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` are not taken (use
    :class:`~mithril.models.layers.Embedding` and a reduction for those)."""

    param_init: Mapping[str, str] = {}

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean",
                 padding_idx: int | None = None, include_last_offset: bool = False,
                 offsets: bool = False, per_sample_weights: bool = False) -> None:
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"EmbeddingBag: {name} must be an int >= 1, got {v!r}")
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"EmbeddingBag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
        n = int(num_embeddings)
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                    or not -n <= padding_idx < n:
                raise ValueError(f"EmbeddingBag: padding_idx must be an int in [-{n}, {n - 1}] "
                                 f"(num_embeddings={n}), got {padding_idx!r}")
            padding_idx = int(padding_idx) % n
        for name, v in (("include_last_offset", include_last_offset), ("offsets", offsets),
                        ("per_sample_weights", per_sample_weights)):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"EmbeddingBag: {name} must be a bool, got {v!r}")
        if per_sample_weights and mode != "sum":
            raise ValueError(f"EmbeddingBag: per_sample_weights needs mode='sum' (as torch), "
                             f"got mode={mode!r}")
        if include_last_offset and not offsets:
            raise ValueError("EmbeddingBag: include_last_offset=True needs offsets=True")
        self.num_embeddings, self.embedding_dim, self.mode = n, int(embedding_dim), mode
        self.padding_idx, self.include_last_offset = padding_idx, bool(include_last_offset)
        self.use_offsets, self.use_weights = bool(offsets), bool(per_sample_weights)
        self.inputs = ("input", *(("offsets",) if offsets else ()),  # type: ignore[misc]
                       *(("per_sample_weights",) if per_sample_weights else ()))
        self.int_inputs = self.value_checked_inputs = frozenset(  # type: ignore[misc]
            ("input", "offsets") if offsets else ("input",))
        self.param_init = {"weight": "normal" if padding_idx is None
                           else f"normal_zero_row:{padding_idx}"}

    def param_shapes(self, shapes):
        return {"weight": (self.num_embeddings, self.embedding_dim)}

    def infer_shape(self, shapes):
        s, off, psw = shapes.get("input"), shapes.get("offsets"), shapes.get("per_sample_weights")
        if s is not None and len(s) != (1 if self.use_offsets else 2):
            raise ShapeError("EmbeddingBag: 'input' must be " + (
                "1-D (M,) with offsets" if self.use_offsets else
                "(B, S), one bag per row (offsets=True for a 1-D input)") + f", got {fmt(s)}")
        if off is not None and len(off) != 1:
            raise ShapeError(f"EmbeddingBag: 'offsets' must be 1-D, got {fmt(off)}")
        if psw is not None and s is not None and (len(psw) != len(s) or any(
                a is not None and b is not None and a != b for a, b in zip(psw, s))):
            raise ShapeError(f"EmbeddingBag: 'per_sample_weights' {fmt(psw)} must have "
                             f"'input''s shape {fmt(s)}")
        if self.use_offsets:
            if off is not None and self.include_last_offset and off[0] == 0:
                raise ShapeError("EmbeddingBag: 'offsets' [0] with include_last_offset: it needs "
                                 "B + 1 >= 1 entries")
            b = None if off is None or off[0] is None else off[0] - self.include_last_offset
        else:
            b = None if s is None else s[0]
        return (b, self.embedding_dim)

    def check_inputs(self, shapes: Mapping[str, Shape | None], dtypes: Mapping[str, str],
                     arrays: Mapping[str, Any], names: Mapping[str, str]) -> None:
        """Indices in [0, num_embeddings); offsets from 0, non-decreasing, at most M
        (an ``InputValueError`` naming the data key)."""
        get = lambda k: None if arrays.get(k) is None else np.asarray(  # noqa: E731
            arrays[k].cpu() if hasattr(arrays[k], "cpu") else arrays[k]).astype(np.int64)
        idx, off, n = get("input"), get("offsets"), self.num_embeddings
        if idx is not None and idx.size and (idx.min() < 0 or idx.max() >= n):
            raise InputValueError(f"EmbeddingBag: input '{names['input']}' holds index "
                                  f"{idx.min() if idx.min() < 0 else idx.max()}: indices must "
                                  f"be in [0, {n - 1}] (num_embeddings={n})")
        if off is None or not off.size:
            return
        m = (shapes.get("input") or (None,))[0]
        why = "offsets[0] must be 0" if off[0] != 0 else \
            "offsets must be non-decreasing" if (np.diff(off) < 0).any() else \
            f"offsets must be at most the input's length {m}" if m is not None and \
            off.max() > m else None
        if why:
            raise InputValueError(f"EmbeddingBag: offsets '{names['offsets']}' {off.tolist()}: "
                                  f"{why}")

    def _members(self, xp: Any, input: Any, offsets: Any) -> tuple[Any, Any]:
        """The flat indices (M,) and the (B, M) membership of each entry in each bag."""
        if offsets is None:
            b, s = input.shape
            flat, seg = input.reshape(-1), xp.repeat(xp.arange(b), s)
        else:
            starts = offsets[:-1] if self.include_last_offset else offsets
            b, flat = starts.shape[0], input
            seg = xp.searchsorted(starts, xp.arange(input.shape[0]), side="right") - 1
        member = seg[None, :] == xp.arange(b)[:, None]
        if self.padding_idx is not None:
            member = member & (flat != self.padding_idx)[None, :]
        return flat, member

    def _max(self, xp: Any, rows: Any, member: Any) -> tuple[Any, Any, Any]:
        if not rows.shape[0]:  # no entries at all (argmax of nothing): every bag empty, zeros
            return xp.zeros((member.shape[0], rows.shape[1]), dtype=rows.dtype), None, None
        w = xp.where(member[:, :, None], rows[None], -np.inf)  # (B, M, D)
        arg = xp.argmax(w, axis=1)  # the first maximum
        val = xp.take_along_axis(w, arg[:, None], axis=1)[:, 0]
        some = member.any(axis=1)[:, None]
        return xp.where(some, val, 0.0), arg, some

    def forward(self, xp: Any, input: Any, weight: Any, offsets: Any = None,
                per_sample_weights: Any = None) -> Any:
        F = functional_of(xp)
        if F is not None:
            return F.embedding_bag(input.long(), weight,
                                   None if offsets is None else offsets.long(),
                                   mode=self.mode, per_sample_weights=per_sample_weights,
                                   include_last_offset=self.include_last_offset,
                                   padding_idx=self.padding_idx)
        flat, member = self._members(xp, input, offsets)
        if backend_of(xp) != "numpy" and flat.dtype.itemsize < 4:
            flat = flat.astype("int32")
        rows = weight[flat]  # (M, D)
        if self.mode == "max":
            return self._max(xp, rows, member)[0]
        if per_sample_weights is not None:
            rows = rows * per_sample_weights.reshape(-1)[:, None]
        out = member.astype(rows.dtype) @ rows
        if self.mode == "mean":
            out = out / xp.maximum(member.sum(axis=1), 1)[:, None].astype(rows.dtype)
        return out

    def vjp(self, g, out, args, wrt):
        w = args["weight"]
        flat, member = self._members(np, args["input"], args.get("offsets"))
        rows, m = w[flat], member.astype(w.dtype)
        grads: dict[str, np.ndarray] = {}
        if self.mode == "max":
            _, arg, some = self._max(np, rows, member)
            grows = np.zeros_like(rows)
            if arg is not None:
                np.add.at(grows, (arg, np.arange(w.shape[1])[None, :]), np.where(some, g, 0.0))
        else:
            if self.mode == "mean":
                g = g / np.maximum(member.sum(axis=1), 1)[:, None]
            grows = m.T @ g  # (M, D)
            psw = args.get("per_sample_weights")
            if psw is not None:
                if "per_sample_weights" in wrt:
                    grads["per_sample_weights"] = (grows * rows).sum(-1).reshape(psw.shape)
                grows = grows * psw.reshape(-1)[:, None]
        if "weight" in wrt:
            gw = np.zeros_like(w)
            np.add.at(gw, flat, grows)
            grads["weight"] = gw
        return grads

    def __repr__(self) -> str:
        return (f"EmbeddingBag({self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, "
                f"padding_idx={self.padding_idx}, include_last_offset={self.include_last_offset})")

