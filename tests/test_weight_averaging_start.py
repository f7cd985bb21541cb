"""An EMA that starts later (``ema_start=``) and averages that start at a resume: side by
side with torch's ``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))`` created after step
``ema_start − 1`` (or at the resume) and updated after every later k-th optimizer step, after
every step, in float64 on every engine (NumPy, torch, JAX eager and jitted, torch's fused
engine, the tensor-op engine); the traced JAX weights (optax interop, ``make_train_step``)
against the eager ones; checkpoints with and without an average; bad values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from optimizer_parity import host, init, natives, rel_err
from test_weight_averaging import ENGINES, SHAPES, Net, engine, problem, torch_float64
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import mithril.utils.optimizers as mo
from mithril.utils.optimizers.averaging import weights

TOL = 1e-12
LR = 1e-2


def torch_rows(p0: dict, grads: list, *, decay: float | None = None, start: int = 1,
               every: int = 1, swa_from: int | None = None) -> list:
    """torch Adam (float64) with an EMA ``AveragedModel`` created after step ``start − 1``
    and, with ``swa_from``, an SWA one created after step ``swa_from − 1``, each updated
    after every later step that is a multiple of ``every``. Per step: the parameters and each
    average (None until its first update)."""
    names = list(p0)
    with torch_float64():
        net = Net(p0)
        opt = torch.optim.Adam(net.ps.parameters(), lr=LR)
        ema = swa = None
        rows = []
        for t, g in enumerate(grads, 1):
            if decay is not None and t == start:  # (created now: a copy of the parameters)
                ema = [AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay)), 0]
            if swa_from is not None and t == swa_from:
                swa = [AveragedModel(net), 0]
            for p, v in zip(net.ps, g.values()):
                p.grad = torch.tensor(v)
            opt.step()
            row = [{k: p.detach().numpy().copy() for k, p in zip(names, net.ps)}]
            for avg in (ema, swa):
                if avg is not None and t % every == 0:
                    avg[0].update_parameters(net)
                    avg[1] += 1
                row.append(None if avg is None or not avg[1] else
                           {k: p.detach().numpy().copy() for k, p in zip(names, avg[0].module.ps)})
            rows.append(row)
        return rows


def ours_rows(opt: mo.Optimizer, backend: str, p0: dict, grads: list) -> list:
    """Ours, per step: the parameters, the EMA and the SWA average (None where not kept)."""
    with engine(backend) as b:
        params = natives(b, p0)
        state = opt.init(params) if backend.startswith("array-") else init(opt, b, params)
        rows = []
        for g in grads:
            params, state = opt.update(params, natives(b, g), state)
            rows.append(after_step(opt, state, params))
        return rows


def after_step(opt: mo.Optimizer, state, params: dict) -> list:
    return [{k: host(v) for k, v in params.items()},
            *({k: host(v) for k, v in get(state).items()} if on else None
              for on, get in ((opt.ema_decay is not None, opt.ema_params),
                              (opt.swa_start is not None, opt.swa_params)))]


def assert_rows(got: list, want: list, before: dict | None, what: str, first: int = 1) -> None:
    """Every step's parameters and averages to ``TOL``; an average torch has not updated yet
    is ``before`` bit for bit (ours holds the parameters it started from until then)."""
    for t, (g, w) in enumerate(zip(got, want, strict=True), first):
        for k in SHAPES:
            assert rel_err(g[0][k], w[0][k]) <= TOL, (what, "params", t, k)
        for i, name in ((1, "ema"), (2, "swa")):
            if w[i] is None:
                if g[i] is not None and before is not None:
                    assert all(np.array_equal(g[i][k], before[k]) for k in SHAPES), (what, t)
                continue
            for k in SHAPES:
                err = rel_err(g[i][k], w[i][k])
                assert err <= TOL, (what, name, t, k, err)


# ---------------------------------------------------------------------------------------------
# ema_start against torch, every engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "every"), [(7, 1), (7, 3), (6, 3), (1, 4)])
def test_ema_start_equals_averaged_model_created_later(start, every):
    """30 steps, decay 0.8: ``ema_start=s, ema_every=k`` is torch's ``AveragedModel`` created
    after step s − 1 and updated after every later k-th step, after every step, on every
    engine; before its first update the EMA holds the initial parameters."""
    p0, grads = problem(seed=3, steps=30)
    want = torch_rows(p0, grads, decay=0.8, start=start, every=every)
    assert sum(r[1] is None for r in want) == start - 1 + (-start) % every  # (torch's count)
    for backend in ENGINES:
        opt = mo.Adam(LR, ema_decay=0.8, ema_start=start, ema_every=every)
        assert_rows(ours_rows(opt, backend, p0, grads), want, p0, f"{backend} {start} {every}")


def test_ema_start_one_is_the_default_bit_for_bit():
    """``ema_start=1`` is the EMA as it was: the same weights, the same numbers."""
    p0, grads = problem(seed=4, steps=12)
    for backend in ("numpy", "jax-jit"):
        a = ours_rows(mo.Adam(LR, ema_decay=0.9, ema_every=2), backend, p0, grads)
        b = ours_rows(mo.Adam(LR, ema_decay=0.9, ema_every=2, ema_start=1), backend, p0, grads)
        for ra, rb in zip(a, b, strict=True):
            assert all(np.array_equal(ra[1][k], rb[1][k]) for k in SHAPES)
    opt = mo.Adam(ema_decay=0.9, ema_every=3)
    old = [0.0 if t % 3 else (1.0 if t // 3 == 1 else 1.0 - 0.9) for t in range(1, 40)]
    assert [weights(opt, t)[0] for t in range(1, 40)] == old


def test_ema_start_through_muon_and_lookahead():
    """Muon (its own matrices and its AdamW fallback's rows) and Lookahead (the inner's
    options) average from ``ema_start`` on as the plain optimizer's rule says: the averages
    equal the parameters of the first averaging step, then follow ``1 − d``."""
    p0, grads = problem(seed=5, steps=9)
    for opt in (mo.Muon(LR, ema_decay=0.5, ema_start=4, ema_every=2),
                mo.Lookahead(mo.Adam(LR, ema_decay=0.5, ema_start=4, ema_every=2), sync_period=3)):
        assert opt.ema_start == 4
        rows = ours_rows(opt, "numpy", p0, grads)
        for t, (p, ema, _) in enumerate(rows, 1):
            if t < 4:  # steps 1..3: nothing yet
                want = p0
            elif t == 4:  # the first multiple of 2 >= 4 copies
                want = p
            elif t % 2:
                want = rows[t - 2][1]
            else:
                prev = rows[t - 2][1]
                want = {k: prev[k] + 0.5 * (p[k] - prev[k]) for k in SHAPES}
            for k in SHAPES:
                np.testing.assert_allclose(ema[k], want[k], rtol=1e-15, atol=1e-15,
                                           err_msg=f"{type(opt).__name__} {t} {k}")


def test_ema_start_per_parameter_group():
    """A group with its own ``ema_start`` (``"b"`` and ``"s"`` from step 5, the rest from 1):
    torch with one ``AveragedModel`` per subset, the second created after step 4, after
    every step, on NumPy, torch and the jitted JAX engine."""
    p0, grads = problem(seed=15, steps=12)
    late = ("b", "s")
    names = list(p0)
    with torch_float64():
        net = Net(p0)
        opt = torch.optim.Adam(net.ps.parameters(), lr=LR)
        sub = {w: torch.nn.ParameterList([p for n, p in zip(names, net.ps) if (n in late) == w])
               for w in (False, True)}
        avg = {False: AveragedModel(sub[False], multi_avg_fn=get_ema_multi_avg_fn(0.8))}
        want = []
        for t, g in enumerate(grads, 1):
            if t == 5:
                avg[True] = AveragedModel(sub[True], multi_avg_fn=get_ema_multi_avg_fn(0.8))
            for p, v in zip(net.ps, g.values()):
                p.grad = torch.tensor(v)
            opt.step()
            row = {}
            for w, m in avg.items():
                m.update_parameters(sub[w])
                row.update(zip([n for n in names if (n in late) == w],
                               (q.detach().numpy().copy() for q in m.module)))
            want.append(row)
    for backend in ("numpy", "torch", "jax-jit"):
        opt = mo.Adam(LR, ema_decay=0.8, param_groups=[{"params": "^(b|s)$", "ema_start": 5}])
        rows = ours_rows(opt, backend, p0, grads)
        for t, (r, w) in enumerate(zip(rows, want, strict=True), 1):
            for k in SHAPES:
                if k in w:
                    assert rel_err(r[1][k], w[k]) <= TOL, (backend, t, k)
                else:  # not started: the initial parameters
                    assert np.array_equal(r[1][k], p0[k]), (backend, t, k)


# ---------------------------------------------------------------------------------------------
# resuming into an average
# ---------------------------------------------------------------------------------------------


def resumed_rows(backend: str, p0: dict, grads: list, saved_at: int, make) -> tuple:
    """``saved_at`` steps of plain Adam, a state dict, then ``make()`` loading it with the
    parameters of then and running the rest. Returns (the rows after the resume, the
    parameters at the resume, the loaded optimizer)."""
    with engine(backend) as b:
        opt = mo.Adam(LR)
        params = natives(b, p0)
        state = init(opt, b, params)
        for g in grads[:saved_at]:
            params, state = opt.update(params, natives(b, g), state)
        sd = opt.state_dict(state)
        at_resume = {k: host(v) for k, v in params.items()}
        opt2 = make()
        state2 = opt2.load_state_dict(sd, natives(b, at_resume))
        params2, rows = natives(b, at_resume), []
        for g in grads[saved_at:]:
            params2, state2 = opt2.update(params2, natives(b, g), state2)
            rows.append(after_step(opt2, state2, params2))
        return rows, at_resume, opt2


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax-jit"])
def test_resume_into_an_ema_equals_a_fresh_averaged_model(backend):
    """10 steps without an EMA, saved; an optimizer constructed with ``ema_decay`` (and
    ``ema_every``) loads it and runs 10 more: its EMA is torch's ``AveragedModel`` created
    at the resume, after every step (``ema_start`` became 11: the saved step + 1)."""
    p0, grads = problem(seed=8, steps=20)
    for every in (1, 3):
        want = torch_rows(p0, grads, decay=0.9, start=11, every=every)[10:]
        rows, at_resume, opt2 = resumed_rows(
            backend, p0, grads, 10, lambda e=every: mo.Adam(LR, ema_decay=0.9, ema_every=e))
        assert (opt2.ema_decay, opt2.ema_every, opt2.ema_start) == (0.9, every, 11)
        assert_rows(rows, want, at_resume, f"{backend} every {every}", first=11)


def test_resume_into_swa_and_a_later_ema_start():
    """SWA resumed as the EMA is (``swa_start`` 5 <= the saved step 10 becomes 11: torch's
    equal average created at the resume); an ``ema_start`` already after the resume (15)
    is kept, as torch's ``AveragedModel`` created then."""
    p0, grads = problem(seed=9, steps=22)
    want = torch_rows(p0, grads, decay=0.7, start=15, every=2, swa_from=11)[10:]
    rows, at_resume, opt2 = resumed_rows(
        "numpy", p0, grads, 10,
        lambda: mo.Adam(LR, ema_decay=0.7, ema_start=15, ema_every=2, swa_start=5))
    assert (opt2.ema_start, opt2.swa_start, opt2.ema_every) == (15, 11, 2)
    assert_rows(rows, want, at_resume, "swa and later ema", first=11)


def test_resume_through_lookahead_is_an_ema_started_there():
    """A Lookahead whose inner keeps an EMA, resuming from a Lookahead saved without one:
    the EMA starts at the resume (``ema_start`` 11), as in the uninterrupted run made with
    ``ema_start=11``."""
    p0, grads = problem(seed=10, steps=16)

    def make(**kw):
        return mo.Lookahead(mo.Adam(LR, **kw), sync_period=4)

    plain = make()
    params = natives("numpy", p0)
    state = plain.init(params)
    for g in grads[:10]:
        params, state = plain.update(params, g, state)
    opt = make(ema_decay=0.6)
    params = {k: v.copy() for k, v in params.items()}
    state = opt.load_state_dict(plain.state_dict(state), params)
    assert (opt.ema_decay, opt.ema_start) == (0.6, 11)
    for g in grads[10:]:
        params, state = opt.update(params, g, state)
    ref = make(ema_decay=0.6, ema_start=11)
    p = natives("numpy", p0)
    st = ref.init(p)
    for g in grads:
        p, st = ref.update(p, g, st)
    for k in SHAPES:  # (to an ulp: the first 10 steps ran the kernel without the averaging)
        assert rel_err(params[k], p[k]) <= TOL
        assert rel_err(opt.ema_params(state)[k], ref.ema_params(st)[k]) <= TOL


def test_checkpoint_with_an_ema_restores_it_exactly(tmp_path):
    """A checkpoint with an EMA (``ema_start`` 7, every 2) loaded into an optimizer made
    with another EMA, or without one: the checkpoint's EMA and settings come back and the
    run continues bit for bit. A checkpoint saved before ``ema_start`` existed (no such key)
    started its EMA at step 1."""
    p0, grads = problem(seed=11, steps=16)
    opt = mo.Adam(LR, ema_decay=0.9, ema_start=7, ema_every=2)
    params = natives("numpy", p0)
    state = opt.init(params)
    for g in grads[:8]:
        params, state = opt.update(params, g, state)
    sd = copy.deepcopy(opt.state_dict(state))
    saved = {k: v.copy() for k, v in params.items()}
    for g in grads[8:]:
        params, state = opt.update(params, g, state)
    want = {k: v.copy() for k, v in opt.ema_params(state).items()}
    for other in (mo.Adam(0.5, ema_decay=0.5, ema_start=3), mo.Adam(0.5)):
        st = other.load_state_dict(sd, {k: v.copy() for k, v in saved.items()})
        assert (other.ema_decay, other.ema_start, other.ema_every) == (0.9, 7, 2)
        p = {k: v.copy() for k, v in saved.items()}
        for g in grads[8:]:
            p, st = other.update(p, g, st)
        assert all(np.array_equal(other.ema_params(st)[k], want[k]) for k in SHAPES)
    old = copy.deepcopy(sd)
    del old["hyperparameters"]["ema_start"]
    late = mo.Adam(LR, ema_decay=0.9, ema_start=50)
    late.load_state_dict(old, saved)
    assert late.ema_start == 1


def test_hyperparameters_without_a_state_are_taken_as_given():
    """A state dict without a state (hyperparameters only: a change of settings, what the
    torch wrapper's param groups load) sets ``ema_decay=None`` as given: no EMA then, as
    torch's ``param_groups`` values are applied; a partial one leaves ``ema_start`` alone."""
    opt = mo.Adam(LR, ema_decay=0.9, ema_start=5)
    opt.load_state_dict(mo.Adam(LR).state_dict())
    assert opt.ema_decay is None
    opt = mo.Adam(LR, ema_decay=0.9, ema_start=5)
    opt.load_state_dict({"optimizer": "Adam", "hyperparameters": {"learning_rate": 0.5}})
    assert (opt.learning_rate, opt.ema_decay, opt.ema_start) == (0.5, 0.9, 5)
    from mithril.interop import TorchOptimizer

    w = torch.nn.Parameter(torch.ones(3))
    wrapped = TorchOptimizer(mo.Adam(LR, ema_decay=0.9), [{"params": [w], "ema_decay": None}])
    assert wrapped.param_groups[0]["ema_decay"] is None
    assert wrapped._mithril.ema_decay is None


def test_a_state_dict_with_an_ema_slot_but_no_ema_is_refused():
    p0, grads = problem(seed=12, steps=2)
    opt = mo.Adam(LR, ema_decay=0.9)
    params = natives("numpy", p0)
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    sd = opt.state_dict(state)
    sd["hyperparameters"]["ema_decay"] = None  # an inconsistent checkpoint
    target = mo.Adam(0.5, ema_decay=0.5, ema_every=2)
    with pytest.raises(KeyError, match="ema"):
        target.load_state_dict(sd, params)
    assert (target.learning_rate, target.ema_decay, target.ema_every, target.ema_start) == (
        0.5, 0.5, 2, 1)


# ---------------------------------------------------------------------------------------------
# bad values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "err"), [(0, ValueError), (-1, ValueError), (2**70, ValueError),
                                            (2.5, TypeError), (True, TypeError),
                                            ("3", TypeError), (None, TypeError)])
def test_bad_ema_start_is_named_and_changes_nothing(value, err):
    with pytest.raises(err, match="ema_start"):
        mo.Adam(ema_decay=0.9, ema_start=value)
    opt = mo.Adam(ema_decay=0.9, ema_start=5)
    with pytest.raises(err, match="ema_start"):
        opt.ema_start = value
    assert opt.ema_start == 5
    sd = opt.state_dict()
    sd["hyperparameters"]["ema_start"] = value
    target = mo.Adam(0.5, ema_decay=0.5, ema_start=3)
    with pytest.raises(err, match="ema_start"):
        target.load_state_dict(sd)
    assert (target.learning_rate, target.ema_decay, target.ema_start) == (0.5, 0.5, 3)


# ---------------------------------------------------------------------------------------------
# the traced JAX path
# ---------------------------------------------------------------------------------------------


def test_traced_weights_equal_the_eager_ones():
    """The weight the optax program traces (int32 step) is the eager one, for every step of
    a grid of starts and periods, the first copy included."""
    import jax
    import jax.numpy as jnp

    from mithril.interop.optax_scalars import _averaging_weights

    for start, every in ((1, 1), (1, 3), (5, 1), (5, 3), (6, 3), (7, 4), (2**40, 2)):
        opt = mo.Adam(ema_decay=0.75, ema_start=start, ema_every=every, swa_start=4)
        ts = jnp.arange(1, 41, dtype=jnp.int32)
        got = np.asarray(jax.jit(jax.vmap(lambda t, o=opt: jnp.stack(
            _averaging_weights(o, t))))(ts), np.float64)
        want = np.array([weights(opt, int(t)) for t in ts], np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=0, err_msg=f"{start} {every}")
        assert np.array_equal(got == 1, want == 1) and np.array_equal(got == 0, want == 0)


def test_optax_transformation_with_ema_start_is_the_eager_run():
    """float64: the optax transformation's EMA (``ema_start=4, ema_every=2``) after every
    step equals the eager JAX engine's and torch's ``AveragedModel`` created after step 3."""
    import jax
    import optax
    from optimizer_parity import jax_float64

    from mithril.interop import optax_transformation

    p0, grads = problem(seed=13, steps=12)
    want = torch_rows(p0, grads, decay=0.85, start=4, every=2)
    eager = ours_rows(mo.Adam(LR, ema_decay=0.85, ema_start=4, ema_every=2), "jax-jit", p0,
                      grads)
    assert_rows(eager, want, p0, "eager")
    with jax_float64():
        import jax.numpy as jnp

        tx = optax_transformation(mo.Adam(LR, ema_decay=0.85, ema_start=4, ema_every=2))
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
            *tx.update(g, s, p)))
        rows = []
        for g in grads:
            params, state = step(params, state, {k: jnp.asarray(v) for k, v in g.items()})
            rows.append([{k: np.asarray(v) for k, v in params.items()},
                         {k: np.asarray(v) for k, v in state.slots["ema"].items()}, None])
    assert_rows(rows, want, p0, "traced")
    for r, e in zip(rows, eager, strict=True):
        for k in SHAPES:
            assert rel_err(r[1][k], e[1][k]) <= TOL


def test_optax_transformation_of_muon_with_ema_start_is_the_eager_run():
    """Muon (its Newton-Schulz matrices and the fallback's rows; the tensorwise traced
    program): the traced EMA after every step is the eager one, the initial parameters
    until ``ema_start``."""
    import jax.numpy as jnp
    import optax
    from optimizer_parity import jax_float64

    from mithril.interop import optax_transformation

    p0, grads = problem(seed=14, steps=9)

    def make():  # (Newton-Schulz in float64: in bfloat16 the jitted step, rounding as XLA
        # fuses, and the traced op-by-op one differ by bfloat16's rounding, ~1e-3)
        return mo.Muon(LR, ema_decay=0.5, ema_start=4, ema_every=2, ns_dtype=None)

    with jax_float64():
        opt, tx = make(), optax_transformation(make())
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        q = dict(params)
        state, s = opt.init(params), tx.init(q)
        for t, g in enumerate(grads, 1):
            gj = {k: jnp.asarray(v) for k, v in g.items()}
            params, state = opt.update(params, gj, state)
            u, s = tx.update(gj, s, q)
            q = optax.apply_updates(q, u)
            eager = opt.ema_params(state)
            for k in SHAPES:
                traced = np.asarray(s.slots["ema"][k])
                assert rel_err(traced, np.asarray(eager[k])) <= TOL, (t, k)
                assert np.array_equal(traced, p0[k]) is (t < 4), (t, k)


def test_make_train_step_on_jax_with_ema_start():
    """``make_train_step`` on JAX (one program) keeps the EMA that the separate evaluate +
    update does, with ``ema_start=3, ema_every=2`` (float32, as its other tests), after every
    step; setting ``ema_start`` afterwards rebuilds the program."""
    from test_train_step_fn import host as host_of
    from test_train_step_fn import problem as model_problem

    from mithril.utils.training import make_train_step

    compiled, be, batches = model_problem("jax")
    compiled2, _, _ = model_problem("jax")
    batches = batches * 2  # 8 steps
    sep = mo.Adam(1e-2, ema_decay=0.5, ema_start=3, ema_every=2)
    params = compiled.get_parameters()
    sstate = sep.init(params)
    fopt = mo.Adam(1e-2, ema_decay=0.5, ema_start=3, ema_every=2)
    step = make_train_step(compiled2, fopt, loss="loss")
    fparams = compiled2.get_parameters()
    fstate = step.init(fparams)
    p_init = host_of(be, fparams)
    for t, data in enumerate(batches, 1):
        _, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
        params, sstate = sep.update(params, grads, sstate)
        fparams, fstate, _ = step(fparams, fstate, data)
        want = host_of(be, sep.ema_params(sstate))
        got = {k: np.asarray(v) for k, v in fstate.slots["ema"].items()}
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{t} {k}")
            if t < 3:
                assert np.array_equal(got[k], p_init[k])
    assert step.rebuilds == 0
    fopt.ema_start = 20
    fparams, fstate, _ = step(fparams, fstate, batches[0])
    assert step.rebuilds == 1
