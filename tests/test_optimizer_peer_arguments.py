"""The sweep, argument by argument: for every optimizer of ours that optax (0.2.8, contrib
too) or torch.optim (2.13) also has, each argument of the installed peer's signature is
either one of ours (under our name: ``b1`` is ``beta1``, ``mask`` ``weight_decay_mask``...)
or refused with a ``TypeError`` and named in our class's docstring with the reason. A peer
that gains an argument fails this test until it is looked at.

Side by side for what the sweep added besides RAdam's and DoG's (tests/test_radam_optax.py,
tests/test_dog_layerwise.py): NAdam's ``eps_root`` (optax convention) against optax.nadam /
optax.nadamw, Lion's ``mode`` / ``smooth_beta`` against optax.scale_by_lion chained as
optax.lion chains it, in float64 (1e-12, 25 steps) and float32 (1e-6, JAX and
optax_transformation; the one-program make_train_step); eps_root refused under torch's and
Keras's conventions."""

from __future__ import annotations

import inspect

import numpy as np
import optax
import optax.contrib
import pytest
import torch
from optimizer_peer_arguments import STEPS, moved, optax_float64, optax_run, ours, rel_err

import mithril.utils.optimizers as o
from mithril.utils.optimizers.argument_names import _takes

#: the peers' names of our arguments (``betas`` is our ``beta1`` and ``beta2``)
RENAMED = {"lr": "learning_rate", "b1": "beta1", "b2": "beta2", "b3": "beta3",
           "eps": "epsilon", "mask": "weight_decay_mask", "beta": "momentum",
           "eta_minus": "etas", "eta_plus": "etas", "min_step_size": "step_sizes",
           "max_step_size": "step_sizes", "betas": "beta1", "reps_rel": "init_step"}
#: torch's flags of the loop and of autograd: no argument here (each docstring says why)
TORCH_ONLY = ("maximize", "foreach", "capturable", "differentiable")

# our class -> [(peer, {peer argument: its reason where ours does not take it})]
PEERS = {
    o.RAdam: [(torch.optim.RAdam, dict.fromkeys(TORCH_ONLY)), (optax.radam, {})],
    o.NAdam: [(torch.optim.NAdam, dict.fromkeys(TORCH_ONLY)),
              (optax.nadam, {"nesterov": None}),
              (optax.nadamw, {"nesterov": None})],
    o.Adamax: [(torch.optim.Adamax, dict.fromkeys(TORCH_ONLY)), (optax.adamax, {}),
               (optax.adamaxw, {})],
    o.AdaBelief: [(optax.adabelief, {})],
    o.LAMB: [(optax.lamb, {})],
    o.LARS: [(optax.lars, {"trust_ratio_mask": None})],
    o.Novograd: [(optax.novograd, {})],
    o.Yogi: [(optax.yogi, {}), (optax.scale_by_yogi, {})],
    o.Adan: [(optax.adan, {})],
    o.Lion: [(optax.lion, {}), (optax.scale_by_lion, {})],
    o.ADOPT: [(optax.contrib.adopt, {"clip_value_fn": None})],
    o.SignSGD: [(optax.sign_sgd, {})],
    o.Signum: [(optax.signum, {"accumulator_dtype": None})],
    o.Fromage: [(optax.fromage, {})],
    o.Rprop: [(torch.optim.Rprop, dict.fromkeys(TORCH_ONLY)), (optax.rprop, {})],
    o.ASGD: [(torch.optim.ASGD, dict.fromkeys(TORCH_ONLY))],
    o.DoG: [(optax.contrib.dog, {})],
    o.DoWG: [(optax.contrib.dowg, {})],
}


def peer_arguments(peer) -> list[str]:
    return [n for n in inspect.signature(peer).parameters if n != "params"]


@pytest.mark.parametrize("cls", list(PEERS), ids=lambda c: c.__name__)
def test_every_peer_argument_is_ours_or_documented(cls):
    takes = _takes(cls)
    doc = inspect.getdoc(cls)
    for peer, absent in PEERS[cls]:
        who = getattr(peer, "__qualname__", None) or repr(peer)[:60]  # (optax.nadam: a partial)
        for name in peer_arguments(peer):
            if name in absent:
                assert name not in takes, f"{cls.__name__} takes {name}: drop it from absent"
                assert f"``{name}``" in doc, f"{cls.__name__}'s docstring: why no {name} ({who})"
                with pytest.raises(TypeError, match=f"unexpected keyword argument '{name}'"):
                    cls(**{name: None})
            else:
                ours_name = RENAMED.get(name, name)
                assert ours_name in takes, f"{who}'s {name}: {cls.__name__} has no {ours_name}"


def test_renamed_pairs_and_aliases():
    """torch's ``lr=`` / ``eps=`` are taken as they are; the pairs under our names."""
    assert o.Rprop(lr=0.1, etas=(0.4, 1.3), step_sizes=(1e-5, 10.0)).etas == (0.4, 1.3)
    assert o.RAdam(lr=0.1, eps=1e-6).epsilon == 1e-6
    with pytest.raises(TypeError, match="beta1 and beta2"):
        o.NAdam(betas=(0.9, 0.99))


# -- NAdam eps_root (optax's) ---------------------------------------------------------------
NADAM = {
    "nadam_eps_root": ({"learning_rate": 0.05, "beta2": 0.95, "eps_root": 1e-2},
                       "optax.nadam(0.05, b2=0.95, eps_root=1e-2)"),
    "nadamw_eps_root": ({"learning_rate": 0.05, "beta1": 0.8, "eps_root": 1e-3,
                         "epsilon": 1e-4, "weight_decay": 0.1, "decoupled_weight_decay": True},
                        "optax.nadamw(0.05, b1=0.8, eps_root=1e-3, eps=1e-4, "
                        "weight_decay=0.1)"),
}


LION = {
    f"lion_{mode}": ({"learning_rate": 0.02, "beta1": 0.8, "beta2": 0.95, "weight_decay": 0.1,
                      "mode": mode, "smooth_beta": 2.5},
                     f"optax.chain(optax.scale_by_lion(0.8, 0.95, mode={mode!r}, "
                     f"smooth_beta=2.5), optax.add_decayed_weights(0.1), "
                     f"optax.scale_by_learning_rate(0.02))")
    for mode in ("hard", "smooth", "refined")}


@pytest.fixture(scope="module")
def optax64():
    return optax_float64({name: src for name, (_, src) in {**NADAM, **LION}.items()}
                         | {"lion": "optax.lion(0.02, 0.8, 0.95, weight_decay=0.1)"})


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(NADAM))
def test_nadam_eps_root_float64(optax64, name, backend):
    kw = NADAM[name][0]
    want = optax64[name]
    assert moved(want) > 0.1
    assert rel_err(ours(o.NAdam(convention="optax", **kw), backend), want) < 1e-12
    # without it the step differs (ε_root = 1e-2 or 1e-3 against v̂ ~ 1): the check can fail
    plain = {k: v for k, v in kw.items() if k != "eps_root"}
    assert rel_err(ours(o.NAdam(convention="optax", **plain), backend), want) > 1e-6


def test_nadam_eps_root_float32_and_optax_transformation(optax64):
    """float32 (JAX; ours as an optax transformation in ``jax.jit``) within 1e-6 of optax's
    float64 run (optax's own float32 run is 4e-6 from it: its float32 bias corrections),
    within 1e-5 of optax's float32 one."""
    from mithril.interop import optax_transformation

    kw, src = NADAM["nadamw_eps_root"]
    want, want32 = optax64["nadamw_eps_root"], optax_run(eval(src), STEPS, np.float32)
    for got in (ours(o.NAdam(convention="optax", **kw), "jax", "float32"),
                optax_run(optax_transformation(o.NAdam(convention="optax", **kw)), STEPS,
                          np.float32)):
        assert rel_err(got, want) < 1e-6
        assert rel_err(got, want32) < 1e-5


def test_nadam_eps_root_make_train_step():
    from test_train_step_fn import fused, problem, separate

    make = lambda: o.NAdam(learning_rate=1e-2, convention="optax", eps_root=1e-6)  # noqa: E731
    compiled, _, batches = problem("jax")
    want, _ = separate(compiled, make(), batches)
    compiled2, _, _ = problem("jax")
    got, _, (step, _, _) = fused(compiled2, make(), batches)
    assert step.fused
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_nadam_eps_root_is_optax_only(convention):
    with pytest.raises(ValueError, match="eps_root=1e-08: only the optax convention has it"):
        o.NAdam(convention=convention, eps_root=1e-8)
    assert o.NAdam(convention=convention).eps_root is None
    with pytest.raises(ValueError, match="eps_root must be >= 0"):
        o.NAdam(convention="optax", eps_root=-1.0)


# -- Lion's mode (optax.scale_by_lion's) ----------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(LION))
def test_lion_mode_float64(optax64, name, backend):
    want = optax64[name]
    assert moved(want) > 0.1
    assert rel_err(ours(o.Lion(**LION[name][0]), backend), want) < 1e-12


def test_lion_modes_differ_and_hard_is_optax_lion(optax64):
    assert rel_err(optax64["lion_hard"], optax64["lion"]) < 1e-15
    for mode in ("smooth", "refined"):
        assert rel_err(optax64[f"lion_{mode}"], optax64["lion"]) > 1e-3


@pytest.mark.parametrize("mode", ["smooth", "refined"])
def test_lion_mode_float32_and_optax_transformation(optax64, mode):
    from mithril.interop import optax_transformation

    kw = LION[f"lion_{mode}"][0]
    want = optax64[f"lion_{mode}"]
    assert rel_err(ours(o.Lion(**kw), "jax", "float32"), want) < 1e-6
    assert rel_err(optax_run(optax_transformation(o.Lion(**kw)), STEPS, np.float32), want) < 1e-6


@pytest.mark.parametrize("mode", ["smooth", pytest.param("refined", marks=pytest.mark.slow)])
def test_lion_mode_make_train_step(mode):
    """(``"refined"``'s where / abs / sign are every program's; tanh is Lion's own.)"""
    from test_train_step_fn import fused, problem, separate

    compiled, _, batches = problem("jax")
    ref, _ = separate(compiled, o.Lion(1e-3, mode=mode), batches)
    compiled2, _, _ = problem("jax")
    got, _, (step, _, _) = fused(compiled2, o.Lion(1e-3, mode=mode), batches)
    assert step.fused
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_lion_bad_mode_names_it():
    with pytest.raises(ValueError, match=r"mode must be one of \('hard', 'smooth', 'refined'\)"):
        o.Lion(mode="soft")
    with pytest.raises(ValueError, match="smooth_beta must be > 0"):
        o.Lion(mode="smooth", smooth_beta=0.0)
