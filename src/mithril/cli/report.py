"""Output of the commands: the output folder, CSV/JSON files and plain-text tables.

Files are never written in place: :func:`atomic_file` writes a temporary file beside the
target, flushes it to disk and renames it over the target (``os.replace``), so an interrupted
write leaves the old file or none, never half a file. :func:`staged_dir` does the same for a
set of files (a run folder): they are written into a hidden folder beside it that becomes the
folder at the end.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import json
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

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


#: the longest file or folder name of the usual file systems (bytes; Windows: characters)
NAME_MAX = 255


def _check_name_lengths(path: Path) -> None:
    """Raise ENAMETOOLONG for a name in ``path`` longer than :data:`NAME_MAX`: exists() does
    not see one in a folder still to be made, and mkdir(parents=True) fails only after
    making the folders above it."""
    size = len if os.name == "nt" else (lambda part: len(os.fsencode(part)))
    if any(size(part) > NAME_MAX for part in Path(path).parts):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def ensure_writable_dir(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` and prove a file can be written there, before any training."""
    try:
        _check_name_lengths(path)
        if path.exists() and not path.is_dir():
            raise CLIError(f"{flag} {path}: exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise CLIError(f"{flag} {path}: cannot write there "
                       f"({getattr(exc, 'strerror', None) or exc})") from None
    return path


@contextlib.contextmanager
def _looking_at(path: Path, flag: str) -> Iterator[None]:
    """An OSError while looking at ``path`` (Python 3.11's exists() and is_dir() raise on a
    name too long) is the usage error naming ``flag``, not a traceback; so is a name too long
    in a folder still to be made (:func:`_check_name_lengths`)."""
    try:
        _check_name_lengths(path)
        yield
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def check_out_dir(path: Path, flag: str = "--out") -> Path:
    """What :func:`ensure_writable_dir` refuses, found without creating or writing anything
    (``--dry-run`` checks the run: it must not say it would write where the run cannot)."""
    with _looking_at(path, flag):
        if path.exists() and not path.is_dir():
            raise CLIError(f"{flag} {path}: exists and is not a directory")
        p = path
        while not p.exists() and p != p.parent:  # the folder that would hold the new ones
            p = p.parent
        if p.exists() and not p.is_dir():
            raise CLIError(f"{flag} {path}: cannot write there ({p} is a file)")
        if p.exists() and not os.access(p, os.W_OK):
            raise CLIError(f"{flag} {path}: cannot write there (permission denied)")
    return path


def check_out_file(path: Path, flag: str = "--out", example: str = "schedule.png") -> Path:
    """What :func:`ensure_writable_file` refuses, found without creating anything."""
    _check_file_name(path, flag, example)
    check_out_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def _check_file_name(path: Path, flag: str, example: str) -> None:
    """``path`` names a file (not a folder) that may be written, if it exists."""
    if not path.name or path.name in (".", ".."):
        raise CLIError(f"{flag} {path}: give a file name such as {example}")
    with _looking_at(path, flag):
        if path.exists() and path.is_dir():
            raise CLIError(f"{flag} {path}: is a directory; give a file name such as {example}")
        if path.exists() and not os.access(path, os.W_OK):
            raise CLIError(f"{flag} {path}: cannot write there (permission denied)")


def new_dirs(path: Path, flag: str = "--out") -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: the folders
    :func:`ensure_writable_dir` is about to create, which a failed command removes again."""
    made, p = [], Path(path)
    with _looking_at(path, flag):
        while p != p.parent and not p.exists() and not p.is_symlink():
            made.append(p)
            p = p.parent
    return made


def remove_empty_dirs(dirs: Sequence[Path]) -> None:
    """Remove the folders ``dirs`` (deepest first) while they are empty: a failed command
    leaves no empty folder it created, and never removes anything that holds a file."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (files were written), or gone: keep it and its parents
            return


def run_removing_empty_dirs(command: Callable[[Any, list[Path]], int], args: Any) -> int:
    """``command(args, made)``, where the command lists in ``made`` the folders it creates;
    unless it returns 0, those left empty are removed (:func:`remove_empty_dirs`)."""
    made: list[Path] = []
    status = 1
    try:
        status = command(args, made)
        return status
    finally:
        if status != 0:  # failed, or stopped before writing
            remove_empty_dirs(made)


def ensure_writable_file(path: Path, flag: str = "--out", example: str = "schedule.png"
                         ) -> Path:
    """Check that ``path`` (a file) can be written: its folder is created and probed.
    ``example`` is the file name the messages suggest (the command's own kind of file)."""
    _check_file_name(path, flag, example)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows it."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_like(target: Path, default: int) -> int:
    """The permissions ``target`` has, or those a new file/folder gets (``default`` less the
    umask): the temporary files are private (0600/0700) until renamed."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except OSError:
        return default & ~_umask()


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed to disk
    and renamed to ``path`` (replacing it), on any exception (Ctrl-C included) removed."""
    path = Path(path)
    # (the name shortened: a name near the length limit must not make the temporary one too long)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            os.chmod(tmp, _mode_like(path, 0o666))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


#: files moved last when a staged set is merged into an existing folder: their presence
#: says the others are there
_LAST = ("summary.json", "results.json")


def _merge(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into the existing folder ``dst``, each entry with one
    ``os.replace``: folders first, then files, the :data:`_LAST` ones at the end."""
    entries = sorted(src.iterdir(), key=lambda e: (not e.is_dir(), e.name in _LAST, e.name))
    for entry in entries:
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            try:
                os.replace(entry, target)  # an empty target folder is replaced
            except OSError:
                _merge(entry, target)
        else:
            os.replace(entry, target)
    _fsync_dir(dst)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A hidden folder to write the files of ``out`` into. When the block ends without an
    exception the folder becomes ``out`` in one rename (if ``out`` is missing or empty), or
    its files replace those of ``out`` one rename each; if it ends with an exception (Ctrl-C
    included) the folder is removed and ``out`` is left as it was."""
    out = Path(out)
    try:  # beside out, so that it can be renamed to out
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except OSError:  # the parent is read-only: inside out, merged at the end
        stage = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        os.chmod(stage, _mode_like(out, 0o777))
        yield stage
        if stage.parent != out:
            try:
                os.replace(stage, out)
                _fsync_dir(out.parent)
                return
            except OSError:  # out has files already
                pass
        _merge(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]],
              fields: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV with a header (columns: ``fields`` or the keys of the rows, in order);
    with ``fields`` given, ``rows`` may be a generator, written as it yields."""
    if fields is None:
        rows = list(rows)
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_file(path, "w", newline="") as f:
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
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    with atomic_file(path, "w") as f:
        f.write(text)
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


def same_file(a: Path, b: Path) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (the same path once resolved, or a
    link to it)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False
