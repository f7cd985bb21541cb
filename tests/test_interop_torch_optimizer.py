"""``mithril.interop.torch_optimizer``: mithril optimizers as ``torch.optim`` optimizers.

A small ``torch.nn`` model (Linear-ReLU-Linear, a 0-d scale and a 1-d shift) trained 100
steps through the wrapper equals the same model trained with torch's own optimizer, for every
optimizer torch also has (float32: <= 1e-6, float64: <= 1e-10 in :func:`rel_err`); with a
learning-rate scheduler (StepLR, CosineAnnealingLR, LambdaLR, OneCycleLR, also with momentum
cycling) driving both; with ``torch.amp.GradScaler`` on CPU (including steps it skips for inf
gradients) and ``clip_grad_norm_``; parameters without a gradient on some steps; and the
parameters updated in place in one buffer (no copy per step). State dicts:
tests/test_interop_torch_state_dict.py; Adafactor, Muon, LBFGS, the two-pass optimizers and
the whole catalog: tests/test_interop_torch_more.py (both use the helpers here).

The float64 torch reference runs with ``torch.set_default_dtype(torch.float64)``: NAdam's
``mu_product`` and ASGD's ``eta``/``mu`` are tensors of torch's default dtype (rounded to
float32 otherwise, while mithril keeps them in float64).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

from mithril.interop import TorchOptimizer, torch_optimizer
from mithril.interop import torch_optim as interop_module
from mithril.utils import optimizers as mo

STEPS = 100
TOL64 = 1e-10  # rel_err, per element
TOL32 = 1e-5  # normwise over the whole model (see test_parity)
#: bit-identical to torch in float32 too (no rounding differs in their kernels)
EXACT32 = {"adamax", "rprop"}

# name -> (mithril class, its kwargs, torch.optim class name, torch kwargs)
CASES: dict[str, tuple[type, dict, str, dict]] = {
    "sgd": (mo.SGD, {"learning_rate": 0.05}, "SGD", {"lr": 0.05}),
    "sgd_wd": (mo.SGD, {"learning_rate": 0.05, "weight_decay": 0.1}, "SGD",
               {"lr": 0.05, "weight_decay": 0.1}),
    "sgd_momentum": (mo.SGD, {"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.1}, "SGD",
                     {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),
    "sgd_nesterov": (mo.SGD, {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True,
                              "weight_decay": 0.01}, "SGD",
                     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "adam": (mo.Adam, {"learning_rate": 0.01}, "Adam", {"lr": 0.01}),
    "adam_wd": (mo.Adam, {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6,
                          "weight_decay": 0.1}, "Adam",
                {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    "adamw": (mo.AdamW, {"learning_rate": 0.01, "weight_decay": 0.1}, "AdamW",
              {"lr": 0.01, "weight_decay": 0.1}),
    "amsgrad": (mo.Adam, {"learning_rate": 0.01, "amsgrad": True}, "Adam",
                {"lr": 0.01, "amsgrad": True}),
    # lr 1e-3: at 1e-2 RMSprop's first steps are ~10·lr·sign(g) and the float32 run is
    # chaotic (an ulp of difference grows to 1e-2; float64 still agrees to 1e-12)
    "rmsprop": (mo.RMSProp, {"learning_rate": 0.001, "decay": 0.99}, "RMSprop",
                {"lr": 0.001, "alpha": 0.99}),
    "rmsprop_centered_momentum": (
        mo.RMSProp, {"learning_rate": 0.001, "decay": 0.9, "epsilon": 1e-6, "momentum": 0.9,
                     "centered": True, "weight_decay": 0.01}, "RMSprop",
        {"lr": 0.001, "alpha": 0.9, "eps": 1e-6, "momentum": 0.9, "centered": True,
         "weight_decay": 0.01}),
    "adagrad": (mo.AdaGrad, {"learning_rate": 0.1, "epsilon": 1e-10, "lr_decay": 0.01}, "Adagrad",
                {"lr": 0.1, "eps": 1e-10, "lr_decay": 0.01}),
    "adadelta": (mo.Adadelta, {"learning_rate": 1.0, "rho": 0.9}, "Adadelta",
                 {"lr": 1.0, "rho": 0.9}),
    "adamax": (mo.Adamax, {"learning_rate": 0.01}, "Adamax", {"lr": 0.01}),
    "nadam": (mo.NAdam, {"learning_rate": 0.01}, "NAdam", {"lr": 0.01}),
    "radam": (mo.RAdam, {"learning_rate": 0.01}, "RAdam", {"lr": 0.01}),
    "rprop": (mo.Rprop, {"learning_rate": 0.01}, "Rprop", {"lr": 0.01}),
    "asgd": (mo.ASGD, {"learning_rate": 0.01, "lambd": 1e-3, "t0": 40}, "ASGD",
             {"lr": 0.01, "lambd": 1e-3, "t0": 40}),
}

#: the largest parity errors, by case and dtype (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


class Net(nn.Module):
    """Linear-ReLU-Linear with a 0-d scale and a 1-d shift; ``extra`` (a 1-d parameter) is
    used only where ``use_extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 16)
        self.l2 = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.tensor(1.2))
        self.shift = nn.Parameter(torch.zeros(3))
        self.extra = nn.Parameter(torch.full((3,), 0.1))

    def forward(self, x: torch.Tensor, use_extra: bool = False) -> torch.Tensor:
        out = self.scale * self.l2(torch.relu(self.l1(x))) + self.shift
        return out * self.extra if use_extra else out


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(dtype)


def data(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :3] * 2) + 0.1 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max(|a|, |b|, 1e-3·M)`` with ``M`` the largest magnitude in either
    (elementwise relative down to 0.1% of the tensor's scale; tests/optimizer_parity.py)."""
    a = a.detach().double().numpy()
    b = b.detach().double().numpy()
    scale = np.maximum(np.abs(a), np.abs(b))
    scale = np.maximum(scale, max(1e-3 * float(np.max(scale, initial=0.0)), 1e-300))
    return float(np.max(np.abs(a - b) / scale, initial=0.0))


def model_err(m1: nn.Module, m2: nn.Module) -> float:
    return max(rel_err(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def ours_for(case: str, model: nn.Module) -> TorchOptimizer:
    cls, kw, _, _ = CASES[case]
    return torch_optimizer(cls(**kw), model.named_parameters())


def torch_for(case: str, model: nn.Module) -> torch.optim.Optimizer:
    _, _, name, kw = CASES[case]
    return getattr(torch.optim, name)(model.parameters(), **kw)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, start: int = 0,
          sched=None, clip: float | None = None, extra_every: int = 0) -> None:
    """``steps`` full-batch steps; with ``extra_every``, ``model.extra`` gets a gradient only
    on steps that are multiples of it (otherwise ``.grad`` is None)."""
    x, y = data(next(model.parameters()).dtype)
    for t in range(start, start + steps):
        opt.zero_grad()
        use = bool(extra_every) and t % extra_every == 0
        loss = torch.nn.functional.mse_loss(model(x, use), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()


def side_by_side(case: str, dtype: torch.dtype, steps: int = STEPS, sched=None, **kw
                 ) -> tuple[float, nn.Module, TorchOptimizer]:
    """Train two copies of one model with ours and torch's optimizer; the max rel error."""
    with default_dtype(dtype):
        m1 = make_model(dtype)
        m2 = copy.deepcopy(m1)
        o1, o2 = ours_for(case, m1), torch_for(case, m2)
        s1, s2 = (sched(o1), sched(o2)) if sched else (None, None)
        train(m1, o1, steps, sched=s1, **kw)
        train(m2, o2, steps, sched=s2, **kw)
        return model_err(m1, m2), m1, o1


# ---------------------------------------------------------------------------------------
# parity with torch.optim
# ---------------------------------------------------------------------------------------


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def normwise_err(m1: nn.Module, m2: nn.Module) -> float:
    a, b = flat(m1), flat(m2)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case):
    """100 steps through the wrapper vs torch.optim. float64: <= 1e-10 per element
    (:func:`rel_err`). float32: the kernels round differently from torch's in places (torch's
    ``add_(alpha=)`` is a fused multiply-add, mithril's a multiply then a subtract; NAdam's
    and ASGD's scalars are float64 here, float32 in torch), so the runs differ by an ulp
    from the first step, and training feeds that back through the gradients: observed up
    to ~3e-6 in the whole model's norm (over seeds), up to ~7e-5 per element (elements
    near 0) - hence 1e-5 normwise; Adamax and Rprop stay bit-identical."""
    err, model, opt = side_by_side(case, torch.float64)
    OBSERVED[f"{case}/float64 rel_err"] = err
    assert err <= TOL64, f"{case}/float64: rel err {err:.3g}"
    assert opt.mithril_state.step == STEPS
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with default_dtype(torch.float32):
        m1 = make_model(torch.float32)
        m2 = copy.deepcopy(m1)
        o1, o2 = ours_for(case, m1), torch_for(case, m2)
        train(m1, o1, STEPS)
        train(m2, o2, STEPS)
    err = normwise_err(m1, m2)
    OBSERVED[f"{case}/float32 normwise"] = err
    OBSERVED[f"{case}/float32 rel_err"] = model_err(m1, m2)
    assert err <= (0.0 if case in EXACT32 else TOL32), f"{case}/float32: normwise err {err:.3g}"
    assert all(p.dtype == torch.float32 for p in m1.parameters())


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=20, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-4),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + 0.05 * t)),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS, cycle_momentum=False),
    # cycles betas[0] (Adam) or momentum (SGD) each step: synced like lr
    "onecycle_momentum": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS, cycle_momentum=True),
}


# momentum cycling only where there is a momentum to cycle (ASGD has none); NAdam
# multiplies each step's beta1 into its running product, as torch
PAIRS = [(c, s) for c in ("adam", "sgd_nesterov", "asgd", "nadam") for s in SCHEDULERS
         if not (s == "onecycle_momentum" and c == "asgd")]


@pytest.mark.parametrize("case, sched", PAIRS)
def test_scheduler_drives_both(case, sched):
    err, _, _ = side_by_side(case, torch.float64, sched=SCHEDULERS[sched])
    assert err <= TOL64, f"{case}/{sched}: {err:.3g}"


def test_clip_grad_norm_parity():
    for case in ("adam", "sgd_momentum", "rprop"):
        err, _, _ = side_by_side(case, torch.float64, clip=0.3)
        assert err <= TOL64, (case, err)


def test_grad_missing_on_some_steps():
    """``extra`` has a gradient every 3rd step only: every optimizer matches torch, each
    parameter counting its own steps as torch's (bias corrections, ``lr_decay``: only the
    optimizers whose update ignores the count did before); with Adam, ``extra`` is
    untouched on the steps without a gradient."""
    for case in CASES:
        err, _, _ = side_by_side(case, torch.float64, extra_every=3)
        assert err <= TOL64, (case, err)
    model = make_model()
    opt = ours_for("adam", model)
    x, y = data(torch.float64)
    before = model.extra.detach().clone()
    for t in range(7):
        opt.zero_grad()
        use = t % 3 == 0
        torch.nn.functional.mse_loss(model(x, use), y).backward()
        assert (model.extra.grad is not None) == use
        opt.step()
        if use:
            assert not torch.equal(model.extra, before)
            before = model.extra.detach().clone()
        else:
            assert torch.equal(model.extra, before)
    # a step without any gradient does nothing (torch: the same)
    opt.zero_grad()
    snap = [p.detach().clone() for p in model.parameters()]
    step = opt.mithril_state.step
    opt.step()
    assert opt.mithril_state.step == step
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters()))


# ---------------------------------------------------------------------------------------
# GradScaler, closure, zero_grad
# ---------------------------------------------------------------------------------------


def scaler_run(make_opt, clip: bool, inf_at=(), steps: int = 40):
    model = make_model(torch.float32)
    opt = make_opt(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5)
    x, y = data(torch.float32)
    scales, applied = [], 0
    for t in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if t in inf_at:  # an overflow in the backward pass
            model.l1.weight.grad[1, 2] = float("inf")
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scale = scaler.get_scale()
        before = flat(model)
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale  # a skipped step halves the scale
        assert skipped == (t in inf_at)
        assert torch.equal(flat(model), before) == skipped
        applied += not skipped
        scales.append(scale)
    return model, opt, scales, applied


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "unscale-clip"])
def test_grad_scaler_cpu(clip):
    """GradScaler("cpu") unscales the group's ``.grad`` in place (a power of two: exact),
    checks them and calls ``step`` only when they are finite: steps with an inf gradient are
    skipped (params and optimizer state untouched) and the scale backs off, as with torch."""
    for inf_at in ((), (3, 4, 17)):
        m1, o1, sc1, applied = scaler_run(lambda m: ours_for("adam", m), clip, inf_at)
        m2, o2, sc2, _ = scaler_run(lambda m: torch_for("adam", m), clip, inf_at)
        assert sc1 == sc2
        assert normwise_err(m1, m2) <= TOL32
        assert o1.mithril_state.step == applied == int(o2.state[m2.l1.weight]["step"])
        assert applied == 40 - len(inf_at)
    # float64, a NaN gradient on step 5: agrees to the float64 tolerance
    with default_dtype(torch.float64):
        m1, m2 = make_model(), make_model()
        for m, o in ((m1, ours_for("adam", m1)), (m2, torch_for("adam", m2))):
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            x, y = data(torch.float64)
            for t in range(20):
                o.zero_grad()
                scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
                if t == 5:
                    m.l2.bias.grad[0] = float("nan")
                scaler.step(o)
                scaler.update()
        assert model_err(m1, m2) <= TOL64


def test_closure_and_zero_grad():
    model = make_model()
    ref = copy.deepcopy(model)
    opt, topt = ours_for("sgd_momentum", model), torch_for("sgd_momentum", ref)
    x, y = data(torch.float64)
    for _ in range(10):
        losses = []
        for m, o in ((model, opt), (ref, topt)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss
            with torch.no_grad():  # torch runs the closure with grad enabled anyway
                losses.append(o.step(closure))
        # (to the last bits, not bit for bit: whether torch's ``add_(alpha=)`` rounds once
        # (a fused multiply-add: its AVX-512 kernel on a Xeon) or twice depends on the CPU)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-13, atol=0)
    assert model_err(model, ref) <= 1e-12
    assert model.l1.weight.grad is not None
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters()
               if p is not model.extra)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------
# in place, no copy
# ---------------------------------------------------------------------------------------


def test_parameters_updated_in_place_in_one_buffer():
    model = make_model()
    params = list(model.parameters())
    opt = ours_for("adam", model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["params"] == params
    train(model, opt, 1)
    buffer = opt.mithril_state.params_flat
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert all(p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for p in model.parameters())
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    # later steps pass the arrays update returned (no copy) and write them in place
    real = opt.mithril_optimizer.update
    seen = []

    def spy(p, g, s):  # the arrays update returned, and the .grad tensors themselves
        views = s.param_views
        seen.append(all(p[k] is views[k] for k in p) and list(g) == [
            k for k, q in zip(p, params) if q.grad is not None] and all(
            g[k] is q.grad for k, q in zip(p, params) if q.grad is not None))
        return real(p, g, s)

    opt.mithril_optimizer.update = spy
    train(model, opt, 3, start=1)
    assert seen == [True] * 3
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert opt.mithril_state.params_flat is buffer


def test_stale_graph_detected_as_torch():
    """A backward through a graph built before a step fails, as with torch.optim (the
    in-place update counts in the parameters' autograd version counters)."""
    x, y = data(torch.float64)
    for make in (lambda m: ours_for("adam", m), lambda m: torch_for("adam", m)):
        model = make_model()
        opt = make(model)
        torch.nn.functional.mse_loss(model(x), y).backward()
        stale = torch.nn.functional.mse_loss(model(x), y)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            stale.backward()


def test_parameters_changed_outside():
    """In-place writes (model.load_state_dict, p.mul_) are seen; a replaced ``p.data`` is
    copied in and adopted again. Both as torch."""
    m1, m2 = make_model(), make_model()
    o1, o2 = ours_for("adam", m1), torch_for("adam", m2)
    for m, o in ((m1, o1), (m2, o2)):
        train(m, o, 5)
        with torch.no_grad():
            m.l2.weight.mul_(0.5)
        m.load_state_dict({k: v * 1.01 for k, v in m.state_dict().items()})
        train(m, o, 5, start=5)
        m.l1.bias.data = m.l1.bias.data.clone() + 0.25
        train(m, o, 5, start=10)
    assert model_err(m1, m2) <= 1e-12
    buf = o1.mithril_state.params_flat.untyped_storage().data_ptr()
    assert m1.l1.bias.untyped_storage().data_ptr() == buf


def test_flat_tensor_engine(monkeypatch):
    """The engines' flat-tensor path (torch on GPU, float16/bfloat16), forced on CPU: the
    same parity, parameters adopted into its flat buffer the same way."""
    from mithril.utils.optimizers import engines
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    monkeypatch.setattr(engines, "engine_for", lambda backend, layout, *_: ArrayEngine(backend, layout))
    for case, every in (("adam", 0), ("sgd_nesterov", 3), ("rprop", 3)):
        err, model, opt = side_by_side(case, torch.float64, extra_every=every)
        assert err <= TOL64, (case, err)
        assert isinstance(opt.mithril_state.engine, ArrayEngine)
        buf = opt.mithril_state.params_flat.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == buf for p in model.parameters())


def test_bfloat16_trains_in_place():
    model = make_model().to(torch.bfloat16)
    opt = ours_for("adam", model)
    x, y = data(torch.bfloat16)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    buf = opt.mithril_state.params_flat.untyped_storage().data_ptr()
    assert all(p.dtype == torch.bfloat16 and p.untyped_storage().data_ptr() == buf
               for p in model.parameters())
    assert opt.state_dict()["state"][3]["exp_avg"].shape == (16, 5)


# ---------------------------------------------------------------------------------------
# hyperparameters in the group, construction errors, the docs
# ---------------------------------------------------------------------------------------


def test_group_changes_are_checked():
    model = make_model()
    opt = torch_optimizer(mo.SGD(learning_rate=0.1), model.parameters())
    train(model, opt, 1)
    opt.param_groups[0]["momentum"] = 0.9  # would need a momentum slot
    with pytest.raises(ValueError, match=r"\['momentum'\].*need the state slots \['momentum'\]"):
        opt.step()
    assert opt.mithril_optimizer.momentum == 0.0
    opt.param_groups[0]["momentum"] = 0.0
    opt.param_groups[0]["lr"] = -0.5
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: learning_rate must be >= 0"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.2
    opt.param_groups[0]["weight_decay"] = 0.5
    train(model, opt, 1)
    assert opt.mithril_optimizer.learning_rate == 0.2
    assert opt.mithril_optimizer.weight_decay == 0.5
    adam = torch_optimizer(mo.Adam(), model.parameters())
    adam.param_groups[0]["betas"] = (0.5, 1.0)
    with pytest.raises(ValueError, match=r"\['betas'\]: beta2 must be in \[0, 1\)"):
        adam.step()
    assert adam.mithril_optimizer.beta2 == 0.999


def test_construction_errors():
    model = make_model()
    with pytest.raises(TypeError, match="must be a mithril optimizer"):
        torch_optimizer(torch.optim.SGD, model.parameters())
    with pytest.raises(ValueError, match="empty parameter list"):
        torch_optimizer(mo.Adam(), [])
    with pytest.raises(ValueError, match="'param1' is the same tensor as 'param0'"):
        torch_optimizer(mo.Adam(), [model.scale, model.scale])
    with pytest.raises(TypeError, match=r"mix dtypes.*odd one\(s\) out: \['b'\]"):
        torch_optimizer(mo.Adam(), [("a", model.scale), ("b", nn.Parameter(torch.zeros(2))),
                                    ("c", model.shift)])
    with pytest.raises(TypeError, match="floating-point"):
        torch_optimizer(mo.Adam(), [torch.zeros(2, dtype=torch.int64)])
    opt = torch_optimizer(mo.Adam(), model.parameters())
    with pytest.raises(ValueError, match="appear in more than one parameter group"):
        opt.add_param_group({"params": [model.scale]})  # (more: test_interop_torch_add_param_group)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.deepcopy(opt)


def test_module_docstring_example_runs():
    doc = interop_module.__doc__
    lines = []
    for line in doc.split("::\n\n", 1)[1].splitlines():  # the first literal block
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    code = "\n".join(lines)
    assert "torch_optimizer(" in code and "opt.step()" in code
    exec(compile(code, "torch_optim docstring", "exec"), {})
