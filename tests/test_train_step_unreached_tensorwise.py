"""The one-program JAX step (and the data-parallel one, on 2 CPU devices) with parameters the
loss does not reach, for the tensorwise optimizers: Muon (its AdamW fallback for the
biases), Adafactor (factored weights, unfactored biases; ``lr=1e-2``, where only β̂₂ reads
the step, and ``lr=0.5``, where the relative step ``min(lr, 1/√t)`` does too). A two-head
model trained on each head's loss in turn (``tests/test_unreached_params.py``'s): each
tensor counts its own steps in the program (``t − missed``, a traced vector: one compile),
as the separate calls with ``note_missed`` do on JAX (to 1e-6), as the NumPy step does (to
1e-6 in float32, 1e-12 in float64) and as torch.optim.Muon / AdamW / Adafactor do with
``.grad = None`` on the head not reached. The state converted mid-run (a state dict)
carries the counts and resumes bit for bit as the unbroken run. Before, these optimizers'
step fell back to the separate calls and the sharded step refused them.

Also: the global-norm clipping, ``nonfinite="skip"`` and hyperparameters changed mid-run,
as the NumPy step; weight averaging runs in the one program too; a state whose counts differ
inside a layer (``note_missed`` of a bias only) resumes in the program as the NumPy step
runs it (the counts were given in the model's order where the transformation reads them in
its sorted one: an elementwise optimizer's too).

The 2-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX
starts: this file is the worker too (``python tests/test_train_step_unreached_tensorwise.py
DTYPE OUT.npz``), run once per dtype in a fresh interpreter, float64 with x64 on.
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
SAVE_AT = 4  # the step after which the state is converted, saved and resumed
#: one device fused, the separate calls (optimizer.init's state), 2 devices replicated/sharded
KINDS = ("one", "separate", "rep", "shard")
#: the worker's (2 devices, a fresh interpreter per dtype); the others run in this process
WORKER_KINDS = {"float32": ("one", "rep", "shard"), "float64": ("one", "shard")}


def optimizers() -> dict:
    from mithril.utils.optimizers import Adafactor, AdamW, Muon

    return {"muon": lambda: Muon(1e-2, weight_decay=0.1, ns_dtype=None,
                                 fallback=AdamW(1e-2, weight_decay=0.1)),
            "adafactor": lambda: Adafactor(1e-2),
            "adafactor-relative": lambda: Adafactor(0.5, beta2_decay=-0.5, weight_decay=0.1)}


def torch_optimizers(ps: dict) -> list:
    """torch.optim's for ``ps`` (name -> parameter), per name of :func:`optimizers`."""
    import torch

    mats = [p for p in ps.values() if p.ndim == 2]
    rest = [p for p in ps.values() if p.ndim != 2]
    return {"muon": lambda: [torch.optim.Muon(mats, lr=1e-2, weight_decay=0.1),
                             torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)],
            "adafactor": lambda: [torch.optim.Adafactor(list(ps.values()), lr=1e-2)],
            "adafactor-relative": lambda: [torch.optim.Adafactor(
                list(ps.values()), lr=0.5, beta2_decay=-0.5, weight_decay=0.1)]}


def batches(dtype: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{k: v.astype(dtype) for k, v in data_of(rng).items()} for _ in SCHEDULE]


# -- the worker (2 devices) ------------------------------------------------------------------
def _steps(c, opt, kind: str) -> dict:
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.training import make_train_step

    if kind in ("one", "separate"):
        return {k: make_train_step(c, opt, loss=k) for k in LOSSES}
    return {k: make_sharded_train_step(c, opt, loss=k, devices=2, shard_state=kind == "shard")
            for k in LOSSES}


def _held(prefix: str, state, params) -> dict[str, np.ndarray]:
    """A run's params and its state as ``optimizer.init`` holds it (step, missed, slots)."""
    out = {f"{prefix}/p/{n}": np.asarray(v) for n, v in params.items()}
    out[f"{prefix}/step"] = np.array(state.step)
    got = state.missed_counts()
    out.update({f"{prefix}/missed/{n}": np.array(got.get(n, 0)) for n in params})
    for s in state.slots:
        out.update({f"{prefix}/slot/{s}/{n}": np.asarray(v) for n, v in state.slot(s).items()})
    return out


def _run(name: str, kind: str, dtype: str) -> dict[str, np.ndarray]:
    """The schedule on ``kind``'s step; the fused ones also converted after SAVE_AT steps
    to a state dict and resumed by a new optimizer and steps (``resumed``)."""
    import mithril as ml
    from mithril.backends import JaxBackend

    c = ml.compile(two_heads(), JaxBackend(dtype=dtype, seed=0), shapes=SHAPES)
    opt = optimizers()[name]()
    steps = _steps(c, opt, kind)
    params = c.get_parameters()
    out = {f"start/{n}": np.asarray(v).copy() for n, v in params.items()}
    state = opt.init(params) if kind == "separate" else steps["loss_a"].init(params)
    data = batches(dtype)
    for i, (loss, d) in enumerate(zip(SCHEDULE, data)):
        if i == SAVE_AT and kind != "separate":
            sd = opt.state_dict(steps[loss].to_optimizer_state(state, params))
            saved = {n: np.asarray(v).copy() for n, v in params.items()}
        params, state, _ = steps[loss](params, state, {k: c.backend.array(v)
                                                       for k, v in d.items()})
    prefix = f"{name}/{kind}"
    out[f"{prefix}/optax"] = np.array(type(state).__name__ == "OptaxState")
    out[f"{prefix}/fused"] = np.array(all(s.fused for s in steps.values()))
    if kind != "separate":
        out[f"{prefix}/compiles"] = np.array([s._jitted._cache_size() for s in steps.values()])
    out.update(_held(prefix, steps["loss_a"].to_optimizer_state(state, params), params))
    if kind == "separate":
        return out
    opt2 = optimizers()[name]()
    steps2 = _steps(c, opt2, kind)
    p = {n: c.backend.array(v) for n, v in saved.items()}
    state = steps2[SCHEDULE[SAVE_AT]].from_optimizer_state(opt2.load_state_dict(sd, p))
    for loss, d in zip(SCHEDULE[SAVE_AT:], data[SAVE_AT:]):
        p, state, _ = steps2[loss](p, state, {k: c.backend.array(v) for k, v in d.items()})
    out.update(_held(f"{prefix}/resumed", steps2["loss_a"].to_optimizer_state(state, p), p))
    return out


def main() -> None:
    dtype, out = sys.argv[1:3]
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 2, jax.devices()
    flat: dict[str, np.ndarray] = {}
    for name in optimizers():
        for kind in WORKER_KINDS[dtype]:
            got = _run(name, kind, dtype)
            assert all(np.array_equal(flat.get(k, v), v) for k, v in got.items()
                       if k.startswith("start/"))  # (every run from the seed's params)
            flat.update(got)
    np.savez(out, **flat)


# -- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["float32", "float64"])
def results(request, tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    dtype = request.param
    out = str(tmp_path_factory.mktemp("tensorwise") / f"{dtype}.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, __file__, dtype, out], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(out) as z:
        return dtype, {k: z[k] for k in z.files}


def _of(res: dict, prefix: str, what: str = "p") -> dict[str, np.ndarray]:
    k = f"{prefix}/{what}/" if what else f"{prefix}/"
    return {n[len(k):]: v for n, v in res.items() if n.startswith(k)}


def _numpy_run(name: str, dtype: str, start: dict) -> tuple[dict, object]:
    """The NumPy step (the separate calls with ``note_missed``) from ``start``."""
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
    """torch.optim on the torch twin, the head not reached left with ``.grad = None``
    (Muon's Newton–Schulz in the gradient's dtype, as ours with ``ns_dtype=None``)."""
    import torch
    import torch.optim._muon as torch_muon
    from test_muon_adafactor import ns_in_grad_dtype
    from test_unreached_params import TorchTwoHeads, torch_copy

    module = TorchTwoHeads().to(getattr(torch, dtype))
    torch_copy(module, start)
    topts = torch_optimizers(dict(module.named_parameters()))[name]()
    held = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = ns_in_grad_dtype
    try:
        for loss, d in zip(SCHEDULE, batches(dtype)):
            for t in topts:
                t.zero_grad(set_to_none=True)
            module(torch.from_numpy(d["input"]), loss, d).backward()
            assert (module.linear_2.weight.grad is None) == (loss == "loss_a")
            for t in topts:
                t.step()
    finally:
        torch_muon._zeropower_via_newtonschulz = held
    return {n: p.detach().numpy().copy() for n, p in module.named_parameters()}


def _close(got: dict, want: dict, tol: float, what: str) -> float:
    assert set(got) == set(want), what
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=tol, atol=tol, err_msg=f"{what} {n}")
    return max((float(np.max(np.abs(got[n] - want[n]))) for n in want if np.size(want[n])),
               default=0.0)


def _check_run(res: dict, prefix: str, want: dict, want_state, tol: float) -> None:
    """A fused run (``prefix``): one compile per loss's step, the params ``want`` and the
    state ``want_state`` (step, missed counts, slots) to ``tol``, and its resumed half (from
    the state dict made mid-run) the unbroken run bit for bit."""
    assert bool(res[f"{prefix}/fused"]) and bool(res[f"{prefix}/optax"]), prefix
    assert res[f"{prefix}/compiles"].tolist() == [1, 1], prefix  # (the counts are traced)
    _close(_of(res, prefix), want, tol, prefix)
    assert int(res[f"{prefix}/step"]) == len(SCHEDULE)
    assert {n: int(v) for n, v in _of(res, prefix, "missed").items() if v} == \
        want_state.missed_counts() == {"linear_1.weight": 3, "linear_1.bias": 3,
                                       "linear_2.weight": 4, "linear_2.bias": 4}
    for s in want_state.slots:
        _close(_of(res, prefix, f"slot/{s}"),
               {n: np.asarray(v) for n, v in want_state.slot(s).items()}, tol, f"slot {s}")
    whole = {k: v for k, v in _of(res, prefix, "").items()
             if not k.startswith(("resumed/", "fused", "compiles", "optax"))}
    got = _of(res, f"{prefix}/resumed", "")
    assert set(got) == set(whole) and len(whole) > 13, prefix
    for k in whole:
        assert np.array_equal(got[k], whole[k]), (prefix, k)


@pytest.mark.parametrize("name", list(optimizers()))
def test_one_device_equals_separate_calls_numpy_and_torch(name: str) -> None:
    """float32, one device: the fused step as the separate calls (``note_missed``) on JAX,
    the NumPy step (to 1e-6) and torch.optim (to 1e-5)."""
    res = {**_run(name, "one", "float32"), **_run(name, "separate", "float32")}
    start = {n[len("start/"):]: v for n, v in res.items() if n.startswith("start/")}
    one = _of(res, f"{name}/one")
    ref, ref_state = _numpy_run(name, "float32", start)
    _check_run(res, f"{name}/one", ref, ref_state, 1e-6)
    assert not bool(res[f"{name}/separate/optax"])  # (optimizer.init's state kept)
    _close(one, _of(res, f"{name}/separate"), 1e-6, "fused vs separate calls")
    _close(one, _torch_run(name, "float32", start), 1e-5, "fused vs torch.optim")
    assert all(np.any(one[n] != start[n]) for n in start)  # (each head reached at times)


@pytest.mark.slow  # (~30 s of CPU per dtype)
@pytest.mark.parametrize("name", list(optimizers()))
def test_two_devices_equal_one_device_numpy_and_torch(results, name: str) -> None:
    """2 devices, the optimizer state replicated and sharded, float32 (to 1e-6) and float64
    (to 1e-12, torch.optim to 1e-10): the one-device step's and the NumPy step's numbers."""
    dtype, res = results
    tol = 1e-12 if dtype == "float64" else 1e-6
    start = {n[len("start/"):]: v for n, v in res.items() if n.startswith("start/")}
    ref, ref_state = _numpy_run(name, dtype, start)
    one = _of(res, f"{name}/one")
    if dtype == "float64":
        _close(one, _torch_run(name, dtype, start), 1e-10, "fused vs torch.optim")
    for kind in WORKER_KINDS[dtype]:
        _check_run(res, f"{name}/{kind}", ref, ref_state, tol)
        _close(_of(res, f"{name}/{kind}"), one, tol, f"{kind} vs one device")


def whole_step() -> dict:
    """Optimizers with what stays the whole step's beside each tensor's own count."""
    from mithril.utils.optimizers import Adafactor, AdamW, Muon

    return {"muon-clip-skip": lambda: Muon(1e-2, weight_decay=0.1, ns_dtype=None,
                                           clip_norm=0.05, nonfinite="skip",
                                           fallback=AdamW(1e-2, weight_decay=0.1)),
            "adafactor-clip-skip": lambda: Adafactor(0.5, clip_norm=0.05, nonfinite="skip"),
            "muon-hyperparameters": optimizers()["muon"]}


@pytest.mark.parametrize("name", list(whole_step()))
def test_global_clipping_skips_and_hyperparameter_changes_as_numpy(name: str) -> None:
    """The clipping by the global norm and ``nonfinite="skip"`` (an inf target at step 6:
    skipped, no missed step counted) decide for the whole step, and hyperparameters changed
    mid-run (Muon's, its fallback's: traced from their first change) are read, as the NumPy
    step does: the same params (1e-6), step, skips and missed counts; each program compiled
    once."""
    import warnings

    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend
    from mithril.utils.training import make_train_step

    got = []
    for backend in (NumpyBackend(), JaxBackend()):
        c = ml.compile(two_heads(), backend, shapes=SHAPES)
        opt = whole_step()[name]()
        steps = {k: make_train_step(c, opt, loss=k) for k in LOSSES}
        params = {n: backend.array(np.asarray(v)) for n, v in
                  (got[0][0] if got else c.get_parameters()).items()}
        start = {n: np.asarray(v).copy() for n, v in params.items()}
        state = steps["loss_a"].init(params)
        for i, (loss, d) in enumerate(zip(SCHEDULE * 2, batches("float32") * 2)):
            if i == 5 and "skip" in name:
                d = {**d, "ta": np.full((8, 1), np.inf, "float32"),
                     "tb": np.full((8, 2), np.inf, "float32")}
            if i in (4, 9) and name == "muon-hyperparameters":
                opt.weight_decay, opt.momentum = (0.05, 0.8) if i == 4 else (0.02, 0.7)
                opt.fallback.beta1 = 0.8
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # (the skip's)
                params, state, _ = steps[loss](params, state, {k: backend.array(v)
                                                               for k, v in d.items()})
        held = steps["loss_a"].to_optimizer_state(state, params)
        assert steps["loss_a"].fused == (backend.name == "jax")
        if backend.name == "jax":
            assert [s._jitted._cache_size() for s in steps.values()] == [1, 1]
        got.append((start, {n: np.asarray(v) for n, v in params.items()},
                    (held.step, held.num_skipped, held.missed_counts())))
    _close(got[1][1], got[0][1], 1e-6, "fused vs NumPy")
    assert got[1][2] == got[0][2]
    assert got[0][2][:2] == ((14, 0) if name == "muon-hyperparameters" else (13, 1))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_counts_differing_inside_a_layer_resume_in_the_program(name: str) -> None:
    """A state whose bias missed a step its weight did not (``note_missed``: a hand-made
    count, as a torch run that used a weight alone would give) resumes in the program as
    the NumPy step runs it: each count lands on its own parameter."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend
    from mithril.utils.optimizers import AdamW
    from mithril.utils.training import make_train_step

    make = optimizers()["muon"] if name == "muon" else (
        lambda: AdamW(learning_rate=1e-2, weight_decay=0.1))
    got = []
    for backend in (NumpyBackend(), JaxBackend()):
        c = ml.compile(two_heads(), backend, shapes=SHAPES)
        opt = make()
        steps = {k: make_train_step(c, opt, loss=k) for k in LOSSES}
        params = {n: backend.array(np.asarray(v)) for n, v in
                  (got[0][0] if got else c.get_parameters()).items()}
        start = {n: np.asarray(v).copy() for n, v in params.items()}
        data = batches("float32")
        state = opt.init(params)
        for left_out in (["linear_0.bias", "linear_1.weight"], ["linear_0.bias"]):
            params, state = opt.update(params, {n: backend.array(np.full_like(v, 0.5))
                                                for n, v in start.items()
                                                if n not in left_out}, state)
            state.note_missed(left_out)
        if backend.name == "jax":
            state = steps["loss_a"].from_optimizer_state(state)
            assert np.asarray(state.hyperparams["missed"]).tolist() == [0, 2, 1, 0, 0, 0]
        for loss, d in zip(SCHEDULE, data):
            params, state, _ = steps[loss](params, state, {k: backend.array(v)
                                                           for k, v in d.items()})
        assert steps["loss_a"].fused == (backend.name == "jax")
        got.append((start, {n: np.asarray(v) for n, v in params.items()}))
    _close(got[1][1], got[0][1], 1e-6, "fused vs NumPy")


def test_weight_averaging_runs_in_the_one_program() -> None:
    """With weight averaging too the step with a head the loss does not reach is the one
    program, and the sharded step takes it (its numbers: test_train_step_unreached_averaging)."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.distributed.jax_parallel import make_sharded_train_step
    from mithril.utils.optimizers import Adafactor
    from mithril.utils.training import make_train_step

    c = ml.compile(two_heads(), JaxBackend(), shapes=SHAPES)
    assert make_train_step(c, Adafactor(1e-2), loss="loss_a").fused
    assert make_train_step(c, Adafactor(1e-2, ema_decay=0.9), loss="loss_a").fused
    make_sharded_train_step(c, Adafactor(1e-2, ema_decay=0.9), loss="loss_a", devices=1)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
