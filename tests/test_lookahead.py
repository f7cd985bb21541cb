"""Lookahead: exact against optax.lookahead, the backends agree, state dicts and checkpoints
resume bit-exactly, bad arguments are refused.

float64 parity: optax's trajectories (fast and slow weights after every step, 100 steps, the
learning rate changed twice) are computed in ONE fresh subprocess (``jax_enable_x64`` is
process-global; :func:`optax_reference` writes them to an .npz); ours run in-process
on NumPy float64 (the fused numba kernel) and must agree to ``<= 1e-10`` in the measure of
:func:`rel_err` (elementwise relative, floored at 1e-3 of the tensor's largest magnitude).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import host, native, optimizer_engine
from float64_reference import lr_at, reference_code, rel_err

from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import OneCycleLR, StepLR
from mithril.utils.optimizers import SGD, Adam, AdamW, DoG, Lookahead, Momo, Optimizer
from mithril.utils.optimizers.lookahead import lookahead_math

STEPS = 100
TOL64 = 1e-10
TOL32 = 3e-6
SHAPES = {"w": (3, 4), "b": (4,), "s": (), "big": (20, 20)}

# name -> (our inner class, its kwargs, Lookahead kwargs, optax inner factory of the lr)
CASES = {
    "adam": ("Adam", {"learning_rate": 0.02}, {"sync_period": 5, "slow_step_size": 0.5},
             "lambda learning_rate: optax.adam(learning_rate)"),
    "sgd_momentum": ("SGD", {"learning_rate": 0.01, "momentum": 0.9},
                     {"sync_period": 6, "slow_step_size": 0.7},
                     "lambda learning_rate: optax.sgd(learning_rate, momentum=0.9)"),
    "sgd_nesterov": ("SGD", {"learning_rate": 0.01, "momentum": 0.8, "nesterov": True},
                     {"sync_period": 3, "slow_step_size": 0.3},
                     "lambda learning_rate: optax.sgd(learning_rate, momentum=0.8, "
                     "nesterov=True)"),
    "adamw_alpha1": ("AdamW", {"learning_rate": 0.01, "weight_decay": 0.1},
                     {"sync_period": 7, "slow_step_size": 1.0},
                     "lambda learning_rate: optax.adamw(learning_rate, weight_decay=0.1)"),
    "adam_reset": ("Adam", {"learning_rate": 0.02, "beta1": 0.8},
                   {"sync_period": 4, "slow_step_size": 0.6, "reset_state": True},
                   "lambda learning_rate: optax.adam(learning_rate, b1=0.8)"),
    "sgd_reset": ("SGD", {"learning_rate": 0.01, "momentum": 0.9},
                  {"sync_period": 5, "slow_step_size": 0.5, "reset_state": True},
                  "lambda learning_rate: optax.sgd(learning_rate, momentum=0.9)"),
}
CLASSES = {"Adam": Adam, "AdamW": AdamW, "SGD": SGD}
#: the largest error of each check (printed after the run: conftest.py)
OBSERVED: dict[str, float] = {}


def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0):
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 5), dtype=dtype)
              for k, s in SHAPES.items()} for t in range(steps)]
    return p0, grads


# ---------------------------------------------------------------------------------------------
# float64 parity with optax.lookahead
# ---------------------------------------------------------------------------------------------

_SCRIPT = r"""
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax

p0, grads = problem("float64")
names = list(SHAPES)
arrays = {}
for case, (_, kw, la, ref) in CASES.items():
    lr0 = kw["learning_rate"]
    tx = optax.lookahead(optax.inject_hyperparams(eval(ref))(learning_rate=lr0),
                         sync_period=la["sync_period"], slow_step_size=la["slow_step_size"],
                         reset_state=la.get("reset_state", False))

    @jax.jit
    def step(params, g, s):
        u, s = tx.update(g, s, params)
        return optax.apply_updates(params, u), s

    params = optax.LookaheadParams.init_synced({k: jnp.asarray(v) for k, v in p0.items()})
    s = tx.init(params)
    for t in range(STEPS):
        s.fast_state.hyperparams["learning_rate"] = jnp.asarray(lr_at(lr0, t), jnp.float64)
        params, s = step(params, {k: jnp.asarray(v) for k, v in grads[t].items()}, s)
        for k in names:
            arrays[f"{case}/fast/{k}/{t}"] = np.array(params.fast[k])
            arrays[f"{case}/slow/{k}/{t}"] = np.array(params.slow[k])
    assert arrays[f"{case}/fast/w/0"].dtype == np.float64
np.savez(PATH, **arrays)
print("ok")
"""


@contextlib.contextmanager
def optax_reference():
    """optax's fast and slow weights after every step of every case, computed in a fresh
    interpreter (as conftest's ``run_python``: ``jax_enable_x64`` is process-global) started
    here; yields a function that waits for them, so that our side runs meanwhile."""
    tmp = tempfile.mkdtemp(prefix="mithril-lookahead-")
    path = os.path.join(tmp, "optax.npz")
    code = reference_code("", _SCRIPT, problem, STEPS, SHAPES, CASES, f"PATH = {path!r}")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})

    def result() -> dict[str, np.ndarray]:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip().endswith("ok"), err[-4000:]
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    try:
        yield result
    finally:
        if proc.poll() is None:  # a failure on our side: stop the reference run
            proc.kill()
            proc.communicate()
        shutil.rmtree(tmp, ignore_errors=True)


def make(case: str, **inner_options) -> Lookahead:
    cls_name, kw, la, _ = CASES[case]
    return Lookahead(CLASSES[cls_name](**kw, **inner_options), **la)


def run64(case: str) -> list[dict[str, np.ndarray]]:
    """Our run of ``case`` (NumPy float64, the fused kernel): the fast and slow weights
    after every step (copies)."""
    p0, grads = problem("float64")
    opt = make(case)
    lr0 = opt.get_learning_rate()
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    assert type(state.engine).__name__ == "NumbaEngine"
    traj = []
    for t in range(STEPS):
        opt.set_learning_rate(lr_at(lr0, t))
        params, state = opt.update(params, grads[t], state)
        slow = opt.slow_params(state)
        if (t + 1) % opt.sync_period == 0:  # synced: fast is slow, bit for bit
            for k in SHAPES:
                np.testing.assert_array_equal(params[k], slow[k])
        traj.append({**{f"fast/{k}": params[k].copy() for k in SHAPES},
                     **{f"slow/{k}": slow[k].copy() for k in SHAPES}})
    assert state.step == STEPS and params["w"].dtype == np.float64
    assert rel_err(slow["big"], p0["big"]) > 1e-3  # the slow weights did move
    return traj


def test_float64_matches_optax_lookahead():
    """Every case, 100 steps with two lr changes, fast and slow weights after every step
    <= 1e-10 from optax.lookahead's. One test, so that under xdist the reference
    interpreter runs once."""
    with optax_reference() as reference:
        ours = {case: run64(case) for case in CASES}
        ref = reference()
    bad = {}
    for case, traj in ours.items():
        for which in ("fast", "slow"):
            err = max(rel_err(step[f"{which}/{k}"], ref[f"{case}/{which}/{k}/{t}"])
                      for t, step in enumerate(traj) for k in SHAPES)
            OBSERVED[f"f64/{case}/{which}"] = err
            if not err <= TOL64:
                bad[f"{case}/{which}"] = err
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# float32: the backends and engines agree
# ---------------------------------------------------------------------------------------------

F32_STEPS = 24


def f32_opt(**inner) -> Lookahead:
    """Parameter groups (own lr and weight decay), the inner optimizer's EMA (composed after
    the lookahead step) and reset_state: every path of the composed kernel at once (the
    float32 tests below share its compiled kernels)."""
    return Lookahead(Adam(0.01, ema_decay=0.9, **inner), sync_period=4, slow_step_size=0.6,
                     reset_state=True)


GROUPS = [{"params": "^b", "learning_rate": 0.003, "weight_decay": 0.1}]


def run32(backend: str):
    p0, grads = problem("float32", F32_STEPS)
    with optimizer_engine(backend):
        opt = f32_opt(param_groups=GROUPS)
        params = {k: native(backend, v) for k, v in p0.items()}
        state = opt.init(params)
        expected = {"jax-jit": "JaxEngine", "array-torch": "ArrayEngine"}.get(backend,
                                                                              "NumbaEngine")
        assert type(state.engine).__name__ == expected
        for t in range(F32_STEPS):
            if t == 10:
                opt.set_learning_rate(opt.get_learning_rate() * 0.5)
            params, state = opt.update(params, {k: native(backend, v)
                                                for k, v in grads[t].items()}, state)
        out = {f"fast/{k}": host(v) for k, v in params.items()}
        out.update({f"slow/{k}": host(v) for k, v in opt.slow_params(state).items()})
        if "ema" in state.slots:
            out.update({f"ema/{k}": host(v) for k, v in opt.ema_params(state).items()})
        return out


def test_float32_backends_agree():
    runs = {b: run32(b) for b in ("numpy", "torch", "jax", "jax-jit", "array-torch")}
    for key, x in runs["numpy"].items():
        assert x.dtype == np.float32
        # NumPy, torch and JAX on CPU run the same fused kernel: identical bits
        np.testing.assert_array_equal(x, runs["torch"][key])
        np.testing.assert_array_equal(x, runs["jax"][key])
        for other in ("jax-jit", "array-torch"):  # other fusion / rounding: close
            err = float(np.max(np.abs(x - runs[other][key])) / np.max(np.abs(x)))
            label = f"f32/numpy-{other}"
            OBSERVED[label] = max(err, OBSERVED.get(label, 0.0))
            assert err <= TOL32, (other, key, err)


def test_groups_equal_separate_optimizers_and_ema_is_of_the_fast_weights():
    """A parameter group behaves as its own Lookahead (bit for bit); the inner optimizer's
    EMA averages the weights ``update`` returns (the fast ones)."""
    p0, grads = problem("float32", 20)
    grouped = f32_opt(param_groups=[{"params": ["b", "s"], "learning_rate": 0.03,
                                     "weight_decay": 0.1}])
    parts = {("w", "big"): f32_opt(), ("b", "s"): f32_opt(weight_decay=0.1)}
    parts[("b", "s")].set_learning_rate(0.03)
    params = {k: v.copy() for k, v in p0.items()}
    state = grouped.init(params)
    split = {ks: {k: p0[k].copy() for k in ks} for ks in parts}
    states = {ks: parts[ks].init(split[ks]) for ks in parts}
    ema = {}
    for t in range(20):
        if t == 7:  # every group in proportion
            grouped.set_learning_rate(0.005)
            parts[("w", "big")].set_learning_rate(0.005)
            parts[("b", "s")].set_learning_rate(0.015)
        params, state = grouped.update(params, grads[t], state)
        for ks, opt in parts.items():
            split[ks], states[ks] = opt.update(split[ks], {k: grads[t][k] for k in ks},
                                               states[ks])
        for k, p in params.items():  # the first update copies (torch's AveragedModel)
            ema[k] = p.astype(np.float64) if t == 0 else ema[k] + 0.1 * (p - ema[k])
    assert grouped.get_learning_rate(0) == pytest.approx(0.015)
    for ks, opt in parts.items():
        for k in ks:
            np.testing.assert_array_equal(params[k], split[ks][k])
            np.testing.assert_array_equal(grouped.slow_params(state)[k],
                                          opt.slow_params(states[ks])[k])
    for k in ema:
        np.testing.assert_allclose(grouped.ema_params(state)[k], ema[k], rtol=1e-5, atol=1e-6)


def test_skipped_steps_do_not_count():
    p0, grads = problem("float64", 6)
    opt = Lookahead(SGD(0.01, momentum=0.9, nonfinite="skip"), sync_period=2)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    before = {k: v.copy() for k, v in params.items()}
    bad = {**grads[1], "w": np.full((3, 4), np.nan)}
    with pytest.warns(RuntimeWarning, match="skipped"):
        params, state = opt.update(params, bad, state)
    assert state.step == 1 and state.num_skipped == 1
    for k in before:
        np.testing.assert_array_equal(params[k], before[k])
    params, state = opt.update(params, grads[1], state)  # step 2: the sync
    for k in before:
        np.testing.assert_array_equal(params[k], opt.slow_params(state)[k])


# ---------------------------------------------------------------------------------------------
# state dicts and checkpoints
# ---------------------------------------------------------------------------------------------

def _run(opt, params, state, grads, start, stop, scheduler=None):
    for t in range(start, stop):
        params, state = opt.update(params, grads[t], state)
        if scheduler is not None:
            scheduler.step()
    return params, state


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_state_dict_resumes_bit_exactly(backend):
    p0, grads = problem("float32", 30)
    grads = [{k: native(backend, v) for k, v in g.items()} for g in grads]
    opt = f32_opt(param_groups=GROUPS)
    params = {k: native(backend, v) for k, v in p0.items()}
    whole, s_whole = _run(opt, params, opt.init(params), grads, 0, 30)

    opt = f32_opt(param_groups=GROUPS)
    params = {k: native(backend, v) for k, v in p0.items()}
    params, state = _run(opt, params, opt.init(params), grads, 0, 13)
    d = copy.deepcopy(opt.state_dict(state))
    json.dumps(d["hyperparameters"])  # plain JSON
    assert d["hyperparameters"]["inner"]["optimizer"] == "Adam"
    fresh = Lookahead(Adam(0.5, beta1=0.5), sync_period=2, slow_step_size=1.0)
    params = {k: native(backend, host(v)) for k, v in params.items()}
    state = fresh.load_state_dict(d, params)
    assert (fresh.sync_period, fresh.slow_step_size, fresh.reset_state) == (4, 0.6, True)
    assert fresh.inner.beta1 == 0.9 and fresh.inner.ema_decay == 0.9
    assert fresh.get_learning_rate(0) == pytest.approx(0.003)
    assert state.step == 13
    resumed, s_res = _run(fresh, params, state, grads, 13, 30)
    for k in SHAPES:
        np.testing.assert_array_equal(host(whole[k]), host(resumed[k]))
    for slot in s_whole.slots:
        for k in SHAPES:
            np.testing.assert_array_equal(host(s_whole.slot(slot)[k]), host(s_res.slot(slot)[k]))


def test_checkpoint_resumes_bit_exactly(tmp_path):
    p0, grads = problem("float64", 30)

    def fresh(lr=0.02, k=5):
        opt = Lookahead(SGD(lr, momentum=0.9), sync_period=k, slow_step_size=0.5)
        return opt, StepLR(opt, step_size=4, gamma=0.7)

    opt, sched = fresh()
    params = {k: v.copy() for k, v in p0.items()}
    whole, s_whole = _run(opt, params, opt.init(params), grads, 0, 30, sched)
    assert opt.inner.learning_rate == pytest.approx(0.02 * 0.7 ** 7)  # the scheduler drives it

    opt, sched = fresh()
    params = {k: v.copy() for k, v in p0.items()}
    params, state = _run(opt, params, opt.init(params), grads, 0, 17, sched)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, opt, state, sched)

    opt2, sched2 = fresh(lr=0.5, k=2)
    ck = load_checkpoint(path, params_template=p0, optimizer=opt2, scheduler=sched2)
    assert opt2.sync_period == 5 and opt2.inner.momentum == 0.9
    assert opt2.get_learning_rate() == opt.get_learning_rate()
    resumed, s_res = _run(opt2, ck["params"], ck["state"], grads, 17, 30, sched2)
    for k in SHAPES:
        np.testing.assert_array_equal(whole[k], resumed[k])
        np.testing.assert_array_equal(opt.slow_params(s_whole)[k], opt2.slow_params(s_res)[k])

    # a checkpoint of a Lookahead around another optimizer class is refused, nothing changed
    other = Lookahead(Adam(0.1), sync_period=3)
    before = other.hyperparameters()
    with pytest.raises(ValueError, match="inner optimizer is 'SGD'"):
        load_checkpoint(path, params_template=p0, optimizer=other)
    assert other.hyperparameters() == before


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

class _OwnUpdate(Optimizer):
    def update(self, params, gradients, state):  # pragma: no cover - never called
        return params, state


BAD = [
    ({"inner": "adam"}, TypeError, "inner"),
    ({"inner": Adam}, TypeError, "inner"),
    ({"inner": _OwnUpdate()}, TypeError, "overrides init/update"),
    # (a two-pass inner runs, its sums and values passed through: tests/
    # test_loss_aware_wrappers.py; a sync cannot restart its values as optax's init would)
    ({"inner": Momo(), "reset_state": True}, TypeError,
     r"reset_state=True: Momo keeps \['barf', 'gamma', 'lb', 'loss'\] besides its slots"),
    ({"inner": DoG(layer_wise=True), "reset_state": True}, TypeError,
     r"reset_state=True: DoG keeps \['started', 'max_dist', 'sum_sq'\]"),
    ({"inner": Lookahead(Adam())}, TypeError, "nested"),
    ({"sync_period": 0}, ValueError, "sync_period"),
    ({"sync_period": -3}, ValueError, "sync_period"),
    ({"sync_period": 2.0}, TypeError, "sync_period"),
    ({"sync_period": True}, TypeError, "sync_period"),
    ({"slow_step_size": 0.0}, ValueError, "slow_step_size"),
    ({"slow_step_size": 1.5}, ValueError, "slow_step_size"),
    ({"slow_step_size": -0.5}, ValueError, "slow_step_size"),
    ({"slow_step_size": float("nan")}, ValueError, "slow_step_size"),
    ({"slow_step_size": "0.5"}, TypeError, "slow_step_size"),
    ({"reset_state": "yes"}, TypeError, "reset_state"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=[f"{next(iter(k))}-{i}"
                                                     for i, (k, _, _) in enumerate(BAD)])
def test_bad_arguments_name_the_argument(kw, exc, match):
    inner = Adam(0.01)
    before = inner.hyperparameters()
    kw = {"inner": inner, **kw}
    with pytest.raises(exc, match=match):
        Lookahead(**kw)
    assert inner.hyperparameters() == before


def test_refusals_change_nothing():
    p0, grads = problem("float64", 2)
    opt = Lookahead(Adam(0.01), sync_period=3)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    d = opt.state_dict(state)
    before = opt.hyperparameters()
    for bad, exc in [({"sync_period": 0}, ValueError), ({"slow_step_size": 2.0}, ValueError),
                     ({"lookahead": 1}, KeyError),
                     ({"inner": {"optimizer": "SGD", "hyperparameters": {}}}, ValueError),
                     ({"inner": {"optimizer": "Adam", "hyperparameters": {"beta1": 2.0}}},
                      ValueError),
                     ({"inner": "Adam"}, TypeError)]:
        with pytest.raises(exc):
            opt.load_state_dict({**d, "hyperparameters": {**d["hyperparameters"], **bad}},
                                params)
        assert opt.hyperparameters() == before
    with pytest.raises(ValueError, match="learning_rate"):
        opt.set_learning_rate(-1.0)
    assert opt.get_learning_rate() == 0.01
    # a state of the inner optimizer alone is not a Lookahead state
    inner_state = Adam(0.01).init({k: v.copy() for k, v in p0.items()})
    with pytest.raises(ValueError, match="Lookahead"):
        opt.update(params, grads[0], inner_state)
    with pytest.raises(ValueError, match="slow weights"):
        opt.slow_params(inner_state)
    with pytest.raises(TypeError, match="slow_params"):
        opt.slow_params({})
    assert state.step == 0


def test_kernel_math_is_cached_and_copies_are_independent():
    opt = Lookahead(Adam(0.01), sync_period=3)
    assert opt.kernel_math() is Lookahead(Adam(0.5), sync_period=9).kernel_math()
    assert opt.kernel_math() is lookahead_math(Adam().kernel_math(), 2, len(Adam().scalars(1)), False)
    twin = copy.copy(opt)
    twin.set_learning_rate(0.5)
    assert opt.get_learning_rate() == 0.01 and twin.get_learning_rate() == 0.5
    assert "Lookahead(inner={'optimizer': 'Adam'" in repr(opt)


# ---------------------------------------------------------------------------------------------
# hyperparameters driven through the Lookahead: its own and its inner optimizer's
# ---------------------------------------------------------------------------------------------

def _driven(t: int) -> tuple[float, float]:
    """(slow_step_size, the inner's β₁) of step ``t``: what the schedules below set."""
    return 0.3 + 0.05 * t, 0.9 - 0.02 * t


@pytest.mark.parametrize("reset", [False, True])
def test_schedules_through_the_lookahead_match_optax(reset):
    """Lookahead's own ``slow_step_size`` and its inner Adam's ``beta1`` changed at every
    step through the Lookahead's handles (a scheduler's interface), on the NumPy engine and
    in the optax transformation with both traced and its scalars traced too (no host
    callback), against ``optax.inject_hyperparams(optax.lookahead)`` around an injected
    ``optax.adam`` with the same values set in its state."""
    import jax
    import jax.numpy as jnp
    import optax

    from mithril.interop import optax_transformation
    from mithril.interop.optax_hyperparams import pair

    p0, grads = problem("float32", 12)
    opt = Lookahead(Adam(0.02), sync_period=3, slow_step_size=0.3, reset_state=reset)
    slow_h, beta_h = opt.hyperparameter("slow_step_size"), opt.hyperparameter("beta1")
    assert beta_h.optimizer is opt.inner  # (the inner's own handle)
    tx = optax_transformation(opt, scalars="traced",
                              traced_hyperparams=("beta1", "slow_step_size"))
    fast = optax.inject_hyperparams(optax.adam)(learning_rate=0.02)
    ref = optax.inject_hyperparams(optax.lookahead, static_args=("sync_period", "reset_state"))(
        fast_optimizer=fast, sync_period=3, slow_step_size=0.3, reset_state=reset)

    tx_step = jax.jit(lambda g, s, p, h: tx.update(g, s, p, new_params=True, hyper=h))

    @jax.jit
    def ref_step(params, g, s):
        u, s = ref.update(g, s, params)
        return optax.apply_updates(params, u), s

    ours = {k: v.copy() for k, v in p0.items()}
    state = opt.init(ours)
    traced = {k: jnp.asarray(v) for k, v in p0.items()}
    tstate = tx.init(traced)
    theirs = optax.LookaheadParams.init_synced({k: jnp.asarray(v) for k, v in p0.items()})
    s = ref.init(theirs)
    for t in range(12):
        a, b1 = _driven(t)
        slow_h.set(a)
        beta_h.set(b1)
        ours, state = opt.update(ours, grads[t], state)
        g = {k: jnp.asarray(v) for k, v in grads[t].items()}
        hyper = np.stack([pair(b1, np.float32), pair(a, np.float32)])  # (names sorted)
        traced, tstate = tx_step(g, tstate, traced, hyper)
        s.hyperparams["slow_step_size"] = jnp.asarray(a, jnp.float32)
        s.inner_state.fast_state.hyperparams["b1"] = jnp.asarray(b1, jnp.float32)
        theirs, s = ref_step(theirs, g, s)
    assert opt.slow_step_size == pytest.approx(_driven(11)[0]) and opt.inner.beta1 == 0.68
    for k in SHAPES:
        want = np.asarray(theirs.fast[k])
        np.testing.assert_allclose(ours[k], want, rtol=2e-5, atol=2e-6, err_msg=k)
        np.testing.assert_allclose(np.asarray(traced[k]), want, rtol=2e-5, atol=2e-6, err_msg=k)
        np.testing.assert_allclose(opt.slow_params(state)[k], np.asarray(theirs.slow[k]),
                                   rtol=2e-5, atol=2e-6, err_msg=k)
    assert rel_err(ours["big"], p0["big"]) > 1e-3


def test_driving_the_lookahead_refuses_bad_values_naming_them():
    """A value the constructor refuses, or Lookahead's own per group, raises naming it and
    changes nothing."""
    opt = Lookahead(Adam(0.01, param_groups=[{"params": ["b"]}]), sync_period=3)
    with pytest.raises(ValueError, match="slow_step_size"):
        opt.hyperparameter("slow_step_size").set(1.5)
    with pytest.raises(ValueError, match="sync_period"):
        opt.hyperparameter("sync_period").set(0)
    with pytest.raises(ValueError, match="per group"):
        opt.hyperparameter("slow_step_size", group=0)
    with pytest.raises(ValueError, match="beta1"):
        opt.hyperparameter("beta1", group=0).set(1.5)
    assert (opt.slow_step_size, opt.sync_period, opt.param_groups[0]) == (
        0.5, 3, {"params": ["b"]})
    opt.hyperparameter("sync_period").set(4)
    opt.hyperparameter("beta1", group=0).set(0.8)
    assert opt.sync_period == 4 and opt.inner.param_groups[0]["beta1"] == 0.8


def test_attributes_of_the_inner_optimizer_are_reached_through_the_lookahead():
    """``la.beta1`` reads and sets the inner optimizer's (it used to set an attribute of
    the Lookahead that no step read); Lookahead's own stay its own; the learning rate's
    setter still checks; a copy's are its own."""
    opt = Lookahead(Adam(0.01), sync_period=3)
    assert (opt.beta1, opt.weight_decay, opt.amsgrad) == (0.9, 0.0, False)
    opt.beta1, opt.weight_decay, opt.slow_step_size = 0.7, 0.1, 0.6
    assert (opt.inner.beta1, opt.inner.weight_decay) == (0.7, 0.1)
    assert "beta1" not in vars(opt) and opt.slow_step_size == 0.6
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = -1.0
    assert opt.get_learning_rate() == 0.01
    twin = copy.deepcopy(opt)
    twin.beta1 = 0.5
    assert opt.beta1 == 0.7 and twin.inner.beta1 == 0.5
    with pytest.raises(AttributeError, match="no attribute 'beta3'"):
        _ = opt.beta3


@pytest.mark.parametrize("inner", ["Adam", "SGD"])
def test_momentum_cycling_drives_the_inner_optimizer(inner):
    """``OneCycleLR(..., cycle_momentum=True)`` on a Lookahead cycles its inner optimizer's
    β₁ (Adam) or momentum (SGD) with the learning rate: the values torch's scheduler gives
    its own optimizer, step by step."""
    import torch

    opt = Lookahead(Adam(0.01) if inner == "Adam" else SGD(0.01, momentum=0.9))
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=12, cycle_momentum=True)
    p = [torch.nn.Parameter(torch.zeros(2))]
    ref_opt = torch.optim.Adam(p, lr=0.01) if inner == "Adam" else \
        torch.optim.SGD(p, lr=0.01, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=12,
                                              cycle_momentum=True)
    name = "beta1" if inner == "Adam" else "momentum"
    assert sched.momentum_hyperparameter == name
    for _ in range(11):
        g = ref_opt.param_groups[0]
        want = g["betas"][0] if inner == "Adam" else g["momentum"]
        assert getattr(opt.inner, name) == pytest.approx(want, rel=1e-14, abs=0)
        assert opt.get_learning_rate() == pytest.approx(g["lr"], rel=1e-14, abs=0)
        ref_opt.step()
        ref.step()
        sched.step()
