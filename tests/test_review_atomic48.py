"""Review (atomic48): a call that raises changes nothing, fuzzed over the whole catalog.

Every optimizer of ``mithril.utils.optimizers.__all__`` (and the wrappers around SGD / Adam),
the schedulers, ``Accumulate``, the loss scaler and the checkpoint files meet bad input drawn
by hypothesis: gradients of the wrong shape, dtype, library, keys or kind, a NaN under
``nonfinite="raise"``, a corrupted ``load_state_dict``, a bad learning rate, a byte flipped
in a safetensors file, a disk that fills up. When the call raises, it must raise a library
error, the params, the state (``state_dict()`` deep-compared) and the hyperparameters must be
bitwise as before, and the next good step must equal that of a twin that never saw the bad
call. Peers run beside: torch's ``_amp_update_scale_`` (GradScaler's kernel), torch's
``StepLR``, ``Adam`` and ``clip_grad_norm_``, optax's ``clip_by_global_norm``; LBFGS, the
wrappers' ``nonfinite`` and Muon's learning rate have targeted tests. ``pytest -m slow``
draws many more examples.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mithril.utils.lr_schedulers as ls
import mithril.utils.optimizers as mo
from mithril.utils.accumulation import Accumulate

SHAPES = {"w": (3, 4), "b": (4,)}
ALLOWED = (ValueError, TypeError, KeyError, FloatingPointError)
SPECIAL = {"Optimizer", "OptimizerState", "NoAverageError", "DimensionNumbers", "Lookahead",
           "ScheduleFree", "Mechanize", "SAM", "DifferentiallyPrivate", "LBFGS", "DPSGD",
           "PrivacyAccountant"}


def _catalog() -> dict:
    out = {n: getattr(mo, n) for n in mo.__all__
           if inspect.isclass(getattr(mo, n)) and n not in SPECIAL}
    out["GaLore"] = lambda **kw: mo.GaLore(rank=2, update_proj_gap=2, **kw)
    out["Lookahead(SGD)"] = lambda **kw: mo.Lookahead(mo.SGD(0.1, momentum=0.9, **kw), 2)
    out["ScheduleFree(SGD)"] = lambda **kw: mo.ScheduleFree(mo.SGD(0.1, **kw))
    out["Mechanize(Adam)"] = lambda **kw: mo.Mechanize(mo.Adam(0.01, **kw))
    return out


CATALOG = _catalog()
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def native(backend: str, a):
    return torch.tensor(a) if backend == "torch" else np.array(a)


def host(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().copy()
    return np.array(x, copy=True) if hasattr(x, "shape") else copy.deepcopy(x)


def deep(x):
    """A state dict (or any nest) with every array a NumPy copy: comparable after the call."""
    if isinstance(x, dict):
        return {k: deep(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(deep(v) for v in x)
    return host(x)


def differs(a, b, path: str = "") -> str | None:
    """Where the nests ``a`` and ``b`` differ (bitwise for arrays, NaN equal to NaN)."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        return next((r for k in a if (r := differs(a[k], b[k], f"{path}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        return next((r for i, (x, y) in enumerate(zip(a, b)) if (r := differs(x, y, f"{path}[{i}]"))),
                    None)
    if isinstance(a, np.ndarray):
        same = a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
            a, b, equal_nan=a.dtype.kind in "fc")
        return None if same else f"{path}: arrays differ"
    if isinstance(a, float) and a != a and b != b:
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


# -- optimizers ---------------------------------------------------------------------------------
class Run:
    """An optimizer after one good step, with the gradients of the steps to come."""

    def __init__(self, name: str, backend: str, policy: str = "propagate"):
        rng = np.random.default_rng(0)
        self.opt = CATALOG[name](nonfinite=policy)
        self.backend = backend
        p0 = {k: native(backend, rng.standard_normal(s)) for k, s in SHAPES.items()}
        self.grads = [{k: native(backend, rng.standard_normal(s)) for k, s in SHAPES.items()}
                      for _ in range(3)]
        self.state = self.opt.init(p0)
        self.params, self.state = self.step(p0, self.grads[0], 0)

    def kw(self, i: int) -> dict:
        return {"loss": 1.0 + i} if getattr(self.opt, "needs_loss", False) else {}

    def step(self, params, grads, i: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return self.opt.update(params, grads, self.state, **self.kw(i))

    def snapshot(self) -> tuple:
        return ({k: host(v) for k, v in self.params.items()},
                deep(self.opt.state_dict(self.state)), deep(self.opt.hyperparameters()))

    def next_step(self) -> tuple:
        params, state = self.step(self.params, self.grads[1], 1)
        return {k: host(v) for k, v in params.items()}, deep(self.opt.state_dict(state))

    def host_params(self) -> dict:
        return {k: host(v) for k, v in self.params.items()}


GRAD_FAULTS = ["shape", "broadcast", "0-d", "float32", "int", "extra", "list", "other-library",
               "string", "none", "params-shape", "params-missing", "params-float32",
               "state-none", "state-other", "loss-nan", "loss-array", "loss-string"]
LOAD_FAULTS = ["slot-shape", "slot-missing", "slot-key-missing", "slot-strings", "step",
               "num_skipped", "no-hyperparameters", "adam", "sgd", "not-a-dict"]
BAD_VALUES = [float("nan"), float("inf"), -1, 1.5, "3", None, True, [1.0], 10**400, 2**63]


def _bad_grads(run: Run, fault: str):
    g, b = dict(run.grads[1]), run.backend
    w = host(g["w"])
    other = "numpy" if b == "torch" else "torch"
    change = {"shape": lambda: {"w": native(b, np.ones((4, 3)))},
              "broadcast": lambda: {"w": native(b, np.ones((1, 4)))},
              "0-d": lambda: {"b": native(b, np.float64(1.0))},
              "float32": lambda: {"w": native(b, w.astype(np.float32))},
              "int": lambda: {"w": native(b, w.astype(np.int64))},
              "extra": lambda: {"ghost": native(b, np.ones(2))},
              "other-library": lambda: {"w": native(other, w)},
              "string": lambda: {"w": "w"}, "none": lambda: {"w": None}}
    if fault == "list":
        return list(g.values())
    return {**g, **change[fault]()}


def _bad_call(run: Run, what: str, fault: str, value):
    opt, p, st = run.opt, run.params, run.state
    if what == "grads":
        kw = run.kw(1)
        if fault.startswith("params-"):
            bad = {"params-shape": {**p, "w": native(run.backend, np.ones((4, 3)))},
                   "params-missing": {"w": p["w"]},
                   "params-float32": {**p, "b": native(run.backend, host(p["b"]).astype(
                       np.float32))}}[fault]
            return opt.update(bad, run.grads[1], st, **kw)
        if fault.startswith("state-"):
            other = None if fault == "state-none" else (
                mo.SGD(momentum=0.9) if type(opt) is not mo.SGD else mo.Adam()).init(p)
            return opt.update(p, run.grads[1], other, **kw)
        if fault.startswith("loss-"):
            loss = {"loss-nan": float("nan"), "loss-array": np.ones(2),
                    "loss-string": "1"}[fault]
            return opt.update(p, run.grads[1], st, loss=loss)
        return opt.update(p, _bad_grads(run, fault), st, **kw)
    if what == "nan":
        g = dict(run.grads[1])
        g["b"] = native(run.backend, np.array([1.0, np.nan, 0.0, np.inf]))
        return opt.update(p, g, st, **run.kw(1))
    if what == "lr":
        return opt.set_learning_rate(value)
    if what == "nonfinite":
        opt.nonfinite = value
        return None
    sd = copy.deepcopy(opt.state_dict(st))
    slots = sorted(sd.get("slots", {}))
    if fault == "slot-shape" and slots:
        sd["slots"][slots[0]] = {**sd["slots"][slots[0]], "w": np.zeros((4, 3))}
    elif fault == "slot-missing" and slots:
        del sd["slots"][slots[-1]]
    elif fault == "slot-key-missing" and slots:
        sd["slots"][slots[-1]] = {k: v for k, v in sd["slots"][slots[-1]].items() if k != "b"}
    elif fault == "slot-strings" and slots:
        sd["slots"][slots[0]] = {**sd["slots"][slots[0]], "b": np.array(["a"] * 4)}
    elif fault in ("step", "num_skipped"):
        sd[fault] = value
    elif fault == "no-hyperparameters":
        sd.pop("hyperparameters", None)
    elif fault in ("adam", "sgd"):
        other = mo.Adam() if fault == "adam" else mo.SGD(momentum=0.9)
        sd = other.state_dict(other.init(run.host_params()))
    elif fault == "not-a-dict":
        sd = value
    return opt.load_state_dict(sd, run.host_params())


def check_catalog_call(name: str, backend: str, what: str, fault: str, value) -> str:
    """One bad call on a stepped optimizer; returns what happened ("raised" / "accepted")."""
    policy = "raise" if what == "nan" else "propagate"
    run, twin = Run(name, backend, policy), Run(name, backend, policy)
    before = run.snapshot()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _bad_call(run, what, fault, value)
    except ALLOWED as e:
        if isinstance(e, FloatingPointError):
            assert policy == "raise", f"{name}: FloatingPointError under {policy!r}"
        where = differs(before, run.snapshot(), "(params, state_dict, hyperparameters)")
        assert where is None, f"{name}/{backend}: {what} {fault} raised {e!r} but changed {where}"
        where = differs(run.next_step(), twin.next_step(), "next step")
        assert where is None, f"{name}/{backend}: after a refused {what} {fault}: {where}"
        return "raised"
    except Exception as e:  # a bare error from inside the library
        raise AssertionError(f"{name}/{backend}: {what} {fault} escaped as "
                             f"{type(e).__name__}: {e}") from e
    # (a None gradient is a parameter without one, as torch's p.grad: it stays where it is)
    assert what not in ("nan",) and fault not in (
        "shape", "int", "string", "other-library", "params-shape", "state-none"), (
        f"{name}/{backend}: {what} {fault} was accepted")
    return "accepted"


call_strategy = st.one_of(
    st.tuples(st.just("grads"), st.sampled_from(GRAD_FAULTS), st.just(None)),
    st.tuples(st.just("nan"), st.just("-"), st.just(None)),
    st.tuples(st.just("lr"), st.just("-"), st.sampled_from(BAD_VALUES)),
    st.tuples(st.just("nonfinite"), st.just("-"), st.sampled_from(["skipp", None, 1, "Raise"])),
    st.tuples(st.just("load"), st.sampled_from(LOAD_FAULTS), st.sampled_from(BAD_VALUES)))


def _catalog_fuzz(n: int):
    @settings(max_examples=n, **SETTINGS)
    @given(name=st.sampled_from(sorted(CATALOG)), backend=st.sampled_from(["numpy", "torch"]),
           call=call_strategy)
    def run(name, backend, call):
        check_catalog_call(name, backend, *call)

    return run


def test_catalog_calls_that_raise_change_nothing():
    _catalog_fuzz(100)()


@pytest.mark.slow
def test_catalog_calls_that_raise_change_nothing_slow():
    _catalog_fuzz(6000)()


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_optimizer_refuses_a_nan_under_raise_and_skips_it_under_skip(name):
    """Each optimizer, both policies: ``"raise"`` leaves params and the state dict bitwise;
    ``"skip"`` leaves params and every slot, and the next step equals a twin's that never
    saw the NaN (torch's GradScaler skips such a step as a whole)."""
    assert check_catalog_call(name, "numpy", "nan", "-", None) == "raised"
    run, twin = Run(name, "torch", "skip"), Run(name, "torch", "skip")
    before = run.snapshot()
    g = {**run.grads[1], "b": torch.tensor([1.0, float("nan"), 0.0, 2.0], dtype=torch.float64)}
    with pytest.warns(RuntimeWarning, match="skipped"):
        params, state = run.opt.update(run.params, g, run.state, **run.kw(1))
    assert differs(before[0], {k: host(v) for k, v in params.items()}) is None
    assert differs(before[1]["slots"], deep(run.opt.state_dict(state))["slots"]) is None
    a, b = run.next_step(), twin.next_step()
    assert differs(a[0], b[0]) is None and differs(a[1]["slots"], b[1]["slots"]) is None


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_read_only_and_strided_gradients_step_as_contiguous_ones(name):
    """A read-only NumPy gradient (a memory map, ``np.broadcast_to``), a Fortran-ordered one
    and a transposed torch view are taken, unmodified, and step as their contiguous copies."""
    for backend in ("numpy", "torch"):
        run, twin = Run(name, backend), Run(name, backend)
        w = host(run.grads[1]["w"])
        if backend == "numpy":
            odd = np.asfortranarray(w)
            odd.flags.writeable = False
        else:
            odd = torch.tensor(w.T.copy()).t()
        params, state = run.step(run.params, {**run.grads[1], "w": odd}, 1)
        got = ({k: host(v) for k, v in params.items()}, deep(run.opt.state_dict(state)))
        want = twin.next_step()
        assert np.array_equal(host(odd), w)
        if backend == "numpy":
            assert differs(got, want) is None, name
        else:  # (a reduction over a strided view may sum in another order: 1 ulp)
            for k in SHAPES:
                np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_optimizer_refuses_the_usual_mistakes_unchanged(name):
    """The mistakes every user makes once, on each optimizer (NumPy): refused, nothing
    changed, the next step as a twin's."""
    for what, fault, value in [("grads", "shape", None), ("grads", "float32", None),
                               ("grads", "other-library", None), ("grads", "extra", None),
                               ("grads", "params-shape", None), ("grads", "state-other", None),
                               ("load", "slot-shape", None), ("load", "step", "3"),
                               ("load", "adam" if name != "Adam" else "sgd", None),
                               ("lr", "-", float("nan"))]:
        check_catalog_call(name, "numpy", what, fault, value)


def test_muon_learning_rate_set_to_a_non_number_changes_nothing():
    """``muon.learning_rate = None`` (or a string, a list, 10**400) was stored, then the
    fallback's rate (Muon's times ``fallback_lr_ratio``) raised a bare TypeError /
    OverflowError: Muon kept the bad rate, its fallback the old one."""
    for name in ("learning_rate", "fallback_lr_ratio"):
        for bad, error in [(None, TypeError), ("0.1", TypeError), ([0.1], TypeError),
                           (10**400, ValueError)]:
            run, twin = Run("Muon", "numpy"), Run("Muon", "numpy")
            before = (run.snapshot(), run.opt.fallback.learning_rate)
            with pytest.raises(error, match=f"Muon: {name}=.* refused: {name} must be a number"):
                setattr(run.opt, name, bad)
            assert differs(before, (run.snapshot(), run.opt.fallback.learning_rate)) is None
            assert differs(run.next_step(), twin.next_step()) is None
    muon = mo.Muon(0.02)
    muon.learning_rate = np.float64(0.01)  # a number still sets both
    assert muon.fallback.learning_rate == 0.01 * muon.fallback_lr_ratio


@pytest.mark.parametrize("make", [lambda **kw: mo.ScheduleFree(mo.SGD(0.1, **kw)),
                                  lambda **kw: mo.Mechanize(mo.Adam(0.01, **kw)),
                                  lambda **kw: mo.Lookahead(mo.SGD(0.1, **kw))])
def test_a_wrappers_nonfinite_is_set_on_its_base(make):
    """``ScheduleFree(...).nonfinite = "raise"`` was a bare AttributeError (a property
    without a setter): now set on the base optimizer, checked there, as Lookahead's inner
    takes it; then a NaN step raises and changes nothing, as with the policy given to the
    base at construction."""
    set_later, given = make(), make(nonfinite="raise")
    with pytest.raises(ValueError, match="nonfinite='skipp' refused"):
        set_later.nonfinite = "skipp"
    assert set_later.nonfinite == "propagate"
    set_later.nonfinite = "raise"
    p = {"w": np.linspace(-1.0, 1.0, 6)}
    runs = []
    for opt in (set_later, given):
        state = opt.init(p)
        params, state = opt.update(p, {"w": np.full(6, 0.5)}, state)
        before = (deep(params), deep(opt.state_dict(state)))
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.update(params, {"w": np.array([1.0, np.nan, 0, 0, 0, 0])}, state)
        assert differs(before, (deep(params), deep(opt.state_dict(state)))) is None
        runs.append(deep(opt.update(params, {"w": np.full(6, -0.25)}, state)[0]))
    assert differs(*runs) is None


def test_accumulate_refuses_a_micro_batch_of_another_dtype_on_arrival():
    """A float32 micro-batch for float64 params was buffered; the window's ``k``-th call then
    refused (the wrapped Adam takes only its params' dtype) and so did every later call, good
    ones too (the buffer's dtype): the run was stuck. Now refused on arrival, unchanged; the
    run goes on as torch's Adam on the mean of each window's gradients."""
    rng = np.random.default_rng(3)
    p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(6)]
    acc = Accumulate(mo.Adam(0.01), 3)
    params, state = p0, acc.init(p0)
    for i, g in enumerate(grads):
        for bad, error in [({**g, "w": g["w"].astype(np.float32)}, TypeError),
                           ({**g, "w": torch.tensor(g["w"])}, TypeError)]:
            before = (deep(params), deep(acc.state_dict(state)))
            with pytest.raises(error, match="gradients\\['w'\\]"):
                acc.update(params, bad, state)
            assert differs(before, (deep(params), deep(acc.state_dict(state)))) is None, i
        params, state = acc.update(params, g, state)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    ref = torch.optim.Adam(list(tp.values()), lr=0.01)
    for w in range(2):
        for k in tp:
            tp[k].grad = torch.tensor(sum(g[k] for g in grads[3 * w:3 * w + 3]) / 3)
        ref.step()
    for k in tp:
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("attr", ["weight_decay", "learning_rate", "beta1"])
def test_a_float_hyperparameter_set_to_a_non_number_is_refused(attr):
    """``opt.weight_decay = None`` is taken (only a string is checked over a float), and
    the next SGD/Adam step silently makes every parameter NaN; ``opt.learning_rate = [0.1]``
    or ``opt.beta1 = [0.9]`` is taken and the next step raises NumPy's bare "setting an
    array element with a sequence" / "unsupported operand". The constructor refuses all
    three (``Adam(weight_decay=None)``: TypeError naming it); so should the setter."""
    opt = mo.Adam(0.01)
    with pytest.raises(TypeError, match=f"{attr}=None refused"):
        setattr(opt, attr, None)


# -- schedulers ---------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda o: ls.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda o: ls.MultiStepLR(o, [2, 4], 0.5),
    "CosineAnnealingWarmRestarts": lambda o: ls.CosineAnnealingWarmRestarts(o, 3, 2),
    "CyclicLR": lambda o: ls.CyclicLR(o, 0.01, 0.1, 2),
    "OneCycleLR": lambda o: ls.OneCycleLR(o, 0.5, 20),
    "ReduceLROnPlateau": lambda o: ls.ReduceLROnPlateau(o, patience=1),
    "WSD": lambda o: ls.WSD(o, 2, 2, 2),
    "PiecewiseInterpolate": lambda o: ls.PiecewiseInterpolate(o, "linear", {2: 0.5, 4: 0.5}),
    "LinearWarmupScheduler": lambda o: ls.LinearWarmupScheduler(o, 3, 0.0, 0.1,
                                                                ls.StepLR(o, 2, 0.5)),
    "SequentialLR": lambda o: ls.SequentialLR(o, [ls.LinearLR(o), ls.StepLR(o, 2, 0.5)], [3]),
    "ChainedScheduler": lambda o: ls.ChainedScheduler([ls.ExponentialLR(o, 0.9),
                                                       ls.StepLR(o, 2, 0.5)]),
    "JoinSchedules": lambda o: ls.JoinSchedules(o, [ls.LinearLR(o), ls.ExponentialLR(o, 0.9)],
                                                [3]),
}


def _stepped(name: str):
    opt = mo.SGD(0.1, momentum=0.9, param_groups=[{"params": ["b"], "lr_scale": 0.5}])
    sched = SCHEDULERS[name](opt)
    for i in range(3):
        sched.step(*([1.0 + i % 2] if name == "ReduceLROnPlateau" else []))
    return opt, sched


def _sched_snapshot(opt, sched) -> tuple:
    return (copy.deepcopy(sched.state_dict()), deep(opt.hyperparameters()),
            [opt.get_learning_rate(g) for g in (None, *range(len(opt.param_groups)))])


def _paths(d, path=()):
    if isinstance(d, (dict, list)):
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            yield path + (k,)
            yield from _paths(v, path + (k,))


def check_scheduler_load(name: str, pick: int, value) -> None:
    opt, sched = _stepped(name)
    twin_opt, twin = _stepped(name)
    sd = copy.deepcopy(sched.state_dict())
    paths = list(_paths(sd))
    path = paths[pick % len(paths)]
    holder = sd
    for k in path[:-1]:
        holder = holder[k]
    if value == "DELETE":
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    before = _sched_snapshot(opt, sched)
    try:
        sched.load_state_dict(sd)
    except (ValueError, TypeError, KeyError) as e:
        assert differs(before, _sched_snapshot(opt, sched)) is None, f"{path}={value!r}: {e}"
        for s in (sched, twin):
            s.step(*([2.0] if name == "ReduceLROnPlateau" else []))
        assert differs(_sched_snapshot(opt, sched), _sched_snapshot(twin_opt, twin)) is None
    except Exception as e:
        raise AssertionError(f"{name}: {path}={value!r} escaped as {type(e).__name__}: "
                             f"{e}") from e


def _scheduler_fuzz(n: int):
    @settings(max_examples=n, **SETTINGS)
    @given(name=st.sampled_from(sorted(SCHEDULERS)), pick=st.integers(0, 200),
           value=st.sampled_from([*BAD_VALUES, "DELETE", {"a": 1}, -1.5, 0]))
    def run(name, pick, value):
        check_scheduler_load(name, pick, value)

    return run


def test_scheduler_loads_that_raise_change_nothing():
    _scheduler_fuzz(60)()


@pytest.mark.slow
def test_scheduler_loads_that_raise_change_nothing_slow():
    _scheduler_fuzz(3000)()


def test_refused_scheduler_calls_leave_it_stepping_as_torchs_steplr():
    """Bad ``step`` arguments and a corrupted state dict, refused between steps of a StepLR:
    its rates stay torch's ``StepLR``'s on the same optimizer."""
    opt = mo.SGD(0.1)
    sched = ls.StepLR(opt, 2, 0.5)
    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    t_sched = torch.optim.lr_scheduler.StepLR(t_opt, 2, 0.5)
    for i in range(7):
        before = _sched_snapshot(opt, sched)
        with pytest.raises(TypeError, match="takes no epoch"):
            sched.step(3)
        with pytest.raises(ValueError, match="last_step"):
            sched.load_state_dict({**sched.state_dict(), "last_step": -1})
        with pytest.raises(ValueError, match="torch.optim.lr_scheduler's"):
            sched.load_state_dict(t_sched.state_dict())
        assert differs(before, _sched_snapshot(opt, sched)) is None
        sched.step()
        t_opt.step()
        t_sched.step()
        assert opt.get_learning_rate() == t_opt.param_groups[0]["lr"], i


# -- state dicts, every field -------------------------------------------------------------------
STATEFUL = {
    "Adam+groups+ema": lambda: mo.Adam(0.01, ema_decay=0.9, param_groups=[
        {"params": ["b"], "lr_scale": 0.5, "weight_decay": 0.0}]),
    "SGD+groups+swa": lambda: mo.SGD(0.1, momentum=0.9, swa_start=1, param_groups=[
        {"params": ["w"], "momentum": 0.5}]),
    "Accumulate(Adam)": lambda: Accumulate(mo.Adam(0.01), 2),
    "Accumulate(Lookahead)": lambda: Accumulate(mo.Lookahead(mo.Adam(0.01), 2), 2),
}


def _stateful(name: str):
    opt = STATEFUL[name]()
    params = {"w": np.linspace(-1, 1, 12).reshape(3, 4), "b": np.linspace(0, 1, 4)}
    state = opt.init(params)
    for i in range(3):  # (an Accumulate ends mid-window: a buffered micro-batch is saved)
        params, state = opt.update(params, {k: v * (0.5 + i) + 0.1 for k, v in params.items()},
                                   state)
    return opt, params, state


def check_state_dict_field(name: str, pick: int, value) -> None:
    """One field of a saved state dict (any depth) deleted or set to ``value``; a load that
    raises leaves the optimizer's state dict and hyperparameters as they were."""
    opt, params, state = _stateful(name)
    sd = copy.deepcopy(opt.state_dict(state))
    paths = [p for p in _paths(sd)]
    path = paths[pick % len(paths)]
    holder = sd
    for k in path[:-1]:
        holder = holder[k]
    if isinstance(value, str) and value == "DELETE":
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    hyper = getattr(opt, "optimizer", opt).hyperparameters
    before = (deep(opt.state_dict(state)), deep(hyper()))
    try:
        opt.load_state_dict(sd, {k: np.array(v) for k, v in params.items()})
    except (ValueError, TypeError, KeyError) as e:
        where = differs(before, (deep(opt.state_dict(state)), deep(hyper())))
        assert where is None, f"{name}: {path}={value!r} raised {e!r} but changed {where}"
    except Exception as e:
        raise AssertionError(f"{name}: {path}={value!r} escaped as {type(e).__name__}: "
                             f"{e}") from e


def _state_dict_fuzz(n: int):
    @settings(max_examples=n, **SETTINGS)
    @given(name=st.sampled_from(sorted(STATEFUL)), pick=st.integers(0, 400),
           value=st.sampled_from([*BAD_VALUES, "DELETE", {"a": 1}, np.zeros(2), 0, -1.5]))
    def run(name, pick, value):
        check_state_dict_field(name, pick, value)

    return run


def test_state_dict_fields_that_raise_change_nothing():
    _state_dict_fuzz(60)()


@pytest.mark.slow
def test_state_dict_fields_that_raise_change_nothing_slow():
    _state_dict_fuzz(3000)()


def test_accumulate_refuses_a_total_weight_too_large_for_a_float_by_name():
    """``total_weight=10**400`` in an Accumulate state dict escaped as Python's bare
    OverflowError (``math.isfinite`` of the int); now the ValueError naming the field, and
    nothing loaded."""
    for name in ("Accumulate(Adam)", "Accumulate(Lookahead)"):
        opt, params, state = _stateful(name)
        sd = opt.state_dict(state)
        before = deep(sd)
        with pytest.raises(ValueError, match="'total_weight' is an integer of 1329 bits"):
            opt.load_state_dict({**sd, "total_weight": 10**400}, params)
        assert differs(before, deep(opt.state_dict(state))) is None


def _lbfgs(convention: str):
    opt = mo.LBFGS(0.5) if convention == "torch" else mo.LBFGS(convention="optax")
    a = np.linspace(0.5, 2.0, 4)

    def closure(p):  # a separable quadratic: torch's and optax's LBFGS both take it
        return float(np.sum(a * p["w"] ** 2)), {"w": 2 * a * p["w"]}

    params = {"w": np.linspace(-1.0, 1.0, 4)}
    state = opt.init(params)
    for _ in range(2):
        params, state = opt.update(params, None, state, closure=closure)
    return opt, params, state, closure


@pytest.mark.parametrize("convention, key, value", [
    ("torch", ("values", "n_iter"), 10**400), ("torch", ("values", "history"), 10**400),
    ("optax", ("values", "count"), 10**400), ("optax", ("hyperparameters", "convention"), "x"),
    ("optax", ("hyperparameters", "convention"), None), ("torch", ("values", "n_iter"), 1.5)],
    ids=lambda v: "10**400" if v == 10**400 else None)
def test_lbfgs_state_dict_refuses_by_name_and_changes_nothing(convention, key, value):
    """An LBFGS state dict whose counter is an int too large for a float escaped as a bare
    OverflowError; an optax LBFGS loading one whose convention is no choice, as a bare
    AttributeError ('LBFGS' object has no attribute 'max_iter', from its trial copy). Now
    ValueErrors naming the field; nothing loaded, the next step as a twin's."""
    opt, params, state, closure = _lbfgs(convention)
    twin, twin_params, twin_state, _ = _lbfgs(convention)
    sd = copy.deepcopy(opt.state_dict(state))
    sd[key[0]][key[1]] = value
    before = (deep(opt.state_dict(state)), deep(opt.hyperparameters()))
    with pytest.raises(ValueError, match=key[1]):
        opt.load_state_dict(sd, params)
    assert differs(before, (deep(opt.state_dict(state)), deep(opt.hyperparameters()))) is None
    got = deep(opt.update(params, None, state, closure=closure)[0])
    assert differs(got, deep(twin.update(twin_params, None, twin_state, closure=closure)[0])) \
        is None


def test_clipping_refuses_integer_gradients_as_optax_does():
    """``clip_gradients({"w": int64 array}, clip_norm=1)`` returned float64 arrays (another
    dtype than given; ``clip_value`` on ints too) and ``global_norm`` took them: optax's
    ``clip_by_global_norm`` refuses integer updates, and torch's gradients are never
    integer. Now a TypeError naming the key; the arrays given are untouched, and float
    gradients still clip as torch's ``clip_grad_norm_`` (float64, 1e-15)."""
    import jax.numpy as jnp
    import optax

    with pytest.raises(TypeError):  # (the peer: a bare dtype error from jax.lax.select)
        optax.clip_by_global_norm(1.0).update({"w": jnp.ones(3, jnp.int32)}, None)
    for g in (np.array([3, -5, 1]), torch.tensor([3, -5, 1]), jnp.array([3, -5, 1]),
              np.array([True, False])):
        kept = host(g)
        for fn, kw in ((mo.global_norm, {}), (mo.clip_gradients, {"clip_norm": 1.0}),
                       (mo.clip_gradients, {"clip_value": 1.5})):
            with pytest.raises(TypeError, match=r"gradients\['w'\] has dtype .*int.*|bool"):
                fn({"b": np.ones(2), "w": g}, **kw)
        assert np.array_equal(host(g), kept)
    w = torch.tensor([[3.0, -5.0], [1.0, 0.5]], dtype=torch.float64)
    got = mo.clip_gradients({"w": w.numpy().copy()}, clip_norm=1.0)["w"]
    w.grad = w.clone()
    torch.nn.utils.clip_grad_norm_([w], 1.0)
    np.testing.assert_allclose(got, w.grad.numpy(), rtol=1e-15, atol=0)
