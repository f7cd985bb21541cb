"""Sophia's Hessian-diagonal estimates under :class:`~.data_parallel.DataParallel`: each
rank measures the estimate of its share of the batch, and every rank folds in their mean
(one all-reduce), as one process folds in the whole batch's (an estimate such as
Hutchinson's ``z ⊙ (H z)`` is linear in the Hessian, so with the same probe ``z`` on every
rank the mean is the whole batch's). Before, each rank folded its own estimate into its own
state (``dp.optimizer.update_hessian(state.local, h)``): the replicas drifted apart
silently, and sharded, a rank's state refused the other ranks' tensors' estimates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import DTypeError, KeyMismatchError, ShapeError
from . import process_group as pg
from .arrays import _divide, _dtype_name, _empty


def update_hessian(dp: Any, state: Any, estimate: Mapping[str, Any]) -> Any:
    """Fold the mean over ranks of ``estimate`` (this rank's, one array per parameter) into
    the wrapped optimizer's state (its ``update_hessian``); every rank calls it. A refusal of
    any rank's estimate is one on every rank, before anything travels or changes."""
    opt = dp.optimizer
    if not hasattr(opt, "update_hessian"):
        raise TypeError(f"DataParallel.update_hessian: {type(opt).__name__} takes no Hessian "
                        f"estimate (Sophia does)")
    if state.world == 1:
        opt.update_hessian(state.local, estimate)
        return state
    ref = state._send
    error: Exception | None = None
    buf = _empty(len(ref), ref)
    try:
        if not isinstance(estimate, Mapping):
            raise TypeError(f"update_hessian: the estimate must be a dict of arrays keyed by "
                            f"parameter name, got {type(estimate).__name__}")
        missing = [n for n in state.names if n not in estimate]
        unknown = sorted(str(k) for k in estimate if k not in state.names)
        if missing or unknown:
            raise KeyMismatchError(f"update_hessian: the estimate's keys do not match the "
                                   f"parameters: missing {missing}, unknown {unknown}")
        for n, shape in zip(state.names, state.shapes):
            a = estimate[n]
            if type(a) is not type(ref):
                raise TypeError(f"update_hessian: estimate['{n}'] is a {type(a).__name__}; "
                                f"the parameters are {type(ref).__name__} arrays")
            if tuple(a.shape) != shape:
                raise ShapeError(f"update_hessian: estimate['{n}'] has shape "
                                 f"{tuple(a.shape)}, the parameter {shape}")
            if _dtype_name(a) != _dtype_name(ref):
                raise DTypeError(f"update_hessian: estimate['{n}'] has dtype "
                                 f"{_dtype_name(a)}, the parameters {_dtype_name(ref)}")
    except (TypeError, ValueError, KeyError) as e:
        error = e
    pg.agree("DataParallel.update_hessian", error)
    views, off = {}, 0
    for n, shape in zip(state.names, state.shapes):
        a = estimate[n] if isinstance(estimate[n], np.ndarray) else estimate[n].detach()
        size = math.prod(shape)
        buf[off:off + size] = a.reshape(-1)
        views[n] = buf[off:off + size].reshape(shape)
        off += size
    if _dtype_name(buf) == "float16":  # (as the gradients: the sum may overflow, the mean not)
        _divide(buf, state.world)
        pg.all_reduce(buf)
    else:
        pg.all_reduce(buf)
        _divide(buf, state.world)
    opt.update_hessian(state.local, {n: views[n] for n in state.owned})
    return state
