"""Muon's hyperparameters changed at every step inside one jitted program
(``optax_transformation(opt, traced_hyperparams=...)``, the learning rate in the state's
``hyperparams``), float64: the optax convention against
``optax.inject_hyperparams(optax.contrib.muon)`` given the same per-step values, the torch
convention against ``torch.optim.Muon`` (its Newton–Schulz without the bfloat16 cast)
changing its param_groups, both to 1e-10, each compiling once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import jax_float64
from test_muon_adafactor import ns_in_grad_dtype, torch_muon

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import optax.contrib as oc  # noqa: E402

from mithril.interop import optax_transformation  # noqa: E402
from mithril.interop.optax_hyperparams import pair  # noqa: E402
from mithril.utils.optimizers import Muon  # noqa: E402

TOL, STEPS = 1e-10, 8
SHAPES = {"w1": (6, 8), "b1": (8,), "w2": (8, 4), "b2": (4,)}
rng = np.random.default_rng(5)
P0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
GRADS = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}
         for t in range(STEPS)]
#: our name -> optax.contrib.muon's
OPTAX = {"learning_rate": "learning_rate", "momentum": "beta", "weight_decay": "weight_decay",
         "epsilon": "eps", "fallback.epsilon": "eps", "fallback.beta1": "adam_b1",
         "fallback.beta2": "adam_b2", "fallback.weight_decay": "adam_weight_decay",
         "fallback_lr_ratio": "adam_learning_rate"}


def values(i: int) -> dict[str, float]:
    """Step i's hyperparameters: a decaying rate, a momentum cycle, a decay ramp."""
    return {"learning_rate": 0.03 / (1 + i), "momentum": 0.95 - 0.05 * (i % 4),
            "weight_decay": 0.02 * (i + 1), "epsilon": 1e-8 * 10 ** (i % 3),
            "fallback.epsilon": 1e-8 * 10 ** (i % 3), "fallback.beta1": 0.9 - 0.02 * i,
            "fallback.beta2": 0.999 - 0.001 * i, "fallback.weight_decay": 0.05 + 0.01 * i,
            "fallback_lr_ratio": 0.5 + 0.1 * i}


def traced_run(opt: Muon, names: tuple[str, ...], params: dict) -> tuple[dict, int]:
    """STEPS jitted float64 updates, ``values(i)`` passed at step i; the final params and
    how many programs were compiled."""
    tx = optax_transformation(opt, traced_hyperparams=names)
    p = {k: jnp.asarray(params[k]) for k in params}
    state = tx.init(p)
    upd = jax.jit(lambda g, s, p, h: tx.update(g, s, p, new_params=True, hyper=h))
    for i in range(STEPS):
        v = values(i)
        state.hyperparams["learning_rate"] = jnp.asarray(v["learning_rate"])
        h = jnp.asarray(np.stack([pair(v[k], np.float64) for k in sorted(names)]))
        p, state = upd({k: jnp.asarray(GRADS[i][k]) for k in p}, state, p, h)
    return {k: np.asarray(x) for k, x in p.items()}, upd._cache_size()


def optax_run(names: tuple[str, ...], **kw: Any) -> dict:
    tx = optax.inject_hyperparams(oc.muon)(learning_rate=0.03, **kw)
    p = {k: jnp.asarray(v) for k, v in P0.items()}
    s = tx.init(p)

    @jax.jit
    def step(g: dict, s: Any, p: dict) -> tuple[dict, Any]:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(STEPS):
        v = values(i)
        for k in ("learning_rate", *names):
            s.hyperparams[OPTAX[k]] = jnp.asarray(v[k])
        if "fallback_lr_ratio" in names:  # (optax's is the fallback's rate itself)
            s.hyperparams["adam_learning_rate"] = jnp.asarray(
                v["learning_rate"] * v["fallback_lr_ratio"])
        p, s = step({k: jnp.asarray(GRADS[i][k]) for k in p}, s, p)
    return {k: np.asarray(x) for k, x in p.items()}


def close(got: dict, want: dict) -> None:
    for k in want:
        assert np.abs(want[k] - P0[k]).max() > 1e-2, k  # (it moved)
        np.testing.assert_allclose(got[k], want[k], rtol=TOL, atol=TOL, err_msg=k)


FALLBACK = ("fallback.beta1", "fallback.beta2", "fallback.weight_decay", "fallback_lr_ratio")


@pytest.mark.parametrize("names", [("momentum", "weight_decay"), ("epsilon", "momentum"),
                                   ("epsilon", "fallback.epsilon", "momentum"), FALLBACK])
def test_optax_convention_against_inject_hyperparams(names: tuple[str, ...]) -> None:
    """optax's ``eps`` is Muon's and its adamw fallback's: the default fallback follows
    Muon's ``"epsilon"`` traced (``"fallback.epsilon"`` traced too, as before, is given
    the same value). The fallback's ``adam_b1`` … are ``"fallback.beta1"`` …, its
    ``adam_learning_rate`` Muon's rate times ``"fallback_lr_ratio"``."""
    fb = names == FALLBACK
    adam = {"adam_weight_decay": 0.05} if fb else {}
    with jax_float64():
        got, programs = traced_run(Muon(0.03, convention="optax", weight_decay=0.02,
                                        fallback_lr_ratio=0.5 if fb else 1.0, **adam),
                                   names, P0)
        want = optax_run(tuple(n for n in names if n != "fallback.epsilon"),
                         weight_decay=0.02, **adam,
                         **({"adam_learning_rate": 0.015} if fb else {}))
    close(got, want)
    assert programs == 1


def test_optax_convention_options_against_inject_hyperparams() -> None:
    """Momentum and weight decay traced under optax's other options: adaptive, AOL,
    the "dion" rows of coefficients, plain momentum, consistent_rms."""
    names = ("momentum", "weight_decay")
    with jax_float64():
        got, programs = traced_run(Muon(
            0.03, convention="optax", weight_decay=0.02, adaptive=True, preconditioning="aol",
            ns_coefficients="dion", nesterov=False, adjust_lr_fn=0.2), names, P0)
        want = optax_run(names, weight_decay=0.02, adaptive=True, preconditioning="aol",
                         ns_coeffs="dion", nesterov=False, consistent_rms=0.2)
    close(got, want)
    assert programs == 1


def test_torch_convention_against_torch_muon(monkeypatch) -> None:
    """torch.optim.Muon takes matrices only (fallback=None); its lr, momentum, weight
    decay and eps set in its param group before each step."""
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_in_grad_dtype)
    mats = {k: P0[k] for k in ("w1", "w2")}
    names = ("epsilon", "momentum", "weight_decay")
    with jax_float64():
        got, programs = traced_run(Muon(0.03, weight_decay=0.02, ns_dtype="float64",
                                        fallback=None), names, mats)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in mats.items()}
    topt = torch.optim.Muon(list(tp.values()), lr=0.03, weight_decay=0.02)
    for i in range(STEPS):
        v = values(i)
        topt.param_groups[0].update(lr=v["learning_rate"], momentum=v["momentum"],
                                    weight_decay=v["weight_decay"], eps=v["epsilon"])
        for k, t in tp.items():
            t.grad = torch.tensor(GRADS[i][k])
        topt.step()
    close(got, {k: t.detach().numpy() for k, t in tp.items()})
    assert programs == 1


def eps_schedule(count: Any) -> Any:
    """An eps schedule (of the 0-based step count) large enough to move Adam's steps."""
    return 1e-2 / (1 + count) ** 2


def schedule_run(tx: Any, hyper: bool = False, params: dict = P0) -> dict:
    """STEPS jitted float64 updates of ``tx`` from ``params`` (``hyper``: step i's
    ``eps_schedule(i)`` passed as the traced "epsilon")."""
    p = {k: jnp.asarray(v) for k, v in params.items()}
    s = tx.init(p)

    @jax.jit
    def step(g: dict, s: Any, p: dict, h: Any) -> tuple[dict, Any]:
        if hyper:
            return tx.update(g, s, p, new_params=True, hyper=h)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(STEPS):
        h = jnp.asarray(pair(eps_schedule(i), np.float64)[None])
        p, s = step({k: jnp.asarray(GRADS[i][k]) for k in p}, s, p, h)
    return {k: np.asarray(x) for k, x in p.items()}


def test_default_fallback_follows_a_scheduled_epsilon() -> None:
    """``optax.inject_hyperparams(muon)(eps=schedule)``: optax's one eps scheduled reaches
    Muon and its adamw. Ours given "epsilon" alone, as ``schedules=`` or traced, feeds the
    default fallback too (float64, 1e-10); a fallback given stays apart (its eps fixed)."""
    from mithril.utils.optimizers import NAdam

    kw = {"weight_decay": 0.02, "nesterov": True}
    with jax_float64():
        want = schedule_run(optax.inject_hyperparams(oc.muon)(0.03, eps=eps_schedule, **kw))
        fixed = schedule_run(optax.inject_hyperparams(oc.muon)(0.03, eps=1e-8, **kw))
        got = schedule_run(optax_transformation(Muon(0.03, convention="optax", **kw),
                                                schedules={"epsilon": eps_schedule}))
        traced = schedule_run(optax_transformation(Muon(0.03, convention="optax", **kw),
                                                   traced_hyperparams=("epsilon",)), True)
        given = NAdam(0.03, decoupled_weight_decay=True, convention="optax", epsilon=1e-8)
        apart = schedule_run(optax_transformation(
            Muon(0.03, convention="optax", fallback=given, **kw),
            schedules={"epsilon": eps_schedule}))
    close(got, want)
    close(traced, want)
    for k in ("b1", "b2"):  # (the fallback's eps matters: fixed, it ends elsewhere)
        assert np.abs(fixed[k] - want[k]).max() > 1e-3, k
        assert np.abs(apart[k] - want[k]).max() > 1e-3, k
    np.testing.assert_allclose(apart["w1"], want["w1"], rtol=TOL, atol=TOL)


def test_torch_optimizer_eps_scheduled_against_inject_hyperparams() -> None:
    """``torch_optimizer``'s ``param_groups[0]["eps"]`` set before each step (as a torch
    scheduler would) is Muon's epsilon and its default fallback's: optax's
    ``inject_hyperparams(muon)(eps=schedule)`` to 1e-10 in float64. The same epsilon
    loaded alone from a state dict reaches the fallback too."""
    from mithril.interop import torch_optimizer

    kw = {"weight_decay": 0.02}
    with jax_float64():
        want = schedule_run(optax.inject_hyperparams(oc.muon)(0.03, eps=eps_schedule, **kw))
    opt = Muon(0.03, convention="optax", **kw)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in P0.items()}
    topt = torch_optimizer(opt, list(tp.items()))
    for i in range(STEPS):
        topt.param_groups[0]["eps"] = float(eps_schedule(i))
        for k, t in tp.items():
            t.grad = torch.tensor(GRADS[i][k])
        topt.step()
    assert opt.fallback.epsilon == eps_schedule(STEPS - 1)
    close({k: t.detach().numpy() for k, t in tp.items()}, want)
    alone = Muon(convention="optax")
    alone.load_state_dict({"optimizer": "Muon", "hyperparameters": {"epsilon": 5e-4}})
    assert alone.fallback.epsilon == 5e-4


def test_default_fallback_follows_epsilon_set(tmp_path) -> None:
    """Muon's epsilon set (by attribute, or through the handle a scheduler drives) is its
    default fallback's, also in a Muon rebuilt from its hyperparameters or loaded from its
    state dict or checkpoint (into one made with a fallback given); a fallback given keeps
    its own, loaded into a default Muon too; a state dict form that says it follows an
    optimizer without eps is refused, naming the key."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
    from mithril.utils.optimizers import AdamW, NAdam

    opt = Muon(convention="optax")
    opt.epsilon = 1e-5
    assert opt.fallback.epsilon == 1e-5
    opt.hyperparameter("epsilon").set_learning_rate(2e-5)
    assert opt.fallback.epsilon == 2e-5
    params = {k: np.asarray(v) for k, v in P0.items()}
    sd = opt.state_dict(opt.init(params))
    save_checkpoint(tmp_path / "c.safetensors", params, opt, opt.init(params))

    def given() -> Muon:
        return Muon(convention="optax", fallback=NAdam(convention="optax",
                                                       decoupled_weight_decay=True))

    loaded, from_file = given(), given()
    loaded.load_state_dict(sd, params)
    load_checkpoint(tmp_path / "c.safetensors", params, from_file)
    for again in (Muon(**opt.hyperparameters()), loaded, from_file):
        assert again.hyperparameters() == opt.hyperparameters()
        again.epsilon = 3e-4
        assert again.fallback.epsilon == 3e-4 and opt.fallback.epsilon == 2e-5
    apart = given()
    default = Muon(convention="optax")
    default.load_state_dict(apart.state_dict(None))
    for o in (apart, default, Muon(convention="optax", fallback=opt.fallback)):
        before = o.fallback.epsilon
        o.epsilon = 1e-3
        assert o.fallback.epsilon == before != 1e-3
        assert "follows_epsilon" not in o.hyperparameters()["fallback"]
    plain = Muon(convention="optax", nesterov=False)  # (optax's adamw: our AdamW)
    plain.epsilon = 1e-4
    assert isinstance(plain.fallback, AdamW) and plain.fallback.epsilon == 1e-4
    with pytest.raises(ValueError, match="follows_epsilon=True, but SGD has no epsilon"):
        Muon(fallback={"optimizer": "SGD", "hyperparameters": {}, "follows_epsilon": True})
    with pytest.raises(TypeError, match=r"fallback\['follows_epsilon'\] must be True or"):
        Muon(fallback={"optimizer": "Adam", "hyperparameters": {}, "follows_epsilon": "y"})


@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_make_train_step_with_epsilon_scheduled_against_optax(backend: str) -> None:
    """``make_train_step`` with ``Muon(convention="optax")``, its epsilon driven at every
    step through the handle a scheduler drives, on a float32 MLP, against
    ``inject_hyperparams(muon)(eps=schedule)`` fed the gradients of its own parameters
    (float32 rounding); JAX's program traces it (one rebuild, one compile)."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    spec = mlp_spec(8, 4, [16, 12])
    r = np.random.default_rng(3)
    data = [{"input": r.standard_normal((32, 8)).astype(np.float32),
             "target": r.integers(0, 4, 32)} for _ in range(4)]
    be = {"jax": JaxBackend, "numpy": NumpyBackend}[backend](dtype="float32", seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    params = compiled.get_parameters()
    ref = {k: np.array(be.to_numpy(v)) for k, v in params.items()}
    opt = Muon(0.02, convention="optax")
    step = make_train_step(compiled, opt, loss="loss")
    state = step.init(params)
    runs = {}
    for eps in (eps_schedule, 1e-8):
        tx = optax.inject_hyperparams(oc.muon)(0.02, eps=eps)
        theirs = {k: jnp.asarray(v) for k, v in ref.items()}
        ostate = tx.init(theirs)
        for d in data:
            d = {"input": be.array(d["input"]), "target": be.array(d["target"], be.int_dtype)}
            _, g = compiled.evaluate({k: be.array(np.array(v)) for k, v in theirs.items()},
                                     d, output_gradients={"loss": 1.0})
            u, ostate = tx.update({k: jnp.asarray(be.to_numpy(v)) for k, v in g.items()},
                                  ostate, theirs)
            theirs = optax.apply_updates(theirs, u)
        runs[eps] = {k: np.array(v) for k, v in theirs.items()}
    for i, d in enumerate(data):
        opt.hyperparameter("epsilon").set_learning_rate(float(eps_schedule(i)))
        d = {"input": be.array(d["input"]), "target": be.array(d["target"], be.int_dtype)}
        params, state, _ = step(params, state, d)
    assert opt.fallback.epsilon == eps_schedule(3)
    if backend == "jax":
        assert step.rebuilds == 1 and step._jitted._cache_size() == 1
    want = runs[eps_schedule]
    for k, v in params.items():
        got = np.array(be.to_numpy(v))
        assert np.abs(got - ref[k]).max() > 1e-3, k
        np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=2e-6, err_msg=k)
    # (the schedule mattered: optax's run at its default eps ends elsewhere)
    assert max(np.abs(runs[1e-8][k] - want[k]).max() for k in want) > 1e-4
