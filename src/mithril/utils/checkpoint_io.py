"""The file layer of :mod:`mithril.utils.checkpoint`: a verified, atomically written
safetensors file.

File layout (a valid safetensors file, readable by ``safetensors.safe_open``)::

    8 bytes   N, the header length (little-endian u64); N % 8 == 0, N <= MAX_HEADER_BYTES
    N bytes   the header: canonical JSON (``json.dumps(h, separators=(",", ":"))``, ASCII)
              padded with spaces. ``h["__metadata__"]`` comes first and holds three strings:
              ``"mithril"`` (the checkpoint's JSON metadata), ``"mithril_tensor_sha256"`` (a JSON
              object: tensor name -> SHA-256 of its bytes) and ``"mithril_sha256"`` (see below);
              then one entry per tensor, in sorted name order:
              ``{"dtype": "F16"|"F32"|"F64", "shape": [...], "data_offsets": [begin, end]}``.
    the rest  the tensors' little-endian bytes, contiguous, in the same order.

``"mithril_sha256"`` is the SHA-256 of the 8 length bytes and the header in which this very
value is replaced by 64 ``"0"`` characters. So every byte of the file is covered: the header
by its digest (which covers the tensor digests), each tensor by its own digest, and the
header must be exactly the canonical serialisation of what it says (no other whitespace, key
order, escapes or padding are accepted).

Reading checks, in this order, before any tensor memory is allocated: the file size, ``N``
(at most :data:`MAX_HEADER_BYTES` and within the file), the header's JSON (no NaN/Infinity,
no duplicate keys, nesting at most :data:`MAX_DEPTH` levels), its canonical form and digest,
then every tensor's entry: a float dtype, a shape of at most 64 non-negative dimensions,
``end - begin == prod(shape) * itemsize`` and the tensors tiling the data exactly to the end of
the file. Tensors are then read one by one and checked against their digests. Any failure
is a :class:`~mithril.errors.CheckpointError` (a ``ValueError``) naming the file (and the
tensor, where known). Only JSON and raw little-endian floats are parsed: nothing can execute.

Writing (:func:`write_file`) goes to a temporary file in the target's folder, named
``.ckpt-<target name>-<host tag>-<pid>-<random>.tmp`` (the name cut to 100 bytes, the
host tag 8 hex digits of the SHA-256 of the host name), which is flushed and ``fsync``-ed,
moved over the target with ``os.replace`` and the folder ``fsync``-ed (not on Windows); a
failure removes the temporary file. Before writing, temporary files of earlier saves to the
same target are removed where stale: written on this host by a process that no longer
exists (on Windows, where the pid cannot be checked safely, those the system lets us delete,
i.e. not open in another process) and not in use by this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError

__all__ = ["MAX_DEPTH", "MAX_HEADER_BYTES", "MAX_INT", "loads_guarded", "read_file", "write_file"]

#: the largest safetensors header accepted (as safetensors itself)
MAX_HEADER_BYTES = 100_000_000
#: the deepest JSON nesting accepted (in the header and in the metadata)
MAX_DEPTH = 64
#: the largest integer a counter or a scheduler/optimizer field may hold (int64's largest)
MAX_INT = 2**63 - 1
_MAX_NDIM = 64
#: stored dtype code -> NumPy dtype (floats only: a checkpoint holds float params and slots)
DTYPES: dict[str, np.dtype] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"),
                               "F64": np.dtype("<f8")}
_CODES = {v.newbyteorder("="): k for k, v in DTYPES.items()}
_META, _TENSOR_SHA, _SHA = "mithril", "mithril_tensor_sha256", "mithril_sha256"
_PLACEHOLDER = "0" * 64
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
        elif isinstance(v, list):
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


def _canonical(header: Mapping[str, Any]) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return (text + " " * (-len(text) % 8)).encode("ascii")


def _header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the length prefix + canonical header with the digest replaced by zeros."""
    meta = dict(header["__metadata__"])
    meta[_SHA] = _PLACEHOLDER
    raw = _canonical({**header, "__metadata__": meta})
    return hashlib.sha256(struct.pack("<Q", len(raw)) + raw).hexdigest()


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _bytes_of(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """(dtype code, little-endian C-order bytes as a flat uint8 array) of a float array."""
    code = _CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"cannot store dtype {arr.dtype} (float16/32/64 only)")
    flat = np.ascontiguousarray(arr.reshape(-1).astype(DTYPES[code], copy=False))
    return code, flat.view(np.uint8)


def encode(meta_json: str, tensors: Mapping[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    """The length prefix + header, and the data buffers in file order, of a checkpoint file
    with metadata ``meta_json`` and float ``tensors`` (name -> array)."""
    names = sorted(tensors)
    parts, table, digests, offset = [], {}, {}, 0
    for name in names:
        code, data = _bytes_of(tensors[name])
        table[name] = {"dtype": code, "shape": [int(d) for d in tensors[name].shape],
                       "data_offsets": [offset, offset + data.size]}
        digests[name] = hashlib.sha256(data).hexdigest()
        offset += data.size
        parts.append(data)
    meta = {_META: meta_json, _TENSOR_SHA: json.dumps(digests, separators=(",", ":")),
            _SHA: _PLACEHOLDER}
    header = {"__metadata__": meta, **table}
    meta[_SHA] = _header_digest(header)
    raw = _canonical(header)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"the checkpoint header would be {len(raw)} bytes, more than "
                         f"{MAX_HEADER_BYTES} (too many tensors or too large metadata)")
    return struct.pack("<Q", len(raw)) + raw, parts


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


def remove_stale_temporaries(folder: str, target: str) -> list[str]:
    """Remove the stale temporary files of earlier saves to ``target`` in ``folder`` (the rule
    is in the module docstring); returns the names removed."""
    stem, host = _stem(target), _host_tag()
    pattern = re.compile(rf"\.ckpt-{re.escape(stem)}-([0-9a-f]{{8}})-([0-9]+)-[0-9a-f]+\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m.group(1) != host:
            continue
        full, pid = os.path.join(folder, name), int(m.group(2))
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


def write_file(path: str, meta_json: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a checkpoint file atomically (see the module docstring): the file at ``path`` is
    either left as it was or replaced by the complete new one, and no temporary file stays."""
    head, parts = encode(meta_json, tensors)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder, path)
    tmp = os.path.join(folder, f".ckpt-{_stem(path)}-{_host_tag()}-{os.getpid()}-"
                               f"{secrets.token_hex(6)}.tmp")
    with _active_lock:
        _active.add(tmp)
    try:
        with open(tmp, "xb") as f:
            f.write(head)
            for data in parts:
                f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    finally:
        with _active_lock:
            _active.discard(tmp)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def _entry(name: str, info: Any, where: str) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked for consistency."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: tensor '{name}' {what}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("must have exactly the fields dtype, shape, data_offsets")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise bad(f"has dtype {str(info['dtype'])[:20]!r}; a checkpoint holds only float "
                  f"tensors ({', '.join(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(
            type(d) is int and 0 <= d <= MAX_INT for d in shape)):
        raise bad(f"has shape {str(shape)[:80]}; expected a list of at most {_MAX_NDIM} "
                  f"non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            type(o) is int and 0 <= o <= MAX_INT for o in offsets) and offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {str(offsets)[:80]}; expected [begin, end], "
                  f"0 <= begin <= end")
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"of dtype {info['dtype']} and shape {tuple(shape)} needs {nbytes} bytes, "
                  f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _read_exact(f: Any, n: int, where: str, what: str) -> np.ndarray:
    buf = np.empty(n, np.uint8)
    got = f.readinto(memoryview(buf)) if n else 0
    if got != n:
        raise CheckpointError(f"{where}: file ended inside {what} (truncated while reading?)")
    return buf


def read_file(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """The metadata JSON text and the tensors of the checkpoint file ``path``, every byte
    verified (see the module docstring); a :class:`CheckpointError` naming ``path`` if not.
    A missing or unreadable file raises the ``OSError`` of ``open``."""
    where = f"checkpoint {path!r}"
    with open(path, "rb") as f:
        try:
            return _read_open(f, where)
        except OSError as e:
            raise CheckpointError(f"{where}: cannot be read: {e}") from None


def _read_open(f: Any, where: str) -> tuple[str, dict[str, np.ndarray]]:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{where} is {size} bytes long, too short for a checkpoint")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, size - 8) or n % 8 or n < 8:
        raise CheckpointError(f"{where}: header length {n} is not a multiple of 8 between 8 "
                              f"and min({MAX_HEADER_BYTES}, file size {size} - 8)")
    raw = bytes(_read_exact(f, n, where, "the header"))
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
    if _canonical(header) != raw:
        raise CheckpointError(f"{where}: the header is not in canonical form (altered or "
                              f"corrupted)")
    if _header_digest(header) != meta[_SHA]:
        raise CheckpointError(f"{where}: the header does not match its SHA-256 digest "
                              f"(altered or corrupted)")
    digests = loads_guarded(meta[_TENSOR_SHA], f"{where}: '{_TENSOR_SHA}'")
    entries = {k: _entry(k, v, where) for k, v in header.items() if k != "__metadata__"}
    if not isinstance(digests, dict) or set(digests) != set(entries) or not all(
            isinstance(v, str) and _HEX64.fullmatch(v) for v in digests.values()):
        raise CheckpointError(f"{where}: '{_TENSOR_SHA}' must map every tensor to its digest")
    pos, data_len = 0, size - 8 - n
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            raise CheckpointError(f"{where}: tensor '{name}' starts at byte {begin} of the "
                                  f"data, expected {pos} (tensors must tile the data)")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{where}: the tensors end at byte {pos} of the data but the "
                              f"file holds {data_len} bytes of data (truncated or extended?)")

    arrays = {}
    for name, (dtype, shape, begin, end) in entries.items():
        f.seek(8 + n + begin)
        buf = _read_exact(f, end - begin, where, f"tensor '{name}'")
        if hashlib.sha256(buf).hexdigest() != digests[name]:
            raise CheckpointError(f"{where}: tensor '{name}' does not match its SHA-256 digest "
                                  f"(corrupted data)")
        arrays[name] = buf.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    return meta[_META], arrays
