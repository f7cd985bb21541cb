"""The optimizers added with the optax catalog (SignSGD, Signum, OptimisticGD, OptimisticAdam,
Adamax with decoupled decay, SimplifiedAdEMAMix, COCOB, Fromage, DoG, DoWG) where they meet
:class:`~mithril.utils.mixed_precision.MixedPrecisionTrainer`, checkpoints and the CLI.

References, side by side in each test:

* mixed precision: the same optimizer stepped by hand on float32 NumPy copies with the true
  float32 gradients (the batches are dyadic, so the half-precision gradients are exact and the
  two agree to the last bit); an overflowing step (an inf loss gradient) must change nothing
  in the optimizer state, COCOB's slots and DoG's/DoWG's optimizer-wide ``state.values`` and
  ``started`` tensor slot included;
* checkpoints: the uninterrupted run (bit-exact continuation on NumPy and torch);
* the CLI: the optimizer rebuilt from ``summary.json``'s configuration, and the single-process
  run (``--nprocs 2``: slow).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import usage_error
from test_mixed_precision_peers import SHAPES, dyadic_batches, host, linear

import mithril as ml
import mithril.utils.optimizers as O
from mithril.cli import main
from mithril.cli.optimizer_catalog import build_optimizer, parse_optimizer_spec
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.mixed_precision import MixedPrecisionTrainer

NEW = {
    "sign-sgd": lambda: O.SignSGD(0.125, momentum=0.5),
    "signum": lambda: O.Signum(0.125),
    "optimistic-gd": lambda: O.OptimisticGD(0.125),
    "optimistic-adam": lambda: O.OptimisticAdam(0.125),
    "adamax-decoupled": lambda: O.Adamax(0.125, weight_decay=0.1, decoupled_weight_decay=True),
    "simplified-ademamix": lambda: O.SimplifiedAdEMAMix(0.125),
    "cocob": lambda: O.COCOB(),
    "fromage": lambda: O.Fromage(0.125),
    "dog": lambda: O.DoG(),
    "dowg": lambda: O.DoWG(),
}
HALF = {"numpy-fp16": lambda: ml.NumpyBackend(dtype="float16"),
        "torch-bf16": lambda: ml.TorchBackend(dtype="bfloat16")}
QUICK = ["--epochs", "1", "--hidden", "8", "--scheduler", "none", "--no-progress", "--no-plot"]


def _np(backend, x):
    return np.asarray(backend.to_numpy(x)) if hasattr(x, "shape") else x


def _same_tree(backend, a, b, path=""):
    """``a == b`` for nested state dicts (arrays compared bit for bit, NaN equal to NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same_tree(backend, a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _same_tree(backend, u, v, f"{path}[{i}]")
    elif hasattr(a, "shape"):
        assert np.array_equal(_np(backend, a), _np(backend, b), equal_nan=True), path
    else:
        assert a == b, path


def _progress(d):
    """A state dict without the skip bookkeeping (a skipped step counts itself there)."""
    if isinstance(d, dict):
        return {k: _progress(v) for k, v in d.items()
                if k not in ("num_skipped", "last_step_skipped")}
    return d


# -- mixed precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("half", list(HALF))
@pytest.mark.parametrize("name", list(NEW))
def test_mixed_precision_equals_float32_by_hand_and_a_skip_changes_nothing(name, half):
    b, ref_b = HALF[half](), ml.NumpyBackend()
    model, opt, ref = linear(b), NEW[name](), NEW[name]()
    ref.backend = ref_b
    p0 = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
    trainer = MixedPrecisionTrainer(model, opt, {k: b.array(v, "float32") for k, v in p0.items()},
                                    loss_scale=16.0)
    rp = {k: ref_b.array(v) for k, v in p0.items()}
    rs = ref.init(rp)
    for i, (x, c, g) in enumerate(dyadic_batches(5)):
        if i == 2:  # an overflow: skipped, the scale backs off, the state stays
            before = _progress(opt.state_dict(trainer.optimizer_state))
            trainer.forward({"input": b.array(x)})
            _, _, ok = trainer.backward_and_update({"out": np.full((4, 2), np.inf, np.float32)})
            assert not ok and trainer.loss_scale == 8.0
            _same_tree(b, before, _progress(opt.state_dict(trainer.optimizer_state)))
        trainer.forward({"input": b.array(x)})
        assert trainer.backward_and_update({"out": b.array(c)})[2]
        rp, rs = ref.update(rp, {k: ref_b.array(v) for k, v in g.items()}, rs)
    ours, theirs = host(b, trainer.master_params), host(ref_b, rp)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert trainer.optimizer_state.step == rs.step == 5
    for k, v in (rs.values or {}).items():  # DoG's r and S, DoWG's r² and W
        assert float(_np(b, trainer.optimizer_state.values[k])) == float(_np(ref_b, v)), k


@pytest.mark.parametrize("name", ["optimistic-adam", "cocob", "fromage", "dog", "dowg"])
def test_mixed_precision_resume_from_state_dicts_mid_run_equals_the_uninterrupted_run(name):
    bat = dyadic_batches(6)

    def run(resume=None, stop=None):
        b, opt = ml.TorchBackend(dtype="bfloat16"), NEW[name]()
        p0 = {k: b.array(np.full(s, 0.5, np.float32), "float32") for k, s in SHAPES.items()}
        start, state = 0, None
        if resume is not None:
            masters, osd, tsd, start = resume
            p0 = {k: b.array(v, "float32") for k, v in masters.items()}
            opt.backend = ml.TorchBackend(dtype="float32")
            state = opt.load_state_dict(osd, p0)
        tr = MixedPrecisionTrainer(linear(b), opt, p0, optimizer_state=state, loss_scale=16.0)
        if resume is not None:
            tr.load_state_dict(tsd)
        for i in range(start, len(bat)):
            x, c, _ = bat[i]
            if i == 1:  # an overflow before the snapshot: the resumed scale is the backed-off one
                tr.forward({"input": b.array(x)})
                tr.backward_and_update({"out": np.full((4, 2), np.inf, np.float32)})
            tr.forward({"input": b.array(x)})
            tr.backward_and_update({"out": b.array(c)})
            if i == stop:
                return host(b, tr.master_params), opt.state_dict(tr.optimizer_state), \
                    tr.state_dict(), i + 1
        return host(b, tr.master_params), tr

    full, tr_full = run()
    resumed, tr_res = run(resume=run(stop=2))
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    assert tr_res.loss_scale == tr_full.loss_scale == 8.0
    assert tr_res.num_skipped_steps == tr_full.num_skipped_steps == 1


# -- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_cls", [ml.NumpyBackend, ml.TorchBackend])
@pytest.mark.parametrize("name", list(NEW))
def test_checkpoint_mid_run_continues_bit_exact(name, backend_cls, tmp_path):
    rng = np.random.default_rng(0)
    p0 = {"w": rng.normal(size=(3, 4)).astype(np.float32),
          "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in p0.items()}
             for _ in range(6)]
    b = backend_cls()
    opt = NEW[name]()
    opt.backend = b
    p = {k: b.array(v) for k, v in p0.items()}
    s = opt.init(p)
    for g in grads[:3]:
        p, s = opt.update(p, {k: b.array(v) for k, v in g.items()}, s)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, s)
    for g in grads[3:]:
        p, s = opt.update(p, {k: b.array(v) for k, v in g.items()}, s)

    opt2 = NEW[name]()
    opt2.backend = b
    ck = load_checkpoint(tmp_path / "c.safetensors", {k: b.array(v) for k, v in p0.items()}, opt2)
    p2, s2 = ck["params"], ck["state"]
    assert s2.step == 3
    for g in grads[3:]:
        p2, s2 = opt2.update(p2, {k: b.array(v) for k, v in g.items()}, s2)
    for k in p:
        np.testing.assert_array_equal(_np(b, p2[k]), _np(b, p[k]), err_msg=k)
    _same_tree(b, opt2.state_dict(s2), opt.state_dict(s))  # x0, started, values, slots

    other = O.DoWG() if name == "dog" else O.DoG()  # a checkpoint of one loaded into another
    with pytest.raises(ValueError, match=f"holds optimizer {type(opt).__name__}, cannot load "
                                         f"it into {type(other).__name__}"):
        load_checkpoint(tmp_path / "c.safetensors", None, other)


def test_checkpoint_of_signsgd_into_signum_is_refused_by_name(tmp_path):
    p = {"w": np.ones((2, 2), np.float32)}
    opt = O.SignSGD(0.1)
    s = opt.init(p)
    p, s = opt.update(p, {"w": np.ones((2, 2), np.float32)}, s)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, s)
    target = O.Signum(0.1)
    with pytest.raises(ValueError, match="holds optimizer SignSGD, cannot load it into Signum"):
        load_checkpoint(tmp_path / "c.safetensors", None, target)
    assert target.momentum == 0.9  # unchanged


# -- the CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "lookahead:inner=lookahead", "muon:fallback=muon", "lookahead:inner=lbfgs",
    "muon:fallback=dog", "lookahead:inner=prodigy", "dog:lr=-1", "cocob:alpha=-1",
    "dog:init_step=[heuristic,-1]", "dog:init_step=1e-6", "dowg:init_estim_sq_dist=-1",
    "fromage:lr=[1,2]", "sign-sgd:momentum=[0.1,0.2]", "cocob:foo=1", "signum:beta1=0.9",
    "optimistic-gd:beta=-1", "simplified-ademamix:beta1=1", "optimistic-adam:nesterov=0.5",
    "lookahead:inner=none", "lookahead:inner=cocob,inner=dog", "lion:beta1=0.9,beta1=0.8",
    "adam:lr=0.1,learning_rate=0.2",
])
def test_bad_specs_of_the_new_optimizers_exit_2_and_write_nothing(spec, capsys, tmp_path):
    out = tmp_path / "run"
    err = usage_error(capsys, ["train", "--optimizer", spec, *QUICK, "--out", str(out)],
                      last=True)
    key = spec.partition(":")[2].partition("=")[0]
    assert key in err or "inner" in err or "fallback" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_scheduler_setting_given_twice_exits_2(capsys, tmp_path):
    err = usage_error(capsys, ["train", *QUICK, "--scheduler", "step:gamma=0.5,gamma=0.1",
                               "--out", str(tmp_path / "run")], last=True)
    assert "gamma given more than once" in err and list(tmp_path.iterdir()) == []


def _same_hyper(a, b):
    assert type(a) is type(b)
    ha, hb = a.hyperparameters(), b.hyperparameters()
    assert ha.keys() == hb.keys()
    for k in ha:
        if isinstance(ha[k], O.Optimizer):
            _same_hyper(ha[k], hb[k])
        else:
            assert ha[k] == hb[k], k


@pytest.mark.parametrize("spec,mp", [
    ("dog:init_step=[distance,1e-3]", "fp16"), ("cocob:alpha=50", "bf16"),
    ("muon:fallback=signum", "bf16"), ("lookahead:inner=signum,momentum=0.5", "fp16"),
])
def test_summary_json_rebuilds_the_optimizer_as_built(spec, mp, tmp_path, built):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", spec, *QUICK, "--mixed-precision", mp, "--ema", "0.9",
                 "--ema-start", "3", "--clip-norm", "1", "--no-decay-on", "bias",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    rebuilt = build_optimizer(cfg["optimizer"], cfg["settings"], {
        "ema_decay": cfg["ema"], "ema_start": cfg["ema_start"],
        "exclude_weight_decay": [cfg["no_decay_on"]]})
    _same_hyper(rebuilt, built[0].optimizer)
    assert summary["optimizer"] == repr(rebuilt)
    assert parse_optimizer_spec(spec)[0] == cfg["optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("mp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["sign-sgd", "signum", "optimistic-gd", "optimistic-adam",
                                  "adamax:decoupled_weight_decay=true,weight_decay=0.1",
                                  "simplified-ademamix", "cocob", "fromage", "dog", "dowg"])
def test_every_new_optimizer_trains_under_mixed_precision_with_ema_and_clipping(
        name, mp, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--optimizer", name, *QUICK, "--mixed-precision", mp, "--ema", "0.9",
                 "--ema-start", "5", "--clip-norm", "1", "--no-decay-on", "bias",
                 "--threads", "2", "--out", str(out)]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 23 and all(np.isfinite(float(r["loss"])) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["final"]["test_loss_ema"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fromage", "cocob", "dog"])
def test_nprocs_2_equals_one_process(name, tmp_path):
    """torch.distributed (gloo), two processes, each half of every batch: the mean gradient
    is the one process's, so the losses agree to float32 rounding."""
    def losses(out):
        with open(out / "metrics.csv", newline="") as f:
            return np.array([float(r["loss"]) for r in csv.DictReader(f)])

    assert main(["train", "--optimizer", name, *QUICK, "--out", str(tmp_path / "one")]) == 0
    assert main(["train", "--optimizer", name, *QUICK, "--nprocs", "2",
                 "--out", str(tmp_path / "two")]) == 0
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


@pytest.mark.parametrize("fallback", ["", ":fallback=signum", ":fallback=adamw"])
def test_no_decay_on_reaches_muons_fallback(fallback, tmp_path, built):
    """``--no-decay-on bias`` with muon: the biases are what the fallback updates, so the
    exemption must reach it. Reference: torch.optim.AdamW on the bias with weight_decay=0
    (torch's pairing of Muon with AdamW, the biases in a no-decay group): with a zero
    gradient the bias stays exactly where it is. (Was: the fallback kept its own decay,
    AdamW's 1e-2, and --no-decay-on was silently ignored for every bias.)"""
    import torch

    assert main(["train", "--optimizer", "muon" + fallback, "--dry-run", "--weight-decay",
                 "0.5", "--no-decay-on", "bias", "--out", str(tmp_path / "r")]) == 0
    opt = built[0].optimizer
    opt.fallback_lr_ratio = 0.5  # a visible decay if there is one: lr·wd = 0.01·0.5 per step
    p = {"w": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
    s = opt.init(p)
    ours, _ = opt.update(p, {k: np.zeros_like(v) for k, v in p.items()}, s)

    bias = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.AdamW([bias], lr=0.01, weight_decay=0.0)
    bias.grad = torch.zeros(2)
    ref.step()
    np.testing.assert_array_equal(ours["bias"], bias.detach().numpy())


@pytest.mark.parametrize("fallback", ["", ":fallback=adamw"])
def test_weight_decay_reaches_muons_fallback(fallback, tmp_path, built):
    """``--weight-decay`` applies to every parameter: with muon also to the fallback that
    updates the biases. Reference: torch.optim.AdamW on the bias with the same decay (a zero
    gradient: the step is the decay alone). (Was: the fallback kept AdamW's 1e-2.)"""
    import torch

    assert main(["train", "--optimizer", "muon" + fallback, "--dry-run", "--weight-decay",
                 "0.5", "--out", str(tmp_path / "r")]) == 0
    opt = built[0].optimizer
    assert opt.fallback.weight_decay == 0.5
    opt.fallback_lr_ratio = 1.0
    p = {"w": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
    ours, _ = opt.update(p, {k: np.zeros_like(v) for k, v in p.items()}, opt.init(p))
    bias = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.AdamW([bias], lr=opt.learning_rate, weight_decay=0.5)
    bias.grad = torch.zeros(2)
    ref.step()
    np.testing.assert_allclose(ours["bias"], bias.detach().numpy(), rtol=1e-7)
    assert ours["bias"][0] < 1.0


@pytest.mark.parametrize("name", ["cocob", "dog", "dowg", "fromage", "sign-sgd"])
def test_an_ema_the_checkpoint_lacks_starts_at_the_resume(name, tmp_path):
    """Saved without ``ema_decay``, loaded into the optimizer with it: the EMA starts at the
    resume, as a torch ``AveragedModel`` created then (its first update copies the weights,
    then ``ema ← ema + (1 − d)·(p − ema)``), computed by hand beside it."""
    rng = np.random.default_rng(1)
    p = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    grads = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(7)]
    opt = NEW[name]()
    s = opt.init(p)
    for g in grads[:3]:
        p, s = opt.update(p, g, s)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, s)
    cls, hyper = type(opt), opt.hyperparameters()
    resumed = cls(**{**{k: v for k, v in hyper.items() if k in ("learning_rate", "momentum")},
                     "ema_decay": 0.5})
    ck = load_checkpoint(tmp_path / "c.safetensors", {"w": p["w"]}, resumed)
    p2, s2, ema = ck["params"], ck["state"], None
    for g in grads[3:]:
        p2, s2 = resumed.update(p2, g, s2)
        ema = p2["w"].copy() if ema is None else ema + 0.5 * (p2["w"] - ema)
    np.testing.assert_array_equal(resumed.ema_params(s2)["w"], ema)
