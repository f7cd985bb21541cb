"""The file layer of :mod:`mithril.utils.checkpoint`: a verified, atomically written
safetensors file.

The ``safetensors`` library writes the file (``safetensors.numpy.save``) and decodes its
tensors (``safetensors.safe_open``), checking what the format requires: a UTF-8 JSON header of
at most 100 MB, shapes of non-negative integers, offsets tiling the data exactly to the end of
the file. This module adds digests, the refusal of anything that is not a mithril checkpoint of
float tensors, size checks before the library reads anything, and atomic writes.

The file, as ``safetensors.numpy.save`` writes it::

    8 bytes   N, the header length (little-endian u64); N % 8 == 0, N <= MAX_HEADER_BYTES
    N bytes   the header: compact JSON padded with spaces. ``__metadata__`` comes first and
              holds three strings, in this order (written so: safetensors keeps no order, and
              a reader takes any): ``"mithril"``
              (the checkpoint's JSON metadata), ``"mithril_tensor_sha256"`` (a JSON object:
              tensor name -> SHA-256 of its bytes) and ``"mithril_sha256"`` (see below); then
              one entry per tensor, in file order (by decreasing dtype size, then name):
              ``{"dtype": "F16"|"F32"|"F64"|"I32"|"I64", "shape": [...], "data_offsets": [begin, end]}``.
    the rest  the tensors' little-endian bytes, contiguous, in the same order.

``"mithril_sha256"`` is the SHA-256 of the first ``8 + N`` bytes of the file with its own 64
hex digits replaced by ``"0"`` characters. So every byte of the file is covered: the header by
its digest (which covers the tensor digests), each tensor by its own digest.

Reading checks, before safetensors reads the file: its size, ``N`` (at most
:data:`MAX_HEADER_BYTES` and within the file), the header's JSON (no NaN/Infinity, no
duplicate keys, nesting at most :data:`MAX_DEPTH` levels), that it is exactly its compact
serialisation (non-ASCII characters as UTF-8, as safetensors writes them, or as ``\\u``
escapes, as earlier versions did), its digest, and every tensor's entry: a dtype of :data:`DTYPES`, at most
64 dimensions, ``end - begin == prod(shape) * itemsize``. safetensors then decodes the tensors
one by one, each checked against its digest. Any failure, the library's included, is a
:class:`~mithril.errors.CheckpointError` (a ``ValueError``) naming the file (and the tensor,
where known; a file of another kind, such as ``torch.save``'s zip or pickle, Keras' HDF5, is
said to be one). Only JSON and raw little-endian floats are parsed: nothing can execute.

Writing (:func:`write_file`) goes to a temporary file in the target's folder (a symbolic
link's target's: the file it points to is written, as by ``torch.save``), named
``.ckpt-<target name>-<host tag>-<pid>-<random>.tmp`` (the name cut to 100 bytes, the
host tag 8 hex digits of the SHA-256 of the host name), which is flushed and ``fsync``-ed,
moved over the target with ``os.replace`` and the folder ``fsync``-ed (not on Windows); a
failure removes the temporary file. Before writing, temporary files of earlier saves to the
same target are removed where stale: written on this host by a process that no longer
exists (on Windows, where the pid cannot be checked safely, those the system lets us delete,
i.e. not open in another process) and not in use by this process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from ..errors import CheckpointError

__all__ = ["MAX_DEPTH", "MAX_HEADER_BYTES", "MAX_INT", "loads_guarded", "read_file", "write_file"]

#: the largest safetensors header accepted (as safetensors itself)
MAX_HEADER_BYTES = 100_000_000
#: the deepest JSON nesting accepted (in the header and in the metadata)
MAX_DEPTH = 64
#: the largest integer a counter or a scheduler/optimizer field may hold (int64's largest)
MAX_INT = 2**63 - 1
_MAX_NDIM = 64
#: stored dtype code -> NumPy dtype (float params and slots; the integers of a model's state,
#: as BatchNorm's num_batches_tracked)
DTYPES: dict[str, np.dtype] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
                               "F64": np.dtype("<f8"), "I32": np.dtype("<i4"),
                               "I64": np.dtype("<i8")}
_META, _TENSOR_SHA, _SHA = "mithril", "mithril_tensor_sha256", "mithril_sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")

_active: set[str] = set()  # temporary files this process is writing right now
_active_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} (not JSON)")


def _finite_float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} overflows a float")
    return v


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (a scalar: 0), without recursion."""
    best, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):  # (a tuple is saved as a JSON list)
            children = v
        else:
            continue
        best = max(best, d + 1)
        if best > MAX_DEPTH:
            return best
        stack.extend((c, d + 1) for c in children)
    return best


def loads_guarded(text: str | bytes, where: str) -> Any:
    """``json.loads`` refusing NaN/Infinity, numbers overflowing a float, duplicate keys and
    nesting deeper than :data:`MAX_DEPTH`; any failure is a :class:`CheckpointError` that
    starts with ``where`` (the file and field)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None
    if depth(value) > MAX_DEPTH:
        raise CheckpointError(f"{where} nests deeper than {MAX_DEPTH} levels")
    return value


def _compact(header: Mapping[str, Any], ascii_only: bool) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass")
    return raw + b" " * (-len(raw) % 8)


def _sha_field(digest: str) -> bytes:
    return f'"{_SHA}":"{digest}"'.encode("ascii")


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def encode(meta_json: str, tensors: Mapping[str, np.ndarray]) -> tuple[bytes, memoryview]:
    """The file of metadata ``meta_json`` and float ``tensors`` (name -> array) as (its first
    ``8 + N`` bytes, digest included, and a view of the tensor bytes that follow, to be written
    without a copy). The same inputs give the same bytes in any process: safetensors keeps
    ``__metadata__`` in a hash map, whose order changes from one process to the next, so the
    header is written again with its three fields in one order (the same length: only the
    order changes)."""
    arrays, digests = {}, {}
    for name, arr in tensors.items():
        if arr.dtype.newbyteorder("<") not in DTYPES.values():
            raise TypeError(f"cannot store dtype {arr.dtype} (float16/32/64, int32/64 only)")
        arrays[name] = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
        digests[name] = hashlib.sha256(arrays[name].reshape(-1).view(np.uint8)).hexdigest()
    data = safetensors.numpy.save(arrays, metadata={
        _META: meta_json, _TENSOR_SHA: json.dumps(digests, separators=(",", ":"), sort_keys=True),
        _SHA: "0" * 64})
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"the checkpoint header would be {n} bytes, more than "
                         f"{MAX_HEADER_BYTES} (too many tensors or too large metadata)")
    zero = _sha_field("0" * 64)
    header = json.loads(data[8:8 + n])
    raw = _compact({"__metadata__": {k: header["__metadata__"][k] for k in (_META, _TENSOR_SHA,
                                                                           _SHA)},
                    **{k: v for k, v in header.items() if k != "__metadata__"}}, False)
    if data.count(zero, 8, 8 + n) != 1 or _compact(header, False) != data[8:8 + n] or \
            len(raw) != n:  # what read_file requires (a later safetensors might differ)
        raise RuntimeError("safetensors wrote a header of unexpected form; mithril cannot use it")
    head = data[:8] + raw
    digest = hashlib.sha256(head).hexdigest()
    return head.replace(zero, _sha_field(digest)), memoryview(data)[8 + n:]


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _stem(target: str) -> str:
    """The target's file name as used in its temporary files' names (at most 100 bytes)."""
    stem = os.path.basename(target)[:100]
    while len(stem.encode("utf-8", "surrogateescape")) > 100:
        stem = stem[:-1]
    return stem


def remove_stale_temporaries(folder: str, target: str,
                             also: Callable[[str], bool] | None = None) -> list[str]:
    """Remove the stale temporary files of earlier saves to ``target`` in ``folder`` (the rule
    is in the module docstring), and to every target whose name ``also`` accepts (a
    :class:`~mithril.utils.checkpoint.CheckpointManager`'s other steps); returns the names
    removed."""
    stem, host = _stem(target), _host_tag()
    pattern = re.compile(r"\.ckpt-(.+)-([0-9a-f]{8})-([0-9]+)-[0-9a-f]+\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m.group(2) != host or not (
                m.group(1) == stem or also is not None and also(m.group(1))):
            continue
        full, pid = os.path.join(folder, name), int(m.group(3))
        with _active_lock:
            if full in _active:
                continue
        if os.name != "nt" and pid != os.getpid() and (pid <= 0 or _pid_alive(pid)):
            continue
        try:
            os.remove(full)
            removed.append(name)
        except OSError:  # gone already, or (Windows) still open elsewhere
            pass
    return removed


def _fsync_folder(folder: str) -> None:
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename stands
        pass
    finally:
        os.close(fd)


def _keep_mode(tmp: str, path: str) -> None:
    """Give the temporary file ``tmp`` the permissions of the file at ``path`` it will
    replace, if any (``torch.save`` rewrites a file in place, keeping them: a checkpoint
    made private, ``chmod 600``, stays so). Not on Windows, where a mode is only the
    read-only flag, which would keep the temporary file from being removed on a failure."""
    if os.name == "nt":
        return
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # (none yet: the default permissions, as open() gives)
        return
    os.chmod(tmp, mode)


def write_file(path: str, meta_json: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a checkpoint file atomically (see the module docstring): the file at ``path`` is
    either left as it was or replaced by the complete new one, and no temporary file stays.
    A ``path`` that is a symbolic link writes the file it points to, as ``torch.save`` and
    ``open(path, "wb")`` do (``os.replace`` over the link replaced the link itself: the new
    checkpoint stayed beside it and the file linked to, on another disk perhaps, kept the old)."""
    if os.path.islink(path):
        path = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # (else the error named the temporary file)
        raise FileNotFoundError(errno.ENOENT, f"cannot write a checkpoint into the folder "
                                              f"{folder!r}: there is none (create it first)", path)
    head, body = encode(meta_json, tensors)
    remove_stale_temporaries(folder, path)
    tmp = os.path.join(folder, f".ckpt-{_stem(path)}-{_host_tag()}-{os.getpid()}-"
                               f"{secrets.token_hex(6)}.tmp")
    with _active_lock:
        _active.add(tmp)
    try:
        with open(tmp, "xb") as f:
            _keep_mode(tmp, path)
            f.write(head)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # (a full disk, a file size limit: the write's own error names no file)
            raise OSError(e.errno, f"cannot write the checkpoint {path!r}: {e.strerror} (the "
                                   f"file there, if any, is left as it was)", path) from e
        raise
    finally:
        with _active_lock:
            _active.discard(tmp)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def _check_entry(name: str, info: Any, where: str) -> None:
    """Refuse a tensor entry that is not a float tensor of consistent byte length (safetensors
    checks the rest: non-negative integers, offsets tiling the data)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: tensor '{name}' {what}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("must have exactly the fields dtype, shape, data_offsets")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise bad(f"has dtype {str(info['dtype'])[:20]!r}; a checkpoint holds only the "
                  f"dtypes {', '.join(DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(
            type(d) is int and d >= 0 for d in shape)):
        raise bad(f"has shape {str(shape)[:80]}; expected a list of at most {_MAX_NDIM} "
                  f"non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            type(o) is int for o in offsets)):
        raise bad(f"has data_offsets {str(offsets)[:80]}; expected [begin, end]")
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"of dtype {info['dtype']} and shape {tuple(shape)} needs {nbytes} bytes, "
                  f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")


def read_file(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """The metadata JSON text and the tensors of the checkpoint file ``path``, every byte
    verified (see the module docstring); a :class:`CheckpointError` naming ``path`` if not.
    A missing or unreadable file raises the ``OSError`` of ``open``."""
    where, name = f"checkpoint {path!r}", None
    if os.path.isdir(path):  # (orbax's checkpoints are folders; so are ours, rotated)
        raise IsADirectoryError(errno.EISDIR, "a folder, not a checkpoint file (a "
                                "CheckpointManager's: load CheckpointManager(folder).latest(); "
                                "save_sharded's: load_sharded(folder, dp))", path)
    with open(path, "rb") as f:
        try:
            meta, digests = _read_header(f, where)
            with safetensors.safe_open(path, framework="np") as g:
                if not os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    raise CheckpointError(f"{where} was replaced while being read (by a "
                                          f"concurrent save?); load it again")
                arrays = {}
                for name, digest in digests.items():
                    arrays[name] = arr = g.get_tensor(name)
                    data = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
                    if hashlib.sha256(data.reshape(-1).view(np.uint8)).hexdigest() != digest:
                        raise CheckpointError(f"{where}: tensor '{name}' does not match its "
                                              f"SHA-256 digest (corrupted data)")
                return meta, arrays
        except (OSError, safetensors.SafetensorError) as e:  # all that safetensors raises
            tensor = f"tensor '{name}' " if name is not None else ""
            raise CheckpointError(f"{where}: {tensor}cannot be read: {e}") from None


def read_metadata(path: str) -> str:
    """The metadata JSON text of the checkpoint file ``path``, its header verified (the
    tensors are not read): what a folder's listing needs of each file."""
    where = f"checkpoint {path!r}"
    with open(path, "rb") as f:
        return _read_header(f, where)[0]


#: the first bytes of files a checkpoint path is often given by mistake
_FOREIGN = ((b"PK\x03\x04", "a zip archive (torch.save's format, or a .keras file)"),
            (b"\x80", "a pickle (torch.save's older format, or pickle.dump's)"),
            (b"\x89HDF", "an HDF5 file (Keras' .h5)"), (b"\x93NUMPY", "a .npy file"))


def _foreign(head: bytes) -> str:
    kind = next((what for magic, what in _FOREIGN if head.startswith(magic)), None)
    return f": this is {kind}, not a mithril checkpoint" if kind else ""


def _read_header(f: Any, where: str) -> tuple[str, dict[str, str]]:
    """The metadata JSON text and the tensor digests (name -> hex) of the open checkpoint
    file ``f``, its header checked (see the module docstring)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{where} is {size} bytes long, too short for a checkpoint")
    head = f.read(8)
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8) or n % 8 or n < 8:
        raise CheckpointError(f"{where}: header length {n} is not a multiple of 8 between 8 "
                              f"and min({MAX_HEADER_BYTES}, file size {size} - 8)"
                              + _foreign(head))
    raw = f.read(n)
    header = loads_guarded(raw, f"{where}: the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(_META), str):
        raise CheckpointError(f"{where} is not a mithril checkpoint (no '{_META}' metadata)")
    if _SHA not in meta:
        fmt = "an unknown format"
        try:
            fmt = repr(json.loads(meta[_META]).get("format"))
        except Exception:  # only for the message
            pass
        raise CheckpointError(
            f"{where} has no SHA-256 digest (format {fmt}, written by an older mithril) and "
            f"cannot be verified; this version reads only verified checkpoints: load it with "
            f"the version that wrote it and save it again")
    if set(meta) != {_META, _TENSOR_SHA, _SHA} or list(header)[0] != "__metadata__" or \
            not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: __metadata__ must come first and hold exactly the "
                              f"strings {[_META, _TENSOR_SHA, _SHA]}")
    if not _HEX64.fullmatch(meta[_SHA]):
        raise CheckpointError(f"{where}: '{_SHA}' is not a SHA-256 hex digest")
    if raw not in (_compact(header, False), _compact(header, True)):
        raise CheckpointError(f"{where}: the header is not in compact form (altered or "
                              f"corrupted)")
    field = _sha_field(meta[_SHA])  # once only: a string value's quotes are escaped
    if raw.count(field) != 1 or hashlib.sha256(
            head + raw.replace(field, _sha_field("0" * 64))).hexdigest() != meta[_SHA]:
        raise CheckpointError(f"{where}: the header does not match its SHA-256 digest "
                              f"(altered or corrupted)")
    digests = loads_guarded(meta[_TENSOR_SHA], f"{where}: '{_TENSOR_SHA}'")
    names = [k for k in header if k != "__metadata__"]
    for name in names:
        _check_entry(name, header[name], where)
    if not isinstance(digests, dict) or set(digests) != set(names) or not all(
            isinstance(v, str) and _HEX64.fullmatch(v) for v in digests.values()):
        raise CheckpointError(f"{where}: '{_TENSOR_SHA}' must map every tensor to its digest")
    return meta[_META], {name: digests[name] for name in names}
