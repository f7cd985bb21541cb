"""Review (ema48): a user of ``torch.optim.swa_utils`` (``AveragedModel``, ``SWALR``,
``update_bn``), timm's ``ModelEmaV3`` decay warm-up and torch's param groups, switching to
mithril: their programs run side by side with torch in float64.

1. EMA + parameter groups (no decay for bias and norm by regex, a head with its own lr and
   betas) + a per-group cosine schedule + timm's decay warm-up, the EMA evaluated after every
   step (``swap_ema`` and back) and the run resumed from state dicts midway: torch's AdamW
   and a ``lerp`` EMA.
2. SWA with a per-group ``SWALR`` after a cosine phase (torch's recipe): ``AveragedModel``.
3. Per-group betas / eps / weight decay changed mid-run, a group's lr scheduled on its own,
   a frozen group (lr 0, no gradient), the groups written with torch's keys (``"lr"``,
   ``"eps"``): torch's AdamW with its ``param_groups`` edited by hand.
4. ``update_bn`` (``mithril.utils.lr_schedulers.swa``) against torch's on a BatchNorm model,
   and an SWA run of a BatchNorm model evaluated with the recomputed statistics.
5. Group mistakes torch refuses or a torch user makes: a parameter in two groups, a group
   key read that it does not hold, torch's ``betas``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import SWALR as TorchSWALR
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn

import mithril as ml
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils import lr_schedulers as ls
from mithril.utils import optimizers as mo
from mithril.utils.lr_schedulers.swa import average_state, update_bn

TOL = dict(rtol=1e-12, atol=1e-13)
ENGINES = ["numpy", "torch"]


def _arrays(kind: str, tree: dict) -> dict:
    return {k: torch.tensor(v) if kind == "torch" else v.copy() for k, v in tree.items()}


def _np(tree: dict) -> dict:
    return {k: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for k, v in tree.items()}


# -- 1. EMA + groups + per-group cosine + timm warm-up, evaluated mid-run, resumed ----------
SHAPES = {"enc.weight": (4, 3), "enc.bias": (4,), "norm.weight": (4,), "norm.bias": (4,),
          "head.weight": (2, 4), "head.bias": (2,)}


def timm_decay(step: int, base: float = 0.95, after: int = 2) -> float:
    """timm ``ModelEmaV3(decay=base, use_warmup=True, update_after_step=after)``'s decay for
    ``step`` (gamma 1, power 3/4): 0 (a copy) until ``after + 1``, then warming up."""
    step = max(0, step - after - 1)
    return 0.0 if step <= 0 else max(min(1 - (1 + step) ** -0.75, base), 0.0)


def _ema_run_torch(p0, grads):
    tp = {n: torch.tensor(p0[n], requires_grad=True) for n in SHAPES}
    nodecay = [n for n in SHAPES if n.endswith("bias") or n.startswith("norm")]
    head = ["head.weight"]
    rest = [n for n in SHAPES if n not in nodecay and n not in head]
    opt = torch.optim.AdamW([{"params": [tp[n] for n in rest]},
                             {"params": [tp[n] for n in nodecay], "weight_decay": 0.0},
                             {"params": [tp[n] for n in head], "lr": 0.1, "betas": (0.8, 0.99)}],
                            lr=0.01, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(grads), eta_min=1e-4)
    ema = {n: torch.tensor(p0[n]) for n in SHAPES}
    emas = []
    for i, g in enumerate(grads):
        for n in SHAPES:
            tp[n].grad = torch.tensor(g[n])
        opt.step()
        sched.step()
        d = timm_decay(i + 1)
        for n in SHAPES:  # timm V3: lerp toward the model's weights by 1 − decay
            ema[n].lerp_(tp[n].detach(), 1 - d)
        emas.append(_np(ema))
    return _np(tp), emas


def _ema_optimizer(T: int):
    opt = mo.AdamW(0.01, weight_decay=0.05, ema_decay=0.95,
                   param_groups=[{"params": r"bias|^norm", "weight_decay": 0.0},
                                 {"params": r"^head", "learning_rate": 0.1, "beta1": 0.8,
                                  "beta2": 0.99}])
    return opt, ls.CosineAnnealingLR(opt, T_max=T, eta_min=1e-4, per_group=True)


@pytest.mark.parametrize("kind", ENGINES)
def test_ema_groups_cosine_timm_warmup_eval_mid_run_and_resume_equal_torch(kind):
    rng = np.random.default_rng(1)
    p0 = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    grads = [{n: rng.standard_normal(s) for n, s in SHAPES.items()} for _ in range(14)]
    ref_p, ref_ema = _ema_run_torch(p0, grads)
    opt, sched = _ema_optimizer(len(grads))
    p = _arrays(kind, p0)
    st = opt.init(p)
    for i, g in enumerate(grads):
        if i == 7:  # resume into fresh objects from their state dicts
            sd, ssd = opt.state_dict(st), sched.state_dict()
            opt, sched = _ema_optimizer(len(grads))
            st = opt.load_state_dict(sd, p)
            sched.load_state_dict(ssd)
        opt.ema_decay = timm_decay(i + 1)
        p, st = opt.update(p, _arrays(kind, g), st)
        sched.step()
        evaluated = opt.swap_ema(p, st)  # evaluate the EMA, then train on
        for n in SHAPES:
            np.testing.assert_allclose(_np(evaluated)[n], ref_ema[i][n], **TOL, err_msg=f"{i} {n}")
        p = opt.swap_ema(evaluated, st)
    for n in SHAPES:
        np.testing.assert_allclose(_np(p)[n], ref_p[n], **TOL, err_msg=n)


# -- 2. SWA with a per-group SWALR after a cosine phase (torch's recipe) ----------------------
@pytest.mark.parametrize("kind", ENGINES)
def test_swa_with_per_group_swalr_equals_averaged_model(kind):
    rng = np.random.default_rng(2)
    shapes = {"w": (3, 3), "b": (3,), "h": (2, 3)}
    p0 = {n: rng.standard_normal(s) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(16)]
    tp = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.tensor(p0[n])) for n in shapes})
    topt = torch.optim.SGD([{"params": [tp["w"], tp["h"]]},
                            {"params": [tp["b"]], "lr": 0.05, "weight_decay": 0.0}],
                           lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    swa_model = AveragedModel(tp)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=16)
    swa_sched = TorchSWALR(topt, swa_lr=[0.02, 0.01], anneal_epochs=3, anneal_strategy="linear")
    start = 5  # torch's loop averages after the epochs > start: ours from step start + 2
    opt = mo.SGD(0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, swa_start=start + 2,
                 param_groups=[{"params": ["b"], "lr": 0.05, "weight_decay": 0.0}])
    ours_cos = ls.CosineAnnealingLR(opt, T_max=16, per_group=True)
    ours_swa = ls.SWALR(opt, swa_lr=[0.02, 0.01], anneal_epochs=3, anneal_strategy="linear")
    p = _arrays(kind, p0)
    st = opt.init(p)
    for epoch, g in enumerate(grads):
        for n in shapes:
            tp[n].grad = torch.tensor(g[n])
        topt.step()
        p, st = opt.update(p, _arrays(kind, g), st)
        if epoch > start:
            swa_model.update_parameters(tp)
            swa_sched.step()
            ours_swa.step()
        else:
            cosine.step()
            ours_cos.step()
        got = _np(opt.swa_params(st))
        for n in shapes:
            np.testing.assert_allclose(got[n], swa_model.module[n].detach().numpy(), **TOL,
                                       err_msg=f"{epoch} {n}")
    assert [opt.get_learning_rate(), opt.get_learning_rate(0)] == pytest.approx(
        [g["lr"] for g in topt.param_groups], rel=1e-13)


# -- 3. groups edited and scheduled mid-run, a frozen group, torch's keys --------------------
def test_group_hyperparameters_changed_and_scheduled_mid_run_equal_torch():
    """Torch's keys in the groups (``"lr"``, ``"eps"``: the constructor takes them, the
    groups refused them with a KeyError); betas / eps / weight decay changed at step 5; the
    head's lr on its own StepLR, the decay on a hand schedule; a frozen group (lr 0 and no
    gradient, as ``requires_grad=False``)."""
    rng = np.random.default_rng(3)
    shapes = {"enc.w": (3, 3), "enc.b": (3,), "head.w": (2, 3), "frozen.w": (2, 2)}
    p0 = {n: rng.standard_normal(s) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s) for n, s in shapes.items()} for _ in range(12)]
    tp = {n: torch.tensor(p0[n], requires_grad=n != "frozen.w") for n in shapes}
    topt = torch.optim.AdamW([{"params": [tp["enc.w"]]},
                              {"params": [tp["enc.b"]], "weight_decay": 0.0, "eps": 1e-3},
                              {"params": [tp["head.w"]], "lr": 0.03, "betas": (0.7, 0.95)},
                              {"params": [tp["frozen.w"]]}], lr=0.01, weight_decay=0.1)
    opt = mo.AdamW(0.01, weight_decay=0.1, param_groups=[
        {"params": ["enc.b"], "weight_decay": 0.0, "eps": 1e-3},
        {"params": r"^head", "lr": 0.03, "beta1": 0.7, "beta2": 0.95},
        {"params": ["frozen.w"], "lr": 0.0}])
    head_lr = ls.StepLR(opt.hyperparameter("lr", group=1), step_size=2, gamma=0.5)
    p = {n: v.copy() for n, v in p0.items()}
    st = opt.init(p)

    def decay(i: int) -> float:
        return (0.3 if i >= 4 else 0.1) * (1 - 0.05 * (i + 1))

    for i, g in enumerate(grads):
        if i == 4:
            topt.param_groups[2]["betas"] = (0.5, 0.9)
            topt.param_groups[1]["eps"] = 1e-6
            opt.hyperparameter("beta1", group=1).set(0.5)
            opt.hyperparameter("beta2", group=1).set(0.9)
            opt.hyperparameter("eps", group=0).set(1e-6)
        for n in shapes:
            tp[n].grad = None if n == "frozen.w" else torch.tensor(g[n])
        topt.step()
        p, st = opt.update(p, {n: v.copy() for n, v in g.items() if n != "frozen.w"}, st)
        topt.param_groups[2]["lr"] = 0.03 * 0.5 ** ((i + 1) // 2)
        head_lr.step()
        for k in (0, 2, 3):  # the groups that do not override it follow the optimizer's
            topt.param_groups[k]["weight_decay"] = decay(i)
        opt.weight_decay = decay(i)
        for n in shapes:
            np.testing.assert_allclose(p[n], tp[n].detach().numpy(), **TOL, err_msg=f"{i} {n}")
    np.testing.assert_array_equal(p["frozen.w"], p0["frozen.w"])


def test_group_keys_in_torch_names_and_betas_hint():
    a = mo.AdamW(0.1, param_groups=[{"params": "b", "lr": 0.01, "eps": 1e-3}])
    b = mo.AdamW(0.1, param_groups=[{"params": "b", "learning_rate": 0.01, "epsilon": 1e-3}])
    assert a.param_groups == b.param_groups
    with pytest.raises(TypeError, match=r"param_groups\[0\]: give learning_rate or lr, not both"):
        mo.AdamW(0.1, param_groups=[{"params": "b", "lr": 0.01, "learning_rate": 0.02}])
    with pytest.raises(KeyError, match=r"'betas' is beta1 and beta2 here"):
        mo.AdamW(0.1, param_groups=[{"params": "b", "betas": (0.8, 0.9)}])
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['learning_rate'\]: learning_rate must"):
        mo.AdamW(0.1, param_groups=[{"params": "b", "lr": -1.0}])


def test_reading_a_key_a_group_does_not_hold_names_the_call():
    """torch's logging loop ``[g["lr"] for g in opt.param_groups]`` gave a bare KeyError('lr')."""
    opt = mo.AdamW(0.1, param_groups=[{"params": "b", "lr": 0.01}])
    g = opt.param_groups[0]
    with pytest.raises(KeyError, match=r"param_groups\[0\] has no 'lr'.*get_learning_rate\(0\)"):
        g["lr"]
    with pytest.raises(KeyError, match=r"no 'weight_decay'.*hyperparameter\('weight_decay', "
                                       r"group=0\)\.get\(\)"):
        g["weight_decay"]
    assert g.get("lr") is None and "lr" not in g and g["params"] == "b"
    assert opt.get_learning_rate(0) == pytest.approx(0.01, rel=1e-15)


# -- 5. a parameter in two groups ------------------------------------------------------------
def test_a_parameter_listed_in_two_groups_is_refused_as_torch():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        torch.optim.SGD([{"params": [a, b]}, {"params": [b], "lr": 0.5}], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\] and param_groups\[1\] both list "
                                         r"parameter 'a.b'"):
        mo.SGD(0.1, param_groups=[{"params": ["a.w", "a.b"], "lr": 0.01},
                                  {"params": ["a.b", "c.w"], "lr": 0.5}])
    with pytest.raises(ValueError, match="both list parameter 'a.b'"):  # a dict's True entries
        mo.SGD(0.1, param_groups=[{"params": {"a.w": False, "a.b": True}, "lr": 0.01},
                                  {"params": ["a.b"], "lr": 0.5}])


def test_a_listed_parameter_an_earlier_pattern_claims_is_refused_at_init():
    """``head.bias`` listed in group 1 but matched first by group 0's regex took group 0's
    lr silently (SGD 0.01 instead of 0.5); now ``init`` refuses it, keeping nothing."""
    p = {"head.bias": np.ones(2), "head.w": np.ones(2)}
    opt = mo.SGD(0.1, param_groups=[{"params": r"bias", "lr": 0.01},
                                    {"params": ["head.bias", "head.w"], "lr": 0.5}])
    before = opt.hyperparameters()
    with pytest.raises(ValueError, match=r"param_groups\[1\] lists parameter 'head.bias', but "
                                         r"param_groups\[0\] \('bias'\) matches it first"):
        opt.init(p)
    assert opt.hyperparameters() == before
    np.testing.assert_array_equal(p["head.bias"], np.ones(2))
    # overlapping patterns stay first-match, as documented
    ok = mo.SGD(0.1, param_groups=[{"params": r"bias", "lr": 0.01}, {"params": r"head", "lr": 0.5}])
    out, _ = ok.update(dict(p), {k: np.ones(2) for k in p}, ok.init(p))
    np.testing.assert_allclose(out["head.bias"], 0.99, rtol=1e-15)
    np.testing.assert_allclose(out["head.w"], 0.5, rtol=1e-15)


# -- 4. update_bn ----------------------------------------------------------------------------
def bn_model(momentum: float | None = 0.1) -> ml.Model:
    m = ml.Model()
    m += ml.Linear(4)(input="input")
    m += ml.BatchNorm1D(4, momentum=momentum)
    m += ml.Relu()
    m += ml.Linear(3)
    m += ml.BatchNorm1D(3)
    return m


def bn_torch(momentum: float | None = 0.1) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, momentum=momentum),
                               torch.nn.ReLU(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def torch_params(net: torch.nn.Sequential) -> dict:
    """Our parameter names -> torch's tensors, for :func:`bn_model`."""
    mods = {"linear_0": net[0], "batch_norm1_d_0": net[1], "linear_1": net[3],
            "batch_norm1_d_1": net[4]}
    return {f"{k}.{a}": getattr(m, a) for k, m in mods.items() for a in ("weight", "bias")}


def torch_state(net: torch.nn.Sequential) -> dict:
    mods = {"batch_norm1_d_0": net[1], "batch_norm1_d_1": net[4]}
    return {f"{k}.{a}": getattr(m, a).numpy().copy() for k, m in mods.items()
            for a in ("running_mean", "running_var", "num_batches_tracked")}


def _backend(kind: str):
    return {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend}[kind](dtype="float64")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ENGINES)
def test_update_bn_equals_torch(kind, momentum):
    backend = _backend(kind)
    compiled = ml.compile(bn_model(momentum), backend, shapes={"input": [8, 3]})
    params = compiled.get_parameters()
    net = bn_torch(momentum).double()
    with torch.no_grad():
        for k, t in torch_params(net).items():
            t.copy_(torch.tensor(np.asarray(_np({k: params[k]})[k])))
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((8, 3)) for _ in range(5)]
    net(torch.tensor(xs[0]))  # statistics of a training step first: update_bn resets them
    _, state = compiled.evaluate(params, {"input": backend.array(xs[0])},
                                 state=compiled.initial_state_dict)
    kept = _np(state)
    net.eval()
    torch_update_bn([torch.tensor(x) for x in xs], net)
    assert not net.training
    got = update_bn([{"input": backend.array(x)} for x in xs], compiled, params, state)
    want = torch_state(net)
    assert got.keys() == want.keys()
    for k, v in _np(got).items():
        np.testing.assert_allclose(v, want[k], rtol=1e-14, atol=1e-15, err_msg=k)
    assert _np(got)["batch_norm1_d_0.num_batches_tracked"].shape == ()
    for k, v in _np(state).items():  # the state given is not changed
        np.testing.assert_array_equal(v, kept[k])


def test_update_bn_edges_and_errors():
    backend = _backend("numpy")
    compiled = ml.compile(bn_model(), backend, shapes={"input": [8, 3]})
    params = compiled.get_parameters()
    x = np.random.default_rng(5).standard_normal((8, 3))
    _, state = compiled.evaluate(params, {"input": x}, state=compiled.initial_state_dict)
    kept = _np(state)
    net = bn_torch().double()  # no batches: torch resets the statistics
    torch_update_bn([], net)
    for k, v in update_bn([], compiled, params, state).items():
        np.testing.assert_array_equal(v, torch_state(net)[k])
    with pytest.raises(TypeError, match=r"update_bn: batch 1 must be a dict of inputs"):
        update_bn([{"input": x}, x], compiled, params, state)
    with pytest.raises(TypeError, match=r"batches must be an iterable of input dicts"):
        update_bn({"input": x}, compiled, params, state)
    with pytest.raises(KeyMismatchError, match=r"update_bn: state does not match the model's: "
                                               r"missing \['batch_norm1_d_0.running_var'\]"):
        update_bn([{"input": x}], compiled, params,
                  {k: v for k, v in state.items() if k != "batch_norm1_d_0.running_var"})
    for k, v in _np(state).items():
        np.testing.assert_array_equal(v, kept[k])
    frozen = ml.compile(bn_model(momentum=0.0), backend, shapes={"input": [8, 3]})
    with pytest.raises(ValueError, match=r"BatchNorm 'batch_norm1_d_0' has momentum=0"):
        update_bn([{"input": x}], frozen, frozen.get_parameters())
    plain = ml.Model()
    plain += ml.Linear(2)(input="input")
    c = ml.compile(plain, backend, shapes={"input": [8, 3]})
    assert update_bn([{"input": x}], c, c.get_parameters()) == {}


@pytest.mark.parametrize("kind", ENGINES)
def test_swa_of_a_batchnorm_model_with_update_bn_equals_torch(kind):
    """torch's SWA recipe on a BatchNorm model: SGD, cosine then SWALR, ``AveragedModel``,
    ``update_bn`` over the training batches, then the averaged model evaluated; ours: the
    optimizer's ``swa_start``, ``update_bn`` with ``opt.swa_params(state)``, then
    ``evaluate(..., training=False)`` with the statistics it returned."""
    backend = _backend(kind)
    compiled = ml.compile(bn_model(), backend, shapes={"input": [8, 3]})
    params = compiled.get_parameters()
    net = bn_torch().double()
    tmap = torch_params(net)
    with torch.no_grad():
        for k, t in tmap.items():
            t.copy_(torch.tensor(_np({k: params[k]})[k]))
    rng = np.random.default_rng(6)
    data = [(rng.standard_normal((8, 3)), rng.standard_normal((8, 3))) for _ in range(10)]
    topt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    swa_model = AveragedModel(net)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=10)
    swa_sched = TorchSWALR(topt, swa_lr=0.02, anneal_epochs=2)
    opt = mo.SGD(0.1, momentum=0.9, swa_start=5)
    ours_cos = ls.CosineAnnealingLR(opt, T_max=10)
    ours_swa = ls.SWALR(opt, swa_lr=0.02, anneal_epochs=2)
    st, state = opt.init(params), compiled.initial_state_dict
    for epoch, (x, y) in enumerate(data):
        topt.zero_grad()
        (0.5 * ((net(torch.tensor(x)) - torch.tensor(y)) ** 2).mean()).backward()
        topt.step()
        out, _ = compiled.evaluate(params, {"input": backend.array(x)}, state=state)
        cot = (out["output"] - backend.array(y)) / y.size
        _, grads, state = compiled.evaluate(params, {"input": backend.array(x)},
                                            output_gradients={"output": cot}, state=state)
        params, st = opt.update(params, grads, st)
        if epoch >= 4:
            swa_model.update_parameters(net)
            swa_sched.step()
            ours_swa.step()
        else:
            cosine.step()
            ours_cos.step()
    torch_update_bn([torch.tensor(x) for x, _ in data], swa_model)
    swa = opt.swa_params(st)
    bn_state = update_bn([{"input": backend.array(x)} for x, _ in data], compiled, swa, state)
    for k, t in torch_params(swa_model.module).items():
        np.testing.assert_allclose(_np(swa)[k], t.detach().numpy(), **TOL, err_msg=k)
    for k, v in _np(bn_state).items():
        np.testing.assert_allclose(v, torch_state(swa_model.module)[k], **TOL, err_msg=k)
    x_test = rng.standard_normal((8, 3))
    swa_model.eval()
    want = swa_model(torch.tensor(x_test)).detach().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compiled.evaluate(swa, {"input": backend.array(x_test)}, state=bn_state,
                                training=False)[0]["output"]
    np.testing.assert_allclose(_np({"o": got})["o"], want, **TOL)


@pytest.mark.parametrize("kind", ENGINES)
def test_averaged_weights_and_state_equal_averaged_model_with_buffers(kind):
    """A BatchNorm model trained with an EMA and an SWA average of its weights (the
    optimizer's) and of its running statistics (``average_state`` after each step): torch's
    ``AveragedModel(..., use_buffers=True)``, EMA and SWA, after every step, and the averaged
    models' inference outputs (``num_batches_tracked``: copied here, blended and truncated
    by torch; no inference reads it)."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    backend = _backend(kind)
    compiled = ml.compile(bn_model(), backend, shapes={"input": [8, 3]})
    params = compiled.get_parameters()
    net = bn_torch().double()
    with torch.no_grad():
        for k, t in torch_params(net).items():
            t.copy_(torch.tensor(_np({k: params[k]})[k]))
    topt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    t_ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    t_swa = AveragedModel(net, use_buffers=True)
    opt = mo.SGD(0.1, momentum=0.9, ema_decay=0.8, swa_start=4)
    st, state = opt.init(params), compiled.initial_state_dict
    ema_state = swa_state = None
    rng = np.random.default_rng(7)
    n_swa = 0
    for step in range(1, 9):
        x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 3))
        topt.zero_grad()
        (0.5 * ((net(torch.tensor(x)) - torch.tensor(y)) ** 2).mean()).backward()
        topt.step()
        t_ema.update_parameters(net)
        out, _ = compiled.evaluate(params, {"input": backend.array(x)}, state=state)
        cot = (out["output"] - backend.array(y)) / y.size
        _, grads, state = compiled.evaluate(params, {"input": backend.array(x)},
                                            output_gradients={"output": cot}, state=state)
        params, st = opt.update(params, grads, st)
        ema_state = average_state(ema_state, state, 1 - 0.8)
        if step >= 4:
            t_swa.update_parameters(net)
            swa_state = average_state(swa_state, state, 1 / (n_swa + 1))
            n_swa += 1
        for avg, ours_p, ours_s in ((t_ema, opt.ema_params(st), ema_state),
                                    (t_swa, opt.swa_params(st), swa_state)):
            if ours_s is None:
                continue
            for k, t in torch_params(avg.module).items():
                np.testing.assert_allclose(_np(ours_p)[k], t.detach().numpy(), **TOL,
                                           err_msg=f"{step} {k}")
            for k, v in _np(ours_s).items():
                if not k.endswith("num_batches_tracked"):
                    np.testing.assert_allclose(v, torch_state(avg.module)[k], **TOL,
                                               err_msg=f"{step} {k}")
    assert _np(ema_state)["batch_norm1_d_0.num_batches_tracked"] == 8
    x_test = rng.standard_normal((8, 3))
    for avg, ours_p, ours_s in ((t_ema, opt.ema_params(st), ema_state),
                                (t_swa, opt.swa_params(st), swa_state)):
        avg.eval()
        want = avg(torch.tensor(x_test)).detach().numpy()
        got = compiled.evaluate(ours_p, {"input": backend.array(x_test)}, state=ours_s,
                                training=False)[0]["output"]
        np.testing.assert_allclose(_np({"o": got})["o"], want, **TOL)


def test_average_state_bad_input_is_named_and_changes_nothing():
    a = {"m": np.zeros(2), "n": np.array(3)}
    s = {"m": np.ones(2), "n": np.array(5)}
    kept = {k: v.copy() for k, v in a.items()}
    with pytest.raises(ValueError, match=r"average_state: weight must be a number in \[0, 1\]"):
        average_state(a, s, 1.5)
    with pytest.raises(ValueError, match="weight must be"):
        average_state(a, s, float("nan"))
    with pytest.raises(KeyMismatchError, match=r"missing \['n'\]"):
        average_state({"m": a["m"]}, s, 0.5)
    with pytest.raises(ShapeError,
                       match=r"average\['m'\] has shape \(3,\), state\['m'\] \(2,\)"):
        average_state({"m": np.zeros(3), "n": a["n"]}, s, 0.5)
    for k in a:
        np.testing.assert_array_equal(a[k], kept[k])
    out = average_state(a, s, 0.25)
    np.testing.assert_array_equal(out["m"], [0.25, 0.25])
    assert out["n"] == 5 and out["n"] is not s["n"]
    first = average_state(None, s, 0.25)  # the first update copies
    assert all(np.array_equal(first[k], s[k]) and first[k] is not s[k] for k in s)


def test_update_bn_on_jax_float32_equals_torch():
    backend = ml.JaxBackend(dtype="float32")
    compiled = ml.compile(bn_model(), backend, shapes={"input": [8, 3]})
    params = compiled.get_parameters()
    net = bn_torch()
    with torch.no_grad():
        for k, t in torch_params(net).items():
            t.copy_(torch.tensor(np.asarray(params[k])))
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(4)]
    torch_update_bn([torch.tensor(x) for x in xs], net)
    got = update_bn([{"input": backend.array(x)} for x in xs], compiled, params)
    for k, v in got.items():
        np.testing.assert_allclose(np.asarray(v), torch_state(net)[k], rtol=2e-6, atol=2e-7,
                                   err_msg=k)


def test_ema_decay_set_by_attribute_out_of_range_is_refused_and_changes_nothing():
    """``opt.ema_decay = 1.5`` (a decay schedule gone wrong) was taken unchecked: the EMA
    then extrapolated past the parameters (w = −0.5: 0.95 outside [0.8, 0.9]); torch's
    ``get_ema_multi_avg_fn(1.5)`` refuses it. A value in range is still set as given."""
    with pytest.raises(ValueError, match=r"Invalid decay value 1.5"):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        get_ema_multi_avg_fn(1.5)
    opt = mo.SGD(0.1, ema_decay=0.9)
    p = {"a": np.ones(2)}
    st = opt.init(p)
    p, st = opt.update(p, {"a": np.ones(2)}, st)
    kept = opt.ema_params(st)["a"].copy()
    for bad, err in ((1.5, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                     ("0.5", TypeError)):
        with pytest.raises(err, match=r"SGD: ema_decay=.* refused: ema_decay must be"):
            opt.ema_decay = bad
        assert opt.ema_decay == 0.9
    p, st = opt.update(p, {"a": np.ones(2)}, st)
    np.testing.assert_allclose(opt.ema_params(st)["a"], 0.9 * kept + 0.1 * p["a"], rtol=1e-15)
    opt.ema_decay = 0.0  # (timm's warm-up: a copy)
    p, st = opt.update(p, {"a": np.ones(2)}, st)
    np.testing.assert_array_equal(opt.ema_params(st)["a"], p["a"])


def test_torch_default_group_index_names_the_accessors():
    """torch's ``optimizer.param_groups[0]["lr"]`` on an optimizer given no groups was a bare
    ``IndexError: list index out of range``."""
    opt = mo.SGD(0.1)
    with pytest.raises(IndexError, match=r"param_groups has 0 group\(s\), no \[0\]: .*"
                                         r"optimizer.get_learning_rate\(\)"):
        opt.param_groups[0]
    grouped = mo.SGD(0.1, param_groups=[{"params": "b", "lr": 0.2}])
    assert grouped.param_groups[-1] is grouped.param_groups[0]
    assert grouped.param_groups[:1] == [grouped.param_groups[0]]


KERAS_ADAMW_EMA = r"""
import json, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import keras
keras.config.set_floatx("float64")
from mithril.utils import optimizers as mo
rng = np.random.default_rng(10)
names = ["dense/kernel", "dense/bias", "norm/gamma", "head/kernel"]
p0 = {n: rng.standard_normal((3,) if "kernel" not in n else (3, 2)) for n in names}
grads = [{n: rng.standard_normal(v.shape) for n, v in p0.items()} for _ in range(12)]
vs = [keras.Variable(p0[n], name=n.replace("/", "_"), dtype="float64") for n in names]
ko = keras.optimizers.AdamW(0.01, weight_decay=0.2, epsilon=1e-3, use_ema=True,
                            ema_momentum=0.7, ema_overwrite_frequency=3)
ko.exclude_from_weight_decay(var_names=["bias", "gamma"])
ko.build(vs)
opt = mo.AdamW(0.01, weight_decay=0.2, epsilon=1e-3, convention="keras", ema_decay=0.7)
opt.exclude_from_weight_decay(var_names=["bias", "gamma"])
params = {n: v.copy() for n, v in p0.items()}
state = opt.init(params)
errs = []
for t, g in enumerate(grads, 1):
    ko.apply([g[n] for n in names], vs)
    params, state = opt.update(params, g, state)
    if t % 3 == 0:
        params = {n: v.copy() for n, v in opt.ema_params(state).items()}
    kp = {n: np.asarray(v) for n, v in zip(names, vs)}
    ke = {n: np.asarray(v) for n, v in zip(names, ko._model_variables_moving_average)}
    oe = opt.ema_params(state)
    errs.append(max(max(np.abs(kp[n] - params[n]).max(), np.abs(ke[n] - oe[n]).max())
                    for n in names))
ko.finalize_variable_values(vs)  # (what fit() does at the end: the weights become the EMA)
final = max(np.abs(np.asarray(v) - opt.ema_params(state)[n]).max() for n, v in zip(names, vs))
print(json.dumps({"errs": errs, "final": float(final)}))
"""


@pytest.mark.slow  # (~15 s: a fresh interpreter importing Keras and JAX)
def test_keras_adamw_ema_overwrite_and_exclusions_step_by_step():
    """Keras 3 ``AdamW(use_ema=True, ema_momentum=0.7, ema_overwrite_frequency=3)`` with
    ``exclude_from_weight_decay(var_names=["bias", "gamma"])``: ours (``convention="keras"``,
    ``ema_decay=0.7``, the same exclusion, the documented overwrite recipe) after every step,
    and ``finalize_variable_values`` (the end of ``fit``) is ``ema_params``."""
    from conftest import run_python

    res = json.loads(run_python(KERAS_ADAMW_EMA, timeout=240, env={"KERAS_BACKEND": "jax"}
                                ).strip().splitlines()[-1])
    assert len(res["errs"]) == 12 and max(res["errs"]) < 1e-12, res["errs"]
    assert res["final"] < 1e-12
