"""A torch.amp / Keras / jmp user's review of mixed precision (session 49), side by side with
``torch.amp.GradScaler("cpu")`` under ``torch.autocast``: what the other mixed-precision
tests leave out.

* the gradient norm a training loop logs after ``unscale_`` (torch's ``clip_grad_norm_``
  return value) at an overflowing step: inf / NaN there, ours was the previous step's;
* one scaler for two optimizers (a GAN's two models, torch's ``scaler.step(opt_a)``,
  ``scaler.step(opt_b)``, one ``scaler.update()``): ``update_scale=False``,
  ``LossScaler.record`` and ``update()`` without a flag, ``last_found_inf``; GradScaler's
  and Keras' method names on a ``LossScaler``;
* a checkpoint mid-run (scaler, counters, Adam with clipping, through JSON) continuing bit
  for bit on every backend;
* bfloat16 compute with float32 masters against pure bfloat16 weights (``model.bfloat16()``
  in torch, ``make_train_step`` on a bfloat16 model here): updates below bfloat16's
  resolution are lost on bfloat16 weights in both, kept by the masters in both;
* float16 statistics now computed in float32 (CosineSimilarity, PairwiseDistance,
  TripletMarginLoss, Variance and the average pools, fixed by the lead), and a strict xfail
  for the rounding of an SGD step on bfloat16 params.

The data are small dyadic numbers where exactness is claimed: the float16 gradients of the
Linear models are then exact, so the peers' runs compare to the last bit.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils.mixed_precision import MixedPrecisionTrainer
from mithril.utils.optimizers import SGD, Adam

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
W, B = "linear.weight", "linear.bias"


def linear(backend, rows: int = 2):
    """``out = input @ W.T + b`` (W: 2×3), compiled on ``backend``."""
    m = ml.Model()
    m |= ml.Linear(2)(input="input", output=ml.IOKey("out"))
    return ml.compile(m, backend, shapes={"input": [rows, 3]})


def start(backend, w: float = 0.5):
    return {W: backend.array(np.full((2, 3), w, np.float32), "float32"),
            B: backend.array(np.zeros(2, np.float32), "float32")}


def host(backend, tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(backend.to_numpy(v), dtype=np.float32) for k, v in tree.items()}


def torch_params(w: float = 0.5):
    return {W: torch.nn.Parameter(torch.full((2, 3), w)),
            B: torch.nn.Parameter(torch.zeros(2))}


def autocast_loss(ps, x, c):
    """The linear map under float16 autocast, weighted by ``c`` and summed in float32."""
    with torch.autocast("cpu", dtype=torch.float16):
        out = torch.nn.functional.linear(torch.from_numpy(x), ps[W], ps[B])
    return (out.float() * torch.from_numpy(c)).sum()


def batches(n: int, seed: int, big=(), nan=(), inf=()):
    """``n`` dyadic (input, dL/dout) pairs; at the steps in ``big`` an input of 60000 makes
    the weight's float16 gradient overflow, ``nan`` / ``inf`` put a NaN / an inf in one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.integers(-2, 3, (2, 3)).astype(np.float32) / 2
        c = rng.integers(-4, 5, (2, 2)).astype(np.float32) / 4 * 2.0 ** rng.integers(-3, 2)
        if i in big:
            x[1, 1] = 60000.0
        if i in nan or i in inf:
            x[0, 2] = np.nan if i in nan else np.inf
        out.append((x, c))
    return out


# -- the gradient norm of a skipped step ------------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_grad_norm_of_a_skipped_step_is_the_overflow_as_torchs_clip_grad_norm(kind):
    """Bug: after a step skipped on overflow, ``state.last_grad_norm`` still held the
    previous applied step's norm (5.66 where torch's ``clip_grad_norm_`` after
    ``unscale_`` returns inf): a loop logging it showed no overflow at all. Now it is the
    skipped gradients' norm, inf or NaN as torch's, and every applied step's norm equals
    torch's (rel 1e-6; float64 sums here, float32 there). Adam with ``clip_norm=1.0``,
    ``GradScaler(2**10, growth_interval=3)``, overflows at steps 3 (inf), 6 (NaN), 9
    (float16 overflow)."""
    data = batches(12, 8, big=(9,), nan=(6,), inf=(3,))
    ps = torch_params()
    opt = torch.optim.Adam(list(ps.values()), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    want, want_scale = [], []
    for x, c in data:
        opt.zero_grad()
        scaler.scale(autocast_loss(ps, x, c)).backward()
        scaler.unscale_(opt)
        want.append(float(torch.nn.utils.clip_grad_norm_(list(ps.values()), 1.0)))
        scaler.step(opt)
        scaler.update()
        want_scale.append(scaler.get_scale())

    backend = BACKENDS[kind](dtype="float16")
    trainer = MixedPrecisionTrainer(linear(backend), Adam(learning_rate=0.01, clip_norm=1.0),
                                    start(backend), loss_scale=2.0**10, growth_interval=3)
    got, scales, skipped = [], [], []
    for x, c in data:
        trainer.forward({"input": backend.array(x)})
        with np.errstate(all="ignore"):
            skipped.append(not trainer.backward_and_update({"out": backend.array(c)})[2])
        got.append(trainer.optimizer_state.last_grad_norm)
        scales.append(trainer.loss_scale)
    assert scales == want_scale
    assert [i for i, s in enumerate(skipped) if s] == [3, 6, 9]
    assert [i for i, v in enumerate(want) if not math.isfinite(v)] == [3, 6, 9]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if math.isfinite(w):
            assert g == pytest.approx(w, rel=1e-6, abs=0), i
        else:  # (the same kind of non-finite: inf for an inf, NaN where one arose)
            assert (math.isnan(g), math.isinf(g)) == (math.isnan(w), math.isinf(w)), (i, g, w)
    assert math.isinf(got[3]) and math.isnan(got[6]) and math.isinf(got[9])


# -- one scaler, two optimizers ------------------------------------------------------------------
def torch_two_optimizers(data_a, data_b):
    """torch's recipe for two models with their own losses and optimizers (SGD with momentum
    for A, Adam for B) and ONE ``GradScaler(2**12, growth_interval=3)``: ``scaler.step`` on
    each optimizer, one ``scaler.update()`` per iteration. Per iteration: the scale used,
    the scale after, whether A and B were skipped, and both models' parameters."""
    pa, pb = torch_params(0.5), torch_params(0.25)
    opt_a = torch.optim.SGD(list(pa.values()), lr=0.125, momentum=0.5)
    opt_b = torch.optim.Adam(list(pb.values()), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    rows = []
    for (xa, ca), (xb, cb) in zip(data_a, data_b, strict=True):
        used = scaler.get_scale()
        skipped = []
        for ps, opt, x, c in ((pa, opt_a, xa, ca), (pb, opt_b, xb, cb)):
            opt.zero_grad()
            scaler.scale(autocast_loss(ps, x, c)).backward()
            scaler.step(opt)
            skipped.append(bool(sum(v.item() for v in
                                    scaler._found_inf_per_device(opt).values())))
        scaler.update()
        rows.append((used, scaler.get_scale(), skipped,
                     [{n: p.detach().numpy().copy() for n, p in ps.items()} for ps in (pa, pb)]))
    return rows


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_one_scaler_two_optimizers_as_torchs_one_update_per_iteration(kind):
    """Two trainers sharing one :class:`LossScaler`, ``backward_and_update(...,
    update_scale=False)`` on each (each records its overflow on the scaler) and one
    ``scaler.update()`` (or ``scaler.update(found_inf=a or b)``, or B updating as usual:
    A's recorded overflow counts) per iteration:
    the scale used and the scale after every iteration, which model's step is skipped
    (A alone at 4 and 10, B alone at 7, both at 13) and both models' masters after every
    iteration (within 3e-8) equal torch's one scaler stepping two optimizers. Left to
    update the shared scaler each (the default), the growth tracker counts two steps per
    iteration and B's backward pass runs at the scale A's overflow halved: another
    sequence."""
    n = 16
    data_a = batches(n, 11, big=(4, 10, 13))
    data_b = batches(n, 12, big=(7, 13))
    ref = torch_two_optimizers(data_a, data_b)
    backend = BACKENDS[kind](dtype="float16")
    compiled = linear(backend)

    def pair():
        a = MixedPrecisionTrainer(compiled, SGD(learning_rate=0.125, momentum=0.5),
                                  start(backend, 0.5), loss_scale=2.0**12, growth_interval=3)
        b = MixedPrecisionTrainer(compiled, Adam(learning_rate=0.01), start(backend, 0.25))
        b.scaler = a.scaler
        return a, b

    a, b = pair()
    for i, ((xa, ca), (xb, cb), (used, after, skipped, want)) in enumerate(
            zip(data_a, data_b, ref, strict=True)):
        assert a.loss_scale == b.loss_scale == used, i
        oks = []
        # three ways: torch's scaler.update() after both (the overflows the trainers
        # recorded), a flag of one's own, or the second trainer updating as usual
        way = i % 3
        for tr, x, c in ((a, xa, ca), (b, xb, cb)):
            tr.forward({"input": backend.array(x)})
            last = way == 2 and tr is b
            oks.append(tr.backward_and_update({"out": backend.array(c)},
                                              update_scale=last)[2])
            assert tr.last_found_inf is (not oks[-1])
            assert last or tr.loss_scale == used  # (not moved yet)
        if way == 0:
            a.scaler.update()
        elif way == 1:
            a.scaler.update(found_inf=a.last_found_inf or b.last_found_inf)
        assert (a.loss_scale, [not ok for ok in oks]) == (after, skipped), i
        for tr, w in zip((a, b), want, strict=True):
            got = host(backend, tr.master_params)
            for k in (W, B):
                np.testing.assert_allclose(got[k], w[k], rtol=0, atol=3e-8, err_msg=f"{k} {i}")
    assert [i for i, r in enumerate(ref) if any(r[2])] == [4, 7, 10, 13]
    assert (a.num_skipped_steps, b.num_skipped_steps) == (3, 2)

    a, b = pair()  # each trainer updating the shared scaler itself
    scales = []
    for (xa, ca), (xb, cb) in zip(data_a, data_b, strict=True):
        for tr, x, c in ((a, xa, ca), (b, xb, cb)):
            tr.forward({"input": backend.array(x)})
            tr.backward_and_update({"out": backend.array(c)})
        scales.append(a.loss_scale)
    assert scales != [r[1] for r in ref]


def test_update_scale_must_be_a_bool_and_a_refusal_changes_nothing():
    """``update_scale="no"`` (truthy) raises a TypeError naming it before anything runs:
    the forward is kept for the retry, the masters, the scale and the counters unchanged."""
    backend = NumpyBackend(dtype="float16")
    trainer = MixedPrecisionTrainer(linear(backend), SGD(learning_rate=0.1), start(backend),
                                    loss_scale=2.0**8, growth_interval=1)
    x, c = batches(1, 3)[0]
    trainer.forward({"input": backend.array(x)})
    before = host(backend, trainer.master_params)
    with pytest.raises(TypeError, match=r"update_scale=.*must be True or False, got 'no'"):
        trainer.backward_and_update({"out": backend.array(c)}, update_scale="no")
    for k, v in host(backend, trainer.master_params).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert (trainer.loss_scale, trainer.num_steps, trainer.scaler.growth_tracker) == (256.0, 0, 0)
    assert trainer.backward_and_update({"out": backend.array(c)}, update_scale=False)[2]
    assert trainer.loss_scale == 256.0 and trainer.num_steps == 1  # (growth_interval 1: kept)
    assert not np.array_equal(host(backend, trainer.master_params)[W], before[W])



def test_scaler_update_without_found_inf_reads_the_recorded_steps():
    """torch's ``scaler.update()`` reads the found_inf its ``step`` calls recorded (and
    fails when none was: "No inf checks were recorded"). Ours: :meth:`LossScaler.record`
    (the trainer's ``update_scale=False`` calls it), any overflow recorded backs off once;
    an explicit flag counts with the record (an overflow recorded is never dropped) and
    clears it; nothing recorded is a ValueError, a non-bool a TypeError naming it, both
    changing nothing."""
    from mithril.utils.loss_scaler import LossScaler

    s = LossScaler(init_scale=8.0, growth_interval=2)
    with pytest.raises(ValueError, match=r"update\(\) without found_inf: no step was recorded"):
        s.update()
    with pytest.raises(TypeError, match=r"record\(found_inf\): found_inf must be a bool.*'yes'"):
        s.record("yes")
    assert (s.scale, s.growth_tracker) == (8.0, 0)
    s.record(False)
    s.record(False)
    s.update()  # two finite steps of one iteration: one growth count
    assert (s.scale, s.growth_tracker) == (8.0, 1)
    s.record(False)
    s.record(True)
    s.record(False)
    s.update()  # one overflow among them: one backoff
    assert (s.scale, s.growth_tracker) == (4.0, 0)
    s.record(False)
    s.update(found_inf=False)  # the caller's flag with the record, which is then gone
    with pytest.raises(ValueError, match="no step was recorded"):
        s.update()
    assert (s.scale, s.growth_tracker) == (4.0, 1)
    s.record(True)
    s.update(found_inf=False)  # (the recorded overflow is not dropped)
    assert (s.scale, s.growth_tracker) == (2.0, 0)


def test_gradscaler_and_keras_names_say_what_to_use():
    """A torch loop's ``scaler.get_scale()`` / ``set_growth_factor`` / ``unscale_`` and a
    Keras user's ``dynamic_scale`` raised Python's bare AttributeError, and
    ``scaler.dynamic_growth_steps = 500`` was silently kept as an attribute nothing reads;
    now both raise an error naming ours. Unknown names still raise the plain one (copy and
    pickle keep working)."""
    import copy
    import pickle

    from mithril.utils.loss_scaler import LossScaler

    s = LossScaler(init_scale=8.0)
    for name, ours in [("get_scale", "scaler.scale"), ("get_growth_interval",
                                                       "scaler.growth_interval"),
                       ("set_backoff_factor", "scaler.backoff_factor = value"),
                       ("is_enabled", "scaler.dynamic"), ("unscale_", "backward_and_update"),
                       ("step", "backward_and_update")]:
        with pytest.raises(AttributeError, match=f"no {name} .*GradScaler.*{ours}"):
            getattr(s, name)
    with pytest.raises(AttributeError, match="has no attribute 'get_scales'"):
        s.get_scales  # noqa: B018
    # Keras LossScaleOptimizer's names, read or set (set, one would be ignored)
    with pytest.raises(AttributeError, match="no dynamic_scale .*Keras.*scaler.scale"):
        s.dynamic_scale  # noqa: B018
    with pytest.raises(AttributeError, match="no dynamic_growth_steps .*scaler.growth_interval"):
        s.dynamic_growth_steps = 500
    assert "dynamic_growth_steps" not in vars(s) and s.growth_interval == 2000
    assert copy.deepcopy(s).scale == pickle.loads(pickle.dumps(s)).scale == 8.0


# -- a checkpoint mid-run continues bit for bit -------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_resume_mid_run_continues_bit_for_bit(kind):
    """A tanh MLP, Adam with ``clip_norm``, float16 with overflows (inf at 5, NaN at 11) and
    growth every 3 steps: saved after step 8 (the trainer's and the optimizer's state dicts
    through JSON, the masters as arrays), a new trainer on them runs steps 8-15 to exactly
    the uninterrupted run's masters, scale, counters and optimizer step counts."""
    rng = np.random.default_rng(0)
    data = []
    for i in range(16):
        x = (rng.standard_normal((4, 3)) * 3).astype(np.float32)
        if i in (5, 11):
            x[0, 1] = np.inf if i == 5 else np.nan
        data.append((x, rng.standard_normal((4, 2)).astype(np.float32)))
    backend = BACKENDS[kind](dtype="float16")
    m = ml.Model()
    m |= ml.Linear(5)(input="input", output="h")
    m |= ml.Tanh()(input="h", output="t")
    m |= ml.Linear(2)(input="t", output=ml.IOKey("out"))
    compiled = ml.compile(m, backend, shapes={"input": [4, 3]})
    p0 = host(backend, compiled.get_parameters())

    def make(p):
        return MixedPrecisionTrainer(compiled, Adam(learning_rate=0.01, clip_norm=0.5),
                                     {k: backend.array(v, "float32") for k, v in p.items()},
                                     loss_scale=2.0**15, growth_interval=3)

    def run(tr, part):
        for x, c in part:
            tr.forward({"input": backend.array(x)})
            with np.errstate(all="ignore"):
                tr.backward_and_update({"out": backend.array(c)})

    whole = make(p0)
    run(whole, data)
    first = make(p0)
    run(first, data[:8])
    saved = json.dumps({"trainer": first.state_dict(),
                        "optimizer": first.optimizer.state_dict(first.optimizer_state)},
                       default=lambda a: np.asarray(a).tolist())
    masters = {k: np.array(v) for k, v in host(backend, first.master_params).items()}
    loaded = json.loads(saved)
    resumed = make(masters)
    resumed.optimizer_state = resumed.optimizer.load_state_dict(loaded["optimizer"],
                                                                resumed.master_params)
    resumed.load_state_dict(loaded["trainer"])
    run(resumed, data[8:])
    want, got = host(backend, whole.master_params), host(backend, resumed.master_params)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert resumed.state_dict() == whole.state_dict()
    assert (resumed.optimizer_state.step, resumed.optimizer_state.num_skipped) == \
        (whole.optimizer_state.step, whole.optimizer_state.num_skipped) == (12, 4)



# -- bfloat16 compute: float32 masters against bfloat16 weights --------------------------------
def bf16_data():
    rng = np.random.default_rng(1)
    return (rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal((4, 2)).astype(np.float32),
            rng.standard_normal((2, 3)).astype(np.float32), np.full(2, 8.0, np.float32))


def torch_bf16_runs(steps: int, lr: float):
    """torch's two ways: ``autocast(bfloat16)`` over float32 parameters (masters) and the
    model in ``.bfloat16()`` (pure), each SGD(lr) on the float32 MSE of its outputs."""
    x, y, w0, b0 = bf16_data()
    runs = {}
    for how in ("masters", "pure"):
        dt = torch.float32 if how == "masters" else torch.bfloat16
        ps = {W: torch.nn.Parameter(torch.tensor(w0, dtype=dt)),  # (copies: not the
              B: torch.nn.Parameter(torch.tensor(b0, dtype=dt))}   # arrays of the next run)
        opt = torch.optim.SGD(list(ps.values()), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "masters"):
                out = torch.nn.functional.linear(torch.from_numpy(x).to(dt), ps[W], ps[B])
            ((out.float() - torch.from_numpy(y)) ** 2).mean().backward()
            opt.step()
        runs[how] = {k: v.detach().float().numpy() for k, v in ps.items()}
    return runs


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_bfloat16_masters_keep_the_updates_bfloat16_weights_lose(kind):
    """SGD(1e-3), 30 steps, the bias starting at 8: each of its steps (~9e-3) is below half
    a bfloat16 ulp there (2**-6), so on bfloat16 weights it never moves, in torch's
    ``.bfloat16()`` model and here (the compiled bfloat16 model's gradients, SGD on its
    bfloat16 params) alike; the weight moves, within 2**-6 of torch's (one ulp at its
    largest entry; the last rounding of a bfloat16 SGD step is not torch's: see the strict
    xfail below). The trainer's float32
    masters keep every step: equal to torch's autocast run within 1e-6 on the torch
    backend, 1e-3 on NumPy and JAX (3e-4 measured: their bfloat16 Linear rounds the matmul
    and the bias add apart, torch's addmm once), the bias moved by 0.26."""
    steps, lr = 30, 1e-3
    want = torch_bf16_runs(steps, lr)
    x, y, w0, b0 = bf16_data()
    assert np.array_equal(want["pure"][B], b0)  # (torch's bfloat16 bias is stuck)
    backend = BACKENDS[kind](dtype="bfloat16")
    compiled = linear(backend, rows=4)

    trainer = MixedPrecisionTrainer(compiled, SGD(learning_rate=lr),
                                    {W: backend.array(w0, "float32"), B: backend.array(b0, "float32")},
                                    loss_scale=1.0, dynamic_loss_scaling=False)
    opt = SGD(learning_rate=lr)
    params = {W: backend.array(w0), B: backend.array(b0)}
    state = opt.init(params)
    for _ in range(steps):
        out = host(backend, trainer.forward({"input": backend.array(x)}))["out"]
        assert trainer.backward_and_update({"out": backend.array(2 * (out - y) / out.size,
                                                                 "float32")})[2]
        res = compiled.evaluate(params, {"input": backend.array(x)})
        out = host(backend, res)["out"]
        grads = compiled.evaluate(params, {"input": backend.array(x)}, output_gradients={
            "out": backend.array(2 * (out - y) / out.size)})[1]
        params, state = opt.update(params, grads, state)
    masters, pure = host(backend, trainer.master_params), host(backend, params)
    assert np.abs(masters[B] - b0).max() > 0.2
    np.testing.assert_array_equal(pure[B], b0)
    tol = 1e-6 if kind == "torch" else 1e-3  # (NumPy's, JAX's bias add rounded apart)
    for k in (W, B):
        np.testing.assert_allclose(masters[k], want["masters"][k], rtol=0, atol=tol, err_msg=k)
    np.testing.assert_allclose(pure[W], want["pure"][W], rtol=0, atol=2.0**-6)


@pytest.mark.xfail(strict=True, reason="needs src/mithril/utils/optimizers/engines (SGD on "
                   "bfloat16 params): torch rounds lr to the params' dtype and forms p - lr*g "
                   "in float32, rounding once; ours rounds lr*g to bfloat16 first")
def test_sgd_on_bfloat16_params_rounds_as_torch_optim():
    """One SGD(1e-3) step on 4096 bfloat16 params: 14 land one bfloat16 ulp away from
    ``torch.optim.SGD``'s (ours: ``p - bf16(lr*g)``, two roundings; torch: ``bf16(p +
    bf16(-lr)*g)`` in float32, one). Computing every half-precision step in float32 and
    rounding once (tried) gives 6 differences (torch rounds ``lr`` to bfloat16 first) and
    loses the bit-for-bit parity with torch's and MLX's per-op float16 arithmetic that
    ``test_weight_averaging_peers`` and ``test_review_session46`` check."""
    rng = np.random.default_rng(3)
    p = torch.from_numpy(rng.standard_normal(4096).astype(np.float32)).bfloat16()
    g = torch.from_numpy(rng.standard_normal(4096).astype(np.float32)).bfloat16()
    q = torch.nn.Parameter(p.clone())
    ref = torch.optim.SGD([q], lr=1e-3)
    q.grad = g.clone()
    ref.step()
    opt = SGD(learning_rate=1e-3)
    params = {"w": p.clone()}
    new, _ = opt.update(params, {"w": g.clone()}, opt.init(params))
    assert torch.equal(new["w"], q.detach())


# -- statistics a float16 model computes outside the float32 rule --------------------------------
def _stat_cases():
    import torch.nn.functional as F
    from half_precision_cases import Case

    big = ((4, 4096), 10.0, 0.0)
    return {
        "cosine_similarity": Case(lambda: ml.CosineSimilarity(), {"input1": big, "input2": big},
                                  lambda t, d: F.cosine_similarity(t["input1"], t["input2"])),
        "pairwise_distance": Case(lambda: ml.PairwiseDistance(),
                                  {"input1": big, "input2": ((4, 4096), 1.0, 0.0)},
                                  lambda t, d: F.pairwise_distance(t["input1"], t["input2"])),
        "triplet_margin_loss": Case(
            lambda: ml.TripletMarginLoss(), {k: ((8, 4096), 10.0, 0.0)
                                             for k in ("anchor", "positive", "negative")},
            lambda t, d: F.triplet_margin_loss(t["anchor"], t["positive"], t["negative"])),
        "variance": Case(lambda: ml.Variance(axis=-1, correction=1), {"input": ((4, 8192), 10.0, 5.0)},
                         lambda t, d: t["input"].var(-1)),
        "avg_pool_1d": Case(lambda: ml.AvgPool1D(kernel_size=4096),
                            {"input": ((2, 3, 8192), 10.0, 5.0)},
                            lambda t, d: F.avg_pool1d(t["input"], 4096)),
        "adaptive_avg_pool_1d": Case(lambda: ml.AdaptiveAvgPool1D(1),
                                     {"input": ((2, 3, 8192), 10.0, 5.0)},
                                     lambda t, d: F.adaptive_avg_pool1d(t["input"], 1)),
    }


@pytest.mark.parametrize("name,kind", [
    (n, k) for n in ("cosine_similarity", "pairwise_distance", "triplet_margin_loss", "variance",
                     "avg_pool_1d", "adaptive_avg_pool_1d") for k in ("numpy", "jax")])
def test_float16_statistics_are_computed_in_float32_as_torchs(name, kind):
    """The rule of ``mithril.models.half_precision`` (a half-precision statistic is computed
    in float32 and rounded once, as torch's opmath), which these blocks missed. In float16
    a cosine similarity, a pairwise distance and a triplet margin loss of 4096 values of ~10
    were inf (the sum of squares, ~4e5, leaves float16's 65504; torch: 3 / 0.5 / 11 ulps
    from the float64 truth) and so were their gradients: a ``MixedPrecisionTrainer`` skips
    every such step and its scale backs off towards 0. The NumPy Variance is inf, the NumPy
    AvgPool1D / AdaptiveAvgPool1D means are 18 / 65 ulps off (float16 partial sums; torch:
    0.5). Criterion of ``test_half_precision_layers``: never an ulp further from the truth
    than torch, never inf where torch is finite."""
    import half_precision_cases as hp

    r = hp.measure(name, _stat_cases()[name], kind, "float16")
    for key, ours in r["ours"].items():
        assert ours <= r["torch"][key] + 1, (key, ours, r["torch"][key])
