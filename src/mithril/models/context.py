"""What an operator may read besides its inputs and parameters: the mode (training or
inference), randomness, and model state.

An operator that sets ``context = True`` receives a :class:`NodeContext` as the keyword
``ctx`` in ``forward`` (and as ``args["ctx"]`` in its NumPy ``vjp``; the same object, so the
backward pass sees the forward's mask and statistics).

**Mode.** ``ctx.training`` is a Python ``bool`` fixed for one evaluation (on JAX each mode is
its own jitted function): ``compile(..., inference=True)`` sets the default, ``evaluate(...,
training=...)`` overrides it per call.

**Randomness** is counter based: the bits of element ``i`` of a node's random array are a hash
of ``(seed, step, node, i)`` (:func:`random_bits`), computed with the same 32-bit integer
arithmetic on every backend, so a seed and a step give the same Dropout mask on NumPy, JAX and
torch, and a run is reproducible. ``seed`` is the compiled model's (the backend's seed when it
was compiled); ``step`` counts the training-mode evaluations (see
:meth:`mithril.CompiledModel.evaluate`). The node part is the CRC-32 of its path
(``"mlp.dropout_1"``), so two Dropout blocks draw different masks.

**State** (BatchNorm's running statistics) is a flat dict of arrays keyed
``"<node path>.<key>"``; an operator declares its keys with ``state_init`` / ``state_shapes``,
reads them with ``ctx.state(key)`` and writes the next values with ``ctx.update(key, value)``.
Nothing is changed in place: the evaluation returns the new state.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import KeyMismatchError

M32 = 0xFFFFFFFF
# the multipliers of a 32-bit integer hash (hash-prospector's two-round xorshift-multiply);
# both below 2**31, so a product with a 32-bit value fits in an int64 (torch has no uint32 math)
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
_GOLDEN = 0x9E3779B9


def mix32(x: Any, wraps: bool = False) -> Any:
    """A bijective 32-bit mixing function on Python ints and int64 arrays (NumPy, torch)
    holding values in [0, 2³²), and on uint32 arrays (JAX; ``wraps=True``: products wrap
    mod 2³² by themselves): the same bits on each."""
    x = x ^ (x >> 16)
    x = x * _C1 if wraps else (x * _C1) & M32
    x = x ^ (x >> 15)
    x = x * _C2 if wraps else (x * _C2) & M32
    return x ^ (x >> 15)


def random_bits(xp: Any, shape: tuple[int, ...], seed: Any, step: Any, salt: int,
                device: Any = None) -> Any:
    """32 random bits per element of ``shape``, a pure function of (seed, step, salt, index):
    ``mix32(mix32(i ^ k1) ^ k2)`` with ``k1 = mix32(seed ^ mix32(salt))`` and
    ``k2 = mix32(k1 ^ mix32(step ^ φ))`` (φ = 0x9E3779B9), ``i`` the row-major element index.
    int64 arrays on NumPy and torch, uint32 on JAX (``seed`` / ``step`` may be traced uint32
    scalars there); ``device``: the torch device to make them on."""
    from .operator import backend_of, torch_of

    n = int(np.prod(shape, dtype=np.int64))
    kind = backend_of(xp)
    if kind == "jax":
        import jax.numpy as jnp

        u32 = jnp.uint32
        seed, step = jnp.asarray(seed, u32), jnp.asarray(step, u32)
        idx = jnp.arange(n, dtype=u32)
        k1 = mix32(seed ^ u32(mix32(salt)), wraps=True)
        k2 = mix32(k1 ^ mix32(step ^ u32(_GOLDEN), wraps=True), wraps=True)
        return mix32(mix32(idx ^ k1, wraps=True) ^ k2, wraps=True).reshape(shape)
    else:
        seed, step = int(seed) & M32, int(step) & M32
        k1 = mix32(seed ^ mix32(salt))
        k2 = mix32(k1 ^ mix32(step ^ _GOLDEN))
        if kind == "torch":
            torch = torch_of(xp)
            idx = torch.arange(n, dtype=torch.int64, device=device)
        else:
            idx = np.arange(n, dtype=np.int64)
    return mix32(mix32(idx ^ k1) ^ k2).reshape(shape)


def keep_threshold(p: float) -> int:
    """Elements whose top 24 random bits are >= this are kept: P(drop) = round(p·2²⁴)/2²⁴."""
    return int(round(float(p) * (1 << 24)))


class RunContext:
    """One evaluation's mode, randomness and state; hands each context operator its
    :class:`NodeContext` (kept, so the NumPy backward pass reuses it)."""

    def __init__(self, training: bool = True, seed: Any = 0, step: Any = 0,
                 state: Mapping[str, Any] | None = None) -> None:
        self.training = bool(training)
        self.seed, self.step = seed, step
        self.state: Mapping[str, Any] = state if state is not None else {}
        self.new_state: dict[str, Any] = {}

    def node(self, path: str, state_names: Mapping[str, str], xp: Any) -> NodeContext:
        return NodeContext(self, path, state_names, xp)


class NodeContext:
    """What one operator sees of a :class:`RunContext` (see the module docstring)."""

    def __init__(self, run: RunContext, path: str, state_names: Mapping[str, str], xp: Any) -> None:
        self.run, self.path, self.names, self.xp = run, path, state_names, xp
        self.training = run.training
        self.salt = zlib.crc32(path.encode())

    def has_state(self, key: str) -> bool:
        return key in self.names and self.names[key] in self.run.state

    def state(self, key: str) -> Any:
        name = self.names.get(key, f"{self.path}.{key}")
        if name not in self.run.state:
            raise KeyMismatchError(f"{self.path}: state '{name}' is missing; pass "
                                   "evaluate(..., state=compiled.initial_state_dict)")
        return self.run.state[name]

    def update(self, key: str, value: Any) -> None:
        self.run.new_state[self.names[key]] = value

    def random_bits(self, like: Any) -> Any:
        """32 random bits per element of an array shaped (and placed) as ``like``."""
        from .operator import backend_of

        device = like.device if backend_of(self.xp) == "torch" else None
        return random_bits(self.xp, tuple(int(d) for d in like.shape), self.run.seed,
                           self.run.step, self.salt, device)

    def keep_mask(self, like: Any, p: float) -> Any:
        """A boolean array shaped as ``like``: each element True with probability 1 − p
        (to 2⁻²⁴)."""
        return (self.random_bits(like) >> 8) >= keep_threshold(p)
