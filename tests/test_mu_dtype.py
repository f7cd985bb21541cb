"""optax's ``mu_dtype`` on Mithril's own optimizers (``Adam(..., mu_dtype=jnp.bfloat16)``):
the first moment kept in a dtype of its own between ``opt.update`` calls, on NumPy, JAX and
torch, side by side with optax (JAX) and with a torch loop written by hand."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from conftest import jax_float64

from mithril.utils.optimizers import ADOPT, Adam, AdamW, Lion, NAdam
from mithril.utils.optimizers.engines.array_engine import ArrayEngine
from mithril.utils.optimizers.engines.numba_engine import NumbaEngine

STEPS = 20
BF16 = ml_dtypes.bfloat16


def problem(seed: int = 0, dt: Any = np.float32) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((5, 7)).astype(dt), "b": rng.standard_normal(7).astype(dt)}
    grads = [{k: rng.standard_normal(v.shape).astype(dt) for k, v in params.items()}
             for _ in range(STEPS)]
    return params, grads


def ours(opt: Any, params: dict, grads: list[dict], as_: Any = np.array) -> tuple[dict, Any]:
    p = {k: as_(v) for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, {k: as_(v) for k, v in g.items()}, state)
    return {k: np.asarray(v) for k, v in p.items()}, state


def theirs(tx: Any, params: dict, grads: list[dict], jit: bool = False) -> tuple[dict, Any]:
    q = {k: jnp.asarray(v) for k, v in params.items()}
    s = tx.init(q)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        u, s = update({k: jnp.asarray(v) for k, v in g.items()}, s, q)
        q = optax.apply_updates(q, u)
    return {k: np.asarray(v) for k, v in q.items()}, s


def bits(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


CASES = {  # name: (ours, optax's), both with mu_dtype=M
    "adam": (lambda M: Adam(0.05, convention="optax", mu_dtype=M),
             lambda M: optax.adam(0.05, mu_dtype=M)),
    "adamw": (lambda M: AdamW(0.05, weight_decay=0.1, convention="optax", mu_dtype=M),
              lambda M: optax.adamw(0.05, weight_decay=0.1, mu_dtype=M)),
    "amsgrad": (lambda M: Adam(0.05, amsgrad=True, convention="optax", mu_dtype=M),
                lambda M: optax.amsgrad(0.05, mu_dtype=M)),
    "nadam": (lambda M: NAdam(0.05, convention="optax", mu_dtype=M),
              lambda M: optax.nadam(0.05, mu_dtype=M)),
    "nadamw": (lambda M: NAdam(0.05, weight_decay=0.1, decoupled_weight_decay=True,
                               convention="optax", mu_dtype=M),
               lambda M: optax.nadamw(0.05, weight_decay=0.1, mu_dtype=M)),
    "lion": (lambda M: Lion(0.01, weight_decay=0.1, mu_dtype=M),
             lambda M: optax.lion(0.01, weight_decay=0.1, mu_dtype=M)),
    "adopt": (lambda M: ADOPT(0.05, mu_dtype=M), lambda M: optax.contrib.adopt(0.05, mu_dtype=M)),
}


@pytest.mark.parametrize("mu", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_to_optax_to_the_bit(name, mu):
    """float32 params, m in bfloat16 / float16: 20 steps on NumPy and on JAX equal optax's
    (run op by op) bit for bit, params and the stored m. ADOPT: within 1e-6, as without
    mu_dtype (its float32 order differs from optax's there too: the check below)."""
    make, ref = CASES[name]
    params, grads = problem()
    want, peer = theirs(ref(jnp.dtype(mu)), params, grads)
    peer_mu = [x for x in jax.tree.leaves(peer) if x.dtype == jnp.dtype(mu)]
    for as_ in (np.array, jnp.asarray):
        got, state = ours(make(mu), params, grads, as_)
        assert isinstance(state.engine, ArrayEngine)
        m = state.slot("m")
        assert {np.asarray(x).dtype.name for x in m.values()} == {mu}
        assert {np.asarray(x).dtype.name for x in state.slot("v").values()} - {"float32"} == set() \
            if "v" in state.slots else True
        if name == "adopt":
            assert max(np.abs(got[k] - want[k]).max() for k in got) < 1e-6
            plain, _ = ours(ADOPT(0.05), params, grads)
            unmu, _ = theirs(optax.contrib.adopt(0.05), params, grads)
            assert 0 < max(np.abs(plain[k] - unmu[k]).max() for k in got) < 1e-6
            continue
        for k in got:
            np.testing.assert_array_equal(bits(got[k]), bits(want[k]))
        assert sorted(bits(x).tobytes() for x in m.values()) == sorted(
            bits(x).tobytes() for x in peer_mu)
    # (the rounding matters: the same steps with m in float32 end elsewhere)
    wide, _ = ours(make(None), params, grads)
    assert name == "lion" or max(np.abs(wide[k] - want[k]).max() for k in got) > 1e-5


@pytest.mark.parametrize("name", ["adam", "nadam", "lion"])
def test_jitted_optax_differs_by_one_ulp_of_the_moment_per_step(name):
    """Under ``jax.jit`` XLA's CPU keeps ``β₁·m`` in float32 (excess precision, fused into
    a multiply-add) where optax's op-by-op run rounds it to bfloat16 (JAX's weak-typed
    scalar): from one same state, a step's stored m then differs by at most 1 bfloat16 ulp
    of the larger of the old and new m (the product's half ulp, the store's rounding)."""
    make, ref = CASES[name]
    params, grads = problem(1)
    _, state = ours(make("bfloat16"), params, grads[:10])
    tx = ref(jnp.bfloat16)
    _, s = theirs(tx, params, grads[:10])  # (the same state, bit for bit: test above)
    g = {k: jnp.asarray(v) for k, v in grads[10].items()}
    q = {k: jnp.asarray(v) for k, v in params.items()}
    _, s1 = jax.jit(tx.update)(g, s, q)
    _, s0 = tx.update(g, s, q)
    leaves = [[np.asarray(x, np.float32) for x in jax.tree.leaves(t) if x.dtype == jnp.bfloat16]
              for t in (s, s1, s0)]
    for old, a, b in zip(*leaves):
        big = np.maximum(np.abs(old), np.abs(b))
        ulp = 2.0 ** (np.floor(np.log2(np.where(big > 0, big, 1.0))) - 7)  # bfloat16's
        assert (np.abs(a - b) <= ulp).all()
    assert any((a != b).any() for _, a, b in zip(*leaves))  # (they do differ)


def torch_adam_by_hand(params: dict, grads: list[dict], lr: float, b1: float, b2: float,
                       eps: float, wd: float = 0.0, mu: Any = torch.bfloat16) -> tuple:
    """torch.optim.Adam(W)'s formula with ``m`` stored in ``mu``: each step from m.float(),
    its new value rounded to ``mu`` (what Adam(mu_dtype=...) computes, torch's order)."""
    p = {k: torch.tensor(v) for k, v in params.items()}
    m = {k: torch.zeros(v.shape, dtype=mu) for k, v in params.items()}
    v_ = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in params.items()}
    for t, gs in enumerate(grads, 1):
        for k in p:
            g = torch.tensor(gs[k])
            pk = p[k] * (1.0 - lr * wd)             # AdamW: p·(1 − lr·wd) first
            mk = m[k].float()
            mk = mk + (1 - b1) * (g - mk)           # m.lerp_(g, 1 − β₁)
            v_[k] = v_[k] * b2 + (1 - b2) * g * g
            step = lr / (1 - b1**t)
            p[k] = pk - step * (mk / (torch.sqrt(v_[k]) / (1 - b2**t) ** 0.5 + eps))
            m[k] = mk.to(mu)
    return p, m


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_torch_equal_to_a_hand_written_loop(wd):
    params, grads = problem(2)
    cls = AdamW if wd else Adam
    opt = cls(0.05, weight_decay=wd, mu_dtype=torch.bfloat16)
    p = {k: torch.tensor(v) for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, {k: torch.tensor(v) for k, v in g.items()}, state)
    want, m = torch_adam_by_hand(params, grads, 0.05, 0.9, 0.999, 1e-8, wd)
    for k in p:
        assert p[k].dtype == torch.float32 and state.slot("m")[k].dtype == torch.bfloat16
        assert torch.equal(p[k], want[k]) and torch.equal(state.slot("m")[k], m[k])
    # (the rounding matters: a float32 m, the default fused path, ends elsewhere)
    plain, _ = ours(cls(0.05, weight_decay=wd), params, grads, torch.tensor)
    assert max(np.abs(plain[k] - want[k].numpy()).max() for k in p) > 1e-5


def test_the_moment_takes_two_bytes_per_parameter():
    params, grads = problem()
    n = sum(v.size for v in params.values())
    for as_, size in ((np.array, lambda x: x.nbytes), (torch.tensor,
                                                         lambda x: x.numel() * x.element_size())):
        p = {k: as_(v) for k, v in params.items()}
        half, full = Adam(mu_dtype="bfloat16").init(p), Adam().init(p)
        assert size(half.slots["m"]) == 2 * n and size(half.slots["v"]) == 4 * n
        assert size(full.slots["m"]) == 4 * n
    state = Adam(mu_dtype=jnp.bfloat16).init({k: jnp.asarray(v) for k, v in params.items()})
    assert state.slots["m"].dtype == BF16 and state.slots["m"].nbytes == 2 * n


def test_default_and_same_dtype_keep_the_fused_engine():
    params, grads = problem()
    for mu in (None, "float32", np.float32, jnp.float32, torch.float32):
        opt = Adam(0.05, mu_dtype=mu)
        state = opt.init({k: v.copy() for k, v in params.items()})
        assert isinstance(state.engine, NumbaEngine)
        assert opt.mu_dtype == (None if mu is None else "float32")
    a, _ = ours(Adam(0.05, mu_dtype="float32"), params, grads)
    b, _ = ours(Adam(0.05), params, grads)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_float64_params_with_a_float32_moment():
    params, grads = problem(3, np.float64)
    got, state = ours(Adam(0.05, convention="optax", mu_dtype="float32"), params, grads)
    assert state.slots["m"].dtype == np.float32 and state.slots["v"].dtype == np.float64
    with jax_float64():
        want, _ = theirs(optax.adam(0.05, mu_dtype=jnp.float32), params, grads)
    assert max(np.abs(got[k] - want[k]).max() for k in got) < 1e-12


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_state_dict_keeps_the_dtype_and_round_trips(backend, arrays):
    as_ = {"numpy": np.array, "torch": torch.tensor, "jax": jnp.asarray}[backend]
    params, grads = problem(4)
    opt = Adam(0.05, mu_dtype="bfloat16")
    p = {k: as_(v) for k, v in params.items()}
    state = opt.init(p)
    for g in grads[:5]:
        p, state = opt.update(p, {k: as_(v) for k, v in g.items()}, state)
    d = opt.state_dict(state, arrays=arrays)
    assert d["hyperparameters"]["mu_dtype"] == "bfloat16"
    for x in d["slots"]["m"].values():
        assert (x.dtype == torch.bfloat16) if arrays == "torch" else (x.dtype == BF16)
    other = Adam(0.05)
    copy = (lambda x: x.clone()) if backend == "torch" else (lambda x: as_(np.array(x)))  # noqa: E731
    resumed = other.load_state_dict(d, {k: copy(v) for k, v in p.items()})
    assert other.mu_dtype == "bfloat16" and isinstance(resumed.engine, ArrayEngine)
    for k, x in resumed.slot("m").items():
        np.testing.assert_array_equal(bits(ours_m(x)), bits(ours_m(state.slot("m")[k])))
    q = {k: copy(v) for k, v in p.items()}
    for g in grads[5:]:
        p, state = opt.update(p, {k: as_(v) for k, v in g.items()}, state)
        q, resumed = other.update(q, {k: as_(v) for k, v in g.items()}, resumed)
    assert all(np.array_equal(np.asarray(p[k]), np.asarray(q[k])) for k in p)


def ours_m(x: Any) -> np.ndarray:
    """A bfloat16 slot view (torch, NumPy) as an ml_dtypes array (its bits)."""
    if isinstance(x, torch.Tensor):
        return x.view(torch.int16).numpy().view(BF16)
    return np.asarray(x)


def test_a_wrong_dtype_in_a_state_dict_is_refused_naming_the_slot():
    params, grads = problem(5)
    opt = Adam(0.05, mu_dtype="bfloat16")
    p = {k: v.copy() for k, v in params.items()}
    state = opt.init(p)
    p, state = opt.update(p, grads[0], state)
    d = opt.state_dict(state)
    # a float32 state's m under a dict that says bfloat16: refused, nothing changed
    d["slots"]["m"]["b"] = d["slots"]["m"]["b"].astype(np.float32) * np.float32(1 + 2**-12)
    fresh = Adam(0.05)
    with pytest.raises(TypeError, match=r"state dict slot 'm' of 'b' has dtype float32 and "
                                        r"values bfloat16 cannot hold .* the state keeps slot "
                                        r"'m' in bfloat16"):
        fresh.load_state_dict(d, p)
    assert fresh.mu_dtype is None  # (nothing changed: the hyperparameters neither)
    plain = Adam(0.05)
    p1, s1 = plain.update(dict(p), grads[1], plain.init(p))
    d2 = plain.state_dict(s1)
    d2["hyperparameters"]["mu_dtype"] = "float16"
    with pytest.raises(TypeError, match=r"slot 'm' of '(w|b)' has dtype float32 and values "
                                        r"float16 cannot hold"):
        plain.load_state_dict(d2, p)
    assert plain.mu_dtype is None
    # a bfloat16 m widened on the way (torch_optimizer's state_dict saves float32): exact
    d["slots"]["m"]["b"] = np.array(state.slot("m")["b"]).astype(np.float32)
    back = fresh.load_state_dict(d, p)
    assert back.slots["m"].dtype == BF16 and np.array_equal(back.slots["m"], state.slots["m"])


def test_torch_optimizer_shows_and_resumes_the_bfloat16_moment():
    from mithril.interop import torch_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch_optimizer(Adam(1e-2, mu_dtype=torch.bfloat16), model.named_parameters())

    def step(o, m):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(3):
        step(opt, model)
    assert {str(s["exp_avg"].dtype) for s in opt.state.values()} == {"torch.bfloat16"}
    other = torch_optimizer(Adam(1e-2), twin.named_parameters())
    other.load_state_dict(opt.state_dict())
    twin.load_state_dict(model.state_dict())
    assert other.mithril_optimizer.mu_dtype == "bfloat16"
    for _ in range(3):
        step(opt, model), step(other, twin)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_bad_mu_dtype_is_refused_by_name():
    with pytest.raises(TypeError, match="mu_dtype=int32: not a floating-point dtype"):
        Adam(mu_dtype=np.int32)
    with pytest.raises(TypeError, match="mu_dtype='bfloat17' is not a dtype"):
        Lion(mu_dtype="bfloat17")
    with pytest.raises(TypeError, match="unexpected keyword argument 'mu_dtype'"):
        from mithril.utils.optimizers import SGD

        SGD(0.1, momentum=0.9, mu_dtype="bfloat16")
    with pytest.raises(ValueError, match="mu_dtype"):  # one dtype per slot buffer
        Adam(mu_dtype="bfloat16", param_groups=[{"params": ["w"], "mu_dtype": "float32"}])
    opt = Adam(mu_dtype=torch.bfloat16)
    assert opt.mu_dtype == "bfloat16" and "mu_dtype='bfloat16'" in repr(opt)
    state = opt.init({"w": np.ones(3, np.float32)})
    with pytest.raises(AttributeError, match="Adam's mu_dtype is fixed at construction"):
        opt.mu_dtype = "float16"  # (the state's m buffer is bfloat16)
    opt.mu_dtype = jnp.bfloat16  # (the same dtype: nothing changes)
    assert opt.mu_dtype == "bfloat16" and state.slots["m"].dtype == BF16
    with pytest.raises(ValueError, match="mu_dtype"):
        Lion(mu_dtype="float16", param_groups=[{"params": ["w"], "mu_dtype": None}])
    assert NAdam(mu_dtype=np.float16).mu_dtype == "float16"
    assert ADOPT(mu_dtype=jnp.bfloat16).mu_dtype == "bfloat16"


def test_optax_transformation_takes_the_optimizers_own_mu_dtype():
    """``optax_transformation(Adam(mu_dtype="bfloat16"))`` keeps m in bfloat16 as
    ``optax_transformation(Adam(), mu_dtype=jnp.bfloat16)`` does (was float32, silently);
    the two given and different are refused."""
    from mithril.interop import optax_transformation

    p = {"w": jnp.ones((3, 2))}
    tx = optax_transformation(Adam(0.1, convention="optax", mu_dtype="bfloat16"))
    assert tx.init(p).slots["m"]["w"].dtype == jnp.bfloat16
    tx = optax_transformation(Adam(0.1, mu_dtype="bfloat16"), mu_dtype=jnp.bfloat16)
    assert tx.init(p).slots["m"]["w"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="mu_dtype=float16 but Adam keeps m in bfloat16"):
        optax_transformation(Adam(0.1, mu_dtype="bfloat16"), mu_dtype=jnp.float16)
