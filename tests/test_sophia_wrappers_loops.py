"""Sophia inside the optimizer wrappers in whole training loops: a Hutchinson loop on a
compiled model through ScheduleFree against optax's ``obj_fn``, ``make_train_step`` and the
torch drop-in of a Lookahead(Sophia), a Lookahead(Sophia) with weight averages against
``optax.lookahead`` and torch's ``AveragedModel``, and the CLI. (The compositions step by
step: ``test_sophia_wrappers.py``.)
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import jax_float64
from test_sophia import jnp_loss, mlp_model
from test_sophia_wrappers import (
    SOPHIA,
    WIN,
    curvature,
    err,
    folded_step,
    jx,
    optax_lookahead,
    optax_sophia,
    problem,
)

import mithril as ml
from mithril.backends import JaxBackend, TorchBackend
from mithril.interop import torch_optimizer
from mithril.utils.checkpoint import load_checkpoint
from mithril.utils.hessian import hutchinson_diagonal
from mithril.utils.optimizers import Lookahead, ScheduleFree, Sophia
from mithril.utils.training import make_train_step


# -- Hutchinson on a compiled model, obj_fn through optax's wrapper --------------------------------
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_schedule_free_hutchinson_loop_equals_optax_obj_fn(backend):
    """ScheduleFree(Sophia) on a compiled model, Hutchinson's estimate at the params given to
    the update on the due steps (key split as optax's estimator splits it): optax's
    ``schedule_free(sophia)`` with its default Hutchinson estimator and ``obj_fn`` handed
    through ``update``, same key, 12 steps."""
    k, rng = 3, np.random.default_rng(0)
    with jax_float64():
        be = {"jax": JaxBackend, "torch": TorchBackend}[backend](dtype="float64")
        c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
        p0 = {n: rng.standard_normal(s) * 0.5 for n, s in c.parameter_shapes.items()}
        batches = [(rng.standard_normal((8, 4)), rng.integers(0, 3, 8)) for _ in range(12)]
        key0 = jax.random.PRNGKey(3)
        tx = optax.contrib.schedule_free(optax.contrib.sophia(
            0.05, update_interval=k, gamma=0.05,
            hessian_diagonal_fn=optax.contrib.hutchinson_estimator_diag_hessian(key0)), 0.05)
        pj = jx(p0)
        st, theirs = tx.init(pj), []
        for x, y in batches:
            obj = functools.partial(jnp_loss, x=jnp.asarray(x), y=jnp.asarray(y))
            u, st = tx.update(jax.grad(obj)(pj), st, pj, obj_fn=obj)
            pj = optax.apply_updates(pj, u)
            theirs.append(pj)

        sf = ScheduleFree(Sophia(0.05, update_interval=k, gamma=0.05))
        p = {n: be.array(v) for n, v in p0.items()}
        state, key, folds = sf.init(p), key0, 0
        for t, (x, y) in enumerate(batches):
            data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
            _, g = c.evaluate(p, data, output_gradients={"loss": 1.0})
            h = None
            if sf.hessian_due(state):
                key, sub = jax.random.split(key)
                h = hutchinson_diagonal(c, p, data, sub, loss="loss")
            p, state = sf.update(p, g, state)
            if h is not None:
                state = sf.update_hessian(state, h)
                folds += 1
            assert err(p, theirs[t]) <= 1e-12, t
    assert folds == 4 and err(p, p0) > 1e-3


def test_make_train_step_and_torch_drop_in_of_lookahead_sophia(capfd):
    """make_train_step(Lookahead(Sophia, reset_state)) on JAX (its opt_state an OptaxState:
    update_hessian gives a new one, win_rate reads it) and torch_optimizer(Lookahead(Sophia))
    (its mithril_state changed in place): optax.lookahead(sophia) (its printed win rates),
    the estimate curvature() of the params the step was given."""
    rng = np.random.default_rng(2)
    with jax_float64():
        be = JaxBackend(dtype="float64")
        c = ml.compile(mlp_model(), be, shapes={"input": [8, 4]})
        p0 = {n: rng.standard_normal(s) * 0.5 for n, s in c.parameter_shapes.items()}
        batches = [(rng.standard_normal((8, 4)), rng.integers(0, 3, 8)) for _ in range(10)]
        tx = optax.lookahead(optax_sophia(**WIN, verbose=True, print_win_rate_every_n_steps=1),
                             3, 0.5, reset_state=True)
        pj = optax.LookaheadParams.init_synced(jx(p0))
        st, theirs = tx.init(pj), []
        capfd.readouterr()
        for x, y in batches:
            g = jax.grad(jnp_loss)(pj.fast, jnp.asarray(x), jnp.asarray(y))
            u, st = tx.update(g, st, pj)
            pj = optax.apply_updates(pj, u)
            theirs.append(pj.fast)
        jax.effects_barrier()
        printed = [float(x) for x in re.findall(r"Sophia optimizer win rate: (\S+)",
                                                capfd.readouterr().out)]

        la = Lookahead(Sophia(0.05, **WIN), 3, 0.5, reset_state=True)
        step = make_train_step(c, la, loss="loss")
        p = jx(p0)
        opt_state, folds = step.init(p), 0
        for t, (x, y) in enumerate(batches):
            data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
            due = la.hessian_due(opt_state)
            h = jx(curvature(p))
            p, opt_state, _ = step(p, opt_state, data)
            if (t + 1) % 3:  # (not a sync, which restarts the inner state)
                assert abs(la.win_rate(opt_state) - printed[t]) <= 1e-12, t
            if due:
                opt_state = la.update_hessian(opt_state, h)
                folds += 1
            assert err(p, theirs[t]) <= 1e-12, t
        assert folds == 4 and len(printed) == 10 and max(printed) > 0

    p0, grads = problem(14)
    theirs = optax_lookahead(False, p0, grads)
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    la = Lookahead(Sophia(0.05, **SOPHIA), 3, 0.5)
    opt = torch_optimizer(la, list(params.items()))
    for t, g in enumerate(grads):
        due = opt.mithril_state is None or la.hessian_due(opt.mithril_state)
        h = curvature({k: v.detach().numpy().copy() for k, v in params.items()})
        for k, v in params.items():
            v.grad = torch.tensor(g[k])
        opt.step()
        if due:
            la.update_hessian(opt.mithril_state, {k: torch.tensor(v) for k, v in h.items()})
        assert err(params, theirs[t][0]) <= 1e-12, t


def test_lookahead_of_sophia_with_an_ema_equals_optax_and_torch_averaged_model():
    """Lookahead(Sophia(ema_decay, swa_start)): the fast weights optax.lookahead(sophia)'s,
    the averages torch's AveragedModel (EMA: get_ema_multi_avg_fn; SWA: the mean from step
    5) updated with those fast weights after each step, the estimate folded in through
    the Lookahead (the averages are slots beside ν and the slow weights)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    p0, grads = problem(15)
    theirs = optax_lookahead(False, p0, grads)
    la = Lookahead(Sophia(0.05, ema_decay=0.9, swa_start=5, **SOPHIA), 3, 0.5)
    module = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.tensor(v))
                                     for k, v in p0.items()})
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    swa = AveragedModel(module)
    p = {k: v.copy() for k, v in p0.items()}
    state = la.init(p)
    for t, g in enumerate(grads, 1):
        p, state, _ = folded_step(la, p, g, state)
        with torch.no_grad():
            for k, v in module.items():
                v.copy_(torch.tensor(theirs[t - 1][0][k]))
        ema.update_parameters(module)
        if t >= 5:
            swa.update_parameters(module)
            assert err(la.swa_params(state), dict(swa.module.items())) <= 1e-12, t
        assert err(p, theirs[t - 1][0]) <= 1e-12, t
        assert err(la.ema_params(state), dict(ema.module.items())) <= 1e-12, t
    assert set(state.slots) == {"m", "nu", "slow", "ema", "swa"}


# -- the CLI ----------------------------------------------------------------------------------------
def test_cli_trains_lookahead_around_sophia(tmp_path):
    from test_cli_resume import _table, _train

    out = tmp_path / "run"
    assert _train("--data", str(_table(tmp_path / "t.csv")), "--optimizer",
                  "lookahead:inner=sophia", "--target", "label", "--batch-size", "8",
                  "--hidden", "6", "--lr", "0.01", "--scheduler", "none", "--no-progress",
                  "--no-plot", "--checkpoint", "--epochs", "1", "--out", str(out)) == 0
    nu = load_checkpoint(out / "checkpoint.safetensors")["optimizer_state_dict"]["slots"]["nu"]
    assert max(float(np.abs(v).max()) for v in nu.values()) > 1e-3
