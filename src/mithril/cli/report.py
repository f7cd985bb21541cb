"""Output of the commands: the output folder, CSV/JSON files and plain-text tables."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import CLIError


def default_out_dir(command: str, name: str | None = None, root: str = "runs") -> Path:
    """``runs/<name>``, or ``runs/<command>-<timestamp>`` (suffixed if that exists)."""
    if name:
        return Path(root) / name
    base = Path(root) / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def ensure_writable_dir(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` and prove a file can be written there, before any training."""
    try:
        if path.exists() and not path.is_dir():
            raise CLIError(f"{flag} {path}: exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def ensure_writable_file(path: Path, flag: str = "--out") -> Path:
    """Check that ``path`` (a file) can be written: its folder is created and probed."""
    if path.exists() and path.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; give a file name such as schedule.png")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{flag} {path}: cannot write there (permission denied)")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]],
              fields: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV with a header (columns: ``fields`` or the keys of the rows, in order)."""
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return _cell(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: Path, data: Any) -> Path:
    """``data`` as strict JSON (non-finite floats become the strings "nan"/"inf")."""
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    return path


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one of "l"/"r" per column (default: first left)."""
    body = [[str(c) for c in r] for r in rows]
    cells = [list(header), *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(r, widths, align)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in body)])
