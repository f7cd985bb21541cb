"""Reading a torch ``state_dict`` from where it is kept: a ``torch.nn.Module``, a mapping of
tensors (or NumPy arrays), a ``.safetensors`` file (read here, without the safetensors
package), a ``torch.save``d ``.bin`` / ``.pt`` / ``.pth`` file (``torch.load(weights_only=True)``: a pickle
of other objects is refused, never unpickled), an ``.npz`` (``allow_pickle=False``),
a Hugging Face sharded checkpoint's ``*.index.json``, or a Hugging Face model folder
(``model.safetensors[.index.json]`` or ``pytorch_model.bin[.index.json]``).

Each entry is kept as an :class:`Entry` (shape, dtype name, value), so that the names, shapes
and dtypes are all checked before any value is converted."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, KeyMismatchError, ShapeError

# safetensors' dtype codes; BF16 is kept as its raw uint16 bits (NumPy has no bfloat16)
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Entry:
    """One tensor of a ``state_dict``: its shape, its dtype's name (torch's spelling without
    ``torch.``: ``"float32"``, ``"bfloat16"``, ``"int64"``) and the value (a torch tensor, a
    NumPy array, or a bfloat16's uint16 bits)."""

    shape: tuple[int, ...]
    dtype: str
    value: Any

    def numpy(self, dtype: Any) -> np.ndarray:
        """The value as a new NumPy array of ``dtype`` (never a view of the source)."""
        v = self.value
        if hasattr(v, "detach"):  # a torch tensor (bfloat16 has no NumPy twin)
            v = v.detach().cpu()
            v = (v.float() if self.dtype == "bfloat16" else v).numpy()
        elif self.dtype == "bfloat16":  # safetensors' raw bits: the upper half of a float32
            v = (np.asarray(v).astype(np.uint32) << 16).view(np.float32)
        return np.array(v, dtype=dtype, copy=True, order="C")


def entry(value: Any) -> Entry:
    """``value`` (a torch tensor or anything NumPy can read) as an :class:`Entry`."""
    if isinstance(value, _BF16):
        return Entry(tuple(value.shape), "bfloat16", value.view(np.ndarray))
    if hasattr(value, "detach") and hasattr(value, "dtype"):
        return Entry(tuple(value.shape), str(value.dtype).removeprefix("torch."), value)
    a = value if isinstance(value, np.ndarray) else np.asarray(value)
    return Entry(tuple(a.shape), a.dtype.name, a)


def _identity(value: Any) -> tuple | None:
    """What makes two tensors one (storage, offset, shape, strides, dtype); ``None``: empty."""
    if hasattr(value, "untyped_storage") and value.numel():
        return (value.untyped_storage().data_ptr(), value.storage_offset(),
                tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, np.ndarray) and value.size:
        return (value.__array_interface__["data"][0], value.shape, value.strides, value.dtype)
    return None


def tied(entries: Mapping[str, Entry]) -> dict[str, list[str]]:
    """``{first name: [every name]}`` for the tensors that several names of a ``state_dict``
    hold (tied weights: torch's ``state_dict`` gives an embedding shared with the LM head under
    both names, ``torch.load`` keeps the sharing), in the ``state_dict``'s order."""
    groups: dict[tuple, list[str]] = {}
    for k, e in entries.items():
        if (key := _identity(e.value)) is not None:
            groups.setdefault(key, []).append(k)
    return {g[0]: g for g in groups.values() if len(g) > 1}


Patterns = str | Sequence[str] | Callable[[str], bool] | None


def matcher(patterns: Patterns, option: str, what: str) -> Callable[[str], bool] | None:
    """``patterns`` (a regex, a list of them, each matched as ``re.fullmatch``, or a callable
    name → bool) as a predicate; ``None`` for ``None``."""
    if patterns is None or callable(patterns):
        return patterns
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what}: {option} must be a regex, a list of regexes or a callable "
                        f"(torch name -> bool), got {patterns!r}")
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"{what}: {option} holds a bad regex: {e}") from None
    return lambda k: any(p.fullmatch(k) for p in compiled)


def selected(entries: Mapping[str, Entry], patterns: Patterns, option: str, what: str,
             ) -> set[str]:
    """The names ``patterns`` picks; every regex must match one (a typo is named)."""
    hit = matcher(patterns, option, what)
    if hit is None:
        return set()
    if not callable(patterns):
        regexes = [patterns] if isinstance(patterns, str) else list(patterns)
        unused = [p for p in regexes if not any(re.fullmatch(p, k) for k in entries)]
        if unused:
            raise KeyMismatchError(f"{what}: {option} {unused} match(es) no name of the torch "
                                   "state_dict")
    return {k for k in entries if hit(k)}


def transposed(entries: dict[str, Entry], transpose: Patterns, what: str,
               ignore: Patterns = None) -> tuple[dict[str, Entry], set[str]]:
    """``entries`` without the names ``ignore`` picks, with those ``transpose`` picks seen with
    their last two axes swapped (a Hugging Face ``Conv1D``'s (in, out) weight as a
    ``Linear``'s (out, in)), and the names swapped. Every regex must match a name; a swapped
    one must have rank >= 2 (the errors name them)."""
    dropped = selected(entries, ignore, "ignore", what)
    entries = {k: e for k, e in entries.items() if k not in dropped}
    names = selected(entries, transpose, "transpose", what)
    low = [f"'{k}' {entries[k].shape}" for k in names if len(entries[k].shape) < 2]
    if low:
        raise ShapeError(f"{what}: transpose matches {', '.join(sorted(low))}: only a tensor of "
                          "rank >= 2 has two axes to swap (match the weights, not the biases)")
    out = {}
    for k, e in entries.items():
        if k in names:
            v = e.value.transpose(-1, -2) if hasattr(e.value, "detach") else \
                np.swapaxes(e.value, -1, -2)
            e = Entry((*e.shape[:-2], e.shape[-1], e.shape[-2]), e.dtype, v)
        out[k] = e
    return out, names


def read_state_dict(source: Any, what: str) -> dict[str, Entry]:
    """``source`` (a module, a mapping, or a path; see the module docstring) as
    ``{torch name: Entry}`` in its order. ``what``: the caller, for the messages."""
    if isinstance(source, (str, os.PathLike)):
        return _checked({k: entry(v) for k, v in _read_path(Path(source), what).items()}, what)
    if not isinstance(source, Mapping) and callable(getattr(source, "state_dict", None)):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"{what}: state_dict must be a torch module, a mapping of tensors or a "
                        f"file path, got {type(source).__name__}")
    bad = [k for k in source if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{what}: state_dict keys must be strings, got {bad[:3]!r}")
    return _checked({k: entry(v) for k, v in source.items()}, what)


def _checked(entries: dict[str, Entry], what: str) -> dict[str, Entry]:
    """``entries`` if every one holds numbers (not a string, an object, a nested dict)."""
    bad = [f"'{k}' ({type(e.value).__name__} of {e.dtype})" for k, e in entries.items()
           if e.dtype != "bfloat16" and not (e.dtype.startswith(("float", "int", "uint", "bool",
                                                                 "complex")))]
    if bad:
        raise TypeError(f"{what}: state_dict entries must be tensors or numeric arrays, got "
                        + ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3
                                                else ""))
    return entries


def _read_path(path: Path, what: str) -> dict[str, Any]:
    if path.is_dir():
        found = [path / f for f in _HF_FILES if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{what}: folder '{path}' holds none of {list(_HF_FILES)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file '{path}'")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and Path(v).name == v and v not in ("", ".", "..")
                    for v in weight_map.values()):  # a shard is a file beside the index
                raise ValueError("'weight_map' must map names to shard files in its folder")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{what}: '{path}' is not a sharded checkpoint's index "
                                  f"(a JSON object with a 'weight_map'): {e}") from None
        out: dict[str, Any] = {}
        for shard in dict.fromkeys(weight_map.values()):
            tensors = _read_path(path.parent / shard, what)
            out.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{what}: '{path}' lists {missing[:5]} that its shards lack")
        return out
    if path.suffix == ".safetensors":
        return read_safetensors(path, what)
    if path.suffix == ".npz":  # NumPy's archive: arrays only, never a pickled object
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {k: archive[k] for k in archive.files}
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{what}: cannot read '{path}' as an .npz of arrays "
                                  f"(np.load(allow_pickle=False)): {e}") from None
    import pickle

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something else than tensors
        why = next((line.strip() for line in str(e).splitlines()
                    if "unsupported" in line.lower()), "not a plain state_dict")
        raise CheckpointError(
            f"{what}: '{path}' holds Python objects besides tensors ({why}); it is read with "
            "torch.load(weights_only=True) and never unpickled otherwise (unpickling runs "
            "code): if you trust it, load it yourself and pass its state_dict") from None
    except Exception as e:  # torch's own errors differ between versions
        raise CheckpointError(f"{what}: cannot read '{path}' with torch.load(weights_only=True)"
                              f" (not a torch.save file?): {str(e).splitlines()[0][:200]}"
                              ) from None
    if not isinstance(loaded, Mapping) or not all(hasattr(v, "shape") for v in loaded.values()):
        raise CheckpointError(f"{what}: '{path}' does not hold a state_dict (a flat mapping of "
                              f"name to tensor) but a {type(loaded).__name__}; pick the "
                              "state_dict out of it and pass that")
    return dict(loaded)


def read_safetensors(path: str | os.PathLike, what: str = "read_safetensors") -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file (as ``safetensors.torch.save_file`` writes) as
    read-only NumPy arrays in the file's order (bfloat16: its uint16 bits); a truncated or
    malformed file is a ``CheckpointError`` naming it (and the tensor, where known)."""
    data = Path(path).read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError("the header is cut off")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except ValueError as e:
        raise CheckpointError(f"{what}: '{path}' is not a safetensors file: {e}") from None
    body, out = memoryview(data)[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            if info["dtype"] not in _ST_DTYPES:  # float8, unsigned 16-64: no Mithril dtype
                raise ValueError(f"dtype {info['dtype']} is not one of {sorted(_ST_DTYPES)}")
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
            if not 0 <= begin <= end <= len(body) or any(d < 0 for d in shape) or \
                    end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"bytes {begin}..{end} do not hold {shape} of {info['dtype']}")
            a = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{what}: '{path}': tensor '{name}' is malformed: "
                                  f"{e!r}") from None
        out[name] = _BF16(a) if info["dtype"] == "BF16" else a
    return out


class _BF16(np.ndarray):
    """A bfloat16 tensor's uint16 bits, marked so that :func:`entry` names its dtype."""

    def __new__(cls, bits: np.ndarray) -> _BF16:
        return bits.view(cls)
