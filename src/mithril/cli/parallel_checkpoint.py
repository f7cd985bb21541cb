"""The checkpoint of a torch data-parallel run (``--nprocs N`` / torchrun) when rank 0 alone
does not hold it: ``--shard-state`` (ZeRO-1: each rank keeps the optimizer state of its
share of the parameters) and mixed precision (the trainer's float32 masters and loss scale).

A save is a collective: every rank reaches it at the same point (the save points are agreed:
the same step on every rank, :mod:`.stop_agreement`) and calls :func:`gather`. With
``--shard-state`` the ranks' shards are gathered to rank 0
(:func:`mithril.distributed.full_state.gather_state`, one ``torch.distributed.gather``, no
pickle), which then writes ``checkpoint.safetensors`` as one process would: the whole
optimizer state, atomically. So the checkpoint is the same file at every world size, sharded
or not, and ``--resume`` continues it at the same world size, at another one, with or
without ``--shard-state``, or in one process (:func:`load`: each rank takes its share of the
loaded state). With mixed precision the masters, the optimizer state and the loss scaler
are replicated (the ranks agree on every overflow): the ranks compare a digest of them
before rank 0 saves its copy, and a difference stops the run with an error instead of
saving one rank's state as the run's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from .errors import CLIError, TrainingError


def masters(run: Any) -> dict[str, Any]:
    """The parameters the optimizer updates: mixed precision's float32 masters, or the
    parameters."""
    return run.params if run.trainer is None else run.trainer.master_params


def collective(par: Any) -> bool:
    """Whether a save of ``par``'s run needs every rank (a gather or a check)."""
    return par.world.shard_state or par._trainer is not None


def _digest(run: Any, state: Any) -> bytes:
    """SHA-256 of what every rank of a replicated run holds alike: the masters, the
    optimizer state and the trainer's scaler and counters."""
    h = hashlib.sha256()
    to_np = run.backend.to_numpy
    for k, v in masters(run).items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(to_np(v)).tobytes())
    if state is not None:
        for s in sorted(state.slots):
            for k, v in state.slot(s).items():
                h.update(f"{s}/{k}".encode())
                h.update(np.ascontiguousarray(state.engine.to_numpy(v)).tobytes())
        h.update(json.dumps([state.step, state.num_skipped, state.num_nonfinite,
                             state.consecutive_skips, state.values]).encode())
    if run.trainer is not None:
        h.update(json.dumps(run.trainer.state_dict(), sort_keys=True).encode())
    return h.digest()


def gather(par: Any, run: Any) -> Any:
    """The whole optimizer state on rank 0 (None on the others); every rank calls it at
    the same point. Mixed precision: the ranks' replicated state checked alike first."""
    from ..distributed import process_group as pg
    from ..distributed.full_state import gather_state

    state = gather_state(par.dp, run.state, masters(run))
    if par._trainer is not None and par.world.size > 1:
        # (sharded: the ranks' states are their shards; the masters and scaler alike)
        mine = _digest(run, None if par.world.shard_state else run.state.local)
        every = pg.all_gather_bytes(mine, "the checkpoint's check of the replicated state")
        if len(set(every)) > 1:
            bad = [r for r, d in enumerate(every) if d != every[0]]
            raise TrainingError(f"the ranks' float32 masters, optimizer state or loss scale "
                                f"differ (ranks {bad} from rank 0): no checkpoint saved")
    return state


def load(par: Any, run: Any, state: Any, extra: dict[str, Any], flag: str) -> Any:
    """A loaded checkpoint's whole ``state`` (of ``run.params``: the saved masters) as this
    rank's state at this world size; with mixed precision a new trainer on it and the saved
    scaler. Every rank loads the same file and calls this at the same point."""
    from ..distributed.full_state import scatter_state

    try:
        wrapped = scatter_state(par.dp, state, run.params)
    except (ValueError, NotImplementedError) as exc:
        raise CLIError(f"{flag}: {exc}") from None
    if par._trainer is None:
        return wrapped
    from ..utils.mixed_precision import MixedPrecisionTrainer

    saved = extra.get("mixed_precision_trainer")
    if saved is None:
        raise CLIError(f"{flag}: the checkpoint holds no mixed-precision trainer state (a run "
                       f"trained without --mixed-precision)")
    try:
        trainer = MixedPrecisionTrainer(run.compiled, par.dp, run.params, wrapped,
                                        loss_scale=run.cfg.loss_scale,
                                        dynamic_loss_scaling=True)
        trainer.load_state_dict(saved)
    except (KeyError, ValueError, TypeError) as exc:
        raise CLIError(f"{flag}: the checkpoint's mixed-precision state does not load "
                       f"({type(exc).__name__}: {exc})") from None
    run.trainer = par._trainer = trainer
    run.params = trainer.master_params
    return trainer.optimizer_state
