"""``mithril cache warm``: compile the kernels of optimizer configurations ahead of a run
(:func:`mithril.utils.cache.warm`), each configuration and backend in a process of its own,
several at once (``--jobs``): numba compiles on one core, so a machine's cores compile
different kernels side by side, and each process counts what it compiled exactly."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from typing import Any

from ..utils import cache
from ..utils.optimizers.engines import kernel_cache
from .errors import CLIError
from .optimizer_catalog import build_optimizer, parse_optimizer_spec
from .options import OPTIONS

#: the optimizer warmed where no spec is given (the CLI's default)
DEFAULT_SPECS = ("adam",)


def installed_backends() -> list[str]:
    """The backends :func:`~mithril.utils.cache.warm` can run here (NumPy always)."""
    return ["numpy", *(b for b in ("torch", "jax") if importlib.util.find_spec(b) is not None)]


def check(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (spec, backend) pairs to warm, every spec built once (a bad one is a
    :class:`CLIError` before any process starts)."""
    if args.kernels or args.jax:
        raise CLIError("--kernels and --jax choose what `mithril cache clear` removes")
    specs = args.optimizers or list(DEFAULT_SPECS)
    for spec in specs:
        # (its errors name the spec's keys: `cache warm` has no --beta1, --clip-norm, ...)
        build_optimizer(*parse_optimizer_spec(spec), spec=OPTIONS)
    backends = args.backend or installed_backends()
    missing = [b for b in backends if b != "numpy" and importlib.util.find_spec(b) is None]
    if missing:
        raise CLIError(f"--backend {missing[0]}: {missing[0]} is not installed (pip install "
                       f"'mithril[{missing[0]}]')")
    if args.jobs is not None and args.jobs < 1:
        raise CLIError(f"--jobs must be at least 1, got {args.jobs}")
    with warnings.catch_warnings():  # (said below, once)
        warnings.simplefilter("ignore", kernel_cache.KernelCacheWarning)
        usable = kernel_cache._folder() is not None
    if not usable:
        raise CLIError(f"the kernel cache folder {cache.cache_dir() / 'kernels'} cannot be "
                       f"written: nothing compiled would be kept (set MITHRIL_CACHE_DIR to a "
                       f"writable folder)")
    return [(s, b) for s in specs for b in dict.fromkeys(backends)]


def run(args: argparse.Namespace) -> int:
    """``mithril cache warm``: one line per (spec, backend); status 1 where one failed."""
    if args.here:  # a child: one pair, its counts as JSON on the last line
        got = cache.warm(build_optimizer(*parse_optimizer_spec(args.optimizers[0])),
                         args.backend[0], args.dtype)
        print(json.dumps(got))
        return 0
    pairs = check(args)
    jobs = min(args.jobs or os.cpu_count() or 1, len(pairs))
    waiting = list(pairs)
    running: list[tuple[tuple[str, str], Any]] = []
    failed = 0
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                spec, backend = pair = waiting.pop(0)
                cmd = [sys.executable, "-m", "mithril", "cache", "warm", spec, "--backend",
                       backend, "--dtype", args.dtype, "--here"]
                running.append((pair, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True)))
            pair, proc = running[0]  # (in order: the lines come out in the pairs' order)
            out, err = proc.communicate()
            running.pop(0)
            failed += not _report(pair, args.dtype, proc.returncode, out, err)
    finally:  # (interrupted: no compile left running behind the command)
        for _, proc in running:
            proc.kill()
            proc.wait()
    return 1 if failed else 0


def _report(pair: tuple[str, str], dtype: str, status: int, out: str, err: str) -> bool:
    """Print a pair's line (its error's last lines on stderr; the seconds are the warm's
    own, without the process's imports); whether it succeeded."""
    spec, backend = pair
    what = f"{spec} on {backend} ({dtype})"
    try:
        got = json.loads(out.strip().splitlines()[-1]) if status == 0 else None
    except (IndexError, ValueError):
        got = None
    if got is None:
        tail = "\n".join(err.strip().splitlines()[-3:]) or f"exit status {status}"
        print(f"{what}: failed\n{tail}", file=sys.stderr)
        return False
    n = got["compiled"]
    print(f"{what}: {n} kernel{'s' * (n != 1)} compiled, {got['loaded']} loaded from the "
          f"cache ({got['seconds']:.1f} s)")
    return True
