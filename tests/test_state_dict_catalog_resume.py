"""Every optimizer of the catalog resumes from its state dict, and from a checkpoint, exactly
as if it had not stopped, with an EMA, an SWA, a parameter group of its own learning rate and
a parameter that missed steps (:meth:`OptimizerState.note_missed`, torch's per-parameter
``step``).

A reference run takes ``K + N`` steps ('b' has no gradient at steps 1 and ``K + 1``, noted
missed); a second one saves after ``K`` (``state_dict`` -> ``load_state_dict`` into a fresh
optimizer whose learning rate is wrong until the load restores it, and ``save_checkpoint``
-> ``load_checkpoint``) and takes the same ``N`` steps. Params, every slot (the averages
among them), the optimizer-wide values, the step, the averages' counts and the missed
counts must equal the reference: bit for bit on NumPy and torch (float64), to 1e-12
(relative to each array's largest value) on JAX float64 through the jitted engine (a
separately compiled program). The per-family resumes of :mod:`test_optimizer_resume` and
the catalogs' own tests run without averages, groups or missed counts.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
from optimizer_parity import on

import mithril.utils.optimizers as mo
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

K, N = 4, 3
SHAPES = {"w": (3, 4), "b": (4,)}
MISSED_AT = (1, K + 1)
NAMES = [n for n in mo.__all__ if inspect.isclass(getattr(mo, n))
         and issubclass(getattr(mo, n), mo.Optimizer)
         and n not in ("Optimizer", "LBFGS", "Lookahead", "SAM", "DPSGD",
                       "DifferentiallyPrivate")]  # (closures; a wrapper: own
# tests, tests/test_lookahead.py, tests/test_optimizers_mechanize_sam.py)


def make(name: str):
    options = dict(ema_decay=0.9, swa_start=2,
                   param_groups=[{"params": ["b"], "learning_rate": 0.003}])
    if name in ("Mechanize", "ScheduleFree"):  # (wrappers: the base keeps averages, groups)
        return getattr(mo, name)(mo.Adam(**options))
    return getattr(mo, name)(**options)


def native(backend: str, a: np.ndarray):
    if backend == "torch":
        import torch

        return torch.tensor(a)
    if backend.startswith("jax"):
        import jax.numpy as jnp

        return jnp.asarray(a)
    return a.copy()


def host(x) -> np.ndarray:
    return x.detach().numpy().copy() if hasattr(x, "detach") else np.array(x)


def _steps(opt, params, state, grads, steps, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in steps:
            g = {k: native(backend, v) for k, v in grads[t].items()}
            # (the loss-aware: a loss of each step's, the same in every run)
            loss = {"loss": 1.0 + 0.5 * t} if opt.needs_loss else {}
            params, state = opt.update(params, g, state, **loss)
            if t in MISSED_AT:
                state.note_missed(["b"])
    return params, state


def _outcome(opt, params, state) -> dict:
    sd = opt.state_dict(state)
    out = {f"p/{k}": host(v) for k, v in params.items()}
    out.update({f"{s}/{n}": a for s, per in sd["slots"].items() for n, a in per.items()})
    out.update({f"value/{k}": np.float64(v) for k, v in sd.get("values", {}).items()})
    out["counts"] = (sd["step"], sd.get("averaged"), sd.get("missed"), opt.get_learning_rate())
    return out


def runs(name: str, backend: str, folder) -> tuple[dict, dict, dict]:
    """The outcomes of the uninterrupted run and of the two resumed ones."""
    rng = np.random.default_rng(5)
    p0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()
              if not (k == "b" and t in MISSED_AT)} for t in range(K + N)]
    with on(backend, "float64"):
        opt = make(name)
        params = {k: native(backend, v) for k, v in p0.items()}
        params, state = _steps(opt, params, opt.init(params), grads, range(K), backend)
        saved = opt.state_dict(state)
        path = folder / f"{name}.safetensors"
        save_checkpoint(path, params, opt, state)
        saved_params = {k: host(v) for k, v in params.items()}
        want = _outcome(opt, *_steps(opt, params, state, grads, range(K, K + N), backend))

        fresh = make(name)
        fresh.set_learning_rate(123.0)  # (the load restores the saved one)
        p = {k: native(backend, v) for k, v in saved_params.items()}
        st = fresh.load_state_dict(saved, p)
        via_dict = _outcome(fresh, *_steps(fresh, p, st, grads, range(K, K + N), backend))

        other = make(name)
        other.set_learning_rate(123.0)
        ck = load_checkpoint(path, params_template={k: native(backend, v)
                                                    for k, v in saved_params.items()},
                             optimizer=other)
        via_file = _outcome(other, *_steps(other, ck["params"], ck["state"], grads,
                                           range(K, K + N), backend))
    return want, via_dict, via_file


def _compare(want: dict, got: dict, exact: bool, label: str) -> None:
    assert want.keys() == got.keys(), label
    assert got["counts"] == want["counts"], label
    for k, w in want.items():
        if k == "counts":
            continue
        g = got[k]
        if exact:
            np.testing.assert_array_equal(g, w, err_msg=f"{label}: {k}")
        else:
            scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-300)
            err = float(np.max(np.abs(g - w), initial=0.0)) / scale
            assert err <= 1e-12, (label, k, err)


def _params():
    for name in NAMES:
        for backend in ("numpy", "torch", "jax-jit"):
            marks = []
            if backend == "jax-jit":
                marks.append(pytest.mark.slow)
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


@pytest.mark.parametrize("name, backend", list(_params()))
def test_resume_equals_the_uninterrupted_run(name, backend, tmp_path):
    want, via_dict, via_file = runs(name, backend, tmp_path)
    assert want["counts"][2] == {"b": 2} and want["counts"][1]["ema"]["b"] == K + N
    exact = backend != "jax-jit"
    _compare(want, via_dict, exact, f"{name}/{backend}/state_dict")
    _compare(want, via_file, exact, f"{name}/{backend}/checkpoint")
