"""``mithril cache``: what Mithril's disk caches hold, clearing them, and filling the kernel
cache ahead of a run (:mod:`mithril.utils.cache`, :mod:`.cache_warm`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..utils import cache
from . import cache_warm
from .common import HelpFormatter
from .errors import CLIError

DESCRIPTION = """\
Mithril compiles its kernels once per machine and keeps them in a cache folder
($MITHRIL_CACHE_DIR, else the user cache folder): `kernels` (numba's), and `jax` (JAX's
compilation cache of the programs Mithril jits). A kernel whose math, numba version or CPU
changed gets a new entry, and so does a program of a new model shape, so old entries pile
up; clearing removes them all, and the next run compiles what it needs again (seconds).
`warm` compiles the kernels of the optimizers named (default: adam) on each backend ahead
of a run, so that its first step loads them: once per machine, e.g. when a container image
is built.
"""

EXAMPLES = """\
examples:
  mithril cache                 where the caches are, and what they hold
  mithril cache clear           remove every entry of both
  mithril cache clear --jax     only JAX's programs
  mithril cache warm            compile adam's kernels on every installed backend
  mithril cache warm adam sgd:momentum=0.9,nonfinite=skip --backend jax
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("cache", help="show or clear the kernel and JAX compilation caches",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       usage="mithril cache [info | clear [--kernels] [--jax] | warm [OPTIMIZER "
                             "...] [--backend B ...] [--dtype D] [--jobs N]]",
                       formatter_class=HelpFormatter)
    p.add_argument("action", nargs="?", choices=("info", "clear", "warm"), default="info",
                   help="info (the default): folders, files and sizes; clear: remove entries; "
                        "warm: compile optimizers' kernels ahead of a run")
    p.add_argument("optimizers", nargs="*", metavar="OPTIMIZER",
                   help="warm: optimizers as --optimizer takes them, NAME[:KEY=VALUE,...] "
                        "(default: adam); their settings choose the kernels (nonfinite=, "
                        "clip_norm=, clip_value=...)")
    p.add_argument("--kernels", action="store_true", help="clear: only the kernel cache")
    p.add_argument("--jax", action="store_true", help="clear: only JAX's compilation cache")
    p.add_argument("--backend", nargs="+", choices=cache.WARM_BACKENDS, metavar="B",
                   help="warm: the backends (numpy, torch, jax; default: those installed)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="warm: the parameters' dtype (default float32)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="warm: processes compiling at once (default: the CPU count)")
    p.add_argument("--here", action="store_true", help=argparse.SUPPRESS)  # (a warm child)
    p.set_defaults(func=run)
    return p


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def run(args: argparse.Namespace) -> int:
    if args.action == "warm":
        return cache_warm.run(args)
    given = [f for f, v in (("OPTIMIZER", args.optimizers), ("--backend", args.backend),
                            ("--jobs", args.jobs), ("--dtype", args.dtype != "float32"))
             if v]
    if given:
        raise CLIError(f"{', '.join(given)}: for `mithril cache warm` only")
    if args.action == "info":
        if args.kernels or args.jax:
            raise CLIError("--kernels and --jax choose what `mithril cache clear` removes")
        for kind, u in cache.usage().items():
            print(f"{kind:8s} {u['folder']}: {u['files']} files, {_size(int(u['bytes']))}")
        return 0
    kinds = tuple(k for k, on in (("kernels", args.kernels), ("jax", args.jax)) if on) or (
        "kernels", "jax")
    try:
        removed = cache.clear(kinds)
    except OSError as e:
        raise CLIError(str(e)) from None
    for kind, n in removed.items():
        print(f"{kind:8s} {n} files removed")
    return 0
