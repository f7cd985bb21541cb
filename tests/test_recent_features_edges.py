"""Edge cases of last session's features, side by side with the peers (torch.optim,
``torch.distributed.checkpoint``, ``torch.amp.GradScaler``, ``F.cross_entropy``): each test
was written failing against the bug it names, then the fix made it pass."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from mithril.interop import torch_optimizer
from mithril.utils import optimizers as mo

TOL = 1e-12
X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _steps(m: nn.Module, o: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        o.zero_grad()
        nn.functional.mse_loss(m(X), Y).backward()
        o.step()


MAKERS = {"torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
          "mithril Adam": lambda ps: torch_optimizer(mo.Adam(learning_rate=0.01,
                                                              weight_decay=0.1), ps)}


def _flattened_resume_after_add(make) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A run that added its head as a group after 2 steps, saved through DCP's flattened
    state dict after 4, resumed into a new optimizer (the same add made): both runs' params
    after 3 more steps."""
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    m = _model()
    o = make(m[0].parameters())
    _steps(m, o, 2)
    o.add_param_group({"params": m[2].parameters(), "lr": 0.02})
    _steps(m, o, 2)
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    o2 = make(m2[0].parameters())
    o2.add_param_group({"params": m2[2].parameters(), "lr": 0.02})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (DCP's own warnings about a process group)
        sd = get_optimizer_state_dict(m, o, options=flat)
        set_optimizer_state_dict(m2, o2, copy.deepcopy(sd), options=flat)
    _steps(m, o, 3)
    _steps(m2, o2, 3)
    return ([p.detach().clone() for p in m.parameters()],
            [p.detach().clone() for p in m2.parameters()])


def test_dcp_flattened_state_dict_after_add_param_group_resumes_as_torch():
    """Bug: a flattened DCP state dict (no "mithril" entry) of a wrapper that had added a
    group was refused ("its parameters' 'step' differ ... not a mithril torch_optimizer's"),
    where torch.optim.Adam resumes exactly; the per-group steps now rebuild each group's
    step_offset."""
    ref, ref_resumed = _flattened_resume_after_add(MAKERS["torch.optim.Adam"])
    got, got_resumed = _flattened_resume_after_add(MAKERS["mithril Adam"])
    for a, b, c, d in zip(ref, ref_resumed, got, got_resumed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # torch's resume is exact
        torch.testing.assert_close(d, c, rtol=0, atol=0)  # and so is ours
        torch.testing.assert_close(c, a, rtol=0, atol=TOL)  # and ours is torch's run


def test_dcp_flattened_state_dict_with_steps_differing_inside_a_group_keeps_each_count():
    """A group whose parameters' steps differ (one had no gradient at a step, as torch.optim
    counts it) is rebuilt with each parameter's own count (it was refused when a group kept
    one count); the other group's are kept."""
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    m = _model()
    o = MAKERS["mithril Adam"](m[0].parameters())
    _steps(m, o, 2)
    o.add_param_group({"params": m[2].parameters()})
    _steps(m, o, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = get_optimizer_state_dict(m, o, options=flat)
        sd["state.2.bias.step"] = torch.tensor(2.0)  # (the group's weight counts 1)
        set_optimizer_state_dict(m, o, sd, options=flat)
    assert [float(o.state[p]["step"]) for p in (*m[0].parameters(), *m[2].parameters())] == [
        3.0, 3.0, 1.0, 2.0]


def test_a_joined_groups_hyperparameter_can_be_driven_as_torchs():
    """Bug: on a native optimizer whose group has a ``step_offset`` (a group added later),
    setting any hyperparameter of that group but the rate (``hyperparameter("beta1",
    group=0).set(0.8)``, what a momentum scheduler does) raised ``TypeError: Adam() got an
    unexpected keyword argument 'step_offset'``. torch.optim: the added group's ``betas``
    changed mid-run."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(5)
    ga = [rng.standard_normal((3, 4)) for _ in range(8)]
    gb = [rng.standard_normal(5) for _ in range(8)]
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    ref = torch.optim.Adam([ta], lr=0.1)
    for i in range(8):
        if i == 3:
            ref.add_param_group({"params": [tb]})
        if i == 5:
            ref.param_groups[1]["betas"] = (0.8, 0.999)
        ta.grad, tb.grad = torch.tensor(ga[i]), (torch.tensor(gb[i]) if i >= 3 else None)
        ref.step()
    first = mo.Adam(learning_rate=0.1)
    p = {"a": a.copy()}
    st = first.init(p)
    for i in range(3):
        p, st = first.update(p, {"a": ga[i]}, st)
    opt = mo.Adam(learning_rate=0.1, param_groups=[{"params": ["b"], "step_offset": 3}])
    p = {"a": p["a"], "b": b.copy()}
    saved, fresh = first.state_dict(st), opt.state_dict(opt.init(p))
    st = opt.load_state_dict({**fresh, "step": saved["step"], "slots": {
        k: {"a": saved["slots"][k]["a"], "b": fresh["slots"][k]["b"]} for k in fresh["slots"]}}, p)
    for i in range(3, 8):
        if i == 5:
            opt.hyperparameter("beta1", group=0).set(0.8)
        p, st = opt.update(p, {"a": ga[i], "b": gb[i]}, st)
    assert opt.param_groups[0]["beta1"] == 0.8 and opt.param_groups[0]["step_offset"] == 3
    np.testing.assert_allclose(p["a"], ta.detach().numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(p["b"], tb.detach().numpy(), rtol=0, atol=TOL)
    # a refused value still names the group and changes nothing
    with pytest.raises(ValueError, match=r"param_groups\[0\]: beta1=1.5 refused"):
        opt.hyperparameter("beta1", group=0).set(1.5)
    assert opt.param_groups[0]["beta1"] == 0.8


def test_lookahead_takes_a_group_added_after_the_first_step():
    """Bug: a Lookahead (its groups are its inner optimizer's) took a group added after
    steps without its ``step_offset``: the new parameters' Adam bias corrections counted the
    steps taken before they joined; then the add was refused. Now the group counts its own
    steps from the add (its sync too: tests/test_lookahead_param_steps.py). With
    ``sync_period`` beyond the run the Lookahead is its inner Adam, so torch.optim.Adam with
    ``add_param_group`` is the peer, step for step, and each parameter's ``step`` is torch's."""
    m, mt = _model(), _model()
    ours = torch_optimizer(mo.Lookahead(mo.Adam(learning_rate=0.01), sync_period=1000),
                           m[0].parameters())
    ref = torch.optim.Adam(mt[0].parameters(), lr=0.01)
    _steps(m, ours, 2)
    _steps(mt, ref, 2)
    ours.add_param_group({"params": list(m[2].parameters())})
    ref.add_param_group({"params": list(mt[2].parameters())})
    for _ in range(3):
        _steps(m, ours, 1)
        _steps(mt, ref, 1)
        for a, b in zip(m.parameters(), mt.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    assert [float(ours.state[p]["step"]) for p in m.parameters()] == [5.0, 5.0, 3.0, 3.0]
    assert ours.mithril_optimizer.inner.param_groups[1]["step_offset"] == 2
    # before the first step there is nothing to count: the add is torch's
    m, mt = _model(), _model()
    ours = torch_optimizer(mo.Lookahead(mo.Adam(learning_rate=0.01), sync_period=1000),
                           m[0].parameters())
    ref = torch.optim.Adam(mt[0].parameters(), lr=0.01)
    ours.add_param_group({"params": m[2].parameters(), "lr": 0.02})
    ref.add_param_group({"params": mt[2].parameters(), "lr": 0.02})
    _steps(m, ours, 3)
    _steps(mt, ref, 3)
    for a, b in zip(m.parameters(), mt.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("bad", [[1.0, float("nan"), 2.0], [float("inf"), 1.0, 2.0],
                                 [1.0, 2.0, -float("inf")]])
def test_cross_entropy_refuses_a_non_finite_weight(bad):
    """Bug: a NaN / inf class weight was taken, and every loss was NaN (torch's too: it
    checks nothing) - a silent non-number. Now refused at construction naming ``weight``
    and the class; the model being built is unchanged."""
    import torch.nn.functional as F

    from mithril.models import CrossEntropy, Linear, Model

    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 2, 1])
    assert torch.isnan(F.cross_entropy(x, t, weight=torch.tensor(bad, dtype=torch.float64)))
    model = Model()
    model |= Linear(3)(input="input", output="logits")
    blocks = len(model.blocks)
    with pytest.raises(ValueError, match=r"weight must be finite, got .* for class"):
        model |= CrossEntropy(weight=bad)(input="logits", target="target", output="loss")
    assert len(model.blocks) == blocks


def test_cross_entropy_negative_weights_are_torchs_numbers():
    """Negative class weights are taken as torch takes them (its numbers to 1e-12, values and
    gradients, NumPy and torch backends, with ignore_index and smoothing)."""
    import torch.nn.functional as F

    import mithril as ml
    from mithril.backends import NumpyBackend, TorchBackend
    from mithril.models import CrossEntropy

    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((6, 3)), np.array([0, 1, 2, 1, -100, 2])
    w = np.array([1.0, -2.0, 0.5])
    kw = dict(weight=w, ignore_index=-100, label_smoothing=0.2)
    xt = torch.tensor(x, requires_grad=True)
    ref = F.cross_entropy(xt, torch.tensor(t), weight=torch.tensor(w), ignore_index=-100,
                          label_smoothing=0.2)
    ref.backward()
    for b in (NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")):
        c = ml.compile(CrossEntropy(**kw), b, shapes={"input": [6, 3]}, trainable_keys=["input"])
        out, grads = c.evaluate({"input": b.array(x)}, {"target": b.array(t)},
                                output_gradients={"output": b.array(1.0)})
        np.testing.assert_allclose(np.asarray(b.to_numpy(out["output"])), ref.item(),
                                   rtol=TOL, atol=0)
        np.testing.assert_allclose(np.asarray(b.to_numpy(grads["input"])), xt.grad.numpy(),
                                   rtol=0, atol=TOL)


@pytest.mark.parametrize("case", ["adam", "adagrad"])
def test_a_start_with_only_empty_groups_then_adds_as_torch(case):
    """Bug: ``torch_optimizer(opt, [{"params": []}])`` (nothing to train yet, groups added
    as they unfreeze) was refused ("empty parameter list"); torch.optim takes it. Now taken:
    steps with no parameters do nothing, and the groups added later run as torch's (their
    own step counts, AdaGrad's sums from ``initial_accumulator_value``)."""
    if case == "adam":
        pair = (lambda ps: torch.optim.Adam(ps, lr=0.01),
                lambda ps: torch_optimizer(mo.Adam(learning_rate=0.01), ps))
    else:
        pair = (lambda ps: torch.optim.Adagrad(ps, lr=0.01, initial_accumulator_value=0.1),
                lambda ps: torch_optimizer(mo.AdaGrad(learning_rate=0.01, epsilon=1e-10,
                                                      initial_accumulator_value=0.1), ps))
    runs = []
    for make in pair:
        m = _model()
        o = make([{"params": []}])
        _steps(m, o, 1)
        o.load_state_dict(copy.deepcopy(o.state_dict()))
        o.add_param_group({"params": m[0].parameters()})
        _steps(m, o, 2)
        o.add_param_group({"params": m[2].parameters(), "lr": 0.02})
        _steps(m, o, 2)
        sd = o.state_dict()
        runs.append(([p.detach().clone() for p in m.parameters()],
                     {i: e["step"].item() for i, e in sd["state"].items()}))
    (ref, ref_steps), (got, got_steps) = runs
    assert got_steps == ref_steps == {0: 4.0, 1: 4.0, 2: 2.0, 3: 2.0}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="empty parameter list"):  # as torch's
        torch_optimizer(mo.Adam(), [])
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam([])


def _flat_resumed(make, clear_grads: bool, raises: str | None = None) -> list[torch.Tensor]:
    """2 steps, a flattened DCP save, a load into a new optimizer (its parameters' ``.grad``
    left set, or cleared first), 2 more steps: the parameters."""
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    m = _model()
    o = make(m.parameters())
    _steps(m, o, 2)  # (the last step's .grad stay set)
    o2 = make(m.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = get_optimizer_state_dict(m, o, options=flat)
        if clear_grads:
            o2.zero_grad(set_to_none=True)
        if raises:
            with pytest.raises(ValueError, match=raises):
                set_optimizer_state_dict(m, o2, copy.deepcopy(sd), options=flat)
            assert o2.mithril_state is None  # nothing changed
            return []
        set_optimizer_state_dict(m, o2, copy.deepcopy(sd), options=flat)
    _steps(m, o2, 2)
    return [p.detach().clone() for p in m.parameters()]


def test_dcp_flattened_load_into_an_uninitialized_optimizer_with_grads_set_says_why():
    """DCP's ``flatten_optimizer_state_dict=True`` unflattens only the keys the loading
    optimizer's state has; it makes that state by a step at lr 0 only where every ``.grad``
    is None. Into an optimizer that has not stepped while the grads are set, torch.optim.Adam
    silently resumes from empty moments (its run leaves the unbroken one); ours was refused
    with "slot(s) ['m', 'v'] missing" - now the error says why and what to do, and doing it
    (``zero_grad(set_to_none=True)``) resumes exactly, as torch's then does."""
    ref_m = _model()
    _steps(ref_m, MAKERS["torch.optim.Adam"](ref_m.parameters()), 4)
    unbroken = [p.detach() for p in ref_m.parameters()]
    lost = _flat_resumed(MAKERS["torch.optim.Adam"], clear_grads=False)
    assert max((a - b).abs().max().item() for a, b in zip(lost, unbroken)) > 1e-4
    _flat_resumed(MAKERS["mithril Adam"], clear_grads=False,
                  raises=r"had not stepped .* zero_grad\(set_to_none=True\) before")
    theirs = _flat_resumed(MAKERS["torch.optim.Adam"], clear_grads=True)
    ours = _flat_resumed(MAKERS["mithril Adam"], clear_grads=True)
    for a, b, c in zip(ours, theirs, unbroken):
        torch.testing.assert_close(b, c, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=TOL)


def test_a_state_dict_whose_group_joined_after_its_step_count_is_refused_unchanged():
    """Bug: a state dict whose group's ``step_offset`` exceeds its step count (edited or
    mixed up) loaded, and then every step raised ("step_offset 7 is not below the step
    count 4") - the optimizer could never step again. Now the load refuses it, naming
    ``step_offset``, and changes nothing; the dict as saved resumes as torch.optim's run."""
    m, mt = _model(), _model()
    o = torch_optimizer(mo.Adam(learning_rate=0.01), m[0].parameters())
    ref = torch.optim.Adam(mt[0].parameters(), lr=0.01)
    for model, opt in ((m, o), (mt, ref)):
        _steps(model, opt, 2)
        opt.add_param_group({"params": model[2].parameters()})
        _steps(model, opt, 1)
    sd = o.state_dict()
    bad = copy.deepcopy(sd)
    bad["mithril"]["hyperparameters"]["param_groups"][1]["step_offset"] = 7
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    o2 = torch_optimizer(mo.Adam(learning_rate=0.01), m2[0].parameters())
    o2.add_param_group({"params": m2[2].parameters()})
    with pytest.raises(ValueError, match=r"joined after 7 steps \('step_offset'\), but its "
                                         r"step count is 3"):
        o2.load_state_dict(bad)
    assert o2.mithril_state is None and not o2.mithril_optimizer.param_groups[1].get(
        "step_offset")
    o2.load_state_dict(sd)
    _steps(m2, o2, 2)
    _steps(mt, ref, 2)
    for a, b in zip(m2.parameters(), mt.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_another_optimizers_setting_in_a_group_is_a_readable_library_error():
    """A torch setting of another optimizer in a group (``momentum`` for Adam), at
    construction or ``add_param_group``, raised a plain ``KeyError`` whose text came out
    quoted and escaped (``"param_groups[1]: [\\'momentum\\'] ..."``); now a
    :class:`~mithril.errors.KeyMismatchError` (still a KeyError) with the text as written.
    torch.optim.Adam takes such a key silently and never reads it."""
    from mithril.errors import KeyMismatchError

    m = _model()
    ref = torch.optim.Adam(m[0].parameters(), lr=0.01)
    ref.add_param_group({"params": m[2].parameters(), "momentum": 0.9})  # ignored by torch
    o = torch_optimizer(mo.Adam(learning_rate=0.01), m[0].parameters())
    for call in (lambda: o.add_param_group({"params": m[2].parameters(), "momentum": 0.9}),
                 lambda: torch_optimizer(mo.Adam(), [{"params": m[0].parameters(),
                                                      "momentum": 0.9}])):
        with pytest.raises(KeyMismatchError) as info:
            call()
        assert str(info.value).startswith("param_groups[")
        assert "['momentum'] are not values of this optimizer" in str(info.value)
    assert len(o.param_groups) == 1


def test_loss_scaler_missing_tracker_names_torchs_key_too():
    """A ``GradScaler.state_dict()`` without its ``_growth_tracker`` was refused naming only
    ``growth_tracker`` (ours), not the key torch's dict lacks; both are named now, and
    nothing changes. The full dict loads as torch's own GradScaler loads it."""
    from mithril.errors import KeyMismatchError
    from mithril.utils.mixed_precision import LossScaler

    gs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    p = nn.Parameter(torch.ones(2, dtype=torch.float64))
    o = torch.optim.SGD([p], lr=0.1)
    for _ in range(4):
        o.zero_grad()
        gs.scale((p * p).sum()).backward()
        gs.step(o)
        gs.update()
    d = gs.state_dict()
    s = LossScaler(8.0)
    before = s.state_dict()
    with pytest.raises(KeyMismatchError, match=r"growth_tracker \(or torch's _growth_tracker\)"):
        s.load_state_dict({k: v for k, v in d.items() if k != "_growth_tracker"})
    assert s.state_dict() == before
    s.load_state_dict(d)
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(s.state_dict())
    assert back.state_dict() == d == {k: s.state_dict()[k] for k in d}


def _frozen_then_unfrozen(make, save_at: int | None = None):
    """Two groups from the start, the second's ``.grad`` None for 3 steps (frozen), then 3
    steps of both (``save_at``: a state_dict / load into a new optimizer after that step)."""
    m = _model()
    groups = lambda: [{"params": m[0].parameters()},  # noqa: E731
                      {"params": m[2].parameters(), "lr": 0.02}]
    o = make(groups())
    for i in range(6):
        o.zero_grad()
        nn.functional.mse_loss(m(X), Y).backward()
        if i < 3:
            m[2].weight.grad = m[2].bias.grad = None
        o.step()
        if i == save_at:
            sd = copy.deepcopy(o.state_dict())
            o = make(groups())
            o.load_state_dict(sd)
    steps = {i: e["step"].item() for i, e in o.state_dict()["state"].items() if "step" in e}
    return [p.detach().clone() for p in m.parameters()], steps


@pytest.mark.parametrize("save_at", [None, 1, 2])
@pytest.mark.parametrize("case", ["adam", "adagrad_lr_decay"])
def test_a_group_frozen_from_the_start_counts_its_steps_as_torch(case, save_at):
    """Bug: a group whose parameters had no ``.grad`` for the first steps (frozen, then
    unfrozen) counted the optimizer's steps: its Adam bias corrections were those of a late
    step (its first update ~3x torch's), AdaGrad's lr decay too far along. torch.optim counts
    each parameter's own steps; now a group that has not had a gradient yet keeps its
    ``step_offset`` at the optimizer's count, so it starts at 1 as torch's (also across a
    state_dict / load_state_dict while it is frozen)."""
    makers = {"adam": (lambda gs: torch.optim.Adam(gs, lr=0.01),
                       lambda gs: torch_optimizer(mo.Adam(learning_rate=0.01), gs)),
              "adagrad_lr_decay": (
                  lambda gs: torch.optim.Adagrad(gs, lr=0.05, lr_decay=0.1),
                  lambda gs: torch_optimizer(mo.AdaGrad(learning_rate=0.05, lr_decay=0.1,
                                                        epsilon=1e-10), gs))}
    ref, ref_steps = _frozen_then_unfrozen(makers[case][0], save_at)
    got, got_steps = _frozen_then_unfrozen(makers[case][1], save_at)
    assert {i: got_steps[i] for i in ref_steps} == ref_steps == {0: 6.0, 1: 6.0, 2: 3.0, 3: 3.0}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_a_step_offset_given_in_a_torch_group_is_refused():
    """Bug: ``"step_offset"`` in a torch group dict (the native optimizers' key) was carried
    along unread and did nothing; the wrapper sets it itself. Refused by name at construction
    and ``add_param_group``, nothing changed; left out, the group counts as torch's."""
    from mithril.errors import KeyMismatchError

    m = _model()
    with pytest.raises(KeyMismatchError, match=r"param_groups\[1\]: 'step_offset' is set by"):
        torch_optimizer(mo.Adam(), [{"params": m[0].parameters()},
                                    {"params": m[2].parameters(), "step_offset": 3}])
    o = torch_optimizer(mo.Adam(learning_rate=0.01), m[0].parameters())
    _steps(m, o, 1)
    with pytest.raises(KeyMismatchError, match=r"param_groups\[1\]: 'step_offset'"):
        o.add_param_group({"params": m[2].parameters(), "step_offset": 3})
    assert len(o.param_groups) == 1
