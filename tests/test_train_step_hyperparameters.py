"""make_train_step's one-program JAX step sees every hyperparameter change the separate calls
see: the learning rate is read on every call (nothing recompiles); any other change
(``opt.beta1 = ...``, a group's learning rate, ``exclude_from_weight_decay``, a scheduler
driving ``weight_decay``, a Lookahead's inner optimizer) builds the program anew at the next
call (``step.rebuilds``), and the results stay those of evaluate + update. Changing one at
every step warns once, pointing at the separate-calls state."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend
from mithril.cli.networks import mlp_spec
from mithril.utils import lr_schedulers as lrs
from mithril.utils.optimizers import Adam, AdamW, Lookahead, ScheduleFreeAdamW
from mithril.utils.training import make_train_step

STEPS = 6


def problem(backend: Any) -> tuple:
    spec = mlp_spec(8, 4, [16, 12])
    compiled = ml.compile(spec.model, backend, shapes=spec.shapes)
    rng = np.random.default_rng(0)
    batches = [{"input": backend.array(rng.standard_normal((32, 8)).astype(np.float32)),
                "target": backend.array(rng.integers(0, 4, 32), backend.int_dtype)}
               for _ in range(STEPS)]
    return compiled, batches


def run(backend: Any, make: Callable[[], Any], change: Callable[[Any, Any, int], None],
        fused: bool) -> tuple[dict[str, np.ndarray], Any]:
    """STEPS steps, ``change(opt, driver, i)`` before step i; the final params and the
    step (None for the separate calls)."""
    compiled, batches = problem(backend)
    opt = make()
    driver = lrs.StepLR(opt.hyperparameter("weight_decay"), step_size=2, gamma=0.25) \
        if "weight_decay" in opt.hyperparameters() else None
    params = compiled.get_parameters()
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
    params = compiled.get_parameters()
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


CASES = {  # name: (optimizer, change, the rebuilds it takes)
    "beta1 and weight_decay set": (adamw_groups, beta1_and_decay, 1),
    "a group's learning rate": (adamw_groups, group_lr, 1),
    "exclude_from_weight_decay": (adamw_groups, exclude, 1),
    "a scheduler driving weight_decay": (adamw_groups, scheduled_decay, 2),
    "the learning rate alone": (adamw_groups, lr_only, 0),
    "Lookahead's inner optimizer": (
        lambda: Lookahead(Adam(learning_rate=1e-2), sync_period=2), inner_beta, 1),
    "schedule-free's beta1 (kept in the state)": (
        lambda: ScheduleFreeAdamW(learning_rate=1e-2), sf_beta, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_changes_reach_the_program(case: str) -> None:
    make, change, rebuilds = CASES[case]
    want, _ = run(NumpyBackend(dtype="float32"), make, change, fused=False)
    sep, _ = run(JaxBackend(dtype="float32"), make, change, fused=False)
    got, step = run(JaxBackend(dtype="float32"), make, change, fused=True)
    assert step.fused and step.rebuilds == rebuilds
    for k in want:
        np.testing.assert_allclose(sep[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(got[k], sep[k], rtol=1e-6, atol=1e-6, err_msg=k)
    unchanged, _ = run(JaxBackend(dtype="float32"), make, lambda *a: None, fused=True)
    if rebuilds:  # (the change mattered: without it the run ends elsewhere)
        assert max(float(np.max(np.abs(unchanged[k] - got[k]))) for k in got) > 1e-4


def test_a_change_every_step_warns_once() -> None:
    """A momentum cycle changes beta1 at every step: each rebuilds the program (the results
    stay right) and the eighth says so, naming the separate-calls state."""
    def cycle(opt: Any, driver: Any, i: int) -> None:
        opt.beta1 = 0.85 + 0.01 * i

    opt, step, params, state, batches = adam_step()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(10):
            cycle(opt, None, i)
            params, state, _ = step(params, state, batches[i % STEPS])
    mine = [w for w in seen if "compiles the JAX step's program again" in str(w.message)]
    assert len(mine) == 1 and mine[0].category is RuntimeWarning
    assert "optimizer.init" in str(mine[0].message) and step.rebuilds == 10


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
