"""What every optimizer promises besides its arithmetic, on every backend and engine: inputs
left as they are and absent parameters passed through, returned arrays usable (torch leaf
tensors), no recompilation on a learning-rate change, :func:`global_norm` /
:func:`clip_gradients` against torch's, the non-finite policies (``"skip"``, ``"raise"``,
``"propagate"``, ``"unchecked"``), user-defined optimizers on the fused path, and the
hyperparameter accessors.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from optimizer_parity import (
    ALL,
    SHAPES,
    host,
    init,
    native,
    natives,
    problem,
    rel_err,
    small_problem,
)

from mithril.utils.optimizers import (
    SGD,
    AdaGrad,
    Adam,
    AdamW,
    Optimizer,
    OptimizerState,
    RMSProp,
    clip_gradients,
    global_norm,
)
from mithril.utils.optimizers.elementwise import sqrt

# ---------------------------------------------------------------------------------------------
# ownership, pass-through, returned arrays, recompilation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_inputs_not_modified_and_absent_params_pass_through(backend):
    p_np, g_np = small_problem()
    params = natives(backend, p_np)
    opt = Adam(0.1)
    state = init(opt, backend, params)
    new, state = opt.update(params, {"a": native(backend, g_np["a"])}, state)
    # the arrays we passed (not returned by an update) are never modified
    for k in p_np:
        np.testing.assert_array_equal(host(params[k]), p_np[k])
    np.testing.assert_array_equal(host(new["b"]), p_np["b"])  # no gradient: unchanged
    assert not np.array_equal(host(new["a"]), p_np["a"])
    np.testing.assert_array_equal(host(state.slot("m")["b"]), 0)
    np.testing.assert_array_equal(host(state.slot("v")["b"]), 0)
    assert np.all(host(state.slot("v")["a"]) > 0)
    assert state.step == 1 and list(new) == ["a", "b"]
    assert all(type(v) is type(params["a"]) for v in new.values())


@pytest.mark.parametrize("backend", ALL)
def test_a_state_of_other_params_blames_the_state(backend):
    """``update(params, grads, state)`` where ``state`` was made for other params (the
    gradients fit the params): the error names the params against the state, not the
    gradients; nothing changes."""
    p_np, g_np = small_problem()
    params, grads = natives(backend, p_np), natives(backend, g_np)
    opt = Adam(0.1)
    state = init(opt, backend, params)
    wider = init(opt, backend, natives(backend, {**p_np, "a": np.zeros(p_np["a"].shape[:-1] + (
        p_np["a"].shape[-1] + 1,), np.float32)}))
    with pytest.raises(ValueError, match=r"params\['a'\] has shape .* but the state was built"):
        opt.update(params, grads, wider)
    fewer = init(opt, backend, {"b": params["b"]})
    with pytest.raises(KeyError, match=r"do not match the optimizer state: missing \[\], "
                                       r"unknown \['a'\]"):
        opt.update(params, grads, fewer)
    assert wider.step == fewer.step == 0
    np.testing.assert_array_equal(host(wider.slot("m")["a"]), 0)
    new, state = opt.update(params, grads, state)  # the right state still works
    assert state.step == 1


def test_jax_jit_engine_names_consumed_params():
    """The jitted JAX engine donates the params it returned to the next update: passing
    older ones again is a TypeError naming the parameter (as for any deleted array) (it was XLA's 'Invalid buffer
    passed to Execute()'), and the state still steps with the current params."""
    p_np, g_np = small_problem()
    params, grads = natives("jax-jit", p_np), natives("jax-jit", g_np)
    opt = Adam(0.1)
    state = init(opt, "jax-jit", params)
    p1, state = opt.update(params, grads, state)
    p2, state = opt.update(p1, grads, state)
    with pytest.raises(TypeError, match=r"params\['a'\] is a deleted JAX array: was it "
                                        r"consumed by an earlier update"):
        opt.update(p1, grads, state)
    assert state.step == 2
    p3, state = opt.update(p2, grads, state)
    assert state.step == 3 and np.all(np.isfinite(host(p3["a"])))


def test_torch_returned_params_are_usable_leaf_tensors():
    import mithril as ml
    from mithril.backends import TorchBackend

    model = ml.MLP(["tanh", None], [8, 3])
    model.set_shapes(input=[None, 5])
    cm = ml.compile(model, TorchBackend(dtype="float64"))
    params = cm.get_parameters()
    x = {"input": torch.randn(4, 5, dtype=torch.float64)}
    opt = SGD(0.1, momentum=0.9)
    state = opt.init(params)
    for _ in range(3):
        out = cm.evaluate(params, x)
        _, grads = cm.evaluate(params, x, output_gradients={"output": out["output"]})
        params, state = opt.update(params, grads, state)
    for p in params.values():
        assert isinstance(p, torch.Tensor) and p.is_leaf and not p.requires_grad
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    # torch can use them directly: autograd on a clone, and a torch.optim step in place
    w = params["linear_0.weight"].clone().requires_grad_()
    (w**2).sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 2 * params["linear_0.weight"].numpy())
    tp = params["linear_1.bias"]
    tp.grad = torch.ones_like(tp)
    before = tp.clone()
    torch.optim.SGD([tp], lr=0.5).step()
    np.testing.assert_allclose(tp.numpy(), before.numpy() - 0.5)
    assert torch.isfinite(cm.evaluate(params, x)["output"]).all()


def test_jax_learning_rate_change_does_not_recompile():
    p_np, g_np = small_problem()
    params, grads = natives("jax", p_np), natives("jax", g_np)
    opt = Adam(0.01)
    state = init(opt, "jax-jit", params)
    from mithril.utils.optimizers.engines.jax_engine import _COMPILED as cache

    params, state = opt.update(params, grads, state)  # first step copies, then donates
    n_fns, n_traces = len(cache), sum(f._cache_size() for f in cache.values())
    for k in range(20):
        opt.set_learning_rate(0.01 / (k + 1))
        params, state = opt.update(params, grads, state)
    assert len(cache) == n_fns
    assert sum(f._cache_size() for f in cache.values()) == n_traces
    assert state.step == 21
    # a second optimizer of the same kind and layout reuses the compiled step
    state2 = init(Adam(0.5), "jax-jit", natives("jax", p_np))
    Adam(0.5).update(natives("jax", p_np), grads, state2)
    assert len(cache) == n_fns


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_numba_learning_rate_change_does_not_recompile(backend):
    from mithril.utils.optimizers.adam import _adam
    from mithril.utils.optimizers.engines.kernels import update_kernel

    p_np, g_np = small_problem()
    opt = Adam(0.01)
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    for _ in range(2):  # (JAX's first step reads the caller's arrays: another kernel)
        params, state = opt.update(params, natives(backend, g_np), state)
    kernel = update_kernel(_adam, 2, 7, "float32", backend == "jax", False, False)  # JAX: double buffer
    n_sigs = len(kernel.signatures)
    for k in range(5):
        opt.set_learning_rate(0.01 / (k + 1))
        params, state = opt.update(params, natives(backend, g_np), state)
    assert len(kernel.signatures) == n_sigs == 1


# ---------------------------------------------------------------------------------------------
# clip_gradients / global_norm helpers vs torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_global_norm_and_clip_gradients_match_torch(backend):
    rng = np.random.default_rng(3)
    g_np = {"a": rng.standard_normal((5, 4)) * 3, "b": rng.standard_normal(7), "c": np.array(2.0)}
    dtype = "float32" if backend == "jax" else "float64"
    tol = 1e-6 if dtype == "float32" else 1e-13
    g_np = {k: v.astype(dtype) for k, v in g_np.items()}
    grads = natives(backend, g_np)
    tg = [torch.tensor(v) for v in g_np.values()]
    norm = global_norm(grads)
    assert isinstance(norm, float)
    ref = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double())
                                                      for t in tg])))
    assert abs(norm - ref) <= tol * ref
    for max_norm in (1.0, 1e3):  # clips / leaves alone
        out = clip_gradients(grads, clip_norm=max_norm)
        ts = [torch.tensor(v, requires_grad=True) for v in g_np.values()]
        for t, v in zip(ts, g_np.values(), strict=True):
            t.grad = torch.tensor(v)
        pre = torch.nn.utils.clip_grad_norm_(ts, max_norm)
        assert abs(float(pre) - norm) <= tol * norm
        for (k, v), t in zip(out.items(), ts, strict=True):
            assert type(v) is type(grads[k]) and host(v).dtype == np.dtype(dtype), k
            assert rel_err(host(v), t.grad.numpy()) <= tol, (k, max_norm)
    out = clip_gradients(grads, clip_value=1.5)
    for (k, v), t in zip(out.items(), tg, strict=True):
        assert type(v) is type(grads[k]), k
        np.testing.assert_array_equal(host(v), torch.clamp(t, -1.5, 1.5).numpy())
    for k, v in grads.items():  # inputs untouched
        np.testing.assert_array_equal(host(v), g_np[k])


def test_clip_gradients_both_and_errors():
    g = {"a": np.array([3.0, -4.0, 0.5])}
    out = clip_gradients(g, clip_value=1.0, clip_norm=1.0)  # norm first, then value (as fused)
    v = np.clip(g["a"] * (1.0 / (np.linalg.norm(g["a"]) + 1e-6)), -1, 1)
    np.testing.assert_allclose(out["a"], v, rtol=1e-14)
    with pytest.raises(ValueError, match="clip_value or clip_norm"):
        clip_gradients(g)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_gradients(g, clip_norm=-1.0)
    with pytest.raises(ValueError, match="clip_value"):
        clip_gradients(g, clip_value=0.0)
    with pytest.raises(FloatingPointError):
        clip_gradients({"a": np.array([np.inf])}, clip_norm=1.0)


# ---------------------------------------------------------------------------------------------
# non-finite gradients
# ---------------------------------------------------------------------------------------------


def _bad(g_np, backend, value=np.nan):
    bad = {k: v.copy() for k, v in g_np.items()}
    bad["b"][1] = value
    return natives(backend, bad)


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_skip(backend):
    p_np, g_np = small_problem()
    opt, ref = Adam(0.1, nonfinite="skip"), Adam(0.1, nonfinite="skip")
    params, rparams = natives(backend, p_np), natives(backend, p_np)
    state, rstate = init(opt, backend, params), init(ref, backend, rparams)
    params, state = opt.update(params, natives(backend, g_np), state)
    rparams, rstate = ref.update(rparams, natives(backend, g_np), rstate)
    before = {k: host(v) for k, v in params.items()}
    slots = {s: host(v) for s, v in state.slots.items()}
    for value in (np.nan, np.inf, -np.inf):
        with pytest.warns(RuntimeWarning, match="non-finite"):
            params, state = opt.update(params, _bad(g_np, backend, value), state)
        assert state.last_step_skipped and state.step == 1
        assert not np.isfinite(state.last_grad_norm)
        for k in before:
            np.testing.assert_array_equal(host(params[k]), before[k])
        for s in slots:
            np.testing.assert_array_equal(host(state.slots[s]), slots[s])
    assert state.num_skipped == 3
    # a good step afterwards continues as if the bad ones never happened
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = opt.update(params, natives(backend, g_np), state)
        rparams, rstate = ref.update(rparams, natives(backend, g_np), rstate)
    assert not state.last_step_skipped and state.step == 2 and state.num_skipped == 3
    for k in p_np:
        np.testing.assert_array_equal(host(params[k]), host(rparams[k]))


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_raise(backend):
    p_np, g_np = small_problem()
    opt = SGD(0.1, momentum=0.9, nonfinite="raise")
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    params, state = opt.update(params, natives(backend, g_np), state)
    before = {k: host(v) for k, v in params.items()}
    slot = host(state.slots["momentum"])
    with pytest.raises(FloatingPointError, match=r"\['b'\]"):
        opt.update(params, _bad(g_np, backend), state)
    assert state.step == 1 and state.num_skipped == 0
    for k in before:  # the caller's params are still valid and unchanged
        np.testing.assert_array_equal(host(params[k]), before[k])
    np.testing.assert_array_equal(host(state.slots["momentum"]), slot)
    params, state = opt.update(params, natives(backend, g_np), state)
    assert state.step == 2


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_propagate_is_default_and_detected(backend):
    p_np, g_np = small_problem()
    opt = Adam(0.1)
    assert opt.nonfinite == "propagate"
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    with warnings.catch_warnings():  # a finite step: no warning, norm measured in the same pass
        warnings.simplefilter("error")
        params, state = opt.update(params, natives(backend, g_np), state)
    norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g_np.values()))
    assert state.last_grad_norm == pytest.approx(norm, rel=1e-6)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        params, state = opt.update(params, _bad(g_np, backend), state)
        state.settle()  # (jax-jit, torch-ops: read when asked, see test_nonfinite_step)
    assert not np.isfinite(state.last_grad_norm) and state.num_nonfinite == 1
    assert state.step == 2 and not state.last_step_skipped and state.num_skipped == 0
    b = host(params["b"])
    assert np.isnan(b[1]) and np.isfinite(b[[0, 2]]).all()
    assert np.isfinite(host(params["a"])).all()
    assert np.isnan(host(state.slot("v")["b"])[1])


@pytest.mark.parametrize("backend", ALL)
def test_returned_params_keep_the_callers_order(backend):
    """Names whose sorted order is not the caller's ("w10" before "w2"): the update returns
    them in the caller's order, so the next update knows its own arrays (``returned``: no
    check, no copy). jax.jit hands dicts back sorted; the jitted engine copied every
    parameter on every step until the order was restored (200 tensors: 7.6 -> 3.5 ms)."""
    rng = np.random.default_rng(0)
    p_np = {f"w{i}": rng.standard_normal(3).astype(np.float32) for i in (2, 10, 1)}
    g_np = {k: rng.standard_normal(3).astype(np.float32) for k in p_np}
    opt = Adam(0.1)
    params = natives(backend, p_np)
    state = init(opt, backend, params)
    for _ in range(2):
        params, state = opt.update(params, natives(backend, g_np), state)
        assert list(params) == ["w2", "w10", "w1"] and state.returned(params)


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_unchecked_applies_without_looking(backend):
    """``"unchecked"`` (torch.optim / optax): the same step as ``"propagate"``, no warning, no
    count; the accelerator engines (jitted JAX, torch's fused kernels) measure no norm
    unless ``clip_norm`` needs it, and then leave it on the device."""
    p_np, g_np = small_problem()
    runs = {}
    for policy in ("propagate", "unchecked"):
        opt = Adam(0.1, nonfinite=policy)
        params = natives(backend, p_np)
        state = init(opt, backend, params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            params, state = opt.update(params, natives(backend, g_np), state)
        runs[policy] = {k: host(v) for k, v in params.items()}
    for k in p_np:
        np.testing.assert_array_equal(runs["unchecked"][k], runs["propagate"][k], err_msg=k)
    lazy = backend in ("jax-jit", "torch-ops")
    assert (state.last_grad_norm is None) if lazy else state.last_grad_norm > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        params, state = opt.update(params, _bad(g_np, backend), state)
    assert state.step == 2 and state.num_nonfinite == 0 and state.num_skipped == 0
    b = host(params["b"])
    assert np.isnan(b[1]) and np.isfinite(b[[0, 2]]).all()
    opt = Adam(0.1, nonfinite="unchecked", clip_norm=0.5)
    state = init(opt, backend, natives(backend, p_np))
    _, state = opt.update(natives(backend, p_np), natives(backend, g_np), state)
    norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in g_np.values()))
    assert float(np.asarray(host(state.last_grad_norm))) == pytest.approx(norm, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# custom optimizers
# ---------------------------------------------------------------------------------------------


def _guide_custom_optimizer() -> type:
    """The guide's "Custom Optimizers" listing, verbatim (its text lives in the guide tests)."""
    from test_guide_optimizers import CUSTOM

    ns: dict = {}
    exec(CUSTOM, ns)
    return ns["CustomOptimizer"]


CustomOptimizer = _guide_custom_optimizer()


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_guide_custom_optimizer(backend):
    p_np, g_np = small_problem()
    opt = CustomOptimizer(learning_rate=0.1, custom_param=0.5)
    params = natives(backend, p_np)
    state = opt.init(params)  # uses self.backend, inferred from params
    assert opt.backend.name == backend
    ref_p = {k: v.astype(np.float64) for k, v in p_np.items()}
    ref_m = {k: np.zeros_like(v) for k, v in ref_p.items()}
    for t in range(5):
        g = {k: v * (t + 1) for k, v in g_np.items()}
        if t == 3:
            del g["b"]
        params, state = opt.update(params, natives(backend, g), state)
        for k in g:
            ref_m[k] = 0.5 * ref_m[k] + g[k]
            ref_p[k] = ref_p[k] - 0.1 * ref_m[k]
    for k in p_np:
        assert type(params[k]) is type(native(backend, p_np[k]))
        assert rel_err(host(params[k]), ref_p[k]) <= 1e-5
        assert rel_err(host(state[k]["momentum"]), ref_m[k]) <= 1e-5


class AdaBelief(Optimizer):
    """A user optimizer stating only ``slots``/``scalars``/``math``: fused path for free."""

    slots = ("m", "s")

    def __init__(self, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, **kw):
        super().__init__(learning_rate, **kw)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def scalars(self, step):
        return (self.learning_rate, self.beta1, self.beta2, 1 - self.beta1**step,
                1 - self.beta2**step, self.eps)

    @staticmethod
    def math(p, g, m, s, lr, b1, b2, bc1, bc2, eps):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) * (g - m) + eps
        return p - lr * (m / bc1) / (sqrt(s / bc2) + eps), m, s


def _decayed_rule(p, g, acc, lr, rho):
    acc = rho * acc + g * g
    return p - lr * g / sqrt(acc), acc


class Decayed(Optimizer):
    """Another style: ``slot_names``/``slot_init``/``kernel_math`` methods. (``kernel_math``
    must return the same function object every time: kernels are cached by it.)"""

    def __init__(self, learning_rate=0.1, rho=0.5, **kw):
        super().__init__(learning_rate, **kw)
        self.rho = rho

    def slot_names(self):
        return ("acc",)

    def slot_init(self, slot):
        return 1.0

    def scalars(self, step):
        return (self.learning_rate, self.rho)

    def kernel_math(self):
        return _decayed_rule


def _adabelief_ref(p, grads, lr=0.01, b1=0.9, b2=0.99, eps=1e-8):
    m, s = {k: np.zeros_like(v) for k, v in p.items()}, {k: np.zeros_like(v) for k, v in p.items()}
    p = dict(p)
    for t, g in enumerate(grads, 1):
        for k in g:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            s[k] = b2 * s[k] + (1 - b2) * (g[k] - m[k]) ** 2 + eps
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(s[k] / (1 - b2**t)) + eps)
    return p, m, s


def _has_kernel(math_fn, n_slots: int, n_scal: int, dtype: str, copy: bool = False) -> bool:
    """Whether the fused numba kernel for ``math_fn`` was generated already (a cache hit)."""
    from mithril.utils.optimizers.engines.kernels import update_kernel as fn

    hits = fn.cache_info().hits
    fn(math_fn, n_slots, n_scal, dtype, copy, False, False)
    return fn.cache_info().hits == hits + 1


@pytest.mark.parametrize("backend", ALL)
def test_user_subclass_gets_fused_path(backend):
    dtype = "float32" if backend.startswith("jax") else "float64"
    tol = 1e-4 if dtype == "float32" else 1e-12  # float32 vs a float64 reference
    p0, grads = problem(dtype, 20)
    opt = AdaBelief(0.01, beta2=0.99)
    params = natives(backend, p0)
    state = init(opt, backend, params)
    assert isinstance(state, OptimizerState) and set(state.slots) == {"m", "s"}
    for g in grads:
        params, state = opt.update(params, natives(backend, g), state)
    # the fused kernel was generated from AdaBelief.math (the jitted JAX engine and torch's
    # fused-ops engine run the math as array ops: whether the kernel exists there depends
    # on which tests ran before in the process)
    if backend not in ("jax-jit", "torch-ops"):
        assert _has_kernel(AdaBelief.math, 2, 6, dtype, backend == "jax")
    ref_p, ref_m, ref_s = _adabelief_ref({k: v.astype(np.float64) for k, v in p0.items()},
                                         [{k: v.astype(np.float64) for k, v in g.items()}
                                          for g in grads])
    for k in SHAPES:
        assert rel_err(host(params[k]), ref_p[k]) <= tol, k
        assert rel_err(host(state.slot("m")[k]), ref_m[k]) <= tol * 10, k
        assert rel_err(host(state.slot("s")[k]), ref_s[k]) <= tol, k

    opt2 = Decayed(0.1, rho=0.5)
    p_np, g_np = small_problem(dtype)
    params = natives(backend, p_np)
    state = init(opt2, backend, params)
    np.testing.assert_array_equal(host(state.slots["acc"]), 1.0)
    params, state = opt2.update(params, natives(backend, g_np), state)
    for k in p_np:
        acc = 0.5 + g_np[k].astype(np.float64) ** 2
        exp = p_np[k] - 0.1 * g_np[k] / np.sqrt(acc)
        assert rel_err(host(params[k]), exp) <= tol
        assert rel_err(host(state.slot("acc")[k]), acc) <= tol


# ---------------------------------------------------------------------------------------------
# misc API
# ---------------------------------------------------------------------------------------------


def test_learning_rate_accessors_and_repr():
    for opt in (SGD(0.1, momentum=0.9), Adam(), AdamW(), RMSProp(), AdaGrad()):
        lr = opt.get_learning_rate()
        opt.set_learning_rate(lr * 2)
        assert opt.get_learning_rate() == lr * 2
        assert type(opt).__name__ in repr(opt)
        json.dumps(opt.hyperparameters())
    assert AdamW().weight_decay == 1e-2 and RMSProp().decay == 0.9 and AdaGrad().epsilon == 1e-8


def test_a_flag_choice_or_integer_set_by_attribute_is_checked():
    """``opt.nonfinite = "skipp"`` would step as "propagate" (a NaN applied, silently for
    a typo): a value the constructor refuses is refused when set over a flag, a choice, an
    integer or an unset value, naming it, and changes nothing. A number over a float stays
    unchecked (torch's ``param_groups``), and a flag that changes the state's slots may
    still be set before ``init`` (``init`` then makes them)."""
    import mithril.utils.optimizers as catalog

    cases = [(Adam(), "nonfinite", "skipp", ValueError), (SGD(0.1), "nesterov", "yes", TypeError),
             (Adam(), "convention", "Optax", ValueError), (Adam(), "ema_every", 0, ValueError),
             (Adam(), "clip_norm", -1.0, ValueError), (Adam(), "beta1", "0.9", TypeError),
             (catalog.Lookahead(Adam()), "amsgrad", "no", TypeError),
             (catalog.Muon(), "nesterov", 2, TypeError)]
    for opt, name, bad, err in cases:
        before = dict(vars(opt))
        with pytest.raises(err, match=f"{name}={bad!r} refused: {name} must"):
            setattr(opt, name, bad)
        assert vars(opt) == before
    opt = Adam(nonfinite="propagate")
    opt.nonfinite = "skip"
    opt.clip_norm = 1  # (as given: checked, not normalised)
    opt.beta1 = 1.5  # (unchecked: a step reads it as it is, as torch's)
    assert (opt.nonfinite, opt.clip_norm, opt.beta1) == ("skip", 1, 1.5)
    opt = Adam()
    opt.amsgrad = True  # before init: init makes the slot
    assert "vmax" in opt.init({"w": np.zeros(2)}).slots
    la = catalog.Lookahead(Adam())
    la.reset_state = True  # (Lookahead's own flag: not the inner's to check)
    assert la.reset_state is True


def test_another_librarys_constructor_argument_names_ours():
    """``Adam(clipnorm=1.0)`` (Keras), ``Adam(betas=...)`` (torch), a misspelling or another
    optimizer's argument: the TypeError names the class (not ``Optimizer.__init__``) and the
    argument meant, as setting the attribute does."""
    import mithril.utils.optimizers as catalog

    for make, name, meant in [
            (lambda: Adam(clipnorm=1.0), "clipnorm", "did you mean clip_tensor_norm"),
            (lambda: Adam(global_clipnorm=1.0), "global_clipnorm", "did you mean clip_norm"),
            (lambda: Adam(use_ema=True), "use_ema", "did you mean ema_decay"),
            (lambda: Adam(beta_1=0.9), "beta_1", "did you mean beta1"),
            (lambda: Adam(betas=(0.9, 0.99)), "betas", "did you mean beta1 and beta2"),
            (lambda: SGD(momentom=0.9), "momentom", "did you mean momentum"),
            (lambda: catalog.Lookahead(Adam(), k=5), "k", "did you mean sync_period"),
            (lambda: Adam(momentum=0.9), "momentum", "DPSGD, LARS, MADGRAD, Muon and 5 more take it")]:
        with pytest.raises(TypeError) as info:
            make()
        assert f"() got an unexpected keyword argument '{name}' ({meant}" in str(info.value)
    with pytest.raises(TypeError, match=r"^Lion\(\) got an unexpected keyword argument 'foo'$"):
        catalog.Lion(foo=1)
    assert Adam(lr=0.1, eps=1e-6).epsilon == 1e-6  # (the aliases still work)


def test_an_attribute_no_step_reads_is_refused_naming_the_hyperparameter():
    """``opt.lr = 0.1`` (torch's name), ``opt.beta_1 = 0.5`` (Keras'), a misspelling or
    another optimizer's hyperparameter (``Adam().momentum``) would only make an attribute no
    step reads: refused, naming the hyperparameter meant (or who takes it); the
    optimizer's own attributes are set as before, and a name of a subclass's own (a cache)
    is its business."""
    import mithril.utils.optimizers as catalog

    opt = Adam(1e-2)
    before = dict(vars(opt))
    for name, meant in [("lr", "learning_rate"), ("beta_1", "beta1"),
                        ("betas", "beta1 and beta2"), ("epsiln", "epsilon"),
                        ("weight_decy", "weight_decay")]:
        with pytest.raises(AttributeError, match=f"Adam has no hyperparameter '{name}': "
                                                 f"setting it would change no step "
                                                 rf"\(did you mean {meant}"):
            setattr(opt, name, 0.5)
    for name, owners in [("momentum", "DPSGD, LARS, MADGRAD, Muon and 5 more take it"),
                         ("nesterov", "ADOPT, AdaBelief, DPSGD, LARS and 4 more take it")]:
        with pytest.raises(AttributeError, match=f"Adam has no hyperparameter '{name}': .*"
                                                 f"{owners}; Adam's are in its"):
            setattr(opt, name, 0.9)  # (another optimizer's: SGD's momentum)
    assert vars(opt) == before
    opt.my_cache = {}  # (not meant for a hyperparameter)
    del opt.my_cache
    opt.beta1 = 0.5
    assert opt.beta1 == 0.5
    with pytest.raises(AttributeError, match="Lookahead has no hyperparameter 'lr'"):
        catalog.Lookahead(Adam()).lr = 0.1
    for name in catalog.__all__:  # every optimizer takes its own attributes back
        cls = getattr(catalog, name)
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)) or cls is Optimizer:
            continue
        wrapper = cls in (catalog.Lookahead, catalog.SAM, catalog.Mechanize,
                          catalog.DifferentiallyPrivate, catalog.ScheduleFree)
        opt = cls(Adam()) if wrapper else cls()
        for k, v in opt.hyperparameters().items():
            if k not in ("fallback", "inner", "base_optimizer", "learning_rate"):
                setattr(opt, k, v)
