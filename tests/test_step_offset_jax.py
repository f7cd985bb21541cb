"""A param group's ``step_offset`` in the traced JAX program: ``optax_transformation`` under
``jax.jit`` and ``make_train_step`` on JAX. The group's step rules (bias corrections,
``lr_decay``, RAdam's and NAdam's step terms, Adafactor's per-tensor β̂) count ``t − k``,
``k`` a static int per row:
one program for every step, the state's count one int32 array. Before its group joins
(count ≤ k, a state begun by ``init``) a parameter is kept as torch keeps one it was not
yet given by ``add_param_group``: its params and slots unchanged, its gradient out of the
step. Side by side, float64: torch.optim with ``add_param_group`` after ``N`` steps, and
the eager NumPy engine resuming from an ``N``-step state with the group's ``step_offset``.
JAX float64 runs in a subprocess (x64 is process-global, see ``conftest``)."""

from __future__ import annotations

import contextlib
import unittest.mock as um
from typing import Any

import numpy as np
import pytest
import torch
from conftest import jax_float64_results, selected_cases

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.cli.networks import mlp_spec
from mithril.utils import optimizers as O

N, M = 4, 5  # steps before the late parameters join, steps after
TOL = 1e-10

CASES = {  # ours, torch's (lr 0.05 both)
    "adam": (O.Adam, {}, torch.optim.Adam, {}),
    "adamw": (O.AdamW, {"weight_decay": 0.1}, torch.optim.AdamW, {"weight_decay": 0.1}),
    "nadam": (O.NAdam, {}, torch.optim.NAdam, {}),
    "radam": (O.RAdam, {}, torch.optim.RAdam, {}),
    "adagrad_lr_decay": (O.AdaGrad, {"lr_decay": 0.1, "epsilon": 1e-10}, torch.optim.Adagrad,
                         {"lr_decay": 0.1}),
    "adafactor": (O.Adafactor, {}, torch.optim.Adafactor, {}),  # (per tensor: β̂ from t)
    # the global-norm clip over the optimizer's parameters: the late ones' only once joined
    "adam_clip_norm": (O.Adam, {"clip_norm": 0.05}, torch.optim.Adam, {}),
}
cases = sorted(CASES)
LR = 0.05
LATE = "linear_1"  # the layer whose parameters join after N steps


def make(case: str, offset: int | None) -> Any:
    ours, kw, _, _ = CASES[case]
    groups = {} if offset is None else {"param_groups": [{"params": LATE,
                                                          "step_offset": offset}]}
    return ours(learning_rate=LR, **kw, **groups)


def compiled(backend: Any) -> Any:
    spec = mlp_spec(4, 3, [5])
    return ml.compile(spec.model, backend, shapes=spec.shapes)


def problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The model's initial params (the NumPy backend's, seed 0) and N + M batches."""
    c = compiled(NumpyBackend(dtype="float64", seed=0))
    rng = np.random.default_rng(1)
    data = [{"input": rng.standard_normal((8, 4)), "target": rng.integers(0, 3, 8)}
            for _ in range(N + M)]
    return {k: np.array(v) for k, v in c.get_parameters().items()}, data


# -- the JAX side (in a float64 subprocess) -------------------------------------------------
def run(case: str, backend: str) -> dict[str, np.ndarray]:
    """The params after N + M steps through ``optax_transformation`` under ``jax.jit`` (each
    step's gradients :func:`gradients`'s at the params, ``opt#``) and through
    ``make_train_step`` (``step#``), both from ``init``; and each program's compiles and
    its state's count."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from mithril.backends import JaxBackend
    from mithril.interop import optax_transformation
    from mithril.utils.training import make_train_step

    assert backend == "jax"
    p0, data = problem()
    out: dict[str, np.ndarray] = {}
    # optax_transformation under jax.jit, the gradients of a NumPy-compiled model
    c_np = compiled(NumpyBackend(dtype="float64"))
    tx = optax_transformation(make(case, N))

    @jax.jit
    def step(p: Any, st: Any, g: Any) -> tuple:
        new, st = tx.update(g, st, p, new_params=True)
        return new, st

    p = {k: jnp.asarray(v) for k, v in p0.items()}
    st = tx.init(p)
    for i in range(N + M):
        g = gradients(c_np, {k: np.asarray(v) for k, v in p.items()}, data[i])
        p, st = step(p, st, {k: jnp.asarray(v) for k, v in g.items()})
    out.update({f"opt#{k}": np.asarray(v) for k, v in p.items()})
    out["opt_compiles"] = np.array(step._cache_size())
    out["opt_count"] = np.asarray(st.count)
    # make_train_step: forward, backward and the update as one program, the update as one
    # call of the CPU kernel (XLA's FFI; the calls counted as the program is traced)
    from mithril.utils.optimizers.engines import xla_ffi, xla_ffi_tensorwise

    kernel: list[str] = []

    def counted(module: Any, name: str) -> Any:
        fn = getattr(module, name)
        return lambda *a, **k: kernel.append(name) or fn(*a, **k)

    be = JaxBackend(dtype="float64")
    c = compiled(be)
    ts = make_train_step(c, make(case, N), loss="loss")
    p = {k: be.array(v) for k, v in p0.items()}
    st = ts.init(p)
    with um.patch.object(xla_ffi, "fused_update", counted(xla_ffi, "fused_update")), \
            um.patch.object(xla_ffi_tensorwise, "fused_adafactor",
                            counted(xla_ffi_tensorwise, "fused_adafactor")):
        for i in range(N + M):
            p, st, _ = ts(p, st, {"input": be.array(data[i]["input"]),
                                  "target": be.array(data[i]["target"], be.int_dtype)})
    out["step_kernel"] = np.array(len(kernel))
    out.update({f"step#{k}": np.asarray(v) for k, v in p.items()})
    out["step_compiles"] = np.array(ts._jitted._cache_size())
    out["step_count"] = np.asarray(st.count)
    out["step_fused"] = np.array(ts.fused)
    return out


# -- the references ----------------------------------------------------------------------------
def gradients(c: Any, params: dict[str, np.ndarray], batch: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    _, g = c.evaluate(params, batch, output_gradients={"loss": 1.0})
    return {k: np.asarray(v, dtype=np.float64) for k, v in g.items()}


@contextlib.contextmanager
def float64_scalars():
    """torch keeps its step scalars (NAdam's μ product, Adagrad's step) in the default
    dtype: float64 for the reference."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def torch_run(case: str) -> dict[str, np.ndarray]:
    """torch.optim over the early parameters, ``add_param_group`` of the late ones after
    N steps (their gradients unused before)."""
    _, _, cls, kw = CASES[case]
    p0, data = problem()
    c = compiled(NumpyBackend(dtype="float64"))
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    with float64_scalars():
        opt = cls([t for k, t in ts.items() if LATE not in k], lr=LR, **kw)
        for i in range(N + M):
            if i == N:
                opt.add_param_group({"params": [t for k, t in ts.items() if LATE in k]})
            g = gradients(c, {k: t.detach().numpy() for k, t in ts.items()}, data[i])
            for k, t in ts.items():
                t.grad = torch.tensor(g[k])
            if "clip_norm" in CASES[case][1]:  # (torch's clip: max_norm / (norm + 1e-6))
                torch.nn.utils.clip_grad_norm_([t for grp in opt.param_groups
                                                for t in grp["params"]],
                                               CASES[case][1]["clip_norm"])
            opt.step()
    return {k: t.detach().numpy().copy() for k, t in ts.items()}


def eager_run(case: str, make: Any = make) -> dict[str, np.ndarray]:
    """The eager NumPy engine: N steps of the early parameters, then a state of the late
    ones joined (their group's ``step_offset`` N; the state's slots and values carried
    over) for M steps. ``make(case, offset)``: the optimizer."""
    p0, data = problem()
    be = NumpyBackend(dtype="float64")
    c = compiled(be)
    first = make(case, None)
    early = {k: v.copy() for k, v in p0.items() if LATE not in k}
    st = first.init(early)
    for i in range(N):
        g = gradients(c, {**early, **{k: v for k, v in p0.items() if LATE in k}}, data[i])
        early, st = first.update(early, {k: g[k] for k in early}, st)
    before = first.state_dict(st)
    opt = make(case, N)
    p = {**{k: v.copy() for k, v in p0.items() if LATE in k}, **early}
    fresh = opt.state_dict(opt.init(p))
    st = opt.load_state_dict({**fresh, **{k: before[k] for k in ("step", "values")
                                          if k in before}, "slots": {
        s: {k: before["slots"][s][k] if k in early else fresh["slots"][s][k] for k in p}
        for s in fresh["slots"]}}, p)
    for i in range(N, N + M):
        p, st = opt.update(p, gradients(c, p, data[i]), st)
    assert st.step == N + M
    return p


@pytest.fixture(scope="module")
def jax_results(request) -> dict[str, dict[str, np.ndarray]]:
    """The selected cases' JAX runs, in one subprocess."""
    return jax_float64_results("test_step_offset_jax", "cases", "run",
                                     only=selected_cases(request, "case", cases))


#: by default every step rule but AdamW's (Adam's bias corrections with a decoupled decay:
#: the rule "adam" runs); it runs under ``-m slow``
@pytest.mark.parametrize("case", [c if c != "adamw" else pytest.param(
    c, marks=pytest.mark.slow) for c in cases])
def test_traced_program_counts_a_late_groups_steps_as_torch(case, jax_results):
    got = jax_results[case]
    ref, eager = torch_run(case), eager_run(case)
    p0, _ = problem()
    for k in ref:
        np.testing.assert_allclose(eager[k], ref[k], rtol=0, atol=TOL, err_msg=k)
        for path in ("opt", "step"):
            np.testing.assert_allclose(got[f"{path}#{k}"], ref[k], rtol=0, atol=TOL,
                                       err_msg=f"{path} {k}")
        assert not np.allclose(ref[k], p0[k])  # (every parameter moved)
    # one program for every step (the late rows' offsets are static), one int32 count
    assert int(got["opt_compiles"]) == 1 and int(got["step_compiles"]) == 1
    assert bool(got["step_fused"])
    assert int(got["step_kernel"]) == 1  # (the late rows through the kernel too)
    for key in ("opt_count", "step_count"):
        assert got[key].shape == () and got[key].dtype == np.int32 and int(got[key]) == N + M


def test_without_the_offset_the_late_parameters_differ_from_torch():
    """What the offset changes (the test above could not pass without it): the late
    layer's first Adam steps counting the optimizer's steps are ~3x torch's."""
    p0, data = problem()
    ref = torch_run("adam")
    be = NumpyBackend(dtype="float64")
    c = compiled(be)
    opt = make("adam", None)
    p = {k: v.copy() for k, v in p0.items()}
    st = opt.init(p)
    for i in range(N + M):  # the late layer stepped from the start: no peer of torch's run
        g = gradients(c, p, data[i])
        if i < N:
            g = {k: (np.zeros_like(v) if LATE in k else v) for k, v in g.items()}
        p, st = opt.update(p, g, st)
    late = [k for k in p if LATE in k]
    assert max(np.abs(p[k] - ref[k]).max() for k in late) > 1e-3
