"""Type names of the published Mithril's ``mithril.types``: ``DataType`` (any backend's
array, for annotations such as ``ml.Backend[DataType]``) and the dtype names."""

from __future__ import annotations

import enum
from typing import TypeVar

from .dtypes import bfloat16, bool, float16, float32, float64, int16, int32, int64  # noqa: A004, F401

#: a backend's array type (``numpy.ndarray``, ``jax.Array``, ``torch.Tensor``)
DataType = TypeVar("DataType")


class Dtype(str, enum.Enum):
    """The published ``mithril.types.Dtype`` (``x.cast(Dtype.int64)``): each member is its
    dtype's name (``Dtype.int64 == "int64"``), so it goes wherever a dtype name does."""

    uint8 = "uint8"
    int8 = "int8"
    int16 = "int16"
    int32 = "int32"
    int64 = "int64"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    float64 = "float64"
    bool = "bool"

    def __str__(self) -> str:
        return self.value


__all__ = ["DataType", "Dtype", "bfloat16", "float16", "float32", "float64", "int16", "int32",
           "int64"]
