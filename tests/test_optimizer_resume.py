"""Resuming an optimizer from a save is bit-identical to never having stopped.

For every optimizer case of :data:`optimizer_parity.CASES` (SGD plain / momentum / Nesterov /
dampening, Adam, AMSGrad with its ``vmax`` slot, AdamW, the RMSProp variants, AdaGrad whose
``lr_decay`` depends on the step count, each also with weight decay) and every backend (NumPy,
torch, JAX through the fused numba engine, JAX through the jitted ``JaxEngine``):

* a reference run takes ``K + N`` uninterrupted steps;
* a second run takes ``K`` steps, is saved - through the public ``optimizer.state_dict(state)``
  and through the safetensors checkpoint (:func:`~mithril.utils.checkpoint.save_checkpoint`) -
  and then goes on for ``N`` more steps itself (so a save that perturbed the run, or a saved
  dict aliasing the live buffers, shows up);
* fresh optimizers, constructed with a wrong learning rate (the save restores it), load the
  saved state into fresh parameter arrays and take the same ``N`` steps.

Parameters, every state slot and the counters ``step`` / ``num_skipped`` / ``num_nonfinite``
must equal the reference exactly (``np.testing.assert_array_equal``: NaN equals NaN in the same
place). The learning rate is changed with ``set_learning_rate`` before the save and again after
it, so the saved learning rate is not the constructor's and the continuation's lr changes apply
to the resumed optimizer as to the reference. ``K = 3``: past SGD's undampened first step, and
AdaGrad's decayed lr and Adam's bias corrections depend on the restored step.

On representative cases of each family, also: ``num_skipped`` (``nonfinite="skip"``, an inf
gradient before the save and a NaN one after it), ``num_nonfinite`` (the default
``"propagate"``, same gradients) and loading a state back into the very optimizer that saved
it after its learning rate was changed again.

Shapes are tiny (a 3x4 matrix, a vector, a 0-d scalar) and runs short; the cost is compiling
each kernel once per process (numba, and the jitted engine, whose compiled step is shared by
every ``init`` of the same layout).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from optimizer_parity import CASES, host, make_opt, natives, on

import mithril.utils.optimizers as mo
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

K, N = 3, 4
DTYPE = "float32"
BACKENDS = ("numpy", "torch", "jax", "jax-jit")
EXPECTED_ENGINE = {"numpy": "NumbaEngine", "torch": "NumbaEngine", "jax": "NumbaEngine",
                   "jax-jit": "JaxEngine"}
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
#: set_learning_rate(factor * initial lr) before the update of step index t (0-based)
LR_CHANGES = {1: 0.5, K + 1: 3.0}


def _problem(steps: int = K + N, seed: int = 7, bad: dict[int, str] | None = None):
    """Start params and gradients (NumPy ``DTYPE``); ``bad``: {step index: "inf"/"nan"} puts
    that value in one element of ``w``'s gradient at that step."""
    rng = np.random.default_rng(seed)
    p0 = {k: rng.standard_normal(s).astype(DTYPE) for k, s in SHAPES.items()}
    grads = [{k: (rng.standard_normal(s) * (1 + t % 3)).astype(DTYPE) for k, s in SHAPES.items()}
             for t in range(steps)]
    for t, what in (bad or {}).items():
        grads[t]["w"][1, 2] = float(what)
    return p0, grads


def _run(opt, backend, params, state, grads, steps, lr0):
    """Steps ``steps`` (indices into ``grads``) with the lr changes of :data:`LR_CHANGES`."""
    for t in steps:
        if t in LR_CHANGES:
            opt.set_learning_rate(lr0 * LR_CHANGES[t])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite tests' warnings
            params, state = opt.update(params, natives(backend, grads[t]), state)
    return params, state


def _snapshot(params, state) -> dict:
    """Host copies of everything a resumed run must reproduce."""
    return {"params": {k: host(v) for k, v in params.items()},
            "slots": {s: {k: host(v) for k, v in state.slot(s).items()} for s in state.slots},
            "counters": (state.step, state.num_skipped, state.num_nonfinite),
            "engine": type(state.engine).__name__}


def _assert_same(got: dict, ref: dict, label: str) -> None:
    assert got["engine"] == ref["engine"], label
    assert got["counters"] == ref["counters"], f"{label}: (step, num_skipped, num_nonfinite)"
    assert got["params"].keys() == ref["params"].keys()
    for k, v in ref["params"].items():
        assert got["params"][k].dtype == v.dtype and got["params"][k].shape == v.shape
        np.testing.assert_array_equal(got["params"][k], v, err_msg=f"{label}: params[{k}]")
    assert got["slots"].keys() == ref["slots"].keys(), label
    for s, per in ref["slots"].items():
        for k, v in per.items():
            np.testing.assert_array_equal(got["slots"][s][k], v, err_msg=f"{label}: {s}[{k}]")


def _fresh(case: str) -> mo.Optimizer:
    """The optimizer of ``case`` built with a wrong learning rate (loading restores it)."""
    cls, kw, _, _ = CASES[case]
    return getattr(mo, cls)(**{**kw, "learning_rate": 123.0})


def _check_resume(case: str, backend: str, tmp_path, extra: dict | None = None,
                  bad: dict[int, str] | None = None) -> dict:
    extra = extra or {}
    p0, grads = _problem(bad=bad)
    with on(backend, DTYPE):
        # uninterrupted reference
        opt = make_opt(case, **extra)
        lr0 = opt.get_learning_rate()
        params = natives(backend, p0)
        params, state = _run(opt, backend, params, opt.init(params), grads, range(K + N), lr0)
        ref = _snapshot(params, state)
        assert ref["engine"] == EXPECTED_ENGINE[backend]
        assert state.step + state.num_skipped == K + N

        # K steps, save both ways, then the same run goes on
        opt_a = make_opt(case, **extra)
        params = natives(backend, p0)
        params, state = _run(opt_a, backend, params, opt_a.init(params), grads, range(K), lr0)
        saved = opt_a.state_dict(state)
        saved_params = {k: host(v) for k, v in params.items()}
        path = tmp_path / f"{case}-{backend}.safetensors"
        save_checkpoint(path, params, opt_a, state)
        assert saved["hyperparameters"]["learning_rate"] == lr0 * LR_CHANGES[1]
        assert (saved["step"], saved["num_skipped"], saved.get("num_nonfinite")) == \
            (state.step, state.num_skipped, state.num_nonfinite)
        params, state = _run(opt_a, backend, params, state, grads, range(K, K + N), lr0)
        _assert_same(_snapshot(params, state), ref, f"{case}/{backend}: run that was saved")

        # fresh optimizer + fresh arrays, through state_dict / load_state_dict
        opt_b = _fresh(case)
        params = natives(backend, saved_params)
        state = opt_b.load_state_dict(saved, params)
        assert opt_b.hyperparameters() == make_opt(case, **extra).hyperparameters() | \
            {"learning_rate": lr0 * LR_CHANGES[1]}
        params, state = _run(opt_b, backend, params, state, grads, range(K, K + N), lr0)
        _assert_same(_snapshot(params, state), ref, f"{case}/{backend}: load_state_dict")

        # fresh optimizer, through the safetensors checkpoint
        opt_c = _fresh(case)
        ck = load_checkpoint(path, params_template=natives(backend, p0), optimizer=opt_c)
        assert opt_c.get_learning_rate() == lr0 * LR_CHANGES[1]
        params, state = _run(opt_c, backend, ck["params"], ck["state"], grads, range(K, K + N),
                             lr0)
        _assert_same(_snapshot(params, state), ref, f"{case}/{backend}: load_checkpoint")
    return ref


def _plain(case, backend, tmp_path):
    ref = _check_resume(case, backend, tmp_path)
    assert ref["counters"] == (K + N, 0, 0)
    assert all(np.isfinite(v).all() for v in ref["params"].values())


def _skipped(case, backend, tmp_path):
    """nonfinite="skip": an inf gradient before the save and a NaN one after it are skipped;
    the skipped count goes on from the saved value and skipped steps do not count as steps."""
    ref = _check_resume(case, backend, tmp_path, {"nonfinite": "skip"},
                        bad={1: "inf", K + 1: "nan"})
    assert ref["counters"] == (K + N - 2, 2, 0)
    assert all(np.isfinite(v).all() for v in ref["params"].values())


def _nonfinite(case, backend, tmp_path):
    """nonfinite="propagate" (the default): the steps are applied, non-finite values land in
    ``w[1, 2]`` (and its slots) only, and ``num_nonfinite`` goes on from the saved value (it
    counts non-finite raw gradients: 2 here, also with coupled weight decay of a NaN ``p``)."""
    ref = _check_resume(case, backend, tmp_path, bad={1: "inf", K + 1: "nan"})
    assert ref["counters"] == (K + N, 0, 2)
    w = ref["params"]["w"]
    assert not np.isfinite(w[1, 2]) and np.isfinite(np.delete(w.ravel(), 6)).all()
    assert np.isfinite(ref["params"]["b"]).all()


def _same_optimizer(case, backend, tmp_path):
    """Load a state back into the optimizer that saved it, after its learning rate was changed
    again and it took another step: the saved learning rate comes back and the continuation
    matches the uninterrupted run."""
    p0, grads = _problem()
    with on(backend, DTYPE):
        opt = make_opt(case)
        lr0 = opt.get_learning_rate()
        params = natives(backend, p0)
        params, state = _run(opt, backend, params, opt.init(params), grads, range(K + N), lr0)
        ref = _snapshot(params, state)

        opt = make_opt(case)
        params = natives(backend, p0)
        params, state = _run(opt, backend, params, opt.init(params), grads, range(K), lr0)
        saved = opt.state_dict(state)
        saved_params = {k: host(v) for k, v in params.items()}
        opt.set_learning_rate(lr0 * 7.0)
        params, state = opt.update(params, natives(backend, grads[K]), state)
        params = natives(backend, saved_params)
        state = opt.load_state_dict(saved, params)
        assert opt.get_learning_rate() == lr0 * LR_CHANGES[1] and state.step == K
        params, state = _run(opt, backend, params, state, grads, range(K, K + N), lr0)
        _assert_same(_snapshot(params, state), ref, f"{case}/{backend}: same optimizer")


# One test per optimizer family, all checks and backends inside: the cost is compiling each
# kernel once per process (numba in place and double-buffered, the jitted engine with and
# without the skip guard), so with ``-n 2`` each family's kernels are compiled by one worker
# only (xdist hands each worker two consecutive tests first; the order balances the two).
FAMILIES = {"SGD": ("SGD",), "Adam": ("Adam", "AdamW"), "RMSProp": ("RMSProp",),
            "AdaGrad": ("AdaGrad",)}
#: per family, the cases (step-dependent ones first) for the counter and same-optimizer checks
REPRESENTATIVES = {"SGD": ("sgd_dampening", "sgd_nesterov"), "Adam": ("amsgrad", "adamw"),
                   "RMSProp": ("rmsprop_centered_momentum",), "AdaGrad": ("adagrad",)}
CHECKS = {"counters, nonfinite='skip'": _skipped, "counters, nonfinite='propagate'": _nonfinite,
          "same optimizer": _same_optimizer}


def _cases(family: str) -> list[str]:
    return [c for c, (cls, _, _, _) in CASES.items() if cls in FAMILIES[family]]


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bit_identical(family, tmp_path):
    """Every case of the family on every backend (through state_dict and the checkpoint);
    the counter and same-optimizer checks on its representative cases. All failures are
    reported together."""
    checks = [(f"{c}/{b}", _plain, c, b) for c in _cases(family) for b in BACKENDS]
    checks += [(f"{name}: {c}/{b}", fn, c, b) for name, fn in CHECKS.items()
               for c in REPRESENTATIVES[family] for b in BACKENDS]
    failures = []
    for label, fn, case, backend in checks:
        try:
            fn(case, backend, tmp_path)
        except AssertionError as e:
            failures.append(f"{label}: {e}")
    assert not failures, "\n".join(failures)


def test_families_cover_every_case():
    covered = {c for f in FAMILIES for c in _cases(f)}
    assert covered == set(CASES), sorted(set(CASES) - covered)
    assert all(c in _cases(f) for f, cs in REPRESENTATIVES.items() for c in cs)
