"""Logical models: operators, composite blocks and :class:`Model`."""

from .activations import Gelu, LeakyRelu, Relu, Sigmoid, Softmax, Tanh
from .arithmetic import Add, MatrixMultiply, Multiply
from .blocks import MLP
from .layers import Embedding, Flatten, LayerNorm, Linear
from .losses import CrossEntropy, MeanSquaredError, SquaredError
from .model import Bound, Connection, Model
from .operator import Operator

__all__ = [
    "Add", "Bound", "Connection", "CrossEntropy", "Embedding", "Flatten", "Gelu", "LayerNorm",
    "LeakyRelu", "Linear", "MLP", "MatrixMultiply", "MeanSquaredError", "Model", "Multiply",
    "Operator", "Relu", "Sigmoid", "Softmax", "SquaredError", "Tanh",
]
