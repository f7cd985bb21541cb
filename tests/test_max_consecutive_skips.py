"""``nonfinite="skip"`` with ``max_consecutive_skips=N`` against optax's
``apply_if_finite(optax.adam(...), max_consecutive_errors=N)``, float64, step by step on
every engine (NumPy, torch, JAX eager, the jitted JAX engine): the params, our
``num_skipped`` (+ ``num_nonfinite`` once a step was applied anyway) against optax's
``total_notfinite`` and our ``consecutive_skips`` against its ``notfinite_count``; a state
dict and a checkpoint taken in the middle of a run of skips resume bit for bit."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import run_python

from mithril.utils.optimizers import SGD, Adafactor, Adam, Lookahead

N = 2
#: per step: "f" finite, "a" NaN in tensor a, "b" +inf in tensor b, "ab" both. Runs of
#: non-finite steps of 1 and 2 (<= N: all skipped), then of 4 (> N: the 3rd and 4th
#: applied: a NaN in a param from then on), then finite gradients again
PATTERN = ["f", "f", "a", "f", "b", "ab", "f", "f", "a", "b", "a", "a", "f", "f"]
GIVE_UP = 10  # (0-based) the first step applied anyway: the 3rd of the run of 4

_SCRIPT = r"""
import json, os, warnings
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, optax, torch
from mithril.utils.optimizers import Adam

N, PATTERN, ENGINES, CUT = __N__, __PATTERN__, __ENGINES__, __CUT__
warnings.simplefilter("ignore")
rng = np.random.default_rng(0)
p0 = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
grads = []
for kind in PATTERN:
    g = {k: rng.normal(size=v.shape) for k, v in p0.items()}
    if "a" in kind:
        g["a"][1, 2] = np.nan
    if "b" in kind:
        g["b"][0] = np.inf
    grads.append(g)

tx = optax.apply_if_finite(optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-8), N)
ps = {k: jnp.asarray(v) for k, v in p0.items()}
s = tx.init(ps)
ref = []
for g in grads:
    u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, ps)
    ps = optax.apply_updates(ps, u)
    ref.append((np.concatenate([np.asarray(ps[k]).ravel() for k in "ab"]),
                int(s.notfinite_count), int(s.total_notfinite), bool(s.last_finite),
                int(s.inner_state[0].count)))

conv = {"numpy": lambda a: np.array(a), "torch": lambda a: torch.tensor(a),
        "jax": lambda a: jnp.asarray(a)}
def flat(p):
    return np.concatenate([np.asarray(p[k].detach() if hasattr(p[k], "detach") else p[k],
                                      dtype=np.float64).ravel() for k in "ab"])

def run(kind, cut):
    opt = Adam(0.05, beta1=0.9, beta2=0.99, epsilon=1e-8, nonfinite="skip",
               max_consecutive_skips=N)
    p = {k: conv[kind](v) for k, v in p0.items()}
    st = opt.init(p)
    rows = []
    for i, g in enumerate(grads):
        if i == cut:  # a state dict mid-run: a fresh optimizer resumes from it
            sd = opt.state_dict(st)
            p = {k: conv[kind](flat_k) for k, flat_k in
                 ((k, np.array(np.asarray(p[k].detach() if hasattr(p[k], "detach") else p[k])))
                  for k in "ab")}
            opt = Adam(0.05, nonfinite="skip", max_consecutive_skips=N)
            st = opt.load_state_dict(sd, p)
            rows.append(("resumed", sd["consecutive_skips"]))
        p, st = opt.update(p, {k: conv[kind](v) for k, v in g.items()}, st)
        rows.append((flat(p).tolist(), st.consecutive_skips, st.num_skipped,
                     st.num_nonfinite, st.last_step_skipped, st.step))
    return rows

out = {"ref": [(r[0].tolist(), *r[1:]) for r in ref]}
for kind in ENGINES:
    plain, cut = run(kind, None), run(kind, CUT)
    out[kind] = plain
    out[kind + "/resumed"] = cut
print(json.dumps(out))
"""


def _run(engines: list[str], env: dict[str, str] | None = None) -> dict:
    code = (_SCRIPT.replace("__N__", str(N)).replace("__PATTERN__", repr(PATTERN))
            .replace("__ENGINES__", repr(engines)).replace("__CUT__", str(GIVE_UP)))
    return json.loads(run_python(code, timeout=300, env=env).strip().splitlines()[-1])


def _same(a: list[float], b: list[float], tol: float) -> bool:
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return bool((np.isnan(a) == np.isnan(b)).all()
                and np.allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=0, atol=tol))


def _check_against_optax(out: dict, kind: str) -> None:
    ref, ours = out["ref"], out[kind]
    for i, (r, o) in enumerate(zip(ref, ours)):
        r_params, notfinite_count, total_notfinite, last_finite, inner_count = r
        params, consecutive, skipped, nonfinite, last_skipped, step = o
        assert _same(params, r_params, 1e-12), (kind, i)
        assert step == inner_count, (kind, i)  # a skipped step leaves the count
        if i <= GIVE_UP + 1:  # (optax's count restarts at a finite gradient: see below)
            assert consecutive == notfinite_count, (kind, i, consecutive, notfinite_count)
            assert skipped + nonfinite == total_notfinite, (kind, i)
        if i < GIVE_UP:  # every non-finite step skipped so far
            assert skipped == total_notfinite and nonfinite == 0, (kind, i)
            assert last_skipped == (not last_finite), (kind, i)
        else:  # from the give-up on, every step applied (a param NaN)
            assert not last_skipped and skipped == 5, (kind, i)
            assert nonfinite == min(i - GIVE_UP + 1, 2), (kind, i)  # (NaN params: once)
            assert int(np.isnan(params).sum()) == 1  # (a[1, 2]'s: Adam is elementwise)
    # after the run of 4, finite gradients: optax (gradients only) starts again at 0, the
    # params NaN all the same; here the steps stay non-finite (NaN results) and counted
    assert [r[1] for r in ref[GIVE_UP + 2:]] == [0, 0]
    assert [o[1] for o in ours[GIVE_UP + 2:]] == [5, 6]
    # the state dict taken after the run's first two skips (consecutive_skips 2, at the
    # limit) resumes bit for bit: the next step is applied there too
    resumed = out[kind + "/resumed"]
    assert resumed[GIVE_UP] == ["resumed", 2]
    assert resumed[:GIVE_UP] + resumed[GIVE_UP + 1:] == ours


def test_vs_optax_apply_if_finite_numpy_torch_jax_eager():
    out = _run(["numpy", "torch", "jax"], env={"MITHRIL_JAX_ENGINE": "auto"})
    # the reference itself: runs of 1 and 2 skipped, the 3rd and 4th of 4 applied
    assert [r[1] for r in out["ref"]] == [0, 0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 0]
    assert [r[2] for r in out["ref"]] == [0, 0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 7, 7]
    assert [r[4] for r in out["ref"]] == [1, 2, 2, 3, 3, 3, 4, 5, 5, 5, 6, 7, 8, 9]
    for kind in ("numpy", "torch", "jax"):
        _check_against_optax(out, kind)


def test_vs_optax_apply_if_finite_jax_jit():
    out = _run(["jax"], env={"MITHRIL_JAX_ENGINE": "jit"})
    _check_against_optax(out, "jax")


def _grads(kind: str) -> dict[str, np.ndarray]:
    g = {"w": np.full(4, 0.5)}
    if kind != "f":
        g["w"][1] = np.nan
    return g


def test_checkpoint_mid_run_and_old_state_dicts(tmp_path):
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    def steps(opt, p, st, kinds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for k in kinds:
                p, st = opt.update(p, _grads(k), st)
        return p, st

    opt = SGD(0.1, nonfinite="skip", max_consecutive_skips=3)
    p, st = steps(opt, {"w": np.ones(4)}, opt.init({"w": np.ones(4)}), ["f", "a", "a"])
    assert (st.consecutive_skips, st.num_skipped, st.step) == (2, 2, 1)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, st)
    opt2 = SGD(0.1, nonfinite="skip", max_consecutive_skips=3)
    got = load_checkpoint(tmp_path / "c.safetensors", params_template=p, optimizer=opt2)
    assert got["state"].consecutive_skips == 2
    # one more skip each, then the 4th in a row applied: the same NaN params
    a = steps(opt, p, st, ["a", "a"])
    b = steps(opt2, got["params"], got["state"], ["a", "a"])
    assert a[1].consecutive_skips == b[1].consecutive_skips == 4
    assert a[1].num_skipped == b[1].num_skipped == 3
    assert np.array_equal(a[0]["w"], b[0]["w"], equal_nan=True) and np.isnan(a[0]["w"][1])
    # a state dict from before the count was kept loads with 0
    sd = opt.state_dict(st)
    del sd["consecutive_skips"]
    assert SGD(0.1, nonfinite="skip").load_state_dict(sd, p).consecutive_skips == 0
    sd["consecutive_skips"] = -1
    with pytest.raises(ValueError, match="consecutive_skips"):
        opt2.load_state_dict(sd, p)


def test_refused_by_name_and_nothing_changed():
    with pytest.raises(ValueError, match="max_consecutive_skips=2 needs nonfinite='skip'"):
        Adam(max_consecutive_skips=2)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        Adam(nonfinite="raise", max_consecutive_skips=0)
    with pytest.raises(ValueError, match="max_consecutive_skips must be an integer >= 0"):
        Adam(nonfinite="skip", max_consecutive_skips=-1)
    with pytest.raises(TypeError, match="max_consecutive_skips must be an integer"):
        Adam(nonfinite="skip", max_consecutive_skips=2.0)
    with pytest.raises(ValueError, match="max_consecutive_skips.*whole step"):
        Adam(nonfinite="skip", max_consecutive_skips=2,
             param_groups=[{"params": ["w"], "max_consecutive_skips": 3}])
    opt = Adam(nonfinite="skip", max_consecutive_skips=2)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        opt.nonfinite = "propagate"  # would leave a count no step reads
    assert opt.nonfinite == "skip" and opt.max_consecutive_skips == 2
    assert opt.hyperparameters()["max_consecutive_skips"] == 2


def test_zero_applies_every_step_and_lookahead_delegates():
    # N = 0: optax applies every step (its count 1 > 0) and still counts them
    opt = SGD(0.1, nonfinite="skip", max_consecutive_skips=0)
    p = {"w": np.ones(4)}
    st = opt.init(p)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p, st = opt.update(p, _grads("a"), st)
    said = [str(w.message) for w in seen]
    assert len(said) == 2 and "non-finite gradient (global norm nan) applied" in said[0]
    assert "1 non-finite steps in a row (max_consecutive_skips=0): step 1 applied" in said[1]
    assert (st.step, st.num_skipped, st.consecutive_skips, st.num_nonfinite) == (1, 0, 1, 1)
    assert np.isnan(p["w"][1]) and p["w"][0] == pytest.approx(0.95, abs=1e-15)
    # a Lookahead's policy is its inner's: the given-up step runs through it once
    la = Lookahead(SGD(0.1, nonfinite="skip", max_consecutive_skips=1), sync_period=2)
    p = {"w": np.ones(4)}
    st = la.init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p, st = la.update(p, _grads("f"), st)
        p, st = la.update(p, _grads("a"), st)
        assert (st.step, st.num_skipped, st.consecutive_skips) == (1, 1, 1)
        p, st = la.update(p, _grads("a"), st)
    assert (st.step, st.num_skipped, st.consecutive_skips) == (2, 1, 2)
    assert la.nonfinite == "skip" and np.isnan(p["w"][1])


_TRACED = r"""
import json, warnings
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, optax
from mithril.interop import optax_transformation
from mithril.utils.optimizers import Adam
from mithril.utils.optimizers.adafactor import Adafactor

N, PATTERN = __N__, __PATTERN__
warnings.simplefilter("ignore")
rng = np.random.default_rng(1)
p0 = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(5,)))}
grads = []
for kind in PATTERN:
    g = {k: rng.normal(size=v.shape) for k, v in p0.items()}
    if "a" in kind:
        g["a"][1, 2] = np.nan
    if "b" in kind:
        g["b"][0] = np.inf
    grads.append({k: jnp.asarray(v) for k, v in g.items()})

def run(tx, count_of):
    up = jax.jit(tx.update)
    p, s, rows = p0, tx.init(p0), []
    for g in grads:
        u, s = up(g, s, p)
        p = optax.apply_updates(p, u)
        rows.append((np.concatenate([np.asarray(p[k]).ravel() for k in "ab"]).tolist(),
                     *count_of(s)))
    return rows

def ours(s):
    return int(s.hyperparams["consecutive_skips"]), int(s.count)

def theirs(s):
    inner = s.inner_state
    return int(s.notfinite_count), int(inner.count if type(inner).__name__ == "OptaxState"
                                         else inner[0].count)  # (optax.adam's: a chain)

out = {
    "adam": run(optax_transformation(Adam(0.05, beta1=0.9, beta2=0.99, epsilon=1e-8,
                                          nonfinite="skip", max_consecutive_skips=N)), ours),
    "adam/ref": run(optax.apply_if_finite(optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-8), N),
                    theirs),
    # tensorwise (Adafactor): against optax's wrapper around our own transformation
    "adafactor": run(optax_transformation(Adafactor(0.05, nonfinite="skip",
                                                    max_consecutive_skips=N)), ours),
    "adafactor/ref": run(optax.apply_if_finite(optax_transformation(Adafactor(0.05)), N),
                         theirs),
}
print(json.dumps(out))
"""


def test_optax_transformation_under_jit_vs_apply_if_finite():
    code = _TRACED.replace("__N__", str(N)).replace("__PATTERN__", repr(PATTERN))
    out = json.loads(run_python(code, timeout=300).strip().splitlines()[-1])
    for name in ("adam", "adafactor"):
        ours, ref = out[name], out[name + "/ref"]
        assert len(ours) == len(ref) == len(PATTERN)
        for i, (o, r) in enumerate(zip(ours, ref)):
            assert _same(o[0], r[0], 1e-12), (name, i)
            assert o[2] == r[2], (name, i)  # the step count: a skipped step leaves it
            if i <= GIVE_UP + 1:
                assert o[1] == r[1], (name, i, o[1], r[1])
        assert [o[1] for o in ours] == [0, 0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6], name
        assert [o[2] for o in ours] == [1, 2, 2, 3, 3, 3, 4, 5, 5, 5, 6, 7, 8, 9], name
        assert np.isnan(ours[GIVE_UP][0]).any() and not np.isnan(ours[GIVE_UP - 1][0]).any()


def test_make_train_step_jax_vs_separate_calls():
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.training import make_train_step

    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    good = {"input": np.ones((4, 3), np.float32), "target": np.zeros((4, 2), np.float32)}
    bad = {"input": np.full((4, 3), np.inf, np.float32), "target": good["target"]}
    batches = [good, bad, good, bad, bad, good, bad, bad, bad, bad]
    b = JaxBackend()
    c = ml.compile(m, b, shapes={"input": [None, 3]})

    def run(fused: bool, upto: int | None = None, resume: bool = False):
        step = make_train_step(c, Adam(1e-2, nonfinite="skip", max_consecutive_skips=N),
                               loss="loss")
        p = {k: b.array(np.full(tuple(v.shape), 0.3, np.float32))
             for k, v in c.get_parameters().items()}
        s = step.init(p) if fused else step.optimizer.init(p)
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for i, d in enumerate(batches[:upto]):
                if resume and i == 8:  # mid-run of skips: through an OptimizerState
                    s = step.from_optimizer_state(step.to_optimizer_state(s, p))
                p, s, _ = step(p, s, {k: b.array(v) for k, v in d.items()})
                st = step.to_optimizer_state(s, p) if fused else s
                rows.append((np.concatenate([np.asarray(v).ravel() for v in p.values()]),
                             st.step, st.num_skipped, st.consecutive_skips))
        return step, rows

    step, fused = run(True)
    assert step.fused
    _, plain = run(False)
    _, resumed = run(True, resume=True)
    for i, (f, q, r) in enumerate(zip(fused, plain, resumed)):
        assert f[1:] == q[1:] == r[1:], i
        np.testing.assert_allclose(f[0], q[0], rtol=1e-6, atol=0)
        assert np.array_equal(f[0], r[0], equal_nan=True), i
    # runs of 1 and 2 skipped; of 4: the 3rd and 4th applied (the params NaN)
    assert [r[3] for r in plain] == [0, 1, 0, 1, 2, 0, 1, 2, 3, 4]
    assert [r[2] for r in plain] == [0, 1, 1, 2, 3, 3, 4, 5, 5, 5]
    assert np.isnan(plain[-2][0]).all() and np.isfinite(plain[-3][0]).all()


@pytest.mark.parametrize("fused", [True, False])
def test_a_tensorwise_optimizer_gives_up_as_the_others(fused: bool) -> None:
    """Adafactor's own update (its numba kernel, or per tensor) counts a run of non-finite
    steps and applies the one after ``max_consecutive_skips`` as every optimizer does (it
    skipped them all before); the params up to it as optax's ``apply_if_finite`` around
    its transformation."""
    import jax.numpy as jnp
    import optax

    from mithril.interop import optax_transformation

    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    grads = []
    for kind in ["f", "a", "a", "f"]:
        g = {k: rng.normal(size=v.shape) for k, v in p.items()}
        if kind == "a":
            g["b"][1] = np.nan
        grads.append(g)
    tx = optax.apply_if_finite(optax_transformation(Adafactor(0.05)), 1)
    ref = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    s = tx.init(ref)
    opt = Adafactor(0.05, nonfinite="skip", max_consecutive_skips=1, fused=fused)
    st = opt.init(p)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, g in enumerate(grads):
            p, st = opt.update(p, g, st)
            rows.append((st.step, st.num_skipped, st.consecutive_skips, st.num_nonfinite))
            if i < 3:
                u, s = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, s,
                                 ref)
                ref = optax.apply_updates(ref, u)
                for k in p:
                    np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-6,
                                               err_msg=f"{k} after step {i}")
    # (the last: finite gradients, but b[1] is NaN since the applied step: still counted)
    assert rows == [(1, 0, 0, 0), (1, 1, 1, 0), (2, 1, 2, 1), (3, 1, 3, 1)]
    assert int(np.isnan(p["b"]).sum()) == 1 and np.isfinite(p["w"]).all()
