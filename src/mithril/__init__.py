"""Mithril: compose a model once, compile it for NumPy, JAX or PyTorch, and train it."""

from . import models
from .backends import Backend, JaxBackend, NumpyBackend, TorchBackend
from .compiler import CompiledModel, compile
from .dtypes import (  # noqa: A004, F401
    bfloat16,
    bool,
    float,
    float16,
    float32,
    float64,
    int16,
    int32,
    int64,
)
from .errors import DTypeError, KeyMismatchError, ShapeError
from .models import *  # noqa: F403
from .models import __all__ as _model_names
from .models.connection_types import TBD, ToBeDetermined
from .models.model import IOKey
from .types import DataType

__version__ = "0.1.0"
__all__ = ["Backend", "CompiledModel", "DTypeError", "DataType", "IOKey", "JaxBackend",
           "KeyMismatchError", "NumpyBackend", "ShapeError", "TBD", "ToBeDetermined",
           "TorchBackend", "bfloat16",
           "compile", "float16", "float32", "float64", "int16", "int32", "int64", "models",
           *_model_names]  # ml.bool and ml.float too, left out of * so that they do not shadow
# the builtins
