"""Mithril: compose a model once, compile it for NumPy, JAX or PyTorch, and train it."""

from . import models
from .backends import Backend, JaxBackend, NumpyBackend, TorchBackend
from .compiler import CompiledModel, compile
from .dtypes import bfloat16, float16, float32, float64
from .errors import DTypeError, KeyMismatchError, ShapeError
from .models import *  # noqa: F403
from .models import __all__ as _model_names
from .models.model import IOKey

__version__ = "0.1.0"
__all__ = ["Backend", "CompiledModel", "DTypeError", "IOKey", "JaxBackend", "KeyMismatchError",
           "NumpyBackend", "ShapeError", "TorchBackend", "bfloat16", "compile", "float16", "float32",
           "float64", "models", *_model_names]
