"""The published Mithril's recurrent cells, in its layout: ``PublishedRNNCell`` and
``PublishedLSTMCell`` (its ``RNNCell`` and ``LSTMCell``; ours of those names follow torch's
layout, :mod:`mithril.models.recurrent`).

The published cells take time-major single steps with a middle axis of 1: ``input`` (N, 1,
I) and ``prev_hidden`` (M, 1, H) with M >= N (the published RNN shrinks its batch as shorter
sequences end): the first N rows are the previous state, the rest are passed on unchanged as
``hidden_compl``. Their weights are inputs (given by the published names, differentiable
when compiled as trainable keys), and each also has an output layer. Both are composites of
primitives, wired as the published definitions."""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import Sigmoid, Tanh
from .arithmetic import Add, MatrixMultiply, Multiply
from .model import IOKey, Model
from .operator import Operator, ShapeError, fmt
from .shaping import Concat, Transpose


class RowsOf(Operator):
    """The first rows of ``input`` (``part="head"``: as many as ``like`` has) or the rest
    (``part="tail"``), along the first axis: ``input[:len(like)]`` / ``input[len(like):]``.
    ``like`` is read for its length only (no gradient); ``input``'s gradient is the
    cotangent in those rows, 0 in the others."""

    inputs = ("input", "like")
    any_dtype_inputs = frozenset({"like"})

    def __init__(self, part: str = "head") -> None:
        if part not in ("head", "tail"):
            raise ValueError(f"RowsOf: part must be 'head' or 'tail', got {part!r}")
        self.part = part

    def infer_shape(self, shapes):
        s, like = shapes.get("input"), shapes.get("like")
        for key, v in (("input", s), ("like", like)):
            if v is not None and not v:
                raise ShapeError(f"RowsOf: '{key}' needs a first axis, got shape []")
        if s is None or like is None:
            return None
        m, n = s[0], like[0]
        if m is not None and n is not None and n > m:
            raise ShapeError(f"RowsOf: 'like' {fmt(like)} has more rows than 'input' {fmt(s)}")
        rows = n if self.part == "head" else (None if m is None or n is None else m - n)
        return (rows, *s[1:])

    def forward(self, xp: Any, input: Any, like: Any) -> Any:
        n = like.shape[0]
        return input[:n] if self.part == "head" else input[n:]

    def vjp(self, g, out, args, wrt):
        x, n = args["input"], args["like"].shape[0]
        gx = np.zeros_like(x, dtype=g.dtype)
        if self.part == "head":
            gx[:n] = g
        else:
            gx[n:] = g
        return {k: v for k, v in {"input": gx, "like": np.zeros(np.shape(args["like"]))}.items()
                if k in wrt}

    def __repr__(self) -> str:
        return f"RowsOf({self.part!r})"


def _affine(model: Model, x: Any, weight: str, bias: str | None = None, **output: Any) -> Any:
    """x·weightᵀ (+ bias): the published ``Linear`` with its weight and bias as inputs."""
    wt, mm = Transpose(), MatrixMultiply()
    model |= wt.connect(input=weight)
    model |= mm.connect(left=x, right=wt.output, **({} if bias else output))
    if bias is None:
        return mm.output
    add = Add()
    model |= add.connect(left=mm.output, right=bias, **output)
    return add.output


def _split_state(model: Model) -> Any:
    """The previous hidden state's first N rows (N: the input's), and ``hidden_compl``."""
    head = RowsOf("head")
    model |= head.connect(input="prev_hidden", like="input")
    model |= RowsOf("tail").connect(input="prev_hidden", like="input",
                                    output=IOKey("hidden_compl"))
    return head.output


class PublishedRNNCell(Model):
    """One step of the published Mithril's ``RNNCell``:

        hidden = tanh(input·w_ihᵀ + h·w_hhᵀ + bias_h),   output = hidden·w_hoᵀ + bias_o

    with h the first N rows of ``prev_hidden`` (see the module). Inputs ``input`` (N, 1, I),
    ``prev_hidden`` (M, 1, H), ``w_ih`` (H, I), ``w_hh`` (H, H), ``bias_h`` (H,), ``w_ho``
    (O, H), ``bias_o`` (O,); outputs ``hidden`` (N, 1, H), ``output`` (N, 1, O) and
    ``hidden_compl`` (M − N, 1, H). torch's ``nn.RNNCell`` is :class:`~mithril.models.RNNCell`
    (one bias there is two here: ``bias_ih + bias_hh = bias_h``)."""

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)
        h = _split_state(self)
        z = Add()
        self |= z.connect(left=_affine(self, h, "w_hh"),
                          right=_affine(self, "input", "w_ih", "bias_h"))
        self |= Tanh().connect(input=z.output, output=IOKey("hidden"))
        _affine(self, "hidden", "w_ho", "bias_o", output=IOKey("output"))


class PublishedLSTMCell(Model):
    """One step of the published Mithril's ``LSTMCell``: with xh = [input, h] (the input and
    the first N rows h of ``prev_hidden`` joined along the features, I + H) and c the first N
    rows of ``prev_cell``,

        f = σ(xh·w_fᵀ + bias_f)   i = σ(xh·w_iᵀ + bias_i)
        g = tanh(xh·w_cᵀ + bias_c)   o = σ(xh·w_oᵀ + bias_o)
        cell = f·c + i·g,   hidden = o·tanh(cell),   output = hidden·w_outᵀ + bias_out

    Inputs ``input`` (N, 1, I), ``prev_hidden`` and ``prev_cell`` (M, 1, H), the gate weights
    ``w_f``, ``w_i``, ``w_c``, ``w_o`` (H, I + H) and biases (H,), ``w_out`` (O, H) and
    ``bias_out`` (O,); outputs ``hidden``, ``cell`` (N, 1, H), ``output`` (N, 1, O) and
    ``hidden_compl`` (the rows of ``prev_hidden`` past N). torch's ``nn.LSTMCell`` (gates
    i, f, g, o stacked, weights split by input and hidden) is
    :class:`~mithril.models.LSTMCell`."""

    def __init__(self, *, name: str | None = None) -> None:
        super().__init__(name=name)
        h = _split_state(self)
        c = RowsOf("head")
        self |= c.connect(input="prev_cell", like="input")
        xh = Concat(2, axis=-1)
        self |= xh.connect(input1="input", input2=h)
        gates = {}
        for name, act in (("f", Sigmoid), ("i", Sigmoid), ("c", Tanh), ("o", Sigmoid)):
            a = act()
            self |= a.connect(input=_affine(self, xh.output, f"w_{name}", f"bias_{name}"))
            gates[name] = a.output
        keep, new, cell = Multiply(), Multiply(), Add()
        self |= keep.connect(left=gates["f"], right=c.output)
        self |= new.connect(left=gates["i"], right=gates["c"])
        self |= cell.connect(left=keep.output, right=new.output, output=IOKey("cell"))
        squash, hidden = Tanh(), Multiply()
        self |= squash.connect(input="cell")
        self |= hidden.connect(left=gates["o"], right=squash.output, output=IOKey("hidden"))
        _affine(self, "hidden", "w_out", "bias_out", output=IOKey("output"))
