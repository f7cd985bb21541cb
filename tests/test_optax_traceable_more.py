"""SignSGD / Signum and OptimisticAdam as ``optax_transformation``s skip the probe compile
(``optax_scalars._known_traceable``: their ``scalars(step)`` are arithmetic), and their
traced scalars still give optax's numbers: 60 jitted steps in float64 (a subprocess: x64 is
process-wide) against ``optax.sign_sgd`` / ``optax.signum`` / ``optax.optimistic_adam_v2``
with the probe patched to raise."""

from __future__ import annotations

import json

import pytest
from conftest import run_python

from mithril.interop.optax_scalars import _known_traceable, _needs_no_probe
from mithril.utils.optimizers import OptimisticAdam, SignSGD, Signum


def test_sign_and_optimistic_adam_are_known_traceable() -> None:
    known = _known_traceable()
    assert SignSGD.__dict__["scalars"] in known
    assert OptimisticAdam.__dict__["scalars"] in known
    for opt in (SignSGD(1e-2), SignSGD(1e-2, momentum=0.5, weight_decay=1e-2),
                Signum(1e-2), OptimisticAdam(1e-2), OptimisticAdam(1e-2, nesterov=False)):
        assert _needs_no_probe([opt]), opt
    # weight averaging reads more than scalars(step): still probed
    assert not _needs_no_probe([Signum(1e-2, ema_decay=0.9)])


CODE = """
    import json
    import jax, numpy as np, jax.numpy as jnp, optax
    jax.config.update("jax_enable_x64", True)
    from mithril.interop import optax_scalars, optax_transformation
    from mithril.interop.optax_transform import scalars_on_host
    from mithril.utils.optimizers import OptimisticAdam, RAdam, SignSGD, Signum

    def no_probe(*args, **kw):
        raise AssertionError("the probe ran")

    optax_scalars._probe_traced = no_probe
    # the patch bites: an optimizer not known traceable reaches it
    try:
        scalars_on_host(RAdam(1e-2))
        raise SystemExit("RAdam was not probed")
    except AssertionError:
        pass

    CASES = {
        "sign_sgd": (lambda: SignSGD(0.05), lambda: optax.sign_sgd(0.05)),
        "signum": (lambda: Signum(0.05, momentum=0.8), lambda: optax.signum(0.05, beta=0.8)),
        "signum-l2": (lambda: SignSGD(0.05, momentum=0.5, weight_decay=1e-2),
                      lambda: optax.chain(optax.add_decayed_weights(1e-2),
                                          optax.signum(0.05, beta=0.5))),
        "oadam": (lambda: OptimisticAdam(1e-2, alpha=0.7, beta=0.4),
                  lambda: optax.optimistic_adam_v2(1e-2, alpha=0.7, beta=0.4)),
        "oadam-plain": (lambda: OptimisticAdam(1e-2, nesterov=False, beta1=0.8, eps_root=1e-8),
                        lambda: optax.optimistic_adam_v2(1e-2, nesterov=False, b1=0.8,
                                                         eps_root=1e-8)),
        "oadam-l2": (lambda: OptimisticAdam(1e-2, weight_decay=1e-2),
                     lambda: optax.chain(optax.add_decayed_weights(1e-2),
                                         optax.optimistic_adam_v2(1e-2))),
    }
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((6, 5)), "b": rng.standard_normal(5)}
    noise = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(60)]

    def run(tx):
        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = tx.init(p)
        step = jax.jit(tx.update)
        for n in noise:  # gradients that follow the trajectory
            u, s = step({k: n[k] + 0.5 * p[k] for k in p}, s, p)
            p = optax.apply_updates(p, u)
        return p

    out = {}
    for name, (ours, theirs) in CASES.items():
        assert scalars_on_host(ours()) is None, name
        a, b = run(optax_transformation(ours())), run(theirs())
        moved = max(float(jnp.max(jnp.abs(a[k] - p0[k]))) for k in a)
        err = max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a)
        out[name] = [err, moved, str(a["w"].dtype)]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("tol", [1e-10])
def test_traced_without_probe_equals_optax_float64(tol: float) -> None:
    out = json.loads(run_python(CODE, timeout=300).strip().splitlines()[-1])
    assert set(out) == {"sign_sgd", "signum", "signum-l2", "oadam", "oadam-plain", "oadam-l2"}
    for name, (err, moved, dtype) in out.items():
        assert dtype == "float64", name
        assert moved > 0.05, (name, moved)  # the params did move
        assert err <= tol, (name, err)
