"""``convention="mlx"`` on SGD, Adam, AdamW, Adamax, RMSProp, AdaGrad, Adadelta and Lion,
run side by side with ``mlx.optimizers`` (MLX's CPU build, float64: ``mx.array(x,
dtype=mx.float64)``; MLX keeps a float learning rate in float32, so both sides get it as a
float64 array).

Every case: 25 steps of fresh random gradients (``"b"`` gets zeros on the first two, the
empty states' edge), parameters compared after every step to 1e-12 (relative to the largest
magnitude) on our NumPy, torch and JAX backends; with weight decay (MLX's where it has one,
else ``g + wd·p`` given to MLX as the gradient: our coupled decay), an MLX schedule (its
values passed as ``set_learning_rate`` before each step, and Mithril's ``StepLR`` against
``step_decay``), through ``torch_optimizer``, ``optax_transformation`` and
``make_train_step``; one float32 check; MLX's
defaults; the argument errors.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from mithril.utils.optimizers import (
    SGD,
    Adadelta,
    AdaGrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    NAdam,
    RMSProp,
)

mx = pytest.importorskip("mlx.core")
optim = pytest.importorskip("mlx.optimizers")

STEPS = 25
TOL = 1e-12
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
WD = 0.1

# name -> (our class, our kwargs, MLX class, MLX kwargs, lr, coupled wd given to MLX's gradient)
CASES: dict[str, tuple] = {
    "sgd": (SGD, {}, "SGD", {}, 0.05, 0.0),
    "sgd_momentum_dampening_wd": (SGD, {"momentum": 0.9, "dampening": 0.3, "weight_decay": WD},
                                  "SGD", {"momentum": 0.9, "dampening": 0.3, "weight_decay": WD},
                                  0.05, 0.0),
    "sgd_nesterov": (SGD, {"momentum": 0.8, "nesterov": True}, "SGD",
                     {"momentum": 0.8, "nesterov": True}, 0.05, 0.0),
    "adam": (Adam, {}, "Adam", {}, 0.01, 0.0),
    "adam_bias_correction": (Adam, {"bias_correction": True, "beta2": 0.99, "epsilon": 1e-3},
                             "Adam", {"bias_correction": True, "betas": [0.9, 0.99], "eps": 1e-3},
                             0.01, 0.0),
    "adam_coupled_wd": (Adam, {"weight_decay": WD}, "Adam", {}, 0.01, WD),
    "adamw": (AdamW, {"weight_decay": WD}, "AdamW", {"weight_decay": WD}, 0.01, 0.0),
    "adamw_bias_correction": (AdamW, {"bias_correction": True}, "AdamW",
                              {"bias_correction": True}, 0.01, 0.0),
    "adamax": (Adamax, {"epsilon": 1e-3}, "Adamax", {"eps": 1e-3}, 0.01, 0.0),
    "adamax_coupled_wd": (Adamax, {"weight_decay": WD}, "Adamax", {}, 0.01, WD),
    "rmsprop": (RMSProp, {}, "RMSprop", {}, 0.01, 0.0),
    "rmsprop_coupled_wd": (RMSProp, {"decay": 0.9, "epsilon": 1e-3, "weight_decay": WD},
                           "RMSprop", {"alpha": 0.9, "eps": 1e-3}, 0.01, WD),
    "adagrad": (AdaGrad, {}, "Adagrad", {}, 0.1, 0.0),
    "adagrad_coupled_wd": (AdaGrad, {"epsilon": 1e-3, "weight_decay": WD}, "Adagrad",
                           {"eps": 1e-3}, 0.1, WD),
    "adadelta": (Adadelta, {}, "AdaDelta", {}, 1.0, 0.0),
    "adadelta_coupled_wd": (Adadelta, {"rho": 0.95, "weight_decay": WD}, "AdaDelta",
                            {"rho": 0.95}, 0.5, WD),
    "lion": (Lion, {}, "Lion", {}, 0.003, 0.0),
    "lion_wd": (Lion, {"weight_decay": WD}, "Lion", {"weight_decay": WD}, 0.003, 0.0),
}


def problem(dtype: str = "float64", steps: int = STEPS, seed: int = 0) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    p0 = {k: np.asarray(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}
    grads = [{k: np.asarray(rng.standard_normal(s) * (1 + t % 5) * (k != "b" or t >= 2),
                            dtype=dtype) for k, s in SHAPES.items()} for t in range(steps)]
    return p0, grads


def native(backend: str):
    """NumPy array -> an array of ``backend`` (same dtype)."""
    if backend == "torch":
        return lambda a: torch.tensor(a)
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # (conftest restores it after the module)
        return lambda a: jax.numpy.asarray(a)
    return lambda a: np.array(a)


def to_numpy(x) -> np.ndarray:
    return x.detach().numpy().copy() if isinstance(x, torch.Tensor) else np.array(x)


def lr_array(lr, dtype=None):
    """MLX stores a float learning rate as float32: give it a float64 array."""
    return mx.array(lr, dtype=dtype or mx.float64)


def mlx_trajectory(name: str, kw: dict, lr, wd: float, p0: dict, grads: list,
                   dtype=None) -> list[dict]:
    """MLX's parameters after each step (``wd``: ``g + wd·p`` as the gradient)."""
    dtype = dtype or mx.float64
    opt = getattr(optim, name)(learning_rate=lr, **kw)
    params = {k: mx.array(v, dtype=dtype) for k, v in p0.items()}
    out = []
    for g in grads:
        gm = {k: mx.array(v, dtype=dtype) + wd * params[k] for k, v in g.items()}
        params = opt.apply_gradients(gm, params)
        mx.eval(params)
        out.append({k: np.array(v) for k, v in params.items()})
    return out


def ours_trajectory(opt, p0: dict, grads: list, backend: str = "numpy",
                    lrs: list | None = None) -> list[dict]:
    make = native(backend)
    params = {k: make(v) for k, v in p0.items()}
    state = opt.init(params)
    out = []
    for t, g in enumerate(grads):
        if lrs is not None:
            opt.set_learning_rate(lrs[t])
        params, state = opt.update(params, {k: make(v) for k, v in g.items()}, state)
        out.append({k: to_numpy(v) for k, v in params.items()})
    return out


def worst(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) > 0
    return max(float(np.max(np.abs(x[k] - y[k]))) / max(1.0, float(np.max(np.abs(y[k]))))
               for x, y in zip(a, b) for k in y)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_parity_with_mlx(case, backend):
    cls, kw, name, mkw, lr, wd = CASES[case]
    p0, grads = problem()
    ref = mlx_trajectory(name, mkw, lr_array(lr), wd, p0, grads)
    ours = ours_trajectory(cls(learning_rate=lr, convention="mlx", **kw), p0, grads, backend)
    assert ours[-1]["w"].dtype == np.float64
    assert worst(ours, ref) <= TOL, (case, backend, worst(ours, ref))
    # the parameters really moved, and the convention matters: the same run in torch's
    # convention (Lion: optax's) is far off, except where the update is the same; with bias
    # correction, by MLX's float32 corrections (~1e-7)
    assert worst(ref[-1:], [p0]) > 1e-3
    if case not in SAME_UPDATE:
        other = ours_trajectory(cls(learning_rate=lr, **kw), p0, grads)
        assert worst(other, ref) > (1e-9 if "bias_correction" in case else 1e-4), case


SAME_UPDATE = ("sgd", "sgd_nesterov", "rmsprop_coupled_wd", "adagrad", "adagrad_coupled_wd",
               "adadelta", "adadelta_coupled_wd", "lion", "lion_wd")


SCHEDULED = ["adam_bias_correction", "sgd_momentum_dampening_wd", "adamw", "lion_wd"]


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", SCHEDULED)
def test_an_mlx_schedule(case, backend):
    """MLX evaluates its schedule at the step count before the update (0 first): the same
    values through ``set_learning_rate`` give MLX's run (warm-up then cosine decay)."""
    cls, kw, name, mkw, lr, wd = CASES[case]
    sched = optim.join_schedules([optim.linear_schedule(0.0, lr_array(lr), 5),
                                  optim.cosine_decay(lr_array(lr), 20)], [5])
    lrs = [float(sched(mx.array(t, mx.uint64))) for t in range(STEPS)]
    assert lrs[0] == 0.0 and lrs[5] == lr and lrs[-1] < lr / 2
    p0, grads = problem(seed=1)
    ref = mlx_trajectory(name, mkw, sched, wd, p0, grads)
    ours = ours_trajectory(cls(learning_rate=lr, convention="mlx", **kw), p0, grads, backend,
                           lrs=lrs)
    assert worst(ours, ref) <= TOL, worst(ours, ref)
    flat = ours_trajectory(cls(learning_rate=lr, convention="mlx", **kw), p0, grads)
    assert worst(flat, ref) > 1e-3  # (the schedule matters)


@pytest.mark.parametrize("case", ["adam_bias_correction", "rmsprop", "sgd_nesterov"])
def test_mithril_step_lr_is_mlx_step_decay(case):
    from mithril.utils.lr_schedulers import StepLR

    cls, kw, name, mkw, lr, wd = CASES[case]
    p0, grads = problem(seed=2)
    ref = mlx_trajectory(name, mkw, optim.step_decay(lr_array(lr), 0.5, 7), wd, p0, grads)
    opt = cls(learning_rate=lr, convention="mlx", **kw)
    sched = StepLR(opt, step_size=7, gamma=0.5)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    ours = []
    for g in grads:
        params, state = opt.update(params, g, state)
        sched.step()
        ours.append({k: v.copy() for k, v in params.items()})
    assert opt.learning_rate == lr / 8
    assert worst(ours, ref) <= TOL, worst(ours, ref)


@pytest.mark.parametrize("case", ["adamw_bias_correction", "sgd_momentum_dampening_wd",
                                  "rmsprop_coupled_wd"])
def test_torch_optimizer_interop(case):
    from mithril.interop import torch_optimizer

    cls, kw, name, mkw, lr, wd = CASES[case]
    p0, grads = problem(seed=3)
    ref = mlx_trajectory(name, mkw, lr_array(lr), wd, p0, grads)
    ts = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = torch_optimizer(cls(learning_rate=lr, convention="mlx", **kw), ts.items())
    ours = []
    for g in grads:
        for k, x in ts.items():
            x.grad = torch.tensor(g[k])
        topt.step()
        ours.append({k: x.detach().numpy().copy() for k, x in ts.items()})
    assert worst(ours, ref) <= TOL, worst(ours, ref)


@pytest.mark.parametrize("case", ["adam_bias_correction", "sgd_momentum_dampening_wd"])
def test_optax_transformation_interop(case):
    """As an optax transformation, jitted (the bias corrections traced in the program)."""
    import jax
    import optax

    from mithril.interop import optax_transformation

    cls, kw, name, mkw, lr, wd = CASES[case]
    jnp = native("jax")
    p0, grads = problem(seed=8)
    ref = mlx_trajectory(name, mkw, lr_array(lr), wd, p0, grads)
    tx = optax_transformation(cls(learning_rate=lr, convention="mlx", **kw))

    @jax.jit
    def step(params, g, s):
        u, s = tx.update(g, s, params)
        return optax.apply_updates(params, u), s

    params = {k: jnp(v) for k, v in p0.items()}
    s = tx.init(params)
    ours = []
    for g in grads:
        params, s = step(params, {k: jnp(v) for k, v in g.items()}, s)
        ours.append({k: np.array(v) for k, v in params.items()})
    assert ours[-1]["w"].dtype == np.float64
    assert worst(ours, ref) <= TOL, worst(ours, ref)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", ["adam_bias_correction", "adamax"])
def test_make_train_step(case, backend):
    """make_train_step's step on a small MLP equals MLX's updates with the gradients our
    model gives at MLX's parameters (so: equals evaluate + update)."""
    import mithril as ml
    from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
    from mithril.cli.networks import mlp_spec
    from mithril.utils.training import make_train_step

    cls, kw, name, mkw, lr, wd = CASES[case]
    native(backend)  # (JAX's x64)
    be = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}[backend](
        dtype="float64")
    spec = mlp_spec(6, 3, [8])
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(4)
    batches = [{"input": be.array(rng.standard_normal((16, 6))),
                "target": be.array(rng.integers(0, 3, 16), be.int_dtype)} for _ in range(12)]
    params = compiled.get_parameters()
    theirs = {k: mx.array(np.array(be.to_numpy(v)), dtype=mx.float64) for k, v in params.items()}
    mopt = getattr(optim, name)(learning_rate=lr_array(lr), **mkw)
    step = make_train_step(compiled, cls(learning_rate=lr, convention="mlx", **kw), loss="loss")
    state = step.init(params)
    err = 0.0
    for data in batches:
        at = {k: be.array(np.array(v)) for k, v in theirs.items()}
        _, g = compiled.evaluate(at, data, output_gradients={"loss": 1.0})
        theirs = mopt.apply_gradients(
            {k: mx.array(np.array(be.to_numpy(v)), dtype=mx.float64) for k, v in g.items()},
            theirs)
        mx.eval(theirs)
        params, state, _ = step(params, state, data)
        ref = {k: np.array(v) for k, v in theirs.items()}
        err = max(err, worst([{k: np.array(be.to_numpy(v)) for k, v in params.items()}], [ref]))
    assert err <= TOL, err


@pytest.mark.parametrize("case", ["adam_bias_correction", "sgd_momentum_dampening_wd", "adamw",
                                  "rmsprop", "lion_wd"])
def test_float32_parity(case):
    """float32 parameters (MLX's learning rate in float32, as a plain float gives it)."""
    cls, kw, name, mkw, lr, wd = CASES[case]
    p0, grads = problem("float32", seed=5)
    ref = mlx_trajectory(name, mkw, lr, wd, p0, grads, dtype=mx.float32)
    ours = ours_trajectory(cls(learning_rate=lr, convention="mlx", **kw), p0, grads)
    assert ours[-1]["w"].dtype == np.float32
    assert worst(ours, ref) <= 2e-6, worst(ours, ref)


# --------------------------------------------------------------------------------------------
# defaults, state dicts, errors
# --------------------------------------------------------------------------------------------

OURS_BY_MLX = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW, "Adamax": Adamax, "RMSprop": RMSProp,
               "Adagrad": AdaGrad, "AdaDelta": Adadelta, "Lion": Lion}
NAMES = {"betas": ("beta1", "beta2"), "eps": ("epsilon",), "alpha": ("decay",)}


@pytest.mark.parametrize("mlx_name", list(OURS_BY_MLX))
def test_mlx_defaults(mlx_name):
    """``X(convention="mlx")`` has every default of ``mlx.optimizers.X`` (MLX has no default
    learning rate: ours stays)."""
    ours = OURS_BY_MLX[mlx_name](convention="mlx")
    checked = 0
    for key, p in inspect.signature(getattr(optim, mlx_name)).parameters.items():
        if p.default is inspect.Parameter.empty:
            continue
        values = p.default if key == "betas" else [p.default]
        for attr, want in zip(NAMES.get(key, (key,)), values):
            assert getattr(ours, attr) == want, (mlx_name, attr)
            checked += 1
    assert checked >= 1


def test_the_defaults_of_the_other_conventions_stay():
    assert RMSProp().decay == RMSProp(convention="optax").decay == 0.9
    assert RMSProp(convention="mlx").decay == 0.99
    assert Lion().weight_decay == 1e-3 and Lion(convention="mlx").weight_decay == 0.0
    assert Lion().convention == "optax"
    assert Adam().bias_correction and Adam(convention="keras").bias_correction
    assert not AdamW(convention="mlx").bias_correction
    assert AdaGrad(convention="mlx").initial_accumulator_value == 0.0


def test_the_first_sgd_step_is_dampened():
    """MLX's buffer starts at 0 and dampens step 1 (torch's takes the gradient itself)."""
    p = {"w": np.array([1.0])}
    g = {"w": np.array([2.0])}
    for conv, want in (("mlx", 1.0 - 0.1 * 0.5 * 2.0), ("torch", 1.0 - 0.1 * 2.0)):
        opt = SGD(0.1, momentum=0.9, dampening=0.5, convention=conv)
        out, _ = opt.update(dict(p), g, opt.init(p))
        assert out["w"][0] == pytest.approx(want, abs=1e-15), conv


def test_a_state_dict_resumes_the_mlx_convention():
    """The state dict keeps convention and bias_correction: loaded into ``Adam()`` the run
    goes on as MLX's."""
    cls, kw, name, mkw, lr, wd = CASES["adam_bias_correction"]
    p0, grads = problem(seed=6)
    ref = mlx_trajectory(name, mkw, lr_array(lr), wd, p0, grads)
    opt = cls(learning_rate=lr, convention="mlx", **kw)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    for g in grads[:10]:
        params, state = opt.update(params, g, state)
    d = json.loads(json.dumps(opt.state_dict(state), default=lambda a: a.tolist()))
    opt = Adam()
    state = opt.load_state_dict(d, params)
    assert (opt.convention, opt.bias_correction) == ("mlx", True)
    for g in grads[10:]:
        params, state = opt.update(params, g, state)
    assert worst([params], ref[-1:]) <= TOL


BAD = [
    (Adam, {"bias_correction": False}, "bias_correction"),
    (Adam, {"bias_correction": "yes", "convention": "mlx"}, "bias_correction"),
    (AdamW, {"bias_correction": False, "convention": "optax"}, "bias_correction"),
    (Adam, {"amsgrad": True, "convention": "mlx"}, "amsgrad"),
    (Adam, {"epsilon": -1e-8, "convention": "mlx"}, "epsilon"),
    (RMSProp, {"momentum": 0.9, "convention": "mlx"}, "momentum"),
    (RMSProp, {"centered": True, "convention": "mlx"}, "centered"),
    (RMSProp, {"decay": 1.5, "convention": "mlx"}, "decay"),
    (AdaGrad, {"lr_decay": 0.1, "convention": "mlx"}, "lr_decay"),
    (AdaGrad, {"initial_accumulator_value": 0.1, "convention": "mlx"},
     "initial_accumulator_value"),
    (SGD, {"nesterov": True, "convention": "mlx"}, "nesterov"),
    (SGD, {"momentum": 0.9, "nesterov": True, "dampening": 0.1, "convention": "mlx"}, "nesterov"),
    (Lion, {"mode": "smooth", "convention": "mlx"}, "mode"),
    (Lion, {"convention": "keras"}, "convention"),
    (Adadelta, {"rho": -0.1, "convention": "mlx"}, "rho"),
    (Adamax, {"beta2": 1.0, "convention": "mlx"}, "beta2"),
    (NAdam, {"convention": "mlx"}, "convention"),  # (no MLX NAdam: refused by name)
]


@pytest.mark.parametrize("cls, kw, name", BAD, ids=[f"{c.__name__}-{n}" for c, _, n in BAD])
def test_bad_arguments_name_themselves(cls, kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        cls(**kw)


def test_a_refused_update_changes_nothing():
    """A bad gradient (wrong shape) on an MLX-convention optimizer mid-run: the error names
    the key, and params and state are as before."""
    opt = Adam(0.01, convention="mlx", bias_correction=True)
    p0, grads = problem(seed=7, steps=3)
    params = {k: v.copy() for k, v in p0.items()}
    state = opt.init(params)
    params, state = opt.update(params, grads[0], state)
    before = (json.dumps(opt.state_dict(state), default=lambda a: a.tolist()),
              {k: v.copy() for k, v in params.items()})
    with pytest.raises(Exception, match="'w'"):
        opt.update(params, {**grads[1], "w": np.zeros((4, 3))}, state)
    assert json.dumps(opt.state_dict(state), default=lambda a: a.tolist()) == before[0]
    assert all(np.array_equal(params[k], before[1][k]) for k in params)
