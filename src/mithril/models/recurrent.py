"""Recurrent layers with torch's layouts, gate order, numerics and initialisation:
``RNNCell``, ``LSTMCell``, ``GRUCell`` (one step) and ``RNN``, ``LSTM``, ``GRU`` (a sequence,
optionally stacked, bidirectional, with dropout between layers).

Weights are ``weight_ih`` (G·H, I) and ``weight_hh`` (G·H, H), biases ``bias_ih`` and
``bias_hh`` (G·H,), with the gates stacked in torch's order: G = 1 (RNN), 4 for LSTM
(i, f, g, o) and 3 for GRU (r, z, n). Every one starts as torch's U(−1/√H, 1/√H). Per step,
with a = x·W_ihᵀ + b_ih and b = h·W_hhᵀ + b_hh:

* RNN:  h' = tanh(a + b) (or relu);
* LSTM: i, f, g, o = σ, σ, tanh, σ of the four blocks of a + b; c' = f·c + i·g; h' = o·tanh(c')
  (with ``proj_size``: h' = (o·tanh(c'))·W_hrᵀ);
* GRU:  r, z = σ of the first two blocks of a + b; n = tanh(a_n + r·b_n); h' = (1 − z)·n + z·h.

One operator, :class:`Recurrence`, runs the whole time loop of one layer in one direction:
x·W_ihᵀ for every step in one matmul, then the recurrent part step by step — a Python loop on
NumPy and torch, ``jax.lax.scan`` on JAX (one compiled step, whatever the length). Its NumPy
VJP is backpropagation through time with the per-step gates recomputed once. The cells and the
sequence layers are small models around it (indexing, transposes, concatenation, dropout); a
stacked or bidirectional layer holds one ``Recurrence`` per layer and direction.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, ClassVar

import numpy as np

from ..errors import InputValueError, KeyMismatchError
from .dropout import Dropout
from .model import Bound, IOKey, Model
from .operator import Operator, ShapeError, backend_of, fmt, torch_of
from .recurrent_bptt import bptt
from .recurrent_state_dict import GATES, ROLES, _TorchNames
from .recurrent_unbatched import _TimeMajor, batch_of_one, check_unbatched, unbatched_vjp
from .shaping import Concat, Indexer


def _sigmoid(xp: Any, x: Any) -> Any:
    t = torch_of(xp)
    return t.sigmoid(x) if t is not None else 0.5 * (xp.tanh(0.5 * x) + 1)


def _relu(xp: Any, x: Any) -> Any:
    """max(x, 0) with torch's gradient at 0 (zero): ``jnp.maximum`` splits it, ½ each way,
    and a ReLU RNN meets z = 0 exactly (zero-padded steps from a zero state, no bias)."""
    if backend_of(xp) == "jax":
        import jax

        return jax.nn.relu(x)
    return xp.maximum(x, 0)  # NumPy (its VJP masks z > 0); torch's namespace: torch.relu


def _positive_int(who: str, what: str, v: Any) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v <= 0:
        raise ValueError(f"{who}: {what} must be a positive int, got {v!r}")
    return int(v)


def _flag(who: str, what: str, v: Any) -> bool:
    """A switch: a bool, as torch's ``bias`` / ``batch_first``. Another value is refused:
    ``ml.LSTM(8, 4)``, torch's ``nn.LSTM(input_size, hidden_size)``, was H = 8, batch_first."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    hint = " (the first argument is hidden_size: the input size is inferred, or input_size=, " \
        "unlike torch's positional order)" if isinstance(v, (int, np.integer)) else ""
    raise TypeError(f"{who}: {what} must be a bool, got {v!r}{hint}")


def _wire(name: str) -> Any:
    """A connection by name: one starting with "_" is a wire internal to the block."""
    return IOKey(name, expose=False) if name.startswith("_") else name


def _zeros(xp: Any, like: Any, shape: tuple[int, ...]) -> Any:
    """Zeros of ``shape`` in ``like``'s dtype (and device), in ``xp``'s array type."""
    t = torch_of(xp)
    if t is not None:
        return t.zeros(shape, dtype=like.dtype, device=like.device)
    return xp.zeros(shape, dtype=like.dtype)


class Recurrence(Operator):
    """The time loop of one RNN / LSTM / GRU layer in one direction (see the module docstring).

    Inputs: ``input`` (T, N, I), time-major, and ``h0`` (N, H) (and ``c0`` for an LSTM); the
    output stacks the hidden states, and for an LSTM the cell states: (S, T, N, H) with S = 2
    for an LSTM, else 1, each at its time position. Unbatched (torch's): ``input`` (T, I),
    ``h0`` / ``c0`` without the N axis, output (S, T, H): run as a batch of one.

    ``reverse``: run from t = T − 1 down to 0 (the reverse direction of a bidirectional layer);
    the final state is then the one at t = 0. ``initial_state=False``: no ``h0`` / ``c0``
    inputs, the states start at zero. ``num_states`` K: ``h0`` / ``c0`` hold the initial
    states of K layers and directions, (K, N, H), and this one reads ``[state_index]``.
    ``input_size``: the feature size ``input`` must have (checked; None: any).
    ``cell``: the one step of a cell (its errors name the cell and its (N, I) input).
    ``state_names``: the names a shape error gives ``h0`` / ``c0``, the enclosing block's
    terminals (``("initial_hidden", "initial_cell")``); None: ``h0`` / ``c0``.
    ``lengths=True``: an input ``lengths`` (N,) of ints in [1, T], each sequence's length, as
    torch's packed sequences: a step t ≥ lengths[n] leaves that entry's states as they are
    (so the reverse direction starts at its last step), and the output gets a first slot
    holding the hidden states with zeros at those steps: (1 + S, T, N, H).
    """

    param_init: dict[str, str]  # per instance: U(±1/√H) for every weight and bias
    int_inputs = value_checked_inputs = frozenset({"lengths"})

    def __init__(self, kind: str, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", *, reverse: bool = False, initial_state: bool = True,
                 num_states: int | None = None, state_index: int = 0,
                 input_size: int | None = None, state_names: tuple[str, ...] | None = None,
                 lengths: bool = False, proj_size: int = 0, cell: bool = False) -> None:
        if kind not in GATES:
            raise ValueError(f"Recurrence: kind must be one of {sorted(GATES)}, got {kind!r}")
        who = kind.upper() + ("Cell" if cell else "")
        self.cell = bool(cell)  # one step of a cell: its error messages name the cell's shapes
        self.hidden_size = _positive_int(who, "hidden_size", hidden_size)
        if nonlinearity not in ("tanh", "relu") or (kind != "rnn" and nonlinearity != "tanh"):
            raise ValueError(f"{who}: nonlinearity must be 'tanh' or 'relu' (an RNN's only: LSTM "
                             f"and GRU have their own gates), got {nonlinearity!r}")
        self.kind, self.bias, self.nonlinearity = kind, _flag(who, "bias", bias), nonlinearity
        self.reverse, self.initial_state = bool(reverse), bool(initial_state)
        self.num_states = None if num_states is None else _positive_int(who, "num_states", num_states)
        self.state_index = int(state_index)
        if self.num_states is not None and not 0 <= self.state_index < self.num_states:
            raise ValueError(f"{who}: state_index {state_index!r} is not in [0, {self.num_states})")
        self.input_size = None if input_size is None else _positive_int(who, "input_size", input_size)
        if proj_size and (kind != "lstm" or not 0 < _positive_int(who, "proj_size", proj_size)
                          < self.hidden_size):
            raise ValueError(f"{who}: proj_size ({proj_size!r}) must be an int in [0, hidden_size"
                             f" = {self.hidden_size}), for an LSTM only (as torch)")
        self.proj_size = int(proj_size)
        self.state_size = self.proj_size or self.hidden_size  # h's features
        states = ("h0", "c0") if kind == "lstm" else ("h0",)
        self.lengths = _flag(who, "lengths", lengths)
        self.inputs = ("input", *(("lengths",) if self.lengths else ()),  # type: ignore[misc]
                       *(states if self.initial_state else ()))
        self.state_names = dict(zip(states, state_names or states))
        init = f"fan_in_uniform:{self.hidden_size}"
        keys = (ROLES if self.bias else ROLES[:2]) + (("weight_hr",) if self.proj_size else ())
        self.param_init = {k: init for k in keys}  # type: ignore[misc]

    # -- shapes --------------------------------------------------------------------------
    def _check(self, shapes: Any) -> int | None:
        who, h = self.kind.upper() + ("Cell" if self.cell else ""), self.hidden_size
        s = shapes.get("input")
        if s is not None and len(s) not in (2, 3):
            # a cell's input arrives here as (1, N, I): name the shape its user gave
            given, want = (s[1:], "(N, I) or unbatched (I,)") if self.cell \
                else (s, "(T, N, I) or unbatched (T, I)")
            raise ShapeError(f"{who}: 'input' must be {want}, got shape {fmt(given)}")
        one = s is not None and len(s) == 2  # unbatched (T, I), as torch (a cell's: (1, I))
        if s is not None and s[0] == 0:  # as torch: no final state to give (stack of nothing)
            raise ShapeError(f"{who}: 'input' has no time steps (T = 0 in its time-major shape "
                             f"{fmt(s)}); a sequence needs at least one, as torch's")
        if s is not None and self.input_size is not None and s[-1] is not None \
                and s[-1] != self.input_size:
            raise ShapeError(f"{who}: 'input' must have input_size = {self.input_size} features "
                             f"(its last axis here), got shape {fmt(s)}")
        n = None if s is None or one else s[1]
        if self.cell and s is not None:
            s = s[1:]  # the messages below name the cell's own (N, I) input
        if one:
            check_unbatched(who, s, self.lengths)
        ls = shapes.get("lengths") if self.lengths else None
        if ls is not None and (len(ls) != 1 or not (n is None or ls[0] is None or ls[0] == n)):
            # s is time-major (T, N, I) here, a batch_first input's axes swapped: name N
            raise ShapeError(f"{who}: 'lengths' must be (N,), one length per sequence of the "
                             f"batch (N = {n}: 'input' is {fmt(s)} in time-major (T, N, I) "
                             f"order), got shape {fmt(ls)}")
        k = self.num_states
        for key in self.inputs[1:]:
            hs = shapes.get(key)
            if key == "lengths" or hs is None:
                continue
            lead = () if k is None else (k,)
            h = self.state_size if key == "h0" else self.hidden_size  # proj_size: h is narrower
            ok = len(hs) == len(lead) + 2 - one and (hs[-1] is None or hs[-1] == h) \
                and (one or n is None or hs[-2] is None or hs[-2] == n) \
                and (k is None or hs[0] is None or hs[0] == k)
            if ok:
                continue
            name = self.state_names.get(key, key)
            if one:  # as torch: an unbatched input takes unbatched states
                want = f"({h},)" if k is None else f"({k}, {h}) (num_layers · num_directions = {k})"
                raise ShapeError(f"{who}: '{name}' must be {want} for the unbatched 'input' "
                                 f"{fmt(s)}, got shape {fmt(hs)}")
            # (a layer's s is time-major, a batch_first input's axes swapped: name N itself)
            batch = f"N the batch of 'input' {fmt(s)}" if self.cell or n is None else \
                f"N = {n} the batch of 'input' ({fmt(s)} in time-major (T, N, I) order)"
            if k is None:
                raise ShapeError(f"{who}: '{name}' must be (N, {h}) with {batch}, got shape "
                                 f"{fmt(hs)}")
            raise ShapeError(f"{who}: '{name}' must be (N, {h}) per layer and direction, ({k}, N, "
                             f"{h}) in all (num_layers · num_directions = {k}), with {batch}, "
                             f"got shape {fmt(hs)}")
        return None if s is None else s[-1]

    def param_shapes(self, shapes):
        i = self._check(shapes)
        if i is None:
            return {}
        gh = GATES[self.kind] * self.hidden_size
        out = {"weight_ih": (gh, i), "weight_hh": (gh, self.state_size)}
        if self.bias:
            out.update({"bias_ih": (gh,), "bias_hh": (gh,)})
        if self.proj_size:
            out["weight_hr"] = (self.proj_size, self.hidden_size)
        return out

    def infer_shape(self, shapes):
        self._check(shapes)
        s = shapes.get("input")
        slots = (2 if self.kind == "lstm" else 1) + self.lengths
        return None if s is None else (slots, *s[:-1], self.hidden_size)  # (unbatched: no N)

    def check_inputs(self, shapes, dtypes, arrays, names) -> None:
        """Every length in [1, T] (reads the min and max), as torch's packed sequences."""
        lens, s = arrays.get("lengths"), shapes.get("input")
        if lens is None or s is None or s[0] is None or not math.prod(lens.shape):
            return
        lens = lens.long() if hasattr(lens, "long") else lens  # torch's uint32: no min
        lo, hi = int(lens.min()), int(lens.max())
        if lo < 1 or hi > s[0]:
            raise InputValueError(f"input '{names['lengths']}': sequence length "
                                  f"{lo if lo < 1 else hi} out of range: every length must be in "
                                  f"[1, {s[0]}] (the {s[0]} time steps of 'input')")

    # -- one step, any namespace ---------------------------------------------------------
    def _step(self, xp: Any, a: Any, h: Any, c: Any, w_hh: Any, b_hh: Any,
              w_hr: Any = None) -> tuple[Any, Any]:
        """(h', c') from a = x_t·W_ihᵀ + b_ih and the previous (h, c) (c unused but by LSTM)."""
        b = h @ w_hh.T
        if b_hh is not None:
            b = b + b_hh
        H = self.hidden_size
        if self.kind == "rnn":
            z = a + b
            return (xp.tanh(z) if self.nonlinearity == "tanh" else _relu(xp, z)), c
        if self.kind == "lstm":
            z = a + b
            i, f = _sigmoid(xp, z[:, :H]), _sigmoid(xp, z[:, H:2 * H])
            g, o = xp.tanh(z[:, 2 * H:3 * H]), _sigmoid(xp, z[:, 3 * H:])
            c2 = f * c + i * g
            h2 = o * xp.tanh(c2)
            return (h2 if w_hr is None else h2 @ w_hr.T), c2
        r = _sigmoid(xp, a[:, :H] + b[:, :H])
        z = _sigmoid(xp, a[:, H:2 * H] + b[:, H:2 * H])
        n = xp.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
        return (1 - z) * n + z * h, c

    def _initial(self, xp: Any, state: Any, a: Any, width: int) -> Any:
        """This layer's and direction's initial state (N, width): the given one, or zeros."""
        if state is None:
            return _zeros(xp, a, (int(a.shape[1]), width))
        return state if self.num_states is None else state[self.state_index]

    def _order(self, steps: int) -> range:
        """The time positions in the order they are computed."""
        return range(steps - 1, -1, -1) if self.reverse else range(steps)

    def forward(self, xp: Any, input: Any, lengths: Any = None, h0: Any = None, c0: Any = None,
                weight_ih: Any = None, weight_hh: Any = None, bias_ih: Any = None,
                bias_hh: Any = None, weight_hr: Any = None) -> Any:
        if input.ndim == 2:  # unbatched (T, I): a batch of one, its axis dropped from the output
            h0, c0 = (None if v is None else batch_of_one(v) for v in (h0, c0))
            return self.forward(xp, batch_of_one(input), lengths, h0, c0, weight_ih, weight_hh,
                                bias_ih, bias_hh, weight_hr)[..., 0, :]
        steps, kind = int(input.shape[0]), backend_of(xp)
        t_ = torch_of(xp)
        ns = t_ if t_ is not None else np if kind == "numpy" else xp  # where, arange, stack
        # (T, N, 1): the steps each entry has (None: all); a step past the end keeps the states
        valid = None if lengths is None else \
            (ns.arange(steps, device=lengths.device) if t_ is not None else ns.arange(steps)
             )[:, None, None] < (lengths.long() if t_ is not None else lengths)[:, None]
        if valid is not None:  # the padding is never read, as torch's packed sequences (NaN, inf)
            input = ns.where(valid, input, 0)
        a = input @ weight_ih.T  # every step's input part in one matmul: (T, N, G·H)
        if bias_ih is not None:
            a = a + bias_ih
        h = self._initial(xp, h0, a, self.state_size)
        c = self._initial(xp, c0, a, self.hidden_size) if self.kind == "lstm" else h  # a placeholder

        def step(a_t: Any, v: Any, h: Any, c: Any) -> tuple[Any, Any]:
            h2, c2 = self._step(xp, a_t, h, c, weight_hh, bias_hh, weight_hr)
            return (h2, c2) if v is None else (ns.where(v, h2, h), ns.where(v, c2, c))

        if kind == "jax":
            import jax

            def body(carry, xs):
                h2, c2 = step(*xs, *carry)
                return (h2, c2), (h2, c2)

            _, (hs, cs) = jax.lax.scan(body, (h, c), (a, valid), reverse=self.reverse)
        else:
            hl: list[Any] = [None] * steps
            cl: list[Any] = [None] * steps
            for t in self._order(steps):
                h, c = step(a[t], None if valid is None else valid[t], h, c)
                hl[t], cl[t] = h, c
            hs, cs = ns.stack(hl), ns.stack(cl)
        if self.proj_size:  # h (T, N, P) padded with zeros to c's H features, to stack them
            pad = _zeros(xp, hs, (*hs.shape[:2], self.hidden_size - self.proj_size))
            hs = (t_.cat if t_ is not None else ns.concatenate)([hs, pad], -1)
        slots = [hs, cs] if self.kind == "lstm" else [hs]
        if valid is not None:  # the outputs: zeros past each sequence's end, as torch's padding
            slots.insert(0, ns.where(valid, hs, 0))
        return ns.stack(slots)

    # -- backpropagation through time (NumPy) ---------------------------------------------
    def vjp(self, g, out, args, wrt):
        if args["input"].ndim == 2:
            return unbatched_vjp(self.vjp, g, out, args, wrt)
        return bptt(self, g, out, args, wrt)

    def __repr__(self) -> str:
        opts = {"nonlinearity": None if self.nonlinearity == "tanh" else self.nonlinearity,
                "reverse": True if self.reverse else None,
                "initial_state": None if self.initial_state else False,
                "num_states": self.num_states, "input_size": self.input_size,
                "lengths": True if self.lengths else None, "proj_size": self.proj_size or None}
        extra = "".join(f", {k}={v!r}" for k, v in opts.items() if v is not None)
        return f"Recurrence({self.kind!r}, {self.hidden_size}, bias={self.bias}{extra})"


_LAYER_CLASSES: dict[str, type[Recurrence]] = {}


def _layer_class(layer: int, reverse: bool) -> type[Recurrence]:
    """``Recurrence`` under the name ``L<layer>`` or ``L<layer>Reverse``: the compiler names a
    block after its class, so a stacked layer's parameters read ``l1_reverse.weight_ih`` (torch's
    ``weight_ih_l1_reverse``)."""
    name = f"L{layer}" + ("Reverse" if reverse else "")
    cls = _LAYER_CLASSES.get(name)
    if cls is None:
        doc = f"The ``Recurrence`` of layer {layer}, {'reverse' if reverse else 'forward'} direction."
        cls = _LAYER_CLASSES[name] = type(name, (Recurrence,), {"__module__": __name__, "__doc__": doc})
    return cls


def __getattr__(name: str) -> Any:
    """``L<k>`` / ``L<k>Reverse`` (see :func:`_layer_class`), so they resolve by name (pickle)."""
    m = re.fullmatch(r"L(\d+)(Reverse)?", name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _layer_class(int(m.group(1)), m.group(2) is not None)


def _path(layer: int, direction: int) -> str:
    """The block name of a stacked layer's ``Recurrence``: ``l0``, ``l0_reverse``, ``l1``, ..."""
    return f"l{layer}" + ("_reverse" if direction else "")


# -- cells: one step ------------------------------------------------------------------------------
class _Cell(Model, _TorchNames):
    kind: ClassVar[str]

    def __init__(self, hidden_size: int | None = None, bias: bool = True,
                 nonlinearity: str = "tanh") -> None:
        if hidden_size is None:  # (the published RNNCell() / LSTMCell() take no size)
            published = {"rnn": " (the published Mithril's RNNCell() is PublishedRNNCell())",
                         "lstm": " (the published Mithril's LSTMCell() is "
                                 "PublishedLSTMCell())"}.get(self.kind, "")
            raise TypeError(f"{type(self).__name__}: hidden_size is required, as torch.nn."
                            f"{type(self).__name__}'s{published}")
        super().__init__()
        states = {"h0": "prev_hidden"} | ({"c0": "prev_cell"} if self.kind == "lstm" else {})
        rec = Recurrence(self.kind, hidden_size, bias, nonlinearity,
                         state_names=tuple(states.values()), cell=True)
        self.hidden_size, self.bias = rec.hidden_size, rec.bias
        self |= Indexer(None)(input="input", output=IOKey(expose=False, name="_steps"))
        self |= rec(input="_steps", output=IOKey("_stacked", expose=False), **states)
        self |= Indexer((0, 0))(input="_stacked", output="output")
        if self.kind == "lstm":
            self |= Indexer((1, 0))(input="_stacked", output="cell")

    def _torch_pairs(self) -> list[tuple[str, str, str, int]]:
        roles = ROLES if self.bias else ROLES[:2]
        return [(r, f"recurrence.{r}", r, 0) for r in roles]


class RNNCell(_Cell):
    """One step of an Elman RNN, as ``torch.nn.RNNCell``: inputs ``input`` (N, I) and
    ``prev_hidden`` (N, H); output ``output`` = h' (N, H). ``nonlinearity``: "tanh" or "relu".
    Parameters ``recurrence.weight_ih`` (H, I), ``weight_hh`` (H, H), ``bias_ih``, ``bias_hh``.

    Unlike torch's ``hx=None``, the previous state of a cell (here and in ``LSTMCell`` /
    ``GRUCell``) is a required input: a cell is fed its own output step after step, which an
    input that defaults to zeros could not be; give zeros for a first step. Every cell also
    takes torch's unbatched step: ``input`` (I,), states and outputs (H,)."""

    kind = "rnn"


class LSTMCell(_Cell):
    """One LSTM step, as ``torch.nn.LSTMCell``: inputs ``input`` (N, I), ``prev_hidden`` and
    ``prev_cell`` (N, H); outputs ``output`` = h' and ``cell`` = c' (N, H). Gates i, f, g, o."""

    kind = "lstm"

    def __init__(self, hidden_size: int | None = None, bias: bool = True) -> None:
        super().__init__(hidden_size, bias)


class GRUCell(_Cell):
    """One GRU step, as ``torch.nn.GRUCell``: inputs ``input`` (N, I) and ``prev_hidden``
    (N, H); output ``output`` = h' (N, H). Gates r, z, n."""

    kind = "gru"

    def __init__(self, hidden_size: int | None = None, bias: bool = True) -> None:
        super().__init__(hidden_size, bias)


# -- whole sequences ------------------------------------------------------------------------------
class _Sequence(Model, _TorchNames):
    kind: ClassVar[str]

    def __init__(self, hidden_size: int, batch_first: bool = False, bias: bool = True,
                 nonlinearity: str = "tanh", *, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, initial_states: bool = False,
                 input_size: int | None = None, lengths: bool = False,
                 proj_size: int = 0) -> None:
        super().__init__()
        who = self.kind.upper()
        if self.kind != "rnn" and nonlinearity != "tanh":  # LSTM and GRU have their own gates
            raise TypeError(f"{who} takes no nonlinearity (got {nonlinearity!r}); only RNN does")
        self.hidden_size = _positive_int(who, "hidden_size", hidden_size)
        self.num_layers = _positive_int(who, "num_layers", num_layers)
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(
                dropout, (int, float, np.integer, np.floating)) or not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"{who}: dropout must be a probability in [0, 1], got {dropout!r}")
        if dropout and self.num_layers == 1:
            warnings.warn(f"{who}: dropout is applied between layers, after all but the last; "
                          f"with num_layers=1 it does nothing (dropout={dropout})",
                          UserWarning, stacklevel=2 if type(self).__init__ is _Sequence.__init__ else 3)
        self.batch_first = _flag(who, "batch_first", batch_first)
        self.bidirectional = _flag(who, "bidirectional", bidirectional)
        self.initial_states = _flag(who, "initial_states", initial_states)
        self.dropout, self.lengths = float(dropout), _flag(who, "lengths", lengths)
        if proj_size and self.kind != "lstm":
            raise ValueError(f"{who}: proj_size is for LSTM only (as torch), got {proj_size!r}")
        self.proj_size = proj_size
        self.num_directions = 2 if self.bidirectional else 1
        k = self.num_layers * self.num_directions
        states = ("h0", "c0") if self.kind == "lstm" else ("h0",)
        given = {"h0": "initial_hidden", "c0": "initial_cell"}
        self.bias, self.input_size = _flag(who, "bias", bias), input_size
        if self.batch_first:  # (N, T, I) -> (T, N, I)
            self |= _TimeMajor(who)(input="input", output=IOKey("_steps", expose=False))
        layer_in = "_steps" if self.batch_first else "input"
        finals: dict[str, list[str]] = {"h0": [], "c0": []}
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            layer_out = "output" if last and not self.batch_first else f"_out_l{layer}"
            seqs = []
            for d in range(self.num_directions):
                sfx = self._suffix(layer, d)
                # one layer, one direction: "recurrence"; else "l0", "l0_reverse", "l1", ...
                op = Recurrence if k == 1 else _layer_class(layer, d == 1)
                rec = op(self.kind, hidden_size, bias, nonlinearity, reverse=d == 1,
                         initial_state=self.initial_states, num_states=k,
                         state_index=layer * self.num_directions + d,
                         input_size=input_size if layer == 0 else None,
                         state_names=tuple(given[s] for s in states), lengths=self.lengths,
                         proj_size=proj_size)
                conns: dict[str, Any] = {"input": layer_in, "output": _wire(f"_stacked{sfx}")}
                if self.lengths:
                    conns["lengths"] = "lengths"
                if self.initial_states:
                    conns.update({s: given[s] for s in states})
                self |= rec(**conns)
                at = slice(0, 1) if d == 1 else slice(-1, None)  # h_n: t = T - 1, reverse: t = 0
                for j, (s, out_key) in enumerate(zip(states, ("hidden", "cell"))):
                    name = out_key if k == 1 else f"_final_{s}{sfx}"
                    self |= Indexer((j + self.lengths, at) + self._narrow(s))(
                        input=f"_stacked{sfx}", output=_wire(name))
                    finals[s].append(name)
                seq = layer_out if self.num_directions == 1 else f"_seq{sfx}"
                narrow = self._narrow("h0")
                self |= Indexer((0, *narrow) if narrow else 0)(input=f"_stacked{sfx}", output=_wire(seq))
                seqs.append(seq)
            if self.num_directions == 2:  # forward features first, as torch
                self |= Concat(2, axis=-1)(input1=seqs[0], input2=seqs[1], output=_wire(layer_out))
            if not last and self.dropout:
                self |= Dropout(self.dropout)(input=layer_out, output=_wire(f"_dropped_l{layer}"))
                layer_out = f"_dropped_l{layer}"
            layer_in = layer_out
        if self.batch_first:
            self |= _TimeMajor(who)(input=layer_in, output="output")
        if k > 1:  # h_n (K, N, H): layer by layer, forward before reverse
            for s, out_key in zip(states, ("hidden", "cell")):
                self |= Concat(k, axis=0)(**{f"input{i + 1}": p for i, p in enumerate(finals[s])},
                                          output=out_key)

    _STATE_KEYS: ClassVar[tuple[str, ...]] = ("initial_hidden", "initial_cell")

    def connect(self, **connections: Any) -> Bound:
        """As :meth:`Model.connect`; connecting ``initial_hidden`` / ``initial_cell`` to a
        block made with ``initial_states=False`` (the default) is a ``KeyMismatchError`` that
        says how to get them."""
        own = self._STATE_KEYS if self.kind == "lstm" else self._STATE_KEYS[:1]  # (no cell)
        asked = sorted(k for k in own if k in connections and k not in self.terminals)
        if asked and not self.initial_states:
            raise KeyMismatchError(
                f"{type(self).__name__} has no terminal(s) {asked}: its initial states are zero "
                f"by default, as torch without h0 / c0; make it with initial_states=True to give "
                f"them (its terminals are {list(self.terminals)})")
        return super().connect(**connections)

    __call__ = connect

    def _narrow(self, state: str) -> tuple[Any, ...]:
        """The index of h's P features in a ``Recurrence`` slot (``proj_size``), else ()."""
        return (Ellipsis, slice(0, self.proj_size)) if self.proj_size and state == "h0" else ()

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction else "")

    def _torch_pairs(self) -> list[tuple[str, str, str, int]]:
        roles = (ROLES if self.bias else ROLES[:2]) + (("weight_hr",) if self.proj_size else ())
        out = []
        for layer in range(self.num_layers):
            feats = (self.proj_size or self.hidden_size) * self.num_directions if layer \
                else (self.input_size or 0)
            for d in range(self.num_directions):
                sfx = self._suffix(layer, d)
                path = "recurrence" if self.num_layers * self.num_directions == 1 else _path(layer, d)
                out += [(r + sfx, f"{path}.{r}", r, feats) for r in roles]
        return out


_SEQ_DOC = """A {name} over a whole sequence, as ``torch.nn.{name}``: input ``input`` (T, N, I), or
    (N, T, I) with ``batch_first``, or unbatched (T, I) (states and outputs then without the
    N axis, as torch); outputs ``output``, the last layer's hidden states,
    (T, N, D·H) or (N, T, D·H) with D = 2 if ``bidirectional`` else 1 (the forward direction's
    features first), and ``hidden`` = h_n (K, N, H){cell_out}, with K = num_layers ·
    num_directions, layer by layer, forward before reverse.

    Initial states: by default every layer and direction starts from zeros, as
    ``torch.nn.{name}`` called without {torch_states}, and the block has no state inputs.
    ``initial_states=True`` adds the inputs ``initial_hidden`` (K, N, H){cell_in}, same
    layout as ``hidden``, which must then be given (zeros reproduce the default). This is a
    switch, not an optional input, because a compiled model has no optional inputs with a
    default: a constant (``IOKey(value=...)``) has a fixed shape where zeros must follow the
    batch, and an input left out of ``evaluate`` drops the outputs that need it (prediction
    without labels) rather than filling it in. Connecting ``initial_hidden`` to a block
    made without them is a ``KeyMismatchError`` that says so.

    Keyword-only options: ``num_layers`` (stacked layers, each reading the previous one's
    output), ``bidirectional``, ``dropout`` (Dropout on the output of every layer but the
    last, in training mode, with the same masks on every backend), ``initial_states`` (see
    above), ``input_size`` (checked against ``input``; inferred when None) and ``lengths``:
    an input ``lengths`` (N,) of ints in [1, T], torch's ``pack_padded_sequence(input,
    lengths, enforce_sorted=False)`` then ``pad_packed_sequence(total_length=T)`` on the
    padded batch: each sequence's states stop at its last step (h_n, c_n are there; the
    reverse direction starts there) and ``output`` is zero past it.

    Parameters: ``weight_ih`` (G·H, I), ``weight_hh`` (G·H, H), ``bias_ih``, ``bias_hh``
    (G·H,) per layer and direction, U(−1/√H, 1/√H). With one layer and one direction they are
    ``recurrence.weight_ih``, ... (torch's ``weight_ih_l0``, ...); otherwise ``l0.weight_ih``,
    ``l0_reverse.weight_ih``, ..., ``l1_reverse.bias_hh`` (torch's ``weight_ih_l0``,
    ``weight_ih_l0_reverse``, ..., ``bias_hh_l1_reverse``). :meth:`torch_names` and
    :meth:`params_from_torch` map torch's ``state_dict``. On JAX each layer and direction is
    one ``jax.lax.scan``."""


class RNN(_Sequence):
    __doc__ = _SEQ_DOC.format(name="RNN", cell_in="", cell_out="", torch_states="h0") + """

    ``nonlinearity``: "tanh" or "relu"."""
    kind = "rnn"


class LSTM(_Sequence):
    __doc__ = _SEQ_DOC.format(name="LSTM", cell_in=" and ``initial_cell`` (K, N, H)",
                              cell_out=" and ``cell`` = c_n (K, N, H)", torch_states="(h0, c0)") + """

    ``proj_size`` P (0 < P < H), as torch's: h = (o·tanh(c))·W_hrᵀ has P features, so
    ``output`` is (T, N, D·P), ``hidden`` / ``initial_hidden`` (K, N, P) (``cell`` stays
    (K, N, H)); each layer and direction adds ``weight_hr`` (P, H) (torch's ``weight_hr_l0``)
    and its ``weight_hh`` is (4H, P)."""
    kind = "lstm"


class GRU(_Sequence):
    __doc__ = _SEQ_DOC.format(name="GRU", cell_in="", cell_out="", torch_states="h0")
    kind = "gru"
