"""Run by tests/test_train_step_sam.py in a process of its own with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: SAM, DP-SGD, Mechanize and
ScheduleFree in ``make_sharded_train_step`` on two devices (the batch split over them,
the state replicated and sharded) against the separate calls in one process."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax
from test_train_step_sam import SHARDED, sharded_equals_separate

assert jax.local_device_count() == 2
for name in ("sam", "dp", "mechanize", "schedule_free"):
    for shard in (False, True):
        assert sharded_equals_separate(SHARDED[name], 2, shard, 5e-6)  # (split)
        print(name, shard, "ok")
