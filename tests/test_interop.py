"""The guide's "Backend-Specific Optimizers" listings, as written: Optax on JaxBackend and
torch.optim on TorchBackend, checked against the same optimizers run natively on hand-written
versions of the network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.optim as optim

import mithril as ml
from mithril.backends import JaxBackend, TorchBackend

NAMES = ["linear_0.weight", "linear_0.bias", "linear_1.weight", "linear_1.bias",
         "linear_2.weight", "linear_2.bias"]


def guide_model() -> ml.Model:
    model = ml.MLP(["tanh", "tanh", None], [32, 32, 10])
    model.set_shapes(input=[None, 784])
    return model


def net(xp, p, x):
    """The same network written by hand (weights in torch layout: y = x·Wᵀ + b)."""
    h = xp.tanh(x @ p["linear_0.weight"].T + p["linear_0.bias"])
    h = xp.tanh(h @ p["linear_1.weight"].T + p["linear_1.bias"])
    return h @ p["linear_2.weight"].T + p["linear_2.bias"]


# -- Optax ---------------------------------------------------------------------------------------
def native_optax(tx, params0, x, targets, num_epochs, jit=False):
    """Optax on the hand-written JAX network with jax.vjp gradients of the same loss."""
    params = {k: jnp.array(v) for k, v in params0.items()}
    opt_state = tx.init(params)

    def step(params, opt_state):
        out, pull = jax.vjp(lambda p: net(jnp, p, x), params)
        grads = pull(2 * (out - targets))[0]
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step) if jit else step
    for _ in range(num_epochs):
        params, opt_state = step(params, opt_state)
    return params


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    """float32 agreement; ``atol`` is relative to each array's largest entry (jit-fused and
    eager float32 sums round differently)."""
    assert a.keys() == b.keys()
    for k in a:
        want = np.asarray(b[k])
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(a[k]), want, rtol=rtol, atol=atol * scale,
                                   err_msg=k)


def test_guide_optax_listing_as_written():
    # Create a JAX backend
    backend = JaxBackend()

    # Create and compile a model
    model = guide_model()
    compiled_model = ml.compile(model, backend)

    # Initialize parameters
    params = compiled_model.get_parameters()
    assert list(params) == NAMES
    params0 = dict(params)
    inputs = {"input": backend.randn(32, 784)}
    targets = backend.randn(32, 10)
    num_epochs = 5

    # Create an Optax optimizer
    optax_optimizer = optax.adam(learning_rate=0.001)
    opt_state = optax_optimizer.init(params)

    # Training loop
    for _epoch in range(num_epochs):
        # Forward pass
        outputs = compiled_model.evaluate(params, inputs)

        # Compute loss gradients
        loss_gradients = {"output": 2 * (outputs["output"] - targets)}

        # Backward pass
        _, gradients = compiled_model.evaluate(
            params,
            inputs,
            output_gradients=loss_gradients
        )

        # Update parameters using Optax
        updates, opt_state = optax_optimizer.update(gradients, opt_state)
        params = optax.apply_updates(params, updates)

    assert all(isinstance(v, jax.Array) and v.dtype == jnp.float32 for v in params.values())
    want = native_optax(optax.adam(learning_rate=0.001), params0, inputs["input"], targets,
                        num_epochs)
    assert_trees_close(params, want)
    assert not np.allclose(np.asarray(params["linear_2.weight"]), np.asarray(params0["linear_2.weight"]))
    # the optimizer state is optax's own (count, mu, nu), keyed like the parameters
    assert int(opt_state[0].count) == num_epochs and opt_state[0].mu.keys() == params.keys()


@pytest.fixture(scope="module")
def jax_compiled():
    """One compiled JAX model for the tests below (its jitted evaluate compiles once)."""
    return ml.compile(guide_model(), JaxBackend())


def fresh_params(compiled, seed):
    compiled.backend.set_seed(seed)
    return compiled.randomize_params()


def test_optax_gradients_equal_hand_written_jax_vjp(jax_compiled):
    compiled, backend = jax_compiled, jax_compiled.backend
    params = fresh_params(compiled, 4)
    x, t = backend.randn(16, 784), backend.randn(16, 10)
    out, grads = compiled.evaluate(params, {"input": x},
                                   output_gradients={"output": 2 * (net(jnp, params, x) - t)})
    ref_out, pull = jax.vjp(lambda p: net(jnp, p, x), params)
    assert_trees_close({"output": out["output"]}, {"output": ref_out})
    assert_trees_close(grads, pull(2 * (ref_out - t))[0])


def test_optax_chain_with_clipping_and_apply_updates_under_jit(jax_compiled):
    compiled, backend = jax_compiled, jax_compiled.backend
    params = fresh_params(compiled, 1)
    params0 = dict(params)
    inputs = {"input": backend.randn(32, 784)}
    targets = backend.randn(32, 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))

    @jax.jit
    def apply(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    eager_params, eager_state = dict(params), tx.init(params)
    jit_params, jit_state = dict(params), tx.init(params)
    norms = []
    for _ in range(4):
        for which in ("eager", "jit"):
            p = eager_params if which == "eager" else jit_params
            out = compiled.evaluate(p, inputs)
            _, grads = compiled.evaluate(p, inputs,
                                         output_gradients={"output": 2 * (out["output"] - targets)})
            if which == "eager":
                norms.append(float(optax.tree.norm(grads)))
                updates, eager_state = tx.update(grads, eager_state, p)
                eager_params = optax.apply_updates(p, updates)
            else:
                jit_params, jit_state = apply(p, grads, jit_state)
    assert min(norms) > 1.0  # the clipping is active
    want = native_optax(tx, params0, inputs["input"], targets, 4, jit=True)
    assert_trees_close(eager_params, want)
    assert_trees_close(jit_params, want)


# -- PyTorch -------------------------------------------------------------------------------------
def native_torch(params0, x, targets, num_epochs, lr=0.001, step_lr=None):
    """torch.optim.Adam on the hand-written torch network with autograd gradients."""
    leaves = [params0[k].detach().clone().requires_grad_(True) for k in NAMES]
    opt = optim.Adam([{"params": leaves}], lr=lr)
    sched = optim.lr_scheduler.StepLR(opt, **step_lr) if step_lr else None
    lrs = []
    for _ in range(num_epochs):
        opt.zero_grad()
        out = net(torch, dict(zip(NAMES, leaves, strict=True)), x)
        out.backward(2 * (out.detach() - targets))
        opt.step()
        if sched:
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
    return dict(zip(NAMES, [v.detach() for v in leaves], strict=True)), lrs


def test_guide_pytorch_listing_as_written():
    # Create a PyTorch backend
    backend = TorchBackend()

    # Create and compile a model
    model = guide_model()
    compiled_model = ml.compile(model, backend)

    # Initialize parameters
    params = compiled_model.get_parameters()
    params0 = {k: v.clone() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    inputs = {"input": backend.randn(32, 784)}
    targets = backend.randn(32, 10)
    num_epochs = 5
    seen = []

    # Create parameter groups for PyTorch optimizer
    param_groups = [{"params": [param for param in params.values()]}]

    # Create a PyTorch optimizer
    torch_optimizer = optim.Adam(param_groups, lr=0.001)

    # Training loop
    for _epoch in range(num_epochs):
        # Zero gradients
        torch_optimizer.zero_grad()

        # Forward pass
        outputs = compiled_model.evaluate(params, inputs)
        seen.append(outputs["output"].clone())

        # Compute loss gradients
        loss_gradients = {"output": 2 * (outputs["output"] - targets)}

        # Backward pass
        _, gradients = compiled_model.evaluate(
            params,
            inputs,
            output_gradients=loss_gradients
        )

        # Set gradients in PyTorch parameters
        for name, grad in gradients.items():
            params[name].grad = backend.to_torch(grad)

        # Update parameters
        torch_optimizer.step()

        # Update Mithril parameters if needed
        # params = {name: param for name, param in params.items()}

    # torch.optim updated the very tensors in `params` in place ...
    assert {k: id(v) for k, v in params.items()} == ids
    assert not torch.equal(params["linear_0.weight"], params0["linear_0.weight"])
    # ... and every evaluate saw the values of the previous step
    for epoch, out in enumerate(seen):
        p_epoch, _ = native_torch(params0, inputs["input"], targets, epoch)
        torch.testing.assert_close(out, net(torch, p_epoch, inputs["input"]), rtol=1e-5, atol=1e-5)
    want, _ = native_torch(params0, inputs["input"], targets, num_epochs)
    for k in NAMES:
        torch.testing.assert_close(params[k], want[k], rtol=1e-5, atol=1e-6)
    after = compiled_model.evaluate(params, inputs)["output"]
    torch.testing.assert_close(after, net(torch, want, inputs["input"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step_size,gamma", [(2, 0.5), (3, 0.1)])
def test_torch_steplr_on_the_guide_optimizer(step_size, gamma):
    backend = TorchBackend(seed=2)
    compiled = ml.compile(guide_model(), backend)
    params = compiled.get_parameters()
    params0 = {k: v.clone() for k, v in params.items()}
    x, targets = backend.randn(16, 784), backend.randn(16, 10)
    opt = optim.Adam([{"params": list(params.values())}], lr=0.01)
    sched = optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    lrs = []
    for _ in range(7):
        opt.zero_grad()
        out = compiled.evaluate(params, {"input": x})
        _, grads = compiled.evaluate(params, {"input": x},
                                     output_gradients={"output": 2 * (out["output"] - targets)})
        for name, g in grads.items():
            params[name].grad = backend.to_torch(g)
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01 * gamma ** (t // step_size) for t in range(1, 8)])
    want, want_lrs = native_torch(params0, x, targets, 7, lr=0.01,
                                  step_lr=dict(step_size=step_size, gamma=gamma))
    assert lrs == want_lrs
    for k in NAMES:
        torch.testing.assert_close(params[k], want[k], rtol=1e-5, atol=1e-6)
