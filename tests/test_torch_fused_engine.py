"""The torch fused-kernel engine (:mod:`mithril.utils.optimizers.engines.torch_fused`): torch's
own ``_fused_adam_`` / ``_fused_adamw_`` / ``_fused_sgd_`` on views of our flat buffers, the
default on CUDA. On CPU it is forced (``engines.TORCH_ENGINE = "fused-ops"``: torch has the
same kernels there) and compared side by side with ``torch.optim``'s ``fused=True`` step, bit
for bit; the CUDA tests run where torch sees a GPU (the device checks of issue #16) and
compare the same on the GPU, a compiled model's gradients and train step with the CPU's,
and JAX-on-GPU with optax."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mithril as ml
import mithril.utils.optimizers.engines as engines
from mithril.backends import TorchBackend
from mithril.utils.optimizers import SGD, Adam, AdamW, RMSProp
from mithril.utils.optimizers.engines.torch_fused import TorchFusedEngine

CUDA = torch.cuda.is_available()
SHAPES = {"w1": (6, 5), "b1": (5,), "w2": (5, 3), "s": ()}
STEPS = 6
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")


@pytest.fixture
def fused_ops(monkeypatch):
    monkeypatch.setattr(engines, "TORCH_ENGINE", "fused-ops")


def problem(device: str = "cpu", dtype=torch.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = {k: torch.tensor(rng.standard_normal(s), dtype=dtype, device=device)
         for k, s in SHAPES.items()}
    gs = [{k: torch.tensor(rng.standard_normal(s) * (1 + t), dtype=dtype, device=device)
           for k, s in SHAPES.items()} for t in range(STEPS)]
    return p, gs


#: (ours, torch.optim with fused=True, torch kwargs)
CASES = {
    "adam": (lambda: Adam(1e-2), torch.optim.Adam, {"lr": 1e-2}),
    "adam_wd": (lambda: Adam(1e-2, weight_decay=0.1), torch.optim.Adam,
                {"lr": 1e-2, "weight_decay": 0.1}),
    "amsgrad": (lambda: Adam(1e-2, amsgrad=True, beta2=0.9), torch.optim.Adam,
                {"lr": 1e-2, "amsgrad": True, "betas": (0.9, 0.9)}),
    "adamw": (lambda: AdamW(1e-2, weight_decay=0.05, epsilon=1e-6), torch.optim.AdamW,
              {"lr": 1e-2, "weight_decay": 0.05, "eps": 1e-6}),
    "adam_optax": (lambda: Adam(1e-2, convention="optax"), torch.optim.Adam, {"lr": 1e-2}),
    "sgd": (lambda: SGD(0.05, weight_decay=0.01), torch.optim.SGD,
            {"lr": 0.05, "weight_decay": 0.01}),
    "sgd_momentum": (lambda: SGD(0.05, momentum=0.9, dampening=0.1), torch.optim.SGD,
                     {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),
    "sgd_nesterov": (lambda: SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                     torch.optim.SGD,
                     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
}


def side_by_side(case: str, device: str, dtype=torch.float32, groups: bool = False,
                 lr_change: bool = True, policy: str = "propagate") -> tuple[dict, list, object]:
    """Our optimizer and torch.optim's fused step on the same gradients, lock-step; returns
    our params, torch's and our state."""
    make, cls, kw = CASES[case]
    p0, gs = problem(device, dtype)
    extra = {"nonfinite": policy}
    if groups:  # w1 and b1 at half the lr, b1 without weight decay
        extra["param_groups"] = [{"params": ["w1"], "lr_scale": 0.5},
                                 {"params": ["b1"], "lr_scale": 0.5, "weight_decay": 0.0}]
    opt = type(make())(**{**make().hyperparameters(), **extra})
    ref = [t.clone() for t in p0.values()]
    if groups:
        lr, wd = kw["lr"], kw.get("weight_decay", 0.0)
        tgroups = [{"params": [ref[0]], "lr": lr * 0.5}, {"params": [ref[1]], "lr": lr * 0.5,
                                                           "weight_decay": 0.0},
                   {"params": ref[2:]}]
        topt = cls(tgroups, fused=True, **{**kw, "weight_decay": wd})
    else:
        topt = cls(ref, fused=True, **kw)
    params, state = dict(p0), opt.init(p0)
    assert type(state.engine) is TorchFusedEngine
    for t, g in enumerate(gs):
        if lr_change and t == 3:  # a scheduler's change: every group in proportion
            opt.set_learning_rate(opt.learning_rate * 0.3)
            for tg in topt.param_groups:
                tg["lr"] *= 0.3
        params, state = opt.update(params, g, state)
        for r, k in zip(ref, g):
            r.grad = g[k].clone()
        topt.step()
    return params, ref, state


def _norm(device: str = "cpu") -> float:
    """The last step's gradient norm, float64."""
    return float(torch.linalg.vector_norm(torch.cat([g.reshape(-1).double() for g in
                                                     problem(device)[1][-1].values()])))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("policy", ["propagate", "unchecked"])
def test_equals_torch_fused_bit_for_bit(fused_ops, case, groups, policy):
    params, ref, state = side_by_side(case, "cpu", groups=groups, policy=policy)
    for k, r in zip(SHAPES, ref):
        torch.testing.assert_close(params[k], r, rtol=0, atol=0, msg=k)
    assert state.step == STEPS
    if policy == "propagate":  # measured and read back
        assert state.last_grad_norm == pytest.approx(_norm(), rel=1e-12)
    else:  # as torch: nothing measured
        assert state.last_grad_norm is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_propagate_reports_nonfinite_values(fused_ops, device):
    """lr=1e38 in float32 with finite gradients (~100): the kernel writes inf, the probe of the flat
    buffers finds it and the base class warns once, when the report is read (the probe is
    copied to the host without a wait: read when asked); "unchecked" writes the same,
    silently."""
    p0, gs = problem(device)
    out = {}
    for policy in ("propagate", "unchecked"):
        opt = SGD(1e38, nonfinite=policy)
        params, state = dict(p0), opt.init(p0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, state = opt.update(params, {k: v * 100 for k, v in gs[0].items()}, state)
            assert caught == [] and (state._report is not None) == (policy == "propagate")
            state.settle()
        out[policy] = params
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if policy == "unchecked":
            assert msgs == []
        else:
            assert len(msgs) == 1 and "step made params or state non-finite" in msgs[0]
            assert "at step 1" in msgs[0]
        assert state.num_nonfinite == (policy == "propagate")
        assert state.nonfinite_values == (policy == "propagate")
    for k in SHAPES:
        torch.testing.assert_close(out["propagate"][k], out["unchecked"][k], rtol=0, atol=0)
    assert not torch.isfinite(out["propagate"]["w1"]).all()


@pytest.mark.parametrize("case", ["adam", "adamw", "sgd_nesterov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_clip_norm_equals_torch_clip_grad_norm(fused_ops, case, dtype, device):
    make, cls, kw = CASES[case]
    p0, gs = problem(device, dtype)
    opt = type(make())(**{**make().hyperparameters(), "clip_norm": 2.0, "nonfinite": "unchecked"})
    ref = [t.clone() for t in p0.values()]
    topt = cls(ref, fused=True, **kw)
    params, state = dict(p0), opt.init(p0)
    for g in gs:
        before = {k: v.clone() for k, v in g.items()}
        params, state = opt.update(params, g, state)
        assert all(torch.equal(g[k], before[k]) for k in g)  # the caller's gradients
        for r, k in zip(ref, g):
            r.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(ref, 2.0)
        topt.step()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1).double() for g in gs[-1].values()]))
    assert state.last_grad_norm.device == norm.device  # measured for the clip, not read
    torch.testing.assert_close(state.last_grad_norm, norm, rtol=1e-12, atol=0)
    for k, r in zip(SHAPES, ref):
        torch.testing.assert_close(params[k], r, rtol=tol, atol=tol, msg=k)


def test_other_steps_take_the_tensor_op_path(fused_ops):
    """What the kernels do not compute (here RMSProp, value clipping, a missing gradient, the
    skip policy) runs on the same buffers as the tensor-op engine, and a fused step after
    it continues from there: equal to the numba engine's run."""
    p0, gs = problem("cpu", torch.float64)
    runs = {}
    for mode in ("fused-ops", "auto"):
        engines.TORCH_ENGINE = mode
        out = []
        for opt in (RMSProp(1e-2, momentum=0.5), Adam(1e-2, clip_value=0.5)):
            params, state = dict(p0), opt.init(p0)
            for g in gs:
                params, state = opt.update(params, g, state)
            out.append(params)
        adam = Adam(1e-2, nonfinite="skip")
        params, state = dict(p0), adam.init(p0)
        for t, g in enumerate(gs):
            g = dict(g)
            if t == 1:
                del g["b1"]  # b1 and its slots left alone
            if t == 2:
                g["w2"] = g["w2"].clone()
                g["w2"][0, 0] = float("nan")
                with pytest.warns(RuntimeWarning, match="skipped"):
                    params, state = adam.update(params, g, state)
                continue
            params, state = adam.update(params, g, state)
            if t == 3:
                adam.nonfinite = "propagate"  # back to the fused kernel on the same state
        assert state.num_skipped == 1 and state.step == STEPS - 1
        out.append(params)
        runs[mode] = out
    for ours, numba in zip(runs["fused-ops"], runs["auto"]):
        for k in SHAPES:
            torch.testing.assert_close(ours[k], numba[k], rtol=1e-12, atol=1e-14, msg=k)


def test_refused_gradient_changes_nothing(fused_ops):
    p0, gs = problem()
    keep = {k: v.clone() for k, v in p0.items()}
    opt = Adam(1e-2)
    params, state = opt.update(dict(p0), gs[0], opt.init(p0))
    for k in SHAPES:  # the caller's arrays were copied into the flat buffer, not written
        assert torch.equal(p0[k], keep[k])
    before = (state.params_flat.clone(), {s: v.clone() for s, v in state.slots.items()},
              state.step, state.last_grad_norm)
    bad = dict(gs[1], b1=torch.empty(5, device="meta"))
    with pytest.raises(ValueError, match=r"gradients\['b1'\] is on meta"):
        opt.update(params, bad, state)
    with pytest.raises(Exception, match="b1"):  # a wrong shape: the base class's check
        opt.update(params, dict(gs[1], b1=torch.zeros(4)), state)
    assert torch.equal(state.params_flat, before[0]) and state.step == before[2]
    assert all(torch.equal(v, before[1][s]) for s, v in state.slots.items())
    assert state.last_grad_norm is before[3]


def test_returned_params_and_user_params_mix(fused_ops):
    """The views an update returned are stepped in place; a parameter replaced by the caller
    (a new tensor, or a slice of a returned view passed under another name) is read before
    anything is written."""
    p0, gs = problem()
    opt = SGD(0.1)
    params, state = opt.update(dict(p0), gs[0], opt.init(p0))
    swapped = dict(params, s=torch.tensor(3.0), b1=params["w1"][0])  # w1's row: w1 moves too
    want = {k: v.clone() - 0.1 * gs[1][k] for k, v in swapped.items()}
    out, state = opt.update(swapped, gs[1], state)
    for k in SHAPES:
        torch.testing.assert_close(out[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a gradient that is a returned view: read before the step writes it
        g = {k: out[k] for k in SHAPES}
        want = {k: v.clone() * (1 - 0.1) for k, v in out.items()}
        out2, state = opt.update(out, g, state)
    for k in SHAPES:
        torch.testing.assert_close(out2[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


# -- CUDA (the device checks; CI has no GPU) ------------------------------------------------


@cuda
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("policy", ["propagate", "unchecked"])
def test_cuda_default_engine_equals_torch_fused(case, policy):
    params, ref, state = side_by_side(case, "cuda", groups=True, policy=policy)
    assert params["w1"].is_cuda
    if policy == "propagate":
        assert state.last_grad_norm == pytest.approx(_norm("cuda"), rel=1e-12)
    else:
        assert state.last_grad_norm is None  # nothing read back
    for k, r in zip(SHAPES, ref):
        torch.testing.assert_close(params[k], r, rtol=0, atol=0, msg=k)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cuda_other_dtypes_equal_torch_fused(dtype):
    params, ref, _ = side_by_side("adamw", "cuda", dtype=dtype)
    for k, r in zip(SHAPES, ref):
        torch.testing.assert_close(params[k], r, rtol=0, atol=0, msg=k)


def _mlp_cuda_vs_cpu():
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    spec = mlp_spec(12, 4, [16, 16])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 12)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    out = {}
    for dev in ("cpu", "cuda"):
        be = TorchBackend(dtype="float32", device=dev)
        c = ml.compile(spec.model, be, shapes=spec.shapes)
        params = {k: torch.tensor(np.asarray(v.cpu())).to(dev)
                  for k, v in c.get_parameters().items()}
        if dev == "cuda":
            params = {k: torch.tensor(v).to(dev) for k, v in out["cpu"]["p0"].items()}
        data = {"input": be.array(x), "target": be.array(y, be.int_dtype)}
        o, g = c.evaluate(params, data, output_gradients={"loss": 1.0})
        step, opt = make_train_step(c, Adam(1e-2), loss="loss"), Adam(1e-2)
        p1, s1 = dict(params), step.init(params)
        p2, s2 = dict(params), opt.init(params)
        for _ in range(3):
            p1, s1, o1 = step(p1, s1, data)
            _, g2 = c.evaluate(p2, data, output_gradients={"loss": 1.0})
            p2, s2 = opt.update(p2, g2, s2)
        out[dev] = {"p0": {k: v.cpu().numpy() for k, v in params.items()},
                    "loss": float(o["loss"]), "g": {k: v.cpu().numpy() for k, v in g.items()},
                    "step": {k: v.cpu().numpy() for k, v in p1.items()},
                    "separate": {k: v.cpu().numpy() for k, v in p2.items()}}
    return out


@cuda
def test_cuda_model_gradients_and_train_step():
    out = _mlp_cuda_vs_cpu()
    cpu, gpu = out["cpu"], out["cuda"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-5)
    for k in cpu["g"]:
        np.testing.assert_allclose(gpu["g"][k], cpu["g"][k], rtol=1e-4, atol=1e-5, err_msg=k)
        # the train step is the separate evaluate + update, bit for bit
        np.testing.assert_array_equal(gpu["step"][k], gpu["separate"][k], err_msg=k)
        np.testing.assert_allclose(gpu["step"][k], cpu["step"][k], rtol=1e-4, atol=1e-5,
                                   err_msg=k)


@cuda
@pytest.mark.parametrize("policy", ["propagate", "unchecked"])
def test_cuda_jax_update_equals_optax(policy):
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip("JAX sees no GPU (jax[cuda] not installed)")
    import jax.numpy as jnp
    import optax

    p0, gs = problem()
    jp = {k: jnp.asarray(v.numpy()) for k, v in p0.items()}
    opt, tx = Adam(1e-2, nonfinite=policy), optax.adam(1e-2)
    params, state = dict(jp), opt.init(jp)
    ref, ts = dict(jp), tx.init(jp)
    for g in gs:
        jg = {k: jnp.asarray(v.numpy()) for k, v in g.items()}
        params, state = opt.update(params, jg, state)
        u, ts = tx.update(jg, ts, ref)
        ref = optax.apply_updates(ref, u)
    assert type(state.engine).__name__ == "JaxEngine"
    assert (state.last_grad_norm is None) == (policy == "unchecked")
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(params[k]), np.asarray(ref[k]), rtol=1e-5,
                                   atol=1e-6, err_msg=k)
