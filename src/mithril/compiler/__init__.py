"""From logical model to one function per backend."""

from .compiled_model import CompiledModel, compile
from .program import Program, build_program

__all__ = ["CompiledModel", "Program", "build_program", "compile"]
