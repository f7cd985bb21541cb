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
folder may hold); a process running meanwhile compiles what it misses again. :func:`warm`
fills the kernel cache ahead of a run (a container image's build, a node's set-up), so
that the run's first step loads its kernels instead of compiling them. From the command
line: ``mithril cache`` (what they hold), ``mithril cache clear`` and ``mithril cache
warm``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .optimizers.engines.kernel_cache import cache_dir

if TYPE_CHECKING:
    from .optimizers import Optimizer

__all__ = ["cache_dir", "clear", "usage", "warm"]

#: the backends :func:`warm` takes
WARM_BACKENDS = ("numpy", "torch", "jax")


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


def warm(optimizer: Optimizer, backend: str = "numpy", dtype: str = "float32"
         ) -> dict[str, Any]:
    """Compile, or load from the kernel cache, the kernels a training run of ``optimizer``
    on ``backend`` (``"numpy"``, ``"torch"`` or ``"jax"``) in ``dtype`` uses, so that a later
    process finds them on disk: two steps of
    :func:`~mithril.utils.training.make_train_step` (on JAX, the one-program step with its
    update through XLA's FFI) and two of ``evaluate`` + ``optimizer.update`` (the step
    given the optimizer's own state, as it drives every optimizer), on a small MLP
    (linear, relu, cross-entropy: their NumPy kernels too). The kernels depend on the
    optimizer's math and settings (``nonfinite``, clipping, weight averaging, dtype), not on
    the model's shapes, so warm each configuration a run will use; JAX's compiled programs
    depend on the model and are not warmed.

    ``optimizer`` is left as it was (a copy runs). Returns ``{"compiled": kernels compiled
    for the first time on this machine, "loaded": kernel signatures read from the cache,
    "seconds": time taken}``; counted in this process, so a kernel this process compiled or
    loaded before counts as neither. A backend that is not installed raises
    ``ModuleNotFoundError``; one that is not a name above, or another than the one the
    optimizer already works on, ``ValueError``; a cache folder that cannot be written,
    ``OSError`` (all before anything runs). As any ``JaxBackend(dtype="float64")``, warming
    float64 on JAX turns on JAX's x64 mode in the calling process (``mithril cache warm``
    runs each configuration in a process of its own)."""
    import numpy as np

    import mithril as ml

    from .optimizers import Optimizer
    from .optimizers.engines import kernel_cache
    from .training import make_train_step

    if backend not in WARM_BACKENDS:
        raise ValueError(f"warm: backend must be one of {', '.join(WARM_BACKENDS)}, got "
                         f"{backend!r}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"warm: optimizer must be a mithril optimizer, got "
                        f"{type(optimizer).__name__}")
    if kernel_cache._folder() is None:  # (warned): compiled kernels would not be kept
        raise OSError(f"warm: the kernel cache folder {cache_dir() / 'kernels'} cannot be "
                      f"written, so nothing compiled would be kept (set MITHRIL_CACHE_DIR "
                      f"to a writable folder)")
    bound = getattr(optimizer, "_backend", None)
    if bound is not None and bound.name != backend:
        raise ValueError(f"warm: this {type(optimizer).__name__} works on {bound.name} arrays "
                         f"(its backend= or its first init/update): warm it on "
                         f"{bound.name!r}, or give a new optimizer for {backend!r}")
    from .. import backends

    cls = {"numpy": "NumpyBackend", "torch": "TorchBackend", "jax": "JaxBackend"}[backend]
    be = getattr(backends, cls)(dtype=dtype, seed=0)
    before, t0 = kernel_cache.stats(), time.perf_counter()
    model = ml.Model()
    model |= ml.MLP(["relu", None], [16, 3])(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    compiled = ml.compile(model, be, shapes={"input": [None, 8]})
    rng = np.random.default_rng(0)
    batches = [{"input": be.array(rng.standard_normal((4, 8)).astype(dtype)),
                "target": be.array(np.array([0, 1, 2, k % 3]), be.int_dtype)}
               for k in range(2)]
    opt = copy.deepcopy(optimizer)
    step = make_train_step(compiled, opt, loss="loss")
    # the step's own state (on JAX its one program), then the optimizer's (evaluate +
    # update: its loss, closure or per-example gradients as the step gives them)
    for init in (step.init, opt.init):
        params = compiled.get_parameters()
        state = init(params)
        for data in batches:
            params, state, _ = step(params, state, data)
        be.block_until_ready(params)
    after = kernel_cache.stats()
    return {"compiled": after["new"] - before["new"], "loaded": after["hits"] - before["hits"],
            "seconds": time.perf_counter() - t0}
