"""Run by tests/test_train_step_sam.py in a process of its own with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: SAM, DP-SGD, Mechanize and
ScheduleFree in ``make_sharded_train_step`` on two devices (the batch split over them,
the state replicated and sharded) against the separate calls in one process."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax
from test_train_step_outer_wrappers import _close, _problem, _run, _same_states

from mithril.distributed.jax_parallel import make_sharded_train_step
from mithril.utils import optimizers as o

assert jax.local_device_count() == 2
for name, make in {"sam": lambda: o.SAM(o.Adam(learning_rate=1e-2), rho=0.1),
                   "dp": lambda: o.DPSGD(0.1, noise_multiplier=0.5, seed=3),
                   "mech": lambda: o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3),
                   "sf": lambda: o.ScheduleFree(o.Adam(learning_rate=1e-2, beta1=0.0))}.items():
    for shard in (False, True):
        c, be, batches = _problem()
        _, want, want_state, _ = _run(c, make(), batches[:3], fused=False)
        step = make_sharded_train_step(c, make(), loss="loss", devices=2, shard_state=shard)
        params = c.get_parameters()
        state = step.init(params)
        for data in batches[:3]:
            params, state, _ = step(params, state, data)
        assert step.last_batch_sharded
        _close(params, want, 5e-6)
        _same_states(step.to_optimizer_state(state, params), want_state, 5e-6)
        print(name, shard, "ok")
