"""Argument types of the flags: each refuses a bad value with ``argparse.ArgumentTypeError``,
so argparse ends with its usage message and exit status 2 (never a traceback).

Integers are bounded (``--epochs 1e400``-sized numbers would otherwise overflow or run for
ever), floats must be finite, names must stay inside the ``runs`` folder.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import CLIError

#: the largest value of any integer flag without its own bound (step counts, patience, ...)
MAX_INT = 10**9
#: seeds: what NumPy and scikit-learn take (a 32-bit unsigned integer)
MAX_SEED = 2**32 - 1
#: integers longer than this are refused before they are parsed (Python refuses > 4300 digits)
_MAX_DIGITS = 30


def _int(text: str) -> int:
    s = text.strip()
    if len(s.lstrip("+-")) > _MAX_DIGITS:
        raise argparse.ArgumentTypeError(f"{text[:20]}... is too large")
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in ``[lo, hi]``."""

    def parse(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


def finite_float(text: str) -> float:
    """A finite number (no nan, inf or overflow to inf such as 1e400)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    v = finite_float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return v


def unit_interval(text: str) -> float:
    """A number in [0, 1) (a decay such as ``--ema``)."""
    v = finite_float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def regex(text: str) -> str:
    """A valid, non-empty regular expression (searched in parameter names)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression "
                                         f"({exc})") from None
    return text


def run_name(text: str) -> str:
    """A folder name inside ``runs/``: no path separators, not ``.``/``..``, not empty."""
    name = text.strip()
    seps = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    if not name:
        raise argparse.ArgumentTypeError("must not be empty")
    if any(s in name for s in seps) or name in (".", "..") or "\0" in name or ":" in name:
        raise argparse.ArgumentTypeError(f"{text!r} must be a plain folder name inside runs/ "
                                         "(no '/', '\\', ':', '.' or '..'); use --out DIR "
                                         "for another place")
    return name


def out_path(text: str) -> str:
    """A non-empty path without NUL bytes (whether it can be written is checked later)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if "\0" in text:
        raise argparse.ArgumentTypeError("must not contain a NUL byte")
    return text


def in_path(text: str) -> str:
    """A file or folder to read: non-empty, without NUL bytes (``open`` raises ValueError on
    one, which argparse would not turn into a usage error)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if "\0" in text:
        raise argparse.ArgumentTypeError("must not contain a NUL byte")
    return text


def look(test: Callable[[Path], bool], path: str | Path, flag: str) -> bool:
    """``test(Path(path))`` (``Path.exists``, ``Path.is_dir``, ...) on the path ``flag`` reads;
    one that cannot be looked at (Python 3.11 raises on a name too long) is the usage error
    naming ``flag``, not a traceback."""
    try:
        return test(Path(path))
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
