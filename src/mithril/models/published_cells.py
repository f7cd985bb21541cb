"""The published Mithril's recurrent cells, in its layout: ``PublishedRNNCell`` and
``PublishedLSTMCell`` (its ``RNNCell`` and ``LSTMCell``; ours of those names follow torch's
layout, :mod:`mithril.models.recurrent`).

The published cells take time-major single steps with a middle axis of 1: ``input`` (N, 1,
I) and ``prev_hidden`` (M, 1, H) with M >= N (the published RNN shrinks its batch as shorter
sequences end): the first N rows are the previous state, the rest are passed on unchanged as
``hidden_compl``. Their weights are inputs under the published names, declared
differentiable as published (trainable unless compiled as data or constant keys), and each
also has an output layer. Both are composites of primitives, wired as the published
definitions. ``ManyToOne``, ``OneToMany`` and ``EncoderDecoder`` unroll one over a
sequence, as the published templates; the weights' shapes follow from the data's."""

from __future__ import annotations

from typing import Any

import numpy as np

from .activations import Sigmoid, Tanh
from .arithmetic import Add, Multiply
from .layers import Linear
from .model import IOKey, Model
from .operator import Operator, ShapeError, fmt
from .shaping import Concat


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


class CellLinear(Linear):
    """x·weightᵀ (+ bias), the published cells' ``Linear`` with its weight and bias as
    connections (``connect(weight="w_ih")``: shared by name between the steps). Its width is
    not fixed here: it is the last axis of ``size`` (a connection read for its shape only:
    the previous hidden state for the gates), else of the weight's or the bias's shape where
    those are known, so the weights' shapes follow from the data's (see :class:`ManyToOne`);
    :class:`Linear`'s shape rules on that width."""

    width_required = False  # (a hint may give it: see add_hint)

    def __init__(self, use_bias: bool = True, size: bool = False) -> None:
        self.dimension, self.use_bias = None, bool(use_bias)
        self.inputs = ("input", "size") if size else ("input",)
        self.any_dtype_inputs = frozenset({"size", "hint"})

    def _width(self, shapes: Any) -> int | None:
        for key, axis in (("size", -1), ("weight", 0), ("bias", 0)):
            s = shapes.get(key)
            if s and s[axis] is not None:
                return s[axis]
        # last: a loss target of the output's rank (see ManyToOne._width_hints)
        s, x = shapes.get("hint"), shapes.get("input")
        if s and x is not None and len(s) == len(x) and s[-1] is not None:
            return s[-1]
        return None

    def add_hint(self) -> None:
        """Read the width from a ``hint`` input too (after the weight's and bias's shapes)."""
        if "hint" not in self.inputs:
            self.inputs = (*self.inputs, "hint")

    def forward(self, xp: Any, input: Any, weight: Any, bias: Any = None, size: Any = None,
                hint: Any = None) -> Any:
        return super().forward(xp, input, weight, bias)

    def vjp(self, g, out, args, wrt):
        return super().vjp(g, out, args, wrt - {"size", "hint"})

    def __repr__(self) -> str:
        return f"CellLinear(use_bias={self.use_bias})"


def _affine(model: Model, x: Any, weight: str, bias: str | None = None, size: Any = None,
            **output: Any) -> Any:
    """x·weightᵀ (+ bias) as :class:`CellLinear`, its width the last axis of ``size``."""
    lin = CellLinear(use_bias=bias is not None, size=size is not None)
    model |= lin.connect(input=x, weight=weight, **({"bias": bias} if bias else {}),
                         **({"size": size} if size is not None else {}),
                         output=output.get("output", IOKey()))
    return lin.output


def _split_state(model: Model) -> Any:
    """The previous hidden state's first N rows (N: the input's), and ``hidden_compl``."""
    head = RowsOf("head")
    model |= head.connect(input="prev_hidden", like="input", output=IOKey())
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
    (one bias there is two here: ``bias_ih + bias_hh = bias_h``). The weights' shapes follow
    from ``input``'s and ``prev_hidden``'s, and O from ``w_ho``'s or ``bias_o``'s, or from
    ``input``'s with ``output_size_from_input=True`` (:class:`OneToMany`'s cells)."""

    def __init__(self, *, output_size_from_input: bool = False, name: str | None = None) -> None:
        super().__init__(name=name)
        h = _split_state(self)
        z = Add()
        self |= z.connect(left=_affine(self, h, "w_hh", size="prev_hidden"),
                          right=_affine(self, "input", "w_ih", "bias_h", size="prev_hidden"),
                          output=IOKey())  # (IOKey(): an internal wire, not an output)
        self |= Tanh().connect(input=z.output, output=IOKey("hidden"))
        _affine(self, "hidden", "w_ho", "bias_o", size="input" if output_size_from_input else None,
                output=IOKey("output"))
        self.output_size_from_input = output_size_from_input
        self.set_differentiability(dict.fromkeys(self.shared_keys, True))

    #: as published: the weights a recurrent model shares between its steps (differentiable:
    #: trainable unless compiled as data or constant keys), and the state passed on
    shared_keys = ("w_ih", "w_hh", "w_ho", "bias_h", "bias_o")
    state_keys = ("hidden",)


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

    def __init__(self, *, output_size_from_input: bool = False, name: str | None = None) -> None:
        super().__init__(name=name)
        h = _split_state(self)
        c = RowsOf("head")
        self |= c.connect(input="prev_cell", like="input", output=IOKey())
        xh = Concat(2, axis=-1)
        self |= xh.connect(input1="input", input2=h, output=IOKey())
        gates = {}
        for name, act in (("f", Sigmoid), ("i", Sigmoid), ("c", Tanh), ("o", Sigmoid)):
            a = act()
            self |= a.connect(input=_affine(self, xh.output, f"w_{name}", f"bias_{name}",
                                            size="prev_hidden"), output=IOKey())
            gates[name] = a.output
        keep, new, cell = Multiply(), Multiply(), Add()
        self |= keep.connect(left=gates["f"], right=c.output, output=IOKey())
        self |= new.connect(left=gates["i"], right=gates["c"], output=IOKey())
        self |= cell.connect(left=keep.output, right=new.output, output=IOKey("cell"))
        squash, hidden = Tanh(), Multiply()
        self |= squash.connect(input="cell", output=IOKey())
        self |= hidden.connect(left=gates["o"], right=squash.output, output=IOKey("hidden"))
        _affine(self, "hidden", "w_out", "bias_out",
                size="input" if output_size_from_input else None, output=IOKey("output"))
        self.output_size_from_input = output_size_from_input
        self.set_differentiability(dict.fromkeys(self.shared_keys, True))

    shared_keys = ("w_f", "w_i", "w_c", "w_o", "w_out", "bias_f", "bias_i", "bias_c", "bias_o",
                   "bias_out")
    state_keys = ("hidden", "cell")


def _check_template(who: str, cell_type: Any, length: int, what: str = "max_sequence_length") -> None:
    if not isinstance(cell_type, (PublishedRNNCell, PublishedLSTMCell)):
        raise TypeError(f"{who}: cell_type must be a PublishedRNNCell() or PublishedLSTMCell() "
                        "(the published RNNCell / LSTMCell layout; mithril.models.RNNCell is "
                        f"torch's), got {type(cell_type).__name__}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"{who}: {what} must be an int >= 2, got {length!r}")


class ManyToOne(Model):
    """The published Mithril's ``ManyToOne(cell_type, max_sequence_length)``: one copy of the
    cell (:class:`PublishedRNNCell` or :class:`PublishedLSTMCell`, the published ``RNNCell`` /
    ``LSTMCell``) per time step, sharing its weights (inputs named as the cell's: ``w_ih``,
    ...). Step t reads ``input{t}`` (N_t, 1, I) and the previous step's state (step 0:
    ``initial_hidden``, and ``initial_cell`` for an LSTM); outputs ``output{t}`` and
    ``hidden_concat``: on axis 0, the ``hidden_compl`` rows of steps 1 .. T−2 (the state of
    the sequences that ended before them), the last step's ``hidden`` and its
    ``hidden_compl``, in the published order (step 0's ``hidden_compl`` is not in it).
    Inputs sorted by length, longest first, so N_0 >= N_1 >= .... The weights' shapes follow
    from the data's (I from ``input0``, H from ``initial_hidden``) but for the output layer's
    width O, which the published infers through the loss: give one of its shapes
    (``shapes={"bias_o": [O]}``), or ``output_size_from_input=True`` (O = I)."""

    def __init__(self, cell_type: PublishedRNNCell | PublishedLSTMCell, max_sequence_length: int,
                 *, output_size_from_input: bool = False, name: str | None = None) -> None:
        _check_template("ManyToOne", cell_type, max_sequence_length)
        super().__init__(name=name)
        make, states = type(cell_type), cell_type.state_keys
        prev: Model | None = None
        tails = []
        for t in range(max_sequence_length):
            cell = make(output_size_from_input=output_size_from_input)
            state = {f"prev_{k}": f"initial_{k}" if prev is None else getattr(prev, k)
                     for k in states}
            self |= cell.connect(input=f"input{t}", output=f"output{t}", **state,
                                 **{k: k for k in cell.shared_keys},
                                 **{k: IOKey() for k in (*states, "hidden_compl")})
            if t == max_sequence_length - 1:
                tails.append(cell.hidden)
            if t > 0:
                tails.append(cell.hidden_compl)
            prev = cell
        concat = Concat(len(tails), axis=0)
        self |= concat.connect(**{f"input{i + 1}": c for i, c in enumerate(tails)},
                               output="hidden_concat")
        self.set_cin("input0")
        self.set_cout("hidden_concat")
        self._hinted, self._length = False, max_sequence_length

    def _width_hints(self, owner: Model, output_key: str, target: Any) -> None:
        """As the published infers the output layer's width O back through a loss: called by
        the ``TrainModel`` that wraps this model (``owner``, sharing its blocks) for a loss
        of ``input=output_key`` and ``target`` (its wire), once compiled. Every step's output
        layer then also reads O from the target's last axis when it has the output's rank
        and neither ``w_ho``'s nor ``bias_o``'s shape gives it (the first such target)."""
        steps = {f"output{t}" for t in range(self._length)}
        if self._hinted or output_key not in steps or output_key not in self.conns:
            return
        for block, mapping in owner.blocks:
            if not isinstance(block, (PublishedRNNCell, PublishedLSTMCell)):
                continue
            for op, inner in block.blocks:
                if isinstance(op, CellLinear) and inner.get("output") is block.conns.get("output"):
                    op.add_hint()
                    inner["hint"] = block._named("$output_like")
                    mapping["$output_like"] = target
        self._hinted = True


class OneToMany(Model):
    """The published Mithril's ``OneToMany(cell_type, max_sequence_length, teacher_forcing)``:
    one copy of the cell per step, sharing its weights (inputs named as the cell's). Step 0
    reads ``input`` (N_0, 1, I) and ``initial_hidden`` (and ``initial_cell``); step t > 0
    reads the previous step's state and, as its input, the first N_t rows of the previous
    step's ``output`` (``teacher_forcing=True``: of ``target{t-1}``), N_t being the rows of
    ``target{t}`` (read for its shape only: sequences sorted longest first stop as their
    targets end). Outputs ``output0`` .. ``output{T-1}``; the output is the next step's input,
    so the cell's output size is its input size."""

    def __init__(self, cell_type: PublishedRNNCell | PublishedLSTMCell, max_sequence_length: int,
                 teacher_forcing: bool = False, *, name: str | None = None) -> None:
        _check_template("OneToMany", cell_type, max_sequence_length)
        if not isinstance(teacher_forcing, bool):
            raise TypeError(f"OneToMany: teacher_forcing must be a bool, got {teacher_forcing!r}")
        super().__init__(name=name)
        make, states = type(cell_type), cell_type.state_keys
        prev: Model | None = None
        for t in range(max_sequence_length):
            cell = make(output_size_from_input=True)  # (its output is the next step's input)
            if prev is None:
                given: Any = "input"
                state = {f"prev_{k}": f"initial_{k}" for k in states}
            else:
                rows = RowsOf("head")
                self |= rows.connect(input=f"target{t - 1}" if teacher_forcing else prev.output,
                                     like=f"target{t}", output=IOKey())
                given, state = rows.output, {f"prev_{k}": getattr(prev, k) for k in states}
            self |= cell.connect(input=given, output=f"output{t}", **state,
                                 **{k: k for k in cell.shared_keys},
                                 **{k: IOKey() for k in (*states, "hidden_compl")})
            prev = cell
        self.set_cin("input")
        self.set_cout(f"output{max_sequence_length - 1}")


class OneToManyInference(Model):
    """The published Mithril's ``OneToManyInference(cell_type, max_sequence_length)``:
    :class:`OneToMany` without targets: every step reads the whole previous output (no
    sequence ends), ``output0`` .. ``output{T-1}``."""

    def __init__(self, cell_type: PublishedRNNCell | PublishedLSTMCell, max_sequence_length: int,
                 *, name: str | None = None) -> None:
        _check_template("OneToManyInference", cell_type, max_sequence_length)
        super().__init__(name=name)
        make, states = type(cell_type), cell_type.state_keys
        prev: Model | None = None
        for t in range(max_sequence_length):
            cell = make(output_size_from_input=True)
            given: Any = "input" if prev is None else prev.output
            state = {f"prev_{k}": f"initial_{k}" if prev is None else getattr(prev, k)
                     for k in states}
            self |= cell.connect(input=given, output=f"output{t}", **state,
                                 **{k: k for k in cell.shared_keys},
                                 **{k: IOKey() for k in (*states, "hidden_compl")})
            prev = cell
        self.set_cin("input")
        self.set_cout(f"output{max_sequence_length - 1}")


class EncoderDecoder(Model):
    """The published Mithril's ``EncoderDecoder(cell_type, max_input_sequence_length,
    max_target_sequence_length, teacher_forcing)``: a :class:`ManyToOne` encoder (inputs
    ``input0`` .., ``initial_hidden``, the cell's weights ``w_ih`` ..) whose ``hidden_concat``,
    reordered by ``indices`` (``PermuteTensor``: row i is row ``indices[i]``, from the
    encoder's order to the decoder's), is the initial hidden state of a :class:`OneToMany`
    decoder with its own weights and input, prefixed ``decoder_`` (``decoder_w_ih``, ..,
    ``decoder_input``; ``decoder_initial_cell`` for an LSTM); the targets ``target0`` .. keep
    their names. Outputs: the decoder's ``output0`` .."""

    def __init__(self, cell_type: PublishedRNNCell | PublishedLSTMCell,
                 max_input_sequence_length: int, max_target_sequence_length: int,
                 teacher_forcing: bool = False, *, name: str | None = None) -> None:
        _check_template("EncoderDecoder", cell_type, max_input_sequence_length,
                        "max_input_sequence_length")
        super().__init__(name=name)
        from .permute_tensor import PermuteTensor

        # (the encoder's outputs are not read: its output layer is given the input's width)
        encoder = ManyToOne(cell_type, max_input_sequence_length, output_size_from_input=True)
        decoder = OneToMany(cell_type, max_target_sequence_length, teacher_forcing)
        self |= encoder.connect(**{k: k for k in encoder.input_keys},
                                **{k: IOKey() for k in encoder.output_keys})
        permute = PermuteTensor()
        self |= permute.connect(input=encoder.hidden_concat, indices="indices", output=IOKey())
        self |= decoder.connect(initial_hidden=permute.output,
                                **{k: k if k.startswith("target") else f"decoder_{k}"
                                   for k in decoder.input_keys if k != "initial_hidden"},
                                **{k: k for k in decoder.output_keys})
        self.set_cout(decoder.cout)


class EncoderDecoderInference(Model):
    """The published Mithril's ``EncoderDecoderInference(cell_type, max_input_sequence_length,
    max_target_sequence_length)``: :class:`EncoderDecoder`'s encoder, its ``hidden_concat``
    the initial hidden state of a :class:`OneToManyInference` decoder (no ``indices``), the
    names as :class:`EncoderDecoder`'s (a trained one's parameters evaluate it)."""

    def __init__(self, cell_type: PublishedRNNCell | PublishedLSTMCell,
                 max_input_sequence_length: int, max_target_sequence_length: int, *,
                 name: str | None = None) -> None:
        _check_template("EncoderDecoderInference", cell_type, max_input_sequence_length,
                        "max_input_sequence_length")
        super().__init__(name=name)
        encoder = ManyToOne(cell_type, max_input_sequence_length, output_size_from_input=True)
        decoder = OneToManyInference(cell_type, max_target_sequence_length)
        self |= encoder.connect(**{k: k for k in encoder.input_keys},
                                **{k: IOKey() for k in encoder.output_keys})
        self |= decoder.connect(initial_hidden=encoder.hidden_concat,
                                **{k: f"decoder_{k}" for k in decoder.input_keys
                                   if k != "initial_hidden"},
                                **{k: k for k in decoder.output_keys})
        self.set_cout(decoder.cout)
