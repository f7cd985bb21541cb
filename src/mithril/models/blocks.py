"""Composite blocks built from operators."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from . import activations, activations_more
from .connection_types import TBD
from .connections import IOKey
from .layers import Linear
from .model import Model
from .operator import Operator

_ACTIVATIONS = {"relu": activations.Relu, "leaky_relu": activations.LeakyRelu,
                "sigmoid": activations.Sigmoid, "tanh": activations.Tanh,
                "gelu": activations.Gelu, "softmax": activations.Softmax,
                "softplus": activations.Softplus, "elu": activations.Elu,
                "selu": activations.Selu, "celu": activations.Celu, "mish": activations.Mish,
                "hardswish": activations.Hardswish, "hardsigmoid": activations.Hardsigmoid,
                "silu": activations.Silu, "hardtanh": activations.Hardtanh,
                "logsigmoid": activations_more.LogSigmoid,
                "softsign": activations_more.Softsign}


class MLP(Model):
    """Linear layers of sizes ``dimensions``, each followed by its activation.

    ``activations`` holds operator instances, classes or names ("relu", "tanh", ...),
    or ``None`` for no activation after that layer.
    """

    def __init__(self, activations: Sequence[Operator | type | str | None],
                 dimensions: Sequence[int], use_bias: bool = True, *, name: str | None = None,
                 **torch_only: Any) -> None:
        if "bias" in torch_only:  # (torch's name: ours, rather than Python's message)
            raise TypeError("MLP: no bias= argument (ours is use_bias, a bool)")
        if torch_only:
            raise TypeError(f"MLP: no {next(iter(torch_only))}= argument (MLP takes "
                            f"activations, dimensions, use_bias, name)")
        super().__init__(name=name)
        if len(activations) != len(dimensions):
            raise ValueError(f"MLP: got {len(activations)} activations for {len(dimensions)} "
                             "dimensions; give one per layer (None for none)")
        for act, dim in zip(activations, dimensions, strict=True):
            self += Linear(dim, use_bias=use_bias)
            if act is not None:
                self += _make_activation(act)


class Layer(Model):
    """The published ``Layer(activation, dimension)``: ``Linear(dimension)`` then
    ``activation``, with terminals ``input``, ``weight``, ``bias`` and ``output`` (the
    weight ``(dimension, in)``, torch's ``nn.Linear`` layout); ``input`` / ``weight`` /
    ``bias`` may be given values here, as published. ``activation`` is an operator instance,
    class or name (as :class:`MLP`'s)."""

    def __init__(self, activation: Operator | type | str, dimension: int | None = None,
                 input: Any = TBD, weight: Any = TBD, bias: Any = TBD, *,
                 name: str | None = None) -> None:
        act = _make_activation(activation)  # (checked before anything is built)
        super().__init__(name=name)
        self |= Linear(dimension).connect(input=IOKey("input", value=input),
                                          weight=IOKey("weight", value=weight),
                                          bias=IOKey("bias", value=bias))
        self += act.connect(output="output")
        self.expose_keys("output")
        self.set_cin("input")


def _make_activation(act: Operator | type | str) -> Operator:
    if isinstance(act, Operator):
        # one stateless instance given to several layers (torch users share an nn.GELU()):
        # a copy each; one with weights or state stays itself (sharing them, or refused)
        stateless = not (act.param_init or act.state_init or act.random)
        return copy.copy(act) if stateless else act
    if isinstance(act, str):
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(_ACTIVATIONS)}")
        return _ACTIVATIONS[act]()
    if isinstance(act, type) and issubclass(act, Operator):
        return act()
    raise TypeError(f"activation must be an Operator, Operator class or name, got {act!r}")
