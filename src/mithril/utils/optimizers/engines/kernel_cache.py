"""Compile each numba kernel once per machine, not once per process.

The fused kernels (:mod:`.kernels`) are generated from source templates and an optimizer's
``math``; compiling one costs ~0.5-2 s, which every fresh process used to pay on its first
step. :func:`jit` (a drop-in for ``numba.njit``) makes them cacheable with numba's own disk
cache (``cache=True``), which needs a real source file and keys only on that file's content,
the function's bytecode and the CPU — not on the functions it calls, the globals it freezes
or the math it inlines. So :func:`jit` writes the function's source to a file in the user
cache folder (:func:`cache_dir`) named by a hash of everything the compiled code depends on:

* the function's source and the jit options;
* every global (or closure variable) the function refers to, recursively: constants by
  value, Python functions and numba dispatchers by bytecode, constants and the globals they
  refer to in turn (a user's ``math`` and any helper it calls), ``@intrinsic``\\s by their
  typing/codegen functions, numba ``@overload``\\s of a called function by their
  implementations; modules of NumPy, numba, llvmlite and the standard library by version;
* Python, NumPy, numba and llvmlite versions, the CPU's name and features, and the
  vector width the kernels prefer (:mod:`.vector_width`: every kernel is compiled with it).

A changed math (or dtype, or variant: they are constants in the generated source or its
globals) gives a new file, which numba compiles once and caches next to it (``__pycache__``;
in ``NUMBA_CACHE_DIR`` where the user set one). A first compile on this machine is logged
on the ``mithril.kernels`` logger at INFO (``logging.basicConfig(level=logging.INFO)``
shows it); :func:`stats` counts the cache hits and misses of this process.

The cache folder is ``$MITHRIL_CACHE_DIR/kernels``, else the platform's user cache folder
(``$XDG_CACHE_HOME/mithril``, ``~/.cache/mithril``, ``~/Library/Caches/mithril``,
``%LOCALAPPDATA%\\mithril\\Cache``): the package directory is never written, so a read-only
install caches as well. Where the cache folder cannot be written, kernels are compiled in
memory every process as before, with one :class:`KernelCacheWarning`. Delete the folder to
clear the cache; files of kernels no longer used are simply never read.

A cached kernel loads without numba's ``refresh()`` of its target (0.1-0.2 s a process of
importing and installing numba's whole typing and lowering registries, which numba does
before every load): a load needs none of it, the entry being machine code that calls
nothing compiled apart. numba refreshes before any compile anyway. Where that load fails
(or :data:`LIGHT_LOAD` is off), numba's own path loads it, after :mod:`.blas_probe`.

A cached kernel must not call another compiled function (issue #16). numba links a copy of
each callee's optimised code into the caller's object code and then optimises the whole
again, so with ``fastmath`` the copy may round differently from the callee's own library;
and the call resolves to whichever definition of the callee's symbol the process loaded
*first*: the callee's own library after a compile (typing the caller compiles it first),
the caller's copy after a cache hit. Kernels of one math then differed by 1-2 ulp between a
compile and a cache hit, hence between processes sharing a fresh folder. So :func:`jit`
hands a cached function *twins* of the numba dispatchers it refers to, compiled with
``forceinline`` (:func:`_inlined`): LLVM inlines them, and the caller's object code is all
that runs, whether compiled or loaded. An object that still defines a function compiled
apart (a callee that is not a global of the function, or could not be inlined) is not
saved (:func:`foreign_functions`): that kernel is compiled in every process.

:func:`exec_source` runs generated source as ``exec`` did, registering it with
:mod:`linecache` so that :func:`jit` (and tracebacks) can read it back.
"""

from __future__ import annotations
import __future__

import ast
import hashlib
import importlib.util
import inspect
import linecache
import logging
import os
import platform
import sys
import textwrap
import threading
import types
import warnings
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba.core.caching import FunctionCache

from . import blas_probe, vector_width
from .kernel_fingerprint import _Fingerprint, _names

log = logging.getLogger("mithril.kernels")

#: bumped when the way files are generated or keyed changes (2: callees inlined, #16)
FORMAT = 2
#: cached kernels load without numba's refresh of its registries (:meth:`_TolerantCache._load_light`)
LIGHT_LOAD = True

_FUTURE = 0
for _name in __future__.all_feature_names:
    _FUTURE |= getattr(__future__, _name).compiler_flag


class KernelCacheWarning(UserWarning):
    """The kernel cache folder cannot be used: kernels are compiled in every process."""


def cache_dir() -> Path:
    """The user cache folder of mithril: ``$MITHRIL_CACHE_DIR``, else the platform's."""
    env = os.environ.get("MITHRIL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "mithril" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mithril"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mithril"


_lock = threading.Lock()
_usable: dict[str, Path | None] = {}
_dispatchers: list[Any] = []
_written: list[str] = []


def _folder() -> Path | None:
    """The kernel folder if it can be written (checked once per path), else None (warned)."""
    path = cache_dir() / "kernels"
    key = str(path)
    if key not in _usable:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}-{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
            _usable[key] = path
        except OSError as e:
            _usable[key] = None
            warnings.warn(f"mithril: the kernel cache folder {path} cannot be written ({e}); "
                          f"optimizer kernels are compiled in every process (set "
                          f"MITHRIL_CACHE_DIR to a writable folder to cache them)",
                          KernelCacheWarning, stacklevel=4)
    return _usable[key]


def exec_source(src: str, name: str, ns: dict[str, Any]) -> None:
    """``exec(compile(src, name, "exec"), ns)``, with ``src`` kept in :mod:`linecache` under
    a name unique to its content, so that :func:`inspect.getsource` and :func:`jit` can
    read the functions it defines."""
    filename = f"<{name.strip('<>')} {hashlib.sha256(src.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), ns)


def environment() -> str:
    """What every compiled kernel depends on besides its code: versions and the CPU."""
    try:
        import llvmlite.binding as ll

        cpu = f"{ll.get_host_cpu_name()} {ll.get_host_cpu_features().flatten()}"
    except Exception:  # pragma: no cover - llvmlite without the host queries
        cpu = platform.processor()
    import llvmlite

    cfg = numba.config
    return "|".join(map(str, (
        FORMAT, sys.version, sys.platform, platform.machine(), np.__version__, numba.__version__,
        llvmlite.__version__, cpu, f"vector width {vector_width.WIDTH}",
        f"float64 sums {vector_width.ACC64}",
        *(getattr(cfg, k, None) for k in ("OPT", "BOUNDSCHECK", "CPU_NAME", "CPU_FEATURES")))))


_ENV: list[str] = []


def _env() -> str:
    if not _ENV:
        _ENV.append(environment())
    return _ENV[0]


def _source(fn: types.FunctionType) -> str:
    """``fn``'s own source, dedented, without its decorators."""
    src = textwrap.dedent(inspect.getsource(fn))
    node = ast.parse(src).body[0]
    if not isinstance(node, ast.FunctionDef) or node.name != fn.__name__:
        raise OSError(f"cannot read the source of {fn.__qualname__}")
    return "".join(src.splitlines(True)[node.lineno - 1:])


class _FileLock:
    """An exclusive lock between processes on ``path`` (``fcntl.flock``; where there is no
    ``fcntl``, only between this process's threads). numba's cache is not safe for
    concurrent writers: two processes saving new signatures of one function both read the
    index, both pick the first free data file name, and the last writer's index can then
    point at the other's machine code (numba/numba#10128 is the same race for gufuncs).
    Loads and saves of one cache folder therefore take this lock."""

    _held = threading.RLock()  # re-entrant: a compile may load a callee's cache inside
    _depth = 0

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        _FileLock._held.acquire()
        _FileLock._depth += 1
        if _FileLock._depth > 1:  # the outermost holder has the file lock
            return self
        try:
            import fcntl

            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # Windows (threads only), or a read-only folder
            if self._fd is not None:
                os.close(self._fd)
            self._fd = None
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)  # (closing releases the flock)
                self._fd = None
        finally:
            _FileLock._depth -= 1
            _FileLock._held.release()


class _TolerantCache(FunctionCache):
    """numba's disk cache of one function, where a fault costs a compile, not the step: an
    entry that cannot be loaded (truncated, written by another version of this module) is
    compiled anew, and one that cannot be saved (a full disk) is not saved, each with a
    :class:`KernelCacheWarning`. Loads and saves hold the folder's :class:`_FileLock`."""

    def _locked(self) -> _FileLock:
        return _FileLock(Path(self.cache_path) / ".mithril-cache.lock")

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            with self._locked():
                data = self._load_light(sig, target_context)
                if data is not None:
                    return data
                blas_probe.prime()  # before numba's first refresh of its target
                return super().load_overload(sig, target_context)
        except Exception as e:
            warnings.warn(f"mithril: cannot load the cached kernel {self._py_func.__qualname__} "
                          f"from {self.cache_path} ({type(e).__name__}: {e}); compiling it again "
                          f"(the entry is removed)", KernelCacheWarning, stacklevel=2)
            self._drop_index()
            return None

    def _drop_index(self) -> None:
        """Remove this function's index: an entry that failed to load would fail (and warn)
        in every later process, where the compile that replaces it may not be saved (see
        :meth:`save_overload`); without it, they compile quietly or load what is saved next."""
        try:
            with self._locked():
                os.remove(self._cache_file._index_path)
        except Exception as e:  # noqa: BLE001 - a read-only folder, numba internals moved
            log.debug("cannot remove the index of %s (%s: %s)", self._py_func.__qualname__,
                      type(e).__name__, e)

    def _load_light(self, sig: Any, target_context: Any) -> Any:
        """The cached entry for ``sig`` loaded without numba's ``refresh()`` of its target,
        or None (a miss, or :data:`LIGHT_LOAD` off, or any fault: then numba's own path).
        numba refreshes before every load so that the context knows every registered
        implementation; that is 0.1-0.2 s a process of importing and installing its whole
        typing and lowering registries, which a load never uses: the entry is machine code
        that calls nothing compiled apart (:func:`foreign_functions`), and its types and
        environment are rebuilt from the entry itself. numba refreshes anyway before any
        compile (``compiler.compile_extra``), so a later compile sees everything."""
        if not LIGHT_LOAD:
            return None
        try:
            from numba.core.runtime import rtsys

            rtsys.initialize(target_context)  # what refresh does first: the runtime (NRT)
            return self._load_overload(sig, target_context)
        except Exception as e:  # noqa: BLE001 - numba internals moved: its own path
            log.debug("light load of %s failed (%s: %s)", self._py_func.__qualname__,
                      type(e).__name__, e)
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        foreign = foreign_functions(data)
        if foreign:  # its calls would run other code after a load than after a compile
            log.info("%s is not cached: it calls functions compiled apart (%s)",
                     self._py_func.__qualname__, ", ".join(n[:60] for n in foreign))
            return
        lost = unimportable_environments(data)
        if lost:  # another process could not load it (numba imports each one's module)
            log.info("%s is not cached: it uses globals of code with no importable module (%s)",
                     self._py_func.__qualname__, ", ".join(lost))
            return
        try:
            with self._locked():
                super().save_overload(sig, data)
        except Exception as e:
            warnings.warn(f"mithril: cannot save the compiled kernel {self._py_func.__qualname__} "
                          f"to {self.cache_path} ({type(e).__name__}: {e})", KernelCacheWarning,
                          stacklevel=2)


def foreign_functions(cres: Any) -> list[str]:
    """The functions defined in the object code of the compile result ``cres`` besides its
    own (and numba's reference-count helpers, the same everywhere): copies of callees that
    were not inlined. Empty where the object code cannot be inspected."""
    try:
        fd = cres.fndesc
        own = {fd.mangled_name, fd.llvm_cpython_wrapper_name, fd.llvm_cfunc_wrapper_name}
        return [f.name for f in cres.library._final_module.functions
                if not f.is_declaration and f.name not in own and not f.name.startswith("NRT_")]
    except Exception:  # pragma: no cover - numba internals moved
        return []


def unimportable_environments(cres: Any) -> list[str]:
    """The module names of the environments (globals) the object code of ``cres`` refers to
    that another process could not import: numba rebuilds each by importing its module, so
    a math inlined from code exec'd under a made-up ``__name__`` (numba's ``<dynamic>``)
    would fail every load. Empty where numba's internals cannot be inspected."""
    try:
        envs = cres._find_referenced_environments()
    except Exception:  # pragma: no cover - numba internals moved
        return []
    lost = []
    for env in envs:
        name = getattr(env, "globals", {}).get("__name__")
        if isinstance(name, str) and name in sys.modules:  # (a kernel's generated module too:
            continue  # regenerated before its load, as here)
        try:
            found = isinstance(name, str) and importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            lost.append(str(name))
    return lost


_twins: dict[int, tuple[Any, Any]] = {}


def _inlined(obj: Any) -> Any:
    """``obj``; for a numba dispatcher compiled as a function of its own (not ``inline=
    "always"``, which numba inlines itself), its twin compiled with ``forceinline``, which
    LLVM inlines into every caller (see the module doc). One twin per dispatcher."""
    opts = getattr(obj, "targetoptions", None)
    if (not isinstance(opts, dict) or not hasattr(obj, "py_func")
            or opts.get("inline", "never") != "never" or opts.get("forceinline")):
        return obj
    with _lock:
        twin = _twins.get(id(obj))
        if twin is None or twin[0] is not obj:
            f = obj.py_func  # a copy: numba refuses one function on its compile stack twice
            g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__,
                                   f.__closure__)  # (a recursive one calls the original)
            g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
            kw = {k: v for k, v in opts.items() if k != "nopython"}  # (njit's own)
            twin = _twins[id(obj)] = (obj, vector_width.njit(**kw, forceinline=True)(g))
    return twin[1]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jit(fn: Any = None, **options: Any) -> Any:
    """``numba.njit(**options)(fn)``, cached on disk by content (see the module doc), its
    code preferring the CPU's widest vectors (:func:`.vector_width.njit`).

    Usable as ``jit(fn, **options)``, ``@jit(**options)`` or ``@jit``. ``fn`` is
    recompiled from its source in a new module whose globals are ``fn``'s globals and
    closure variables (numba freezes both as constants alike; numba dispatchers among them
    replaced by their inlined twins, :func:`_inlined`). Where its source cannot be
    read or the cache folder cannot be written, it is compiled in memory as by
    ``numba.njit``."""
    if fn is None:
        return lambda f: jit(f, **options)
    new = _cached_source(fn, options)
    if new is None:
        return vector_width.njit(**options)(fn)
    disp = vector_width.njit(**options)(new)
    try:
        disp._cache = _TolerantCache(new)  # what ``cache=True`` sets, tolerant of faults
    except Exception as e:  # numba found nowhere to write its cache, or its internals moved
        warnings.warn(f"mithril: numba cannot cache {fn.__qualname__} ({e}); compiling it in "
                      f"memory", KernelCacheWarning, stacklevel=2)
        return disp
    _dispatchers.append(disp)
    return disp


def cfunc(sig: Any, fn: Any, **options: Any) -> Any:
    """``numba.cfunc(sig, **options)(fn)`` (a C callable: its ``.address``), cached on
    disk by content as :func:`jit` caches (the same key, file and module), compiled with
    the kernels' vector width; in memory where :func:`jit` would be."""
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    if vector_width.PIPELINE is not None:
        options.setdefault("pipeline_class", vector_width.PIPELINE)
    pipeline = options.pop("pipeline_class", None)
    new = _cached_source(fn, {**options, "cfunc": str(sig)})
    made = CFunc(new or fn, sigutils.normalize_signature(sig), locals={}, options=options,
                 **({} if pipeline is None else {"pipeline_class": pipeline}))
    if new is not None:
        try:
            made._cache = _TolerantCache(new)
        except Exception as e:  # numba found nowhere to write its cache
            warnings.warn(f"mithril: numba cannot cache {fn.__qualname__} ({e}); compiling "
                          f"it in memory", KernelCacheWarning, stacklevel=2)
    made.compile()
    return made


def _cached_source(fn: Any, options: dict[str, Any]) -> Any:
    """``fn`` re-made from the cache file of its content (see :func:`jit`): the function of
    that file's module, or None where its source cannot be read or the folder written."""
    folder = _folder()
    if folder is None:
        return None
    try:
        src = _source(fn)
        ns = dict(fn.__globals__)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            ns[name] = cell.cell_contents
        flags = fn.__code__.co_flags & _FUTURE
        code = compile(src, "<probe>", "exec", flags=flags, dont_inherit=True)
    except (OSError, TypeError, ValueError, SyntaxError) as e:
        log.debug("not cached (%s): %s", e, fn.__qualname__)
        return None
    fp = _Fingerprint()
    key = hashlib.sha256("\n".join((
        _env(), src, repr(sorted(f"{k}={fp.of(v)}" for k, v in options.items())),
        fp.globals_of(_names(code), ns))).encode()).hexdigest()
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in fn.__name__)[:40]
    path = folder / f"{stem}_{key[:24]}.py"
    origin = getattr(fn.__code__, "co_filename", "?")
    with _lock:
        if not path.exists():
            try:
                _write(path, f"# mithril kernel cache: {fn.__qualname__} from {origin}\n"
                             f"# key {key}\n{src}")
            except OSError as e:
                warnings.warn(f"mithril: cannot write the kernel cache file {path} ({e}); "
                              f"compiling {fn.__qualname__} in memory", KernelCacheWarning,
                              stacklevel=3)
                return None
            _written.append(path.name)
            log.info("compiling %s (%s) on its first use on this machine, then cached in %s",
                     fn.__qualname__, origin.strip("<>").rsplit(" ", 1)[0], folder)
    # A module of its own, importable by name: numba rebuilds a cached kernel's environment
    # (its globals) with ``importlib.import_module(__name__)``. The name depends on the content
    # only, as the file's does, so that cache entries stay valid wherever the folder lies.
    name = f"_mithril_kernel_{path.stem}"
    module = sys.modules.get(name)
    if module is None or module.__file__ != str(path):  # new, or the same in another folder
        module = types.ModuleType(name)
        module.__dict__.update({k: _inlined(v) for k, v in ns.items() if not k.startswith("__")})
        module.__file__ = str(path)
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec", flags=flags,
                     dont_inherit=True), module.__dict__)
        sys.modules[name] = module
    return getattr(module, fn.__name__)


def stats() -> dict[str, int]:
    """This process's kernel cache: ``hits`` (signatures loaded from disk), ``misses``
    (compiled, then saved) and ``new`` (kernels seen for the first time on this machine)."""
    hits = sum(sum(d.stats.cache_hits.values()) for d in _dispatchers)
    misses = sum(sum(d.stats.cache_misses.values()) for d in _dispatchers)
    return {"hits": hits, "misses": misses, "new": len(_written), "kernels": len(_dispatchers)}


#: JAX compilations shorter than this are not written to the persistent cache: reading a
#: tiny program back costs about what compiling it does
JAX_MIN_COMPILE_SECS = 0.05
_jax_done: list[bool] = []


def configure_jax() -> str | None:
    """Point JAX's persistent compilation cache at ``<cache>/jax`` (:func:`cache_dir`), so
    that the jitted optimizer steps of :class:`~.jax_engine.JaxEngine` compile once per
    machine too; returns the folder, or None where it was left alone.

    Only where the user has configured none (``jax_compilation_cache_dir`` unset, also
    through ``JAX_COMPILATION_CACHE_DIR``), the folder can be written and
    ``MITHRIL_JAX_CACHE`` is not ``0``; then programs that took at least
    :data:`JAX_MIN_COMPILE_SECS` to compile are cached (JAX's default is 1 s), unless the
    user set ``jax_persistent_cache_min_compile_time_secs`` themselves. The folder is not
    bounded, as JAX's default (JAX's eviction, ``jax_compilation_cache_max_size``, fails to
    write anything into a folder holding entries written without it); ``mithril cache
    clear`` empties it. Done once per process."""
    if _jax_done:
        return None
    _jax_done.append(True)
    if os.environ.get("MITHRIL_JAX_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import jax

    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = cache_dir() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        log.info("JAX's compilation cache is not configured: %s cannot be written (%s)", folder, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ
            and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", JAX_MIN_COMPILE_SECS)
    log.info("JAX's persistent compilation cache: %s", folder)
    return str(folder)
