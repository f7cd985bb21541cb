"""``mithril.interop.torch_optimizer`` for the optimizers beyond the elementwise ones.

Side by side with torch's own optimizer on a small ``torch.nn`` MLP (Linear-ReLU-Linear,
full batch; float64 <= 1e-10 and float32 <= 1e-6 in :func:`rel_err`, max over tensors):

* Adafactor (100 steps, also with weight decay and a StepLR, and float32 with GradScaler
  and ``clip_grad_norm_``);
* Muon (100 steps): torch's default bfloat16 Newton–Schulz on a model of matrices only
  (``fallback=None``), ``ns_dtype="float64"`` against torch's Muon patched to iterate in
  the gradient's dtype (as tests/test_muon_adafactor.py), and the default AdamW fallback
  against torch's Muon for the matrices plus AdamW for the biases, a StepLR driving all;
* LBFGS through ``step(closure)`` with torch's usual closure (10 steps of up to 20
  iterations; float32 strong-Wolfe 5 steps: see test_lbfgs), with and without
  ``line_search_fn="strong_wolfe"``, the returned losses equal too;
* ASGD: torch's state names and values (``eta``/``mu``/``ax``).

State dicts of the optimizers with per-tensor slots and optimizer-wide values (LAMB,
Novograd, ASGD, Prodigy, schedule-free, LBFGS, Adafactor, Muon) resume bit-exactly; and
every optimizer of ``mithril.utils.optimizers.__all__`` is either wrapped (a few steps
change the parameters, a state dict round trip through ``torch.save`` resumes bit-exactly)
or refused with a TypeError naming it (only the abstract ``Optimizer``). Bad input: a
closure that raises, returns no loss or a non-finite one changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.optim._muon as torch_muon
from test_interop_torch_optimizer import data, default_dtype, rel_err
from test_interop_torch_state_dict import assert_same_dict, roundtrip
from torch import nn

from mithril.errors import KeyMismatchError
from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = {torch.float64: 1e-10, torch.float32: 1e-6}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                                 ids=["float64", "float32"])


def mlp(dtype: torch.dtype = torch.float64, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16, bias=bias), nn.ReLU(),
                         nn.Linear(16, 3, bias=bias)).to(dtype)


def err(m1: nn.Module, m2: nn.Module) -> float:
    return max(rel_err(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def closure_for(model: nn.Module, opts) -> Callable[[], torch.Tensor]:
    x, y = data(next(model.parameters()).dtype)

    def closure():
        for o in opts:
            o.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def train(model: nn.Module, opts, steps: int, scheds=(), closure_step: bool = False) -> list:
    """``steps`` full-batch steps of every optimizer in ``opts`` (one closure for all)."""
    closure, losses = closure_for(model, opts), []
    for _ in range(steps):
        if closure_step:
            losses.append(opts[0].step(closure))
        else:
            closure()
            for o in opts:
                o.step()
        for s in scheds:
            s.step()
    return losses


def ns_in_grad_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch 2.13's ``_zeropower_via_newtonschulz`` without its cast to bfloat16."""
    a, b, c = ns_coefficients
    ortho = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, update, ortho, beta=a)
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    return ortho


# ---------------------------------------------------------------------------------------
# parity with torch.optim: Adafactor, Muon, LBFGS, ASGD
# ---------------------------------------------------------------------------------------


#: the fused Adafactor kernel sums its statistics in float64 where torch sums in float32: one
#: step agrees to float32 rounding (~3e-7), which 100 steps of training amplify to ~1e-4
FUSED_F32_TOL = 1e-3


@DTYPES
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("fused", [False, True])
def test_adafactor_matches_torch(dtype, wd, fused):
    with default_dtype(dtype):
        m1 = mlp(dtype)
        m2 = copy.deepcopy(m1)
        o1 = torch_optimizer(mo.Adafactor(0.05, weight_decay=wd, fused=fused),
                             m1.named_parameters())
        o2 = torch.optim.Adafactor(m2.parameters(), lr=0.05, weight_decay=wd)
        s1, s2 = (torch.optim.lr_scheduler.StepLR(o, 30, 0.5) for o in (o1, o2))
        train(m1, [o1], 100, [s1])
        train(m2, [o2], 100, [s2])
    if fused:  # exact to rounding: float64 at 1e-10, float32 (chaotic) at FUSED_F32_TOL
        assert err(m1, m2) <= (TOL[dtype] if dtype == torch.float64 else FUSED_F32_TOL)
        return
    assert err(m1, m2) <= TOL[dtype]
    sd = o1.state_dict()  # torch's state names and shapes, nothing a parameter does not use
    assert {k: tuple(v.shape) for k, v in sd["state"][0].items()} == {
        "step": (), "row_var": (16, 1), "col_var": (1, 5)}
    assert {k: tuple(v.shape) for k, v in sd["state"][1].items()} == {
        "step": (), "variance": (16,)}
    for i, p in enumerate(m2.parameters()):
        for k, v in o2.state[p].items():
            assert torch.equal(sd["state"][i][k].to(v.dtype).reshape(v.shape), v), (i, k)


def test_adafactor_grad_scaler_and_clipping_match_torch():
    runs = []
    for make in (lambda m: torch_optimizer(mo.Adafactor(0.05, fused=False), m.named_parameters()),
                 lambda m: torch.optim.Adafactor(m.parameters(), lr=0.05)):
        model = mlp(torch.float32)
        opt = make(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5)
        x, y = data(torch.float32)
        for t in range(30):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if t == 4:
                model[0].weight.grad[1, 2] = float("inf")  # skipped by the scaler
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        runs.append(model)
    assert err(*runs) <= TOL[torch.float32]


@DTYPES
def test_muon_bfloat16_newton_schulz_matches_torch(dtype):
    """torch.optim.Muon takes matrices only: a model without biases, ``fallback=None``;
    the Newton–Schulz iteration in bfloat16, as torch."""
    with default_dtype(dtype):
        m1 = mlp(dtype, bias=False)
        m2 = copy.deepcopy(m1)
        o1 = torch_optimizer(mo.Muon(0.02, fallback=None), m1.named_parameters())
        o2 = torch.optim.Muon(m2.parameters(), lr=0.02)
        train(m1, [o1], 100)
        train(m2, [o2], 100)
    assert err(m1, m2) <= TOL[dtype]
    assert set(o1.state_dict()["state"][0]) == {"step", "momentum_buffer"}
    assert torch.equal(o1.state[m1[0].weight]["momentum_buffer"],
                       o2.state[m2[0].weight]["momentum_buffer"])


def test_muon_float64_newton_schulz_matches_patched_torch(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns_in_grad_dtype)
    m1 = mlp(bias=False)
    m2 = copy.deepcopy(m1)
    o1 = torch_optimizer(mo.Muon(0.02, ns_dtype="float64", fallback=None, nesterov=False,
                                 adjust_lr_fn="match_rms_adamw"), m1.named_parameters())
    o2 = torch.optim.Muon(m2.parameters(), lr=0.02, nesterov=False,
                          adjust_lr_fn="match_rms_adamw")
    train(m1, [o1], 100)
    train(m2, [o2], 100)
    assert err(m1, m2) <= TOL[torch.float64]


@DTYPES
def test_muon_with_adamw_fallback_matches_torch_muon_plus_adamw(dtype):
    """Our Muon's default fallback (AdamW) for the biases = torch's Muon for the matrices
    plus torch's AdamW for the rest; a StepLR on ours moves both learning rates, as one on
    each of torch's."""
    with default_dtype(dtype):
        m1 = mlp(dtype)
        m2 = copy.deepcopy(m1)
        o1 = torch_optimizer(mo.Muon(0.02, fallback=mo.AdamW(1e-3)), m1.named_parameters())
        mats = [p for p in m2.parameters() if p.ndim == 2]
        rest = [p for p in m2.parameters() if p.ndim != 2]
        o2 = [torch.optim.Muon(mats, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]
        step = [torch.optim.lr_scheduler.StepLR(o, 40, 0.5) for o in (o1, *o2)]
        train(m1, [o1], 100, step[:1])
        train(m2, o2, 100, step[1:])
    assert err(m1, m2) <= TOL[dtype]
    assert o1.param_groups[0]["lr"] == o2[0].param_groups[0]["lr"] == 0.005
    sd = o1.state_dict()["state"]
    assert set(sd[0]) == {"step", "momentum_buffer"}  # l1.weight: a matrix
    assert set(sd[1]) == {"step", "fallback_m", "fallback_v"}  # l1.bias: AdamW's


@DTYPES
@pytest.mark.parametrize("ls", [None, "strong_wolfe"])
def test_lbfgs_step_closure_matches_torch(dtype, ls):
    lr = 1.0 if ls else 0.5
    steps = 5 if ls and dtype == torch.float32 else 10
    tol = TOL[dtype]
    with default_dtype(dtype):
        m1 = mlp(dtype)
        m2 = copy.deepcopy(m1)
        o1 = torch_optimizer(mo.LBFGS(lr, history_size=10, line_search_fn=ls),
                             m1.named_parameters())
        o2 = torch.optim.LBFGS(m2.parameters(), lr=lr, history_size=10, line_search_fn=ls)
        l1 = train(m1, [o1], steps, closure_step=True)
        l2 = train(m2, [o2], steps, closure_step=True)
    assert err(m1, m2) <= tol
    assert [float(v.detach()) for v in l1] == pytest.approx([float(v.detach()) for v in l2],
                                                          rel=tol)
    assert l1[-1].requires_grad  # the closure's own loss tensor, as torch returns it
    st, ref = o1.mithril_state.values, o2.state[m2[0].weight]
    assert (st["n_iter"], st["func_evals"]) == (ref["n_iter"], ref["func_evals"])
    # the parameters keep their own storage and end at the step's result
    assert all(p.untyped_storage().data_ptr() != o1.mithril_state.params_flat.data_ptr()
               for p in m1.parameters())


def test_lbfgs_default_keeps_torchs_operations_only_in_the_drop_in():
    """``fused=None`` runs torch's own operations under ``torch_optimizer`` (a drop-in keeps
    ``torch.optim.LBFGS``'s numbers: equal to the last bit on this ReLU network, where any
    other rounding ends elsewhere) and the fused two-loop recursion in a direct ``update``."""
    with default_dtype(torch.float64):
        m0 = mlp(torch.float64)
        runs = {}
        for label, make in (("default", lambda: mo.LBFGS(0.5, history_size=10)),
                            ("fused", lambda: mo.LBFGS(0.5, history_size=10, fused=True))):
            m = copy.deepcopy(m0)
            train(m, [torch_optimizer(make(), m.named_parameters())], 10, closure_step=True)
            runs[label] = m
        ref = copy.deepcopy(m0)
        train(ref, [torch.optim.LBFGS(ref.parameters(), lr=0.5, history_size=10)], 10,
              closure_step=True)
    assert err(runs["default"], ref) == 0.0
    assert err(runs["fused"], ref) > 0.0  # the fused dots round otherwise
    assert mo.lbfgs.TORCH_OPS.get() is False  # reset after each step


def test_asgd_state_is_torchs():
    """eta, mu (0-d per parameter) and ax, as torch.optim.ASGD's state."""
    with default_dtype(torch.float64):
        m1 = mlp()
        m2 = copy.deepcopy(m1)
        o1 = torch_optimizer(mo.ASGD(0.01, lambd=1e-3, t0=20), m1.named_parameters())
        o2 = torch.optim.ASGD(m2.parameters(), lr=0.01, lambd=1e-3, t0=20)
        train(m1, [o1], 50)
        train(m2, [o2], 50)
    assert err(m1, m2) <= TOL[torch.float64]
    sd = o1.state_dict()["state"]
    for i, p in enumerate(m2.parameters()):
        assert set(sd[i]) == set(o2.state[p]) == {"step", "eta", "mu", "ax"}
        for k in ("eta", "mu", "ax"):
            assert sd[i][k].shape == o2.state[p][k].shape
            assert rel_err(sd[i][k], o2.state[p][k]) <= 1e-12, (i, k)


# ---------------------------------------------------------------------------------------
# state dicts: per-tensor slots, optimizer-wide values, LBFGS history
# ---------------------------------------------------------------------------------------

STATEFUL = {
    "lamb": lambda: mo.LAMB(0.01, weight_decay=0.01),
    "novograd": lambda: mo.Novograd(0.01),
    "asgd": lambda: mo.ASGD(0.01, t0=5),
    "prodigy": lambda: mo.Prodigy(),
    "sf_sgd": lambda: mo.ScheduleFreeSGD(0.1, warmup_steps=4),
    "sf_adamw": lambda: mo.ScheduleFreeAdamW(0.01),
    "adafactor": lambda: mo.Adafactor(0.05),
    "muon": lambda: mo.Muon(0.02),
    "lbfgs": lambda: mo.LBFGS(0.5, max_iter=4, history_size=8),
    "lbfgs_wolfe": lambda: mo.LBFGS(max_iter=4, history_size=8, line_search_fn="strong_wolfe"),
}


def resume(make, first: int, then: int, model_kw=None, load=None):
    """``first + then`` steps in one go vs ``first``, a state dict saved through torch.save
    and loaded into a fresh wrapper over a fresh model, ``then`` more: (uninterrupted
    model and optimizer, resumed ones, the saved state dict)."""
    model_kw = model_kw or {}
    full = mlp(**model_kw)
    o_full = torch_optimizer(make(), full.named_parameters())
    train(full, [o_full], first + then, closure_step=True)
    part = mlp(**model_kw)
    o_part = torch_optimizer(make(), part.named_parameters())
    train(part, [o_part], first, closure_step=True)
    saved = roundtrip({"model": part.state_dict(), "opt": o_part.state_dict()})
    fresh = mlp(seed=5, **model_kw)
    fresh.load_state_dict(saved["model"])
    o_fresh = torch_optimizer(make(), fresh.named_parameters())
    (load or o_fresh.load_state_dict)(saved["opt"])
    assert_same_dict(o_fresh.state_dict(), saved["opt"])  # loaded as saved
    train(fresh, [o_fresh], then, closure_step=True)
    return (full, o_full), (fresh, o_fresh), saved["opt"]


@pytest.mark.parametrize("case", list(STATEFUL))
def test_state_dict_with_tensor_slots_and_values_resumes_bit_exactly(case):
    (full, o_full), (fresh, o_fresh), saved = resume(STATEFUL[case], 6, 6)
    for (n, p), q in zip(full.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{case}: {n} differs after resuming"
    assert_same_dict(o_fresh.state_dict(), o_full.state_dict())
    values = o_full.mithril_state.values
    assert saved["mithril"].get("values", {}).keys() == values.keys()
    # l1.bias (LBFGS: torch.optim.LBFGS's one entry, under the first parameter's id)
    entry = saved["state"][0 if case.startswith("lbfgs") else 1]
    if case == "novograd":
        assert entry["nu"].shape == ()  # one value per tensor, 0-d as torch's ASGD eta/mu
    if case == "asgd":
        assert entry["eta"].shape == entry["mu"].shape == ()
    if case == "prodigy":
        assert {"d", "numerator"} <= values.keys() and values["d"] > 1e-6
    if case == "sf_sgd":  # a lone beta1 keeps its name (torch's "betas" is a tuple)
        assert saved["param_groups"][0]["beta1"] == 0.9
        assert "betas" not in saved["param_groups"][0]
    if case.startswith("lbfgs"):  # only the history in use is saved (flat, as torch's)
        used = int(values["history"])
        assert 0 < used <= 8
        assert set(entry) == {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro",
                              "H_diag", "prev_flat_grad", "prev_loss"}
        assert len(entry["old_dirs"]) == len(entry["old_stps"]) == len(entry["ro"]) == used


def test_unused_entries_given_as_empty_tensors_load_too():
    """Entries a parameter does not use are left out of a state dict; given (empty), as a
    state dict written by an older version has them, they load to the same state."""
    model = mlp()
    opt = torch_optimizer(mo.Muon(0.02), model.named_parameters())
    train(model, [opt], 3)
    sd = opt.state_dict()
    full = copy.deepcopy(sd)
    for entry in full["state"].values():
        for k in ("momentum_buffer", "fallback_m", "fallback_v"):
            entry.setdefault(k, torch.zeros(0, dtype=torch.float64))
    assert set(full["state"][0]) > set(sd["state"][0])
    other = torch_optimizer(mo.Muon(0.02), mlp(seed=3).named_parameters())
    other.load_state_dict(full)
    assert_same_dict(other.state_dict()["state"], sd["state"])


def test_state_dict_without_values_is_refused_nothing_changed():
    model = mlp()
    opt = torch_optimizer(mo.Prodigy(), model.named_parameters())
    train(model, [opt], 3)
    good = opt.state_dict()
    for label, edit, exc, msg in (
            ("no values", lambda d: d["mithril"].pop("values"), KeyMismatchError,
             "'values' must have exactly ['d', 'numerator']"),
            ("bad value", lambda d: d["mithril"]["values"].update(d="x"), TypeError,
             "value 'd' must be a number"),
            ("values not a dict", lambda d: d["mithril"].update(values=[1.0]), TypeError,
             "['values'] must be a dict")):
        bad = copy.deepcopy(good)
        edit(bad)
        with pytest.raises(exc, match=None) as info:
            opt.load_state_dict(bad)
        assert msg in str(info.value), (label, str(info.value))
        assert_same_dict(opt.state_dict(), good)


# ---------------------------------------------------------------------------------------
# bad input: closures
# ---------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def assert_unchanged(model, opt, before):
    params, sd = before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert_same_dict(opt.state_dict(), sd)


@pytest.mark.parametrize("fail_at", [1, 3, 7])
def test_lbfgs_closure_raising_changes_nothing(fail_at):
    """The closure raises at its ``fail_at``-th call of a step (after the parameters were
    moved to other points): they are written back, the state is unchanged, the error
    propagates with a note; then the step succeeds as if nothing happened."""
    model = mlp()
    ref = copy.deepcopy(model)
    opt = torch_optimizer(mo.LBFGS(history_size=5, line_search_fn="strong_wolfe"),
                          model.named_parameters())
    ref_opt = torch_optimizer(mo.LBFGS(history_size=5, line_search_fn="strong_wolfe"),
                              ref.named_parameters())
    train(model, [opt], 2, closure_step=True)
    train(ref, [ref_opt], 2, closure_step=True)
    before = snapshot(model, opt)
    good, calls = closure_for(model, [opt]), [0]

    def bad():
        calls[0] += 1
        if calls[0] == fail_at:
            raise Boom("the data loader broke")
        return good()

    with pytest.raises(Boom, match="the data loader broke") as info:
        opt.step(bad)
    assert calls[0] == fail_at
    assert any("parameters and optimizer state left unchanged" in n
               for n in getattr(info.value, "__notes__", []))
    assert_unchanged(model, opt, before)
    train(model, [opt], 2, closure_step=True)
    train(ref, [ref_opt], 2, closure_step=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_lbfgs_bad_closures_are_named():
    model = mlp()
    opt = torch_optimizer(mo.LBFGS(history_size=5), model.named_parameters())
    train(model, [opt], 1, closure_step=True)
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"LBFGS evaluates the loss several times per step: "
                                        r"call step\(closure\)"):
        opt.step()
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(3)
    with pytest.raises(TypeError, match="LBFGS: the closure must return the loss"):
        opt.step(lambda: None)
    good, calls = closure_for(model, [opt]), [0]

    def nan_later():
        calls[0] += 1
        loss = good()
        return loss * float("nan") if calls[0] == 2 else loss

    with pytest.raises(FloatingPointError, match="loss is nan"):
        opt.step(nan_later)
    assert calls[0] == 2
    assert_unchanged(model, opt, before)


def test_elementwise_closure_raising_changes_nothing():
    model = mlp()
    opt = torch_optimizer(mo.Adam(0.01), model.named_parameters())
    train(model, [opt], 3)
    before = snapshot(model, opt)

    def bad():
        raise Boom("no batch")

    with pytest.raises(Boom, match="no batch"):
        opt.step(bad)
    assert_unchanged(model, opt, before)


# ---------------------------------------------------------------------------------------
# the whole catalog
# ---------------------------------------------------------------------------------------

#: constructor arguments where the defaults would not do (or move too little to see)
ARGS = {"Lookahead": lambda: mo.Lookahead(mo.Adam(0.01), sync_period=2),
        "LBFGS": lambda: mo.LBFGS(max_iter=3, history_size=4),
        "Muon": lambda: mo.Muon(0.02),
        "SAM": lambda: mo.SAM(mo.Adam(0.01), rho=0.05, adaptive=True),
        "Mechanize": lambda: mo.Mechanize(mo.Adam(1.0), s_init=0.01),
        "ScheduleFree": lambda: mo.ScheduleFree(mo.Adam(0.01, beta1=0.0))}
CATALOG = [n for n in mo.__all__
           if isinstance(getattr(mo, n), type) and issubclass(getattr(mo, n), mo.Optimizer)]


def test_catalog_is_complete():
    assert {"Adafactor", "Muon", "LBFGS", "LAMB", "Novograd", "ASGD", "Prodigy",
            "ScheduleFreeSGD", "ScheduleFreeAdamW", "Lookahead", "Optimizer"} <= set(CATALOG)


@pytest.fixture
def flat_tensor_engine(monkeypatch):
    """The engines' flat-tensor path (torch on GPU, float16/bfloat16), forced on CPU: what
    the wrapper runs on other devices, and no numba kernel to compile per optimizer."""
    from mithril.utils.optimizers import engines
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    monkeypatch.setattr(engines, "engine_for", lambda backend, layout, *_: ArrayEngine(backend, layout))


@pytest.mark.parametrize("name", CATALOG)
def test_every_optimizer_is_wrapped_or_refused_by_name(name, flat_tensor_engine):
    """On the flat-tensor engine (the fused CPU kernels of the optimizers torch has are
    checked in tests/test_interop_torch_optimizer.py, those with tensor slots and values
    above)."""
    cls = getattr(mo, name)
    if cls is mo.Optimizer:  # the abstract base: no update rule
        with pytest.raises(TypeError, match="Optimizer states no update rule"):
            torch_optimizer(mo.Optimizer(), mlp().parameters())
        return
    if getattr(cls, "takes_per_example_gradients", False):  # (tests/test_dpsgd.py)
        with pytest.raises(TypeError, match=f"{name} takes per-example gradients"):
            torch_optimizer(cls(mo.SGD()) if name == "DifferentiallyPrivate" else cls(),
                            mlp().parameters())
        return
    make = ARGS.get(name, cls)
    start = [p.detach().clone() for p in mlp().parameters()]
    (full, _), (fresh, _), _ = resume(make, 3, 3)
    assert all(not torch.equal(p, q) for p, q in zip(full.parameters(), start)), name
    for (n, p), q in zip(full.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{name}: {n} differs after resuming"


def test_a_lookaheads_group_holds_its_inner_optimizers_hyperparameters():
    """A Lookahead's torch param group holds its inner Adam's hyperparameters under torch's
    names (``betas``, ``eps``, ``weight_decay``) beside its own: ``OneCycleLR`` with
    ``cycle_momentum`` drives the learning rate and β₁, 30 steps in float64 against
    ``torch.optim.Adam`` under the same scheduler with Lookahead's few lines written by hand
    (<= 1e-10); ``slow_step_size`` set in the group mid-run reaches it; the state dict keeps
    the group's values."""
    from torch.optim.lr_scheduler import OneCycleLR

    ours_m, ref_m = mlp(), mlp()
    opt = torch_optimizer(mo.Lookahead(mo.Adam(0.01, weight_decay=0.01), sync_period=3),
                          ours_m.named_parameters())
    assert {"betas", "eps", "weight_decay", "slow_step_size", "sync_period"} <= set(
        opt.param_groups[0])
    ref = torch.optim.Adam(ref_m.parameters(), lr=0.01, weight_decay=0.01)
    slow = [p.detach().clone() for p in ref_m.parameters()]
    scheds = [OneCycleLR(o, max_lr=0.05, total_steps=30, cycle_momentum=True)
              for o in (opt, ref)]
    x, y = data(torch.float64)
    alpha, betas = 0.5, set()
    for t in range(1, 31):
        if t == 16:
            opt.param_groups[0]["slow_step_size"] = alpha = 0.8
        for m, o in ((ours_m, opt), (ref_m, ref)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
        if t % 3 == 0:  # Lookahead: slow ← slow + α·(fast − slow), fast ← slow
            with torch.no_grad():
                for s, p in zip(slow, ref_m.parameters()):
                    s.add_(alpha * (p - s))
                    p.copy_(s)
        betas.add(opt._mithril.inner.beta1)
        for s in scheds:
            s.step()
    assert err(ours_m, ref_m) <= 1e-10 and len(betas) > 20  # (β₁ did cycle)
    assert opt._mithril.slow_step_size == 0.8
    hp = opt.state_dict()["mithril"]["hyperparameters"]
    assert hp["slow_step_size"] == 0.8
    assert hp["inner"]["hyperparameters"]["beta1"] == opt.param_groups[0]["betas"][0]
    assert hp["inner"]["hyperparameters"]["learning_rate"] == opt.param_groups[0]["lr"]
    opt.param_groups[0]["betas"] = (0.9, 1.5)  # refused at the next step, naming it
    before = [p.detach().clone() for p in ours_m.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\].*beta2"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours_m.parameters(), before))
