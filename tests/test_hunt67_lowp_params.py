"""Mithril optimizers run directly on low-precision parameters (no MixedPrecisionTrainer),
side by side with optax and torch.optim."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch

from mithril.utils.optimizers import Adam, AdamW, NAdam

BF16 = ml_dtypes.bfloat16
AS = {"numpy": {"float32": np.float32, "bfloat16": BF16, "float16": np.float16},
      "jax": {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16},
      "torch": {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}}


def _arr(backend: str, a: np.ndarray, dtype: str) -> Any:
    if backend == "torch":
        return torch.tensor(a).to(AS["torch"][dtype])
    if backend == "jax":
        return jnp.asarray(a, AS["jax"][dtype])
    return a.astype(AS["numpy"][dtype])


def _f32(a: Any) -> np.ndarray:
    return a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a).astype(np.float32)


def _problem(steps: int = 10) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((5, 7)).astype(np.float32),
              "b": rng.standard_normal(7).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(steps)]
    return params, grads


def _optax(tx: Any, params: dict, grads: list[dict], dtype: Any) -> dict:
    q = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    s = tx.init(q)
    for g in grads:
        u, s = tx.update({k: jnp.asarray(v, dtype) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
    return {k: _f32(v) for k, v in q.items()}


MU_CASES = {  # ours with mu_dtype=M, optax's with mu_dtype=M
    "adam": (lambda M: Adam(0.05, convention="optax", mu_dtype=M),
             lambda M: optax.adam(0.05, mu_dtype=M)),
    "adamw": (lambda M: AdamW(0.05, weight_decay=0.1, convention="optax", mu_dtype=M),
              lambda M: optax.adamw(0.05, weight_decay=0.1, mu_dtype=M)),
    "amsgrad": (lambda M: Adam(0.05, amsgrad=True, convention="optax", mu_dtype=M),
                lambda M: optax.amsgrad(0.05, mu_dtype=M)),
    "nadam": (lambda M: NAdam(0.05, convention="optax", mu_dtype=M),
              lambda M: optax.nadam(0.05, mu_dtype=M)),
}


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("name", sorted(MU_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mu_dtype_equal_to_the_parameters_dtype(dtype, name, backend):
    """``mu_dtype`` naming the parameters' own dtype (optax users write
    ``mu_dtype=jnp.float32`` for float32 parameters): the step is optax's mu_dtype order,
    which numba cannot compile (float32: a numba TypingError at the first update) and which
    the jitted JAX engine ran with its scalars rounded to bfloat16 (β₂ = 0.999 is 1.0
    there: 1 − β₂ᵗ = 0, so bfloat16 parameters never moved). Now the array engine runs it:
    equal to optax's (bit for bit on NumPy and JAX, to rounding on torch)."""
    ours, theirs = MU_CASES[name]
    params, grads = _problem()
    want = _optax(theirs(AS["jax"][dtype]), params, grads, AS["jax"][dtype])
    opt = ours(dtype)
    p = {k: _arr(backend, v, dtype) for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, {k: _arr(backend, v, dtype) for k, v in g.items()}, state)
    got = {k: _f32(v) for k, v in p.items()}
    start = {k: _f32(_arr("numpy", v, dtype)) for k, v in params.items()}
    assert max(np.abs(got[k] - start[k]).max() for k in got) > 0.2  # (it moved)
    for k in got:
        assert str(p[k].dtype).removeprefix("torch.") == dtype
        assert str(state.slot("m")[k].dtype).removeprefix("torch.") == dtype
        if backend == "torch":  # (torch's own order of the same operations)
            np.testing.assert_allclose(got[k], want[k], atol=2e-2 if dtype == "bfloat16"
                                       else 1e-6)
        else:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("name", sorted(MU_CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_optax_transformation_mu_dtype_on_half_parameters(dtype, name):
    """``optax_transformation(Adam(..., mu_dtype=M))`` on parameters of that half dtype: its
    leaf math got β₁, β₂ and the step rounded to the parameters' dtype, and made optax's
    bias corrections 1 − βᵗ from them: in bfloat16 β₂ = 0.999 is 1, so 1 − β₂ᵗ = 0 and the
    parameters never moved; in float16 the update was inf/NaN. Now the scalars are float32
    there, as optax's bias corrections are: the first update within 1e-2 of optax's in
    float32 (from the same half-precision values), as optax's own bfloat16 one, and 10
    bfloat16 steps within a few bfloat16 ulps of optax's (the moment is computed in float32
    where optax rounds β₁·m first: see docs/optimizers.md)."""
    from mithril.interop import optax_transformation

    ours, theirs = MU_CASES[name]
    jdt = AS["jax"][dtype]
    params, grads = _problem()
    start = {k: _f32(_arr("numpy", v, dtype)) for k, v in params.items()}
    g1 = [{k: _f32(_arr("numpy", v, dtype)) for k, v in grads[0].items()}]
    ref = _optax(theirs(None), start, g1, jnp.float32)
    first = _optax(optax_transformation(ours(dtype)), params, grads[:1], jdt)
    for k in first:
        err = np.abs((first[k] - start[k]) - (ref[k] - start[k])).max()
        assert err < 1e-2, (k, err)  # (the update is 0.05 in size)
    if dtype == "bfloat16":
        want = _optax(theirs(jdt), params, grads, jdt)
        got = _optax(optax_transformation(ours(dtype)), params, grads, jdt)
        for k in got:
            assert np.abs(got[k] - start[k]).max() > 0.2  # (it moved)
            np.testing.assert_allclose(got[k], want[k], atol=2e-2)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(torch.int16).numpy()


def test_torch_bfloat16_state_dict_keeps_bfloat16():
    """A torch bfloat16 state's ``state_dict`` (documented: "a bfloat16 state's are
    bfloat16", as a JAX one's are) gave its slots as float32, NumPy and ``arrays="torch"``
    alike (the engine's ``to_numpy`` widens torch bfloat16). Now bfloat16 (ml_dtypes' in
    NumPy), the state's bits, and a load of it resumes bit for bit."""
    from mithril.utils.optimizers import SGD

    rng = np.random.default_rng(1)
    for opt in (Adam(1e-2), SGD(0.1, momentum=0.9)):
        p = {"w": torch.tensor(rng.standard_normal((3, 4)), dtype=torch.bfloat16)}
        g = [{"w": torch.tensor(rng.standard_normal((3, 4)), dtype=torch.bfloat16)}
             for _ in range(2)]
        state = opt.init(p)
        p, state = opt.update(p, g[0], state)
        as_numpy, as_torch = opt.state_dict(state), opt.state_dict(state, arrays="torch")
        saved = {k: v.clone() for k, v in p.items()}
        for s in state.slots:
            live = state.slot(s)["w"]
            assert live.dtype == torch.bfloat16
            assert as_numpy["slots"][s]["w"].dtype == np.dtype(BF16)
            assert as_torch["slots"][s]["w"].dtype == torch.bfloat16
            np.testing.assert_array_equal(as_numpy["slots"][s]["w"].view(np.int16), _bits(live))
            np.testing.assert_array_equal(_bits(as_torch["slots"][s]["w"]), _bits(live))
        want, _ = opt.update(p, g[1], state)
        for d in (as_numpy, as_torch):
            fresh = type(opt)()
            q = {k: v.clone() for k, v in saved.items()}
            got, _ = fresh.update(q, g[1], fresh.load_state_dict(d, q))
            np.testing.assert_array_equal(_bits(got["w"]), _bits(want["w"]))


def test_torch_optimizer_bfloat16_state_dict_as_torch_optim():
    """``torch_optimizer`` on a bfloat16 model: ``state_dict()`` held float32 slots where
    ``torch.optim.Adam``'s are bfloat16 (twice the checkpoint). Now bfloat16, equal to
    ``opt.state[p]``'s bits; torch.optim loads it and keeps bfloat16, and a reload resumes
    bit for bit."""
    import copy

    from mithril.interop import torch_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).to(torch.bfloat16)
    peer = copy.deepcopy(model)
    x, y = torch.randn(16, 4, dtype=torch.bfloat16), torch.randn(16, 1)

    def train(m: Any, opt: Any, n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x).float(), y).backward()
            opt.step()

    opt = torch_optimizer(Adam(1e-2), model.named_parameters())
    ref = torch.optim.Adam(peer.parameters(), lr=1e-2, foreach=False)
    train(model, opt, 3)
    train(peer, ref, 3)
    sd, theirs = opt.state_dict(), ref.state_dict()
    for i, p in enumerate(model.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            assert sd["state"][i][k].dtype == theirs["state"][i][k].dtype == torch.bfloat16
            np.testing.assert_array_equal(_bits(sd["state"][i][k]), _bits(opt.state[p][k]))
            np.testing.assert_allclose(sd["state"][i][k].float().numpy(),
                                       theirs["state"][i][k].float().numpy(),
                                       rtol=0.05, atol=1e-4)
    again = copy.deepcopy(model)
    opt2 = torch_optimizer(Adam(), again.named_parameters())
    opt2.load_state_dict(copy.deepcopy(sd))
    other = copy.deepcopy(model)
    peer_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    peer_opt.load_state_dict(copy.deepcopy(sd))
    assert peer_opt.state[next(other.parameters())]["exp_avg"].dtype == torch.bfloat16
    train(model, opt, 2)
    train(again, opt2, 2)
    for a, b in zip(model.parameters(), again.parameters()):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_muon_on_half_precision_parameters(dtype, backend):
    """Muon on bfloat16 / float16 matrices (torch.optim.Muon's usual setting): the second
    update took the fused in-place step, whose CPU passes read the memory by numba / NumPy
    ("Got unsupported ScalarType BFloat16", "NotImplementedError: float16", ml_dtypes'
    bfloat16 refused by torch.from_numpy). Now the per-tensor path: on torch equal to
    torch.optim.Muon bit for bit, on NumPy to a few half-precision ulps."""
    from mithril.utils.optimizers import Muon

    tdt = AS["torch"][dtype]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    grads = [rng.standard_normal((8, 6)).astype(np.float32) for _ in range(5)]
    ref = torch.nn.Parameter(torch.tensor(w).to(tdt))
    peer = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1)
    opt = Muon(learning_rate=0.02, weight_decay=0.1)
    p = {"w": _arr(backend, w, dtype)}
    state = opt.init(p)
    for g in grads:
        ref.grad = torch.tensor(g).to(tdt)
        peer.step()
        p, state = opt.update(p, {"w": _arr(backend, g, dtype)}, state)
    assert str(p["w"].dtype).removeprefix("torch.") == dtype
    want = _f32(ref.detach())
    if backend == "torch":  # (float16: the bfloat16 update added in float32, as torch's
        # mixed-dtype add_, not rounded to float16 first: it was 1 ulp off)
        np.testing.assert_array_equal(_bits(p["w"]), _bits(ref.detach()))
    else:
        np.testing.assert_allclose(_f32(p["w"]), want, atol=0.1 if dtype == "bfloat16"
                                   else 5e-3)
    assert np.abs(want - _f32(_arr("numpy", w, dtype))).max() > 0.05


@pytest.mark.parametrize("mu", [None, "bfloat16", "float32"])
def test_jax_train_step_bfloat16_model_with_mu_dtype(mu):
    """``make_train_step`` of a bfloat16 JAX model with ``Adam(convention="optax",
    mu_dtype="bfloat16")``: the loss stayed where it started (the parameters never moved:
    β₂ rounded to 1 in the bias correction). Now it trains as without ``mu_dtype``."""
    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.utils.training import make_train_step

    m = ml.Model()
    m |= ml.Linear(3)(input="input", output="out")
    m |= ml.SquaredError()(input="out", target="target", output="se")
    m |= ml.Mean()(input="se", output=ml.IOKey("loss"))
    b = JaxBackend(dtype="bfloat16")
    c = ml.compile(m, b, shapes={"input": [8, 4], "target": [8, 3]})
    rng = np.random.default_rng(0)
    data = {"input": b.array(rng.standard_normal((8, 4)).astype(np.float32)),
            "target": b.array(rng.standard_normal((8, 3)).astype(np.float32))}
    params = c.get_parameters()
    step = make_train_step(c, Adam(0.05, convention="optax", mu_dtype=mu), "loss")
    state = step.init(params)
    losses = []
    for _ in range(10):
        params, state, out = step(params, state, data)
        losses.append(float(np.asarray(out["loss"]).astype(np.float32)))
    assert all(str(v.dtype) == "bfloat16" for v in params.values())
    assert losses[-1] < 0.5 * losses[0], losses


def test_torch_bfloat16_state_dict_without_ml_dtypes(monkeypatch):
    """ml_dtypes comes with JAX, not with torch: a torch-only install saves a torch bfloat16
    state's NumPy dict as the exactly equal float32 values (``arrays="torch"``: bfloat16),
    and the load resumes bit for bit."""
    import sys

    p = {"w": torch.linspace(-1, 1, 6, dtype=torch.bfloat16)}
    opt = Adam(1e-2)
    p, state = opt.update(p, {"w": torch.full((6,), 0.3, dtype=torch.bfloat16)}, opt.init(p))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # (import ml_dtypes: ImportError)
    d = opt.state_dict(state)
    assert opt.state_dict(state, arrays="torch")["slots"]["m"]["w"].dtype == torch.bfloat16
    assert d["slots"]["m"]["w"].dtype == np.float32
    np.testing.assert_array_equal(d["slots"]["m"]["w"], state.slot("m")["w"].float().numpy())
    restored = Adam().load_state_dict(d, {"w": p["w"].clone()})
    np.testing.assert_array_equal(_bits(restored.slot("v")["w"]), _bits(state.slot("v")["w"]))
