"""Weight averaging in the optimizer's fused pass (issue #15, point 4): ``ema_decay=`` against
torch's ``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay))`` and ``swa_start=`` with
:class:`SWALR` against ``AveragedModel`` + ``SWALR``, both updated after optimizer steps, in
float64 on every engine (relative error ≤ 1e-10, measure: ``rel_err`` of
``optimizer_parity``); ``ema_every``; parameters without a gradient; ``swap_ema`` (a bitwise
round trip); state dicts and checkpoints resuming bit for bit; bad input; and that neither
the decay nor the learning rate compiles anything anew.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
import torch
from optimizer_parity import ALL, host, init, natives, on, rel_err
from torch.optim.swa_utils import SWALR as TorchSWALR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import mithril.utils.optimizers as mo
import mithril.utils.optimizers.engines as engines
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import SWALR, CosineAnnealingLR
from mithril.utils.optimizers.averaging import NoAverageError
from mithril.utils.optimizers.engines import jax_engine
from mithril.utils.optimizers.engines.kernels import update_kernel

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "big": (40, 30)}
STEPS = 50
TOL = 1e-10
#: every engine: those of ``optimizer_parity.ALL``, and the tensor-op engine on NumPy and torch
ENGINES = (*ALL, "array-numpy", "array-torch")
#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}

CASES = {
    "adam": (mo.Adam, {"learning_rate": 1e-2}, torch.optim.Adam, {"lr": 1e-2}),
    "sgd_momentum": (mo.SGD, {"learning_rate": 0.05, "momentum": 0.9},
                     torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
}


def problem(seed: int = 0, steps: int = STEPS):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s)) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 5)) for k, s in SHAPES.items()}
             for t in range(steps)]
    return p0, grads


@contextlib.contextmanager
def engine(backend: str):
    """``backend`` of ``optimizer_parity.ALL``, or ``array-<backend>``: the tensor-op ArrayEngine."""
    if not backend.startswith("array-"):
        with on(backend, "float64"):
            yield backend
        return
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    old = engines.engine_for
    engines.engine_for = lambda b, layout, *_: ArrayEngine(b, layout)
    try:
        yield backend.removeprefix("array-")
    finally:
        engines.engine_for = old


def record(what: str, err: float) -> None:
    OBSERVED[what] = max(OBSERVED.get(what, 0.0), err)
    assert err <= TOL, f"{what}: {err}"


class Net(torch.nn.Module):
    def __init__(self, p0: dict) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(v)) for v in p0.values()])


@contextlib.contextmanager
def torch_float64():
    """torch's default dtype float64 (``AveragedModel``'s SWA weight ``1/(n+1)`` is a tensor
    of the default dtype: in float32 it alone would be off by 1e-8)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def torch_run(case: str, p0: dict, grads: list, *, ema: float | None = None, every: int = 1,
              swa_start: int | None = None, missing: dict | None = None,
              schedule: Any = None) -> tuple[dict, dict, list]:
    """torch's parameters, average and learning rates after each step: the average updated
    after every ``every``-th step (from ``swa_start`` on for SWA); ``missing``: step -> the
    names without a gradient (None) then; ``schedule(opt)``: (before, after, swa_start) the
    schedulers to step before / from ``swa_start`` on."""
    _, _, tcls, tkw = CASES[case]
    with torch_float64():
        net = Net(p0)
        opt = tcls(net.ps.parameters(), **tkw)
        avg = (AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema)) if ema is not None
               else AveragedModel(net))
        before, after = schedule(opt) if schedule else (None, None)
        lrs = []
        for t, g in enumerate(grads, 1):
            for p, (k, v) in zip(net.ps, g.items()):
                p.grad = None if k in (missing or {}).get(t, ()) else torch.tensor(v)
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
            if t % every == 0 and t >= (swa_start or 1):
                avg.update_parameters(net)
            if after is not None and t >= swa_start:
                after.step()
            elif before is not None:
                before.step()
        names = list(p0)
        return ({k: p.detach().numpy().copy() for k, p in zip(names, net.ps)},
                {k: p.detach().numpy().copy() for k, p in zip(names, avg.module.ps)}, lrs)


def ours_run(opt: mo.Optimizer, backend: str, p0: dict, grads: list, *,
             missing: dict | None = None, scheduler: Any = None) -> tuple[dict, dict, list]:
    with engine(backend) as b:
        params = natives(b, p0)
        state = opt.init(params) if backend.startswith("array-") else init(opt, b, params)
        if backend.startswith("array-"):
            assert type(state.engine).__name__ == "ArrayEngine"
        lrs = []
        for t, g in enumerate(grads, 1):
            gg = {k: v for k, v in natives(b, g).items() if k not in (missing or {}).get(t, ())}
            params, state = opt.update(params, gg, state)
            lrs.append(opt.get_learning_rate())
            if scheduler is not None:
                scheduler(t)
        average = opt.ema_params(state) if opt.ema_decay is not None else opt.swa_params(state)
        return ({k: host(v) for k, v in params.items()},
                {k: host(v) for k, v in average.items()}, lrs)


# ---------------------------------------------------------------------------------------------
# EMA against torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_ema_equals_torch_averaged_model(case):
    """50 steps, decay 0.9, on every engine: the EMA (and the parameters) as torch's."""
    p0, grads = problem()
    want_p, want_ema, _ = torch_run(case, p0, grads, ema=0.9)
    cls, kw, _, _ = CASES[case]
    for backend in ENGINES:
        got_p, got_ema, _ = ours_run(cls(**kw, ema_decay=0.9), backend, p0, grads)
        for k in SHAPES:
            record(f"ema {case} params", rel_err(got_p[k], want_p[k]))
            record(f"ema {case} average", rel_err(got_ema[k], want_ema[k]))


def test_ema_every_and_parameters_without_gradient():
    """``ema_every=3``: the average moves after steps 3, 6, ... (its first update copies),
    and it moves for parameters that have no gradient that step too (torch's
    AveragedModel averages every parameter); b misses the first averaging step."""
    p0, grads = problem(seed=1, steps=30)
    missing = {1: ("s",), 3: ("b",), 4: ("b", "w"), 9: ("big",), 20: ("s", "b")}
    want_p, want_ema, _ = torch_run("sgd_momentum", p0, grads, ema=0.8, every=3, missing=missing)
    cls, kw, _, _ = CASES["sgd_momentum"]
    for backend in ENGINES:
        got_p, got_ema, _ = ours_run(cls(**kw, ema_decay=0.8, ema_every=3), backend, p0, grads,
                                     missing=missing)
        for k in SHAPES:
            record("ema_every params", rel_err(got_p[k], want_p[k]))
            record("ema_every average", rel_err(got_ema[k], want_ema[k]))


def test_average_before_its_first_update_is_the_initial_params():
    p0, grads = problem(steps=2)
    opt = mo.Adam(ema_decay=0.99, ema_every=5, swa_start=3)
    params = natives("numpy", p0)
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(params, g, state)
    for avg in (opt.ema_params(state), opt.swa_params(state)):
        for k in SHAPES:
            assert np.array_equal(avg[k], p0[k])


def test_ema_with_param_groups():
    """Groups with their own lr and decay (one table row each) and a global EMA: torch's
    param_groups + AveragedModel; then a per-group ema_decay against an EMA of torch's
    parameters computed by hand."""
    p0, grads = problem(seed=2, steps=30)
    groups = [{"params": ["w", "big"], "learning_rate": 0.02, "weight_decay": 0.1}]
    with torch_float64():
        net = Net(p0)
        ps = dict(zip(SHAPES, net.ps))
        topt = torch.optim.SGD([{"params": [ps["w"], ps["big"]], "lr": 0.02, "weight_decay": 0.1},
                                {"params": [ps["b"], ps["s"]]}], lr=0.05, momentum=0.9)
        avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        hand = {k: v.copy() for k, v in p0.items()}  # per-group decay: 0.5 for w and big
        for t, g in enumerate(grads, 1):
            for k, p in ps.items():
                p.grad = torch.tensor(g[k])
            topt.step()
            avg.update_parameters(net)
            for k, p in ps.items():
                d = 0.5 if k in ("w", "big") else 0.9
                x = p.detach().numpy()
                hand[k] = x.copy() if t == 1 else hand[k] + (1 - d) * (x - hand[k])
        want = {k: p.detach().numpy() for k, p in zip(SHAPES, avg.module.ps)}
    for backend in ("numpy", "jax-jit", "array-torch"):
        opt = mo.SGD(0.05, momentum=0.9, ema_decay=0.9, param_groups=groups)
        _, got, _ = ours_run(opt, backend, p0, grads)
        per = mo.SGD(0.05, momentum=0.9, ema_decay=0.9,
                     param_groups=[{**groups[0], "ema_decay": 0.5}])
        _, got_per, _ = ours_run(per, backend, p0, grads)
        for k in SHAPES:
            record("ema groups", rel_err(got[k], want[k]))
            record("ema per-group decay", rel_err(got_per[k], hand[k]))


# ---------------------------------------------------------------------------------------------
# SWA and SWALR against torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_swa_with_swalr_equals_torch(strategy):
    """torch's recipe: a cosine schedule until ``swa_start``, then SWALR, the SWA average
    updated after every step from ``swa_start`` on."""
    p0, grads = problem(seed=4, steps=40)
    start = 15

    def torch_schedule(opt):
        return (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30),
                TorchSWALR(opt, swa_lr=0.02, anneal_epochs=6, anneal_strategy=strategy))

    want_p, want_swa, want_lrs = torch_run("sgd_momentum", p0, grads, swa_start=start,
                                           schedule=torch_schedule)
    cls, kw, _, _ = CASES["sgd_momentum"]
    for backend in ENGINES:
        opt = cls(**kw, swa_start=start)
        cosine = CosineAnnealingLR(opt, T_max=30)
        swalr = SWALR(opt, swa_lr=0.02, anneal_epochs=6, anneal_strategy=strategy)

        def schedule(t, cosine=cosine, swalr=swalr):
            (swalr if t >= start else cosine).step()

        got_p, got_swa, lrs = ours_run(opt, backend, p0, grads, scheduler=schedule)
        record("swa lrs", max(abs(a - b) / b for a, b in zip(lrs, want_lrs)))
        for k in SHAPES:
            record("swa params", rel_err(got_p[k], want_p[k]))
            record("swa average", rel_err(got_swa[k], want_swa[k]))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize(("strategy", "epochs"), [("cos", 5), ("linear", 3), ("cos", 0),
                                                  ("linear", 1)])
def test_swalr_equals_torch_and_round_trips(strategy, epochs):
    """SWALR alone and after another scheduler moved the rate: torch's values bit for bit;
    its state dict (through JSON) resumes the same sequence."""
    from mithril.utils.lr_schedulers import StepLR

    for lead in (0, 4):
        tp = torch.nn.Parameter(torch.zeros(1))
        topt = torch.optim.SGD([tp], lr=0.3)
        tsteplr = torch.optim.lr_scheduler.StepLR(topt, step_size=2, gamma=0.5)
        tswa = TorchSWALR(topt, swa_lr=0.05, anneal_epochs=epochs, anneal_strategy=strategy)
        opt = mo.SGD(0.3)
        steplr = StepLR(opt, step_size=2, gamma=0.5)
        swa = SWALR(opt, swa_lr=0.05, anneal_epochs=epochs, anneal_strategy=strategy)
        assert opt.get_learning_rate() == topt.param_groups[0]["lr"]
        for _ in range(lead):
            tsteplr.step()
            steplr.step()
        want = []
        for _ in range(12):
            tswa.step()
            want.append(topt.param_groups[0]["lr"])
        got, saved = [], None
        for i in range(12):
            swa.step()
            got.append(opt.get_learning_rate())
            if i == 5:
                saved = json.loads(json.dumps(swa.state_dict(), allow_nan=False))
        assert got == want, (strategy, epochs, lead)
        opt2 = mo.SGD(0.9)
        again = SWALR(opt2, swa_lr=1.0, anneal_epochs=2)
        again.load_state_dict(saved)
        assert opt2.get_learning_rate() == got[5]
        for i in range(6, 12):
            again.step()
            assert opt2.get_learning_rate() == got[i]
        if lead == 0:  # the closed form: the same values, to rounding
            for t in range(1, 12):
                assert abs(swa.get_lr_at(t) - got[t - 1]) <= 1e-15


def test_swalr_bad_input():
    opt = mo.SGD(0.1)
    for kw, err in [({"swa_lr": -1.0}, ValueError), ({"swa_lr": float("nan")}, ValueError),
                    ({"swa_lr": 0.1, "anneal_epochs": -1}, ValueError),
                    ({"swa_lr": 0.1, "anneal_epochs": 1.5}, ValueError),
                    ({"swa_lr": 0.1, "anneal_strategy": "exp"}, ValueError)]:
        with pytest.raises(err):
            SWALR(opt, **kw)
        assert opt.get_learning_rate() == 0.1
    swa = SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    before = swa.state_dict()
    with pytest.raises(ValueError, match="anneal_strategy"):
        swa.load_state_dict({**before, "anneal_strategy": "exp"})
    assert swa.state_dict() == before


# ---------------------------------------------------------------------------------------------
# swap_ema, state dicts, checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ENGINES)
def test_swap_ema_round_trip(backend):
    """swap_ema gives the average to evaluate with; update and saving refuse meanwhile; the
    second call gives the training parameters back bit for bit, and training then goes on
    exactly as without the swap."""
    p0, grads = problem(seed=5, steps=12)
    runs = {}
    for swap in (False, True):
        opt = mo.Adam(1e-2, ema_decay=0.7)
        with engine(backend) as b:
            params = natives(b, p0)
            state = opt.init(params)
            for t, g in enumerate(grads, 1):
                params, state = opt.update(params, natives(b, g), state)
                if swap and t == 6:
                    train = {k: host(v) for k, v in params.items()}
                    ema = {k: host(v) for k, v in opt.ema_params(state).items()}
                    evaluated = opt.swap_ema(params, state)
                    assert all(np.array_equal(host(evaluated[k]), ema[k]) for k in SHAPES)
                    with pytest.raises(ValueError, match="swapped"):
                        opt.update(evaluated, natives(b, g), state)
                    with pytest.raises(ValueError, match="swapped"):
                        opt.ema_params(state)
                    with pytest.raises(ValueError, match="swapped"):
                        opt.state_dict(state)
                    params = opt.swap_ema(evaluated, state)
                    assert all(np.array_equal(host(params[k]), train[k]) for k in SHAPES)
                    assert all(np.array_equal(host(v), ema[k])
                               for k, v in opt.ema_params(state).items())
                    if not b.startswith("jax"):  # the arrays update returned: swapped in place
                        assert all(params[k] is evaluated[k] for k in SHAPES)
            runs[swap] = ({k: host(v) for k, v in params.items()},
                          {k: host(v) for k, v in opt.ema_params(state).items()})
    for k in SHAPES:
        assert np.array_equal(runs[False][0][k], runs[True][0][k])
        assert np.array_equal(runs[False][1][k], runs[True][1][k])


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax-jit"])
def test_state_dict_and_checkpoint_resume_bit_exact(backend, tmp_path):
    """20 steps, save (state dict / checkpoint), 10 more; a fresh optimizer loaded from the
    save and run the same 10 steps ends bit for bit where the uninterrupted run did, EMA
    and SWA included (the averaging count comes from the step count)."""
    p0, grads = problem(seed=6, steps=30)

    def make():
        return mo.Adam(1e-2, ema_decay=0.95, ema_every=2, swa_start=17)

    with engine(backend) as b:
        opt = make()
        params = natives(b, p0)
        state = init(opt, b, params)
        for g in grads[:20]:
            params, state = opt.update(params, natives(b, g), state)
        sd = opt.state_dict(state)
        assert set(sd["slots"]) == {"m", "v", "ema", "swa"}
        save_checkpoint(tmp_path / "c.safetensors", params, opt, state)
        saved = {k: host(v) for k, v in params.items()}
        for g in grads[20:]:
            params, state = opt.update(params, natives(b, g), state)
        want = ({k: host(v) for k, v in params.items()},
                {k: host(v) for k, v in opt.ema_params(state).items()},
                {k: host(v) for k, v in opt.swa_params(state).items()})
        for how in ("state_dict", "checkpoint"):
            opt2 = mo.Adam(0.5)  # hyperparameters, EMA and SWA included, come from the save
            if how == "state_dict":
                params2 = natives(b, saved)
                state2 = opt2.load_state_dict(sd, params2)
            else:
                ck = load_checkpoint(tmp_path / "c.safetensors", params_template=natives(b, p0),
                                     optimizer=opt2)
                params2, state2 = ck["params"], ck["state"]
            assert (opt2.ema_decay, opt2.ema_every, opt2.swa_start) == (0.95, 2, 17)
            for g in grads[20:]:
                params2, state2 = opt2.update(params2, natives(b, g), state2)
            got = ({k: host(v) for k, v in params2.items()},
                   {k: host(v) for k, v in opt2.ema_params(state2).items()},
                   {k: host(v) for k, v in opt2.swa_params(state2).items()})
            for w, g_ in zip(want, got):
                for k in SHAPES:
                    assert np.array_equal(w[k], g_[k]), (how, k)


def test_skipped_step_leaves_the_average_alone():
    p0, grads = problem(seed=7, steps=6)
    runs = []
    for bad in (False, True):
        opt = mo.SGD(0.05, momentum=0.9, ema_decay=0.5, nonfinite="skip")
        params = natives("numpy", p0)
        state = opt.init(params)
        for t, g in enumerate(grads, 1):
            if bad and t == 3:
                with pytest.warns(RuntimeWarning, match="skipped"):
                    params, state = opt.update(params, {**g, "w": np.full((3, 4), np.nan)}, state)
            params, state = opt.update(params, g, state)
        runs.append({k: v.copy() for k, v in opt.ema_params(state).items()})
    for k in SHAPES:
        assert np.array_equal(runs[0][k], runs[1][k])


# ---------------------------------------------------------------------------------------------
# bad input, compilation
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_named_and_changes_nothing():
    for value, err in [(-0.1, ValueError), (1.5, ValueError),
                       (float("nan"), ValueError), (float("inf"), ValueError),
                       ("0.9", TypeError), (True, TypeError)]:
        with pytest.raises(err, match="ema_decay"):
            mo.Adam(ema_decay=value)
    for value, err in [(0, ValueError), (-3, ValueError), (2**70, ValueError),
                       (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="ema_every"):
            mo.SGD(ema_decay=0.9, ema_every=value)
    for value, err in [(0, ValueError), (2.0, TypeError)]:
        with pytest.raises(err, match="swa_start"):
            mo.SGD(swa_start=value)
    p0, grads = problem(steps=1)
    opt = mo.Adam()
    params = natives("numpy", p0)
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    before = {k: v.copy() for k, v in params.items()}
    for call in (lambda: opt.ema_params(state), lambda: opt.swa_params(state),
                 lambda: opt.swap_ema(params, state)):
        with pytest.raises(NoAverageError, match="keeps no") as info:
            call()
        assert isinstance(info.value, KeyError)
    assert all(np.array_equal(params[k], before[k]) for k in SHAPES) and state.step == 1
    # a state kept without an EMA, given to an optimizer with one: named, nothing changes
    with pytest.raises(ValueError, match="slots"):
        mo.Adam(ema_decay=0.9).update(params, grads[0], state)
    assert state.step == 1 and set(state.slots) == {"m", "v"}
    # a group turning the EMA off (or on) would change the slots: refused
    with pytest.raises(ValueError, match="slots"):
        mo.Adam(ema_decay=0.9, param_groups=[{"params": "b", "ema_decay": None}])
    # a state dict with a bad ema_decay: refused, the optimizer as it was
    ema = mo.Adam(ema_decay=0.9)
    sd = ema.state_dict()
    sd["hyperparameters"]["ema_decay"] = 1.5
    with pytest.raises(ValueError, match="ema_decay"):
        ema.load_state_dict(sd)
    assert ema.ema_decay == 0.9
    with pytest.raises(ValueError, match="'ema' or 'swa'"):
        ema.swap_ema(params, ema.init(params), average="avg")


def test_no_recompilation_when_decay_or_lr_change():
    """The composed math is one function per base math; decay, cadence and lr are
    arguments of the kernel (numba) and of the jitted step (JAX)."""
    p0, grads = problem(steps=8)
    plain = mo.Adam()
    assert plain.full_kernel_math(7) is plain.kernel_math()  # no averaging: the very kernel
    for backend in ("numpy", "jax-jit"):
        opt = mo.Adam(1e-2, ema_decay=0.9)
        with engine(backend) as b:
            params = natives(b, p0)
            state = init(opt, b, params)
            params, state = opt.update(params, natives(b, grads[0]), state)
            misses, compiled = update_kernel.cache_info().misses, len(jax_engine._COMPILED)
            for i, g in enumerate(grads[1:]):
                opt.ema_decay = 0.5 + 0.05 * i
                opt.set_learning_rate(1e-3 * (i + 1))
                params, state = opt.update(params, natives(b, g), state)
            assert update_kernel.cache_info().misses == misses
            assert len(jax_engine._COMPILED) == compiled
    a, b_ = mo.Adam(ema_decay=0.9), mo.Adam(ema_decay=0.5, ema_every=3)
    assert a.full_kernel_math(8) is b_.full_kernel_math(8)


def test_torch_optimizer_wrapper_keeps_the_ema():
    """Through ``interop.torch_optimizer``: a hyperparameter changed in ``param_groups``
    keeps the state (the EMA slot included), and the EMA is torch's."""
    from mithril.interop.torch_optim import torch_optimizer

    torch.manual_seed(0)
    with torch_float64():
        net = torch.nn.Linear(3, 2)
        ref = torch.nn.Linear(3, 2)
        ref.load_state_dict(net.state_dict())
        opt = torch_optimizer(mo.Adam(1e-2, ema_decay=0.8), net.named_parameters())
        topt = torch.optim.Adam(ref.parameters(), lr=1e-2)
        avg = AveragedModel(ref, multi_avg_fn=get_ema_multi_avg_fn(0.8))
        for t in range(6):
            x = torch.randn(4, 3)
            for model, o in ((net, opt), (ref, topt)):
                model(x).square().sum().backward()
                o.step()
                o.zero_grad()
                if t == 2:
                    o.param_groups[0]["betas"] = (0.8, 0.99)
            avg.update_parameters(ref)
        ema = opt.mithril_optimizer.ema_params(opt.mithril_state)
        assert "ema" in opt.state_dict()["state"][0]
        for name, p in avg.module.named_parameters():
            record("ema torch_optimizer", rel_err(ema[name], p.detach().numpy()))
