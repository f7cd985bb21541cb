"""The one-program JAX step with parameters the loss does not reach: it leaves them out of
the update as torch.optim leaves out a ``.grad`` None (no weight decay, no momentum), and
each parameter counts its own steps (``t − missed`` in its bias corrections, its own row of
scalars: :func:`~mithril.interop.optax_transformation`'s ``update(missed=)``), as the NumPy
step does (``tests/test_unreached_params.py`` checks that one against torch). Before, a
loss that did not reach every parameter made the JAX step the separate calls, and the
program refused a state with missed counts."""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("jax")

from test_unreached_params import SCHEDULE, data_of, two_heads  # noqa: E402

import mithril as ml  # noqa: E402
from mithril.backends import JaxBackend, NumpyBackend  # noqa: E402
from mithril.utils.optimizers import SGD, AdamW  # noqa: E402
from mithril.utils.training import make_train_step  # noqa: E402

OPTIMIZERS = {"adamw": lambda: AdamW(learning_rate=1e-2, weight_decay=0.1),
              "sgd": lambda: SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.1)}
SHAPES = {"input": [8, 3]}


def _steps(backend, make) -> tuple:
    c = ml.compile(two_heads(), backend, shapes=SHAPES)
    opt = make()
    return c, {k: make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")}


def _numpy_run(make, schedule) -> tuple:
    c, steps = _steps(NumpyBackend(), make)
    params = c.get_parameters()
    state = steps[schedule[0]].init(params)
    rng = np.random.default_rng(1)
    for loss in schedule:
        data = {k: v.astype(np.float32) for k, v in data_of(rng).items()}
        params, state, _ = steps[loss](params, state, data)
    return c, params, state


def _close(got: dict, want: dict) -> None:
    for n in want:
        np.testing.assert_allclose(np.asarray(got[n]), want[n], rtol=1e-6, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_two_heads_alternately_in_one_program_as_numpy(opt: str) -> None:
    cn, pn, sn = _numpy_run(OPTIMIZERS[opt], SCHEDULE)
    cj, steps = _steps(JaxBackend(), OPTIMIZERS[opt])
    assert all(s.fused for s in steps.values())
    params = {n: cj.backend.array(v) for n, v in cn.get_parameters().items()}
    state = steps["loss_a"].init(params)
    assert "num_nonfinite" in state.hyperparams and state.hyperparams["missed"].shape == (6,)
    rng = np.random.default_rng(1)
    for loss in SCHEDULE:
        data = {k: cj.backend.array(v.astype(np.float32)) for k, v in data_of(rng).items()}
        params, state, _ = steps[loss](params, state, data)
    assert type(state).__name__ == "OptaxState"
    _close(params, pn)
    got = steps["loss_a"].to_optimizer_state(state, params)
    assert got.missed_counts() == sn.missed_counts() != {}
    assert got.step == sn.step == len(SCHEDULE)
    for s in sn.slots:
        _close(got.slot(s), {n: np.asarray(v) for n, v in sn.slot(s).items()})



@pytest.mark.skipif(os.environ.get("JAX_ENABLE_X64") == "1", reason="already float64")
def test_two_heads_alternately_in_float64_to_1e12() -> None:
    """The same in float64 (``jax_enable_x64`` for the block only: ``jax_float64`` puts the
    process-wide flag back), AdamW and SGD with momentum: the NumPy step's numbers to
    1e-12."""
    from optimizer_parity import jax_float64

    for make in OPTIMIZERS.values():
        got = []
        for backend in (NumpyBackend(dtype="float64"), JaxBackend(dtype="float64")):
            with jax_float64():
                c = ml.compile(two_heads(), backend, shapes=SHAPES)
                opt = make()
                steps = {k: make_train_step(c, opt, loss=k) for k in ("loss_a", "loss_b")}
                p = {n: backend.array(np.asarray(v)) for n, v in
                     (got[0][0] if got else c.get_parameters()).items()}
                start = {n: np.asarray(v).copy() for n, v in p.items()}
                s = steps["loss_a"].init(p)
                rng = np.random.default_rng(1)
                for loss in SCHEDULE:
                    p, s, _ = steps[loss](p, s, {k: backend.array(v)
                                                 for k, v in data_of(rng).items()})
                assert steps["loss_a"].fused == (backend.name == "jax")
                got.append((start, {n: np.asarray(v) for n, v in p.items()}))
        assert all(np.array_equal(got[0][0][n], got[1][0][n]) for n in got[0][0])
        assert all(v.dtype == np.float64 for v in got[1][1].values())
        err = max(float(np.max(np.abs(got[1][1][n] - got[0][1][n]))) for n in got[0][1])
        assert err < 1e-12, err


def test_unreached_head_stays_bit_for_bit() -> None:
    cj, steps = _steps(JaxBackend(), OPTIMIZERS["adamw"])
    params = cj.get_parameters()
    before = {n: np.asarray(v).copy() for n, v in params.items()}
    state = steps["loss_a"].init(params)
    rng = np.random.default_rng(2)
    for _ in range(3):
        params, state, _ = steps["loss_a"](params, state, {k: cj.backend.array(v.astype(
            np.float32)) for k, v in data_of(rng).items()})
    moved = {n for n in params if not np.array_equal(np.asarray(params[n]), before[n])}
    assert moved == set(cj.reached_parameters("loss_a"))
    assert np.asarray(state.hyperparams["missed"]).tolist().count(3) == 2
    assert all(not np.any(np.asarray(state.slots[s]["linear_2.weight"]))
               for s in state.slots)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_a_state_with_missed_counts_resumes_in_the_program(opt: str) -> None:
    """The first steps by the separate calls (``optimizer.init``'s state: ``note_missed``
    counts the missed steps), the rest in the program from ``from_optimizer_state``: the
    NumPy step's numbers, each parameter its own count."""
    cn, pn, sn = _numpy_run(OPTIMIZERS[opt], SCHEDULE)
    cj, steps = _steps(JaxBackend(), OPTIMIZERS[opt])
    params = {n: cj.backend.array(v) for n, v in cn.get_parameters().items()}
    state = steps["loss_a"].optimizer.init(params)
    rng = np.random.default_rng(1)
    for i, loss in enumerate(SCHEDULE):
        if i == 3:
            assert state.missed_counts()
            state = steps[loss].from_optimizer_state(state)
            assert np.asarray(state.hyperparams["missed"]).any()
        data = {k: cj.backend.array(v.astype(np.float32)) for k, v in data_of(rng).items()}
        params, state, _ = steps[loss](params, state, data)
    _close(params, pn)
    assert steps["loss_a"].to_optimizer_state(state, params).missed_counts() == \
        sn.missed_counts()


def _catalog() -> list:
    """The catalog of tests/test_train_step_fn.py but LBFGS (``update(closure=)`` instead):
    by default its ``JAX_DEFAULT`` (one optimizer per way the JAX step is built), the rest
    under ``-m slow``."""
    from test_train_step_fn import JAX_DEFAULT, optimizers

    return [n if n in JAX_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
            for n in optimizers() if n != "lbfgs"]


@functools.cache
def _jax_two_heads() -> ml.CompiledModel:
    """The two heads compiled once on JAX for the module (its evaluate jitted once)."""
    return ml.compile(two_heads(), JaxBackend(), shapes=SHAPES)


@pytest.mark.parametrize("name", _catalog())
def test_every_optimizer_leaves_the_unreached_head_alone(name: str) -> None:
    """Every optimizer of the catalog on JAX: the head the loss does not reach keeps its
    values bit for bit and counts its missed steps, the other parameters move (in the
    program where it counts each parameter's steps, else by the separate calls)."""
    from test_train_step_fn import optimizers

    c = _jax_two_heads()
    step = make_train_step(c, optimizers()[name](), loss="loss_a")
    params = c.get_parameters()
    before = {n: np.asarray(p).copy() for n, p in params.items()}
    state = step.init(params)
    rng = np.random.default_rng(6)
    for _ in range(3):
        params, state, _ = step(params, state, {k: c.backend.array(v.astype(np.float32))
                                                for k, v in data_of(rng).items()})
    assert {n for n in params if not np.array_equal(np.asarray(params[n]), before[n])} == \
        set(c.reached_parameters("loss_a"))
    assert step.to_optimizer_state(state, params).missed_counts() == {
        "linear_2.weight": 3, "linear_2.bias": 3}


def test_a_skipped_step_counts_no_missed_step_and_a_state_without_counts() -> None:
    """``nonfinite="skip"``: a skipped step is not counted as missed (torch_optimizer's
    rule); a state made by a step that reaches every parameter (no counts in it) is counted
    from 0 by one that does not."""
    from mithril.utils.optimizers import Adam

    cj = ml.compile(two_heads(), JaxBackend(), shapes=SHAPES)
    opt = Adam(learning_rate=1e-2, nonfinite="skip")
    step = make_train_step(cj, opt, loss="loss_a")
    params = cj.get_parameters()
    state = step.init(params)
    state = state._replace(hyperparams={k: v for k, v in state.hyperparams.items()
                                        if k != "missed"})
    data = {k: cj.backend.array(v.astype(np.float32))
            for k, v in data_of(np.random.default_rng(4)).items()}
    params, state, _ = step(params, state, data)
    with warnings.catch_warnings():  # (the skip is warned of a call or more later)
        warnings.simplefilter("ignore", RuntimeWarning)
        params, state, _ = step(params, state, {**data, "ta": cj.backend.array(
            np.full((8, 1), np.inf, np.float32))})
        params, state, _ = step(params, state, data)
    got = step.to_optimizer_state(state, params)
    assert (got.step, got.num_skipped) == (2, 1)
    assert got.missed_counts() == {"linear_2.weight": 2, "linear_2.bias": 2}


def test_a_torch_optimizer_state_resumes_in_the_program() -> None:
    """The first steps by ``torch_optimizer`` on the torch twin (a ``.grad`` None: its own
    count), its state then resumed by the one-program JAX step: torch.optim.AdamW's numbers
    all the way (the same loop in torch alone)."""
    import torch
    from test_unreached_params import TorchTwoHeads, torch_copy

    from mithril.interop import torch_optimizer

    cj, steps = _steps(JaxBackend(), OPTIMIZERS["adamw"])
    start = {n: np.asarray(v) for n, v in cj.get_parameters().items()}
    twin, ref = TorchTwoHeads(), TorchTwoHeads()
    torch_copy(twin, start)
    torch_copy(ref, start)
    ours = torch_optimizer(AdamW(learning_rate=1e-2, weight_decay=0.1), twin.named_parameters())
    theirs = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(1)
    batches = [{k: v.astype(np.float32) for k, v in data_of(rng).items()} for _ in SCHEDULE]
    for loss, data in zip(SCHEDULE, batches):
        theirs.zero_grad()
        ref(torch.from_numpy(data["input"]), loss, data).backward()
        theirs.step()
    for loss, data in zip(SCHEDULE[:3], batches):
        ours.zero_grad()
        twin(torch.from_numpy(data["input"]), loss, data).backward()
        ours.step()
    held = ours.mithril_state
    assert held.missed_counts() == {"linear_2.weight": 2, "linear_2.bias": 2,
                                    "linear_1.weight": 1, "linear_1.bias": 1}
    state = steps["loss_a"].from_optimizer_state(held)
    params = {n: cj.backend.array(p.detach().numpy().copy()) for n, p in twin.named_parameters()}
    for loss, data in zip(SCHEDULE[3:], batches[3:]):
        params, state, _ = steps[loss](params, state, {k: cj.backend.array(v)
                                                       for k, v in data.items()})
    _close(params, {n: p.detach().numpy() for n, p in ref.named_parameters()})
    assert steps["loss_a"].to_optimizer_state(state, params).missed_counts() == {
        n: len(SCHEDULE) - int(theirs.state[p]["step"]) for n, p in ref.named_parameters()
        if len(SCHEDULE) - int(theirs.state[p]["step"])}



def test_a_tensorwise_state_with_missed_counts_is_carried() -> None:
    """Muon with weight averaging runs in the one program with a head the loss does not
    reach; a state whose parameters count their own steps (``note_missed`` of a bias) goes
    into its program and back with the counts as they were."""
    from mithril.utils.optimizers import Muon

    opt = Muon(learning_rate=1e-2, ema_decay=0.9)
    assert make_train_step(ml.compile(two_heads(), JaxBackend(), shapes=SHAPES), opt,
                           loss="loss_a").fused
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.MeanSquaredError()(input="h", target="t", output=ml.IOKey("loss"))
    c = ml.compile(m, JaxBackend(), shapes=SHAPES)
    step = make_train_step(c, opt, loss="loss")
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((8, 3)).astype(np.float32),
            "t": rng.standard_normal((8, 4)).astype(np.float32)}
    params = c.get_parameters()
    params, st, _ = step(params, step.init(params), data)
    state = step.to_optimizer_state(st, params)
    state.note_missed(["linear.bias"])
    back = step.to_optimizer_state(step.from_optimizer_state(state), params)
    assert back.missed_counts() == state.missed_counts() == {"linear.bias": 1}
