"""Data-parallel training over several processes, on ``torch.distributed``.

:func:`init` joins the process group (``torchrun``'s environment, or arguments), with a
timeout so that a dead peer raises instead of hanging; :class:`DataParallel` wraps any
optimizer of ours: gradients averaged by one all-reduce (``shard_state=False``), or ZeRO-1/2
sharded optimizer state (``shard_state=True``). See ``docs/distributed.md``.
"""

from .checkpoint import load_sharded, save_sharded
from .data_parallel import DataParallel, DistributedState, broadcast_params
from .process_group import PeerError, init, is_initialized, rank, shutdown, world_size

__all__ = ["DataParallel", "PeerError", "DistributedState", "broadcast_params", "init", "is_initialized",
           "load_sharded", "save_sharded",
           "rank", "shutdown", "world_size"]
