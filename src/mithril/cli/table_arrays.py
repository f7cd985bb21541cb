"""The arrays of a table that is not text (``mithril train --data``): an ``.npz``, a
``.safetensors`` file, or a folder of ``.npy`` files (``X.npy``, ``y.npy``, ...), each read
without pickle. :mod:`.tabular` checks what they hold (``X`` 2-d, one target value a row).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .argtypes import look
from .errors import CLIError

#: the suffixes of a file of named arrays (a folder of .npy files is one too)
ARRAY_SUFFIXES = (".npz", ".safetensors")


def holds_arrays(path: str) -> bool:
    """Whether ``path`` is a table of named arrays: an ``.npz``, a ``.safetensors`` file or a
    folder (of ``.npy`` files)."""
    return Path(path).suffix.lower() in ARRAY_SUFFIXES or look(Path.is_dir, path, "--data")


def load_arrays(path: str) -> Mapping[str, np.ndarray]:
    """The named arrays of ``path`` (see :func:`holds_arrays`), or a CLIError naming it."""
    if look(Path.is_dir, path, "--data"):
        return NpyFolder(path)
    if Path(path).suffix.lower() == ".safetensors":
        return _load_safetensors(path)
    return _load_npz(path)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of the .npz ``path``, refusing (CLIError) anything else: an .npy, a
    truncated or non-zip file, pickled objects."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK":  # np.load would try to unpickle it (or read an .npy)
            what = "an empty file" if not magic else "a single .npy array" \
                if magic == b"\x93NUM" else "not a zip archive"
            raise CLIError(f"--data {path}: not an .npz file ({what}); write one with "
                           f"np.savez(path, X=..., y=...)")
        with np.load(path, allow_pickle=False) as z:
            arrays = {}
            for k in z.files:
                try:
                    arrays[k] = z[k]
                except ValueError as exc:
                    if "allow_pickle" not in str(exc):
                        raise
                    # pandas' .values / .to_numpy() of a text column: dtype object
                    raise CLIError(f"--data {path}: the array {k!r} holds Python objects "
                                   f"(dtype object, as pandas' .to_numpy() of a text column "
                                   f"gives), which are not loaded (no pickle); save "
                                   f"{k}.astype(str) (text) or {k}.astype(float) (numbers)"
                                   ) from None
            return arrays
    except OSError as exc:
        raise CLIError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated, pickled objects
        raise CLIError(f"--data {path}: not a readable .npz of plain arrays "
                       f"({type(exc).__name__}: {exc})") from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of the safetensors file ``path`` (as ``safetensors.torch.save_file`` or
    ``safetensors.numpy.save_file`` write them); ``feature_names`` may be given in its metadata
    as a JSON list of strings (safetensors holds numbers only)."""
    import safetensors

    try:
        with safetensors.safe_open(path, framework="np") as g:
            meta = g.metadata() or {}
            arrays = {}
            for k in g.keys():  # noqa: SIM118 - safe_open is not a mapping
                try:
                    arrays[k] = a = g.get_tensor(k)
                    if a.dtype.kind == "V" and "float" in a.dtype.name:  # ml_dtypes' bfloat16
                        arrays[k] = a.astype(np.float32)  # (exact: a float32 holds each)
                except TypeError as exc:  # bfloat16 without ml_dtypes: NumPy has no such dtype
                    raise CLIError(f"--data {path}: tensor {k!r} cannot be read by NumPy "
                                   f"({exc}); save it as float32 (torch: t.float())") from None
    except OSError as exc:
        raise CLIError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    except safetensors.SafetensorError as exc:
        raise CLIError(f"--data {path}: not a readable safetensors file ({exc}); write one "
                       f"with safetensors.numpy.save_file({{'X': ..., 'y': ...}}, path)") from None
    if "feature_names" in meta and "feature_names" not in arrays:
        try:
            names = json.loads(meta["feature_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("not a list of strings")
        except ValueError as exc:
            raise CLIError(f"--data {path}: its metadata 'feature_names' must be a JSON list of "
                           f"strings, e.g. json.dumps(['age', 'income']) ({exc})") from None
        arrays["feature_names"] = np.array(names, dtype=str)
    return arrays


class NpyFolder(Mapping[str, np.ndarray]):
    """The ``.npy`` files of a folder by name without the suffix (``X.npy`` is ``X``), each
    read when asked for (a folder may hold other arrays: a test split, images)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.files = {p.stem: p for p in sorted(Path(path).iterdir())
                          if p.suffix.lower() == ".npy" and p.is_file()}
        except OSError as exc:
            raise CLIError(f"--data {path}: cannot read the folder ({exc.strerror or exc})"
                           ) from None
        if not self.files:
            raise CLIError(f"--data {path}: a folder without .npy files; save the features as "
                           f"X.npy and the target as y.npy there (np.save)")

    def __getitem__(self, name: str) -> np.ndarray:
        p = self.files[name]
        try:
            return np.load(p, allow_pickle=False)
        except EOFError:  # an empty file
            raise CLIError(f"--data {self.path}: {p.name} is empty") from None
        except OSError as exc:
            raise CLIError(f"--data {self.path}: cannot read {p.name} "
                           f"({exc.strerror or exc})") from None
        except ValueError as exc:
            if "allow_pickle" in str(exc):  # pandas' .to_numpy() of a text column
                raise CLIError(f"--data {self.path}: {p.name} holds Python objects (dtype "
                               f"object), which are not loaded (no pickle); save "
                               f"{name}.astype(str) (text) or {name}.astype(float) (numbers)"
                               ) from None
            raise CLIError(f"--data {self.path}: {p.name} is not a readable .npy "
                           f"({exc})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, name: object) -> bool:
        return name in self.files


def _strings(a: np.ndarray) -> list[str]:
    """A string array's values: bytes (dtype S) decoded as UTF-8, not shown as b'...'."""
    if a.dtype.kind == "S":
        return [v.decode("utf-8", errors="replace") for v in a.tolist()]
    return [str(v) for v in a.tolist()]
