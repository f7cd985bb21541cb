"""Layers with parameters (Linear, Embedding, LayerNorm) and reshaping (Flatten)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import elementwise_kernels
from .half_precision import float32_forward, float32_vjp
from .operator import Operator, ShapeError, backend_of, fmt, functional_of, stop_gradient


def _last_dim(shapes, who: str) -> int | None:
    s = shapes.get("input")
    if s is None:
        return None
    if len(s) == 0:
        raise ShapeError(f"{who}: 'input' must have rank >= 1, got shape {fmt(s)}")
    return s[-1]


#: torch.nn.Linear's arguments that are not ours: what instead
TORCH_LINEAR = {"bias": "ours is use_bias, a bool", "out_features": "ours is dimension",
                "in_features": "read from the input's shape",
                "device": "the backend places the arrays", "dtype": "the backend's dtype is used"}


class Linear(Operator):
    """y = x·Wᵀ + b with ``weight`` of shape (dimension, in_features) (torch layout) and
    ``bias`` of shape (dimension,). Weight init: Glorot uniform; bias: zeros.

    ``dimension=None`` (the published ``Linear()``): the width is the first axis of the
    weight, else of the bias, where either is a connection whose shape the compiler knows
    (``connect(weight="w")`` with ``compile(shapes={"w": ...})``, ``IOKey("b", shape=[3])``);
    nothing giving it is a :class:`~mithril.ShapeError` at compile."""

    param_init = {"weight": "glorot", "bias": "zeros"}
    vjp_ignores = frozenset({"output"})
    fresh_output = True
    positional = ("input", "weight", "output")  # (the published Linear.connect's)
    #: without a dimension, an unknown width is refused at compile (not left to later rules)
    width_required = True

    def __init__(self, dimension: int | None = None, use_bias: bool = True,
                 **torch_only: Any) -> None:
        if torch_only:  # torch.nn.Linear's names: say ours (not Python's "unexpected keyword")
            name = next(iter(torch_only))
            instead = TORCH_LINEAR.get(name, "not an argument of Linear")
            raise TypeError(f"Linear: no {name}= argument ({instead})")
        if dimension is not None and (not isinstance(dimension, int)
                                      or isinstance(dimension, bool) or dimension <= 0):
            raise ValueError(f"Linear: dimension must be a positive int or None, got "
                             f"{dimension!r}")
        if not isinstance(use_bias, (bool, np.bool_)):  # "no" or None: not read as truthiness
            raise TypeError(f"Linear: use_bias must be a bool, got {use_bias!r}")
        self.dimension = dimension
        self.use_bias = bool(use_bias)

    def _width(self, shapes: Mapping[str, Any]) -> int | None:
        """``dimension``, else the first axis of a weight or bias connection's known shape."""
        if self.dimension is not None:
            return self.dimension
        for key in ("weight", "bias"):
            s = shapes.get(key)
            if s and s[0] is not None:
                return s[0]
        return None

    def param_shapes(self, shapes):
        d_in, d_out = _last_dim(shapes, "Linear"), self._width(shapes)
        if d_out is None and d_in is not None and self.width_required:
            wired = [k for k in ("weight", "bias") if k in shapes]
            raise ShapeError(
                "Linear() has no dimension, and " + (
                    f"the shape of its {' and '.join(wired)} connection is unknown: declare "
                    f"it (compile(shapes=...) or IOKey(shape=...))" if wired else
                    "its weight is not a connection whose shape gives it: give "
                    "Linear(dimension), or connect weight= (or bias=) with a known shape"))
        out = {} if d_in is None or d_out is None else {"weight": (d_out, d_in)}
        if d_in is None and d_out is not None and "weight" in shapes:  # (a weight connection
            out["weight"] = (d_out, None)  # checked against the width before the input is known)
        if self.use_bias and d_out is not None:
            out["bias"] = (d_out,)
        return out

    def infer_shape(self, shapes):
        s = shapes.get("input")
        return None if s is None else (*s[:-1], self._width(shapes))

    def forward(self, xp: Any, input: Any, weight: Any, bias: Any = None) -> Any:
        if xp is np:  # one 2-D matmul (not one per leading index), the bias added in place
            y = _rows(input) @ weight.T
            if bias is not None:
                elementwise_kernels.add_rows(y, bias)
            # the width itself, not -1: ambiguous (refused) when a leading axis is 0
            return y if input.ndim == 2 else y.reshape(*input.shape[:-1], y.shape[-1])
        F = functional_of(xp)
        if F is not None:  # one addmm (bias fused), as torch.nn.Linear
            return F.linear(input, weight, bias)
        y = input @ weight.T
        return y if bias is None else y + bias

    def vjp(self, g, out, args, wrt):
        x, w = args["input"], args["weight"]
        res = {}
        g2 = _rows(g)
        if "input" in wrt:  # 2-D: the matmul's own array, not a view (a ReLU may reuse it)
            gx = g2 @ w
            res["input"] = gx if g.ndim == 2 else gx.reshape(*g.shape[:-1], gx.shape[-1])
        if "weight" in wrt:
            res["weight"] = g2.T @ _rows(x)
        if "bias" in wrt:
            res["bias"] = elementwise_kernels.column_sums(g2)
        return res

    def __repr__(self) -> str:
        return f"Linear({self.dimension}, use_bias={self.use_bias})"


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` as a matrix of rows (..., n) -> (rows, n); a 2-D array as itself."""
    return a if a.ndim == 2 else a.reshape(-1, a.shape[-1])


class Embedding(Operator):
    """Row lookup ``weight[input]``: integer indices (...) -> (..., dim), as
    ``torch.nn.Embedding``. Init: N(0, 1).

    ``padding_idx`` (as torch's; a negative one counts from the end): that row starts at
    zeros and gets no gradient, so it stays what it is set to (the lookup itself is
    unchanged).

    ``max_norm`` m (> 0) with ``norm_type`` p (> 0, ``inf`` allowed; 2 by default): each
    looked-up row r whose p-norm exceeds m is returned as r · m / (‖r‖_p + 1e-7), as torch's
    ``embedding_renorm_``; the weight's gradient is torch's, the plain lookup's (no term
    through the rescaling). **Side effect:** torch rescales those rows of the weight itself,
    in place, before the lookup; a compiled model leaves its parameters alone.
    :meth:`renormed_weight` gives the weight torch would hold after the forward pass: apply
    it before the optimizer step (``w ← renormed_weight(w, indices) − lr · grad``) for
    torch's training trajectory.

    ``scale_grad_by_freq``: the gradient of row k is divided by the number of times k occurs
    in ``input`` (the whole batch), as torch's.

    ``sparse=True`` (torch's sparse COO gradient) is refused by name: every backend here
    keeps gradients as dense arrays of the parameter's shape (the optimizers, accumulation
    and checkpoints read them so); the dense gradient has the same values."""

    int_inputs = frozenset({"input"})
    #: the compiler passes this (when it is a model input) to check_inputs
    value_checked_inputs = frozenset({"input"})

    def __init__(self, num_embeddings: int, dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False) -> None:
        self.num_embeddings, self.dim = num_embeddings, dim
        if padding_idx is not None:
            n = num_embeddings
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) \
                    or not -n <= padding_idx < n:
                raise ValueError(f"Embedding: padding_idx must be an int in [-{n}, {n - 1}] "
                                 f"(num_embeddings={n}), got {padding_idx!r}")
            padding_idx = int(padding_idx) % n
        self.padding_idx = padding_idx
        number = (int, float, np.integer, np.floating)
        if max_norm is not None and (isinstance(max_norm, (bool, np.bool_)) or not isinstance(
                max_norm, number) or not 0 < max_norm < math.inf):
            raise ValueError(f"Embedding: max_norm must be a finite number > 0 or None, got "
                             f"{max_norm!r}")
        if isinstance(norm_type, (bool, np.bool_)) or not isinstance(norm_type, number) \
                or not norm_type > 0:
            raise ValueError(f"Embedding: norm_type must be a number > 0 (inf: the max norm), "
                             f"got {norm_type!r}")
        if not isinstance(scale_grad_by_freq, (bool, np.bool_)):
            raise ValueError(f"Embedding: scale_grad_by_freq must be a bool, got "
                             f"{scale_grad_by_freq!r}")
        if sparse is not False:
            raise ValueError(f"Embedding: sparse must be False, got {sparse!r}: gradients are "
                             f"dense arrays of the weight's shape on every backend (torch's "
                             f"sparse gradient has the same values)")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.norm_type, self.scale_grad_by_freq = float(norm_type), bool(scale_grad_by_freq)

    @property
    def param_init(self) -> dict[str, str]:  # type: ignore[override]
        """N(0, 1); the padding row zeros (as torch)."""
        if self.padding_idx is None:
            return {"weight": "normal"}
        return {"weight": f"normal_zero_row:{self.padding_idx}"}

    def check_inputs(self, shapes: Any, dtypes: Any, arrays: Any, names: Any) -> None:
        """Indices in ``[0, num_embeddings)`` (a ``ValueError`` naming the data key; called by
        ``evaluate`` on concrete inputs; reads only the min and the max)."""
        idx, n = arrays.get("input"), self.num_embeddings
        if idx is None or not math.prod(idx.shape):
            return
        if hasattr(idx, "aminmax"):
            from .losses import _torch_reducible

            idx = _torch_reducible(idx)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"input '{names['input']}': embedding index {hi if hi >= n else lo} "
                             f"out of range: {n} embeddings, so indices must be in [0, {n - 1}]")

    def param_shapes(self, shapes):
        return {"weight": (self.num_embeddings, self.dim)}

    def infer_shape(self, shapes):
        s = shapes.get("input")
        return None if s is None else (*s, self.dim)

    def forward(self, xp: Any, input: Any, weight: Any) -> Any:
        F, kind = functional_of(xp), backend_of(xp)
        if F is not None:  # its backward accumulates rows (embedding_dense_backward)
            t = xp.t
            out = F.embedding(input if input.dtype in (t.int64, t.int32) else input.long(),
                              weight, padding_idx=self.padding_idx,
                              scale_grad_by_freq=self.scale_grad_by_freq)
        else:
            if input.dtype.itemsize < 4:  # JAX's index normalisation would build n in that dtype
                input = input.astype("int32")
            n = weight.shape[0]  # (indices computed by the model: a data input is checked first)
            if kind == "numpy" and input.size and (input.min() < 0 or input.max() >= n):
                bad = int(input.min()) if input.min() < 0 else int(input.max())
                raise IndexError(f"Embedding: index {bad} is out of range for {n} embeddings "
                                 f"(indices must be in [0, {n - 1}], as torch's)")
            # JAX cannot raise under jit: a row out of range (-1 too) is NaN, not wrapped / clamped
            out = weight.at[xp.where(input < 0, n, input)].get(mode="fill", fill_value=xp.nan) \
                if kind == "jax" else weight[input]
            if self.scale_grad_by_freq and kind == "jax":  # the same values, gradient / count
                count = xp.zeros(weight.shape[0], out.dtype).at[input.reshape(-1)].add(1)
                out = stop_gradient(xp, out) + (out - stop_gradient(xp, out)) \
                    * (1 / count[input])[..., None]
            if self.padding_idx is not None and kind == "jax":
                # the same values, but the padding row's lookups send no gradient back
                out = xp.where((input == self.padding_idx)[..., None], stop_gradient(xp, out), out)
        if self.max_norm is None:
            return out
        if kind == "numpy":
            return self._renormed(kind, out)
        # the renormed values, the gradient of the lookup (out − out is 0 exactly), as torch's
        return stop_gradient(xp, self._renormed(kind, out)) + (out - stop_gradient(xp, out))

    def _renormed(self, kind: str, rows: Any) -> Any:
        """``rows`` (..., dim) scaled by m / (‖row‖_p + 1e-7) where ‖row‖_p > m = max_norm."""
        m, p = self.max_norm, self.norm_type
        if kind == "torch":
            import torch

            norm, where = torch.linalg.vector_norm(rows, p, dim=-1, keepdim=True), torch.where
        else:
            lib: Any = np
            if kind == "jax":
                import jax.numpy as lib
            norm, where = lib.linalg.norm(rows, ord=p, axis=-1, keepdims=True), lib.where
        return where(norm > m, rows * (m / (norm + 1e-7)), rows)

    def renormed_weight(self, weight: Any, input: Any) -> Any:
        """The weight torch's ``Embedding(max_norm=...)`` holds after a forward pass on the
        indices ``input``: the looked-up rows whose norm exceeds ``max_norm`` rescaled (see
        the class), the others as they are. A new array of ``weight``'s kind (NumPy, JAX or
        torch); nothing is changed in place."""
        if self.max_norm is None:
            raise ValueError("Embedding: renormed_weight needs max_norm (this block has none)")
        kind = type(weight).__module__.split(".")[0]
        kind = kind if kind in ("torch", "jax", "jaxlib") else "numpy"
        kind = "jax" if kind == "jaxlib" else kind
        n = self.num_embeddings
        if tuple(weight.shape) != (n, self.dim):
            raise ShapeError(f"Embedding: renormed_weight: 'weight' must be ({n}, {self.dim}), "
                             f"got shape {tuple(weight.shape)}")
        idx = input.reshape(-1)
        if kind == "torch":
            import torch

            idx = torch.as_tensor(idx, device=weight.device).long()
        if idx.shape[0] and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"Embedding: renormed_weight: indices must be in [0, {n - 1}], got "
                             f"{int(idx.min()) if int(idx.min()) < 0 else int(idx.max())}")
        if kind == "torch":
            used = torch.bincount(idx, minlength=n)[:, None] > 0
            return torch.where(used, self._renormed(kind, weight.detach()), weight.detach())
        if kind == "jax":
            import jax.numpy as jnp

            used = jnp.zeros((n, 1), bool).at[idx].set(True)
            return jnp.where(used, self._renormed(kind, weight), weight)
        used = np.bincount(np.asarray(idx, dtype=np.int64), minlength=n)[:, None] > 0
        return np.where(used, self._renormed(kind, weight), weight)

    def vjp(self, g, out, args, wrt):
        w, idx = args["weight"], args["input"].reshape(-1)
        rows = g.reshape(-1, w.shape[1])
        if self.scale_grad_by_freq:  # torch: each lookup's gradient times 1 / its row's count
            rows = rows * (1 / np.bincount(idx, minlength=w.shape[0])[idx])[:, None]
        gw = np.zeros_like(w)
        np.add.at(gw, idx, rows)
        if self.padding_idx is not None:
            gw[self.padding_idx] = 0
        return {"weight": gw}

    def __repr__(self) -> str:
        opts = {"padding_idx": self.padding_idx, "max_norm": self.max_norm,
                "norm_type": None if self.norm_type == 2.0 else self.norm_type,
                "scale_grad_by_freq": self.scale_grad_by_freq or None}
        extra = "".join(f", {k}={v!r}" for k, v in opts.items() if v is not None)
        return f"Embedding({self.num_embeddings}, {self.dim}{extra})"


class LayerNorm(Operator):
    """(x − mean) / √(var + eps) · weight + bias over the last axis (biased variance, as torch).

    ``normalized_shape`` (torch's; an int or a tuple of ints): normalise over that many
    trailing axes, which must have those sizes (a ``ShapeError`` at compile time otherwise),
    with ``weight`` and ``bias`` of that shape, as ``nn.LayerNorm(normalized_shape)``. None
    (the default): the last axis, its size taken from the input."""

    param_init = {"weight": "ones", "bias": "zeros"}
    vjp_ignores = frozenset({"input", "output"})  # x̂ and 1/σ are the residuals

    def __init__(self, eps: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
                 normalized_shape: int | tuple[int, ...] | None = None) -> None:
        from .norms import check_eps  # (why: eps=None failed inside the forward, and a
        check_eps(eps, "LayerNorm")  # negative one gave NaN outputs)
        self.eps, self.use_scale, self.use_bias = eps, use_scale, use_bias
        if normalized_shape is not None:
            dims = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) \
                else normalized_shape
            if not isinstance(dims, (tuple, list)) or not dims or not all(
                    isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                    for d in dims):
                raise ValueError(f"LayerNorm: normalized_shape must be a positive int or a "
                                 f"non-empty tuple of them, got {normalized_shape!r}")
            normalized_shape = tuple(int(d) for d in dims)
        self.normalized_shape = normalized_shape

    def _shape(self, shapes) -> tuple[int | None, ...] | None:
        """The normalised trailing shape (None entries: not known yet), or None."""
        if self.normalized_shape is None:
            d = _last_dim(shapes, "LayerNorm")
            return None if d is None else (d,)
        s, want = shapes.get("input"), self.normalized_shape
        if s is None:
            return want
        if len(s) < len(want) or any(a is not None and a != b
                                     for a, b in zip(s[len(s) - len(want):], want)):
            raise ShapeError(f"LayerNorm: 'input' of shape {fmt(s)} does not end in "
                             f"normalized_shape {want}")
        return want

    def _axes(self, ndim: int) -> tuple[int, ...]:
        k = 1 if self.normalized_shape is None else len(self.normalized_shape)
        return tuple(range(ndim - k, ndim))

    def param_shapes(self, shapes):
        d = self._shape(shapes)
        if d is None:
            return {}
        return {k: d for k, on in (("weight", self.use_scale), ("bias", self.use_bias)) if on}

    def infer_shape(self, shapes):
        """The input's shape; rank 0 is a ShapeError (there is no last axis to normalise):
        without scale and bias no parameter shape checks it, and the backends failed deep
        inside (NumPy's AxisError, an IndexError on JAX and torch)."""
        self._shape(shapes)
        return shapes.get("input")

    def _normalise(self, xp: Any, x: Any) -> tuple[Any, Any]:
        axes = self._axes(x.ndim)
        mu = xp.mean(x, axis=axes, keepdims=True)
        xc = x - mu
        inv = 1 / xp.sqrt(xp.mean(xc * xc, axis=axes, keepdims=True) + self.eps)
        return xc * inv, inv

    @float32_forward
    def forward(self, xp: Any, input: Any, weight: Any = None, bias: Any = None) -> Any:
        F = functional_of(xp)
        if F is not None:  # one kernel each way
            k = len(self._axes(input.ndim))
            shape = tuple(input.shape[-k:])
            if any(w is not None and w.dtype != input.dtype for w in (weight, bias)):
                # (torch refuses mixed dtypes; NumPy and JAX promote after normalising)
                y = F.layer_norm(input, shape, None, None, self.eps)
                y = y if weight is None else y * weight
                return y if bias is None else y + bias
            return F.layer_norm(input, shape, weight, bias, self.eps)
        return self.forward_residuals(xp, input, weight, bias)[0]

    @float32_forward
    def forward_residuals(self, xp: Any, input: Any, weight: Any = None,
                          bias: Any = None) -> tuple[Any, Any]:
        """The output and ``(x̂, 1/σ)``, which the NumPy VJP reuses."""
        xhat, inv = self._normalise(xp, input)
        y = xhat if weight is None else xhat * weight
        return (y if bias is None else y + bias), (xhat, inv)

    @float32_vjp
    def vjp(self, g, out, args, wrt, residuals=None):
        xhat, inv = residuals if residuals is not None else self._normalise(np, args["input"])
        axes = self._axes(g.ndim)
        lead = tuple(range(axes[0]))
        res = {}
        if "weight" in wrt:
            res["weight"] = (g * xhat).sum(axis=lead)
        if "bias" in wrt:
            res["bias"] = g.sum(axis=lead)
        if "input" in wrt:
            gx = g * args["weight"] if "weight" in args else g
            res["input"] = inv * (gx - gx.mean(axis=axes, keepdims=True)
                                  - xhat * (gx * xhat).mean(axis=axes, keepdims=True))
        return res

    def __repr__(self) -> str:
        shape = "" if self.normalized_shape is None else \
            f", normalized_shape={self.normalized_shape}"
        return (f"LayerNorm(eps={self.eps}, use_scale={self.use_scale}, "
                f"use_bias={self.use_bias}{shape})")


class Flatten(Operator):
    """Merge dimensions ``start_dim`` .. ``end_dim`` (inclusive; negative counts from the end)
    into one, as ``torch.flatten``. The default keeps the batch axis (``start_dim=1``; the
    published Mithril's is 0: see docs/mithril-compat.md)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def _span(self, ndim: int) -> tuple[int, int]:
        n = max(ndim, 1)  # (torch: a 0-d input's axes are [-1, 0])
        lo = self.start_dim + n if self.start_dim < 0 else self.start_dim
        hi = self.end_dim + n if self.end_dim < 0 else self.end_dim
        if not (0 <= lo < n and 0 <= hi < n) or lo > hi:
            raise ShapeError(f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim}) does not "
                             f"fit an input of {ndim} dimensions")
        return lo, hi + 1

    def infer_shape(self, shapes):
        s = shapes.get("input")
        if s is None:
            return None
        lo, hi = self._span(len(s))
        if len(s) == 0:
            return (1,)
        mid = s[lo:hi]
        n = None if any(d is None for d in mid) else int(np.prod(mid, dtype=np.int64))
        return (*s[:lo], n, *s[hi:])

    def forward(self, xp: Any, input: Any) -> Any:
        lo, hi = self._span(input.ndim)
        if input.ndim == 0:
            return input.reshape((1,))
        # the merged size itself, not -1: -1 is ambiguous when another axis is 0 (an empty
        # batch: NumPy, JAX and torch refuse it), where torch.flatten gives (0, C·H·W)
        n = math.prod(int(d) for d in input.shape[lo:hi])
        return input.reshape((*input.shape[:lo], n, *input.shape[hi:]))

    def vjp(self, g, out, args, wrt):
        return {"input": g.reshape(args["input"].shape)}
