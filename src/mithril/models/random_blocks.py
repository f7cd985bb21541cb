"""The published ``Randn`` and ``RandInt``: random arrays of a static shape, drawn as Dropout's
masks are (:mod:`mithril.models.context`), so a seed gives the same numbers on NumPy, JAX and
torch.

Each element takes two 32-bit draws of the counter-based hash, ``b1`` and ``b2``:

* ``Randn``: u_k = (⌊b_k / 2⁸⌋ + ½) / 2²⁴ ∈ (0, 1), z = √(−2 ln u₁) · cos(2π u₂) (Box-Muller),
  N(0, 1), in ``dtype`` (default: the model's float dtype);
* ``RandInt(low, high)``: low + b₁ mod (high − low), an integer in [low, high) (int64; int32
  on JAX without x64; or ``dtype``); the modulo's bias is below (high − low) / 2³².

``key=<int>``: the draws are a function of the key alone (the same array at every step and
in every model, as the backend's ``randn(key=...)``). Without a key (the published ``TBD``, a
state key there) they are a function of the compiled model's seed, its step and the block's
path, as a Dropout mask: a training-mode ``evaluate`` advances the step, ``evaluate(...,
step=n)`` picks one (an inference-mode ``evaluate`` does not advance it: the published
advances its key state in both modes). ``shape`` holds ints and shape wires (``x.shape[0]``),
in the constructor or in ``connect(shape=...)``, as published. No gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .connection_types import TBD
from .connections import IOKey
from .context import random_bits
from .operator import backend_of, torch_of
from .tensor_creation import _dtype_name, _Sized

#: the salts of a keyed draw's two streams (a keyed block's bits do not depend on its path)
_KEYED, _SECOND = 0x6B657931, 0x5BD1E995


def _key(key: Any, who: str) -> int | None:
    if key is None or key is TBD:
        return None
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) or key < 0:
        raise TypeError(f"{who}: key must be an int >= 0 (or TBD: the model's seed and step), "
                        f"got {key!r}")
    return int(key)


class _Random(_Sized):
    context = True
    random = True
    positional = ("shape", "dtype", "output")
    inputs: tuple = ()
    _kinds: tuple[str, ...]

    def _configure(self, shape: Any, dtype: Any) -> None:
        who = type(self).__name__
        self.dtype = _dtype_name(dtype, who)
        if self.dtype is not None and self.dtype not in self._kinds:
            raise TypeError(f"{who}: dtype must be one of {self._kinds}, got {dtype!r}")
        self._float_like = IOKey(value=np.zeros(()))
        # (the float constant gives the model's dtype, and on torch its device)
        self._set_shape(shape, who, self._float_like)
        self.inputs = tuple(self.shape_args.keys) if self.shape_args is not None else ()
        self.any_dtype_inputs = frozenset(self.inputs)

    def infer_shape(self, shapes):
        return self._target(shapes)

    def _bits(self, xp: Any, shape: tuple, ctx: Any, like: Any, second: bool) -> Any:
        device = like.device if backend_of(xp) == "torch" else None
        if self.key is not None:
            seed, step, salt = self.key, 0, _KEYED
        else:
            seed, step, salt = ctx.run.seed, ctx.run.step, ctx.salt
        return random_bits(xp, shape, seed, step, salt ^ (_SECOND if second else 0), device)

    def vjp(self, g, out, args, wrt):
        return {}


class Randn(_Random):
    """Standard normal draws of ``shape`` (see the module): ``Randn(shape=(2, 3))``,
    ``Randn(key=4)``, ``Randn().connect(shape=(x.shape[0], 1, 8), output="noise")``."""

    _kinds = ("float16", "bfloat16", "float32", "float64")

    def __init__(self, shape: Sequence[Any] | None = None, key: int | None = None,
                 dtype: Any = None) -> None:
        self.key = _key(key, "Randn")
        self._configure(shape, dtype)

    @property
    def output_dtype(self) -> str | None:
        return self.dtype

    def forward(self, xp: Any, *, ctx: Any, **refs: Any) -> Any:
        shape = self._run_shape(refs)
        like = refs["float_like0"]
        name = self.dtype or str(like.dtype).rsplit(".", 1)[-1]
        b1, b2 = (self._bits(xp, shape, ctx, like, s) for s in (False, True))
        t = torch_of(xp)
        if t is not None:
            u1, u2 = (((b >> 8).to(t.float64) + 0.5) / 2.0 ** 24 for b in (b1, b2))
            z = t.sqrt(-2.0 * t.log(u1)) * t.cos(2.0 * np.pi * u2)
            return z.to(getattr(t, name))
        # JAX: float64 only under x64; a half dtype cannot hold 2**24 (float16: inf) nor the
        # uniforms' 24 bits (bfloat16: log(1) = 0), so those draw in float32 and round once
        f = np.float64 if xp is np else like.dtype if like.dtype.itemsize >= 4 else np.float32
        u1, u2 = (((b >> 8).astype(f) + 0.5) / 2.0 ** 24 for b in (b1, b2))
        z = xp.sqrt(-2.0 * xp.log(u1)) * xp.cos(2.0 * np.pi * u2)
        if name == "bfloat16" and xp is np:
            import ml_dtypes

            return z.astype(ml_dtypes.bfloat16)
        return z.astype(name)

    def __repr__(self) -> str:
        return f"Randn({self.shape!r}, key={self.key!r}" + (
            f", dtype={self.dtype!r})" if self.dtype else ")")


class RandInt(_Random):
    """Integers in [low, high) of ``shape`` (see the module): ``RandInt((3, 4), low=0,
    high=10)``; ``low`` / ``high`` are ints, in the constructor or in ``connect``."""

    _kinds = ("int32", "int64")
    positional = ("shape", "low", "high", "dtype", "output")

    def __init__(self, shape: Sequence[Any] | None = None, key: int | None = None,
                 low: int | None = None, high: int | None = None, dtype: Any = None) -> None:
        self.key = _key(key, "RandInt")
        self._bounds(low, high)
        self._configure(shape, dtype)

    def _bounds(self, low: Any, high: Any) -> None:
        for v, what in ((low, "low"), (high, "high")):
            if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
                raise TypeError(f"RandInt: {what} must be an int, got {v!r}")
        if low is not None and high is not None and not 0 < high - low <= 2 ** 31:
            raise ValueError(f"RandInt: needs low < high (a range of at most 2**31), got "
                             f"low={low}, high={high}")
        self.low = None if low is None else int(low)
        self.high = None if high is None else int(high)

    def connect(self, *args: Any, **connections: Any) -> Any:
        """As published: ``connect(shape, low, high, dtype, output)``; ``low`` / ``high`` are
        ints set here (a connection for them is refused: they are static)."""
        for key, v in zip(self.positional, args, strict=False):
            if key in connections:
                raise TypeError(f"RandInt.connect got two values for {key!r}")
            connections[key] = v
        if len(args) > len(self.positional):
            raise TypeError(f"RandInt.connect takes at most {len(self.positional)} positional "
                            f"connections {self.positional}, got {len(args)}")
        before = (self.low, self.high)
        low, high = connections.pop("low", self.low), connections.pop("high", self.high)
        self._bounds(low, high)
        try:
            return super().connect(**connections)
        except BaseException:
            self.low, self.high = before
            raise

    @property
    def output_dtype(self) -> str:
        return self.dtype or "int64"

    def forward(self, xp: Any, *, ctx: Any, **refs: Any) -> Any:
        if self.low is None or self.high is None:
            raise TypeError("RandInt: low and high are not given: RandInt(shape, low=..., "
                            "high=...) or connect(low=..., high=...)")
        shape = self._run_shape(refs)
        bits = self._bits(xp, shape, ctx, refs["float_like0"], False)
        n, t = self.high - self.low, torch_of(xp)
        if t is not None:
            return (bits % n + self.low).to(getattr(t, self.dtype or "int64"))
        if xp is np:
            return (bits % n + self.low).astype(self.dtype or np.int64)
        import jax  # (uint32 bits: the modulo in uint32, then signed)
        import jax.numpy as jnp

        dtype = self.dtype or jax.dtypes.canonicalize_dtype(jnp.int64)
        return (bits % jnp.uint32(n)).astype(dtype) + self.low

    def infer_shape(self, shapes):
        if self.low is None or self.high is None:
            raise TypeError("RandInt: low and high are not given: RandInt(shape, low=..., "
                            "high=...) or connect(low=..., high=...)")
        return self._target(shapes)

    def __repr__(self) -> str:
        return f"RandInt({self.shape!r}, key={self.key!r}, low={self.low!r}, high={self.high!r})"
