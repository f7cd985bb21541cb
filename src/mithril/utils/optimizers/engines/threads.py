"""Running a fused kernel on several cores.

One core does not saturate a socket's memory bandwidth: on a 2-core machine two threads
run a 10M-parameter Adam step ~20% faster than one. The kernels are compiled with
``nogil=True``, so plain Python threads run them in parallel (numba's OpenMP
``parallel=True`` was 1.5-30x *slower* there: ~0.23 ms to launch a 1M-element loop that one
thread runs in 0.11). Every element is independent, so the flat buffers are cut into pieces
of about :data:`PIECE` elements (inside tensors where needed, at multiples of 16 elements),
the pieces into one contiguous range per thread, and the threads *claim* pieces with atomic
counters (:mod:`.atomics`): each its own range's from the front (one stream through memory,
as torch's statically split loops), then the others' from their back ends. The calling
thread starts at once and a thread of the warm team (:mod:`.workers`) joins within
microseconds after a recent step, or when it wakes, so a late or preempted thread slows the
step by one piece, not by its share. Each piece's Σ g² has its own slot, summed in order:
results do not depend on the thread count.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import atomics
from . import workers as workers_

#: work is claimed in pieces of about this many elements (a multiple of 16; fixed, so that
#: the per-piece sums do not depend on the thread count). Threads claiming pieces in turn
#: each restart their memory streams at every piece: 2^18 (1 MiB of float32 per buffer) ran
#: a 1M- or 10M-parameter SGD / Adam step 9-11% faster than 2^16 on 2 Zen 5 cores, 2^14
#: 1.6x slower (same buffers, interleaved)
PIECE = 1 << 18
#: busy-waits (``pause``: 3-50 ns each, by CPU) of the calling thread for pieces other
#: threads still work on (a piece takes 40-600 us) before it sleeps until they return: a
#: sleeping thread takes tens of microseconds to wake
SPINS = 1 << 14
#: below this many elements in all, waking a thread costs more than it saves
MIN_PARALLEL = 1 << 18

_threads: int | None = None
_default: int | None = None  # the environment's answer, read once (see get_num_threads)


def get_num_threads() -> int:
    """Threads an optimizer step may use: ``set_num_threads``, else ``MITHRIL_NUM_THREADS``,
    else ``OMP_NUM_THREADS`` (as torch), else the cores this process may run on. The
    environment is read on first use and kept, as torch and numba keep theirs (each step
    asks: reading it every time cost ~8 us of a 1M-parameter step, with the caches cold
    after the step's pass over memory); a forked child reads it anew."""
    global _default
    if _threads is not None:
        return _threads
    if _default is None:
        _default = _from_environment()
    return _default


def _from_environment() -> int:
    for var in ("MITHRIL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _after_fork() -> None:
    global _default
    _default = None


if hasattr(os, "register_at_fork"):  # (no fork elsewhere)
    os.register_at_fork(after_in_child=_after_fork)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) for every later optimizer step on CPU."""
    global _threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads needs a positive int, got {n!r}")
    _threads = n


class Plan:
    """A layout's tensors cut into pieces of about :data:`PIECE` elements.

    Tensors are cut into segments of at most ``PIECE`` elements at multiples of ``PIECE``
    inside them; consecutive segments whose dense start falls in the same ``PIECE``-sized
    window form one piece. Segment ``e`` is tensor ``seg_t[e]`` from its element
    ``seg_first[e]``, for ``seg_size[e]`` elements at ``seg_off[e]`` in the flat buffers;
    piece ``k`` is segments ``bounds[k]:bounds[k + 1]``."""

    def __init__(self, offsets: np.ndarray, sizes: np.ndarray) -> None:
        sizes = np.asarray(sizes, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # dense
        count = -(-sizes // PIECE)  # segments per tensor (none for an empty one)
        t = np.repeat(np.arange(len(sizes), dtype=np.int64), count)
        j = np.arange(len(t), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        self.seg_t, self.seg_first = t, j * PIECE
        self.seg_size = np.minimum(PIECE, sizes[t] - self.seg_first)
        self.seg_off = np.asarray(offsets, dtype=np.int64)[t] + self.seg_first
        window = (starts[t] + self.seg_first) // PIECE
        new = np.flatnonzero(np.diff(window, prepend=-1))  # first segment of each piece
        self.bounds = np.append(new, len(t)).astype(np.int64)
        self.pieces = len(new)
        self.total = int(sizes.sum())

    def run(self, kernel: Any, before: tuple, gptr: np.ndarray, after: tuple,
            with_offsets: bool = True) -> float:
        """Σ over the pieces of ``kernel(*before, gptr, seg_t, seg_first, [seg_off,]
        seg_size, bounds, sync, acc, spins, *after)``, run by this thread and up to
        ``get_num_threads() - 1`` threads of the warm team (:mod:`.workers`).

        The kernel returns 1.0 when every piece is done, which this thread waits for by
        spinning up to ``spins`` times (:data:`SPINS`; team threads get 0); if a thread
        holding a piece was descheduled, this one then yields until that piece is done."""
        workers = min(get_num_threads(), self.pieces) - 1 if self.total >= MIN_PARALLEL else 0
        sync = atomics.new_sync(self.pieces, max(workers, 0) + 1)  # a range per thread
        acc = np.zeros(self.pieces, dtype=np.float64)
        tables = (self.seg_t, self.seg_first, *((self.seg_off,) if with_offsets else ()),
                  self.seg_size, self.bounds, sync, acc)
        if workers <= 0:
            kernel(*before, gptr, *tables, SPINS, *after)
        else:
            workers_.share(lambda spins: kernel(*before, gptr, *tables, spins, *after), sync,
                       self.pieces, workers, SPINS)
        total = 0.0  # in piece order (a loop over a list: numpy's reduce machinery cost
        for v in acc.tolist():  # ~10-20 us here, with the caches cold after the kernel)
            total += v
        return total
