"""Floating-point dtypes a backend can compute in.

They are plain strings so that ``NumpyBackend(dtype="float32")`` and
``NumpyBackend(dtype=ml.float32)`` mean the same thing.
"""

from __future__ import annotations

float16 = "float16"
bfloat16 = "bfloat16"
float32 = "float32"
float64 = "float64"

FLOAT_DTYPES = (float16, bfloat16, float32, float64)

#: integer and boolean dtypes, for the backends' array helpers (``backend.randint(...,
#: dtype=ml.int32)``); a backend itself computes in one of :data:`FLOAT_DTYPES`
int16 = "int16"
int32 = "int32"
int64 = "int64"
bool = "bool"  # noqa: A001 - the published ``ml.bool``
#: the published ``ml.float``: an alias of float32 there (``mithril/types.py``), here too
float = float32  # noqa: A001


def check_dtype(dtype: object) -> str:
    """Return ``dtype`` as one of :data:`FLOAT_DTYPES`, or raise ``ValueError``."""
    name = getattr(dtype, "name", dtype)
    if not isinstance(name, str) or name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return name
