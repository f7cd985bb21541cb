"""Backends: where a compiled model runs and what its arrays are."""

from .backend import Backend
from .jax_backend import JaxBackend
from .numpy_backend import NumpyBackend
from .torch_backend import TorchBackend

__all__ = ["Backend", "JaxBackend", "NumpyBackend", "TorchBackend"]
