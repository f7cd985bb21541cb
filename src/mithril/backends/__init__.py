"""Backends: where a compiled model runs and what its arrays are.

Importing this package imports neither JAX nor torch: each backend imports its framework
when it is first instantiated."""

from .backend import Backend
from .jax_backend import JaxBackend
from .numpy_backend import NumpyBackend
from .torch_backend import TorchBackend

__all__ = ["Backend", "JaxBackend", "NumpyBackend", "TorchBackend"]
