"""Invalid hyperparameters and inputs give clear errors and leave params and state untouched.

Every error names the offending hyperparameter or key. ``KeyMismatchError`` subclasses
``KeyError``, ``ShapeError`` subclasses ``ValueError``; dtype / type problems are ``TypeError``.
After a failed ``update`` the caller's params, the state's step count, skip count and every
slot are exactly as before, and a following valid update works.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.optimizers import SGD, AdaGrad, Adam, AdamW, OptimizerState, RMSProp

BACKENDS = ["numpy", "torch", "jax"]


def native(backend, a):
    if backend == "torch":
        return torch.tensor(a)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return np.array(a)


def host(x):
    return x.detach().numpy().copy() if isinstance(x, torch.Tensor) else np.array(x)


# ---------------------------------------------------------------------------------------------
# hyperparameters
# ---------------------------------------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    # (class, kwargs, exception, words the message must contain)
    (SGD, {"learning_rate": -0.1}, ValueError, ["learning_rate", "-0.1"]),
    (Adam, {"learning_rate": -1e-3}, ValueError, ["learning_rate"]),
    (AdamW, {"learning_rate": math.inf}, ValueError, ["learning_rate", "finite"]),
    (RMSProp, {"learning_rate": math.nan}, ValueError, ["learning_rate"]),
    (AdaGrad, {"learning_rate": -1}, ValueError, ["learning_rate"]),
    (Adam, {"learning_rate": "0.01"}, TypeError, ["learning_rate", "number"]),
    (Adam, {"learning_rate": None}, TypeError, ["learning_rate"]),
    (Adam, {"learning_rate": True}, TypeError, ["learning_rate"]),
    (Adam, {"beta1": 1.0}, ValueError, ["beta1", "[0, 1)"]),
    (Adam, {"beta1": -0.1}, ValueError, ["beta1"]),
    (Adam, {"beta2": 1.5}, ValueError, ["beta2", "[0, 1)"]),
    (AdamW, {"beta2": 1.0}, ValueError, ["beta2"]),
    (Adam, {"beta1": math.nan}, ValueError, ["beta1"]),
    (Adam, {"epsilon": 0.0}, ValueError, ["epsilon", "> 0"]),
    (Adam, {"epsilon": -1e-8}, ValueError, ["epsilon"]),
    (RMSProp, {"epsilon": 0}, ValueError, ["epsilon"]),
    (AdaGrad, {"epsilon": -1.0}, ValueError, ["epsilon"]),
    (RMSProp, {"decay": 1.0}, ValueError, ["decay", "[0, 1)"]),
    (RMSProp, {"momentum": -0.5}, ValueError, ["momentum"]),
    (SGD, {"momentum": 1.0}, ValueError, ["momentum", "[0, 1)"]),
    (SGD, {"momentum": -0.9}, ValueError, ["momentum"]),
    (SGD, {"momentum": 0.9, "dampening": 1.5}, ValueError, ["dampening"]),
    (SGD, {"momentum": 0.9, "dampening": -0.1}, ValueError, ["dampening"]),
    (SGD, {"nesterov": True}, ValueError, ["nesterov", "momentum"]),
    (SGD, {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, ValueError, ["nesterov", "dampening"]),
    (AdaGrad, {"lr_decay": -0.1}, ValueError, ["lr_decay"]),
    (AdaGrad, {"initial_accumulator_value": -1.0}, ValueError, ["initial_accumulator_value"]),
    (Adam, {"weight_decay": -1e-4}, ValueError, ["weight_decay"]),
    (SGD, {"weight_decay": math.inf}, ValueError, ["weight_decay"]),
    (Adam, {"clip_norm": 0.0}, ValueError, ["clip_norm"]),
    (SGD, {"clip_norm": -1.0}, ValueError, ["clip_norm"]),
    (Adam, {"clip_value": 0}, ValueError, ["clip_value"]),
    (Adam, {"nonfinite": "ignore"}, ValueError, ["nonfinite", "skip", "raise", "propagate"]),
    (Adam, {"betas": (0.9, 0.999)}, TypeError, ["betas"]),  # mithril spells them beta1/beta2
]


@pytest.mark.parametrize("cls, kwargs, exc, words", BAD_HYPERPARAMETERS,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters(cls, kwargs, exc, words):
    with pytest.raises(exc) as info:
        cls(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_boundary_hyperparameters_are_accepted():
    Adam(learning_rate=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0)
    SGD(learning_rate=np.float32(0.1), momentum=0.0, dampening=1.0)
    RMSProp(decay=0.0, momentum=0.0)
    AdaGrad(initial_accumulator_value=0.0, lr_decay=0.0)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", None])
def test_set_learning_rate_rejects_and_keeps_old_value(bad):
    opt = Adam(learning_rate=0.01)
    with pytest.raises((ValueError, TypeError), match="learning_rate"):
        opt.set_learning_rate(bad)
    assert opt.get_learning_rate() == 0.01


# ---------------------------------------------------------------------------------------------
# bad inputs to init / update: nothing changes
# ---------------------------------------------------------------------------------------------


def _setup(backend, opt=None):
    """Params and state after one valid step (so slots and step are non-trivial)."""
    rng = np.random.default_rng(0)
    p_np = {"w": rng.standard_normal((3, 2)).astype(np.float32),
            "b": rng.standard_normal(2).astype(np.float32)}
    g_np = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p_np.items()}
    opt = opt or Adam(0.1)
    params = {k: native(backend, v) for k, v in p_np.items()}
    state = opt.init(params)
    params, state = opt.update(params, {k: native(backend, v) for k, v in g_np.items()}, state)
    return opt, params, state, g_np


def _snapshot(params, state):
    return ({k: host(v) for k, v in params.items()},
            {s: host(v) for s, v in state.slots.items()},
            (state.step, state.num_skipped, state.last_step_skipped))


def _assert_untouched(params, state, snap):
    p, slots, counters = snap
    assert list(params) == list(p)
    for k in p:
        np.testing.assert_array_equal(host(params[k]), p[k])
    for s in slots:
        np.testing.assert_array_equal(host(state.slots[s]), slots[s])
    assert (state.step, state.num_skipped, state.last_step_skipped) == counters


def _bad_updates(backend):
    """(label, callable(params, grads_ok, state, opt) -> bad call, exception, words)."""
    f32 = np.float32
    other = "numpy" if backend != "numpy" else "torch"
    return [
        ("unknown gradient key", lambda p, g, s, o: o.update(p, {**g, "extra": g["b"]}, s),
         KeyMismatchError, ["extra", "unknown"]),
        ("gradient shape", lambda p, g, s, o: o.update(
            p, {"w": native(backend, np.ones((2, 3), f32))}, s), ShapeError, ["'w'", "(2, 3)", "(3, 2)"]),
        # a full, ordered set after a good step: the fast path (e.g. JAX's cache of the
        # avals that passed) must still refuse it
        ("gradient shape, full set", lambda p, g, s, o: o.update(
            p, {"w": native(backend, np.ones((2, 3), f32)), "b": g["b"]}, s), ShapeError,
         ["'w'", "(2, 3)", "(3, 2)"]),
        ("gradient dtype, full set", lambda p, g, s, o: o.update(
            p, {"w": g["w"], "b": native(backend, np.ones(2, np.float16))}, s), TypeError,
         ["'b'", "float16"]),
        ("gradient of another backend, full set", lambda p, g, s, o: o.update(
            p, {"w": g["w"], "b": native(other, np.ones(2, f32))}, s), TypeError, ["'b'", backend]),
        ("gradient dtype", lambda p, g, s, o: o.update(
            p, {"w": native(backend, np.ones((3, 2), np.float16))}, s), TypeError, ["'w'", "float16", "float32"]),
        ("gradient of another backend", lambda p, g, s, o: o.update(
            p, {"b": native(other, np.ones(2, f32))}, s), TypeError, ["'b'", backend]),
        ("param missing", lambda p, g, s, o: o.update({"w": p["w"]}, {"w": g["w"]}, s),
         KeyMismatchError, ["missing", "'b'"]),
        ("param unknown", lambda p, g, s, o: o.update({**p, "z": p["b"]}, g, s),
         KeyMismatchError, ["unknown", "'z'"]),
        ("param shape", lambda p, g, s, o: o.update(
            {"w": native(backend, np.ones((2, 3), f32)), "b": p["b"]}, g, s), ShapeError, ["'w'", "(2, 3)"]),
        ("param dtype", lambda p, g, s, o: o.update(
            {"w": native(backend, np.ones((3, 2), np.float16)), "b": p["b"]}, g, s), TypeError, ["'w'"]),
        ("state of another optimizer", lambda p, g, s, o: SGD(0.1, momentum=0.9).update(p, g, s),
         ValueError, ["Adam", "SGD"]),
        ("state of Adam without amsgrad", lambda p, g, s, o: Adam(amsgrad=True).update(p, g, s),
         ValueError, ["vmax"]),
        ("state not an OptimizerState", lambda p, g, s, o: o.update(p, g, dict(s.slots)),
         TypeError, ["state", "init"]),
        ("gradients not a dict", lambda p, g, s, o: o.update(p, list(g.values()), s),
         TypeError, ["gradients", "dict"]),
        ("params not a dict", lambda p, g, s, o: o.update(list(p.values()), g, s),
         TypeError, ["params", "dict"]),
        ("gradients None", lambda p, g, s, o: o.update(p, None, s), TypeError, ["gradients"]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_updates_raise_and_change_nothing(backend):
    opt, params, state, g_np = _setup(backend)
    snap = _snapshot(params, state)
    for label, call, exc, words in _bad_updates(backend):
        grads = {k: native(backend, v) for k, v in g_np.items()}
        with pytest.raises(exc) as info:
            call(params, grads, state, opt)
        for w in words:
            assert w in str(info.value), (label, w, str(info.value))
        _assert_untouched(params, state, snap)
    # still usable afterwards
    params, state = opt.update(params, {k: native(backend, v) for k, v in g_np.items()}, state)
    assert state.step == 2


def test_key_and_shape_errors_are_builtin_subclasses():
    assert issubclass(KeyMismatchError, KeyError) and issubclass(ShapeError, ValueError)
    _, params, state, g_np = _setup("numpy")
    with pytest.raises(KeyError) as info:
        Adam(0.1).update(params, {"nope": g_np["b"]}, state)
    assert "nope" in str(info.value) and not str(info.value).startswith('"')


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_init_inputs(backend):
    opt = Adam()
    with pytest.raises(TypeError, match="params must be a dict"):
        opt.init([native(backend, np.ones(2, np.float32))])
    with pytest.raises(TypeError, match="params must be a dict"):
        Adam().init(None)
    with pytest.raises(TypeError, match=r"params\['b'\]"):
        Adam().init({"a": native(backend, np.ones(2, np.float32)), "b": [1.0, 2.0]})
    with pytest.raises(TypeError, match=r"mix dtypes.*odd one\(s\) out: \['b'\]"):
        Adam().init({"a": native(backend, np.ones(2, np.float32)),
                     "b": native(backend, np.ones(2, np.float16))})
    with pytest.raises(TypeError, match=r"params\['a'\].*floating-point"):
        Adam().init({"a": native(backend, np.ones(2, np.int32))})


def test_params_of_another_backend_than_the_state():
    opt, params, state, g_np = _setup("numpy")
    snap = _snapshot(params, state)
    tparams = {k: torch.tensor(v) for k, v in snap[0].items()}
    with pytest.raises(TypeError, match="numpy"):
        opt.update(tparams, {k: torch.tensor(v) for k, v in g_np.items()}, state)
    _assert_untouched(params, state, snap)


def test_nonfinite_raise_changes_nothing():
    opt, params, state, g_np = _setup("numpy", Adam(0.1, nonfinite="raise"))
    snap = _snapshot(params, state)
    bad = {k: v.copy() for k, v in g_np.items()}
    bad["w"][0, 1] = np.inf
    with pytest.raises(FloatingPointError, match=r"\['w'\]"):
        opt.update(params, bad, state)
    _assert_untouched(params, state, snap)


def test_state_for_other_params_of_same_optimizer():
    opt, params, state, g_np = _setup("numpy")
    snap = _snapshot(params, state)
    other = {"w": params["w"], "c": params["b"]}
    with pytest.raises(KeyMismatchError, match=r"missing \['b'\], unknown \['c'\]"):
        opt.update(other, {"w": g_np["w"]}, state)
    _assert_untouched(params, state, snap)


def test_empty_params():
    opt = Adam()
    state = opt.init({})
    assert isinstance(state, OptimizerState)
    params, state = opt.update({}, {}, state)
    assert params == {} and state.step == 1


def test_jax_gradients_in_device_memory_are_refused():
    """Where JAX also has an accelerator, a gradient there must be refused by name, never
    dereferenced by the CPU kernel. No accelerator here: the check is run on stand-ins."""
    from types import SimpleNamespace

    opt, params, state, g_np = _setup("jax")
    eng = state.engine
    gpu = SimpleNamespace(sharding=SimpleNamespace(device_set=[SimpleNamespace(platform="gpu")]))
    cpu_grads = [native("jax", v) for v in g_np.values()]
    eng._foreign = True  # as on a machine with a GPU: shardings are checked too
    assert eng._on_cpu(cpu_grads)
    assert eng._good_shardings[0] is cpu_grads[0].sharding  # remembered: the next check is cheap
    assert not eng._on_cpu([cpu_grads[0], gpu])
    with pytest.raises(ValueError, match=r"gradients\['w'\] is on .*the parameters are on cpu"):
        eng._address("w", gpu, [])
    snap = _snapshot(params, state)
    params, state = opt.update(params, dict(zip(g_np, cpu_grads)), state)  # still the fast path
    assert state.step == snap[2][0] + 1


# ---------------------------------------------------------------------------------------------
# aliasing and unreadable arrays (found by review): reads come before writes
# ---------------------------------------------------------------------------------------------


def _array_engine(monkeypatch):
    """Route numpy/torch through the tensor-op :class:`ArrayEngine` (torch-on-GPU, fp16)."""
    import mithril.utils.optimizers.engines as engines
    from mithril.utils.optimizers.engines.array_engine import ArrayEngine

    monkeypatch.setattr(engines, "engine_for", lambda backend, layout, *_: ArrayEngine(backend, layout))


ENGINES = [(b, "fused") for b in BACKENDS] + [("numpy", "array"), ("torch", "array")]


@pytest.mark.parametrize("backend, engine", ENGINES)
def test_returned_params_passed_under_swapped_names(backend, engine, monkeypatch):
    """Copying ``a`` in must not change the buffer that ``b`` (a returned view) still lies in."""
    if engine == "array":
        _array_engine(monkeypatch)
    opt = SGD(1.0)
    zeros = lambda: {k: native(backend, np.zeros(3, np.float32)) for k in "ab"}  # noqa: E731
    params = {"a": native(backend, np.ones(3, np.float32)), "b": native(backend, np.zeros(3, np.float32))}
    state = opt.init(params)
    params, state = opt.update(params, zeros(), state)
    opt.set_learning_rate(0.0)
    out, state = opt.update({"a": params["b"], "b": params["a"]}, zeros(), state)
    np.testing.assert_array_equal(host(out["a"]), 0.0)
    np.testing.assert_array_equal(host(out["b"]), 1.0)


@pytest.mark.parametrize("backend, engine", ENGINES)
def test_returned_params_passed_as_gradients(backend, engine, monkeypatch):
    """A gradient lying in the parameter buffer is read as it was before the step."""
    if engine == "array":
        _array_engine(monkeypatch)
    opt = SGD(1.0)
    params = {"a": native(backend, np.full(3, 10.0, np.float32)),
              "b": native(backend, np.full(3, 1.0, np.float32))}
    state = opt.init(params)
    params, state = opt.update(params, {k: native(backend, np.zeros(3, np.float32)) for k in "ab"}, state)
    out, state = opt.update(params, {"a": params["b"], "b": params["a"]}, state)
    np.testing.assert_array_equal(host(out["a"]), 9.0)  # 10 - 1
    np.testing.assert_array_equal(host(out["b"]), -9.0)  # 1 - 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_param_on_a_fresh_state(backend):
    opt = Adam(0.1)
    params = {"w": native(backend, np.ones(3, np.float32)), "b": native(backend, np.ones(2, np.float32))}
    state = opt.init(params)
    grads = {k: native(backend, np.ones(v.shape, np.float32)) for k, v in params.items()}
    with pytest.raises(TypeError, match=r"params\['w'\]"):
        opt.update({"w": None, "b": params["b"]}, grads, state)
    assert state.step == 0 and state.params_flat is None
    np.testing.assert_array_equal(host(state.slots["m"]), 0.0)


@pytest.mark.parametrize("engine", ["fused", "array"])
def test_unreadable_torch_params_and_gradients_are_named(engine, monkeypatch):
    """Sparse and meta tensors pass the type/shape/dtype checks; they are refused by name
    before anything is written, even when another (valid) param is copied in first."""
    if engine == "array":
        _array_engine(monkeypatch)
    opt, params, state, g_np = _setup("torch")
    snap = _snapshot(params, state)
    grads = {k: torch.tensor(v) for k, v in g_np.items()}
    for bad in (torch.ones(2).to_sparse(), torch.ones(2, device="meta")):
        with pytest.raises((TypeError, ValueError), match=r"params\['b'\]"):
            opt.update({"w": torch.zeros(3, 2), "b": bad}, grads, state)
        _assert_untouched(params, state, snap)
        if engine == "fused":  # the tensor-op engine concatenates gradients with torch ops
            with pytest.raises((TypeError, ValueError), match=r"gradients\['b'\]"):
                opt.update(params, {"w": grads["w"], "b": bad}, state)
            _assert_untouched(params, state, snap)


def test_negated_torch_views_are_read_as_their_values():
    opt = SGD(0.5)
    state = opt.init({"w": torch.zeros(3)})
    out, state = opt.update({"w": torch.ones(3)._neg_view()}, {"w": torch.ones(3)._neg_view()}, state)
    np.testing.assert_array_equal(host(out["w"]), -0.5)  # -1 - 0.5 * (-1)


def test_deleted_jax_arrays_are_named():
    import jax.numpy as jnp

    opt, params, state, g_np = _setup("jax")
    snap = _snapshot(params, state)
    gone = jnp.ones(2, jnp.float32)
    gone.delete()
    with pytest.raises(TypeError, match=r"gradients\['b'\]"):
        opt.update(params, {"w": jnp.asarray(g_np["w"]), "b": gone}, state)
    _assert_untouched(params, state, snap)
    with pytest.raises(TypeError, match=r"params\['b'\]"):
        opt.update({"w": jnp.zeros((3, 2), jnp.float32), "b": gone},
                   {k: jnp.asarray(v) for k, v in g_np.items()}, state)
    _assert_untouched(params, state, snap)


@pytest.mark.parametrize("make", [lambda: SGD(momentum=0.9, nesterov="no"), lambda: Adam(amsgrad="yes"),
                                  lambda: RMSProp(centered="x"), lambda: Adam(backend="numpy")])
def test_flags_and_backend_must_have_their_types(make):
    with pytest.raises(TypeError, match="nesterov|amsgrad|centered|backend"):
        make()


@pytest.mark.parametrize("bad", [[1.0, 2.0], 1.0, None])
def test_init_names_a_first_param_that_is_no_array(bad):
    with pytest.raises(TypeError, match=r"params\['w'\]"):
        Adam().init({"w": bad})


def test_state_of_another_backend_is_named():
    opt, params, state, g_np = _setup("numpy")
    snap = _snapshot(params, state)
    with pytest.raises(ValueError, match="state was made for numpy arrays.*torch"):
        Adam(0.1).update({k: torch.tensor(v) for k, v in snap[0].items()},
                         {k: torch.tensor(v) for k, v in g_np.items()}, state)
    _assert_untouched(params, state, snap)


# ---------------------------------------------------------------------------------------------
# load_state_dict: everything checked before anything changes
# ---------------------------------------------------------------------------------------------

BAD_STATE_DICTS = [
    ("lr", lambda d: d["hyperparameters"].update(learning_rate=-1), ValueError, "learning_rate"),
    ("beta1", lambda d: d["hyperparameters"].update(beta1=2.0), ValueError, "beta1"),
    ("eps", lambda d: d["hyperparameters"].update(epsilon=0.0), ValueError, "epsilon"),
    ("policy", lambda d: d["hyperparameters"].update(nonfinite="bogus"), ValueError, "nonfinite"),
    ("flag", lambda d: d["hyperparameters"].update(amsgrad="yes"), TypeError, "amsgrad"),
    ("unknown", lambda d: d["hyperparameters"].update(foo=1), KeyError, "foo"),
    ("step", lambda d: d.update(step=-5), ValueError, "step"),
    ("skips", lambda d: d.update(num_skipped=1.5), ValueError, "num_skipped"),
    ("transposed", lambda d: d["slots"]["m"].update(w=np.zeros((2, 3))), ShapeError, "'m' of 'w'"),
    ("size", lambda d: d["slots"]["v"].update(b=np.zeros(5)), ShapeError, "'v' of 'b'"),
    ("no vmax", lambda d: d["slots"].pop("vmax"), KeyError, "vmax"),
    ("vmax, no amsgrad", lambda d: d["hyperparameters"].update(amsgrad=False), KeyError, "vmax"),
    ("subset", lambda d: d["slots"]["m"].pop("b"), KeyError, "'m'"),
    ("None", lambda d: d["slots"]["m"].update(b=None), TypeError, "'m' of 'b'"),
    ("other", lambda d: d.update(optimizer="SGD"), ValueError, "SGD"),
]


@pytest.mark.parametrize("label, corrupt, exc, words", BAD_STATE_DICTS, ids=[b[0] for b in BAD_STATE_DICTS])
def test_bad_state_dicts_are_refused_and_change_nothing(label, corrupt, exc, words):
    import copy

    opt, params, state, _ = _setup("numpy", Adam(0.1, amsgrad=True))
    d = copy.deepcopy(opt.state_dict(state))
    corrupt(d)
    fresh = Adam(0.05, amsgrad=True)
    before = dict(vars(fresh))
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        fresh.load_state_dict(d, params)
    assert vars(fresh) == before


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("cls", [Adam, RMSProp, AdaGrad])
def test_epsilon_that_is_zero_in_float16_is_refused(backend, cls):
    """eps=1e-8 rounds to 0 in float16, where a zero gradient gives 0/0 = NaN parameters from
    finite gradients (torch.optim lets that through); refused by name, nothing changed."""
    params = {"w": native(backend, np.ones(4, np.float16))}
    grads = {"w": native(backend, np.array([0, 1e-4, 0.1, 1], np.float16))}
    opt = cls(learning_rate=0.01)
    state = opt.init(params)  # a state may still be made (e.g. to hand to MixedPrecisionTrainer)
    with pytest.raises(ValueError, match="epsilon=1e-08 is 0 in float16"):
        opt.update(params, grads, state)
    assert state.step == 0 and state.params_flat is None
    opt = cls(learning_rate=0.01, epsilon=1e-4)
    out, state = opt.update(params, grads, opt.init(params))
    assert np.isfinite(host(out["w"]).astype(np.float32)).all()


@pytest.mark.parametrize("bad, words", [([np.ones(2)], "dict of arrays"), ({"a": None}, r"\['a'\] is a NoneType"),
                                        ({"a": [1.0]}, r"\['a'\] is a list")])
def test_clipping_helpers_name_what_is_not_an_array(bad, words):
    from mithril.utils.optimizers import clip_gradients, global_norm

    with pytest.raises(TypeError, match=words):
        clip_gradients(bad, clip_value=1.0)
    with pytest.raises(TypeError, match=words):
        global_norm(bad)


def test_raise_policy_explains_an_overflowing_norm_of_finite_gradients():
    """|g| > 1e154 in float64: Σg² is inf although every gradient is finite (torch's
    clip_grad_norm_ gives inf too); the error says so instead of naming no parameter."""
    opt = SGD(0.1, nonfinite="raise")
    params = {"w": np.zeros(2)}
    state = opt.init(params)
    with pytest.raises(FloatingPointError, match="overflows float64"):
        opt.update(params, {"w": np.array([1e200, 1e200])}, state)
    assert state.step == 0


def test_other_libraries_spellings_and_options_are_named():
    """Keras' and torch's spellings of our classes, and Keras options that are a wrapper or
    a recipe here, say what to use (a bare AttributeError / unexpected-keyword before)."""
    import mithril.utils.optimizers as O

    for theirs, ours in (("RMSprop", "RMSProp"), ("Adagrad", "AdaGrad"), ("Nadam", "NAdam"),
                         ("Lamb", "LAMB")):
        with pytest.raises(AttributeError, match=f"no attribute '{theirs}': ours is spelled "
                                                 f"{ours}"):
            getattr(O, theirs)
    for kw, hint in (("gradient_accumulation_steps", "Accumulate"),
                     ("loss_scale_factor", "LossScaler"),
                     ("ema_overwrite_frequency", "ema_params")):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{kw}' .*{hint}"):
            O.Adam(**{kw: 2})
