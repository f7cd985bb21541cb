"""``Accumulate.state_dict`` / ``load_state_dict`` (in memory, mid-window), the wrapped
optimizer's state readers on the accumulated state, and the two window counts
(``state.windows``, optax.MultiSteps' ``gradient_step``; ``state.step``, the applied steps)
after a skipped window, side by side with optax.MultiSteps and a torch accumulation loop,
in float64."""

from __future__ import annotations

import io

import numpy as np
import optax
import pytest
import torch
from conftest import jax_float64_results

from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.accumulation import Accumulate, AccumulateState
from mithril.utils.optimizers import Adam, AdamW, ScheduleFreeAdamW

K, STEPS, CUT = 3, 11, 5  # the cut falls after 2 micro-batches of the second window
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
CASES = ("resume",)


def _grads(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    return {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}


def _start() -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), 0.5), "b": np.full(2, -0.25)}


#: what torch.load(weights_only=True) needs allowed to read NumPy arrays back (the
#: optimizers' state dicts, and so the nested one, hold NumPy arrays)
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                 np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Float16DType]


def _through_torch_save(d: dict) -> dict:
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(NUMPY_GLOBALS):
        return torch.load(buf, weights_only=True)


def _run(be, acc, params, state, start, stop):
    for t in range(start, stop):
        params, state = acc.update(params, {k: be.array(v) for k, v in _grads(t).items()},
                                   state)
    return params, state


def run(case: str, backend: str) -> dict[str, np.ndarray]:
    """The unbroken run and the run saved at ``CUT`` (through torch.save / torch.load with
    weights_only=True) and resumed in a fresh Accumulate, on ``backend`` in float64."""
    be = BACKENDS[backend](dtype="float64")
    p0 = {k: be.array(v) for k, v in _start().items()}
    acc = Accumulate(Adam(learning_rate=0.01), K)
    full, _ = _run(be, acc, p0, acc.init(p0), 0, STEPS)
    acc1 = Accumulate(Adam(learning_rate=0.01), K)
    p, st = _run(be, acc1, p0, acc1.init(p0), 0, CUT)
    d = _through_torch_save(acc1.state_dict(st))
    acc2 = Accumulate(Adam(learning_rate=0.3), 7)  # k and the learning rate come back
    st2 = acc2.load_state_dict(d, p)
    meta = np.array([acc2.k, acc2.get_learning_rate(), st2.micro_step, st2.windows,
                     st2.step, st2.accumulator.total_weight])
    resumed, _ = _run(be, acc2, p, st2, CUT, STEPS)
    out = {"meta": meta}
    for k in full:
        out["full_" + k] = np.asarray(be.to_numpy(full[k]))
        out["resumed_" + k] = np.asarray(be.to_numpy(resumed[k]))
    return out


def _multisteps(n: int) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        tx = optax.MultiSteps(optax.adam(0.01), every_k_schedule=K,
                              accumulator_dtype=jnp.float64)
        q = {k: jnp.asarray(v) for k, v in _start().items()}
        s = tx.init(q)
        for t in range(n):
            u, s = tx.update({k: jnp.asarray(v) for k, v in _grads(t).items()}, s, q)
            q = optax.apply_updates(q, u)
        return {k: np.asarray(v) for k, v in q.items()}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, np.ndarray]]:
    out = {b: run("resume", b) for b in ("numpy", "torch")}
    out["jax"] = jax_float64_results("test_accumulate_state_dict", "CASES", "run")["resume"]
    return out


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_resume_mid_window_is_exact_and_equals_multisteps(results, backend):
    r = results[backend]
    # k, lr restored; 2 micro-batches buffered, 1 window emitted and applied, weight 2
    np.testing.assert_array_equal(r["meta"], [K, 0.01, CUT % K, CUT // K, CUT // K, 2.0])
    ref = _multisteps(STEPS)
    for k in ("w", "b"):
        np.testing.assert_array_equal(r["resumed_" + k], r["full_" + k], err_msg=k)
        np.testing.assert_allclose(r["full_" + k], ref[k], rtol=0, atol=1e-14, err_msg=k)
        assert not np.array_equal(r["full_" + k], _start()[k])  # (it moved)


def test_a_window_saved_on_numpy_resumes_on_torch():
    nb, tb = NumpyBackend(dtype="float64"), TorchBackend(dtype="float64")
    acc1 = Accumulate(Adam(learning_rate=0.01), K)
    p0 = {k: nb.array(v) for k, v in _start().items()}
    p, st = _run(nb, acc1, p0, acc1.init(p0), 0, CUT)
    d = _through_torch_save(acc1.state_dict(st))
    acc2 = Accumulate(Adam(learning_rate=0.01), K)
    tp = {k: tb.array(np.asarray(v)) for k, v in p.items()}
    st2 = acc2.load_state_dict(d, tp)
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64
               for v in st2.accumulator.sum().values())
    resumed, _ = _run(tb, acc2, tp, st2, CUT, STEPS)
    ref = _multisteps(STEPS)
    for k in ref:
        np.testing.assert_allclose(resumed[k].numpy(), ref[k], rtol=0, atol=1e-14, err_msg=k)


def _saved():
    acc = Accumulate(Adam(learning_rate=0.01), K)
    p0 = _start()
    p, st = _run(NumpyBackend(dtype="float64"), acc, p0, acc.init(p0), 0, CUT)
    return acc.state_dict(st), p


@pytest.mark.parametrize("edit, error, match", [
    (lambda d: d.update(count=K), ValueError, "'count' is 3, not below k = 3"),
    (lambda d: d.update(k=1.5), TypeError, "state dict 'k'"),
    (lambda d: d.update(k=None), ValueError, "'k' is None"),
    (lambda d: d.update(windows=-1), ValueError, "state dict 'windows'"),
    (lambda d: d.update(total_weight=0.0), ValueError, "'total_weight'"),
    (lambda d: d.update(applied="yes"), TypeError, "'applied'"),
    (lambda d: d.pop("sums"), KeyError, "missing \\['sums'\\]"),
    (lambda d: d.update(extra=1), KeyError, "unknown \\['extra'\\]"),
    (lambda d: d["sums"].update(w=np.zeros((2, 3))), ShapeError, "'sums' of 'w'"),
    (lambda d: d["sums"].update(z=np.zeros(2)), KeyMismatchError, "\\['z'\\]"),
    (lambda d: d["sums"].update(w=np.array(["a"] * 6).reshape(3, 2)), TypeError, "'sums' of 'w'"),
    (lambda d: d["inner"]["slots"]["m"].update(w=np.zeros(2)), ShapeError, "slot 'm' of 'w'"),
    (lambda d: d.update(optimizer="Adam"), ValueError, "not Accumulate"),
])
def test_bad_state_dicts_are_refused_by_name_and_change_nothing(edit, error, match):
    d, p = _saved()
    edit(d)
    acc = Accumulate(Adam(learning_rate=0.3), 7)
    with pytest.raises(error, match=match):
        acc.load_state_dict(d, p)
    assert acc.k == 7 and acc.get_learning_rate() == 0.3


def test_state_dict_without_a_state_and_a_callable_k():
    def sched(w):
        return 2 if w < 1 else K

    acc = Accumulate(Adam(learning_rate=0.01), sched)
    d = acc.state_dict()
    assert d["k"] is None and "count" not in d and d["inner"]["hyperparameters"][
        "learning_rate"] == 0.01
    other = Accumulate(Adam(learning_rate=0.5), sched)
    assert other.load_state_dict(d) is None and other.k is sched
    assert other.get_learning_rate() == 0.01
    with pytest.raises(ValueError, match="'k' is None"):
        Accumulate(Adam(), 2).load_state_dict(d)
    with pytest.raises(TypeError, match="AccumulateState"):
        acc.state_dict(acc.optimizer.init(_start()))


def test_state_readers_on_the_accumulated_state_match_torch_and_optax():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    gs = [_grads(t) for t in range(8)]
    opt = AdamW(learning_rate=0.05, weight_decay=0.0, ema_decay=0.9)
    acc = Accumulate(opt, 2)
    p = _start()
    st = acc.init(p)
    for g in gs:
        p, st = acc.update(p, g, st)
    ema = acc.ema_params(st)
    for got in (opt.ema_params(st), opt.ema_params(st.inner)):  # the natural calls agree
        for k in ema:
            np.testing.assert_array_equal(got[k], ema[k])
    holder = torch.nn.ParameterList([torch.tensor(v) for v in _start().values()])
    tp = dict(zip(_start(), holder))  # (the Parameters the list made)
    topt = torch.optim.AdamW(holder, lr=0.05, weight_decay=0.0)
    avg = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    for i in range(0, len(gs), 2):
        for k, t in tp.items():
            t.grad = torch.tensor((gs[i][k] + gs[i + 1][k]) / 2)
        topt.step()
        avg.update_parameters(holder)
    for i, k in enumerate(tp):
        np.testing.assert_allclose(ema[k], avg.module[i].detach().numpy(), rtol=0, atol=1e-14)
    with pytest.raises(AttributeError, match="Accumulate.slow_params: the wrapped AdamW"):
        acc.slow_params(st)

    # schedule-free: eval params through the wrapper and through the optimizer itself,
    # against optax.MultiSteps(schedule_free_adamw) + schedule_free_eval_params
    import jax
    import jax.numpy as jnp

    sf = ScheduleFreeAdamW(learning_rate=0.05, warmup_steps=0, weight_decay=0.0)
    acc = Accumulate(sf, 2)
    p = _start()
    st = acc.init(p)
    for g in gs:
        p, st = acc.update(p, g, st)
    x = acc.eval_params(st)
    with jax.enable_x64(True):
        tx = optax.MultiSteps(optax.contrib.schedule_free_adamw(0.05, weight_decay=0.0),
                              every_k_schedule=2, accumulator_dtype=jnp.float64)
        q = {k: jnp.asarray(v) for k, v in _start().items()}
        s = tx.init(q)
        for g in gs:
            u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
            q = optax.apply_updates(q, u)
        ref = optax.contrib.schedule_free_eval_params(s.inner_opt_state, q)
        ref = {k: np.asarray(v) for k, v in ref.items()}
    for k in ref:
        np.testing.assert_allclose(x[k], ref[k], rtol=0, atol=1e-13, err_msg=k)
        np.testing.assert_array_equal(sf.eval_params(st)[k], x[k])
    assert isinstance(st, AccumulateState)


def test_windows_count_skipped_windows_as_multisteps_gradient_step():
    # A callable k reads state.windows (windows emitted, skipped ones included: MultiSteps'
    # gradient_step), state.step the wrapped optimizer's applied steps (apply_if_finite's
    # inner count; torch's Adam state 'step' when a non-finite window's opt.step() is
    # skipped, as GradScaler does). Window 2 (calls 4-6) holds a NaN and is skipped.
    import jax
    import jax.numpy as jnp

    def every_k(w):
        return 2 if w < 2 else 3

    nan_at, n = 5, 15
    gs = [_grads(100 + t) for t in range(n)]
    gs[nan_at]["w"][1, 0] = np.nan

    acc = Accumulate(Adam(learning_rate=0.01, nonfinite="skip"), every_k)
    p = _start()
    st = acc.init(p)
    ours = []
    with pytest.warns(RuntimeWarning):
        for g in gs:
            p, st = acc.update(p, {k: v.copy() for k, v in g.items()}, st)
            ours.append((st.windows, st.step, {k: v.copy() for k, v in p.items()}))

    with jax.enable_x64(True):
        tx = optax.MultiSteps(optax.apply_if_finite(optax.adam(0.01), max_consecutive_errors=99),
                              every_k_schedule=lambda s: jnp.where(s < 2, 2, 3),
                              accumulator_dtype=jnp.float64)
        q = {k: jnp.asarray(v) for k, v in _start().items()}
        s = tx.init(q)
        peer = []
        for g in gs:
            u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
            q = optax.apply_updates(q, u)
            peer.append((int(s.gradient_step), int(s.inner_opt_state.inner_state[0].count),
                         {k: np.asarray(v) for k, v in q.items()}))
    assert [o[0] for o in ours] == [r[0] for r in peer] == \
        [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert [o[1] for o in ours] == [0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert st.windows == 5 and st.step == 4 and st.num_skipped == 1
    # up to the skipped window's end optax's applied count and params are ours; after it
    # optax's accumulator stays NaN (its reset is 0·acc), so every later window is skipped
    end = 6
    assert [o[1] for o in ours[:end + 1]] == [r[1] for r in peer[:end + 1]]
    for o, r in zip(ours[:end + 1], peer[:end + 1]):
        for k in o[2]:
            np.testing.assert_allclose(o[2][k], r[2][k], rtol=0, atol=1e-14)
    assert int(s.inner_opt_state.total_notfinite) == 3  # (windows 2, 3 and 4: the quirk)

    # the whole run: a torch accumulation loop, k from the windows emitted
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in _start().items()}
    topt = torch.optim.Adam(list(tp.values()), lr=0.01)
    windows, buffered, applied = 0, 0, 0
    for t, g in enumerate(gs):
        for k, x in tp.items():
            gt = torch.tensor(g[k])
            x.grad = gt if x.grad is None else x.grad + gt
        buffered += 1
        if buffered == every_k(windows):
            if all(torch.isfinite(x.grad).all() for x in tp.values()):
                for x in tp.values():
                    x.grad /= buffered
                topt.step()
                applied += 1
            topt.zero_grad()
            windows, buffered = windows + 1, 0
        assert (ours[t][0], ours[t][1]) == (windows, applied), t
        for k in tp:
            np.testing.assert_allclose(ours[t][2][k], tp[k].detach().numpy(), rtol=0,
                                       atol=1e-14, err_msg=f"{k} at {t}")
    assert topt.state[tp["w"]]["step"].item() == st.step == 4


@pytest.mark.parametrize("via", ["state_dict", "checkpoint"])
def test_a_scheduled_run_resumes_after_a_skipped_window(via, tmp_path):
    # windows (not the applied steps) are saved, so the resumed schedule picks the same k
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    def every_k(w):
        return 2 if w < 2 else 3

    gs = [_grads(100 + t) for t in range(15)]
    gs[5]["w"][1, 0] = np.nan  # window 2 (calls 4-6) is skipped
    cut = 8  # one micro-batch into window 3

    def run(acc, p, st, start, stop):
        for g in gs[start:stop]:
            p, st = acc.update(p, {k: v.copy() for k, v in g.items()}, st)
        return p, st

    def make():
        return Accumulate(Adam(learning_rate=0.01, nonfinite="skip"), every_k)

    with pytest.warns(RuntimeWarning):
        acc = make()
        full, fst = run(acc, _start(), acc.init(_start()), 0, len(gs))
        acc1 = make()
        p, st = run(acc1, _start(), acc1.init(_start()), 0, cut)
    assert (st.windows, st.step, st.micro_step) == (3, 2, 1)
    acc2 = make()
    if via == "state_dict":
        st2 = acc2.load_state_dict(_through_torch_save(acc1.state_dict(st)), p)
    else:
        save_checkpoint(tmp_path / "ck", p, acc1, st)
        got = load_checkpoint(tmp_path / "ck", p, acc2)
        p, st2 = got["params"], got["state"]
    assert acc2.k is every_k and (st2.windows, st2.step, st2.micro_step) == (3, 2, 1)
    resumed, rst = run(acc2, p, st2, cut, len(gs))
    assert (rst.windows, rst.step) == (fst.windows, fst.step) == (5, 4)
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


def test_a_half_precision_window_keeps_its_float32_sums():
    # float16 gradients are summed in float32 (MultiSteps' accumulator_dtype default); the
    # state dict holds the float32 sums and the resumed run is the unbroken one, bit for bit
    tb = TorchBackend(dtype="float16")

    def run(acc, p, st, start, stop):
        for t in range(start, stop):
            g = {k: torch.tensor(v * 1e3).to(torch.float16) for k, v in _grads(t).items()}
            p, st = acc.update(p, g, st)
        return p, st

    p0 = {k: tb.array(v) for k, v in _start().items()}
    acc = Accumulate(Adam(learning_rate=0.01, epsilon=1e-4), K)
    full, _ = run(acc, p0, acc.init(p0), 0, STEPS)
    acc1 = Accumulate(Adam(learning_rate=0.01, epsilon=1e-4), K)
    p, st = run(acc1, p0, acc1.init(p0), 0, CUT)
    d = _through_torch_save(acc1.state_dict(st))
    assert {k: v.dtype for k, v in d["sums"].items()} == {"w": np.float32, "b": np.float32}
    sums = {k: sum(_grads(t)[k] * 1e3 for t in (3, 4)) for k in ("w", "b")}
    for k in sums:  # (each gradient rounded to float16 first, as the run's were)
        want = sum(np.float32(np.float16(_grads(t)[k] * 1e3)) for t in (3, 4))
        np.testing.assert_array_equal(d["sums"][k], want)
        np.testing.assert_allclose(d["sums"][k], sums[k], rtol=0, atol=2.0)  # (fp16 ulp at 2048)
    acc2 = Accumulate(Adam(learning_rate=0.01, epsilon=1e-4), K)
    resumed, _ = run(acc2, p, acc2.load_state_dict(d, p), CUT, STEPS)
    for k in full:
        assert resumed[k].dtype == torch.float16
        assert torch.equal(resumed[k], full[k]), k


def test_a_window_past_a_lowered_k_is_not_saved(tmp_path):
    """``acc.k`` lowered below the micro-batches buffered: the next update emits them all
    (the wrapped optimizer steps with their mean); a state dict or checkpoint of that state
    would be refused by every load, so saving it is refused (nothing written) until then."""
    from mithril.utils.checkpoint import save_checkpoint

    acc = Accumulate(Adam(learning_rate=0.01), 4)
    p, st = _run(NumpyBackend(dtype="float64"), acc, _start(), acc.init(_start()), 0, 3)
    acc.k = 2
    with pytest.raises(ValueError, match=r"buffers 3 micro-batch\(es\) but k is now 2"):
        acc.state_dict(st)
    with pytest.raises(ValueError, match=r"buffers 3 micro-batch\(es\) but k is now 2"):
        save_checkpoint(tmp_path / "ck", p, acc, st)
    assert not list(tmp_path.iterdir()) and st.micro_step == 3
    q, st = acc.update(p, _grads(3), st)  # the window of 4 emitted, as Adam on their mean
    ref = Adam(learning_rate=0.01)
    want, _ = ref.update(_start(), {k: sum(_grads(t)[k] for t in range(4)) / 4
                                    for k in ("w", "b")}, ref.init(_start()))
    for k in want:
        np.testing.assert_allclose(q[k], want[k], rtol=0, atol=1e-15)
    fresh = Accumulate(Adam(), 3)
    assert fresh.load_state_dict(acc.state_dict(st), q).micro_step == 0 and fresh.k == 2
