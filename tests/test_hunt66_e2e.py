"""End-to-end training against a hand-written torch loop in float64: a CNN (BatchNorm,
Dropout(p=0), train / eval switching), a pre-LN causal transformer block with a key padding
mask, and LSTM / GRU classifiers over variable lengths (torch's packed sequences), each
trained with ``make_train_step`` (AdamW + a scheduler + clipping) on NumPy, torch and JAX,
with the batch size changing between steps and a checkpoint resumed mid-run."""

import os

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import mithril as ml
from mithril.interop import params_from_torch
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import (
    CosineAnnealingLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
    StepLR,
)
from mithril.utils.optimizers import AdamW
from mithril.utils.training import make_train_step

BACKENDS = [ml.NumpyBackend, ml.TorchBackend, ml.JaxBackend]
TOL = 1e-10


def _np(backend, x):
    return np.asarray(backend.to_numpy(x), dtype=np.float64)


def _grad_norm(step, opt_state):
    norm = getattr(step, "last_grad_norm", None)
    return float(opt_state.last_grad_norm if norm is None else norm)


def _torch_loop(net, batches, forward, make_sched, lr, wd, clip, betas=(0.9, 0.999), probe=None):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd, betas=betas)
    sched = make_sched(opt)
    ref = []
    for batch in batches:
        net.train()
        opt.zero_grad()
        loss = forward(net, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        sched.step()
        extra = None
        if probe is not None:
            net.eval()
            with torch.no_grad():
                extra = probe(net)
        ref.append((loss.item(), norm.item(), extra,
                    {k: v.detach().clone() for k, v in net.state_dict().items()}))
    return ref


def _run(backend, compiled, fresh_sd, names, batches, to_data, make_opt, ref, tmp_path,
         stop=None, resume=None, stateful=False, probe=None):
    """Train from the torch initial weights; compare with ``ref`` at every step. ``stop``:
    save a checkpoint after that many steps and return its path."""
    params, state = params_from_torch(compiled, fresh_sd, names)
    opt, sched = make_opt()
    step = make_train_step(compiled, opt, loss="loss", grad_norm=True)
    opt_state, start = step.init(params), 0
    if resume is not None:
        ckpt = load_checkpoint(resume, params_template=params, optimizer=opt, scheduler=sched,
                               model_state_template=state if stateful else None)
        params, start = ckpt["params"], ckpt["extra"]["i"]
        opt_state = step.from_optimizer_state(ckpt["state"])
        if stateful:
            state = ckpt["model_state"]
    for i in range(start, len(batches)):
        data = to_data(backend, batches[i])
        if stateful:
            params, opt_state, out, state = step(params, opt_state, data, state=state)
        else:
            params, opt_state, out = step(params, opt_state, data)
        sched.step()
        loss, norm, extra, sd = ref[i]
        assert abs(float(_np(backend, out["loss"])) - loss) < TOL, (i, "loss")
        assert abs(_grad_norm(step, opt_state) - norm) < TOL, (i, "grad norm")
        want_p, want_s = params_from_torch(compiled, sd, names)
        for k in want_p:
            np.testing.assert_allclose(_np(backend, params[k]), _np(backend, want_p[k]),
                                       rtol=0, atol=TOL, err_msg=f"step {i} {k}")
        for k in want_s:
            np.testing.assert_allclose(_np(backend, state[k]), _np(backend, want_s[k]),
                                       rtol=0, atol=TOL, err_msg=f"step {i} {k}")
        if probe is not None:
            got, new_state = probe(backend, compiled, params, state)
            np.testing.assert_allclose(got, extra, rtol=0, atol=TOL, err_msg=f"eval {i}")
            for k in new_state:  # eval mode leaves the running statistics alone
                assert np.array_equal(_np(backend, new_state[k]), _np(backend, state[k]))
        if stop is not None and i + 1 == stop:
            path = os.path.join(str(tmp_path), f"{type(backend).__name__}.safetensors")
            save_checkpoint(path, params, opt, step.to_optimizer_state(opt_state, params), sched,
                            extra={"i": i + 1}, model_state=state if stateful else None)
            return path
    return params, state


# ---------------------------------------------------------------- CNN
def _cnn_torch():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4, momentum=0.2),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.0),
        torch.nn.Linear(16 * 4, 6, bias=False), torch.nn.BatchNorm1d(6, momentum=None),
        torch.nn.GELU(), torch.nn.Linear(6, 5)).double()


def _cnn_model():
    m = ml.Model()
    m |= ml.Convolution2D(3, 4, padding=1, use_bias=False)(input="input")
    m += ml.BatchNorm2D(4, momentum=0.2)
    m += ml.Relu()
    m += ml.MaxPool2D(2)
    m += ml.Flatten()
    m += ml.Dropout(0.0)
    m += ml.Linear(6, use_bias=False)
    m += ml.BatchNorm1D(6, momentum=None)
    m += ml.Gelu()
    m += ml.Linear(5)(output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_cnn_batchnorm_train_eval_checkpoint(backend_cls, tmp_path):
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((n, 1, 8, 8)), rng.integers(0, 5, n))
               for n in (8, 2, 5, 8, 2, 8, 5, 8)]
    x_eval, y_eval = rng.standard_normal((4, 1, 8, 8)), rng.integers(0, 5, 4)

    def forward(net, batch):
        return torch.nn.functional.cross_entropy(net(torch.tensor(batch[0])),
                                                 torch.tensor(batch[1]))

    def torch_probe(net):
        return net(torch.tensor(x_eval)).numpy()

    def probe(backend, compiled, params, state):
        data = {"input": backend.array(x_eval), "target": backend.array(y_eval, backend.int_dtype)}
        out, new_state = compiled.evaluate(params, data, state=state, training=False)
        return _np(backend, out["logits"]), new_state

    def make_sched(opt):
        return torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, 3),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6, 1e-4)], milestones=[3])

    ref = _torch_loop(_cnn_torch(), batches, forward, make_sched, 1e-2, 0.05, 0.5,
                      probe=torch_probe)

    def make_opt():
        opt = AdamW(learning_rate=1e-2, weight_decay=0.05, clip_norm=0.5)
        return opt, SequentialLR(opt, [LinearLR(opt, 0.1, 1.0, 3),
                                       CosineAnnealingLR(opt, 6, 1e-4)], milestones=[3])

    def to_data(backend, batch):
        return {"input": backend.array(batch[0]), "target": backend.array(batch[1],
                                                                          backend.int_dtype)}

    backend = backend_cls(dtype="float64", seed=0)
    compiled = ml.compile(_cnn_model(), backend, shapes={"input": [None, 1, 8, 8]})
    args = (backend, compiled, _cnn_torch().state_dict(), None, batches, to_data, make_opt, ref,
            tmp_path)
    _run(*args, stateful=True, probe=probe)
    path = _run(*args, stateful=True, stop=3)
    _run(*args, stateful=True, resume=path, probe=probe)


# ---------------------------------------------------------------- transformer
D, HEADS, FF, VOCAB, L, IN = 8, 2, 16, 5, 6, 3


class _TorchLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(IN, D)
        self.enc = torch.nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu",
                                                    batch_first=True, norm_first=True)
        self.ln = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, VOCAB)
        self.double()

    def forward(self, x, pad):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        pad = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, -torch.inf)
        h = self.enc(self.inp(x), src_mask=mask, src_key_padding_mask=pad, is_causal=True)
        return self.head(self.ln(h))


def _lm_model():
    def hid(n):
        return ml.IOKey(n, expose=False)
    m = ml.Model()
    m |= ml.Linear(D)(input="input", output=hid("h0"))
    m |= ml.TransformerBlock(D, HEADS, FF, activation="gelu", is_causal=True,
                             use_key_padding_mask=True)(input="h0", key_padding_mask="pad",
                                                        output=hid("h1"))
    m |= ml.LayerNorm()(input="h1", output=hid("f"))
    m |= ml.Linear(VOCAB)(input="f", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_transformer_causal_padding_onecycle(backend_cls, tmp_path):
    rng = np.random.default_rng(0)

    def make(n):
        lengths = rng.integers(1, L + 1, n)
        pad = np.arange(L)[None] >= lengths[:, None]          # right padding: True is ignored
        return rng.standard_normal((n, L, IN)), pad, rng.integers(0, VOCAB, (n, L))

    batches = [make(n) for n in (4, 4, 3, 4, 3, 4, 4, 3)]
    x_eval, pad_eval, _ = make(3)

    def forward(net, batch):
        logits = net(torch.tensor(batch[0]), torch.tensor(batch[1]))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                 torch.tensor(batch[2]).reshape(-1))

    ref = _torch_loop(_TorchLM(), batches, forward,
                      lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 3e-2, total_steps=8),
                      1e-2, 0.1, 0.3, probe=lambda net: net(torch.tensor(x_eval),
                                                             torch.tensor(pad_eval)).numpy())

    def make_opt():
        opt = AdamW(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.3)
        return opt, OneCycleLR(opt, 3e-2, total_steps=8, cycle_momentum=True)

    def to_data(backend, batch):
        return {"input": backend.array(batch[0]), "pad": backend.array(batch[1]),
                "target": backend.array(batch[2], backend.int_dtype)}

    def probe(backend, compiled, params, state):
        data = to_data(backend, (x_eval, pad_eval, np.zeros((3, L), dtype=int)))
        return _np(backend, compiled.evaluate(params, data, training=False)["logits"]), {}

    names = {"inp": "linear_0", "enc": "transformer_block", "ln": "layer_norm",
             "head": "linear_1"}
    backend = backend_cls(dtype="float64", seed=0)
    compiled = ml.compile(_lm_model(), backend, shapes={"input": [None, L, IN]})
    args = (backend, compiled, _TorchLM().state_dict(), names, batches, to_data, make_opt, ref,
            tmp_path)
    _run(*args, probe=probe)
    path = _run(*args, stop=5)
    _run(*args, resume=path)


# ---------------------------------------------------------------- recurrent
T, HID, CLASSES = 5, 4, 3


def _rnn_torch(cell):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.rnn = getattr(torch.nn, cell)(IN, HID, num_layers=2, bidirectional=True,
                                               batch_first=True)
            self.fc = torch.nn.Linear(2 * HID, CLASSES)
            self.double()

        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            hidden = self.rnn(packed)[1]
            hidden = hidden[0] if cell == "LSTM" else hidden
            return self.fc(torch.cat([hidden[-2], hidden[-1]], dim=1))
    return Net()


def _rnn_model(cell):
    def hid(n):
        return ml.IOKey(n, expose=False)
    m = ml.Model()
    m |= getattr(ml, cell)(HID, num_layers=2, bidirectional=True, batch_first=True,
                           lengths=True)(input="input", lengths="lengths", hidden=hid("h"))
    m |= ml.Indexer(-2)(input="h", output=hid("a"))
    m |= ml.Indexer(-1)(input="h", output=hid("b"))
    m |= ml.Concat(2, axis=1)(input1="a", input2="b", output=hid("feat"))
    m |= ml.Linear(CLASSES)(input="feat", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return m


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_recurrent_packed_classifier(backend_cls, cell, tmp_path):
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((n, T, IN)), rng.integers(1, T + 1, n),
                rng.integers(0, CLASSES, n)) for n in (4, 4, 1, 4, 3, 4, 4, 3)]

    def forward(net, batch):
        return torch.nn.functional.cross_entropy(
            net(torch.tensor(batch[0]), torch.tensor(batch[1])), torch.tensor(batch[2]))

    ref = _torch_loop(_rnn_torch(cell), batches, forward,
                      lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                      2e-2, 0.01, 0.2, betas=(0.8, 0.99))

    def make_opt():
        opt = AdamW(learning_rate=2e-2, weight_decay=0.01, beta1=0.8, beta2=0.99, clip_norm=0.2)
        return opt, StepLR(opt, 3, 0.5)

    def to_data(backend, batch):
        return {"input": backend.array(batch[0]),
                "lengths": backend.array(batch[1], backend.int_dtype),
                "target": backend.array(batch[2], backend.int_dtype)}

    backend = backend_cls(dtype="float64", seed=0)
    compiled = ml.compile(_rnn_model(cell), backend, shapes={"input": [None, T, IN]})
    args = (backend, compiled, _rnn_torch(cell).state_dict(), None, batches, to_data, make_opt,
            ref, tmp_path)
    _run(*args)
    path = _run(*args, stop=4)
    _run(*args, resume=path)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_lengths_of_another_batch_names_the_batch_size(backend_cls):
    # a batch_first input (3, 5, 3) reaches the check time-major, (5, 3, 3): the error named
    # that shape as "the batch of 'input'", a shape the user never gave; it now names N = 3
    backend = backend_cls(dtype="float64", seed=0)
    compiled = ml.compile(_rnn_model("GRU"), backend, shapes={"input": [None, T, IN]})
    params = compiled.get_parameters()
    step = make_train_step(compiled, AdamW(learning_rate=1e-2), loss="loss")
    opt_state = step.init(params)
    before = {k: _np(backend, v).copy() for k, v in params.items()}
    data = {"input": backend.array(np.ones((3, T, IN))),
            "lengths": backend.array(np.array([5, 2]), backend.int_dtype),
            "target": backend.array(np.array([0, 1, 2]), backend.int_dtype)}
    with pytest.raises(ml.ShapeError, match=r"'lengths' must be \(N,\), one length per sequence "
                                            r"of the batch \(N = 3: 'input' is \[5, 3, 3\] in "
                                            r"time-major \(T, N, I\) order\), got shape \[2\]"):
        step(params, opt_state, data)
    assert all(np.array_equal(_np(backend, params[k]), before[k]) for k in before)
