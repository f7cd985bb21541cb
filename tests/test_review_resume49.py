"""Review 49: a torch / Lightning / Keras / orbax user checkpoints and resumes training.

The user's programs on NumPy, torch and JAX: train, checkpoint mid-epoch and mid-window,
resume in fresh objects, and get the uninterrupted run bit for bit (parameters, optimizer
slots, EMA, scheduler, Accumulate's window, Dropout's masks, the data order of a seeded
shuffle, the loss scaler); the torch peer resumed through our files and through the torch
drop-in, the one-program JAX step; a refused scheduler load changes nothing. The files
themselves (foreign, damaged, safetensors reading ours) are in ``test_review_resume49_files.py``,
:class:`CheckpointManager`'s rotation in ``test_review_resume49_manager.py``.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.errors import CheckpointError
from mithril.utils.accumulation import Accumulate
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import Adam, AdamW

BACKENDS = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend, "jax": ml.JaxBackend}
N, BATCH = 40, 8  # 5 batches an epoch


def host(x) -> np.ndarray:
    return x.detach().numpy().copy() if isinstance(x, torch.Tensor) else np.array(x)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return rng.standard_normal((N, 6)), rng.standard_normal((N, 2))


def build(name: str):
    model = ml.Model()
    model |= ml.Linear(8)(input="input")
    model += ml.Tanh()
    model += ml.Dropout(0.3)
    model += ml.Linear(2)(output="output")
    backend = BACKENDS[name](dtype="float64", seed=3)
    return backend, ml.compile(model, backend, shapes={"input": [None, 6]})


class Run:
    """The user's loop: Dropout, AdamW with an EMA under Accumulate(3), StepLR stepped per
    applied window, the data shuffled each epoch by a seeded generator; a checkpoint holds
    the epoch, the batch, the generator's state at the epoch's start and Dropout's step."""

    def __init__(self, name: str):
        self.backend, self.cm = build(name)
        self.opt = Accumulate(AdamW(learning_rate=0.01, weight_decay=0.1, ema_decay=0.9), 3)
        self.sched = StepLR(self.opt, step_size=2, gamma=0.5)
        self.params = self.cm.get_parameters()
        self.state = self.opt.init(self.params)
        self.rng = np.random.default_rng(11)
        self.epoch = self.batch = 0
        self.new_epoch()
        self.seen: list[list[int]] = []

    def new_epoch(self) -> None:
        """This epoch's order, and the generator's state it was drawn from: a checkpoint
        taken at any batch of the epoch (0 included) resumes by drawing it again."""
        self.epoch_rng = self.rng.bit_generator.state
        self.perm = self.rng.permutation(N)

    def train(self, until: int) -> None:
        x_all, y_all = data()
        while self.epoch * (N // BATCH) + self.batch < until:
            idx = self.perm[self.batch * BATCH:(self.batch + 1) * BATCH]
            self.seen.append(idx.tolist())
            x, y = self.backend.array(x_all[idx]), self.backend.array(y_all[idx])
            out = self.cm.evaluate(self.params, {"input": x}, step=self.cm.step)["output"]
            _, grads = self.cm.evaluate(self.params, {"input": x},
                                        output_gradients={"output": 2 * (out - y)})
            self.params, self.state = self.opt.update(self.params, grads, self.state)
            if self.state.applied:
                self.sched.step()
            self.batch += 1
            if self.batch == N // BATCH:
                self.epoch, self.batch = self.epoch + 1, 0
                self.new_epoch()

    def save(self, path) -> None:
        save_checkpoint(path, self.params, self.opt, self.state, self.sched, extra={
            "epoch": self.epoch, "batch": self.batch, "rng": self.epoch_rng,
            "dropout_step": self.cm.step})

    def resume(self, path) -> None:
        ck = load_checkpoint(path, params_template=self.params, optimizer=self.opt,
                             scheduler=self.sched)
        self.params, self.state, e = ck["params"], ck["state"], ck["extra"]
        self.epoch, self.batch, self.cm.step = e["epoch"], e["batch"], e["dropout_step"]
        self.rng.bit_generator.state = e["rng"]
        self.new_epoch()  # the epoch's order, drawn again


@pytest.mark.parametrize("name, stop", [("numpy", 13), ("numpy", 10), ("numpy", 12),
                                        ("torch", 13), ("jax", 13)])
def test_resume_mid_epoch_mid_window_is_the_uninterrupted_run(name, stop, tmp_path):
    ref = Run(name)
    ref.train(23)
    path = tmp_path / "ckpt.safetensors"
    first = Run(name)
    first.train(stop)  # 13: epoch 2, batch 3, one micro-batch in the window; 10: an epoch's
    # end, one in the window; 12: mid-epoch, at a window's end
    assert (first.state.micro_step, first.batch) == {13: (1, 3), 10: (1, 0), 12: (0, 2)}[stop]
    first.save(path)
    again = Run(name)
    again.resume(path)
    again.train(23)
    assert first.seen + again.seen == ref.seen  # the data order of the run that did not stop
    assert again.cm.step == ref.cm.step == 23  # Dropout drew the same masks
    assert again.sched.last_step == ref.sched.last_step == 7
    assert again.opt.get_learning_rate() == ref.opt.get_learning_rate() == 0.01 * 0.5 ** 3
    for k in ref.params:
        np.testing.assert_array_equal(host(again.params[k]), host(ref.params[k]), err_msg=k)
    for slot in ("m", "v"):
        for k, v in ref.state.inner.slot(slot).items():
            np.testing.assert_array_equal(host(again.state.inner.slot(slot)[k]), host(v))
    ema, ema_ref = again.opt.ema_params(again.state), ref.opt.ema_params(ref.state)
    for k in ema_ref:
        np.testing.assert_array_equal(host(ema[k]), host(ema_ref[k]), err_msg=f"ema {k}")
    assert again.state.micro_step == ref.state.micro_step == 2


def _torch_pair():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8, dtype=torch.float64), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1, dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen)
    y = torch.randn(16, 1, dtype=torch.float64, generator=gen)
    return net, x, y


def test_our_resumed_run_is_torchs_uninterrupted_one(tmp_path):
    """torch.optim.Adam + StepLR for 12 steps against ours checkpointed after 5 and resumed
    into fresh objects, on the torch backend in float64."""
    net, x, y = _torch_pair()
    names = {"linear_0.weight": "0.weight", "linear_0.bias": "0.bias",
             "linear_1.weight": "2.weight", "linear_1.bias": "2.bias"}
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    for _ in range(12):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        sched.step()

    model = ml.Model()
    model |= ml.Linear(8)(input="input")
    model += ml.Tanh()
    model += ml.Linear(1)(output="output")
    cm = ml.compile(model, ml.TorchBackend(dtype="float64"), shapes={"input": [None, 4]})

    def train(params, o, st, s, n):
        for _ in range(n):
            out = cm.evaluate(params, {"input": x})["output"]
            _, g = cm.evaluate(params, {"input": x}, output_gradients={
                "output": 2 * (out - y) / y.numel()})
            params, st = o.update(params, g, st)
            s.step()
        return params, st

    ours = {k: start[v].clone() for k, v in names.items()}
    o = Adam(learning_rate=0.05, weight_decay=0.01)
    s = StepLR(o, 3, 0.5)
    ours, st = train(ours, o, o.init(ours), s, 5)
    save_checkpoint(tmp_path / "c.safetensors", ours, o, st, s)
    o2 = Adam()
    s2 = StepLR(o2, 100)
    ck = load_checkpoint(tmp_path / "c.safetensors", params_template=ours, optimizer=o2,
                         scheduler=s2)
    ours, st = train(ck["params"], o2, ck["state"], s2, 7)
    got = max(float((ours[k] - net.state_dict()[v]).abs().max()) for k, v in names.items())
    assert got < 1e-12, got
    assert o2.get_learning_rate() == sched.get_last_lr()[0] == 0.05 * 0.5 ** 4


def test_torch_state_dict_through_the_drop_in_and_back_is_torchs_run(tmp_path):
    """torch Adam 5 steps -> its state dict into the drop-in (our Adam) 3 steps -> the
    drop-in's state dict through torch.save(weights_only) into torch Adam 4 steps: the
    12 uninterrupted torch steps (to an ulp: our Adam for 3 steps). The drop-in's state saved with
    save_checkpoint loads back with its step count."""
    from mithril.interop import torch_optimizer

    net, x, y = _torch_pair()
    ref = copy.deepcopy(net)

    def steps(model, opt, sched, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    o = torch.optim.Adam(ref.parameters(), lr=0.01, weight_decay=0.01)
    steps(ref, o, torch.optim.lr_scheduler.StepLR(o, 2, 0.5), 12)
    o = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=0.01)
    s = torch.optim.lr_scheduler.StepLR(o, 2, 0.5)
    steps(net, o, s, 5)
    drop = torch_optimizer(Adam(learning_rate=0.5), net.named_parameters())
    drop.load_state_dict(copy.deepcopy(o.state_dict()))
    s2 = torch.optim.lr_scheduler.StepLR(drop, 2, 0.5)
    s2.load_state_dict(s.state_dict())
    steps(net, drop, s2, 3)
    params = {k: v.detach() for k, v in net.named_parameters()}
    save_checkpoint(tmp_path / "d.safetensors", params, drop.mithril_optimizer,
                    drop.mithril_state, extra={"scheduler": s2.state_dict()})
    ck = load_checkpoint(tmp_path / "d.safetensors", params_template=params, optimizer=Adam())
    assert ck["state"].step == 8 and ck["extra"]["scheduler"]["last_epoch"] == 8
    for k, v in drop.state.items():
        name = dict(zip(map(id, net.parameters()), params))[id(k)]
        np.testing.assert_array_equal(host(ck["state"].slot("m")[name]), host(v["exp_avg"]))
    buf = io.BytesIO()
    torch.save(drop.state_dict(), buf)
    buf.seek(0)
    o3 = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=0.01)
    o3.load_state_dict(torch.load(buf, weights_only=True))
    s3 = torch.optim.lr_scheduler.StepLR(o3, 2, 0.5)
    s3.load_state_dict(s2.state_dict())
    steps(net, o3, s3, 4)
    for (k, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        assert float((a - b).abs().max()) < 1e-14, k  # (our Adam rounds as torch within 1 ulp)


def test_loss_scaler_resumes_with_its_scale_and_loads_into_gradscaler(tmp_path):
    """A float16 run under MixedPrecisionTrainer (growth interval 2, overflows early):
    checkpointed after 5 steps with trainer.state_dict() in extra, resumed: the scales,
    skips and masters of the run that did not stop; the saved scaler loads into
    torch.amp.GradScaler with the same scale and tracker."""
    from mithril.utils.mixed_precision import MixedPrecisionTrainer

    rng = np.random.default_rng(5)
    xs = (rng.standard_normal((12, 8, 6)) * np.geomspace(40, 0.5, 12)[:, None, None])
    ys = torch.tensor(rng.standard_normal((8, 2)), dtype=torch.float32)

    def run(n, save_at=None, resume=None):
        backend = ml.TorchBackend(dtype="float16", seed=3)
        model = ml.Model()
        model |= ml.Linear(8)(input="input")
        model += ml.Relu()
        model += ml.Linear(2)(output="output")
        cm = ml.compile(model, backend, shapes={"input": [None, 6]})
        opt = Adam(learning_rate=0.01)
        sched = StepLR(opt, 3, 0.5)
        masters = {k: v.float() for k, v in cm.get_parameters().items()}
        state, i, amp = opt.init(masters), 0, None
        if resume:
            ck = load_checkpoint(resume, params_template=masters, optimizer=opt,
                                 scheduler=sched)
            masters, state, i, amp = ck["params"], ck["state"], ck["extra"]["i"], \
                ck["extra"]["amp"]
        tr = MixedPrecisionTrainer(cm, opt, masters, state, loss_scale=2.0 ** 12,
                                   growth_interval=2)
        if amp is not None:
            tr.load_state_dict(amp)
        scales = []
        while i < n:
            out = tr.forward({"input": backend.array(xs[i].astype(np.float16))})["output"]
            tr.backward_and_update({"output": 2 * (out.float() - ys)})
            tr.step_scheduler(sched)
            scales.append(tr.loss_scale)
            i += 1
            if i == save_at:
                save_checkpoint(tmp_path / "amp.safetensors", tr.master_params, opt,
                                tr.optimizer_state, sched, extra={"i": i, "amp": tr.state_dict()})
                return scales, tr
        return scales, tr

    ref_scales, ref = run(12)
    assert 0 < ref.num_skipped_steps < 12 and len(set(ref_scales)) > 2
    head, first = run(12, save_at=5)
    tail, again = run(12, resume=tmp_path / "amp.safetensors")
    assert head + tail == ref_scales
    assert again.num_skipped_steps == ref.num_skipped_steps
    for k, v in ref.master_params.items():
        assert torch.equal(again.master_params[k], v), k
    saved = load_checkpoint(tmp_path / "amp.safetensors")["extra"]["amp"]["scaler"]
    peer = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=2)
    peer.load_state_dict(saved)
    assert peer.get_scale() == first.loss_scale == head[-1]
    assert peer.state_dict()["_growth_tracker"] == first.scaler.growth_tracker


def _drop_in_run(steps: int):
    from mithril.interop import torch_optimizer

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1, dtype=torch.float64)
    drop = torch_optimizer(Adam(0.1), net.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(drop, 2, 0.5)
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    for _ in range(steps):
        drop.zero_grad()
        (net(x) ** 2).sum().backward()
        drop.step()
        sched.step()
    return net, drop, sched, x


def test_a_torch_scheduler_over_the_drop_in_loads_from_a_checkpoint(tmp_path):
    """Before: TypeError "a mithril torch_optimizer cannot be pickled or deep-copied" from
    the load's trial copy of the scheduler's optimizer."""
    from mithril.interop import torch_optimizer

    net, drop, sched, _ = _drop_in_run(3)
    params = {k: v.detach() for k, v in net.named_parameters()}
    save_checkpoint(tmp_path / "c.safetensors", params, drop.mithril_optimizer,
                    drop.mithril_state, sched)
    fresh = torch_optimizer(Adam(0.1), torch.nn.Linear(3, 1, dtype=torch.float64)
                            .named_parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(fresh, 5, 0.9)
    load_checkpoint(tmp_path / "c.safetensors", params_template=params, scheduler=sched2)
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == [0.05]


def test_the_drop_in_resumes_from_a_save_checkpoint_file(tmp_path):
    from mithril.interop import torch_optimizer

    ref, ref_drop, _, x = _drop_in_run(6)
    net, drop, sched, _ = _drop_in_run(3)
    params = {k: v.detach() for k, v in net.named_parameters()}
    save_checkpoint(tmp_path / "c.safetensors", params, drop.mithril_optimizer,
                    drop.mithril_state, sched)
    net2 = torch.nn.Linear(3, 1, dtype=torch.float64)
    fresh = torch_optimizer(Adam(0.1), net2.named_parameters())
    sched2 = torch.optim.lr_scheduler.StepLR(fresh, 2, 0.5)
    ck = load_checkpoint(tmp_path / "c.safetensors", params_template=params, scheduler=sched2)
    with torch.no_grad():
        for k, v in net2.named_parameters():
            v.copy_(ck["params"][k])
    fresh.load_state_dict(ck["optimizer_state_dict"])  # (was refused: no 'mithril' entry)
    for _ in range(3):
        fresh.zero_grad()
        (net2(x) ** 2).sum().backward()
        fresh.step()
        sched2.step()
    for (k, a), b in zip(ref.named_parameters(), net2.parameters()):
        assert torch.equal(a, b), k


def test_our_schedulers_state_is_not_taken_by_torchs_of_the_same_name(tmp_path):
    """Before: torch's StepLR.load_state_dict took our StepLR's dict (it updates __dict__
    with anything), kept its own last_epoch 0 and gained our keys: a silent restart of the
    schedule."""
    net, drop, _, _ = _drop_in_run(0)
    p = {k: v.detach() for k, v in net.named_parameters()}
    ours = Adam(0.1)
    mine = StepLR(ours, 2, 0.5)
    for _ in range(3):
        mine.step()
    save_checkpoint(tmp_path / "c.safetensors", p, scheduler=mine)
    theirs = torch.optim.lr_scheduler.StepLR(drop, 2, 0.5)
    before = theirs.state_dict()
    with pytest.raises(CheckpointError, match=r"'scheduler.state' has the keys of another "
                                              r"StepLR: missing \[.*'last_epoch'"):
        load_checkpoint(tmp_path / "c.safetensors", scheduler=theirs)
    assert theirs.state_dict() == before


def test_the_one_program_jax_step_resumes_with_its_dropout_masks_and_ema(tmp_path):
    """A JAX user's jitted step (make_train_step) with Dropout, Adam's EMA and StepLR:
    3 steps, saved through to_optimizer_state, resumed in fresh objects through
    from_optimizer_state: the 6 uninterrupted steps bit for bit."""
    from mithril.utils.training import make_train_step

    rng = np.random.default_rng(0)
    xs, ts = rng.standard_normal((6, 4, 5)).astype(np.float32), rng.integers(0, 3, (6, 4))

    def build():
        model = ml.Model()
        model |= ml.Linear(8)(input="input")
        model += ml.Dropout(0.5)
        model += ml.Linear(3)(output="logits")
        model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
        backend = ml.JaxBackend(seed=4)
        cm = ml.compile(model, backend, shapes={"input": [None, 5]})
        opt = Adam(learning_rate=1e-2, ema_decay=0.9)
        return backend, cm, opt, StepLR(opt, 2, 0.5), make_train_step(cm, opt, loss="loss")

    def steps(run, params, fused, a, b):
        backend, _, _, sched, step = run
        for i in range(a, b):
            data = {"input": backend.array(xs[i]),
                    "target": backend.array(ts[i], backend.int_dtype)}
            params, fused, _ = step(params, fused, data)
            sched.step()
        return params, fused

    ref = build()
    p = ref[1].get_parameters()
    ref_p, ref_fused = steps(ref, p, ref[4].init(p), 0, 6)
    first = build()
    p = first[1].get_parameters()
    p, fused = steps(first, p, first[4].init(p), 0, 3)
    save_checkpoint(tmp_path / "j.safetensors", p, first[2], first[4].to_optimizer_state(fused, p),
                    first[3], extra={"dropout_step": first[1].step})
    again = build()
    ck = load_checkpoint(tmp_path / "j.safetensors", params_template=again[1].get_parameters(),
                         optimizer=again[2], scheduler=again[3])
    again[1].step = ck["extra"]["dropout_step"]
    p, fused = steps(again, ck["params"], again[4].from_optimizer_state(ck["state"]), 3, 6)
    assert again[1].step == ref[1].step == 6
    for k in ref_p:
        np.testing.assert_array_equal(np.asarray(p[k]), np.asarray(ref_p[k]), err_msg=k)
    ema = again[2].ema_params(again[4].to_optimizer_state(fused, p))
    ema_ref = ref[2].ema_params(ref[4].to_optimizer_state(ref_fused, ref_p))
    for k in ema_ref:
        np.testing.assert_array_equal(np.asarray(ema[k]), np.asarray(ema_ref[k]), err_msg=k)


def test_a_refused_scheduler_over_accumulate_leaves_the_learning_rate(tmp_path):
    """The load tries the scheduler on a copy first; the copy of an Accumulate shared the
    wrapped optimizer, so a trial that set the rate and then failed changed the real one
    (before: 0.05 left behind by a refused load)."""
    p = {"w": np.ones(2)}
    acc = Accumulate(Adam(0.1), 2)
    state, sched = acc.init(p), StepLR(acc, 1, 0.5)
    for _ in range(2):
        p, state = acc.update(p, {"w": np.ones(2)}, state)
        if state.applied:
            sched.step()
    save_checkpoint(tmp_path / "c.safetensors", p, acc, state, sched)

    class LateStepLR(StepLR):  # sets the rate, then refuses (as a check after _apply would)
        def load_state_dict(self, d):
            super().load_state_dict(d)
            raise ValueError("refused late")

    LateStepLR.__name__ = "StepLR"
    acc2 = Accumulate(Adam(0.7), 2)
    late = LateStepLR(acc2, 1, 0.5)
    with pytest.raises(CheckpointError, match="'scheduler.state' is refused.*refused late"):
        load_checkpoint(tmp_path / "c.safetensors", params_template=p, optimizer=acc2,
                        scheduler=late)
    assert acc2.optimizer.learning_rate == acc2.get_learning_rate() == 0.7
