"""Mithril's disk caches: what they hold, and clearing them.

Two folders under :func:`cache_dir` (``$MITHRIL_CACHE_DIR``, else the platform's user cache
folder, e.g. ``~/.cache/mithril``):

* ``kernels``: the optimizer and model kernels numba compiled, one source file per kernel
  (named by a hash of everything its code depends on) and numba's compiled code beside it
  in ``__pycache__``. A kernel whose math, numba or CPU changed gets a new entry; old
  entries are never read again, and stay until cleared.
* ``jax``: JAX's persistent compilation cache of the programs Mithril jits
  (``make_train_step``'s, the jitted engine's), where the user configured none. It is not
  bounded, as JAX's default: JAX's own bound (``jax_compilation_cache_max_size``) evicts
  by the access times it records, and fails to write anything into a folder that holds
  entries written without it (``FileNotFoundError`` on their ``-atime`` files, JAX 0.10),
  as any folder used before would.

:func:`clear` removes only the files those two caches write (never anything else a shared
folder may hold); a process running meanwhile compiles what it misses again. From the
command line: ``mithril cache`` (what they hold) and ``mithril cache clear``.
"""

from __future__ import annotations

from pathlib import Path

from .optimizers.engines.kernel_cache import cache_dir

__all__ = ["cache_dir", "clear", "usage"]


def _entries(folder: Path, kind: str) -> list[Path]:
    """The files of cache ``kind`` ("kernels" or "jax") in ``folder``."""
    if not folder.is_dir():
        return []
    if kind == "kernels":  # <name>_<hash>.py, and numba's index / code files beside them
        out = [p for p in folder.glob("*_*.py") if p.is_file()]
        pyc = folder / "__pycache__"
        if pyc.is_dir():
            out += [p for p in pyc.iterdir() if p.is_file() and p.suffix in (
                ".nbi", ".nbc", ".pyc")]
        return out
    # JAX's: <program>-<hash>-cache and, where its eviction is on, the -atime companion (not
    # the eviction's lock file, which another process may hold)
    return [p for p in folder.iterdir() if p.is_file() and p.name.endswith(("-cache", "-atime"))]


def usage() -> dict[str, dict[str, int | str]]:
    """Each cache (``"kernels"``, ``"jax"``): its ``folder``, the ``files`` it holds and
    their ``bytes``."""
    root = cache_dir()
    out: dict[str, dict[str, int | str]] = {}
    for kind in ("kernels", "jax"):
        files = _entries(root / kind, kind)
        size = 0
        for p in files:
            try:
                size += p.stat().st_size
            except OSError:  # (removed meanwhile by another process)
                pass
        out[kind] = {"folder": str(root / kind), "files": len(files), "bytes": size}
    return out


def clear(kinds: tuple[str, ...] = ("kernels", "jax")) -> dict[str, int]:
    """Remove the entries of the caches named in ``kinds``; returns how many files each
    lost. A file that cannot be removed raises ``OSError`` naming it, after the others
    were removed (running it again removes what is left)."""
    bad = [k for k in kinds if k not in ("kernels", "jax")]
    if bad or isinstance(kinds, str):
        raise ValueError(f"clear: kinds must be a tuple of 'kernels' and 'jax', got {kinds!r}")
    root = cache_dir()
    removed: dict[str, int] = {}
    failed: list[str] = []
    for kind in kinds:
        removed[kind] = 0
        for p in _entries(root / kind, kind):
            try:
                p.unlink()
                removed[kind] += 1
            except FileNotFoundError:  # (another process removed it)
                pass
            except OSError as e:
                failed.append(f"{p} ({e.strerror or e})")
    if failed:
        raise OSError(f"cache clear: {len(failed)} file(s) could not be removed: "
                      f"{', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}")
    return removed

