"""The jitted JAX engine's state slots, kept in chunks of the flat layout.

XLA's CPU compiler does not fuse a concatenate into the loop that reads it. Over flat slots,
an update first copies every parameter and gradient into flat buffers, then slices the new
parameters back out, at ~3-10 ns an element more than optax's per-leaf update (fp32 Adam, 1M
params in 10 tensors: 2.6 ms against 1.0; 10M in 200: 104 ms against 19). Per tensor
instead, each tensor costs XLA's CPU runtime ~25 µs of per-loop overhead (three loops for
Adam), which the copies of a small tensor do not (1M params in 200 tensors: 6.2 ms per
tensor, 5.8 flat; 400k in 200: 5.4 and 4.6). So on CPU a tensor of :data:`CHUNK_MIN`
elements or more is a chunk of its own (its update reads and writes its own buffers, as
optax's does), and all the smaller ones together are one more chunk, concatenated as
before. On GPUs XLA fuses the concatenate into the update (an H200: 0.60x optax's time on
10M params in 10 tensors), so there the whole layout is one chunk.

:class:`ChunkedSlots` is what ``state.slots`` then holds. It is a mapping of slot name to
flat buffer like any state's slots. Reading a slot joins its chunks (once; the result is
kept). The engine's first step with a flat slot splits it into chunks. A slot that is
written (``slots[name] = flat``) is held flat again until then.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np

#: on CPU, a tensor with this many elements or more is updated in its own buffers
CHUNK_MIN = 1 << 13
#: elsewhere, at most this many tensors a chunk (consecutive in the layout), None: one chunk
#: of every tensor. ``MITHRIL_JAX_CHUNK_TENSORS`` sets it: a measuring knob. On an H200 one
#: chunk ran 10M params in 10 tensors at 0.60x optax's time, but in 200 tensors at ~5x; is
#: the one fusion's 200-way concatenate the cost? (Not measured yet: no GPU since.)
CHUNK_TENSORS = int(os.environ.get("MITHRIL_JAX_CHUNK_TENSORS", "0")) or None

#: a chunk: its tensors' (index, start, stop) in the flat layout, in layout order
Chunk = tuple[tuple[int, int, int], ...]


def chunk_bounds(layout: Any, platform: str) -> tuple[Chunk, ...]:
    """The chunks of ``layout`` (aligned to 1 element) on ``platform``: on CPU each tensor
    of :data:`CHUNK_MIN` elements or more, then all the smaller ones (wherever they lie),
    if any; elsewhere one chunk of every tensor (runs of :data:`CHUNK_TENSORS` if set)."""
    spans = [(i, a, b) for i, (_, a, b, _) in enumerate(layout.spans())]
    if platform != "cpu":
        k = CHUNK_TENSORS
        if k is None or len(spans) <= k:
            return (tuple(spans),)
        return tuple(tuple(spans[i:i + k]) for i in range(0, len(spans), k))
    big = tuple((s,) for s in spans if s[2] - s[1] >= CHUNK_MIN)
    small = tuple(s for s in spans if s[2] - s[1] < CHUNK_MIN)
    return big + (small,) if small or not big else big


_SPLIT: dict[tuple, Any] = {}
_JOIN: dict[tuple, Any] = {}


def _host_device(x: Any) -> Any:
    """The CPU device ``x`` lies on, or None (several devices, an accelerator, or not a
    JAX array: a NumPy array a user wrote into the slots takes the jitted path)."""
    devices = x.devices() if hasattr(x, "devices") else ()
    if len(devices) != 1:
        return None
    (d,) = devices
    return d if d.platform == "cpu" else None


def _placed(x: Any, dev: Any) -> Any:
    """Where a copy of ``x`` goes: ``dev`` if ``x`` is committed to it, else None (the
    default device, uncommitted, as the step's own outputs are then: a committed input
    would be another signature for the jitted step, one more compile)."""
    return dev if getattr(x, "_committed", True) else None


def split(bounds: tuple[Chunk, ...], flat: Any) -> tuple[Any, ...]:
    """The chunks ``bounds`` of the flat buffer ``flat``, as new arrays. On the host they
    are copied out of a NumPy view of its buffer: XLA's CPU compiler spent 2.8 s on the
    jitted split of 200 chunks (one loop per output), longer than the step's own program
    (1.6 s), where the copies take milliseconds."""
    import jax

    dev = _host_device(flat)
    if dev is None:
        return _splitter(bounds)(flat)
    host, to = np.asarray(flat), _placed(flat, dev)  # (a view of the buffer)
    return tuple(jax.device_put(host[c[0][1]:c[0][2]] if len(c) == 1 else
                                np.concatenate([host[a:b] for _, a, b in c]), to)
                 for c in bounds)


def join(bounds: tuple[Chunk, ...], parts: tuple[Any, ...]) -> Any:
    """The flat buffer of the chunks' arrays ``parts`` (the inverse of :func:`split`; on
    the host for the same reason)."""
    import jax

    dev = _host_device(parts[0])
    if dev is None or any(_host_device(x) != dev for x in parts[1:]):
        return _joiner(bounds)(parts)
    spans = [(a, b) for c in bounds for _, a, b in c]
    end = max((b for _, b in spans), default=0)
    # (zeros where the layout has gaps between tensors)
    out = (np.empty if sum(b - a for a, b in spans) == end else np.zeros)(end, parts[0].dtype)
    for chunk, x in zip(bounds, parts, strict=True):
        host, at = np.asarray(x), 0
        for _, a, b in chunk:
            out[a:b] = host[at:at + b - a]
            at += b - a
    return jax.device_put(out, _placed(parts[0], dev))


def _splitter(bounds: tuple[Chunk, ...]) -> Any:
    """One jitted function that cuts a flat buffer into the chunks ``bounds`` (one
    compile for all: eager slices compiled a program each, +1.3 s on a ten-tensor model's
    first step)."""
    fn = _SPLIT.get(bounds)
    if fn is None:
        import jax
        import jax.numpy as jnp

        def split(x: Any) -> tuple[Any, ...]:
            return tuple(jnp.concatenate([jax.lax.slice(x, (a,), (b,)) for _, a, b in c])
                         for c in bounds)

        fn = _SPLIT[bounds] = jax.jit(split)
    return fn


def _joiner(bounds: tuple[Chunk, ...]) -> Any:
    """The jitted inverse of :func:`_splitter`: the flat buffer of the chunks' arrays."""
    fn = _JOIN.get(bounds)
    if fn is None:
        import jax
        import jax.numpy as jnp

        pieces = sorted((i, c, b - a) for c, chunk in enumerate(bounds) for i, a, b in chunk)
        starts: dict[tuple[int, int], int] = {}
        for chunk_i, chunk in enumerate(bounds):
            at = 0
            for i, a, b in chunk:
                starts[(chunk_i, i)] = at
                at += b - a

        def join(parts: tuple[Any, ...]) -> Any:
            return jnp.concatenate([jax.lax.slice(parts[c], (starts[(c, i)],),
                                                  (starts[(c, i)] + n,)) for i, c, n in pieces])

        fn = _JOIN[bounds] = jax.jit(join)
    return fn


class ChunkedSlots(MutableMapping):
    """Slot name → flat buffer, each held flat, in chunks (:func:`chunk_bounds`) or both.

    ``version`` counts the writes (``slots[name] = ...``, ``del``): what a repeated step
    (``fast_step.JaxRecipe``) checks besides the object itself."""

    def __init__(self, bounds: tuple[Chunk, ...], slots: Mapping[str, Any]) -> None:
        self.bounds = bounds
        self._flat: dict[str, Any] = dict(slots)  # None: held in chunks only
        self._chunks: dict[str, tuple[Any, ...]] = {}
        self.version = 0

    @classmethod
    def of(cls, slots: Mapping[str, Any], bounds: tuple) -> ChunkedSlots:
        """``slots`` themselves if they are chunked by ``bounds``, else a new mapping of
        their flat buffers (split on the engine's first use)."""
        if isinstance(slots, ChunkedSlots) and slots.bounds == bounds:
            return slots
        return cls(bounds, slots)

    def __getitem__(self, name: str) -> Any:
        flat = self._flat[name]
        if flat is None:
            parts = self._chunks[name]
            flat = self._flat[name] = parts[0] if len(parts) == 1 else join(self.bounds, parts)
        return flat

    def __setitem__(self, name: str, value: Any) -> None:
        self._flat[name] = value
        self._chunks.pop(name, None)
        self.version += 1

    def __delitem__(self, name: str) -> None:
        del self._flat[name]
        self._chunks.pop(name, None)
        self.version += 1

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat)

    def __len__(self) -> int:
        return len(self._flat)

    def __repr__(self) -> str:
        return f"ChunkedSlots({sorted(self._flat)}, chunks={len(self.bounds)})"

    def chunks(self, name: str) -> tuple[Any, ...]:
        """Slot ``name`` as its chunks' arrays (split from the flat buffer the first time,
        which is then let go: the slot is held once)."""
        parts = self._chunks.get(name)
        if parts is None:
            flat = self._flat[name]
            if len(self.bounds) == 1:
                parts = (flat,)
            else:
                parts = split(self.bounds, flat)
                self._flat[name] = None
            self._chunks[name] = parts
        return parts

    def replaced(self, new: Mapping[str, tuple[Any, ...]]) -> ChunkedSlots:
        """A new mapping: these slots with the chunks ``new`` instead (what a step returns;
        the old chunks were donated to it)."""
        out = ChunkedSlots(self.bounds, {})
        if new.keys() == self._flat.keys():  # every slot (a step's): held in chunks only
            out._flat, out._chunks = dict.fromkeys(self._flat), dict(new)
            return out
        out._flat = {k: None if k in new else v for k, v in self._flat.items()}
        out._flat.update((k, None) for k in new if k not in out._flat)
        out._chunks = {k: v for k, v in self._chunks.items() if k not in new}
        out._chunks.update(new)
        return out
