"""SAM / ASAM and Mechanize (wrappers running a whole base optimizer's update) against their
peers, side by side in each test, float64, 20 steps, on the NumPy, torch and JAX backends:

* ``Mechanize(Adam(1.0))`` / ``Mechanize(SGD(0.1, momentum=0.9))`` against
  ``optax.contrib.mechanize`` (0.2.8) around ``optax.adam`` / ``optax.sgd``: params and
  Mechanic's ``s`` within 1e-12 after every step; gradients for some params only (a torch
  ``.grad`` None) against optax's on those alone;
* ``SAM(base, rho, eps=0)`` against ``optax.contrib.sam(base, chain(normalize(), sgd(rho)),
  sync_period=2, opaque_mode=True)`` (and its default transparent mode, two calls a step);
* ``SAM(..., adaptive=True)`` (ASAM) and plain SAM against the common PyTorch recipe
  (davda54/sam's first_step / second_step) around ``torch.optim.SGD`` / ``Adam``, and
  through ``torch_optimizer(SAM(...)).step(closure)`` on an ``nn.Module``.

Bad input is a named error that changes nothing: the run then goes on bit for bit as one
without the refused calls. ``state_dict`` resumes bit-exactly. optax_transformation refuses
both by name.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import torch
from conftest import host, native
from optimizer_parity import jax_float64

from mithril.errors import KeyMismatchError, ShapeError
from mithril.interop import optax_transformation, torch_optimizer
from mithril.utils.optimizers import LBFGS, SAM, SGD, Adam, Mechanize

BACKENDS = ["numpy", "torch", "jax"]
STEPS = 20
RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(6, 4)), RNG.normal(size=(6, 3))
P0 = {"w": RNG.normal(size=(4, 3)), "b": RNG.normal(size=3)}


def problem(backend: str):
    """``(params, closure)``: least squares plus a quartic term (a curved, non-quadratic
    loss), its loss and gradients at any params, in ``backend``'s arrays."""
    x, y = native(backend, X), native(backend, Y)

    def closure(p):
        r = x @ p["w"] + p["b"] - y
        loss = float(0.5 * (r * r).sum() + 0.1 * (p["w"] ** 4).sum())
        return loss, {"w": x.T @ r + 0.4 * p["w"] ** 3, "b": r.sum(0)}

    return {k: native(backend, v) for k, v in P0.items()}, closure


def ref_grads(p):
    return problem("jax")[1](p)[1]


def err(ours, theirs) -> float:
    return max(float(np.max(np.abs(host(ours[k]) - np.asarray(theirs[k])))) for k in theirs)


def copies(d):
    return {k: host(v) for k, v in d.items()}


BASES = {"adam": (lambda: Adam(1.0), lambda: optax.adam(1.0)),
         "sgd": (lambda: SGD(0.1, momentum=0.9), lambda: optax.sgd(0.1, momentum=0.9))}


# -- Mechanize vs optax.contrib.mechanize ---------------------------------------------------
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mechanize_matches_optax(backend, base):
    ours_base, theirs_base = BASES[base]
    kw = {"weight_decay": 0.01, "s_init": 0.05}  # (a larger s_init: the params move far)
    with jax_float64():
        params, closure = problem(backend)
        opt = Mechanize(ours_base(), **kw)
        state = opt.init(params)
        tx = optax.contrib.mechanize(theirs_base(), **kw)
        q = {k: jnp.asarray(v) for k, v in P0.items()}
        s = tx.init(q)
        for _ in range(STEPS):
            params, state = opt.update(params, closure(params)[1], state)
            u, s = tx.update(ref_grads(q), s, q)
            q = optax.apply_updates(q, u)
            assert err(params, q) <= 1e-12
            assert np.max(np.abs(opt.vectors(state)["s"] - np.asarray(s.s))) <= 1e-12
        assert err(params, P0) > 0.3 and state.values["mechanic_count"] == int(s.count) == STEPS


@pytest.mark.parametrize("backend", BACKENDS)
def test_mechanize_leaves_out_a_parameter_without_gradient_as_optax_without_it(backend):
    """Gradients for ``w`` only (``b`` as a torch ``.grad`` None): optax's mechanize on ``w``
    alone (``b`` held where it is), ``b`` bit for bit; and ``torch_optimizer(Mechanize)``
    with ``b.grad`` None the same."""
    kw = {"weight_decay": 0.01, "s_init": 0.05}
    with jax_float64():
        params, closure = problem(backend)
        opt = Mechanize(Adam(1.0), **kw)
        state = opt.init(params)
        tx = optax.contrib.mechanize(optax.adam(1.0), **kw)
        q = {"w": jnp.asarray(P0["w"])}
        s = tx.init(q)
        if backend == "torch":
            w, b = (torch.nn.Parameter(torch.tensor(P0[k])) for k in ("w", "b"))
            drop_in = torch_optimizer(Mechanize(Adam(1.0), **kw), [("w", w), ("b", b)])
        for _ in range(STEPS):
            params, state = opt.update(params, {"w": closure(params)[1]["w"]}, state)
            u, s = tx.update({"w": ref_grads({**q, "b": P0["b"]})["w"]}, s, q)
            q = optax.apply_updates(q, u)
            assert err(params, q) <= 1e-12 and np.array_equal(host(params["b"]), P0["b"])
            assert np.max(np.abs(opt.vectors(state)["s"] - np.asarray(s.s))) <= 1e-12
            if backend == "torch":
                w.grad = closure({"w": w.detach(), "b": b.detach()})[1]["w"]
                drop_in.step()
                assert err({"w": w, "b": b}, copies(params)) == 0
        assert err(params, {"w": P0["w"]}) > 0.3
        assert state.missed_counts() == {}  # (update leaves counting to the caller)


def test_mechanize_num_betas_and_betas():
    with jax_float64():
        params, closure = problem("numpy")
        opt = Mechanize(Adam(1.0), num_betas=3, s_init=0.05)
        same = Mechanize(Adam(1.0), betas=[1 - 0.1, 1 - 0.1 ** 2, 1 - 0.1 ** 3], s_init=0.05)
        state, state2 = opt.init(params), same.init(params)
        p2 = dict(params)
        tx = optax.contrib.mechanize(optax.adam(1.0), num_betas=3, s_init=0.05)
        q = {k: jnp.asarray(v) for k, v in P0.items()}
        s = tx.init(q)
        for _ in range(STEPS):
            params, state = opt.update(params, closure(params)[1], state)
            p2, state2 = same.update(p2, closure(p2)[1], state2)
            u, s = tx.update(ref_grads(q), s, q)
            q = optax.apply_updates(q, u)
            assert err(params, q) <= 1e-12 and err(p2, copies(params)) == 0
        assert opt.vectors(state)["s"].shape == (3,)


# -- SAM vs optax.contrib.sam ---------------------------------------------------------------
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_matches_optax(backend, base):
    ours_base, theirs_base = BASES[base]
    rho = 0.3
    with jax_float64():
        params, closure = problem(backend)
        opt = SAM(ours_base() if base == "sgd" else Adam(0.05), rho=rho, eps=0.0)
        state = opt.init(params)
        adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
        outer = theirs_base() if base == "sgd" else optax.adam(0.05)
        tx = optax.contrib.sam(outer, adv, sync_period=2, opaque_mode=True)
        # optax's default (transparent) mode: an adversarial and an outer call per step
        tx2 = optax.contrib.sam(outer, adv, sync_period=2)
        q = q2 = {k: jnp.asarray(v) for k, v in P0.items()}
        s, s2 = tx.init(q), tx2.init(q)
        for i in range(STEPS):
            given = closure(params)[1] if i % 2 else None  # (None: the closure's at params)
            before = copies(params)
            params, state = opt.update(params, given, state, closure=closure)
            u, s = tx.update(ref_grads(q), s, q, grad_fn=lambda p, _: ref_grads(p))
            q = optax.apply_updates(q, u)
            for _ in range(2):
                u, s2 = tx2.update(ref_grads(q2), s2, q2)
                q2 = optax.apply_updates(q2, u)
            assert err(params, q) <= 1e-12 and err(params, q2) <= 1e-12
        assert err(params, P0) > 0.3 and state.step == STEPS
        g = problem("numpy")[1](before)[1]  # last_loss: the loss at the perturbed point
        e = rho / np.sqrt(sum((v * v).sum() for v in g.values()))
        at = problem("numpy")[1]({k: v + e * g[k] for k, v in before.items()})[0]
        assert abs(state.last_loss - at) <= 1e-12 * abs(at)


# -- SAM / ASAM vs the PyTorch recipe -----------------------------------------------------------
def torch_sam(base: str, rho: float, adaptive: bool) -> dict[str, np.ndarray]:
    """davda54/sam's first_step / second_step around torch.optim ``base``, STEPS steps."""
    ps = [torch.tensor(P0["w"], requires_grad=True), torch.tensor(P0["b"], requires_grad=True)]
    x, y = torch.tensor(X), torch.tensor(Y)
    opt = (torch.optim.SGD(ps, lr=0.1, momentum=0.9) if base == "sgd"
           else torch.optim.Adam(ps, lr=0.05))

    def backward():
        opt.zero_grad()
        r = x @ ps[0] + ps[1] - y
        (0.5 * (r * r).sum() + 0.1 * (ps[0] ** 4).sum()).backward()

    for _ in range(STEPS):
        backward()
        with torch.no_grad():  # first_step
            norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(2)
                                           for p in ps]), 2)
            scale = rho / (norm + 1e-12)
            old = [p.clone() for p in ps]
            for p in ps:
                p.add_((p * p if adaptive else 1.0) * p.grad * scale)
        backward()
        with torch.no_grad():  # second_step
            for p, o in zip(ps, old):
                p.copy_(o)
        opt.step()
    return {"w": ps[0].detach().numpy(), "b": ps[1].detach().numpy()}


@pytest.mark.parametrize("base,adaptive", [("sgd", True), ("sgd", False), ("adam", True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_matches_the_torch_recipe(backend, base, adaptive):
    with jax_float64():
        params, closure = problem(backend)
        opt = SAM(SGD(0.1, momentum=0.9) if base == "sgd" else Adam(0.05), rho=0.5,
                  adaptive=adaptive)
        state = opt.init(params)
        for _ in range(STEPS):
            params, state = opt.update(params, closure(params)[1], state, closure=closure)
        theirs = torch_sam(base, 0.5, adaptive)
        assert err(params, theirs) <= 1e-12 and err(params, P0) > 0.3


def test_sam_with_a_parameter_without_gradient():
    """``b`` without a gradient (a torch ``.grad`` None), whether the closure at params leaves
    it out (``gradients=None``) or the given gradients do (the closure's ``b`` then unused):
    ``w`` as SAM on ``w`` alone with ``b`` held, ``b`` bit for bit."""
    params, closure = problem("numpy")
    runs = []
    for variant in ("closure", "given", "alone"):
        opt = SAM(Adam(0.05), rho=0.1)
        p = {"w": params["w"]} if variant == "alone" else dict(params)
        state = opt.init(p)
        for _ in range(5):
            if variant == "closure":
                p, state = opt.update(p, None, state, closure=lambda q: (
                    closure(q)[0], {"w": closure(q)[1]["w"]}))
            else:
                f = (lambda q: {"w": closure({**q, "b": params["b"]})[1]["w"]}) \
                    if variant == "alone" else closure
                p, state = opt.update(p, {"w": closure({**params, **p})[1]["w"]}, state,
                                      closure=f)
        runs.append(p)
    assert err(runs[0], runs[2]) == err(runs[1], runs[2]) == 0 < err(runs[2], {"w": P0["w"]})
    assert np.array_equal(runs[0]["b"], params["b"]) and np.array_equal(runs[1]["b"],
                                                                         params["b"])


def test_sam_through_torch_optimizer_step_closure():
    """``torch_optimizer(SAM(SGD)).step(closure)`` on an nn.Module: the recipe's numbers."""
    def run(ours: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 3)).double()
        x, y = torch.tensor(X), torch.tensor(Y)
        ps = list(model.parameters())
        opt = (torch_optimizer(SAM(SGD(0.1, momentum=0.9), rho=0.2, adaptive=True), ps)
               if ours else torch.optim.SGD(ps, lr=0.1, momentum=0.9))

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        for _ in range(STEPS):
            if ours:
                opt.step(closure)
                continue
            closure()
            with torch.no_grad():
                norm = torch.norm(torch.stack([(p.abs() * p.grad).norm(2) for p in ps]), 2)
                old = [p.clone() for p in ps]
                for p in ps:
                    p.add_(p * p * p.grad * (0.2 / (norm + 1e-12)))
            closure()
            with torch.no_grad():
                for p, o in zip(ps, old):
                    p.copy_(o)
            opt.step()
        return [p.detach().clone() for p in ps]

    ours, theirs = run(True), run(False)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) <= 1e-12


# -- bad input: a named error, nothing changed ---------------------------------------------------
def snapshot(params, state):
    return (copies(params), {k: host(v).copy() for k, v in state.slots.items()}, state.step)


def unchanged(params, state, snap):
    p, slots, step = snap
    assert err(params, p) == 0 and state.step == step
    assert all(np.array_equal(host(state.slots[k]), v) for k, v in slots.items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_bad_input_changes_nothing(backend):
    with jax_float64():
        _test_sam_bad_input_changes_nothing(backend)


def _test_sam_bad_input_changes_nothing(backend):
    params, closure = problem(backend)
    opt, ref = SAM(Adam(0.05), rho=0.1), SAM(Adam(0.05), rho=0.1)
    state, p_ref = opt.init(params), dict(params)
    s_ref = ref.init(p_ref)
    for _ in range(3):
        params, state = opt.update(params, None, state, closure=closure)
        p_ref, s_ref = ref.update(p_ref, None, s_ref, closure=closure)
    snap = snapshot(params, state)
    g = closure(params)[1]
    x = native(backend, np.zeros(5))

    def raising(p):
        raise RuntimeError("boom")

    bad = [(TypeError, "needs closure=", dict(closure=None)),
           (TypeError, "closure must be callable", dict(closure=3)),
           (KeyMismatchError, r"missing \['b'\]", dict(closure=lambda p: (0.0, {"w": g["w"]}))),
           (KeyMismatchError, r"unknown \['z'\]", dict(closure=lambda p: {**g, "z": g["b"]})),
           (ShapeError, r"perturbed params\): gradients\['b'\] has shape \(5,\)",
            dict(closure=lambda p: (0.0, {**g, "b": x}))),
           (TypeError, "must return \\(loss, gradients\\)", dict(closure=lambda p: [g["w"]])),
           (TypeError, "closure's loss must be a number", dict(closure=lambda p: ("x", g))),
           (TypeError, "are None", dict(closure=lambda p: {**g, "b": None})),
           (RuntimeError, "boom", dict(closure=raising))]
    for exc, match, kw in bad:
        with pytest.raises(exc, match=match):
            opt.update(params, g, state, **kw)
        unchanged(params, state, snap)
    with pytest.raises(ShapeError, match=r"gradients\['w'\] has shape \(5,\)"):
        opt.update(params, {**g, "w": x}, state, closure=closure)
    with pytest.raises(KeyMismatchError, match=r"gradients: unknown \['z'\]"):
        opt.update(params, {**g, "z": g["b"]}, state, closure=closure)
    with pytest.raises(KeyMismatchError, match=r"perturbed params\): missing \['w'\]"):
        opt.update(params, {"w": g["w"]}, state, closure=lambda p: {"b": g["b"]})
    with pytest.raises(ValueError, match="made by Adam"):
        opt.update(params, g, Adam(0.05).init(params), closure=closure)
    with pytest.raises(ValueError, match="made by SAM"):  # (the base alone refuses it too)
        Adam(0.05).update(params, g, state)
    unchanged(params, state, snap)
    for _ in range(2):  # the run goes on as one without the refused calls
        params, state = opt.update(params, None, state, closure=closure)
        p_ref, s_ref = ref.update(p_ref, None, s_ref, closure=closure)
    assert err(params, copies(p_ref)) == 0


def test_sam_bad_arguments():
    for kw, exc, match in [({"rho": -0.1}, ValueError, "rho"), ({"rho": float("nan")},
                           ValueError, "rho"), ({"rho": "0.1"}, TypeError, "rho"),
                           ({"adaptive": "yes"}, TypeError, "adaptive"),
                           ({"eps": -1.0}, ValueError, "eps")]:
        with pytest.raises(exc, match=match):
            SAM(Adam(), **kw)
    with pytest.raises(TypeError, match="LBFGS evaluates the loss itself"):
        SAM(LBFGS())
    opt = SAM(Adam(), rho=0.1)
    for name, value, exc in [("rho", "0.1", TypeError), ("adaptive", "yes", TypeError),
                             ("base_optimizer", "adam", TypeError)]:
        with pytest.raises(exc, match=f"SAM: {name}"):
            setattr(opt, name, value)
    assert (opt.rho, opt.adaptive, type(opt.base_optimizer)) == (0.1, False, Adam)
    with pytest.raises(TypeError, match="base_optimizer must be a mithril optimizer"):
        SAM("adam")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mechanize_bad_input_changes_nothing(backend):
    with jax_float64():
        _test_mechanize_bad_input_changes_nothing(backend)


def _test_mechanize_bad_input_changes_nothing(backend):
    params, closure = problem(backend)
    opt, ref = Mechanize(Adam(1.0), s_init=0.05), Mechanize(Adam(1.0), s_init=0.05)
    state, p_ref = opt.init(params), dict(params)
    s_ref = ref.init(p_ref)
    for _ in range(3):
        params, state = opt.update(params, closure(params)[1], state)
        p_ref, s_ref = ref.update(p_ref, closure(p_ref)[1], s_ref)
    snap, values = snapshot(params, state), dict(state.values)
    g = closure(params)[1]
    f32 = {k: native(backend, host(v).astype(np.float32)) for k, v in g.items()}
    for exc, match, grads in [
            (KeyMismatchError, r"unknown \['z'\]", {**g, "z": g["b"]}),
            (ShapeError, r"gradients\['b'\] has shape \(4, 3\)", {**g, "b": g["w"]}),
            (TypeError, "dtype float32", f32),
            (TypeError, "dict of arrays", [g["w"]])]:
        with pytest.raises(exc, match=match):
            opt.update(params, grads, state)
        unchanged(params, state, snap)
        assert state.values == values
    with pytest.raises(ValueError, match="made by Adam"):
        opt.update(params, g, Adam(1.0).init(params))
    for _ in range(2):
        params, state = opt.update(params, closure(params)[1], state)
        p_ref, s_ref = ref.update(p_ref, closure(p_ref)[1], s_ref)
    assert err(params, copies(p_ref)) == 0


def test_mechanize_bad_arguments():
    for kw, exc, match in [({"weight_decay": -1}, ValueError, "weight_decay"),
                           ({"num_betas": 0}, ValueError, "num_betas"),
                           ({"num_betas": 2.0}, TypeError, "num_betas"),
                           ({"betas": (0.9, 1.0)}, ValueError, "betas"),
                           ({"betas": "0.9"}, TypeError, "betas"),
                           ({"s_init": float("inf")}, ValueError, "s_init")]:
        with pytest.raises(exc, match=match):
            Mechanize(Adam(1.0), **kw)
    with pytest.raises(TypeError, match="LBFGS evaluates the loss itself"):
        Mechanize(LBFGS())
    opt = Mechanize(Adam(1.0))
    with pytest.raises(ValueError, match=r"Mechanize: betas=\(0.9, 2.0\) refused"):
        opt.betas = (0.9, 2.0)
    params, closure = problem("numpy")
    state = opt.init(params)
    opt.betas = (0.9, 0.99)  # (a state made with six: refused, not read in part)
    with pytest.raises(ValueError, match="for 6 betas, this Mechanize has 2"):
        opt.update(params, closure(params)[1], state)
    assert state.step == 0 and state.values["mechanic_count"] == 0


# -- state dicts, the interop paths ----------------------------------------------------------
@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_state_dict_resumes_bit_exactly(arrays):
    for make in (lambda: SAM(Adam(0.05), rho=0.1, adaptive=True),
                 lambda: Mechanize(SGD(0.1, momentum=0.9), s_init=0.05)):
        params, closure = problem("numpy")
        opt = make()
        state = opt.init(params)

        def step(o, p, s, f=closure):
            g = f(p)[1]
            return o.update(p, g, s, closure=f) if isinstance(o, SAM) else o.update(p, g, s)

        for _ in range(4):
            params, state = step(opt, params, state)
        d = opt.state_dict(state, arrays=arrays)
        assert d["optimizer"] == type(opt).__name__
        fresh = make()
        fresh.base_optimizer.learning_rate = 0.5  # (restored from the state dict)
        p2 = copies(params)
        s2 = fresh.load_state_dict(d, p2)
        assert fresh.learning_rate == opt.learning_rate
        for _ in range(3):
            params, state = step(opt, params, state)
            p2, s2 = step(fresh, p2, s2)
        assert err(params, copies(p2)) == 0 and s2.step == state.step == 7


def test_load_state_dict_refusals_change_nothing():
    params, closure = problem("numpy")
    opt = Mechanize(Adam(1.0))
    state = opt.init(params)
    params, state = opt.update(params, closure(params)[1], state)
    d = opt.state_dict(state)
    other = Mechanize(Adam(0.5), eps=1e-6)
    before = other.hyperparameters()
    bad_x0 = {**d, "slots": {**d["slots"], "mechanic_x0": {"w": np.zeros(2), "b": np.zeros(3)}}}
    for exc, match, dd in [
            (KeyError, "mechanic_s1", {**d, "values": {k: v for k, v in d["values"].items()
                                                      if k != "mechanic_s1"}}),
            (ShapeError, "mechanic_x0' of 'w' has shape", bad_x0),
            (ValueError, "wraps Adam", {**d, "hyperparameters": {
                **d["hyperparameters"], "base_optimizer": {"optimizer": "SGD",
                                                           "hyperparameters": {}}}}),
            (ValueError, "not Mechanize", {**d, "optimizer": "SAM"})]:
        with pytest.raises(exc, match=match):
            other.load_state_dict(dd, params)
        assert other.hyperparameters() == before


def test_optax_transformation_refuses_both_by_name():
    for opt in (SAM(Adam()), Mechanize(Adam(1.0))):
        with pytest.raises(TypeError, match=f"{type(opt).__name__} overrides update"):
            optax_transformation(opt)


def test_a_step_the_base_skips_is_skipped_whole():
    """``nonfinite="skip"`` on the base: a NaN gradient leaves the params and Mechanic's
    scalars and x0 as they were (and the run goes on as one without that call)."""
    params, closure = problem("numpy")
    opt, ref = (Mechanize(Adam(1.0, nonfinite="skip"), s_init=0.05) for _ in range(2))
    state, p_ref = opt.init(params), dict(params)
    s_ref = ref.init(p_ref)
    for _ in range(2):
        params, state = opt.update(params, closure(params)[1], state)
        p_ref, s_ref = ref.update(p_ref, closure(p_ref)[1], s_ref)
    snap, values = snapshot(params, state), dict(state.values)
    nan = {k: np.full_like(v, np.nan) for k, v in closure(params)[1].items()}
    with pytest.warns(RuntimeWarning, match="step skipped"):
        params, state = opt.update(params, nan, state)
    assert state.last_step_skipped and state.values == values
    unchanged(params, state, snap)
    for _ in range(2):
        params, state = opt.update(params, closure(params)[1], state)
        p_ref, s_ref = ref.update(p_ref, closure(p_ref)[1], s_ref)
    assert err(params, copies(p_ref)) == 0
