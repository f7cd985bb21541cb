"""Four typical training scripts of torch, optax, Keras 3 and a CSV user, each ported to
Mithril from the README and docs/*.md only, run side by side with the original on the same data
and initial weights (float64). Where the maths is the same the numbers agree to 1e-9; where
they do not, the test pins down why:

* optax evaluates ``warmup_cosine_decay_schedule`` at its int32 step count, which gives float32
  learning rates even under ``jax_enable_x64`` (7.6e-9 on the weights after 40 steps): the peer
  runs with its schedule evaluated in float64 for the 1e-9 comparison;
* the optimizers' fused ``clip_norm`` is torch's ``clip_grad_norm_`` (``c / (‖g‖ + 1e-6)``) by
  default; optax's ``clip_by_global_norm`` and Keras's ``global_clipnorm`` have no 1e-6: the
  ports say ``clip_eps=0.0`` (``make_train_step`` too; with the default, 1.9e-7 on the weights
  after 40 steps), or clip separately with ``clip_gradients(eps=0)``;
* torch's ``OneCycleLR`` cycles AdamW's β₁ by default (``cycle_momentum=True``); ours does only
  when asked.

The optax and Keras halves run in a fresh interpreter (``tests/porting_hunt_peers.py``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python, usage_error
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import mithril as ml
from mithril.cli import main
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import CosineAnnealingLR, OneCycleLR
from mithril.utils.optimizers import Adam, AdamW
from mithril.utils.training import make_train_step

TOL = 1e-9
HERE = Path(__file__).parent

# -- 1. torch: a small CNN, AdamW + OneCycleLR per batch + clip_grad_norm_ ---------------------

EPOCHS, BATCH, MAX_LR, WD = 3, 32, 5e-2, 0.05


def _digits() -> tuple[np.ndarray, ...]:
    d = load_digits()
    x, y = (d.images[:320] / 16.0)[:, None], d.target[:320]  # (N, 1, 8, 8), channels first
    return x[:256], y[:256], x[256:], y[256:]


def _cnn() -> ml.Model:
    model = ml.Model()
    model |= ml.Convolution2D(3, 4, padding=1)(input="input")
    model += ml.Relu()
    model += ml.MaxPool2D(2)
    model += ml.Flatten()
    model += ml.Linear(10)(output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return model


def _torch_run(p0: dict[str, np.ndarray], x, y, orders) -> tuple[torch.nn.Module, list[float]]:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(64, 10)).double()
    with torch.no_grad():  # the same names' order and layouts: (out, in, kh, kw), (out, in)
        for t, name in zip(net.parameters(), p0):
            t.copy_(torch.from_numpy(p0[name]))
    opt = torch.optim.AdamW(net.parameters(), lr=MAX_LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR,
                                                total_steps=EPOCHS * len(x) // BATCH)
    loss_fn, losses, norms = torch.nn.CrossEntropyLoss(), [], []
    for order in orders:
        for i in range(0, len(x), BATCH):
            b = order[i:i + BATCH]
            opt.zero_grad()
            loss = loss_fn(net(torch.from_numpy(x[b])), torch.from_numpy(y[b]))
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)))
            opt.step()
            sched.step()
            losses.append(loss.item())
    return net, losses, norms


def _port(compiled):
    opt = AdamW(learning_rate=MAX_LR, weight_decay=WD, clip_norm=1.0)
    # torch's OneCycleLR cycles β₁ (0.85 <-> 0.95) unless told not to; ours only when asked
    sched = OneCycleLR(opt, max_lr=MAX_LR, total_steps=EPOCHS * 256 // BATCH,
                       cycle_momentum=True)
    return opt, sched, make_train_step(compiled, opt, loss="loss")


def _epochs(step, sched, params, state, x, y, orders, losses, norms=None):
    be = step.backend
    for order in orders:
        for i in range(0, len(x), BATCH):
            b = order[i:i + BATCH]
            data = {"input": be.array(x[b]), "target": be.array(y[b], be.int_dtype)}
            params, state, out = step(params, state, data)
            sched.step()
            losses.append(float(out["loss"]))
            if norms is not None:  # the norm before clipping, as clip_grad_norm_ returns it
                norms.append(float(state.last_grad_norm))
    return params, state


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_torch_cnn_adamw_onecycle_clip_then_checkpoint_resume(tmp_path, backend):
    be = {"numpy": ml.NumpyBackend, "torch": ml.TorchBackend}[backend](dtype="float64")
    x, y, x_test, y_test = _digits()
    orders = [np.random.default_rng(e).permutation(len(x)) for e in range(EPOCHS)]
    compiled = ml.compile(_cnn(), be, shapes={"input": [None, 1, 8, 8]})
    p0 = {k: be.to_numpy(v).copy() for k, v in compiled.get_parameters().items()}
    net, ref_losses, ref_norms = _torch_run(p0, x, y, orders)

    opt, sched, step = _port(compiled)
    params = {k: be.array(v) for k, v in p0.items()}
    losses: list[float] = []
    norms: list[float] = []
    params, state = _epochs(step, sched, params, step.init(params), x, y, orders, losses, norms)
    assert np.abs(np.array(losses) - ref_losses).max() < TOL
    assert np.abs(np.array(norms) - ref_norms).max() < TOL and max(norms) > 1.0  # it clipped
    params = {k: be.to_numpy(v) for k, v in params.items()}
    for t, name in zip(net.parameters(), params):
        assert np.abs(t.detach().numpy() - params[name]).max() < TOL, name
    logits = be.to_numpy(compiled.evaluate(
        {k: be.array(v) for k, v in params.items()},
        {"input": be.array(x_test), "target": be.array(y_test, be.int_dtype)})["logits"])
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()
    assert np.abs(logits - ref).max() < TOL
    accuracy = np.mean(logits.argmax(1) == y_test)
    assert accuracy == np.mean(ref.argmax(1) == y_test) and accuracy > 0.6

    # stop after an epoch, save, rebuild everything, load, go on: the uninterrupted run
    opt, sched, step = _port(compiled)
    half = {k: be.array(v) for k, v in p0.items()}
    resumed: list[float] = []
    half, half_state = _epochs(step, sched, half, step.init(half), x, y, orders[:1], resumed)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, half, opt, half_state, sched, extra={"epoch": 1})
    opt, sched, step = _port(compiled)
    ckpt = load_checkpoint(path, params_template=compiled.get_parameters(), optimizer=opt,
                           scheduler=sched)
    again, _ = _epochs(step, sched, ckpt["params"], ckpt["state"], x, y,
                       orders[ckpt["extra"]["epoch"]:], resumed)
    assert resumed == losses
    assert all(np.array_equal(be.to_numpy(again[k]), params[k]) for k in params)


@pytest.mark.slow
def test_torch_cnn_on_the_one_program_jax_step():
    n = _peers("torch_cnn_on_jax_run")
    assert n["fused"] == 1 and n["rebuilds"] == 1  # β₁ and the rate: traced from the 1st change
    assert n["losses"] < TOL and n["params"] < TOL


def test_torch_cnn_batchnorm_running_stats_eval_and_checkpoint(tmp_path):
    """Conv2d(bias=False) -> BatchNorm2d -> ...: the running statistics are model state
    (``state=``), saved with ``model_state=``. (With a conv bias before BatchNorm the bias's
    true gradient is 0: Adam steps on its rounding noise, ~1e-7 apart from torch's.)"""
    x, y, x_test, y_test = _digits()
    orders = [np.random.default_rng(e).permutation(len(x)) for e in range(2)]
    model = ml.Model()
    model |= ml.Convolution2D(3, 4, padding=1, use_bias=False)(input="input")
    model += ml.BatchNorm2D(4)
    model += ml.Relu()
    model += ml.MaxPool2D(2)
    model += ml.Flatten()
    model += ml.Linear(10)(output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    compiled = ml.compile(model, ml.NumpyBackend(dtype="float64"),
                          shapes={"input": [None, 1, 8, 8]})
    p0 = {k: v.copy() for k, v in compiled.get_parameters().items()}
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False),
                              torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    with torch.no_grad():
        for t, name in zip(net.parameters(), p0):
            t.copy_(torch.from_numpy(p0[name]))
    ref_opt = torch.optim.AdamW(net.parameters(), lr=MAX_LR, weight_decay=WD)

    def run(params, opt_state, model_state, step, epochs):
        for order in epochs:
            for i in range(0, len(x), BATCH):
                b = order[i:i + BATCH]
                params, opt_state, _, model_state = step(
                    params, opt_state, {"input": x[b], "target": y[b]}, state=model_state)
        return params, opt_state, model_state

    for order in orders:
        for i in range(0, len(x), BATCH):
            b = order[i:i + BATCH]
            ref_opt.zero_grad()
            torch.nn.functional.cross_entropy(net(torch.from_numpy(x[b])),
                                              torch.from_numpy(y[b])).backward()
            ref_opt.step()
    step = make_train_step(compiled, AdamW(learning_rate=MAX_LR, weight_decay=WD), loss="loss")
    params = {k: v.copy() for k, v in p0.items()}
    params, _, stats = run(params, step.init(params), compiled.initial_state_dict, step, orders)
    for t, name in zip(net.parameters(), params):
        assert np.abs(t.detach().numpy() - params[name]).max() < TOL, name
    buffers = net.state_dict()
    for ours, theirs in (("running_mean", "1.running_mean"), ("running_var", "1.running_var"),
                         ("num_batches_tracked", "1.num_batches_tracked")):
        assert np.abs(np.asarray(stats[f"batch_norm2_d.{ours}"])
                      - buffers[theirs].numpy()).max() < TOL, ours
    net.eval()
    test, _ = compiled.evaluate(params, {"input": x_test, "target": y_test}, state=stats,
                                training=False)
    with torch.no_grad():
        assert np.abs(test["logits"] - net(torch.from_numpy(x_test)).numpy()).max() < TOL

    opt = AdamW(learning_rate=MAX_LR, weight_decay=WD)
    step = make_train_step(compiled, opt, loss="loss")
    half = {k: v.copy() for k, v in p0.items()}
    half, half_state, half_stats = run(half, step.init(half), compiled.initial_state_dict, step,
                                       orders[:1])
    save_checkpoint(tmp_path / "bn.safetensors", half, opt, half_state, model_state=half_stats)
    opt = AdamW()
    ckpt = load_checkpoint(tmp_path / "bn.safetensors", params_template=p0, optimizer=opt,
                           model_state_template=compiled.initial_state_dict)
    step = make_train_step(compiled, opt, loss="loss")
    again, _, again_stats = run(ckpt["params"], ckpt["state"], ckpt["model_state"], step,
                                orders[1:])
    assert all(np.array_equal(again[k], params[k]) for k in params)
    assert all(np.array_equal(np.asarray(again_stats[k]), np.asarray(stats[k])) for k in stats)


# -- 2. optax: clip_by_global_norm + adamw(warmup cosine, mask) in a jitted step ---------------

def _peers(what: str) -> dict:
    out = run_python(f"import sys, json\nsys.path.insert(0, {str(HERE)!r})\n"
                     f"import porting_hunt_peers as p\nprint(json.dumps(p.{what}()))",
                     timeout=300)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def optax_numbers() -> dict:
    return _peers("optax_run")


def test_optax_chain_ported_to_make_train_step_on_jax(optax_numbers):
    n = optax_numbers
    assert n["fused_vs_optax_f64_schedule"] < TOL
    # the peer's own float32 learning rates: ~1e-8, the only difference
    assert n["schedule_dtype_at_int32"] == "float32"
    assert TOL < n["fused_vs_optax_as_is"] < 1e-6
    # a binding clip, optax's convention, through the separate calls
    assert n["separate_eps0_vs_optax_clipping"] < TOL


def test_optax_clip_by_global_norm_in_make_train_step(optax_numbers):
    assert optax_numbers["fused_vs_optax_clipping"] < TOL


def test_optax_port_checkpoint_resume_with_a_callable_mask_on_jax(tmp_path):
    """An optax user's port (a mask as a function of the names) on the one-program JAX step
    (float32 here), saved mid-run through ``step.to_optimizer_state`` and resumed through
    ``step.from_optimizer_state``: the uninterrupted run, bit for bit. The program matches the
    mask on its own copy of the optimizer; the checkpoint keeps the names it matched."""
    import sys

    sys.path.insert(0, str(HERE))
    import porting_hunt_peers as peers

    from mithril.utils.lr_schedulers import WSD

    x, y = peers._data()
    x = x.astype(np.float32)
    backend = ml.JaxBackend()
    compiled = peers._mlp(backend)
    p0 = {k: np.asarray(v).copy() for k, v in compiled.get_parameters().items()}

    def port():
        opt = AdamW(learning_rate=5e-2, weight_decay=0.1, clip_norm=1.0,
                    weight_decay_mask=lambda name: name.endswith("weight"))
        return opt, WSD(opt, 5, 0, 15, 0.0, 1e-4, "cosine"), make_train_step(compiled, opt,
                                                                            loss="loss")

    def run(step, sched, params, state, steps):
        for t in steps:
            b = np.random.default_rng(100 + t).choice(len(y), 32, replace=False)
            params, state, _ = step(params, state, {
                "input": backend.array(x[b]), "target": backend.array(y[b], backend.int_dtype)})
            sched.step()
        return params, state

    opt, sched, step = port()
    params = {k: backend.array(v) for k, v in p0.items()}
    full, _ = run(step, sched, params, step.init(params), range(20))
    opt, sched, step = port()
    params = {k: backend.array(v) for k, v in p0.items()}
    params, state = run(step, sched, params, step.init(params), range(10))
    save_checkpoint(tmp_path / "o.safetensors", params, opt, step.to_optimizer_state(state, params),
                    sched)
    assert callable(opt.weight_decay_mask)  # (the save matched it on a copy)
    opt, sched, step = port()
    ckpt = load_checkpoint(tmp_path / "o.safetensors", params_template=p0, optimizer=opt,
                           scheduler=sched, backend=backend)
    assert ckpt["metadata"]["optimizer"]["hyperparameters"]["weight_decay_mask"] == [
        "mlp.linear_0.weight", "mlp.linear_1.weight"]
    again, _ = run(step, sched, ckpt["params"], step.from_optimizer_state(ckpt["state"]),
                   range(10, 20))
    assert all(np.array_equal(np.asarray(again[k]), np.asarray(full[k])) for k in full)


def test_a_checkpoint_that_cannot_be_json_names_the_field(tmp_path):
    """Without a state to match it against, a callable mask cannot be saved: the error names
    it (and ``extra``), and nothing is written."""
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    opt = AdamW(weight_decay_mask=lambda name: name == "w")
    with pytest.raises(TypeError, match="in the optimizer's 'weight_decay_mask', extra"):
        save_checkpoint(tmp_path / "c.safetensors", params, opt, extra={"f": print})
    assert not list(tmp_path.iterdir())
    state = opt.init(params)  # with the state: the names it matches
    save_checkpoint(tmp_path / "c.safetensors", params, opt, state)
    meta = load_checkpoint(tmp_path / "c.safetensors")["metadata"]
    assert meta["optimizer"]["hyperparameters"]["weight_decay_mask"] == ["w"]


# -- 3. Keras 3: compile(Adam(global_clipnorm, use_ema)) + fit + evaluate ----------------------

@pytest.mark.slow
def test_keras_fit_adam_global_clipnorm_ema():
    n = _peers("keras_run")
    assert n["loss_history"] < TOL and n["eval_loss"] < TOL and n["eval_acc"] == 0
    # after fit, Keras's model holds the EMA (finalize_variable_values), not the last step
    assert n["weights_vs_ema"] < TOL and n["weights_vs_raw"] > 1e-3
    # make_train_step's one JAX program with the same clip (clip_eps=0), its EMA through
    # step.to_optimizer_state
    assert n["fused_weights_vs_ema"] < TOL


# -- 4. a CSV of your own: text labels, missing values, `mithril train` / `predict` ------------

def _flowers(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((150, 3))
    label = np.where(x[:, 0] + x[:, 1] > 0.3, "setosa",
                     np.where(x[:, 2] > 0, "virginica", "versicolor"))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sepal", "petal", "stem", "species"])
        for i in range(len(x)):
            row = [round(v, 4) for v in x[i]]
            if i in (3, 17):
                row[1] = ""
            if i == 40:
                row[2] = "NA"
            w.writerow([*row, label[i]])


def test_csv_with_missing_values_cli_then_the_same_model_from_python(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    _flowers(Path("flowers.csv"))
    quick = ["--epochs", "5", "--batch-size", "32", "--hidden", "16", "--dtype", "float64",
             "--lr", "1e-2", "--no-progress", "--no-plot"]
    err = usage_error(capsys, ["train", "--data", "flowers.csv", "--target", "species", *quick,
                               "--out", "runs/f"])
    assert "3 missing values" in err and "'petal' (2), 'stem' (1)" in err
    assert "drop those rows or fill" in err and "row 4 (line 5)" in err
    assert not Path("runs/f").exists()

    with open("flowers.csv", newline="") as f:  # the user drops the incomplete rows
        header, *body = list(csv.reader(f))
    body = [r for r in body if all(c not in ("", "NA") for c in r)]
    with open("clean.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    assert main(["train", "--data", "clean.csv", "--target", "species", *quick,
                 "--out", "runs/c"]) == 0
    assert main(["predict", "--run", "runs/c", "--data", "clean.csv"]) == 0
    err = usage_error(capsys, ["predict", "--run", "runs/c", "--data", "flowers.csv",
                               "--out", "other.csv"])
    assert "3 missing values" in err and "fill them as the training data were filled" in err
    assert not Path("other.csv").exists()
    with open("runs/c/predictions.csv", newline="") as f:
        predicted = list(csv.DictReader(f))

    # the same run from Python: the split, the standardisation, the model, the batches
    labels = sorted({r[-1] for r in body})
    y = np.array([labels.index(r[-1]) for r in body])
    x = np.array([[float(c) for c in r[:-1]] for r in body])
    train, _ = (np.sort(i) for i in train_test_split(np.arange(len(y)), test_size=0.2,
                                                     random_state=0, stratify=y))
    z = (x - x[train].mean(0)) / x[train].std(0)
    model = ml.Model()
    model |= ml.MLP(["relu", None], [16, len(labels)])(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    compiled = ml.compile(model, ml.NumpyBackend(dtype="float64", seed=0),
                          shapes={"input": [None, 3]})
    params = compiled.get_parameters()
    opt = Adam(learning_rate=1e-2)
    sched = CosineAnnealingLR(opt, T_max=5 * -(-len(train) // 32))
    step = make_train_step(compiled, opt, loss="loss")
    state, rng = step.init(params), np.random.default_rng(0)
    for _ in range(5):
        order = train[rng.permutation(len(train))]
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            params, state, _ = step(params, state, {"input": z[b], "target": y[b]})
            sched.step()
    saved = load_checkpoint("runs/c/model.safetensors")["params"]
    assert all(np.array_equal(saved[k], params[k]) for k in params)

    # predict's probabilities: torch.nn.functional's softmax of a torch forward pass
    w = {k: torch.from_numpy(v) for k, v in saved.items()}
    h = torch.relu(torch.from_numpy(z) @ w["mlp.linear_0.weight"].T + w["mlp.linear_0.bias"])
    probs = torch.softmax(h @ w["mlp.linear_1.weight"].T + w["mlp.linear_1.bias"], 1).numpy()
    for j, r in enumerate(predicted):
        assert r["prediction"] == labels[int(probs[j].argmax())]
        assert max(abs(float(r[f"p_{c}"]) - probs[j, i]) for i, c in enumerate(labels)) < TOL
