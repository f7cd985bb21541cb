"""make_train_step: equal to the separate evaluate + update (bit for bit on NumPy and torch,
to float32 rounding on JAX's one-program step; for Muon over its first two steps, see
``TOLERANCE``) for every optimizer of the catalog (LBFGS: ``update`` with the model as its
closure, on every backend), and the conversions between the JAX step's state and the
optimizer's."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import mithril as ml
import mithril.utils.optimizers as catalog
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.cli.networks import mlp_spec
from mithril.utils.optimizers import LBFGS, Adam, Optimizer, OptimizerState
from mithril.utils.training import TrainStep, make_train_step

STEPS = 4
BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def optimizers() -> dict:
    """One of every optimizer of the catalog (``test_every_optimizer_is_here``), with settings
    beyond the defaults where they change the step's program (groups, clipping, EMA,
    Nesterov, a line search)."""
    o = catalog
    return {
        "adam": lambda: o.Adam(learning_rate=1e-2),
        "adam_amsgrad_ema": lambda: o.Adam(learning_rate=1e-2, amsgrad=True, ema_decay=0.9),
        "sgd_momentum": lambda: o.SGD(learning_rate=0.05, momentum=0.9),
        "sgd_nesterov": lambda: o.SGD(learning_rate=0.05, momentum=0.9, nesterov=True,
                                      weight_decay=1e-3),
        "adamw_groups_clip": lambda: o.AdamW(
            learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5,
            param_groups=[{"params": lambda n: "bias" in n or n.endswith("b"),
                           "weight_decay": 0.0, "lr_scale": 0.5}]),
        "adam_adaptive_clip": lambda: o.Adam(learning_rate=1e-2, adaptive_clip=0.01,
                                             clip_tensor_norm=1.0),
        "adopt": lambda: o.ADOPT(learning_rate=1e-2),
        "asgd": lambda: o.ASGD(learning_rate=1e-2, t0=2),
        "ademamix": lambda: o.AdEMAMix(learning_rate=1e-2),
        "adabelief": lambda: o.AdaBelief(learning_rate=1e-2),
        "adagrad": lambda: o.AdaGrad(learning_rate=1e-2),
        "adadelta": lambda: o.Adadelta(learning_rate=1.0),
        "adamax": lambda: o.Adamax(learning_rate=1e-2),
        "adan": lambda: o.Adan(learning_rate=1e-2),
        "ftrl": lambda: o.Ftrl(learning_rate=0.1, l1_regularization_strength=1e-3),
        "lamb": lambda: o.LAMB(learning_rate=1e-2, weight_decay=0.01),
        "lars": lambda: o.LARS(learning_rate=0.1),
        "lion": lambda: o.Lion(learning_rate=1e-3),
        "sign_sgd": lambda: o.SignSGD(learning_rate=1e-3),
        "signum": lambda: o.Signum(learning_rate=1e-3, weight_decay=1e-3),
        "optimistic_gd": lambda: o.OptimisticGD(learning_rate=1e-2),
        "optimistic_adam": lambda: o.OptimisticAdam(learning_rate=1e-2),
        "adamaxw": lambda: o.Adamax(learning_rate=1e-2, weight_decay=1e-2,
                                    decoupled_weight_decay=True),
        "simplified_ademamix": lambda: o.SimplifiedAdEMAMix(learning_rate=1e-3, alpha=2.0),
        "cocob": lambda: o.COCOB(),
        "fromage": lambda: o.Fromage(learning_rate=1e-2),
        "dog": lambda: o.DoG(),
        "dowg": lambda: o.DoWG(),
        "lookahead": lambda: o.Lookahead(o.Adam(learning_rate=1e-2), sync_period=2),
        "lookahead_groups": lambda: o.Lookahead(o.AdamW(  # (the inner's groups)
            learning_rate=1e-2, weight_decay=0.1,
            param_groups=[{"params": lambda n: "bias" in n or n.endswith("b"),
                           "weight_decay": 0.0, "lr_scale": 0.5}]), sync_period=2),
        "nadam": lambda: o.NAdam(learning_rate=1e-2),
        "novograd": lambda: o.Novograd(learning_rate=1e-2),
        "radam": lambda: o.RAdam(learning_rate=1e-2),
        "prodigy": lambda: o.Prodigy(),
        "rmsprop_centered": lambda: o.RMSProp(learning_rate=1e-2, momentum=0.9, centered=True),
        "rprop": lambda: o.Rprop(),
        "schedule_free_adamw": lambda: o.ScheduleFreeAdamW(learning_rate=1e-2),
        "schedule_free_sgd": lambda: o.ScheduleFreeSGD(learning_rate=0.1),
        "yogi": lambda: o.Yogi(learning_rate=1e-2),
        "acprop": lambda: o.AcProp(learning_rate=1e-2, weight_decay=1e-2),
        "dadapt_adamw": lambda: o.DAdaptAdamW(estim_lr0=1e-3),
        "sm3": lambda: o.SM3(learning_rate=1e-2),
        "sophia": lambda: o.Sophia(learning_rate=1e-2, update_interval=2),
        "noisy_sgd": lambda: o.NoisySGD(learning_rate=0.05, eta=0.1, seed=3),
        "madgrad": lambda: o.MADGRAD(learning_rate=1e-2, weight_decay=1e-3),
        "adafactor": lambda: o.Adafactor(learning_rate=1e-2),
        "muon": lambda: o.Muon(learning_rate=1e-2),
        "lbfgs": lambda: o.LBFGS(learning_rate=0.5, max_iter=4, line_search_fn="strong_wolfe"),
        "sam": lambda: o.SAM(o.Adam(learning_rate=1e-2), rho=0.05, adaptive=True),
        "mechanize": lambda: o.Mechanize(o.Adam(learning_rate=1.0), s_init=1e-3),
        "schedule_free": lambda: o.ScheduleFree(o.Adam(learning_rate=1e-2, beta1=0.0)),
        # the loss-aware: update(..., loss=) with the step's loss
        "polyak_sgd": lambda: o.PolyakSGD(max_learning_rate=0.5, f_min=0.0),
        "momo": lambda: o.Momo(learning_rate=0.5),
        "momo_adam": lambda: o.MomoAdam(learning_rate=1e-2),
        # rank 2: the last layer's 12x4 gradient has rank <= 3, a 4th singular vector would
        # be rounding noise that Adam scales to a whole step
        "galore": lambda: o.GaLore(learning_rate=1e-2, rank=2, update_proj_gap=2),
    }


#: closure-driven optimizers: ``update`` with the model as its closure, the separate calls
CLOSURE = (LBFGS, catalog.SAM)


def test_every_optimizer_is_here() -> None:
    """A new optimizer of the catalog joins ``optimizers()`` (and so every test above); those
    taking per-example gradients get them from the step (tests/test_train_step_private.py)."""
    exported = {getattr(catalog, n) for n in catalog.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, Optimizer)
               and c is not Optimizer}
    per_example = {c for c in classes if getattr(c, "takes_per_example_gradients", False)}
    assert per_example == {catalog.DPSGD, catalog.DifferentiallyPrivate}
    assert classes - per_example == {type(make()) for make in optimizers().values()}
    spec = mlp_spec(8, 4, [16])
    compiled = ml.compile(spec.model, BACKENDS["numpy"](dtype="float32"), shapes=spec.shapes)
    assert make_train_step(compiled, catalog.DPSGD(), loss="loss")._per_example


def problem(backend_name: str, seed: int = 0) -> tuple:
    spec = mlp_spec(8, 4, [16, 12])
    be = BACKENDS[backend_name](dtype="float32", seed=seed)
    compiled = ml.compile(spec.model, be, shapes=spec.shapes)
    rng = np.random.default_rng(seed)
    batches = [{"input": be.array(rng.standard_normal((32, 8)).astype(np.float32)),
                "target": be.array(rng.integers(0, 4, 32), be.int_dtype)}
               for _ in range(STEPS)]
    return compiled, be, batches


@functools.cache
def jax_problem() -> tuple:
    """``problem("jax")`` once for the module: its evaluate is jitted once, not in every test
    (JAX arrays are immutable, and the step donates none of the user's)."""
    return problem("jax")


def host(be, params: dict) -> dict:
    return {k: np.array(be.to_numpy(v)) for k, v in params.items()}


def separate(compiled, opt, batches: list) -> tuple[dict, list]:
    params = compiled.get_parameters()
    state = opt.init(params)
    losses = []
    for data in batches:
        out, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
        if isinstance(opt, CLOSURE):  # the user's closure: the loss and gradients at any params
            def closure(p, data=data):
                o, g = compiled.evaluate(p, data, output_gradients={"loss": 1.0})
                return o["loss"], g
            params, state = opt.update(params, grads, state, closure=closure, loss=out["loss"])
        elif getattr(opt, "needs_loss", False):
            params, state = opt.update(params, grads, state, loss=out["loss"])
        else:
            params, state = opt.update(params, grads, state)
        losses.append(float(compiled.backend.to_numpy(out["loss"])))
    return host(compiled.backend, params), losses


def fused(compiled, opt, batches: list, use_init: bool = True) -> tuple[dict, list, object]:
    params = compiled.get_parameters()
    step = make_train_step(compiled, opt, loss="loss")
    state = step.init(params) if use_init else opt.init(params)
    losses = []
    for data in batches:
        params, state, out = step(params, state, data)
        losses.append(float(compiled.backend.to_numpy(out["loss"])))
    return host(compiled.backend, params), losses, (step, state, params)


@pytest.mark.parametrize("name", list(optimizers()))
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bit_for_bit_numpy_torch(backend: str, name: str) -> None:
    compiled, be, batches = problem(backend)
    want, want_losses = separate(compiled, optimizers()[name](), batches)
    compiled2, _, _ = problem(backend)
    got, losses, _ = fused(compiled2, optimizers()[name](), batches)
    assert losses == want_losses
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


#: Muon's Newton-Schulz iteration multiplies a float32 rounding difference in its matrix
#: products (XLA orders a jitted program's sums unlike its op-by-op calls) by up to
#: a^5 ≈ 490 (a = 3.4445) along small singular directions, and the next steps' momentum
#: carries it on: on an AVX2 CPU the ~6e-8 differences of two steps grew to ~1e-4 at the
#: third. Its first two steps are held to 1e-6, like every other optimizer's four.
TOLERANCE = {"muon": 5e-4}


def _one_program_matches(name: str, steps: int, tol: float) -> tuple:
    """The JAX one-program step against evaluate + update over ``steps`` batches, to
    ``tol``; the step and its state."""
    compiled, be, batches = jax_problem()
    want, want_losses = separate(compiled, optimizers()[name](), batches[:steps])
    got, losses, (step, state, _) = fused(compiled, optimizers()[name](), batches[:steps])
    np.testing.assert_allclose(losses, want_losses, rtol=tol, atol=tol)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)
    return step, state


#: the default run's share on JAX, one of each way its step is built: elementwise (adam,
#: sgd_momentum's host scalars), an EMA, groups with global clipping, per-tensor clipping,
#: two-pass with reductions (lamb), slots (nadam), state values (schedule_free_adamw), all
#: three (dog); a wrapper (lookahead_groups); per-tensor (adafactor, muon and its tolerance,
#: noisy_sgd's random stream); the loss-aware (momo_adam); the wrappers of a whole update
#: (mechanize, schedule_free); the second gradient (sam); the separate calls (lbfgs). The others repeat these paths: ``-m slow``.
JAX_DEFAULT = ("adam", "sgd_momentum", "adam_amsgrad_ema", "adamw_groups_clip",
               "adam_adaptive_clip", "lamb", "nadam", "schedule_free_adamw", "dog",
               "lookahead_groups", "adafactor", "muon", "noisy_sgd", "momo_adam", "lbfgs", "sam",
               "mechanize", "schedule_free")


@pytest.mark.parametrize("name", [n if n in JAX_DEFAULT else pytest.param(
    n, marks=pytest.mark.slow) for n in optimizers()])
def test_jax_one_program_matches(name: str) -> None:
    """Every optimizer but LBFGS runs as one program (Mechanize and ScheduleFree too:
    :mod:`mithril.interop.optax_outer`; SAM's second gradient a second forward+VJP in it:
    :mod:`mithril.utils.train_step_sam`); LBFGS (a line search of data-dependent length)
    runs the separate calls on JAX too, bit for bit."""
    if isinstance(optimizers()[name](), LBFGS):
        step, state = _one_program_matches(name, STEPS, 0.0)
        assert not step.fused and isinstance(state, OptimizerState) and state.step == STEPS
        if name == "lbfgs":
            assert state.values["func_evals"] > STEPS  # the line search evaluated the model
        return
    step, state = _one_program_matches(name, STEPS, TOLERANCE.get(name, 1e-6))
    if name in TOLERANCE:  # the first steps, before the iteration's amplification compounds
        _one_program_matches(name, 2, 1e-6)
    assert step.fused and int(state.count) == STEPS
    assert step.rebuilds == 0  # nothing the steps do looks like a hyperparameter change
    assert step.last_grad_norm is None  # not computed unless asked (grad_norm=True)


def test_jax_program_compiles_once() -> None:
    """The first step is given arrays committed to their device, as every later step is (the
    program's outputs): one compiled program, not a second one at step 2."""
    compiled, _, batches = problem("jax")
    _, _, (step, _, _) = fused(compiled, Adam(learning_rate=1e-2), batches)
    assert step._jitted._cache_size() == 1


def test_jax_grad_norm_on_request() -> None:
    """``grad_norm=True``: the program also returns the global norm of the step's gradients,
    that of ``evaluate``'s gradients at the same params."""
    compiled, be, batches = problem("jax")
    params = compiled.get_parameters()
    step = make_train_step(compiled, Adam(learning_rate=1e-2), loss="loss", grad_norm=True)
    state = step.init(params)
    for data in batches[:3]:
        host_params = {k: np.array(be.to_numpy(v)) for k, v in params.items()}
        _, grads = compiled.evaluate({k: be.array(v) for k, v in host_params.items()}, data,
                                     output_gradients={"loss": 1.0})
        want = np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64))))
                           for g in grads.values()))
        params, state, _ = step(params, state, data)
        assert float(step.last_grad_norm) == pytest.approx(want, rel=1e-5)


def test_jax_with_optimizer_state_is_the_separate_calls() -> None:
    compiled, be, batches = problem("jax")
    want, want_losses = separate(compiled, Adam(learning_rate=1e-2), batches)
    compiled2, _, _ = problem("jax")
    got, losses, (_, state, _) = fused(compiled2, Adam(learning_rate=1e-2), batches,
                                       use_init=False)
    assert losses == want_losses
    assert state.step == STEPS
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("name", ["adam", "lamb", "adafactor"])
def test_jax_state_round_trips(name: str) -> None:
    """Two fused steps, converted to an OptimizerState, two more with optimizer.update: the
    same as four separate steps; and back again into the fused step."""
    compiled, be, batches = problem("jax")
    want, _ = separate(compiled, optimizers()[name](), batches)
    compiled2, _, _ = problem("jax")
    opt = optimizers()[name]()
    step = make_train_step(compiled2, opt, loss="loss")
    params = compiled2.get_parameters()
    fstate = step.init(params)
    for data in batches[:2]:
        params, fstate, _ = step(params, fstate, data)
    state = step.to_optimizer_state(fstate, params)
    assert state.step == 2
    data = batches[2]
    _, grads = compiled2.evaluate(params, data, output_gradients={"loss": 1.0})
    params, state = opt.update(params, grads, state)
    fstate = step.from_optimizer_state(state)
    assert int(fstate.count) == 3
    params, fstate, _ = step(params, fstate, batches[3])
    assert step.rebuilds == 0  # (optimizer.update in between changes no hyperparameter)
    got = host(be, params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=2e-6, err_msg=k)


def test_learning_rate_changes_are_seen() -> None:
    for backend in ("numpy", "jax"):
        compiled, be, batches = problem(backend)
        opt = Adam(learning_rate=1e-2)
        params = compiled.get_parameters()
        state = opt.init(params)
        for i, data in enumerate(batches):
            opt.set_learning_rate(1e-2 / (i + 1))
            _, grads = compiled.evaluate(params, data, output_gradients={"loss": 1.0})
            params, state = opt.update(params, grads, state)
        want = host(be, params)
        compiled2, _, _ = problem(backend)
        opt2 = Adam(learning_rate=1e-2)
        step = make_train_step(compiled2, opt2, loss="loss")
        params = compiled2.get_parameters()
        state = step.init(params)
        for i, data in enumerate(batches):
            opt2.set_learning_rate(1e-2 / (i + 1))
            params, state, _ = step(params, state, data)
        got = host(be, params)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_users_params_are_not_donated() -> None:
    compiled, be, batches = problem("jax")
    params = compiled.get_parameters()
    before = host(be, params)
    step = make_train_step(compiled, Adam(), loss="loss")
    state = step.init(params)
    step(params, state, batches[0])
    assert all(np.array_equal(np.asarray(params[k]), before[k]) for k in params)


def test_bad_loss_and_optimizer() -> None:
    compiled, _, _ = problem("numpy")
    with pytest.raises(ml.KeyMismatchError, match="final_cost"):
        make_train_step(compiled, Adam())
    with pytest.raises(ml.ShapeError, match="scalar"):
        make_train_step(compiled, Adam(), loss="logits")
    with pytest.raises(TypeError, match="mithril optimizer"):
        make_train_step(compiled, object(), loss="loss")
    step = make_train_step(compiled, Adam(), loss="loss")
    assert isinstance(step, TrainStep)
    # what the step's program and cotangents were made from cannot change under it
    for name, value in [("loss", "final_cost"), ("optimizer", Adam()), ("grad_norm", True),
                        ("compiled", compiled)]:
        before = getattr(step, name)
        with pytest.raises(AttributeError, match=f"TrainStep.{name} is fixed when the step is "
                                                 f"made .*make_train_step"):
            setattr(step, name, value)
        assert getattr(step, name) is before


def test_bad_data_is_refused_as_evaluate_refuses_it() -> None:
    for backend in ("numpy", "jax"):
        compiled, be, batches = problem(backend)
        step = make_train_step(compiled, Adam(), loss="loss")
        params = compiled.get_parameters()
        state = step.init(params)
        params, state, _ = step(params, state, batches[0])
        bad = {"input": batches[0]["input"], "target": be.array(np.full(32, 9), be.int_dtype)}
        with pytest.raises(ValueError):
            step(params, state, bad)
        with pytest.raises(ml.ShapeError):
            step(params, state, {"input": be.array(np.zeros((32, 7), np.float32)),
                                 "target": batches[0]["target"]})


def test_separate_step_reads_the_norm_when_asked() -> None:
    """With an ``OptimizerState`` on the jitted JAX engine, a ``"propagate"`` step's norm
    stays on the device until ``step.last_grad_norm`` is read (not at every step), and it
    is then the separate calls' norm."""
    from optimizer_parity import engine_of

    with engine_of("jax-jit"):
        compiled, be, batches = problem("jax")
        opt, ref = Adam(learning_rate=1e-2), Adam(learning_rate=1e-2)
        step = make_train_step(compiled, opt, loss="loss")
        params = compiled.get_parameters()
        state = opt.init(params)
        ref_params = {k: np.array(be.to_numpy(v)) for k, v in params.items()}
        ref_state = ref.init(ref_params)
        for data in batches:
            params, state, _ = step(params, state, data)
            assert state._report is not None  # nothing read back by the step
            _, g = compiled.evaluate({k: be.array(v) for k, v in ref_params.items()}, data,
                                     output_gradients={"loss": 1.0})
            ref_params, ref_state = ref.update(
                ref_params, {k: np.array(be.to_numpy(v)) for k, v in g.items()}, ref_state)
            assert step.last_grad_norm == pytest.approx(ref_state.last_grad_norm, rel=1e-5)
            assert state._report is None


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_accumulating_wrapper_runs_the_separate_calls(backend: str) -> None:
    """Accumulate (the optimizer contract without being an Optimizer): the step runs
    evaluate + its update on every backend, JAX included (not one program), bit for bit;
    the wrapped optimizer stepped every second call."""
    from mithril.utils.accumulation import Accumulate

    def make() -> Accumulate:
        return Accumulate(Adam(learning_rate=1e-2), 2)

    compiled, be, batches = problem(backend)
    want, want_losses = separate(compiled, make(), batches)
    compiled2, _, _ = problem(backend)
    got, losses, (step, state, _) = fused(compiled2, make(), batches)
    assert not step.fused and step.from_optimizer_state(state) is state
    assert step.to_optimizer_state(state, compiled2.get_parameters()) is state
    assert (state.step, state.micro_step) == (STEPS // 2, 0)
    assert losses == want_losses
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(TypeError, match="adopt"):
        step.init(compiled2.get_parameters(), adopt=True)


def test_jax_with_nonfinite_raise_runs_the_separate_calls() -> None:
    """A program cannot raise: with ``nonfinite="raise"`` the JAX step is the separate calls
    (bit for bit), and a non-finite gradient raises, changing nothing."""
    def make() -> Adam:
        return Adam(learning_rate=1e-2, nonfinite="raise")

    compiled, be, batches = problem("jax")
    want, want_losses = separate(compiled, make(), batches)
    compiled2, _, _ = problem("jax")
    got, losses, (step, state, params) = fused(compiled2, make(), batches)
    assert not step.fused and isinstance(state, OptimizerState)
    assert losses == want_losses
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    nan = {"input": be.array(np.full((32, 8), np.nan, np.float32)),
           "target": batches[0]["target"]}
    with pytest.raises(FloatingPointError):
        step(params, state, nan)
    assert state.step == STEPS and all(np.array_equal(host(be, params)[k], got[k]) for k in got)
