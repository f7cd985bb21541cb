"""The JAX data-parallel step (``make_sharded_train_step``, 2 CPU devices, replicated and
sharded optimizer state) with parameters the loss does not reach: it leaves them out of the
update as the one-device JAX step does and as torch.optim leaves out a ``.grad`` None (no
weight decay, no momentum, each parameter its own step count: the state's
``hyperparams["missed"]``). A two-head model trained on one head's loss and then the
other's (``tests/test_unreached_params.py``'s), AdamW, SGD with momentum and weight decay,
and Prodigy and DoG (optimizer-wide values: Prodigy's ``d``, DoG's ``max_dist``), side by
side with the one-device ``make_train_step``, the NumPy step and, for AdamW and SGD, a plain
torch.optim loop with ``.grad = None`` for the head not reached: to 1e-6 in float32, 1e-12
in float64. Before, the sharded step stepped the unreached head with a zero gradient
(weight decay and momentum applied, one shared count): AdamW off by 1.8e-2, SGD by 0.18.
The state the sharded step converts (``to_optimizer_state``) carries the missed counts into
a checkpoint and a state dict, and either resumes bit for bit as the unbroken run.

The 2-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX
starts: this file is the worker too (``python tests/test_jax_sharded_unreached.py DTYPE
OUT.npz FOLDER``), run once per dtype in a fresh interpreter, float64 with x64 on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_unreached_params import SCHEDULE, data_of, two_heads  # noqa: E402

LOSSES = ("loss_a", "loss_b")
SHAPES = {"input": [8, 3]}
#: the step after which the run is checkpointed and resumed
SAVE_AT = 4
#: how the runs are made: the one-device step, then 2 devices replicated and sharded
KINDS = {"one": None, "rep": False, "shard": True}


def optimizers() -> dict:
    from mithril.utils.optimizers import SGD, AdamW, DoG, Prodigy

    return {"adamw": lambda: AdamW(learning_rate=1e-2, weight_decay=0.1),
            "sgd": lambda: SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.1),
            "prodigy": lambda: Prodigy(estim_lr0=1e-2, weight_decay=0.1),
            "dog": lambda: DoG(init_step=("heuristic", 1e-2), weight_decay=0.1)}


def batches(dtype: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{k: v.astype(dtype) for k, v in data_of(rng).items()} for _ in SCHEDULE]


# -- the worker (2 devices) ------------------------------------------------------------------
def _steps(c, opt, kind: str) -> dict:
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.training import make_train_step

    if KINDS[kind] is None:
        return {k: make_train_step(c, opt, loss=k) for k in LOSSES}
    return {k: make_sharded_train_step(c, opt, loss=k, devices=2, shard_state=KINDS[kind])
            for k in LOSSES}


def _held(prefix: str, opt, state, params) -> dict[str, np.ndarray]:
    """What a run ends with: its params, and its state as ``optimizer.init`` holds it
    (the step count, each parameter's missed steps, the slots, the optimizer-wide values)."""
    out = {f"{prefix}/p/{n}": np.asarray(v) for n, v in params.items()}
    out[f"{prefix}/step"] = np.array(state.step)
    got = state.missed_counts()
    out.update({f"{prefix}/missed/{n}": np.array(got.get(n, 0)) for n in params})
    for s in state.slots:
        out.update({f"{prefix}/slot/{s}/{n}": np.asarray(v) for n, v in state.slot(s).items()})
    out.update({f"{prefix}/value/{k}": np.array(v) for k, v in state.values.items()})
    return out


def _run(name: str, kind: str, dtype: str, folder: str) -> dict[str, np.ndarray]:
    """The schedule on ``kind``'s step; for the 2-device ones also checkpointed after
    SAVE_AT steps and resumed by a new optimizer and steps, from the file and from the
    state dict (``resumed-file``, ``resumed-dict``: compared bit for bit)."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    c = ml.compile(two_heads(), JaxBackend(dtype=dtype, seed=0), shapes=SHAPES)
    opt = optimizers()[name]()
    steps = _steps(c, opt, kind)
    params = c.get_parameters()
    out = {f"start/{n}": np.asarray(v).copy() for n, v in params.items()}
    state = steps["loss_a"].init(params)
    data = batches(dtype)
    path = os.path.join(folder, f"{name}-{kind}-{dtype}.safetensors")
    for i, (loss, d) in enumerate(zip(SCHEDULE, data)):
        if i == SAVE_AT and kind != "one":
            plain = steps[loss].to_optimizer_state(state, params)
            counts = plain.missed_counts()
            out.update({f"{name}/{kind}/saved/{n}": np.array(counts.get(n, 0)) for n in params})
            save_checkpoint(path, params, opt, plain)
            sd = opt.state_dict(plain)
            saved = {n: np.asarray(v).copy() for n, v in params.items()}
        params, state, _ = steps[loss](params, state, {k: c.backend.array(v)
                                                       for k, v in d.items()})
    out.update(_held(f"{name}/{kind}", opt, steps["loss_a"].to_optimizer_state(state, params),
                     params))
    if kind == "one":
        return out
    for how in ("file", "dict"):
        opt2 = optimizers()[name]()
        steps2 = _steps(c, opt2, kind)
        if how == "file":
            got = load_checkpoint(path, c.get_parameters(), optimizer=opt2, backend=c.backend)
            p, plain = got["params"], got["state"]
        else:
            p = {n: c.backend.array(v) for n, v in saved.items()}
            plain = opt2.load_state_dict(sd, p)
        state = steps2[SCHEDULE[SAVE_AT]].from_optimizer_state(plain)
        for loss, d in zip(SCHEDULE[SAVE_AT:], data[SAVE_AT:]):
            p, state, _ = steps2[loss](p, state, {k: c.backend.array(v) for k, v in d.items()})
        out.update(_held(f"{name}/{kind}/resumed-{how}", opt2,
                         steps2["loss_a"].to_optimizer_state(state, p), p))
    return out


def main() -> None:
    dtype, out, folder = sys.argv[1:4]
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 2, jax.devices()
    flat: dict[str, np.ndarray] = {}
    for name in optimizers():
        for kind in KINDS:
            got = _run(name, kind, dtype, folder)
            # (every run starts from the same params: the seed's)
            assert all(np.array_equal(flat.get(k, v), v) for k, v in got.items()
                       if k.startswith("start/"))
            flat.update(got)
    np.savez(out, **flat)


# -- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[
    "float32", pytest.param("float64", marks=pytest.mark.slow)])  # (~15 s of CPU each)
def results(request, tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    dtype = request.param
    folder = tmp_path_factory.mktemp("jaxunreached")
    out = str(folder / f"{dtype}.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, __file__, dtype, out, str(folder)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(out) as z:
        return dtype, {k: z[k] for k in z.files}


def _of(res: dict, prefix: str, what: str = "p") -> dict[str, np.ndarray]:
    """The results under ``prefix/what/`` (``what`` empty: under ``prefix/``), by the rest
    of their keys."""
    k = f"{prefix}/{what}/" if what else f"{prefix}/"
    return {n[len(k):]: v for n, v in res.items() if n.startswith(k)}


def _numpy_run(name: str, dtype: str, start: dict) -> tuple[dict, object]:
    """The NumPy step (the separate calls: ``tests/test_unreached_params.py`` checks them
    against torch) from ``start``."""
    import mithril as ml
    from mithril.backends import NumpyBackend
    from mithril.utils.training import make_train_step

    c = ml.compile(two_heads(), NumpyBackend(dtype=dtype), shapes=SHAPES)
    opt = optimizers()[name]()
    steps = {k: make_train_step(c, opt, loss=k) for k in LOSSES}
    params = {n: v.copy() for n, v in start.items()}
    state = steps["loss_a"].init(params)
    for loss, d in zip(SCHEDULE, batches(dtype)):
        params, state, _ = steps[loss](params, state, d)
    return params, state


def _torch_run(name: str, dtype: str, start: dict) -> dict[str, np.ndarray]:
    """torch.optim on the torch twin, the head not reached left with ``.grad = None``."""
    import torch
    from test_unreached_params import OPTIMIZERS, TorchTwoHeads, torch_copy

    module = TorchTwoHeads().to(getattr(torch, dtype))
    torch_copy(module, start)
    topt = OPTIMIZERS[name][1](module.parameters())
    for loss, d in zip(SCHEDULE, batches(dtype)):
        topt.zero_grad(set_to_none=True)
        module(torch.from_numpy(d["input"]), loss, d).backward()
        assert (module.linear_2.weight.grad is None) == (loss == "loss_a")
        topt.step()
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


def _close(got: dict, want: dict, tol: float, what: str) -> float:
    assert set(got) == set(want), what
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=tol, atol=tol, err_msg=f"{what} {n}")
    return max(float(np.max(np.abs(got[n] - want[n]))) for n in want)


@pytest.mark.parametrize("name", ["adamw", "sgd", "prodigy", "dog"])
def test_two_devices_equal_one_device_numpy_and_torch(results, name: str) -> None:
    dtype, res = results
    tol = 1e-12 if dtype == "float64" else 1e-6
    start = {n[len("start/"):]: v for n, v in res.items() if n.startswith("start/")}
    one = _of(res, f"{name}/one")
    ref, ref_state = _numpy_run(name, dtype, start)
    _close(one, ref, tol, "one device vs NumPy")
    if name in ("adamw", "sgd"):
        _close(one, _torch_run(name, dtype, start), tol, "one device vs torch")
    # (every parameter moved: each head was reached at some steps)
    assert all(np.max(np.abs(one[n] - start[n])) > 1e-3 for n in start)
    want_missed = ref_state.missed_counts()
    assert want_missed == {"linear_1.weight": 3, "linear_1.bias": 3,
                           "linear_2.weight": 4, "linear_2.bias": 4}
    for kind in ("rep", "shard"):
        prefix = f"{name}/{kind}"
        _close(_of(res, prefix), one, tol, f"{kind} vs one device")
        _close(_of(res, prefix), ref, tol, f"{kind} vs NumPy")
        assert int(res[f"{prefix}/step"]) == len(SCHEDULE)
        assert {n: int(v) for n, v in _of(res, prefix, "missed").items() if v} == want_missed
        for s in ref_state.slots:
            _close(_of(res, prefix, f"slot/{s}"),
                   {n: np.asarray(v) for n, v in ref_state.slot(s).items()}, tol, f"slot {s}")
        values = _of(res, prefix, "value")
        assert set(values) == set(ref_state.values)
        for k, v in ref_state.values.items():
            np.testing.assert_allclose(float(values[k]), v, rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("name", ["adamw", "sgd", "prodigy", "dog"])
@pytest.mark.parametrize("kind", ["rep", "shard"])
def test_checkpoint_and_state_dict_resume_bit_for_bit(results, name: str, kind: str) -> None:
    """The state converted after SAVE_AT steps holds each head's missed steps (head b 3,
    head a 1), and resumed from the checkpoint file or the state dict the run ends as the
    unbroken one, bit for bit: params, slots, counts, optimizer-wide values."""
    _, res = results
    prefix = f"{name}/{kind}"
    assert {n: int(v) for n, v in _of(res, prefix, "saved").items()} == {
        "linear_0.weight": 0, "linear_0.bias": 0, "linear_1.weight": 1, "linear_1.bias": 1,
        "linear_2.weight": 3, "linear_2.bias": 3}
    whole = _of(res, prefix, "")
    whole = {k: v for k, v in whole.items() if not k.startswith(("resumed-", "saved/"))}
    assert len(whole) > 13  # (params, step, missed, slots)
    for how in ("file", "dict"):
        got = _of(res, prefix, f"resumed-{how}")
        assert set(got) == set(whole), how
        for k in whole:
            assert np.array_equal(got[k], whole[k]), (how, k)


def test_averaging_tensorwise_optimizers_are_taken_with_an_unreached_head() -> None:
    """Muon and Adafactor with weight averaging count each tensor's steps in the program (the
    averages the optimizer's): with a head the loss does not reach the sharded step is made
    and fused (their numbers: test_train_step_unreached_averaging, on 2 devices too)."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.optimizers import Adafactor, Muon

    c = ml.compile(two_heads(), JaxBackend(), shapes=SHAPES)
    for opt in (Muon(learning_rate=1e-2, ema_decay=0.9), Adafactor(learning_rate=1e-2,
                                                                   swa_start=2)):
        assert make_sharded_train_step(c, opt, loss="loss_a", devices=1).fused


def test_a_loss_reaching_every_parameter_keeps_no_count() -> None:
    """Every parameter reached: the state holds no missed counts (the program then steps
    them all together, ``update``, as before: its compiled HLO is the old one's)."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.optimizers import AdamW

    m = ml.Model()
    m |= ml.Linear(2)(input="input", output="y")
    m |= ml.MeanSquaredError()(input="y", target="t", output=ml.IOKey("loss"))
    c = ml.compile(m, JaxBackend(), shapes=SHAPES)
    step = make_sharded_train_step(c, AdamW(1e-2), loss="loss", devices=1, shard_state=True)
    params = c.get_parameters()
    state = step.init(params)
    rng = np.random.default_rng(0)
    data = {"input": rng.standard_normal((8, 3)).astype("float32"),
            "t": rng.standard_normal((8, 2)).astype("float32")}
    params, state, _ = step(params, state, data)
    assert "missed" not in state.hyperparams
    assert step.to_optimizer_state(state, params).missed is None


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
