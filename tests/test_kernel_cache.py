"""The kernel cache (:mod:`mithril.utils.optimizers.engines.kernel_cache`): a second process
loads the kernels a first one compiled; a changed math compiles anew; a cache folder that
cannot be written still runs, with a warning; keys differ by dtype and variant; processes
sharing one fresh folder compute the same bits, compiled or loaded (#16: a kernel calls no
code compiled apart).

Processes are real subprocesses with their own ``MITHRIL_CACHE_DIR`` (and different hash
seeds: a key must not depend on set order); hits and misses are numba's own counts
(:func:`kernel_cache.stats`), never timings."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

from mithril.utils.optimizers.engines import kernel_cache, kernels

# A user-defined optimizer whose math calls a jitted helper of its own (SCALE, a global the
# helper reads, is the knob the tests turn), run for one step on NumPy; prints the step's result and the cache's counts.
SCRIPT = """
import json, sys, warnings
# from the first import: module-level kernels (L-BFGS, Muon helpers) are built at import
recorder = warnings.catch_warnings(record=True)
caught = recorder.__enter__()
warnings.simplefilter("always")
import numba
import numpy as np
from mithril.utils.optimizers import Optimizer
from mithril.utils.optimizers.engines import kernel_cache

SCALE = {scale!r}


@numba.njit
def helper(g):
    return SCALE * g


class Custom(Optimizer):
    slots = ("m",)

    @staticmethod
    def math(p, g, m, lr):
        m = 0.5 * m + helper(g)
        return p - lr * m, m


params = {{"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}}
grads = {{"w": np.full((2, 3), 2.0), "b": np.full(3, 4.0)}}
opt = Custom(learning_rate=0.1)
state = opt.init(params)
params, state = opt.update(params, grads, state)
recorder.__exit__(None, None, None)
print(json.dumps({{"w": params["w"].tolist(), "b": params["b"].tolist(), **kernel_cache.stats(),
                  "warnings": [str(w.message) for w in caught
                               if issubclass(w.category, kernel_cache.KernelCacheWarning)]}}))
"""


def _run(tmp_path: Path, cache: Path, scale: float = 0.5, seed: int = 0) -> dict:
    script = tmp_path / f"custom_{str(scale).replace('.', '_')}.py"
    script.write_text(SCRIPT.format(scale=scale))
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(cache), "PYTHONHASHSEED": str(seed)}
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _expected(scale: float) -> tuple[list, list]:
    w, b = np.arange(6.0).reshape(2, 3), np.ones(3)
    return (w - 0.1 * scale * 2.0).tolist(), (b - 0.1 * scale * 4.0).tolist()


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory) -> tuple[dict, Path]:
    """One cold process's result and the cache folder it filled (the tests that start from a
    filled cache take a copy of it: one compile of the kernels for the module, not three)."""
    folder = tmp_path_factory.mktemp("filled")
    return _run(folder, folder / "cache", seed=1), folder / "cache"


def _copy_of(filled: Path, tmp_path: Path) -> Path:
    # copy2 keeps the times the cache's index stamps its sources with: a copy loads as found
    return Path(shutil.copytree(filled, tmp_path / "cache"))


def test_second_process_hits_the_cache_and_a_changed_math_recompiles(tmp_path, filled_cache):
    first, cache = filled_cache
    cache = _copy_of(cache, tmp_path)
    assert first["new"] > 0 and first["misses"] > 0 and first["hits"] == 0
    assert (first["w"], first["b"]) == _expected(0.5)
    assert list((cache / "kernels").glob("*.py")), "the kernels' sources are kept in the cache"

    second = _run(tmp_path, cache, seed=2)
    assert second["new"] == 0 and second["misses"] == 0 and second["hits"] > 0
    assert (second["w"], second["b"]) == (first["w"], first["b"])

    # the helper the math calls reads another constant: a new kernel, compiled and right
    changed = _run(tmp_path, cache, scale=0.25, seed=3)
    assert changed["new"] > 0 and changed["misses"] > 0
    assert (changed["w"], changed["b"]) == _expected(0.25)
    # kernels that do not depend on the math (the gradient scan, ...) are still shared
    assert changed["hits"] > 0


def _unwritable(tmp_path: Path, how: str) -> Path:
    if how == "read-only":
        if os.geteuid() == 0:  # root writes into any folder a mode makes read-only, but not
            return Path("/proc/self")  # into a read-only file system
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "cache"  # below a regular file: cannot be created


@pytest.mark.parametrize("how", ["read-only", "cannot-be-created"])
def test_unwritable_cache_folder_still_runs_with_a_warning(tmp_path, how):
    out = _run(tmp_path, _unwritable(tmp_path, how))
    assert (out["w"], out["b"]) == _expected(0.5)
    assert out["kernels"] == 0  # compiled in memory, as numba.njit does
    assert len(out["warnings"]) == 1 and "cannot be written" in out["warnings"][0]


def test_unwritable_cache_file_falls_back_with_a_warning(tmp_path, monkeypatch):
    """The folder passes the check but a file cannot be written (full disk, permissions)."""
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))

    def refuse(*args):
        raise PermissionError("refused")

    monkeypatch.setattr(kernel_cache.os, "replace", refuse)

    def twice(x):  # pragma: no cover - compiled by numba
        return 2 * x

    with pytest.warns(kernel_cache.KernelCacheWarning, match="cannot write"):
        fn = kernel_cache.jit(twice)
    assert fn(3.0) == 6.0


def _file(dispatcher) -> str:
    return dispatcher.py_func.__code__.co_filename


def _math(p, g, s0, lr):  # pragma: no cover - compiled by numba
    return p - lr * g, s0


def _other_math(p, g, s0, lr):  # pragma: no cover - compiled by numba
    return p - lr * g * 0.5, s0


def test_keys_differ_by_dtype_variant_and_math(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    build = kernels.update_kernel.__wrapped__  # past the per-process functools cache
    files = [
        _file(build(_math, 1, 1, "float32")),
        _file(build(_math, 1, 1, "float64")),
        _file(build(_math, 1, 1, "float32", copy=True)),
        _file(build(_math, 1, 1, "float32", clip=True)),
        _file(build(_other_math, 1, 1, "float32")),
        _file(kernels.sumsq_kernel.__wrapped__("float32")),
        _file(kernels.sumsq_kernel.__wrapped__("float64")),
    ]
    assert all(Path(f).parent == tmp_path / "kernels" for f in files)
    assert len(set(files)) == len(files)
    # and the same request gives the same file (a new process would find it)
    assert _file(build(_math, 1, 1, "float32")) == files[0]


def test_generated_source_is_readable_and_cached_kernels_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    ns: dict = {"K": 3}
    kernel_cache.exec_source("def f(x):\n    return K * x\n", "<test source>", ns)
    import inspect

    assert "return K * x" in inspect.getsource(ns["f"])
    fn = kernel_cache.jit(ns["f"], nogil=True)
    assert fn(2) == 6
    text = Path(_file(fn)).read_text()
    assert "return K * x" in text and text.startswith("# mithril kernel cache")


def test_configure_jax_leaves_a_user_setting_alone(monkeypatch, tmp_path):
    pytest.importorskip("jax")
    code = textwrap.dedent("""
        import jax
        from mithril.utils.optimizers.engines import kernel_cache
        print(kernel_cache.configure_jax(), jax.config.jax_compilation_cache_dir)
    """)
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(tmp_path)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.split() == [str(tmp_path / "jax")] * 2
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "users")
    theirs = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout.split() == ["None", str(tmp_path / "users")]


def test_no_cpp_extension_is_built():
    """The torch path needs no compiler: with torch's C++ extension builder unavailable, a
    torch step runs (the gradient scan uses torch's own tensor guard, :mod:`.torch_scan`)."""
    pytest.importorskip("torch")
    code = textwrap.dedent("""
        import sys
        sys.modules["torch.utils.cpp_extension"] = None  # any import of it fails
        import torch
        from mithril.utils.optimizers import SGD, Adam
        p = {"w": torch.ones(3, 4), "b": torch.zeros(4)}
        g = {"w": torch.full((3, 4), 0.5), "b": torch.ones(4)}
        for opt in (Adam(1e-3), SGD(0.1, momentum=0.9)):
            s = opt.init(p)
            q, s = opt.update(p, g, s)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_a_damaged_cache_entry_is_compiled_again(tmp_path, filled_cache):
    cache = _copy_of(filled_cache[1], tmp_path)
    for f in (cache / "kernels" / "__pycache__").glob("*.nbc"):
        f.write_bytes(f.read_bytes()[:20])  # truncated
    out = _run(tmp_path, cache)
    assert (out["w"], out["b"]) == _expected(0.5)
    assert out["misses"] > 0 and out["warnings"]
    assert all("cannot load the cached kernel" in w for w in out["warnings"])


# The fused update of ADOPT (float32), in place and double-buffered (NumPy's and JAX-on-CPU's
# variants), a few steps from one start: prints a digest of each variant's results and the
# cache's counts. A kernel loaded from the cache must run the code a compile runs (#16).
VARIANTS = """
import hashlib, json, sys
import numpy as np
from mithril.utils.optimizers.adopt import ADOPT
from mithril.utils.optimizers.engines import kernel_cache, threads
from mithril.utils.optimizers.engines.kernels import update_kernel

opt = ADOPT(learning_rate=0.01)
n = 16901  # vectorised body and scalar remainder
out = {}
for variant in sys.argv[1:]:
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal(n).astype(np.float32), np.empty(n, np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    kernel = update_kernel(opt.kernel_math(), 2, 7, "float32", variant == "copy")
    for t in range(1, 7):
        g = rng.standard_normal(n).astype(np.float32)
        table = np.array([[1, 0, 0, 1, *opt.scalars(t)]], np.float32)
        threads.Plan(np.array([0]), np.array([n])).run(
            kernel, (p, q, m, v), np.array([g.ctypes.data]), (np.zeros(1, np.int64), table))
        if variant == "copy":
            p, q = q, p
    out[variant] = hashlib.sha256(p.tobytes() + m.tobytes() + v.tobytes()).hexdigest()
print(json.dumps({"digests": out, **kernel_cache.stats()}))
"""


def _variants(tmp_path: Path, cache: Path, *order: str) -> subprocess.Popen:
    script = tmp_path / "variants.py"
    script.write_text(VARIANTS)
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(cache), "MITHRIL_NUM_THREADS": "1"}
    env.pop("NUMBA_CACHE_DIR", None)
    return subprocess.Popen([sys.executable, str(script), *order], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_processes_sharing_a_fresh_folder_compute_the_same_bits(tmp_path):
    """Two processes on one fresh folder (each compiles some kernels and may load others the
    other saved), then a third that loads every kernel: both variants, in every process, give
    the same bits. Before #16's fix a loaded kernel ran its own copy of the inner loop, which
    rounded differently from the one a compile runs."""
    shared = tmp_path / "shared"
    first = [_variants(tmp_path, shared, "inplace", "copy"),
             _variants(tmp_path, shared, "copy", "inplace")]
    runs = [_result(p) for p in first]
    warm = _result(_variants(tmp_path, shared, "inplace", "copy"))
    assert warm["misses"] == 0 and warm["hits"] >= 2, warm  # all loaded
    digests = {d for r in [*runs, warm] for d in r["digests"].values()}
    assert len(digests) == 1, [r["digests"] for r in [*runs, warm]]


@numba.njit
def _fib(n):  # pragma: no cover - compiled by numba
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def test_a_kernel_calling_code_compiled_apart_is_not_saved(tmp_path, monkeypatch, caplog):
    """A callee LLVM cannot inline (here a recursive one) would run other code after a load
    than after a compile: such a kernel runs, but is compiled in every process."""

    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))

    def outer(n):  # pragma: no cover - compiled by numba
        return _fib(n) + 1

    with caplog.at_level(logging.INFO, logger="mithril.kernels"):
        fn = kernel_cache.jit(outer)
        assert fn(10) == 56
    assert kernel_cache.foreign_functions(fn.overloads[fn.signatures[0]])
    assert "not cached" in caplog.text
    assert not list((tmp_path / "kernels").rglob("outer_*.nbi"))


def test_cached_update_kernels_inline_their_loops(tmp_path, monkeypatch):
    monkeypatch.setenv("MITHRIL_CACHE_DIR", str(tmp_path))
    kernel = kernels.update_kernel.__wrapped__(_math, 1, 1, "float32", copy=True)
    n = 64
    p, q, s = np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    g = np.full(n, 2.0, np.float32)
    from mithril.utils.optimizers.engines import threads

    threads.Plan(np.array([0]), np.array([n])).run(
        kernel, (p, q, s), np.array([g.ctypes.data]),
        (np.zeros(1, np.int64), np.array([[1, 0, 0, 1, 0.5]], np.float32)))
    np.testing.assert_array_equal(q, np.zeros(n, np.float32))
    assert kernel.signatures and not kernel_cache.foreign_functions(
        kernel.overloads[kernel.signatures[0]])
    assert list((tmp_path / "kernels" / "__pycache__").glob("kernel_*.nbi"))  # saved


EXEC_SCRIPT = '''
import json, warnings
warnings.simplefilter("always")
import numpy as np
from mithril.utils.optimizers.engines import kernel_cache

CODE = """
from mithril.utils.optimizers import Optimizer


class Custom(Optimizer):
    slots = ("m",)

    @staticmethod
    def math(p, g, m, lr):
        m = 0.5 * m + g
        return p - lr * m, m
"""
ns = {"__name__": "__made_up__"}  # as a notebook cell runner or a docs test runs code
exec(compile(CODE, "<cell>", "exec"), ns)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt = ns["Custom"](learning_rate=0.1)
    params, state = opt.update({"w": np.ones(3)}, {"w": np.full(3, 2.0)}, opt.init({"w": np.ones(3)}))
print(json.dumps({"w": params["w"].tolist(), "warnings": [
    str(w.message) for w in caught if issubclass(w.category, kernel_cache.KernelCacheWarning)]}))
'''


def test_math_of_code_without_a_module_is_compiled_not_cached(tmp_path):
    """A math exec'd under a made-up ``__name__`` is inlined with its globals, which another
    process cannot import: it is compiled in each process, with no warning (its cached
    kernel failed every load, with a KernelCacheWarning, from the second process on)."""
    script = tmp_path / "exec_math.py"
    script.write_text(EXEC_SCRIPT)
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NUMBA_CACHE_DIR", None)
    for _ in range(2):
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["warnings"] == []
        np.testing.assert_allclose(got["w"], [0.8, 0.8, 0.8])


def test_an_entry_that_fails_to_load_warns_once_not_in_every_process(tmp_path, filled_cache):
    """A cached entry that cannot be loaded is removed with its warning: where the compile
    that replaces it is not saved (a kernel of code with no importable module, see
    ``save_overload``), it warned in every later process before."""
    cache = _copy_of(filled_cache[1], tmp_path)
    for f in (cache / "kernels" / "__pycache__").glob("*.nbc"):
        f.write_bytes(f.read_bytes()[:20])  # truncated
    unsaved = SCRIPT.replace(
        "from mithril.utils.optimizers.engines import kernel_cache\n",
        "from mithril.utils.optimizers.engines import kernel_cache\n"
        "kernel_cache._TolerantCache.save_overload = lambda self, sig, data: None\n")
    script = tmp_path / "unsaved.py"
    script.write_text(unsaved.format(scale=0.5))
    env = {**os.environ, "MITHRIL_CACHE_DIR": str(cache)}
    env.pop("NUMBA_CACHE_DIR", None)
    warned = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert (got["w"], got["b"]) == _expected(0.5)
        warned.append(len(got["warnings"]))
    assert warned[0] > 0 and warned[1] == 0, warned
