"""Running a fused kernel on several cores.

One core does not saturate a socket's memory bandwidth: on a 2-core machine two threads
run a 10M-parameter Adam step ~20% faster than one. The kernels are compiled with
``nogil=True``, so plain Python threads run them in parallel (numba's OpenMP
``parallel=True`` was 1.5-30x *slower* there). Every element is independent, so the flat
buffers are cut into contiguous parts of equal size - inside tensors where needed - and
each thread runs the same kernel over its part's (gradient address, offset, size) table.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: below this many elements per thread, waking a thread costs more than it saves
MIN_PART = 1 << 18
_ALIGN = 16  # cut tensors at multiples of 16 elements (64 bytes of float32)

_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0  # a forked child inherits the pool object but not its threads
_pool_workers = 0


def get_num_threads() -> int:
    """Threads an optimizer step may use: ``set_num_threads``, else ``MITHRIL_NUM_THREADS``,
    else ``OMP_NUM_THREADS`` (as torch), else the cores this process may run on."""
    if _threads is not None:
        return _threads
    for var in ("MITHRIL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) for every later optimizer step on CPU."""
    global _threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads needs a positive int, got {n!r}")
    _threads = n


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_pid, _pool_workers
    if _pool is None or _pool_workers < workers or _pool_pid != os.getpid():
        # threads start on demand, so room for every core costs nothing; a replaced pool's
        # threads exit once it is garbage (never shut down: another thread may be using it)
        workers = max(workers, os.cpu_count() or 1)
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mithril-opt")
        _pool_pid, _pool_workers = os.getpid(), workers
    return _pool


class Plan:
    """How a layout's tensors are cut into ``parts`` contiguous pieces of similar size.

    Each part is ``(idx, first, offset, size)``: tensors ``idx`` from their element
    ``first`` on, for ``size`` elements, at ``offset`` in the flat buffers."""

    def __init__(self, offsets: np.ndarray, sizes: np.ndarray, parts: int) -> None:
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # dense positions
        total = int(starts[-1])
        parts = max(1, min(parts, total // MIN_PART))
        self.whole = (offsets, sizes) if parts == 1 else None
        cuts = [0]
        for k in range(1, parts):
            b = total * k // parts
            t = int(np.searchsorted(starts, b, side="right")) - 1
            c = min(int(sizes[t]), -(-(b - int(starts[t])) // _ALIGN) * _ALIGN)
            cuts.append(max(cuts[-1], int(starts[t]) + c))
        cuts.append(total)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if hi <= lo:
                continue
            idx = np.nonzero((starts[:-1] < hi) & (starts[1:] > lo))[0]
            first = np.maximum(lo - starts[idx], 0)
            last = np.minimum(hi - starts[idx], sizes[idx])
            self.parts.append((idx, first, offsets[idx] + first, last - first))

    def run(self, kernel: Any, before: tuple, gptr: np.ndarray, after: tuple, itemsize: int,
            with_offsets: bool = True) -> float:
        """Σ of ``kernel(*before, gptr', [offsets',] sizes', *after)`` over the parts, the
        first on the calling thread and the others on the pool."""
        if self.whole is not None:
            off, size = self.whole
            return kernel(*before, gptr, *((off,) if with_offsets else ()), size, *after)
        calls = []
        for idx, first, off, size in self.parts:
            g = gptr[idx]
            g = np.where(g != 0, g + first * itemsize, 0)  # 0 marks a missing gradient
            calls.append((*before, g, *((off,) if with_offsets else ()), size, *after))
        futures = [_executor(len(calls) - 1).submit(kernel, *a) for a in calls[1:]]
        acc = kernel(*calls[0])
        return acc + sum(f.result() for f in futures)
