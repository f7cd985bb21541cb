"""Type names of the published Mithril's ``mithril.types``: ``DataType`` (any backend's
array, for annotations such as ``ml.Backend[DataType]``) and the dtype names."""

from __future__ import annotations

from typing import TypeVar

from .dtypes import bfloat16, bool, float16, float32, float64, int16, int32, int64  # noqa: A004, F401

#: a backend's array type (``numpy.ndarray``, ``jax.Array``, ``torch.Tensor``)
DataType = TypeVar("DataType")

__all__ = ["DataType", "bfloat16", "float16", "float32", "float64", "int16", "int32", "int64"]
