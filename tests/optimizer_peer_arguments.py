"""Shared by tests/test_optimizer_peer_arguments*.py, test_radam_optax.py and
test_dog_layerwise.py: one problem (four tensors, a gradient sequence that also depends on
the parameters), optax run on it in float64 (a fresh interpreter: ``jax_enable_x64`` is
process-global) or in float32 (in this process), and ours on any backend, side by side."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from conftest import native, run_python

STEPS = 25
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "cube": (2, 3, 5)}


def start(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def gradient(t: int, p: dict, xp=np) -> dict:
    """Step ``t``'s gradient at ``p``: a fixed noise plus 0.3·p (a quadratic's pull), in
    ``p``'s array type (``xp`` its array module)."""
    rng = np.random.default_rng(1000 + t)
    return {n: xp.asarray(xp.asarray(rng.standard_normal(s), dtype=p[n].dtype) + 0.3 * p[n])
            for n, s in SHAPES.items()}


def optax_float64(cases: dict[str, str], steps: int = STEPS) -> dict[str, list[dict]]:
    """``{case: [params after step 1, 2, ...]}`` of optax in float64: each case the source
    of an expression giving a GradientTransformation (``optax``, ``contrib`` and ``jnp``
    in scope), updated with ``params`` (optax.contrib.dog reads them)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optax.npz")
        run_python(f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import jax
            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp
            import numpy as np
            import optax
            from optax import contrib
            from optimizer_peer_arguments import optax_run
            flat = {{}}
            for case, src in {cases!r}.items():
                for t, p in enumerate(optax_run(eval(src), {steps}, jnp.float64)):
                    flat.update({{f"{{case}}#{{t}}#{{n}}": v for n, v in p.items()}})
            np.savez({path!r}, **flat)
            """, timeout=300)
        out: dict[str, list[dict]] = {c: [{} for _ in range(steps)] for c in cases}
        with np.load(path) as z:
            for k in z.files:
                case, t, n = k.split("#")
                out[case][int(t)][n] = z[k]
    return out


def optax_run(tx, steps: int, dtype) -> list[dict]:
    """optax's ``tx`` from :func:`start` over ``steps`` steps of :func:`gradient` (jitted)."""
    import jax
    import jax.numpy as jnp
    import optax

    p = {n: jnp.asarray(v, dtype) for n, v in start().items()}
    state = tx.init(p)
    update = jax.jit(tx.update)
    out = []
    for t in range(1, steps + 1):
        u, state = update(gradient(t, p, jnp), state, p)
        p = optax.apply_updates(p, u)
        out.append({n: np.asarray(v, np.float64) for n, v in p.items()})
    return out


def ours(opt, backend: str = "numpy", dtype: str = "float64", steps: int = STEPS) -> list[dict]:
    """Our ``opt`` on ``backend`` arrays of ``dtype`` over the same problem."""
    p = {n: native(backend, v.astype(dtype)) for n, v in start().items()}
    state = opt.init(p)
    out = []
    for t in range(1, steps + 1):
        host = {n: np.asarray(v.detach() if hasattr(v, "detach") else v) for n, v in p.items()}
        g = {n: native(backend, a.astype(dtype)) for n, a in gradient(t, host).items()}
        p, state = opt.update(p, g, state)
        out.append({n: np.asarray(v.detach() if hasattr(v, "detach") else v).astype(np.float64)
                    for n, v in p.items()})
    return out


def rel_err(got: list[dict], want: list[dict]) -> float:
    """The largest difference over every step and tensor, relative to the tensor's largest
    magnitude (at least 1)."""
    assert len(got) == len(want)
    worst = 0.0
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for n in b:
            scale = max(1.0, float(np.abs(b[n]).max()))
            worst = max(worst, float(np.abs(a[n] - b[n]).max()) / scale)
    return worst


def moved(traj: list[dict]) -> float:
    """How far the run went from the start (a comparison of runs that stand still proves
    nothing)."""
    p0 = start()
    return max(float(np.abs(traj[-1][n] - p0[n]).max()) for n in p0)
