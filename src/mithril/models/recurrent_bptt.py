"""Backpropagation through time for :class:`~mithril.models.recurrent.Recurrence` on NumPy:
the per-step gates recomputed once from the saved states, steps past a sequence's length
passing the state cotangents through, and LSTM's projection (``proj_size``) h = (o·tanh(c))·W_hrᵀ.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def bptt(op: Any, g: Any, out: Any, args: Any, wrt: Any) -> dict[str, Any]:
    """The cotangents in ``wrt`` of the ``Recurrence`` ``op`` (its output ``out``, cotangent
    ``g``, inputs and parameters ``args``)."""
    x, w_ih, w_hh = args["input"], args["weight_ih"], args["weight_hh"]
    b_ih, b_hh = args.get("bias_ih"), args.get("bias_hh")
    w_hr = args.get("weight_hr")
    H, P, T = op.hidden_size, op.state_size, x.shape[0]
    lstm, off = op.kind == "lstm", int(op.lengths)
    valid = None
    if op.lengths:  # the padding is never read (forward's input = valid · input)
        valid = (np.arange(T)[:, None] < args["lengths"])[..., None]
        x = np.where(valid, x, 0)
    a = x @ w_ih.T + (0 if b_ih is None else b_ih)
    hs, cs = out[off][..., :P], (out[off + 1] if lstm else out[off])  # h: its first P features
    order = list(op._order(T))
    h_prev: list[Any] = [None] * T  # the state each step starts from
    c_prev: list[Any] = [None] * T
    hp, cp = op._initial(np, args.get("h0"), a, P), op._initial(np, args.get("c0"), a, H)
    for t in order:
        h_prev[t], c_prev[t] = hp, cp
        hp, cp = hs[t], cs[t]
    gh_seq = g[off][..., :P]  # the cotangents of the carried states
    gc_seq = g[off + 1] if lstm else None
    if valid is not None:  # outputs = where(valid, hidden states, 0): the padding's never read
        gh_seq = gh_seq + np.where(valid, g[0][..., :P], 0)
    da_all = np.zeros_like(a)  # cotangent of the input part, per step
    dw_hh = np.zeros_like(w_hh)
    db_hh = np.zeros(w_hh.shape[0], dtype=w_hh.dtype)
    dh_next = np.zeros((x.shape[1], P), dtype=a.dtype)
    dc_next = np.zeros((x.shape[1], H), dtype=a.dtype)
    dw_hr = None if w_hr is None else np.zeros_like(w_hr)
    sig = lambda v: 0.5 * (np.tanh(0.5 * v) + 1)  # noqa: E731
    for t in reversed(order):
        hp = h_prev[t]
        b = hp @ w_hh.T + (0 if b_hh is None else b_hh)
        dh_all = gh_seq[t] + dh_next
        dc_all = gc_seq[t] + dc_next if lstm else None
        v = None if valid is None else valid[t]  # a step past the end passes them through
        dh = dh_all if v is None else dh_all * v
        if op.kind == "rnn":
            h = hs[t]
            dz = dh * (1 - h * h) if op.nonlinearity == "tanh" else dh * (a[t] + b > 0)
            da = db = dz
            dh_next = dz @ w_hh
        elif lstm:
            z = a[t] + b
            i, f = sig(z[:, :H]), sig(z[:, H:2 * H])
            gg, o = np.tanh(z[:, 2 * H:3 * H]), sig(z[:, 3 * H:])
            tc = np.tanh(cs[t])
            dm = dh  # of o·tanh(c), before the projection h = (o·tanh(c))·W_hrᵀ
            if dw_hr is not None:
                dw_hr += dh.T @ (o * tc)
                dm = dh @ w_hr
            dc = (dc_all if v is None else dc_all * v) + dm * o * (1 - tc * tc)
            dz = np.concatenate([dc * gg * i * (1 - i), dc * c_prev[t] * f * (1 - f),
                                 dc * i * (1 - gg * gg), dm * tc * o * (1 - o)], axis=1)
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
        if v is not None:
            dh_next = dh_next + dh_all * ~v
            dc_next = dc_next + dc_all * ~v if lstm else dc_next
        da_all[t] = da
        dw_hh += db.T @ hp
        db_hh += db.sum(axis=0)
    flat = da_all.reshape(-1, da_all.shape[-1])
    res = {"input": da_all @ w_ih, "weight_ih": flat.T @ x.reshape(-1, x.shape[-1]),
           "weight_hh": dw_hh, "bias_ih": flat.sum(axis=0), "bias_hh": db_hh, "weight_hr": dw_hr}
    for key, d in (("h0", dh_next), ("c0", dc_next)):
        if key in wrt and op.num_states is not None:
            full = np.zeros_like(args[key])
            full[op.state_index] = d
            d = full
        res[key] = d
    return {k: v for k, v in res.items() if k in wrt}
