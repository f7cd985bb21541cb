"""make_train_step on a model that keeps state (BatchNorm's running statistics) and draws
random masks (Dropout): ``step(params, opt_state, data, state=state)`` equals the separate
``evaluate(..., state=state)`` + ``update`` on every backend (bit for bit on NumPy and
torch, to float32 rounding on JAX's one program), the model's random step included; LBFGS
there too (each closure evaluation a training-mode forward, as in a torch closure), and a
refused LBFGS step leaves the random step where it was. Also: ``from_optimizer_state`` on
NumPy and torch gives back the state the step takes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.models import Mean, SquaredError, TrainModel
from mithril.utils.optimizers import LBFGS, SGD, Adam
from mithril.utils.training import make_train_step

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}
#: SGD and Adam (no bias before the BatchNorm: its gradient would be rounding noise, which
#: Adam scales up to whole steps), and LBFGS with the model as its closure
OPTIMIZERS = {"sgd": lambda: SGD(learning_rate=0.05, momentum=0.9),
              "adam": lambda: Adam(learning_rate=1e-2),
              "lbfgs": lambda: LBFGS(learning_rate=0.5, max_iter=3)}
STEPS = 4


def compiled_model(backend: str) -> Any:
    m = ml.Model()
    m += ml.Linear(16, use_bias=False)(input="input")
    m += ml.BatchNorm1D(16)
    m += ml.Relu()
    m += ml.Dropout(0.25)
    m += ml.Linear(2)
    train = TrainModel(m)
    train.add_loss(SquaredError(), reduce_steps=[Mean()], input="output", target="target")
    be = BACKENDS[backend](dtype="float32", seed=3)
    return ml.compile(train, be, shapes={"input": [None, 5]})


def batches(be: Any) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input": be.array(rng.standard_normal((12, 5)).astype(np.float32)),
             "target": be.array(rng.standard_normal((12, 2)).astype(np.float32))}
            for _ in range(STEPS)]


def host(be: Any, arrays: dict) -> dict[str, np.ndarray]:
    return {k: np.array(be.to_numpy(v)) for k, v in arrays.items()}


def separate(backend: str, opt: Any) -> tuple:
    c = compiled_model(backend)
    be = c.backend
    params, mstate, losses = c.get_parameters(), c.initial_state_dict, []
    state = opt.init(params)
    for data in batches(be):
        out, grads, mstate = c.evaluate(params, data, output_gradients=True, state=mstate)
        if isinstance(opt, LBFGS):
            latest = [mstate]

            def closure(p: dict, data: dict = data, latest: list = latest) -> tuple:
                o, g, latest[0] = c.evaluate(p, data, output_gradients=True, state=latest[0])
                return o["final_cost"], g

            params, state = opt.update(params, grads, state, closure=closure,
                                       loss=out["final_cost"])
            mstate = latest[0]
        else:
            params, state = opt.update(params, grads, state)
        losses.append(float(be.to_numpy(out["final_cost"])))
    return host(be, params), host(be, mstate), losses, c.step


def fused(backend: str, opt: Any) -> tuple:
    c = compiled_model(backend)
    be = c.backend
    step = make_train_step(c, opt)
    params, mstate, losses = c.get_parameters(), c.initial_state_dict, []
    state = step.init(params)
    for data in batches(be):
        params, state, out, mstate = step(params, state, data, state=mstate)
        losses.append(float(be.to_numpy(out["final_cost"])))
    return host(be, params), host(be, mstate), losses, c.step


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_model_state_and_masks_as_the_separate_calls(backend: str, opt_name: str) -> None:
    want = separate(backend, OPTIMIZERS[opt_name]())
    got = fused(backend, OPTIMIZERS[opt_name]())
    exact = backend != "jax" or opt_name == "lbfgs"  # (JAX's LBFGS: the separate calls)
    tol = 0.0 if exact else 1e-6
    assert got[3] == want[3] > STEPS - 1  # the random step: one per training evaluation
    np.testing.assert_allclose(got[2], want[2], rtol=tol, atol=tol)
    for i, what in ((0, "params"), (1, "model state")):
        assert got[i].keys() == want[i].keys()
        for k in want[i]:
            np.testing.assert_allclose(got[i][k], want[i][k], rtol=tol, atol=tol,
                                       err_msg=f"{what} {k}")
    assert int(np.ravel(got[1]["batch_norm1_d.num_batches_tracked"])[0]) == want[3]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_refused_lbfgs_step_leaves_the_random_step(backend: str) -> None:
    """Inputs that make the loss NaN: the closure's first evaluation ran (the random step
    moved), then LBFGS refused the non-finite loss; the step changes nothing."""
    c = compiled_model(backend)
    be = c.backend
    opt = LBFGS(learning_rate=0.5, max_iter=3)
    step = make_train_step(c, opt)
    data = batches(be)
    params, mstate = c.get_parameters(), c.initial_state_dict
    state = step.init(params)
    params, state, _, mstate = step(params, state, data[0], state=mstate)

    def snapshot() -> dict:
        arrays = {**{f"p:{k}": v for k, v in params.items()},
                  **{f"s:{k}": v for k, v in state.slots.items()},
                  **{f"m:{k}": v for k, v in mstate.items()}}
        return {"random step": c.step, "values": dict(state.values), "step": state.step,
                **host(be, arrays)}

    before = snapshot()
    nan = {"input": be.array(np.full((12, 5), np.nan, np.float32)), "target": data[1]["target"]}
    with pytest.raises(FloatingPointError, match="non-finite"):
        step(params, state, nan, state=mstate)
    after = snapshot()
    assert after.keys() == before.keys()
    assert [k for k in before if not np.array_equal(before[k], after[k])] == []
    params, state, _, mstate = step(params, state, data[1], state=mstate)  # and goes on
    evaluations = state.values["func_evals"] - before["values"]["func_evals"]
    assert c.step == before["random step"] + evaluations and state.step == 2


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_from_optimizer_state_is_the_state_itself_where_nothing_is_fused(backend: str) -> None:
    """A checkpointed OptimizerState resumes in the step on every backend (on JAX it becomes
    the program's OptaxState); a state of other params is refused first."""
    c = compiled_model(backend)
    step = make_train_step(c, Adam(learning_rate=1e-2))
    params = c.get_parameters()
    state = Adam(learning_rate=1e-2).init(params)
    assert not step.fused and step.from_optimizer_state(state) is state
    other = Adam().init({k: v for k, v in params.items() if not k.startswith("linear_1")})
    with pytest.raises(ml.KeyMismatchError, match="linear_1"):
        step.from_optimizer_state(other)
    with pytest.raises(ValueError, match="SGD"):
        step.from_optimizer_state(SGD().init(params))


def test_a_checkpoint_resumes_the_jax_step_bit_for_bit(tmp_path) -> None:
    """Two steps, a checkpoint (the step's state converted), a fresh process's objects made
    with other hyperparameters, the checkpoint loaded (restoring them: the program is built
    with the loaded ones) and two more steps: the same bits as four steps in one go. The
    step's own state is refused by save_checkpoint, naming the conversion."""
    from mithril.utils.checkpoint import load_checkpoint, save_checkpoint

    def setup(beta1: float) -> tuple:
        c = compiled_model("jax")
        opt = Adam(learning_rate=1e-2, beta1=beta1)
        return c, opt, make_train_step(c, opt)

    c, opt, step = setup(0.9)
    data = batches(c.backend)
    params, mstate = c.get_parameters(), c.initial_state_dict
    state = step.init(params)
    for d in data:
        params, state, _, mstate = step(params, state, d, state=mstate)
    want = host(c.backend, params)

    c, opt, step = setup(0.9)
    params, mstate = c.get_parameters(), c.initial_state_dict
    state = step.init(params)
    for d in data[:2]:
        params, state, _, mstate = step(params, state, d, state=mstate)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(TypeError, match=r"step\.to_optimizer_state"):
        save_checkpoint(path, params, opt, state)
    save_checkpoint(path, params, opt, step.to_optimizer_state(state, params),
                    extra={"model_state": {k: np.asarray(v).tolist() for k, v in mstate.items()},
                           "random_step": c.step})

    c, opt, step = setup(0.5)  # restored to 0.9 by the load
    step.init(c.get_parameters())  # (its program is made with 0.5: the load changes that)
    ckpt = load_checkpoint(path, params_template=c.get_parameters(), optimizer=opt)
    assert opt.beta1 == 0.9
    params, state = ckpt["params"], step.from_optimizer_state(ckpt["state"])
    mstate = {k: c.backend.array(np.asarray(v, np.asarray(mstate[k]).dtype))
              for k, v in ckpt["extra"]["model_state"].items()}
    c.step = ckpt["extra"]["random_step"]
    for d in data[2:]:
        params, state, _, mstate = step(params, state, d, state=mstate)
    got = host(c.backend, params)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert step.rebuilds == 0  # (loaded before the first call: baked in, nothing compiled twice)
