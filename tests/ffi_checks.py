"""The checks the FFI route's tests share: an optax transformation's updates through the
kernel or traced (:func:`updates`); ``make_train_step``'s one JAX program, whose
update runs through a kernel called by ``module.<kernel>``, against the separate
``evaluate`` + ``update`` (the NumPy engine's kernel on the JAX arrays' host buffers); and
float64 params through the kernel against the traced update."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import unittest.mock as um
from collections.abc import Callable
from typing import Any

import numpy as np


def updates(opt: Any, fused: bool, start: dict[str, Any], grads: list[dict[str, Any]]
            ) -> tuple:
    """The updates of ``opt``'s transformation from the params ``start`` over ``grads``,
    each one jitted call, through the kernel (``host_kernel``) or traced (a loss-aware
    optimizer given a loss of 2 − t/2); returns (params, state, the probes taken, lists
    of two booleans)."""
    import jax
    import jax.numpy as jnp

    from mithril.interop import optax_transformation

    tx = optax_transformation(opt)
    params, state, taken = start, tx.init(start), []

    @jax.jit
    def step(params: Any, state: Any, g: Any) -> tuple:
        probe: list = []
        kw: dict[str, Any] = {"host_kernel": probe} if fused else {}
        if opt.needs_loss:
            kw["value"] = 2.0 - 0.5 * state.count.astype(jnp.float32)
        new, state = tx.update(g, state, params, new_params=True, **kw)
        return new, state, [jnp.stack(x) for x in probe]

    for g in grads:
        params, state, probe = step(params, state, g)
        taken += [np.asarray(x).tolist() for x in probe]
    return params, state, taken

def programs(opt: Any, params: dict[str, Any], grads: dict[str, Any]) -> dict[bool, str]:
    """The text of one update's program of ``opt``'s transformation, through the kernel
    (True) and traced (False)."""
    import jax

    from mithril.interop import optax_transformation

    tx = optax_transformation(opt)
    state = tx.init(params)
    texts = {}
    for fused in (True, False):
        def f(g: Any, s: Any, p: Any, fused: bool = fused) -> Any:
            kw = {"host_kernel": []} if fused else {}
            return tx.update(g, s, p, new_params=True, **kw)
        texts[fused] = jax.jit(f).lower(grads, state, params).as_text()
    return texts

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


_FLOAT64 = """
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np, jax.numpy as jnp
from mithril.interop import optax_transformation
from mithril.utils.optimizers import *
tx = optax_transformation(__MAKE__)
rng = np.random.default_rng(0)
start = {"w": jnp.asarray(rng.standard_normal((6, 5))),
         "b": jnp.asarray(rng.standard_normal(5))}
grads = [{k: jnp.asarray(rng.standard_normal(v.shape)) for k, v in start.items()}
         for _ in range(3)]
out = {}
for fused in (True, False):
    probe = []
    kw = {"host_kernel": probe} if fused else {}
    f = jax.jit(lambda g, s, p: tx.update(g, s, p, new_params=True, **kw))
    p, s = start, tx.init(start)
    for g in grads:
        p, s = f(g, s, p)
    assert p["w"].dtype == jnp.float64
    assert bool(probe) == fused
    out[fused] = p
for k in start:
    np.testing.assert_allclose(out[True][k], out[False][k], rtol=1e-13, atol=1e-14)
print("ok")
"""


def float64_equals_traced(make: str) -> None:
    """With ``jax_enable_x64`` (a process of its own): three updates of the optimizer
    ``make`` (its constructor call's source) on float64 params through the kernel's
    float64 variant equal the traced update's to 1e-13."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_FLOAT64).replace(
        "__MAKE__", make)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
