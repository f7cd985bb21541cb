"""The torch gradient scan (``torch_scan.cpp``): built once per machine, then loaded.

A torch step over thousands of small tensors is dominated by reading each tensor's shape,
dtype, contiguity, device and address from Python (~0.4 us per tensor, 0.8 ms for 2,000).
This small CPython extension reads them with torch's C++ accessors in one call. It is compiled
against the installed torch on first use (~10 s, like ``torch.utils.cpp_extension``) and cached
under ``$MITHRIL_CACHE_DIR`` (default ``~/.cache/mithril``), keyed by the source, torch and
Python versions. Without a C++ compiler, or with ``MITHRIL_TORCH_SCAN=0``, the engine uses the
equivalent Python reads instead: the same results, slower on many tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger("mithril")
SOURCE = Path(__file__).with_name("torch_scan.cpp")
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def cache_dir() -> Path:
    root = os.environ.get("MITHRIL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mithril")
    return Path(root) / "torch_scan"


def enabled() -> bool:
    return os.environ.get("MITHRIL_TORCH_SCAN", "1").strip().lower() not in ("0", "false", "no", "off")


def _command(cxx: str, name: str, out: Path) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    includes = [sysconfig.get_paths()["include"], *cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DMODULE_NAME={name}", f'-DMODULE_NAME_STR="{name}"',
            *(f"-I{d}" for d in includes), str(SOURCE), "-o", str(out),
            *(f"-L{d}" for d in libdirs), *(f"-Wl,-rpath,{d}" for d in libdirs),
            "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def _key(cxx: str) -> str:
    import torch

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{torch.__version__}|{sys.version}|{sys.platform}|{cxx}".encode())
    return h.hexdigest()[:16]


def _build(cxx: str, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent processes never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        log.info("mithril: compiling the torch gradient scan (once per machine, ~10 s)")
        proc = subprocess.run(_command(cxx, name, Path(tmp)), capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ModuleType | None:
    """The compiled scan module, building it if needed; None if disabled or it cannot be built."""
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _load() if enabled() else None
        return _loaded["module"]


def _load() -> ModuleType | None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        log.warning("mithril: no C++ compiler found; torch optimizer steps read gradients from "
                    "Python (slower with thousands of tensors)")
        return None
    try:
        name = f"mithril_torch_scan_{_key(cxx)}"
        target = cache_dir() / (name + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        if not target.exists():
            _build(cxx, name, target)
        spec = importlib.util.spec_from_file_location(name, target)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as exc:  # any failure only costs speed: fall back to the Python reads
        log.warning("mithril: the torch gradient scan could not be built (%s); torch optimizer "
                    "steps read gradients from Python (slower with thousands of tensors)", exc)
        return None
