"""Recurrent layers with torch's layouts, gate order, numerics and initialisation:
``RNNCell``, ``LSTMCell``, ``GRUCell`` (one step) and ``RNN``, ``LSTM``, ``GRU`` (a sequence).

Weights are ``weight_ih`` (G·H, I) and ``weight_hh`` (G·H, H), biases ``bias_ih`` and
``bias_hh`` (G·H,), with the gates stacked in torch's order: G = 1 (RNN), 4 for LSTM
(i, f, g, o) and 3 for GRU (r, z, n). Every one starts as torch's U(−1/√H, 1/√H). Per step,
with a = x·W_ihᵀ + b_ih and b = h·W_hhᵀ + b_hh:

* RNN:  h' = tanh(a + b) (or relu);
* LSTM: i, f, g, o = σ, σ, tanh, σ of the four blocks of a + b; c' = f·c + i·g; h' = o·tanh(c');
* GRU:  r, z = σ of the first two blocks of a + b; n = tanh(a_n + r·b_n); h' = (1 − z)·n + z·h.

One operator, :class:`Recurrence`, runs the whole time loop: x·W_ihᵀ for every step in one
matmul, then the recurrent part step by step — a Python loop on NumPy and torch,
``jax.lax.scan`` on JAX (one compiled step, whatever the length). Its NumPy VJP is
backpropagation through time with the per-step gates recomputed once. The cells and the
sequence layers are small models around it (indexing and transposes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .model import IOKey, Model
from .operator import Operator, ShapeError, backend_of, fmt, torch_of
from .shaping import Indexer, Transpose

GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _sigmoid(xp: Any, x: Any) -> Any:
    t = torch_of(xp)
    return t.sigmoid(x) if t is not None else 0.5 * (xp.tanh(0.5 * x) + 1)


class Recurrence(Operator):
    """The time loop of an RNN / LSTM / GRU layer (see the module docstring).

    Inputs: ``input`` (T, N, I), time-major, and ``h0`` (N, H) (and ``c0`` for an LSTM); the
    output stacks the hidden states, and for an LSTM the cell states: (S, T, N, H) with S = 2
    for an LSTM, else 1.
    """

    param_init: dict[str, str]  # per instance: U(±1/√H) for every weight and bias

    def __init__(self, kind: str, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh") -> None:
        if kind not in GATES:
            raise ValueError(f"Recurrence: kind must be one of {sorted(GATES)}, got {kind!r}")
        if not isinstance(hidden_size, (int, np.integer)) or isinstance(hidden_size, bool) \
                or hidden_size <= 0:
            raise ValueError(f"{kind.upper()}: hidden_size must be a positive int, got {hidden_size!r}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.kind, self.hidden_size, self.bias = kind, int(hidden_size), bool(bias)
        self.nonlinearity = nonlinearity
        self.inputs = ("input", "h0", "c0") if kind == "lstm" else ("input", "h0")  # type: ignore[misc]
        init = f"fan_in_uniform:{self.hidden_size}"
        keys = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ())
        self.param_init = {k: init for k in keys}  # type: ignore[misc]

    # -- shapes --------------------------------------------------------------------------
    def _check(self, shapes: Any) -> int | None:
        who, h = self.kind.upper(), self.hidden_size
        s = shapes.get("input")
        if s is not None and len(s) != 3:
            raise ShapeError(f"{who}: 'input' must be (T, N, I) here, got shape {fmt(s)}")
        n = None if s is None else s[1]
        for key in self.inputs[1:]:
            hs = shapes.get(key)
            if hs is None:
                continue
            if len(hs) != 2 or (hs[1] is not None and hs[1] != h) or (
                    n is not None and hs[0] is not None and hs[0] != n):
                raise ShapeError(f"{who}: '{key}' must be (N, {h}) with N the batch of 'input' "
                                 f"{fmt(s)}, got shape {fmt(hs)}")
        return None if s is None else s[2]

    def param_shapes(self, shapes):
        i = self._check(shapes)
        if i is None:
            return {}
        gh = GATES[self.kind] * self.hidden_size
        out = {"weight_ih": (gh, i), "weight_hh": (gh, self.hidden_size)}
        if self.bias:
            out.update({"bias_ih": (gh,), "bias_hh": (gh,)})
        return out

    def infer_shape(self, shapes):
        self._check(shapes)
        s = shapes.get("input")
        return None if s is None else (2 if self.kind == "lstm" else 1, s[0], s[1], self.hidden_size)

    # -- one step, any namespace ---------------------------------------------------------
    def _step(self, xp: Any, a: Any, h: Any, c: Any, w_hh: Any, b_hh: Any) -> tuple[Any, Any]:
        """(h', c') from a = x_t·W_ihᵀ + b_ih and the previous (h, c) (c unused but by LSTM)."""
        b = h @ w_hh.T
        if b_hh is not None:
            b = b + b_hh
        H = self.hidden_size
        if self.kind == "rnn":
            z = a + b
            return (xp.tanh(z) if self.nonlinearity == "tanh" else xp.maximum(z, 0)), c
        if self.kind == "lstm":
            z = a + b
            i, f = _sigmoid(xp, z[:, :H]), _sigmoid(xp, z[:, H:2 * H])
            g, o = xp.tanh(z[:, 2 * H:3 * H]), _sigmoid(xp, z[:, 3 * H:])
            c2 = f * c + i * g
            return o * xp.tanh(c2), c2
        r = _sigmoid(xp, a[:, :H] + b[:, :H])
        z = _sigmoid(xp, a[:, H:2 * H] + b[:, H:2 * H])
        n = xp.tanh(a[:, 2 * H:] + r * b[:, 2 * H:])
        return (1 - z) * n + z * h, c

    def forward(self, xp: Any, input: Any, h0: Any, c0: Any = None, weight_ih: Any = None,
                weight_hh: Any = None, bias_ih: Any = None, bias_hh: Any = None) -> Any:
        a = input @ weight_ih.T  # every step's input part in one matmul: (T, N, G·H)
        if bias_ih is not None:
            a = a + bias_ih
        c = h0 if c0 is None else c0  # a placeholder carry for RNN / GRU
        kind = backend_of(xp)
        if kind == "jax":
            import jax

            def body(carry, a_t):
                h2, c2 = self._step(xp, a_t, *carry, weight_hh, bias_hh)
                return (h2, c2), (h2, c2)

            _, (hs, cs) = jax.lax.scan(body, (h0, c), a)
            return xp.stack([hs, cs]) if self.kind == "lstm" else hs[None]
        hs, cs, h = [], [], h0
        for t in range(int(a.shape[0])):
            h, c = self._step(xp, a[t], h, c, weight_hh, bias_hh)
            hs.append(h)
            cs.append(c)
        if kind == "torch":
            t = torch_of(xp)
            return t.stack([t.stack(hs), t.stack(cs)]) if self.kind == "lstm" else t.stack(hs)[None]
        return np.stack([np.stack(hs), np.stack(cs)]) if self.kind == "lstm" else np.stack(hs)[None]

    # -- backpropagation through time (NumPy) ---------------------------------------------
    def vjp(self, g, out, args, wrt):
        x, w_ih, w_hh = args["input"], args["weight_ih"], args["weight_hh"]
        b_ih, b_hh = args.get("bias_ih"), args.get("bias_hh")
        H, T = self.hidden_size, x.shape[0]
        a = x @ w_ih.T + (0 if b_ih is None else b_ih)
        hs = out[0]
        h_prev = [args["h0"], *hs[:-1]]
        gh_seq = g[0]
        gc_seq = g[1] if self.kind == "lstm" else None
        c_prev = [args["c0"], *out[1][:-1]] if self.kind == "lstm" else None
        da_all = np.zeros_like(a)  # cotangent of the input part, per step
        dw_hh = np.zeros_like(w_hh)
        db_hh = np.zeros(w_hh.shape[0], dtype=w_hh.dtype)
        dh_next = np.zeros_like(args["h0"])
        dc_next = np.zeros_like(args["h0"])
        sig = lambda v: 0.5 * (np.tanh(0.5 * v) + 1)  # noqa: E731
        for t in reversed(range(T)):
            hp = h_prev[t]
            b = hp @ w_hh.T + (0 if b_hh is None else b_hh)
            dh = gh_seq[t] + dh_next
            if self.kind == "rnn":
                h = hs[t]
                dz = dh * (1 - h * h) if self.nonlinearity == "tanh" else dh * (a[t] + b > 0)
                da = db = dz
                dh_next = dz @ w_hh
            elif self.kind == "lstm":
                z = a[t] + b
                i, f = sig(z[:, :H]), sig(z[:, H:2 * H])
                gg, o = np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
                tc = np.tanh(out[1][t])
                dc = gc_seq[t] + dc_next + dh * o * (1 - tc * tc)
                dz = np.concatenate([dc * gg * i * (1 - i), dc * c_prev[t] * f * (1 - f),
                                     dc * i * (1 - gg * gg), dh * tc * o * (1 - o)], axis=1)
                da = db = dz
                dh_next, dc_next = dz @ w_hh, dc * f
            else:
                r = sig(a[t, :, :H] + b[:, :H])
                z = sig(a[t, :, H:2 * H] + b[:, H:2 * H])
                n = np.tanh(a[t, :, 2 * H:] + r * b[:, 2 * H:])
                dn = dh * (1 - z) * (1 - n * n)
                dr = dn * b[:, 2 * H:] * r * (1 - r)
                dzz = dh * (hp - n) * z * (1 - z)
                da = np.concatenate([dr, dzz, dn], axis=1)
                db = np.concatenate([dr, dzz, dn * r], axis=1)
                dh_next = dh * z + db @ w_hh
            da_all[t] = da
            dw_hh += db.T @ hp
            db_hh += db.sum(axis=0)
        flat = da_all.reshape(-1, da_all.shape[-1])
        res = {"input": da_all @ w_ih, "weight_ih": flat.T @ x.reshape(-1, x.shape[-1]),
               "weight_hh": dw_hh, "bias_ih": flat.sum(axis=0), "bias_hh": db_hh,
               "h0": dh_next, "c0": dc_next}
        return {k: v for k, v in res.items() if k in wrt}

    def __repr__(self) -> str:
        return f"Recurrence({self.kind!r}, {self.hidden_size}, bias={self.bias})"


# -- cells: one step ------------------------------------------------------------------------------
class _Cell(Model):
    kind: ClassVar[str]

    def __init__(self, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh") -> None:
        super().__init__()
        rec = Recurrence(self.kind, hidden_size, bias, nonlinearity)
        self.hidden_size = rec.hidden_size
        self |= Indexer(None)(input="input", output=IOKey(expose=False, name="_steps"))
        states = {"h0": "prev_hidden"} | ({"c0": "prev_cell"} if self.kind == "lstm" else {})
        self |= rec(input="_steps", output=IOKey("_stacked", expose=False), **states)
        self |= Indexer((0, 0))(input="_stacked", output="output")
        if self.kind == "lstm":
            self |= Indexer((1, 0))(input="_stacked", output="cell")


class RNNCell(_Cell):
    """One step of an Elman RNN, as ``torch.nn.RNNCell``: inputs ``input`` (N, I) and
    ``prev_hidden`` (N, H); output ``output`` = h' (N, H). ``nonlinearity``: "tanh" or "relu".
    Parameters ``recurrence.weight_ih`` (H, I), ``weight_hh`` (H, H), ``bias_ih``, ``bias_hh``."""

    kind = "rnn"


class LSTMCell(_Cell):
    """One LSTM step, as ``torch.nn.LSTMCell``: inputs ``input`` (N, I), ``prev_hidden`` and
    ``prev_cell`` (N, H); outputs ``output`` = h' and ``cell`` = c' (N, H). Gates i, f, g, o."""

    kind = "lstm"

    def __init__(self, hidden_size: int, bias: bool = True) -> None:
        super().__init__(hidden_size, bias)


class GRUCell(_Cell):
    """One GRU step, as ``torch.nn.GRUCell``: inputs ``input`` (N, I) and ``prev_hidden``
    (N, H); output ``output`` = h' (N, H). Gates r, z, n."""

    kind = "gru"

    def __init__(self, hidden_size: int, bias: bool = True) -> None:
        super().__init__(hidden_size, bias)


# -- whole sequences ------------------------------------------------------------------------------
class _Sequence(Model):
    kind: ClassVar[str]

    def __init__(self, hidden_size: int, batch_first: bool = False, bias: bool = True,
                 nonlinearity: str = "tanh") -> None:
        super().__init__()
        rec = Recurrence(self.kind, hidden_size, bias, nonlinearity)
        self.hidden_size, self.batch_first = rec.hidden_size, bool(batch_first)
        if self.batch_first:  # (N, T, I) -> (T, N, I)
            self |= Transpose((1, 0, 2))(input="input", output=IOKey("_steps", expose=False))
        steps = "_steps" if self.batch_first else "input"
        states = {"h0": "_h0"} | ({"c0": "_c0"} if self.kind == "lstm" else {})
        for key, wire in states.items():  # torch's (num_layers = 1, N, H) -> (N, H)
            given = "initial_hidden" if key == "h0" else "initial_cell"
            self |= Indexer(0)(input=given, output=IOKey(wire, expose=False))
        self |= rec(input=steps, output=IOKey("_stacked", expose=False), **states)
        if self.batch_first:
            self |= Indexer(0)(input="_stacked", output=IOKey("_hidden_seq", expose=False))
            self |= Transpose((1, 0, 2))(input="_hidden_seq", output="output")
        else:
            self |= Indexer(0)(input="_stacked", output="output")
        self |= Indexer((0, slice(-1, None)))(input="_stacked", output="hidden")
        if self.kind == "lstm":
            self |= Indexer((1, slice(-1, None)))(input="_stacked", output="cell")


_SEQ_DOC = """A single-layer, one-directional {name} over a whole sequence, as ``torch.nn.{name}``
    (num_layers=1, bidirectional=False): input ``input`` (T, N, I), or (N, T, I) with
    ``batch_first``, and ``initial_hidden`` (1, N, H){cell_in}; outputs ``output``, every hidden
    state, (T, N, H) or (N, T, H), ``hidden`` = h_T (1, N, H){cell_out}. Parameters under
    ``recurrence.``: ``weight_ih`` (G·H, I), ``weight_hh`` (G·H, H), ``bias_ih``, ``bias_hh``
    (G·H,), torch's ``*_l0``. On JAX the loop is one ``jax.lax.scan``."""


class RNN(_Sequence):
    __doc__ = _SEQ_DOC.format(name="RNN", cell_in="", cell_out="")
    kind = "rnn"


class LSTM(_Sequence):
    __doc__ = _SEQ_DOC.format(name="LSTM", cell_in=" and ``initial_cell`` (1, N, H)",
                              cell_out=" and ``cell`` = c_T (1, N, H)")
    kind = "lstm"

    def __init__(self, hidden_size: int, batch_first: bool = False, bias: bool = True) -> None:
        super().__init__(hidden_size, batch_first, bias)


class GRU(_Sequence):
    __doc__ = _SEQ_DOC.format(name="GRU", cell_in="", cell_out="")
    kind = "gru"

    def __init__(self, hidden_size: int, batch_first: bool = False, bias: bool = True) -> None:
        super().__init__(hidden_size, batch_first, bias)
