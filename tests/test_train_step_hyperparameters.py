"""make_train_step's one-program JAX step sees every hyperparameter change the separate calls
see, and compiles as little as it can for them: the learning rate is read on every call
(nothing recompiles); a float hyperparameter of an elementwise or two-pass optimizer or of one
of its groups (``beta1``, ``momentum``, ``weight_decay``, ``clip_norm``, a group's learning
rate) becomes an argument of the program at its first change (one rebuild, ``step.rebuilds``),
so a schedule changing it at every step compiles once (a Lookahead's, its inner optimizer's
too); any other change (a flag, an integer such as Lookahead's ``sync_period``,
``exclude_from_weight_decay``) builds the program anew at the next call. The results stay
those of evaluate + update. Rebuilding at every step warns once, pointing at the
separate-calls state."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import set_traced

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend
from mithril.cli.networks import mlp_spec
from mithril.utils import lr_schedulers as lrs
from mithril.utils.optimizers import (
    LAMB,
    SGD,
    Adam,
    AdamW,
    Lookahead,
    Muon,
    RMSProp,
    ScheduleFreeAdamW,
)
from mithril.utils.training import make_train_step

STEPS = 6


def problem(backend: Any) -> tuple:
    return _problem(type(backend), backend.dtype)


@functools.cache
def _problem(backend_type: type, dtype: str) -> tuple:
    """One compiled model per backend for the module: its evaluate is jitted once, not in
    every run (the steps and optimizers under test are made anew each time)."""
    backend = backend_type(dtype=dtype)
    spec = mlp_spec(8, 4, [16, 12])
    compiled = ml.compile(spec.model, backend, shapes=spec.shapes)
    rng = np.random.default_rng(0)
    batches = [{"input": backend.array(rng.standard_normal((32, 8)).astype(np.float32)),
                "target": backend.array(rng.integers(0, 4, 32), backend.int_dtype)}
               for _ in range(STEPS)]
    return compiled, batches


def fresh_params(compiled: Any) -> dict:
    """The initial parameters as new arrays: the module's compiled model is shared, and an
    update in place or a donated buffer must not reach the next run."""
    b = compiled.backend
    return {k: b.array(np.array(b.to_numpy(v))) for k, v in compiled.get_parameters().items()}


def run(backend: Any, make: Callable[[], Any], change: Callable[[Any, Any, int], None],
        fused: bool) -> tuple[dict[str, np.ndarray], Any]:
    """STEPS steps, ``change(opt, driver, i)`` before step i; the final params and the
    step (None for the separate calls)."""
    compiled, batches = problem(backend)
    opt = make()
    driver = lrs.StepLR(opt.hyperparameter("weight_decay"), step_size=2, gamma=0.25) \
        if "weight_decay" in opt.hyperparameters() else None
    params = fresh_params(compiled)
    step = make_train_step(compiled, opt, loss="loss") if fused else None
    state = step.init(params) if fused else opt.init(params)
    for i, data in enumerate(batches):
        change(opt, driver, i)
        if fused:
            params, state, _ = step(params, state, data)
        else:
            _, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
            params, state = opt.update(params, grads, state)
    return {k: np.array(backend.to_numpy(v)) for k, v in params.items()}, step


def adam_step(make: Callable = make_train_step) -> tuple:
    """(optimizer, step, params, state, batches) of an Adam step on JAX, before any step."""
    be = JaxBackend(dtype="float32")
    compiled, batches = problem(be)
    opt = Adam(learning_rate=1e-2)
    step = make(compiled, opt, loss="loss")
    params = fresh_params(compiled)
    return opt, step, params, step.init(params), batches


def adamw_groups() -> AdamW:
    return AdamW(learning_rate=1e-2, weight_decay=0.1,
                 param_groups=[{"params": lambda n: "bias" in n, "weight_decay": 0.0}])


def beta1_and_decay(opt: Any, driver: Any, i: int) -> None:
    if i == 2:
        opt.beta1, opt.weight_decay = 0.5, 0.3


def group_lr(opt: Any, driver: Any, i: int) -> None:
    if i == 1:
        opt.set_learning_rate(0.05, group=0)


def exclude(opt: Any, driver: Any, i: int) -> None:
    if i == 3:
        opt.exclude_from_weight_decay(regex="linear_1")


def scheduled_decay(opt: Any, driver: Any, i: int) -> None:
    if i:
        driver.step()  # weight_decay x 0.25 every second step


def lr_only(opt: Any, driver: Any, i: int) -> None:
    opt.set_learning_rate(1e-2 / (i + 1))


def inner_beta(opt: Any, driver: Any, i: int) -> None:
    if i == 2:
        opt.inner.beta2 = 0.9


def sf_beta(opt: Any, driver: Any, i: int) -> None:
    if i == 3:
        opt.beta1 = 0.5


def tensor_clip(opt: Any, driver: Any, i: int) -> None:
    if i == 2:  # (a bound each tensor's factor is made with: baked in, the program rebuilt)
        opt.clip_tensor_norm, opt.adaptive_clip = 0.05, 0.002


CASES = {  # name: (optimizer, change, the rebuilds it takes)
    "beta1 and weight_decay set": (adamw_groups, beta1_and_decay, 1),
    "a group's learning rate": (adamw_groups, group_lr, 1),
    "exclude_from_weight_decay": (adamw_groups, exclude, 1),
    "a scheduler driving weight_decay": (adamw_groups, scheduled_decay, 1),
    "the learning rate alone": (adamw_groups, lr_only, 0),
    "per-tensor clipping's bounds": (
        lambda: Adam(learning_rate=1e-2, clip_tensor_norm=1.0, adaptive_clip=0.01),
        tensor_clip, 1),
    "Lookahead's inner optimizer": (
        lambda: Lookahead(Adam(learning_rate=1e-2), sync_period=2), inner_beta, 1),
    "schedule-free's beta1 (kept in the state)": (
        lambda: ScheduleFreeAdamW(learning_rate=1e-2), sf_beta, 1),
}


@functools.cache
def unchanged_run(make: Callable[[], Any]) -> dict[str, np.ndarray]:
    """The fused run of ``make``'s optimizer without any change (the same for every case
    sharing ``make``: run once)."""
    return run(JaxBackend(dtype="float32"), make, lambda *a: None, fused=True)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_changes_reach_the_program(case: str) -> None:
    make, change, rebuilds = CASES[case]
    want, _ = run(NumpyBackend(dtype="float32"), make, change, fused=False)
    sep, _ = run(JaxBackend(dtype="float32"), make, change, fused=False)
    got, step = run(JaxBackend(dtype="float32"), make, change, fused=True)
    assert step.fused and step.rebuilds == rebuilds
    assert step._jitted._cache_size() == 1  # (a new learning rate compiles nothing either)
    for k in want:
        np.testing.assert_allclose(sep[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got[k], sep[k], rtol=1e-6, atol=1e-6, err_msg=k)
    unchanged = unchanged_run(make)
    if rebuilds:  # (the change mattered: without it the run ends elsewhere)
        assert max(float(np.max(np.abs(unchanged[k] - got[k]))) for k in got) > 1e-4


def every_step(attr: str, start: float, delta: float, group: int | None = None) -> Callable:
    """A change of ``attr`` (of ``param_groups[group]``) at every step, as a scheduler
    driving it would make (through the optimizer's handle on it)."""
    def change(opt: Any, driver: Any, i: int) -> None:
        opt.hyperparameter(attr, group=group).set_learning_rate(start + delta * i)

    return change


def momentum_cycle(opt: Any, driver: Any, i: int) -> None:
    opt.beta1, opt.beta2 = 0.95 - 0.02 * i, 0.998 - 0.001 * i


def groups_schedule(opt: Any, driver: Any, i: int) -> None:
    opt.set_learning_rate(0.02 / (i + 1), group=0)  # a torch-style per-group schedule
    opt.hyperparameter("weight_decay", group=1).set_learning_rate(0.05 * i)
    opt.weight_decay = 0.1 + 0.05 * i


def two_groups(cls: type = AdamW, **kw: Any) -> Callable[[], Any]:
    return lambda: cls(learning_rate=1e-2, param_groups=[
        {"params": lambda n: "bias" in n, "weight_decay": 0.0},
        {"params": lambda n: "weight" in n and "1" in n, "weight_decay": 0.2}], **kw)


PER_STEP = {  # name: (optimizer, a change at every step)
    "Adam's betas (traced scalars)": (lambda: Adam(learning_rate=1e-2), momentum_cycle),
    "SGD's momentum (scalars on the host)": (
        lambda: SGD(learning_rate=1e-2, momentum=0.5), every_step("momentum", 0.5, 0.07)),
    "coupled weight_decay from 0": (
        lambda: Adam(learning_rate=1e-2), every_step("weight_decay", 0.0, 0.05)),
    "two groups' learning rate and decay": (two_groups(), groups_schedule),
    "clip_norm and clip_value": (
        lambda: Adam(learning_rate=1e-2, clip_norm=1.0, clip_value=0.5),
        lambda opt, d, i: (every_step("clip_norm", 0.5, -0.06)(opt, d, i),
                           every_step("clip_value", 0.3, -0.04)(opt, d, i))),
    "LAMB's beta1 (two-pass)": (
        lambda: LAMB(learning_rate=1e-2, weight_decay=0.01), every_step("beta1", 0.9, -0.05)),
    "Muon's momentum warm-up (per-tensor)": (
        lambda: Muon(learning_rate=1e-2, ns_dtype="float32"),
        every_step("momentum", 0.85, 0.02)),
    "a Lookahead's inner β₁ and weight decay, its slow step size": (
        lambda: Lookahead(AdamW(learning_rate=1e-2), sync_period=2),
        lambda opt, d, i: (every_step("beta1", 0.9, -0.04)(opt, d, i),
                           every_step("weight_decay", 0.01, 0.02)(opt, d, i),
                           every_step("slow_step_size", 0.5, 0.08)(opt, d, i))),
    "RMSProp's decay and momentum": (
        lambda: RMSProp(learning_rate=1e-2, momentum=0.9),
        lambda opt, d, i: (every_step("decay", 0.99, -0.01)(opt, d, i),
                           every_step("momentum", 0.85, -0.1)(opt, d, i))),
}


@pytest.mark.parametrize("case", list(PER_STEP))
def test_a_float_changed_every_step_compiles_once(case: str) -> None:
    """A schedule changing float hyperparameters at every step: the first change makes
    them arguments of the program (one rebuild), the later ones compile nothing; the
    results are the separate calls' (JAX's to 1e-6, NumPy's to float32 rounding)."""
    make, change = PER_STEP[case]
    want, _ = run(NumpyBackend(dtype="float32"), make, change, fused=False)
    sep, _ = run(JaxBackend(dtype="float32"), make, change, fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (no "compiles again" warning)
        got, step = run(JaxBackend(dtype="float32"), make, change, fused=True)
    assert step.rebuilds == 1 and step._jitted._cache_size() == 1
    for k in want:
        np.testing.assert_allclose(sep[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got[k], sep[k], rtol=1e-6, atol=1e-6, err_msg=k)
    unchanged = unchanged_run(make)
    assert max(float(np.max(np.abs(unchanged[k] - got[k]))) for k in got) > 1e-4


def staggered(opt: Any, driver: Any, i: int) -> None:
    """β₁ cycled from step 1, the weight decay scheduled from step 3, ε once at step 4."""
    if i:
        opt.beta1 = 0.9 - 0.05 * i
    if i >= 3:
        opt.weight_decay = 0.1 * (0.5 ** i)
    if i == 4:
        opt.epsilon = 1e-6


def override_later(opt: Any, driver: Any, i: int) -> None:
    """β₁ cycled from step 1; from step 3 group 0 takes its own β₁ (a handle on a value
    it did not override: a new override), changed at every step."""
    if i:
        opt.beta1 = 0.9 - 0.02 * i
    if i >= 3:
        opt.hyperparameter("beta1", group=0).set_learning_rate(0.6 - 0.05 * i)


def override_first(opt: Any, driver: Any, i: int) -> None:
    if i >= 2:  # (the first change is a new override: the program traces it at once)
        opt.hyperparameter("beta2", group=1).set_learning_rate(0.99 - 0.01 * i)


@pytest.mark.parametrize("change, rebuilds", [(staggered, 1), (override_later, 1),
                                              (override_first, 1)])
def test_schedules_begun_later_compile_nothing_more(change: Callable, rebuilds: int) -> None:
    """The first change of any hyperparameter makes every float one an argument of the
    program, each group's own included (overridden or not): a schedule begun later on
    another one (or a constant changed once), or on a group's new override, compiles
    nothing."""
    make = two_groups()
    want, _ = run(NumpyBackend(dtype="float32"), make, change, fused=False)
    sep, _ = run(JaxBackend(dtype="float32"), make, change, fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, step = run(JaxBackend(dtype="float32"), make, change, fused=True)
    assert step.rebuilds == rebuilds and step._jitted._cache_size() == 1
    for k in want:
        np.testing.assert_allclose(sep[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got[k], sep[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_a_traced_hyperparameter_set_to_an_integer_is_baked_in_again() -> None:
    """weight_decay traced after its first change, then set to the integer 0: the program
    is built anew with it baked in (not refused), and the results stay the separate
    calls'."""
    def change(opt: Any, driver: Any, i: int) -> None:
        opt.weight_decay = 0.1 * i if i < 3 else 0

    want, _ = run(JaxBackend(dtype="float32"), lambda: Adam(learning_rate=1e-2), change, False)
    got, step = run(JaxBackend(dtype="float32"), lambda: Adam(learning_rate=1e-2), change, True)
    assert step.rebuilds == 2 and "weight_decay" not in step._traced
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_a_rebuild_every_step_warns_once() -> None:
    """A change the program bakes in (here a Lookahead's ``sync_period``, an integer) made
    at every step rebuilds it each time (the results stay right); the eighth says so, naming
    the separate-calls state."""
    be = JaxBackend(dtype="float32")
    compiled, batches = problem(be)
    opt = Lookahead(Adam(learning_rate=1e-2), sync_period=2)
    step = make_train_step(compiled, opt, loss="loss")
    params = fresh_params(compiled)
    state = step.init(params)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(10):
            opt.sync_period = 2 + i % 2
            params, state, _ = step(params, state, batches[i % STEPS])
    mine = [w for w in seen if "compiles it again" in str(w.message)]
    assert len(mine) == 1 and mine[0].category is RuntimeWarning
    # (the first change, before any program ran, is baked into the first one: no rebuild)
    assert "optimizer.init" in str(mine[0].message) and step.rebuilds == 9
    assert mine[0].filename == __file__  # (it points at the call)


def test_a_fresh_state_takes_the_learning_rate_of_now() -> None:
    """A state made by step.init after the learning rate changed (a restart with the
    step already built) runs at the optimizer's rate of now, as optimizer.init's does."""
    opt, step, params, state, batches = adam_step()
    for data in batches[:2]:
        params, state, _ = step(params, state, data)
    opt.set_learning_rate(1e-3)
    params, state, _ = step(params, state, batches[2])  # (at the new rate)
    params = {k: step.backend.array(np.asarray(v)) for k, v in params.items()}  # (donated)
    got, _, _ = step(params, step.init(params), batches[3])
    fresh = Adam(learning_rate=1e-3)
    _, grads = step.compiled.evaluate(params, batches[3], output_gradients={"loss": 1.0})
    want, _ = fresh.update(params, grads, fresh.init(params))
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6,
                                   atol=1e-7, err_msg=k)


def test_a_change_that_alters_the_state_is_refused_naming_it() -> None:
    """``amsgrad`` turned on after the state was made: the state lacks the new slot, and
    the step says so before anything runs (no buffer donated)."""
    opt, step, params, state, batches = adam_step()
    params, state, _ = step(params, state, batches[0])
    opt.amsgrad = True
    with pytest.raises(ValueError, match="slot"):
        step(params, state, batches[1])
    assert not any(x.is_deleted() for x in params.values())
    opt.amsgrad = False
    params, state, _ = step(params, state, batches[1])  # and back: it steps again
    assert int(state.count) == 2


def test_the_sharded_step_rebuilds_too() -> None:
    """make_sharded_train_step (here on one device) builds its program the same way: a
    change reaches it, and the results are the one-device step's."""
    from mithril.distributed.jax_parallel import make_sharded_train_step

    results = []
    for make in (make_sharded_train_step, make_train_step):
        opt, step, params, state, batches = adam_step(make)
        for i, data in enumerate(batches):
            if i == 2:
                opt.beta1 = 0.5
            params, state, _ = step(params, state, data)
        assert step.rebuilds == 1
        results.append({k: np.asarray(v) for k, v in params.items()})
    for k in results[1]:
        np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-6, atol=1e-7)


def catalog_cases() -> list[str]:
    import mithril.utils.optimizers as catalog
    from mithril.utils.optimizers.base import Optimizer

    return [n for n in catalog.__all__ if isinstance(getattr(catalog, n), type)
            and issubclass(getattr(catalog, n), Optimizer)
            and n not in ("Optimizer", "LBFGS", "Lookahead",
                          # no program holds their update (separate calls: test_train_step_fn)
                          "SAM", "Mechanize", "ScheduleFree",
                          # update(..., loss=): their rate and decay changed mid-run in the
                          # one program, tests/test_optimizers_loss_aware.py
                          "PolyakSGD", "Momo", "MomoAdam",
                          # per-example gradients: refused by name, tests/test_dpsgd.py
                          "DPSGD", "DifferentiallyPrivate")]


def catalog_optimizer(name: str) -> Any:
    """``name`` of the catalog with weight decay and clipping where it takes them (Muon's
    Newton-Schulz in float32: its bfloat16 rounding would hide a 1e-6 difference)."""
    import mithril.utils.optimizers as catalog

    cls = getattr(catalog, name)
    extra = {"ns_dtype": "float32"} if name == "Muon" else {}
    for kw in ({"weight_decay": 0.02, "clip_norm": 2.0}, {"clip_norm": 2.0}, {}):
        try:
            return cls(learning_rate=1e-2, **kw, **extra)
        except (TypeError, ValueError):
            continue
    raise AssertionError(name)


#: the default run's share of the catalog, one of each way a step is built: elementwise
#: (Adam); two-pass with reductions, tensor slots and state values at once (DoG: LAMB's
#: reductions, NAdam's slots, Prodigy's and schedule-free's values are each a part of it, and
#: LAMB and schedule-free run above too); per-tensor (Muon, with its fallback's "fallback.*"
#: floats; Adafactor, factored). The rest repeat these paths: ``-m slow``.
CATALOG_DEFAULT = ("Adam", "DoG", "Muon", "Adafactor")


@pytest.mark.parametrize("name", [
    n if n in CATALOG_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
    for n in catalog_cases()])
def test_every_float_of_the_catalog_scheduled_compiles_once(name: str) -> None:
    """Every optimizer of the catalog, each of its float hyperparameters the program may
    read (``floats``) changed at every step: the first change rebuilds once, the rest
    compile nothing, and the results are the separate calls' with the same changes."""
    from mithril.interop.optax_hyperparams import floats, value

    names = floats(catalog_optimizer(name))
    start = {k: value(catalog_optimizer(name), k) for k in names}

    def change(opt: Any, driver: Any, i: int) -> None:
        for k in names:  # (a Muon's fallback's too: "fallback.beta1")
            set_traced(opt, k, start[k] * (1 - 0.02 * i))

    make = lambda: catalog_optimizer(name)  # noqa: E731
    sep, _ = run(JaxBackend(dtype="float32"), make, change, fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, step = run(JaxBackend(dtype="float32"), make, change, fused=True)
    assert step.rebuilds == (1 if names else 0) and step._jitted._cache_size() == 1, name
    assert set(step._traced) == set(names)
    for k in sep:
        np.testing.assert_allclose(got[k], sep[k], rtol=2e-6, atol=2e-6, err_msg=k)
