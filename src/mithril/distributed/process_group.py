"""The process group: :func:`init`, :func:`rank`, :func:`world_size`, :func:`shutdown`, and
the few collectives :class:`~mithril.distributed.DataParallel` runs, all on
``torch.distributed`` (gloo on CPU; NCCL for CUDA tensors). NumPy buffers travel as
zero-copy ``torch.from_numpy`` views: nothing is copied to hand them to torch.

A world of one process needs no process group: :func:`rank` is 0, :func:`world_size` 1 and
every collective is the identity, so the same script runs with and without ``torchrun``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

import numpy as np

#: seconds a collective may wait for a peer before it raises (see :func:`init`)
DEFAULT_TIMEOUT = 60.0


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """Whether :func:`init` (or torch itself) has set up a process group."""
    try:
        dist = _dist()
    except ImportError:  # pragma: no cover - torch is a dependency of this package
        return False
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, given: int | None) -> int | None:
    if given is not None:
        return int(given)
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init(rank: int | None = None, world_size: int | None = None, *,
         master_addr: str | None = None, master_port: int | None = None,
         timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo") -> None:
    """Join the process group (a no-op for a world of one, or when already joined).

    Arguments not given are read from ``torchrun``'s environment: ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` (default ``127.0.0.1``) and ``MASTER_PORT``. ``timeout`` (seconds)
    bounds how long any collective waits for a peer: a rank that died or stopped calling
    gives a :class:`PeerError` (a ``RuntimeError``) within it, never a hang. ``backend``: ``"gloo"`` (CPU tensors, the default) or ``"nccl"`` (CUDA)."""
    if is_initialized():
        # joined already: arguments saying otherwise would be silently ignored, and this
        # process then take another rank's share of every batch
        have = {"rank": _dist().get_rank(), "world_size": _dist().get_world_size()}
        for key, given in (("rank", rank), ("world_size", world_size)):
            if given is not None and int(given) != have[key]:
                raise ValueError(f"init: {key}={given}, but this process already joined a "
                                 f"process group as rank {have['rank']} of "
                                 f"{have['world_size']}")
        return
    size = _env_int("WORLD_SIZE", world_size)
    me = _env_int("RANK", rank)
    if size is None or size == 1:
        if me not in (None, 0):
            raise ValueError(f"rank {me} in a world of one process")
        return
    if size < 1:
        raise ValueError(f"world_size must be >= 1, got {size}")
    if me is None:
        raise ValueError("init: world_size > 1 needs the rank (argument or RANK)")
    if not 0 <= me < size:
        raise ValueError(f"rank {me} is outside [0, {size})")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", master_port)
    if port is None:
        raise ValueError("init: world_size > 1 needs master_port (argument or MASTER_PORT)")
    dist = _dist()
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=me,
                            world_size=size, timeout=datetime.timedelta(seconds=timeout))


def shutdown() -> None:
    """Leave the process group (a no-op if none)."""
    if is_initialized():
        _dist().destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _dist().get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return _dist().get_world_size() if is_initialized() else 1


# -- collectives on NumPy or torch buffers --------------------------------------------------

class PeerError(RuntimeError):
    """A collective failed: a peer rank died, stopped calling, or did not answer within the
    timeout of :func:`init`."""


def _run(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except RuntimeError as e:
        raise PeerError(f"mithril.distributed: {what} failed on rank {rank()} of "
                        f"{world_size()}: a peer died, stopped calling or timed out "
                        f"({type(e).__name__}: {str(e)[:300]})") from e

def as_torch(x: Any) -> Any:
    """A torch tensor sharing ``x``'s memory (``torch.from_numpy`` for NumPy)."""
    if isinstance(x, np.ndarray):
        import torch

        return torch.from_numpy(x)
    return x


def all_reduce(x: Any) -> None:
    """Sum ``x`` (a contiguous NumPy array or torch tensor) over all ranks, in place."""
    if world_size() > 1:
        _run("all-reduce", _dist().all_reduce, as_torch(x))


def reduce_scatter(out: Any, x: Any) -> None:
    """``out`` ← this rank's chunk of the sum over ranks of ``x`` (``len(x) = N·len(out)``)."""
    if world_size() == 1:
        out[:] = x
        return
    dist = _dist()
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _run("reduce-scatter", fn, as_torch(out), as_torch(x))


def all_gather(out: Any, x: Any, what: str = "all-gather") -> None:
    """``out`` ← every rank's ``x`` concatenated in rank order (``len(out) = N·len(x)``);
    ``what`` names it in a :class:`PeerError`."""
    if world_size() == 1:
        out[:] = x
        return
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _run(what, fn, as_torch(out), as_torch(x))


def all_gather_bytes(data: bytes, what: str = "all-gather") -> list[bytes]:
    """Every rank's ``data``, in rank order (two small all-gathers: lengths, then bytes);
    ``what`` names them in a :class:`PeerError`."""
    n = world_size()
    if n == 1:
        return [data]
    size = np.array([len(data)], dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    all_gather(sizes, size, what)
    width = int(sizes.max())
    mine = np.zeros(width, dtype=np.uint8)
    mine[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    every = np.zeros(n * width, dtype=np.uint8)
    all_gather(every, mine, what)
    return [every[r * width:r * width + int(sizes[r])].tobytes() for r in range(n)]


def barrier(what: str) -> None:
    """Wait for every rank (:class:`PeerError` if a peer stops calling)."""
    if world_size() > 1:
        _run(f"barrier ({what})", _dist().barrier)


def agree(what: str, error: BaseException | None) -> None:
    """Every rank learns whether any refused (one :func:`all_gather_bytes`): raise this
    rank's own ``error``, else, where another rank refused, an error of the class of the
    first refusing rank's naming it and its message; return where none refused. What a call
    runs on every rank before it changes anything, so that all refuse alike."""
    every = all_gather_bytes(b"" if error is None else
                             f"{type(error).__name__}\0{error}".encode("utf-8", "replace"),
                             f"{what} (all-gather)")
    if error is not None:
        raise error
    for r, text in enumerate(every):
        if text:
            from .. import errors

            kind, _, message = text.decode("utf-8", "replace").partition("\0")
            import builtins

            # (the refusing rank's class: ours, or a built-in one, PermissionError included)
            cls = getattr(errors, kind, None) or getattr(builtins, kind, None)
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RuntimeError
            text = f"{what}: rank {r} refused, so every rank did (nothing changed): {message}"
            try:
                exc = cls(text)
            except TypeError:  # (a class whose constructor takes more: UnicodeDecodeError)
                exc = RuntimeError(f"{kind}: {text}")
            raise exc


def digest(data: bytes) -> bytes:
    """SHA-256 of ``data`` (what ranks compare before exchanging whole descriptions)."""
    return hashlib.sha256(data).digest()
