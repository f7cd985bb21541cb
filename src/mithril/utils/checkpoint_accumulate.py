"""Checkpoints of an :class:`~mithril.utils.accumulation.Accumulate` run, mid-window.

``save_checkpoint(path, params, acc, acc_state)`` stores the wrapped optimizer and its state
as for the optimizer alone, and under the metadata field ``"accumulate"`` the window: ``k``,
the micro-batches buffered (``count``), their ``total_weight``, the windows emitted, the
micro-batches a ``should_skip_update_fn`` skipped (``num_skipped_micro_batches``) and the
dtype and shape of each buffered gradient sum, stored as the tensors ``accumulate/<name>`` (what optax's
``MultiSteps`` keeps in its state). ``load_checkpoint(path, ..., optimizer=acc)`` returns an
:class:`~mithril.utils.accumulation.AccumulateState` holding them, so the run goes on as if
never stopped, and sets ``acc.k`` (an ``acc`` with a callable ``k``, an every-``k``
schedule, keeps it: ``k`` stored is the saved window's). A checkpoint with buffered micro-batches loaded into the
plain optimizer is refused (they would be lost silently).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .accumulate_state_dict import check_window, refuse_overflow
from .accumulation import Accumulate, AccumulateState

FIELD = "accumulate"
PREFIX = "accumulate/"
#: micro-batches a should_skip_update_fn skipped (optional, as "windows": 0 when absent)
SKIPPED = "num_skipped_micro_batches"


def parts(optimizer: Accumulate, state: Any, params: Mapping[str, Any],
          check_array: Callable[[str, Any], str], to_numpy: Callable[[Any], np.ndarray]
          ) -> tuple[Any, Any, dict[str, Any], dict[str, np.ndarray]]:
    """(the wrapped optimizer, its state, the ``"accumulate"`` metadata, its tensors) of an
    Accumulate and its state (None: hyperparameters only)."""
    if state is not None and not isinstance(state, AccumulateState):
        raise TypeError(f"state must be what Accumulate.init/update returned (an "
                        f"AccumulateState), got {type(state).__name__}")
    if state is not None:
        check_window(optimizer, state)
    acc = None if state is None else state.accumulator
    k = optimizer.k if state is None else optimizer.k_for(state)
    if callable(k):  # (a schedule, without a state: its first window's)
        k = optimizer.k_for(AccumulateState(None))
    meta: dict[str, Any] = {"k": k, "count": 0 if acc is None else acc.count,
                            "total_weight": 0.0 if acc is None else float(acc.total_weight),
                            "grads": {}}
    if state is not None:
        meta["windows"] = state.windows
        meta[SKIPPED] = state.num_skipped_micro_batches
    tensors: dict[str, np.ndarray] = {}
    if acc is not None and acc.count:
        for name, g in acc.sum().items():
            if name not in params:
                raise ValueError(f"the buffered gradients hold '{name}', which is not in params")
            dt = check_array(f"the buffered gradient '{name}'", g)
            tensors[PREFIX + name] = arr = to_numpy(g)
            meta["grads"][name] = {"dtype": dt, "shape": list(arr.shape)}
    return optimizer.optimizer, None if state is None else state.inner, meta, tensors


def check_meta(meta: Mapping[str, Any], bad: Callable[[str, str], Exception],
               dtypes: Mapping[str, Any], max_int: int) -> None:
    """The ``"accumulate"`` field of checkpoint metadata ``meta``, if there, checked; ``bad``
    makes the error naming a field."""
    m = meta.get(FIELD)
    if m is None:
        return
    if not isinstance(m, dict) or \
            set(m) - {"windows", SKIPPED} != {"k", "count", "total_weight", "grads"}:
        raise bad(FIELD, f"must be an object with exactly k, count, total_weight, grads and "
                         f"(optionally) windows, {SKIPPED}")
    for key in ("windows", SKIPPED):
        v = m.get(key, 0)
        if type(v) is not int or not 0 <= v <= max_int:
            raise bad(f"{FIELD}.{key}", f"is {v!r:.40}, not an integer >= 0")
    k, count, w = m["k"], m["count"], m["total_weight"]
    if type(k) is not int or not 1 <= k <= max_int:
        raise bad(f"{FIELD}.k", f"is {k!r:.40}, not an integer >= 1")
    if type(count) is not int or not 0 <= count < k:
        raise bad(f"{FIELD}.count", f"is {count!r:.40}, not an integer in [0, k)")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or \
            w < 0 or (w > 0) != (count > 0):
        raise bad(f"{FIELD}.total_weight", f"is {w!r:.40}, not a finite number >= 0 that is "
                                           f"0 exactly when nothing is buffered")
    grads = m["grads"]
    if not isinstance(grads, dict) or not set(grads) <= set(meta["params"]) or \
            bool(grads) != (count > 0):
        raise bad(f"{FIELD}.grads", "must map parameters to {dtype, shape}, one per buffered "
                                    "gradient (none when nothing is buffered)")
    for n, g in grads.items():
        if not isinstance(g, dict) or set(g) != {"dtype", "shape"} or g["dtype"] not in dtypes \
                or g["shape"] != meta["params"][n]["shape"]:
            raise bad(f"{FIELD}.grads.{n}", f"must be {{dtype, shape}} with a float dtype and "
                                            f"parameter '{n}''s shape")


def expected(meta: Mapping[str, Any], dtypes: Mapping[str, Any]
             ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The tensors the ``"accumulate"`` field describes: name -> (shape, stored dtypes)."""
    m = meta.get(FIELD) or {"grads": {}}
    return {PREFIX + n: (tuple(g["shape"]), (dtypes[g["dtype"]],)) for n, g in m["grads"].items()}


def refuse_plain(meta: Mapping[str, Any], optimizer: Any, where: str) -> None:
    """``ValueError`` if buffered micro-batches would be dropped by loading into a plain
    optimizer."""
    m = meta.get(FIELD)
    if m and m["count"] and optimizer is not None and not isinstance(optimizer, Accumulate):
        raise ValueError(f"{where} holds {m['count']} buffered micro-batch(es) of an "
                         f"Accumulate(k={m['k']}): load it with optimizer=Accumulate(...) "
                         f"(into {type(optimizer).__name__} they would be lost)")


def check_range(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], backend: Any,
                params: Mapping[str, Any], where: str) -> None:
    """``CheckpointError`` naming the tensor if a buffered sum holds a finite value beyond
    the range of the buffer :func:`restore` makes for it (float64 saved, float32 loaded)."""
    m = meta.get(FIELD)
    for n in (m["grads"] if m is not None and m["count"] else ()):
        dt = backend.dtype_name(params[n])
        dtype = np.dtype("float32" if dt in ("float16", "bfloat16") else dt)
        refuse_overflow(arrays[PREFIX + n], dtype, f"{where}: tensor '{PREFIX}{n}'",
                        CheckpointError)


def restore(acc: Accumulate, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
            inner_state: Any, backend: Any, params: Mapping[str, Any]) -> AccumulateState | None:
    """The AccumulateState around ``inner_state`` holding the saved window (an empty one
    when saved without); sets ``acc.k`` to the saved one. Each buffered sum is for
    gradients of its loaded parameter's dtype (``params``, the template's dtypes), as the
    resumed run's will be: kept in the saved dtype, the next micro-batch would be refused
    (a float32 buffer against float64 gradients). Nothing here can fail."""
    m = meta.get(FIELD)
    if m is not None and not callable(acc.k):
        acc.k = m["k"]
    if inner_state is None:
        return None
    state = AccumulateState(inner_state)
    # (absent from older checkpoints: the applied steps, equal unless a step was skipped)
    state.windows = m.get("windows", state.step) if m is not None else state.step
    state.num_skipped_micro_batches = m.get(SKIPPED, 0) if m is not None else 0
    if m is not None and m["count"]:
        names = {n: backend.dtype_name(params[n]) for n in m["grads"]}
        # (a half-precision run's buffers are float32: see GradientAccumulator)
        state.accumulator._restore(
            {n: backend.array(arrays[PREFIX + n], "float32" if dt in ("float16", "bfloat16")
                              else dt) for n, dt in names.items()},
            {n: params[n].dtype for n in names}, m["count"], m["total_weight"])
    return state
