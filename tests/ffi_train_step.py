"""The check the FFI route's tests share: ``make_train_step``'s one JAX program, whose
update runs through a kernel called by ``module.<kernel>``, against the separate
``evaluate`` + ``update`` (the NumPy engine's kernel on the JAX arrays' host buffers)."""

from __future__ import annotations

import unittest.mock as um
from collections.abc import Callable
from typing import Any

import numpy as np


def equals_separate_calls(make: Callable[[], Any], module: Any, kernel: str,
                          steps: int = 4) -> None:
    """Four steps of an MLP [8, 16, 12, 4] with the optimizer ``make()`` both ways: the
    program traced ``module.kernel`` (the route was taken) and its params equal the
    separate calls' to 1e-6."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    calls: list[int] = []
    real = getattr(module, kernel)

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    be = JaxBackend(dtype="float32")
    spec = mlp_spec(8, 4, [16, 12])
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(0)
    batches = [{"input": be.array(rng.standard_normal((32, 8)).astype(np.float32)),
                "target": be.array(rng.integers(0, 4, 32), be.int_dtype)}
               for _ in range(steps)]
    start = {k: np.array(v) for k, v in compiled.get_parameters().items()}
    opt = make()
    sep = {k: be.array(v) for k, v in start.items()}
    sep_state = opt.init(sep)
    for d in batches:
        _, grads = compiled.evaluate(sep, d, output_gradients={"loss": 1.0})
        sep, sep_state = opt.update(sep, grads, sep_state)
    with um.patch.object(module, kernel, counted):
        step = make_train_step(compiled, make(), loss="loss")
        params = {k: be.array(v) for k, v in start.items()}
        state = step.init(params)
        for d in batches:
            params, state, _ = step(params, state, d)
    assert calls  # (traced once)
    for k in sep:
        assert not np.array_equal(np.asarray(params[k]), start[k]), k  # (it moved)
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(sep[k]), rtol=1e-6,
                                   atol=1e-6, err_msg=k)
