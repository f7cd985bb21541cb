"""Loss-aware optimizers (``needs_loss``: PolyakSGD, Momo, MomoAdam) under the wrappers,
side by side with optax in float64 (to 1e-12, relative, floored at 1e-3 of the tensor's
scale) on NumPy, torch and the jitted JAX engine:

* ``Accumulate(opt, k)`` against ``optax.MultiSteps(tx, k)``: both give the window's step
  the ``value=`` / ``loss=`` of its last call (optax's inner update runs with the applying
  call's extra arguments), each micro-batch's loss at its own rows;
* ``Lookahead(opt)`` against ``optax.lookahead(tx)`` with ``value=`` passed to the fast
  optimizer (the loss at the fast params, as optax's ``params.fast``). optax 0.2.8's
  ``lookahead`` is a plain ``GradientTransformation``: its update takes no ``value=``
  (a ``TypeError``), so the reference binds each step's value into the fast optimizer's
  update (:func:`bound`), which is what passing it through would do.

JAX float64 needs the process-global ``jax_enable_x64``: one fresh interpreter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_python

from mithril.utils.accumulation import Accumulate
from mithril.utils.optimizers import SGD, Lookahead, Momo, PolyakSGD

TOL = 1e-12

_SCRIPT = r"""
import json
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib as oc
import torch
import mithril.utils.optimizers.engines as engines
from mithril.utils.accumulation import Accumulate
from mithril.utils.optimizers import (DAdaptAdamW, DoG, Lookahead, Momo, MomoAdam,
                                      PolyakSGD)

K, WINDOWS = 3, 5
rng = np.random.default_rng(0)
X, Y = rng.standard_normal((40, 5)), rng.standard_normal((40, 3))
P0 = {"W": rng.standard_normal((3, 5)), "b": rng.standard_normal(3)}


def loss_and_grads(p, t):  # mean squared residual on micro-batch t's 10 rows
    x, y = X[10 * (t % 4):10 * (t % 4) + 10], Y[10 * (t % 4):10 * (t % 4) + 10]
    W, b = np.asarray(p["W"], np.float64), np.asarray(p["b"], np.float64)
    r = x @ W.T + b - y
    return float(np.mean(r * r)), {"W": 2 * r.T @ x / r.size, "b": 2 * r.sum(0) / r.size}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    floor = 1e-3 * max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor), initial=0.0))


INNER = {
    "polyak": (lambda: PolyakSGD(0.7, max_learning_rate=5.0, f_min=0.05),
               lambda: optax.polyak_sgd(5.0, 0.7, f_min=0.05)),
    "momo": (lambda: Momo(0.8, beta=0.8, lower_bound=0.1, weight_decay=0.05,
                          adapt_lower_bound=True),
             lambda: oc.momo(0.8, 0.8, 0.1, 0.05, True)),
    "momo_adam": (lambda: MomoAdam(0.1, beta1=0.8, beta2=0.99, epsilon=1e-6,
                                   lower_bound=0.05, weight_decay=0.05, adapt_lower_bound=True),
                  lambda: oc.momo_adam(0.1, 0.8, 0.99, 1e-6, 0.05, 0.05, True)),
    # two-pass optimizers that take no loss (optimizer-wide values from sums)
    "dadapt_adamw": (lambda: DAdaptAdamW(1.0, estim_lr0=1e-2, weight_decay=0.05),
                     lambda: oc.dadapt_adamw(1.0, estim_lr0=1e-2, weight_decay=0.05)),
    "dog": (lambda: DoG(0.5, init_step=("heuristic", 1e-2)),
            lambda: oc.dog(0.5, init_step=("heuristic", 1e-2))),
}
LOSSLESS = ("dadapt_adamw", "dog")
WRAP = {
    # (optax 0.2.8 accumulates in float32 unless told: 1.5e-8 off after one window)
    "accumulate": (lambda o: Accumulate(o, K),
                   lambda tx: optax.MultiSteps(tx, K, accumulator_dtype=jnp.float64)),
    "lookahead": (lambda o: Lookahead(o, sync_period=3, slow_step_size=0.5),
                  lambda tx: optax.lookahead(tx, 3, 0.5)),
}


def bound(tx, value):  # tx (an ExtraArgs transformation) with value= bound: a plain one
    return optax.GradientTransformation(
        tx.init, lambda u, s, p=None: tx.update(u, s, p, value=value))


def reference(wrap, inner):
    look = wrap.startswith("lookahead")
    if inner in LOSSLESS:
        tx = WRAP[wrap][1](INNER[inner][1]())
        tx_at = lambda v: tx
    elif look:  # (optax.lookahead passes no value=: bound into its fast optimizer per step)
        tx_at = lambda v: WRAP[wrap][1](bound(INNER[inner][1](), v))
    else:
        tx = WRAP[wrap][1](INNER[inner][1]())
        tx_at = lambda v: tx
    tx = tx_at(0.0)
    plain = look or inner in LOSSLESS

    @jax.jit
    def step(params, g, s, value):
        t = tx_at(value)
        u, s = t.update(g, s, params) if plain else t.update(g, s, params, value=value)
        return optax.apply_updates(params, u), s

    params = {k: jnp.asarray(v) for k, v in P0.items()}
    if look:
        params = optax.LookaheadParams.init_synced(params)
    s = tx.init(params)
    out = []
    for t in range(K * WINDOWS):
        fast = params.fast if look else params
        f, g = loss_and_grads(fast, t)
        g = {k: jnp.asarray(v) for k, v in g.items()}  # (of the fast params)
        params, s = step(params, g, s, f)
        fast = params.fast if look else params
        out.append({k: np.array(v) for k, v in fast.items()})
    return out


def ours(wrap, inner, path, scale=1.0):
    opt = WRAP[wrap][0](INNER[inner][0]())
    engines.JAX_ENGINE = "jit" if path == "jax-jit" else "auto"
    conv = {"numpy": np.array, "torch": torch.tensor, "jax-jit": jnp.asarray}[path]
    params = {k: conv(v) for k, v in P0.items()}
    state = opt.init(params)
    for t in range(K * WINDOWS):
        f, g = loss_and_grads({k: np.array(v) for k, v in params.items()}, t)
        f *= scale
        loss = {"numpy": np.float64(f), "torch": torch.tensor(f, dtype=torch.float64),
                "jax-jit": jnp.asarray(f)}[path]
        params, state = opt.update(params, {k: conv(v) for k, v in g.items()}, state,
                                   **({"loss": loss} if opt.needs_loss else {}))
        yield {k: np.array(v) for k, v in params.items()}


res = {}
for wrap in WRAPS:
    for inner in INNERS:
        want = reference(wrap, inner)
        moved = max(rel_err(want[-1][k], P0[k]) for k in P0)
        # (how far a loss 1% off takes ours: the loss is used)
        off = list(ours(wrap, inner, "numpy", 1.01))[-1] if inner not in LOSSLESS else P0
        moved = [moved, max(rel_err(off[k], want[-1][k]) for k in P0)]
        for path in ("numpy", "torch", "jax-jit"):
            try:
                errs = [max(rel_err(g[k], w[k]) for k in w)
                        for g, w in zip(ours(wrap, inner, path), want, strict=True)]
                res[f"{wrap}/{inner}/{path}"] = [max(errs), *moved]
            except Exception as e:
                res[f"{wrap}/{inner}/{path}"] = f"{type(e).__name__}: {e}"
print(json.dumps(res))
"""

#: the wrappers compared
WRAPS = ("accumulate", "lookahead")
#: the inner optimizers of the default suite; the others: @slow
FAST = ("momo", "dadapt_adamw")
SLOW = ("polyak", "momo_adam", "dog")


def _parity(inners: tuple[str, ...]) -> dict:
    out = run_python(f"WRAPS = {WRAPS!r}\nINNERS = {inners!r}\n" + _SCRIPT, timeout=600)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parity() -> dict:
    return _parity(FAST)


@pytest.fixture(scope="module")
def parity_slow() -> dict:
    return _parity(SLOW)


@pytest.mark.parametrize("path", ["numpy", "torch", "jax-jit"])
@pytest.mark.parametrize("inner", FAST)
@pytest.mark.parametrize("wrap", WRAPS)
def test_wrapper_matches_optax(parity, wrap, inner, path) -> None:
    _check(parity, wrap, inner, path)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["numpy", "torch", "jax-jit"])
@pytest.mark.parametrize("inner", SLOW)
@pytest.mark.parametrize("wrap", WRAPS)
def test_wrapper_matches_optax_all(parity_slow, wrap, inner, path) -> None:
    _check(parity_slow, wrap, inner, path)


def _check(parity: dict, wrap: str, inner: str, path: str) -> None:
    got = parity[f"{wrap}/{inner}/{path}"]
    assert not isinstance(got, str), got
    err, moved, off = got
    assert moved > 0.05  # (the params moved: the comparison means something)
    if inner not in ("dadapt_adamw", "dog"):
        assert off > 1e-4  # (and they depend on the loss given)
    assert err <= TOL, (wrap, inner, path, err)


def _params() -> dict[str, np.ndarray]:
    return {"w": np.array([1.0, -2.0, 0.5]), "b": np.array([0.3])}


@pytest.mark.parametrize("loss, error, match", [
    (None, TypeError, "Momo.update needs loss="),
    (float("nan"), ValueError, "loss=nan is not finite"),
    (np.ones(2), ValueError, r"loss must be a scalar \(0-d\), got shape \(2,\)"),
    ("1.0", TypeError, "loss must be a real number"),
])
@pytest.mark.parametrize("call", [0, 1])
def test_accumulate_checks_the_loss_on_every_call(loss, error, match, call) -> None:
    """A bad or missing loss is refused on a buffering call and on the window's last, before
    anything is written: the buffer, its count and the inner state stay as they were."""
    acc = Accumulate(Momo(0.5), 2)
    p = _params()
    st = acc.init(p)
    g = {k: v * 0.1 for k, v in p.items()}
    if call:
        p, st = acc.update(p, g, st, loss=1.0)
    before = (st.accumulator.count, st.inner.step, dict(st.inner.values))
    with pytest.raises(error, match=match):
        acc.update(p, g, st, loss=loss)
    assert (st.accumulator.count, st.inner.step, dict(st.inner.values)) == before
    p, st = acc.update(p, g, st, loss=2.0)
    assert st.accumulator.count == (0 if call else 1)


def test_accumulate_passes_the_last_calls_loss() -> None:
    """The window's step takes its last call's loss (optax.MultiSteps' ``value=``), not a
    mean: a loss-aware optimizer's step is that of the bare optimizer given that loss."""
    acc, bare = Accumulate(PolyakSGD(0.5), 2), PolyakSGD(0.5)
    p = _params()
    st, sb = acc.init(p), bare.init(p)
    g1, g2 = {k: v * 0.1 for k, v in p.items()}, {k: v * 0.3 for k, v in p.items()}
    q, st = acc.update(p, g1, st, loss=5.0)
    q, st = acc.update(q, g2, st, loss=0.25)
    want, sb = bare.update(p, {k: (g1[k] + g2[k]) / 2 for k in p}, sb, loss=0.25)
    assert st.applied and st.inner.values["loss"] == 0.25
    for k in p:
        np.testing.assert_allclose(q[k], want[k], rtol=1e-15)
    assert acc.needs_loss and not Accumulate(SGD(0.1), 2).needs_loss


def test_accumulate_refuses_a_loss_its_optimizer_does_not_take() -> None:
    acc = Accumulate(SGD(0.1), 2)
    p = _params()
    st = acc.init(p)
    with pytest.raises(TypeError, match="Accumulate.update: SGD takes no loss="):
        acc.update(p, p, st, loss=1.0)
    assert st.accumulator.count == 0


def test_lookahead_takes_its_inner_optimizers_loss() -> None:
    """``needs_loss`` is the inner optimizer's (what make_train_step and the wrappers read):
    a missing loss is refused, naming it, nothing changed; then the step runs."""
    opt = Lookahead(Momo(0.5), sync_period=2)
    assert opt.needs_loss and not Lookahead(SGD(0.1)).needs_loss
    p = _params()
    st = opt.init(p)
    with pytest.raises(TypeError, match="Lookahead.update needs loss="):
        opt.update(p, p, st)
    assert st.step == 0 and st.values["loss"] == 0.0
    q, st = opt.update(p, p, st, loss=2.0)
    assert st.step == 1 and st.values["loss"] == 2.0 and not np.array_equal(q["w"], p["w"])
    # (a sync would not restart Momo's values, as optax's fast_optimizer.init does)
    with pytest.raises(TypeError, match=r"reset_state=True: Momo keeps \['barf'"):
        opt.reset_state = True
    assert opt.reset_state is False
