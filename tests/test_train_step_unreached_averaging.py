"""The one-program JAX step (and the data-parallel one, on 2 CPU devices) with parameters the
loss does not reach, for what it used to leave to the separate calls (or get wrong):

* weight averaging (``ema_decay``, ``swa_start``, ``ema_every``) of an elementwise optimizer
  (AdamW) and of a tensorwise one (Muon, Adafactor). The optimizer's ``update`` moves the
  average of a parameter without a gradient too (toward its unchanged value, with the weight
  of the optimizer's step: torch's ``AveragedModel.update_parameters(model)`` averages every
  parameter), and each weight reads the optimizer's count, not the parameter's own. Before,
  the program left those averages alone and read ``t − missed``: AdamW(ema_decay=0.9)'s
  averages were 4.7e-3 off the NumPy step's after 7 steps (SWA: 1.1e-2);
* a tensorwise optimizer's param group with a ``step_offset`` (a state that took 2 steps
  before it);
* ``Lookahead(reset_state=True)``: its inner count restarts at each sync, one for all, so no
  parameter keeps a missed count (``note_missed``'s rule): each row takes the group's count.

A two-head model trained on each head's loss in turn (``tests/test_unreached_params.py``'s,
the harness of ``tests/test_train_step_unreached_tensorwise.py``): the fused step equals the
separate calls on JAX and the NumPy step (float32 to 1e-6, float64 to 1e-12), compiles once
per loss, converts to the same state (steps, missed and averaging counts, every slot), and a
state dict taken mid-run resumes bit for bit as the unbroken run; AdamW's averages equal
torch.optim.AdamW + ``AveragedModel`` with ``.grad = None`` on the head not reached.

The 2-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` before JAX
starts: this file is the worker too (``python tests/test_train_step_unreached_averaging.py
DTYPE OUT.npz``), run once per dtype in a fresh interpreter, float64 with x64 on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("jax")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_train_step_unreached_tensorwise as T  # noqa: E402
from test_unreached_params import SCHEDULE, TorchTwoHeads, torch_copy, two_heads  # noqa: E402

LOSSES, SHAPES, SAVE_AT = T.LOSSES, T.SHAPES, T.SAVE_AT
#: (the kinds each worker runs: 2 devices, the state replicated and sharded)
WORKER_KINDS = ("one", "rep", "shard")


def optimizers() -> dict:
    """name -> (make, the steps the state took before the run)."""
    from mithril.utils.optimizers import SGD, Adafactor, Adam, AdamW, Lookahead, Muon

    late = [{"params": ["linear_0.weight", "linear_2.weight"], "step_offset": 2}]
    return {
        "adamw-ema": (lambda: AdamW(1e-2, weight_decay=0.1, ema_decay=0.9), 0),
        "adamw-swa": (lambda: AdamW(1e-2, weight_decay=0.1, swa_start=3), 0),
        "adamw-ema-swa-every": (lambda: AdamW(1e-2, ema_decay=0.8, ema_every=2, ema_start=2,
                                              swa_start=3), 0),
        "muon-ema": (lambda: Muon(1e-2, weight_decay=0.1, ns_dtype=None, ema_decay=0.9,
                                  fallback=AdamW(1e-2, weight_decay=0.1)), 0),
        "adafactor-swa": (lambda: Adafactor(0.5, beta2_decay=-0.5, swa_start=2), 0),
        "adafactor-offset-ema": (lambda: Adafactor(0.5, ema_decay=0.9, param_groups=late), 2),
        "muon-offset": (lambda: Muon(1e-2, ns_dtype=None, param_groups=late[:1],
                                     fallback=AdamW(1e-2)), 2),
        "lookahead-reset": (lambda: Lookahead(Adam(1e-2), sync_period=3, reset_state=True), 0),
        "lookahead-reset-ema": (lambda: Lookahead(SGD(0.05, momentum=0.9, ema_decay=0.8),
                                                  sync_period=2, reset_state=True), 0),
    }


def _held(prefix: str, opt, state, params) -> dict[str, np.ndarray]:
    """A run's params and its state as ``optimizer.init`` holds it (step, missed counts,
    averaging counts, slots)."""
    from mithril.utils.optimizers.averaging import counts_of

    out = T._held(prefix, state, params)
    for s, c in (counts_of(opt, state) or {}).items():
        out[f"{prefix}/averaged/{s}"] = np.asarray(c)
    return out


def _run(name: str, kind: str, dtype: str, start: dict | None = None) -> dict[str, np.ndarray]:
    """The schedule on ``kind``'s step (``"numpy"``: the NumPy step) from ``start`` (None:
    the seed's params); the fused ones also converted after SAVE_AT steps to a state dict
    and resumed by a new optimizer and steps (``resumed``)."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend

    make, step0 = optimizers()[name]
    backend = NumpyBackend(dtype=dtype) if kind == "numpy" else JaxBackend(dtype=dtype, seed=0)
    c = ml.compile(two_heads(), backend, shapes=SHAPES)
    opt = make()
    steps = T._steps(c, opt, "one" if kind == "numpy" else kind)
    params = {n: backend.array(np.asarray(v)) for n, v in
              (start or c.get_parameters()).items()}
    out = {f"start/{n}": np.asarray(v).copy() for n, v in params.items()}
    state = opt.init(params)
    state.step = step0  # (a group with a step_offset joined after as many)
    fused = kind not in ("separate", "numpy")
    if fused:
        state = steps[SCHEDULE[0]].from_optimizer_state(state)
    data = T.batches(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback warned of, nothing skipped)
        for i, (loss, d) in enumerate(zip(SCHEDULE, data)):
            if i == SAVE_AT and fused:
                sd = opt.state_dict(steps[loss].to_optimizer_state(state, params))
                saved = {n: np.asarray(v).copy() for n, v in params.items()}
            params, state, _ = steps[loss](params, state, {k: backend.array(v)
                                                           for k, v in d.items()})
    prefix = f"{name}/{kind}"
    out[f"{prefix}/fused"] = np.array(all(s.fused for s in steps.values()))
    out[f"{prefix}/optax"] = np.array(type(state).__name__ == "OptaxState")
    out.update(_held(prefix, opt, steps[LOSSES[0]].to_optimizer_state(state, params), params))
    if not fused:
        return out
    out[f"{prefix}/compiles"] = np.array([s._jitted._cache_size() for s in steps.values()])
    opt2 = make()
    steps2 = T._steps(c, opt2, kind)
    p = {n: backend.array(v) for n, v in saved.items()}
    state = steps2[SCHEDULE[SAVE_AT]].from_optimizer_state(opt2.load_state_dict(sd, p))
    for loss, d in zip(SCHEDULE[SAVE_AT:], data[SAVE_AT:]):
        p, state, _ = steps2[loss](p, state, {k: backend.array(v) for k, v in d.items()})
    out.update(_held(f"{prefix}/resumed", opt2, steps2[LOSSES[0]].to_optimizer_state(state, p),
                     p))
    return out


def main() -> None:
    dtype, out = sys.argv[1:3]
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 2, jax.devices()
    flat: dict[str, np.ndarray] = {}
    for name in optimizers():
        for kind in WORKER_KINDS:
            got = _run(name, kind, dtype)
            assert all(np.array_equal(flat.get(k, v), v) for k, v in got.items()
                       if k.startswith("start/"))  # (every run from the seed's params)
            flat.update(got)
    np.savez(out, **flat)


def _start(res: dict) -> dict[str, np.ndarray]:
    return {n[len("start/"):]: v for n, v in res.items() if n.startswith("start/")}


def _check(res: dict, prefix: str, ref: dict, tol: float) -> None:
    """The fused run ``prefix`` against the NumPy run ``ref`` (``name/numpy``'s keys): one
    compile per loss, its params, step, missed and averaging counts and slots to ``tol``,
    and its resumed half the unbroken run bit for bit."""
    name = prefix.split("/")[0]
    assert bool(res[f"{prefix}/fused"]) and bool(res[f"{prefix}/optax"]), prefix
    assert res[f"{prefix}/compiles"].tolist() == [1, 1], prefix
    want = {k[len(f"{name}/numpy/"):]: v for k, v in ref.items()
            if k.startswith(f"{name}/numpy/") and not k.endswith(("/fused", "/optax"))}
    got = T._of(res, prefix, "")
    mine = {k: v for k, v in got.items()
            if not k.startswith(("resumed/", "fused", "compiles", "optax"))}
    assert set(mine) == set(want), (prefix, set(mine) ^ set(want))
    for k, v in want.items():
        if k.startswith(("step", "missed/", "averaged/")):
            assert np.array_equal(mine[k], v), (prefix, k, mine[k], v)
        elif k.startswith(("p/", "slot/")):
            np.testing.assert_allclose(mine[k], v, rtol=tol, atol=tol, err_msg=f"{prefix} {k}")
    resumed = {k[len("resumed/"):]: v for k, v in got.items() if k.startswith("resumed/")}
    assert set(resumed) == set(mine) and len(mine) > 13, prefix
    for k in mine:
        assert np.array_equal(resumed[k], mine[k]), (prefix, k)


def _expected_missed(name: str) -> dict[str, int]:
    if name.startswith("lookahead-reset"):
        return {}  # (its inner count restarts at each sync, one for all: none counted)
    return {"linear_1.weight": 3, "linear_1.bias": 3, "linear_2.weight": 4,
            "linear_2.bias": 4}


#: run by default (each ~5-9 s of CPU); the others are @pytest.mark.slow
FAST = ("adamw-ema", "adafactor-offset-ema", "lookahead-reset")


def _cases(fast: tuple[str, ...]) -> list:
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in optimizers()]


@pytest.mark.parametrize("name", _cases(FAST))
def test_one_device_equals_separate_calls_and_numpy(name: str) -> None:
    """float32, one device: fused (one compile per loss), as the NumPy step and the separate
    calls on JAX (to 1e-6), the same counts, and resumed mid-run bit for bit."""
    res = _run(name, "one", "float32")
    start = _start(res)
    res.update(_run(name, "separate", "float32", start))
    ref = _run(name, "numpy", "float32", start)
    assert not bool(ref[f"{name}/numpy/optax"]) and not bool(res[f"{name}/separate/optax"])
    _check(res, f"{name}/one", ref, 1e-6)
    T._close(T._of(res, f"{name}/one"), T._of(res, f"{name}/separate"), 1e-6, "vs separate")
    missed = {n: int(v) for n, v in T._of(ref, f"{name}/numpy", "missed").items() if v}
    assert missed == _expected_missed(name)
    one = T._of(res, f"{name}/one")
    assert all(np.any(one[n] != start[n]) for n in start)  # (each head reached at times)
    for s in ("ema", "swa"):  # (the unreached head's average moved while it was not reached)
        got = T._of(res, f"{name}/one", f"slot/{s}")
        if got:
            assert not np.array_equal(got["linear_2.weight"], one["linear_2.weight"])


def test_reset_state_refuses_a_state_with_missed_counts_by_name() -> None:
    """A Lookahead with ``reset_state`` keeps no missed counts (its program takes the group's
    count): a state whose parameters count their own is refused, naming them, unchanged."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.optimizers import Adam, Lookahead
    from mithril.utils.training import make_train_step

    c = ml.compile(two_heads(), JaxBackend(), shapes=SHAPES)
    opt = Lookahead(Adam(1e-2), sync_period=3, reset_state=True)
    step = make_train_step(c, opt, loss="loss_a")
    assert step.fused
    state = opt.init(c.get_parameters())
    state.note_missed(["linear_1.bias"])
    with pytest.raises(ValueError, match=r"\['linear_1.bias'\] missed steps.*reset_state"):
        step.from_optimizer_state(state)
    assert state.missed_counts() == {"linear_1.bias": 1}


@pytest.fixture(scope="module", params=["float32", "float64"])
def results(request, tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    dtype = request.param
    out = str(tmp_path_factory.mktemp("averaging") / f"{dtype}.npz")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    res = subprocess.run([sys.executable, __file__, dtype, out], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    with np.load(out) as z:
        return dtype, {k: z[k] for k in z.files}


@pytest.mark.slow  # (~1 min of CPU per dtype)
@pytest.mark.parametrize("name", list(optimizers()))
def test_two_devices_equal_one_device_and_numpy(results, name: str) -> None:
    """2 devices, the optimizer state replicated and sharded (the sharded step takes them
    all now), float32 (to 1e-6) and float64 (to 1e-12): the NumPy step's numbers."""
    dtype, res = results
    tol = 1e-12 if dtype == "float64" else 1e-6
    ref = _run(name, "numpy", dtype, _start(res))
    for kind in WORKER_KINDS:
        _check(res, f"{name}/{kind}", ref, tol)


@pytest.mark.parametrize("name", ["adamw-ema", pytest.param("adamw-swa",
                                                              marks=pytest.mark.slow)])
def test_averages_equal_torch_averaged_model(name: str) -> None:
    """float64: the fused step's params and averages as torch.optim.AdamW with ``.grad =
    None`` on the head not reached and ``AveragedModel.update_parameters(model)`` after each
    step (EMA: ``get_ema_multi_avg_fn(0.9)``; SWA: the default mean from step 3 on), to
    1e-12."""
    import torch
    from optimizer_parity import jax_float64
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    with jax_float64():
        res = _run(name, "one", "float64")
    start = _start(res)
    module = TorchTwoHeads().double()
    torch_copy(module, start)
    topt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    avg = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if name == "adamw-ema" \
        else AveragedModel(module)
    for t, (loss, d) in enumerate(zip(SCHEDULE, T.batches("float64")), 1):
        topt.zero_grad(set_to_none=True)
        module(torch.from_numpy(d["input"]), loss, d).backward()
        topt.step()
        if name == "adamw-ema" or t >= 3:
            avg.update_parameters(module)
    slot = "ema" if name == "adamw-ema" else "swa"
    T._close(T._of(res, f"{name}/one"), {n: p.detach().numpy() for n, p in
                                          module.named_parameters()}, 1e-12, "params vs torch")
    T._close(T._of(res, f"{name}/one", f"slot/{slot}"),
             {n: p.detach().numpy() for n, p in avg.module.named_parameters()}, 1e-12,
             f"{slot} vs AveragedModel")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
