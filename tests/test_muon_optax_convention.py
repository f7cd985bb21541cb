"""``Muon(convention="optax")`` against optax 0.2.8's ``optax.contrib.muon``, side by side in
each test: float64 over 12 steps on an MLP-like dict (two (in, out) weights, two biases and
a 3-D tensor, the fallback's at optax's defaults and a Muon matrix per batch slice with
dimension numbers), to 1e-10 on NumPy, torch, JAX (the jitted engine; op by op in the slow
suite), ``optax_transformation`` and ``torch_optimizer``; float32 to ~1e-6; checkpoints
resuming bit for bit; ``make_train_step``; the other conventions' options refused by name.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import optax.contrib as oc  # noqa: E402
from optimizer_parity import check_torch_optimizer_resume, optax_trajectory  # noqa: E402

from mithril.interop import optax_transformation, torch_optimizer  # noqa: E402
from mithril.utils.optimizers import AdamW, DimensionNumbers, Muon, NAdam  # noqa: E402
from mithril.utils.optimizers.engines import tensorwise_jit  # noqa: E402

TOL = 1e-10
STEPS = 12
SHAPES = {"w1": (6, 8), "b1": (8,), "w2": (8, 4), "b2": (4,), "k": (3, 4, 5)}
rng = np.random.default_rng(0)
P0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
GRADS = [{k: rng.standard_normal(s) * (1 + t % 3) for k, s in SHAPES.items()}
         for t in range(STEPS)]
MDN = oc.MuonDimensionNumbers
THEIR_DIMS = {"w1": MDN(), "b1": None, "w2": MDN(), "b2": None, "k": MDN(1, 2)}
OUR_DIMS = {"w1": DimensionNumbers(), "b1": None, "w2": DimensionNumbers(), "b2": None,
            "k": DimensionNumbers(1, 2)}

#: (ours, optax's) keyword arguments of each case
CASES = {
    "defaults": ({}, {}),
    "dims": ({"weight_dimension_numbers": OUR_DIMS},
             {"muon_weight_dimension_numbers": THEIR_DIMS}),
    "options": (dict(weight_dimension_numbers=OUR_DIMS, weight_decay=0.1, momentum=0.9,
                     nesterov=False, adaptive=True, adjust_lr_fn=0.2, epsilon=1e-6,
                     ns_coefficients="dion", preconditioning="aol", adam_beta1=0.8,
                     adam_beta2=0.99, adam_weight_decay=0.05, fallback_lr_ratio=0.4,
                     weight_decay_mask=["w1", "k"]),
                dict(muon_weight_dimension_numbers=THEIR_DIMS, weight_decay=0.1, beta=0.9,
                     nesterov=False, adaptive=True, consistent_rms=0.2, eps=1e-6,
                     ns_coeffs="dion", preconditioning="aol", adam_b1=0.8, adam_b2=0.99,
                     adam_weight_decay=0.05, adam_learning_rate=0.02,
                     weight_decay_mask={"w1": True, "b1": True, "w2": False, "b2": True,
                                        "k": True})),
    "spectral": (dict(weight_dimension_numbers=OUR_DIMS, preconditioning="spectral",
                      ns_steps=3, ns_coefficients=(3.0, -3.2, 1.2), adam_eps_root=1e-3,
                      adam_weight_decay=0.05, weight_decay=0.02, adjust_lr_fn="match_rms_adamw"),
                 dict(muon_weight_dimension_numbers=THEIR_DIMS, preconditioning="spectral",
                      ns_steps=3, ns_coeffs=(3.0, -3.2, 1.2), adam_eps_root=1e-3,
                      adam_weight_decay=0.05, weight_decay=0.02, consistent_rms=0.2)),
    "schatten": ({"preconditioning": "schatten", "ns_coefficients": ((4.0, -6.0, 2.5),
                                                                      (3.4445, -4.775, 2.0315))},
                 {"preconditioning": "schatten", "ns_coeffs": ((4.0, -6.0, 2.5),
                                                               (3.4445, -4.775, 2.0315))}),
}
LR = 0.05


@pytest.fixture(autouse=True, scope="module")
def _x64():
    jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)
    yield


def pair(case: str) -> tuple[Muon, optax.GradientTransformation]:
    mine, theirs = CASES[case]
    return Muon(LR, convention="optax", **mine), oc.muon(LR, **theirs)


def reference(tx, params=None, grads=GRADS) -> list[dict]:
    return optax_trajectory(tx, params or P0, grads)


@functools.cache
def expected(case: str) -> list[dict]:
    return reference(pair(case)[1])


def _host(params: dict) -> dict:
    return {k: v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v)
            for k, v in params.items()}


def ours(opt, path: str, monkeypatch, params=None, grads=GRADS) -> list[dict]:
    params = params or P0
    if path == "optax_transformation":
        return reference(optax_transformation(opt), params, grads)
    if path == "torch_optimizer":
        tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
        topt, out = torch_optimizer(opt, list(tp.items())), []
        for g in grads:
            for k, p in tp.items():
                p.grad = torch.tensor(g[k], dtype=p.dtype)
            topt.step()
            out.append(_host(tp))
        return out
    monkeypatch.setattr(tensorwise_jit, "ENABLED", path != "jax-eager")
    conv = {"numpy": np.asarray, "torch": torch.tensor}.get(path, jnp.asarray)
    p = {k: conv(v) for k, v in params.items()}
    state, out = opt.init(p), []
    for g in grads:
        p, state = opt.update(p, {k: conv(np.asarray(v, params[k].dtype))
                                  for k, v in g.items()}, state)
        out.append(_host(p))
    return out


def _same(got: list[dict], want: list[dict], tol: float = TOL) -> None:
    for k in ("w1", "b1", "k"):  # it moved, the matrices and the fallback's
        assert np.abs(want[-1][k] - P0[k]).max() > 1e-2, k
    for t, (a, b) in enumerate(zip(got, want)):
        for k in b:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=f"{k} step {t + 1}")


PATHS = ["numpy", "torch", "jax", "jax-eager", "optax_transformation", "torch_optimizer"]
#: the default suite's (each case's optax reference and each transformation compile, ~1 s):
#: every case on NumPy, each other path once; the rest in the slow suite
FAST = {(c, "numpy") for c in CASES} | {
    ("defaults", "torch"), ("defaults", "jax"), ("dims", "optax_transformation"),
    ("dims", "torch_optimizer"), ("options", "torch")}


@pytest.mark.parametrize("case, path", [
    pytest.param(c, p, marks=[] if (c, p) in FAST else [pytest.mark.slow])
    for c in CASES for p in PATHS])
def test_float64_parity_with_optax(case: str, path: str, monkeypatch) -> None:
    _same(ours(pair(case)[0], path, monkeypatch), expected(case))


@pytest.mark.parametrize("path", [
    "numpy", *(pytest.param(p, marks=pytest.mark.slow) for p in ("torch", "jax"))])
def test_float32_parity_with_optax(path: str, monkeypatch) -> None:
    """float32 (parameters, gradients and optax's arithmetic) to float32 rounding."""
    p32 = {k: v.astype(np.float32) for k, v in P0.items()}
    g32 = [{k: v.astype(np.float32) for k, v in g.items()} for g in GRADS]
    mine, theirs = pair("dims")
    got, want = ours(mine, path, monkeypatch, p32, g32), reference(theirs, p32, g32)
    _same(got, want, tol=2e-6)


def test_hyperparameters_and_defaults_are_optax() -> None:
    """optax's defaults: no weight decay, eps 1e-8 (Muon's and the fallback's), the
    iteration in the parameters' dtype, optax's adamw with Nesterov (our optax NAdamW),
    (in, out) weights; the hyperparameters rebuild the same Muon."""
    opt = Muon(convention="optax")
    h = opt.hyperparameters()
    assert (opt.weight_decay, opt.epsilon, opt.ns_dtype, opt.preconditioning) == (
        0.0, 1e-8, None, "frobenius")
    fb = opt.fallback
    assert isinstance(fb, NAdam) and (fb.convention, fb.epsilon, fb.weight_decay,
                                      fb.decoupled_weight_decay) == ("optax", 1e-8, 0.0, True)
    assert isinstance(Muon(convention="optax", nesterov=False).fallback, AdamW)
    assert opt.matrix_axes("w", (6, 8)).reduction == (0,)
    again = Muon(**h)
    assert again.hyperparameters() == h
    dion = Muon(convention="optax", ns_coefficients="dion")
    assert len(dion.ns_coefficients) == 5 and Muon(
        **dion.hyperparameters()).ns_coefficients == dion.ns_coefficients


@pytest.mark.parametrize("case", ["options", "defaults"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_checkpoint_resumes_bit_for_bit(case: str, backend: str, tmp_path) -> None:
    """7 steps, the state dict through ``torch.save`` / ``torch.load(weights_only=True)``
    and a safetensors checkpoint into a ``Muon(convention="optax")`` made anew, 5 more
    steps: the uninterrupted run's values to the bit (and optax's to 1e-10)."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    conv = np.array if backend == "numpy" else torch.tensor
    gs = [{k: conv(v) for k, v in g.items()} for g in GRADS]

    def run(opt, p, state, grads):
        for g in grads:
            p, state = opt.update(p, g, state)
        return p, state

    opt = pair(case)[0]
    p0 = {k: conv(v) for k, v in P0.items()}
    want = _host(run(opt, p0, opt.init(p0), gs)[0])
    opt = pair(case)[0]
    p, state = run(opt, p0, opt.init(p0), gs[:7])
    buf = io.BytesIO()
    torch.save(opt.state_dict(state, arrays="torch"), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    save_checkpoint(tmp_path / "c.safetensors", p, opt, state)
    for how in ("state dict", "checkpoint"):
        other = Muon(convention="optax")
        if how == "state dict":
            q, s = dict(p), other.load_state_dict(sd, p)
        else:
            got = load_checkpoint(tmp_path / "c.safetensors", p, other)
            q, s = got["params"], got["state"]
        assert other.hyperparameters() == opt.hyperparameters()
        q = {k: conv(np.array(_host({k: v})[k])) for k, v in q.items()}
        for k, v in _host(run(other, q, s, gs[7:])[0]).items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{how} {k}")
            np.testing.assert_allclose(v, expected(case)[-1][k], rtol=TOL, atol=TOL)


def test_torch_optimizer_resumes_bit_for_bit() -> None:
    check_torch_optimizer_resume(lambda: pair("options")[0], P0, GRADS, at=7)


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=[pytest.mark.slow] if b != "torch" else []) for b in
    ("numpy", "torch", "jax")])
def test_make_train_step_against_optax(backend: str) -> None:
    """``make_train_step`` with ``Muon(convention="optax")`` on a float32 MLP, three steps,
    against optax's muon fed the gradients of its own parameters (float32 rounding)."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    be_cls = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend]
    spec = mlp_spec(8, 4, [16, 12])
    r = np.random.default_rng(3)
    data = [{"input": r.standard_normal((32, 8)).astype(np.float32),
             "target": r.integers(0, 4, 32)} for _ in range(3)]
    be = be_cls(dtype="float32", seed=0)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    params = compiled.get_parameters()
    ref = {k: np.array(be.to_numpy(v)) for k, v in params.items()}
    step = make_train_step(compiled, Muon(0.02, convention="optax"), loss="loss")
    state = step.init(params)
    tx = oc.muon(0.02)
    theirs = {k: jnp.asarray(v) for k, v in ref.items()}

    @jax.jit
    def optax_step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    ostate = tx.init(theirs)
    for d in data:
        d = {"input": be.array(d["input"]), "target": be.array(d["target"], be.int_dtype)}
        _, g = compiled.evaluate({k: be.array(np.array(v)) for k, v in theirs.items()}, d,
                                 output_gradients={"loss": 1.0})
        theirs, ostate = optax_step(
            theirs, {k: jnp.asarray(be.to_numpy(v)) for k, v in g.items()}, ostate)
        params, state, _ = step(params, state, d)
    for k, v in params.items():
        got = np.array(be.to_numpy(v))
        assert np.abs(got - ref[k]).max() > 1e-3, k
        np.testing.assert_allclose(got, np.array(theirs[k]), rtol=1e-5, atol=2e-6, err_msg=k)


def newton_schulz_before(xp, G, coefficients, steps, eps, preconditioning):
    """``muon_optax.newton_schulz_optax`` as it was before its iteration wrote into
    buffers in place (new arrays at every operation): the bits it must still give."""
    from mithril.utils.optimizers.muon_optax import _first_step, _spectral

    rows = coefficients if isinstance(coefficients[0], tuple) else (coefficients,) * steps
    tall = G.shape[0] > G.shape[1]
    X = xp.T(G) if tall else G
    if preconditioning == "frobenius":
        X = X / (xp.norm0(X) + eps)
    elif preconditioning == "spectral":
        X = X / (_spectral(xp, X) + eps)
    for i, (a, b, c) in enumerate(rows):
        A = X @ xp.T(X)
        if i == 0 and preconditioning in ("aol", "schatten"):
            X, A = _first_step(xp, X, A, preconditioning)
        X = a * X + (b * A + c * (A @ A)) @ X
    return xp.T(X) if tall else X


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("preconditioning", ["frobenius", "spectral", "aol", "schatten"])
def test_newton_schulz_in_place_is_bit_for_bit(engine: str, preconditioning: str) -> None:
    """The in-place iteration gives the bits of the one that made new arrays, on wide,
    tall, square, 1-wide and (NumPy) Fortran-ordered matrices, float32 and float64,
    optax's coefficients and the "dion" rows; the input is left as it was."""
    from mithril.utils.optimizers.muon_optax import PRESETS, newton_schulz_optax
    from mithril.utils.optimizers.tensorwise import NumpyOps, TorchOps

    xp = NumpyOps() if engine == "numpy" else TorchOps()
    r = np.random.default_rng(7)
    for shape in [(6, 8), (8, 6), (40, 40), (33, 17), (5, 1), (1, 5)]:
        for dtype, fortran in ((np.float32, False), (np.float64, False), (np.float32, True)):
            G = r.standard_normal(shape).astype(dtype)
            if fortran:
                G = np.asfortranarray(G)
            g = G.copy(order="K") if engine == "numpy" else torch.tensor(G)
            for coef in ((3.4445, -4.775, 2.0315), PRESETS["dion"]):
                args = (coef, 5, 1e-8, preconditioning)
                want = np.asarray(newton_schulz_before(xp, g, *args))
                got = np.asarray(newton_schulz_optax(xp, g, *args))
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes(), (shape, dtype, fortran, coef)
                np.testing.assert_array_equal(np.asarray(g), G)


@pytest.mark.parametrize("kwargs, match", [
    ({"preconditioning": "aol"}, "preconditioning=.*convention='optax'"),
    ({"adaptive": True, "convention": "mlx"}, "adaptive=.*convention='optax'"),
    ({"adam_beta1": 0.8}, "adam_beta1=.*convention='optax'"),
    ({"convention": "optax", "ns_dtype": "bfloat16"}, "ns_dtype='bfloat16'"),
    ({"convention": "optax", "adjust_lr_fn": "none"}, "adjust_lr_fn='none'"),
    ({"convention": "optax", "preconditioning": "polar"}, "preconditioning must be one of"),
    ({"convention": "optax", "ns_coefficients": "dion", "ns_steps": 3}, "5 rows for ns_steps=3"),
    ({"convention": "optax", "fallback": AdamW(), "adam_beta2": 0.99}, "adam_beta1 / adam_beta2"),
    ({"convention": "optax", "nesterov": False, "adam_eps_root": 1e-3}, "adam_eps_root"),
    ({"convention": "optax", "adam_beta1": 1.5}, "adam_beta1 must be in"),
    ({"convention": "optax", "param_groups": [{"params": ["w1"], "adaptive": True}]},
     r"\['adaptive'\] configure Muon as a whole"),
])
def test_other_conventions_options_are_refused_by_name(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Muon(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"convention": "optax", "adam_b1": 0.8}, "adam_b1=: ours is adam_beta1"),
    ({"convention": "optax", "consistent_rms": 0.2}, "consistent_rms=: ours is adjust_lr_fn"),
    ({"convention": "optax", "ns_coeffs": "dion"}, "ns_coeffs=: ours is ns_coefficients"),
    ({"convention": "optax", "mu_dtype": "float32"}, "mu_dtype=: not offered"),
    ({"ns_coefficients": "dion"}, "ns_coefficients must be three numbers"),
])
def test_optax_names_get_ours(kwargs, match) -> None:
    with pytest.raises(TypeError, match=match):
        Muon(**kwargs)
