"""Bad input to the monitoring helpers: a library error naming the key, and a
:class:`TrainingMonitor` whose call raised keeps its history and its snapshot (issue #12)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_np

from mithril.errors import ShapeError
from mithril.utils.monitoring import (
    TrainingMonitor,
    global_norm,
    gradient_norms,
    parameter_norms,
    snapshot,
    update_ratios,
)


@pytest.mark.parametrize("fn", [gradient_norms, parameter_norms, global_norm, snapshot])
@pytest.mark.parametrize("bad", [[1.0, 2.0], "w", None, 3.0])
def test_non_arrays_are_named(backend, fn, bad):
    good = backend.array(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"\['b'\]"):
        fn({"a": good, "b": bad})


def test_update_ratios_shape_mismatch_is_named(backend):
    before = {"w": backend.array(np.ones((2, 3))), "b": backend.array(np.ones(3))}
    after = {"w": backend.array(np.ones((2, 3))), "b": backend.array(np.ones((1, 3)))}
    with pytest.raises(ShapeError, match=r"before\['b'\].*\(3,\).*\(1, 3\)"):
        update_ratios(before, after)


def test_monitor_call_that_raises_changes_nothing(backend):
    p = {"w": backend.array(np.ones((2, 3)))}
    g = {"w": backend.array(np.full((2, 3), 0.5))}
    monitor = TrainingMonitor()
    monitor.before_update(p)
    first = monitor.after_update({"w": backend.array(np.full((2, 3), 1.5))}, g)
    monitor.before_update(p)
    snap = {k: to_np(backend, v) for k, v in monitor._before.items()}
    with pytest.raises(ShapeError, match=r"\['w'\]"):
        monitor.after_update({"w": backend.array(np.ones(6))}, g)
    with pytest.raises(TypeError, match=r"gradients\['w'\]"):
        monitor.after_update(p, {"w": "not an array"})
    assert monitor.history == [first]
    np.testing.assert_array_equal(to_np(backend, monitor._before["w"]), snap["w"])
    rec = monitor.after_update({"w": backend.array(np.full((2, 3), 2.0))}, g)
    assert rec["update_ratios"]["w"] == pytest.approx(1.0)
