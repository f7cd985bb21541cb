"""RAdam(convention="optax") against optax.radam (0.2.8), side by side on one problem:
ε on the bias-corrected √(v̂ + ε_root), the rectified step from ρₜ ≥ ``threshold``, and
``nesterov``; float64 to 1e-12 over 25 steps (NumPy and torch), float32 to 1e-6 (JAX,
``optax_transformation`` inside ``jax.jit``, the one-program ``make_train_step``); torch's
convention still torch.optim.RAdam's. Bad arguments raise naming them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optimizer_peer_arguments import STEPS, gradient, moved, optax_float64, ours, rel_err, start

from mithril.utils.optimizers import RAdam

#: ρₜ at step 7 for β₂ = 0.99 (the host's formula, optax's too): a threshold equal to it
#: rectifies from step 7 (optax's ≥), one a float above it from step 8
RHO7 = RAdam(beta2=0.99).rho(7)

# name -> (our keyword arguments, optax.radam's source)
CASES = {
    "plain": ({"learning_rate": 0.05}, "optax.radam(0.05)"),
    "b2_099": ({"learning_rate": 0.05, "beta2": 0.99, "epsilon": 1e-3},
               "optax.radam(0.05, b2=0.99, eps=1e-3)"),
    "eps_root": ({"learning_rate": 0.05, "beta1": 0.8, "beta2": 0.95, "eps_root": 1e-2},
                 "optax.radam(0.05, b1=0.8, b2=0.95, eps_root=1e-2)"),
    "nesterov": ({"learning_rate": 0.05, "beta2": 0.95, "nesterov": True},
                 "optax.radam(0.05, b2=0.95, nesterov=True)"),
    "threshold_at_rho7": ({"learning_rate": 0.05, "beta2": 0.99, "threshold": RHO7},
                          f"optax.radam(0.05, b2=0.99, threshold={RHO7!r})"),
    "threshold_8_wd": ({"learning_rate": 0.05, "beta2": 0.95, "threshold": 8.0,
                        "weight_decay": 0.1, "nesterov": True, "eps_root": 1e-4},
                       "optax.chain(optax.add_decayed_weights(0.1), optax.radam(0.05, b2=0.95, "
                       "threshold=8.0, eps_root=1e-4, nesterov=True))"),
}


@pytest.fixture(scope="module")
def optax64():
    return optax_float64({name: src for name, (_, src) in CASES.items()})


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_float64_matches_optax_radam(optax64, name, backend):
    want = optax64[name]
    got = ours(RAdam(convention="optax", **CASES[name][0]), backend)
    assert moved(want) > 0.1
    assert rel_err(got, want) < 1e-12


def test_the_conventions_differ_where_said(optax64):
    """torch's RAdam (ε on the raw √v) is not optax's: the check above can fail. And the
    threshold is inclusive: ρ₇ rectifies from step 7, the next float above it from step 8."""
    want = optax64["b2_099"]
    torch_conv = ours(RAdam(learning_rate=0.05, beta2=0.99, epsilon=1e-3))
    assert rel_err(torch_conv, want) > 1e-6
    at7 = optax64["threshold_at_rho7"]
    assert RAdam(beta2=0.99, convention="optax", threshold=RHO7).scalars(7)[-1] > 0
    plain_sgd_until_8 = ours(RAdam(learning_rate=0.05, beta2=0.99, convention="optax",
                                   threshold=np.nextafter(RHO7, 10.0)), steps=7)
    assert rel_err(plain_sgd_until_8[:6], at7[:6]) < 1e-12
    assert rel_err(plain_sgd_until_8[6:], at7[6:7]) > 1e-6


def test_torch_convention_is_torch_radam():
    """The default is still torch.optim.RAdam (decoupled decay too), float64, 25 steps."""
    for kw in ({}, {"weight_decay": 0.1, "decoupled_weight_decay": True}):
        p = {n: torch.tensor(v, requires_grad=True) for n, v in start().items()}
        topt = torch.optim.RAdam(list(p.values()), lr=0.05, betas=(0.9, 0.95), **kw)
        want = []
        for t in range(1, STEPS + 1):
            g = gradient(t, {n: v.detach().numpy() for n, v in p.items()})
            for n, v in p.items():
                v.grad = torch.tensor(g[n])
            topt.step()
            want.append({n: v.detach().numpy().copy() for n, v in p.items()})
        got = ours(RAdam(learning_rate=0.05, beta2=0.95, **kw), "torch")
        assert rel_err(got, want) < 1e-12


def test_float32_jax_and_optax_transformation():
    """float32 JAX: our JAX backend, and ``optax_transformation`` of ours in ``jax.jit``,
    both within 1e-6 of optax.radam in float32 (the same gradients)."""
    import optax  # noqa: F401 (the case's source, eval'd below, names it)
    from optimizer_peer_arguments import optax_run

    from mithril.interop import optax_transformation

    kw, src = CASES["threshold_8_wd"]
    want = optax_run(eval(src), STEPS, np.float32)
    assert rel_err(ours(RAdam(convention="optax", **kw), "jax", "float32"), want) < 1e-6
    tx = optax_transformation(RAdam(convention="optax", **kw))
    assert rel_err(optax_run(tx, STEPS, np.float32), want) < 1e-6


@pytest.mark.parametrize("kw", [{"convention": "optax", "nesterov": True, "eps_root": 1e-8},
                                {"convention": "optax", "threshold": 6.0}])
def test_make_train_step_one_program(kw):
    """The JAX one-program train step equals evaluate + update (float32, 1e-6)."""
    from test_train_step_fn import fused, problem, separate

    compiled, _, batches = problem("jax")
    want, want_losses = separate(compiled, RAdam(learning_rate=1e-2, **kw), batches)
    compiled2, _, _ = problem("jax")
    got, losses, (step, _, _) = fused(compiled2, RAdam(learning_rate=1e-2, **kw), batches)
    assert step.fused
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6, atol=1e-6)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("kw, match", [
    ({"convention": "keras"}, r"convention must be one of \('torch', 'optax'\) \(Keras has no RAdam\), got 'keras'"),
    ({"eps_root": 1e-8}, "eps_root=1e-08: only the optax convention has it"),
    ({"nesterov": True}, "nesterov=True: only the optax convention has it"),
    ({"threshold": 6.0}, r"threshold=6.0: only the optax convention has it \(convention='optax'\), not 'torch'"),
    ({"convention": "optax", "threshold": 3.0}, "threshold must be a finite number >= 4"),
    ({"convention": "optax", "eps_root": -1.0}, "eps_root must be >= 0"),
])
def test_bad_arguments_name_them(kw, match):
    with pytest.raises(ValueError, match=match):
        RAdam(**kw)
    with pytest.raises(TypeError, match="nesterov must be True or False"):
        RAdam(convention="optax", nesterov="yes")


def test_traced_floats_threshold_and_eps_root_are_read():
    """optax_transformation with every float traced (threshold and eps_root among them):
    one program, the baked steps, and each float changed from step 3 read as the
    optimizer's own update reads it (tests/test_interop_optax_traced.py's check)."""
    from test_interop_optax_traced import every_float_read, floats

    opt = RAdam(1e-2, convention="optax", threshold=6.0, eps_root=1e-6, nesterov=True,
                weight_decay=0.02)
    assert {"threshold", "eps_root"} <= set(floats(opt))
    every_float_read(opt, scalars="traced")
    assert not {"threshold", "eps_root"} & set(floats(RAdam(1e-2)))  # torch's: None
