"""The published Mithril's support-vector machines: ``LinearSVM`` and ``KernelizedSVM(kernel)``,
as composites of ``Linear`` (and a kernel block), with the published terminal names: their
parameters are ``weight`` and ``bias`` (the terminals of the same names), trained with a
hinge loss (``HingeLoss`` / ``QuadHingeLoss``) against targets in {−1, 1}; and the
kernel machine's regularizer ``QuadraticFormRegularizer``."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KeyMismatchError
from .arithmetic import MatrixMultiply, Multiply
from .layers import Linear
from .model import IOKey, Model
from .operator import Operator
from .shaping import Transpose
from .unary_primitives import _full


class Sign(Operator):
    """sign(x) elementwise (−1, 0 or 1), as ``torch.sign``; its gradient is 0 everywhere
    (torch's and JAX's), so nothing differentiates through a decision."""

    vjp_ignores = frozenset({"output"})

    def forward(self, xp: Any, input: Any) -> Any:
        return _full(xp).sign(input)

    def vjp(self, g, out, args, wrt):
        return {"input": np.zeros_like(args["input"])}


class LinearSVM(Model):
    """A linear support-vector machine, as the published Mithril's ``LinearSVM``: for a
    (N, d) ``input``,

        output = input · weightᵀ + bias          (N, 1), the decision function
        decision_output = sign(output)           (N, 1), the predicted class in {−1, 0, 1}

    ``weight`` (1, d) and ``bias`` (1,) are parameters under those names (the ``Linear``'s,
    named as the published terminals). The margin is trained with ``HingeLoss`` (or
    ``QuadHingeLoss``) on ``output``; ``decision_output`` has no gradient (discard it with
    ``compile(discard_keys=["decision_output"])`` when training)."""

    positional = ("input", "weight", "bias", "output", "decision_output")  # (published)

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)
        self |= Linear(1).connect(input="input", weight="weight", bias="bias", output="output")
        self |= Sign().connect(input="output", output="decision_output")
        self.set_cout("output")


def _kernel_keys(kernel: Operator | Model) -> tuple[tuple[str, ...], str]:
    """The kernel block's inputs and its one output; a kernel of fewer than two inputs or
    of several outputs is refused by name, as published."""
    if isinstance(kernel, Operator):
        ins, outs = tuple(kernel.inputs), ("output",)
    elif isinstance(kernel, Model):
        ins, outs = tuple(kernel.input_keys), tuple(kernel.output_keys)
    else:
        raise TypeError(f"KernelizedSVM: kernel must be a block (an Operator or a Model), "
                        f"got {kernel!r}")
    if len(ins) < 2:
        raise KeyMismatchError(f"KernelizedSVM: the kernel needs at least two inputs, "
                               f"{type(kernel).__name__} has {list(ins)}")
    if len(outs) != 1:
        raise KeyMismatchError(f"KernelizedSVM: the kernel needs a single output, "
                               f"{type(kernel).__name__} has {list(outs)}")
    return ins, outs[0]


class KernelizedSVM(Model):
    """A kernel support-vector machine, as the published Mithril's
    ``KernelizedSVM(kernel)``: the kernel matrix K = kernel(input1, input2) of the N points
    ``input1`` against the M points ``input2`` (every input of the kernel block is an input
    of this model under its own name: ``l_scale`` and ``sigma`` of ``RBFKernel``,
    ``poly_coef`` and ``degree`` of ``PolynomialKernel``), then

        kernel = K                               (N, M), an output
        output = K · weightᵀ + bias              (N, 1), the decision function

    ``weight`` (1, M), one coefficient per support point, and ``bias`` (1,) are parameters
    under those names. ``kernel`` is a block with at least two inputs and one output (a
    ``KeyMismatchError`` otherwise); ``cin`` is ``input1``."""

    def __init__(self, kernel: Operator | Model, *, name: str | None = None) -> None:
        ins, out = _kernel_keys(kernel)
        super().__init__(name=name)
        self |= kernel.connect(**{k: k for k in ins}, **{out: "kernel"})
        self |= Linear(1).connect(input="kernel", weight="weight", bias="bias", output="output")
        self.set_cin(ins[0])
        self.set_cout("output")


class QuadraticFormRegularizer(Model):
    """½·w K wᵀ for a (1, N) ``input`` w and an (N, N) ``kernel`` K: the squared RKHS norm
    of a kernel machine's decision function, as the published Mithril's
    ``QuadraticFormRegularizer``. ``output`` is (1, 1). Regularize a ``KernelizedSVM``'s
    weight with it: ``train_model.add_regularization(QuadraticFormRegularizer(), coef=0.1,
    input="weight", kernel="kernel")``."""

    positional = ("input", "kernel", "output")  # (published)

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)
        transpose, wk, wkw = Transpose(), MatrixMultiply(), MatrixMultiply()
        self |= transpose.connect(input="input", output=IOKey("input_t", expose=False))
        self |= wk.connect(left="input", right="kernel", output=IOKey("wk", expose=False))
        self |= wkw.connect(left="wk", right="input_t", output=IOKey("wkw", expose=False))
        self |= Multiply().connect(left="wkw", right=0.5, output="output")
        # the published shapes (1, N) and (N, N): the products check the Ns, not a w of
        # several rows (which gave a (k, k) matrix)
        self.set_shapes(input=[1, None], kernel=[None, None])
