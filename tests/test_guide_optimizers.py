"""The seed optimizer guide's listings, run as written on the NumPy, JAX and torch backends.

Each listing below is a code block of the original optimizers guide (the public API this
package implements; ``docs/optimizers.md`` is the newer, runnable user guide with its own
tests) verbatim up to trailing whitespace, checked by :func:`test_listings_are_verbatim` when
that guide is available (``MITHRIL_SEED_GUIDE`` or the shared seed path). They run in a namespace
prepared like the guide's "Manual Parameter Updates" section: where the guide says
``# ... define your model ...`` the model is ``ml.MLP(["tanh", "tanh", None], [32, 32, 10])``
with ``input=[None, 784]`` (Multi-Optimizer: ``Embedding -> Flatten -> Linear`` on integer
inputs, so parameter names containing "embedding" exist), with ``inputs``, ``targets``, a
small ``num_epochs`` and, where the guide leaves the training step as ``# ...``, one real
training step. Tests assert that the loss falls and the numbers are sane.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.utils.optimizers import Adam, global_norm

BACKENDS = {"numpy": NumpyBackend, "jax": JaxBackend, "torch": TorchBackend}
GUIDE_CANDIDATES = [os.environ.get("MITHRIL_SEED_GUIDE", ""),
                    # ../shared beside the checkout (CI and sessions)
                    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "seed",
                                 "optimizers-guide.md"),
                    "/work/shared/seed/optimizers-guide.md"]

# --- Using Optimizer Classes
USING = '''\
from mithril.utils.optimizers import SGD, Adam, RMSProp

# Create an Adam optimizer
optimizer = Adam(learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8)

# Initialize optimizer state
optimizer_state = optimizer.init(params)

# Training loop
for epoch in range(num_epochs):
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

    # Update parameters and optimizer state
    params, optimizer_state = optimizer.update(params, gradients, optimizer_state)
'''

# --- SGD (Stochastic Gradient Descent)
AVAILABLE_SGD = '''\
from mithril.utils.optimizers import SGD

# Basic SGD
sgd = SGD(learning_rate=0.01)

# SGD with momentum
sgd_momentum = SGD(learning_rate=0.01, momentum=0.9)

# SGD with Nesterov momentum
sgd_nesterov = SGD(learning_rate=0.01, momentum=0.9, nesterov=True)
'''

# --- Adam
AVAILABLE_ADAM = '''\
from mithril.utils.optimizers import Adam

# Adam optimizer
adam = Adam(
    learning_rate=0.001,
    beta1=0.9,       # Exponential decay rate for first moment
    beta2=0.999,     # Exponential decay rate for second moment
    epsilon=1e-8,    # Small constant for numerical stability
    weight_decay=0   # L2 regularization factor
)
'''

# --- RMSProp
AVAILABLE_RMSPROP = '''\
from mithril.utils.optimizers import RMSProp

# RMSProp optimizer
rmsprop = RMSProp(
    learning_rate=0.001,
    decay=0.9,       # Decay rate for moving average of squared gradients
    epsilon=1e-8,    # Small constant for numerical stability
    momentum=0.0     # Optional momentum term
)
'''

# --- AdaGrad
AVAILABLE_ADAGRAD = '''\
from mithril.utils.optimizers import AdaGrad

# AdaGrad optimizer
adagrad = AdaGrad(
    learning_rate=0.01,
    epsilon=1e-8     # Small constant for numerical stability
)
'''

# --- Learning Rate Scheduling
SCHEDULING = '''\
from mithril.utils.optimizers import Adam
from mithril.utils.lr_schedulers import StepLR, CosineAnnealingLR, ReduceLROnPlateau

# Create optimizer
optimizer = Adam(learning_rate=0.001)

# Step learning rate scheduler (reduces LR by a factor every n steps)
scheduler = StepLR(
    optimizer,
    step_size=30,     # Reduce LR every 30 epochs
    gamma=0.1         # Reduce LR by a factor of 0.1
)

# Cosine annealing scheduler (cosine decay with optional restarts)
scheduler = CosineAnnealingLR(
    optimizer,
    T_max=100,        # Cycle length
    eta_min=1e-6      # Minimum learning rate
)

# Reduce LR on plateau scheduler (reduces LR when metric stops improving)
scheduler = ReduceLROnPlateau(
    optimizer,
    mode='min',       # Monitor for minimizing (e.g., loss)
    factor=0.1,       # Reduce LR by a factor of 0.1
    patience=10,      # Wait 10 epochs for improvement before reducing
    threshold=0.001   # Minimum significant improvement
)

# Training loop with scheduler
for epoch in range(num_epochs):
    # Training steps
    # ...

    # Update learning rate
    scheduler.step()  # For StepLR or CosineAnnealingLR

    # Or, for ReduceLROnPlateau, provide validation loss
    # scheduler.step(val_loss)

    # Get current learning rate
    current_lr = optimizer.get_learning_rate()
    print(f"Epoch {epoch}, Learning rate: {current_lr}")
'''

# --- Custom Optimizers
CUSTOM = '''\
from mithril.utils.optimizers import Optimizer

class CustomOptimizer(Optimizer):
    def __init__(self, learning_rate=0.01, custom_param=0.5):
        super().__init__(learning_rate)
        self.custom_param = custom_param

    def init(self, params):
        """Initialize optimizer state."""
        # Create optimizer state for each parameter
        state = {}
        for name, param in params.items():
            state[name] = {
                "momentum": self.backend.zeros_like(param)
            }
        return state

    def update(self, params, gradients, state):
        """Update parameters using gradients."""
        new_params = {}
        new_state = {}

        for name, param in params.items():
            if name in gradients:
                grad = gradients[name]

                # Update momentum
                momentum = state[name]["momentum"]
                momentum = self.custom_param * momentum + grad

                # Update parameter
                new_params[name] = param - self.learning_rate * momentum

                # Store updated state
                new_state[name] = {"momentum": momentum}
            else:
                # Parameter not affected by gradients
                new_params[name] = param
                new_state[name] = state[name]

        return new_params, new_state
'''

# --- Weight Decay (L2 Regularization)
WEIGHT_DECAY = '''\
from mithril.utils.optimizers import Adam

# Adam with weight decay
optimizer = Adam(learning_rate=0.001, weight_decay=1e-4)

# Or apply weight decay manually
for name, param in params.items():
    if "weight" in name:  # Apply only to weights, not biases
        gradients[name] = gradients[name] + weight_decay * param
'''

# --- Gradient Clipping
CLIPPING = '''\
from mithril.utils.optimizers import clip_gradients

# Clip gradients by value
gradients = clip_gradients(gradients, clip_value=1.0)

# Clip gradients by norm
gradients = clip_gradients(gradients, clip_norm=5.0)
'''

# --- Learning Rate Warmup
WARMUP = '''\
from mithril.utils.optimizers import Adam
from mithril.utils.lr_schedulers import LinearWarmupScheduler

# Create optimizer
optimizer = Adam(learning_rate=0.001)

# Add warmup to the learning rate
scheduler = LinearWarmupScheduler(
    optimizer,
    warmup_steps=1000,           # Number of warmup steps
    start_lr=1e-6,               # Starting learning rate
    end_lr=0.001,                # Target learning rate after warmup
    after_scheduler=None         # Optional scheduler to use after warmup
)

# Training loop with warmup
for step in range(total_steps):
    # Training step
    # ...

    # Update learning rate
    scheduler.step()
'''

# --- Multi-Optimizer Training
MULTI = '''\
from mithril.utils.optimizers import Adam, SGD

# Create optimizers for different parameter groups
embedding_optimizer = Adam(learning_rate=0.0001)  # Lower LR for embeddings
main_optimizer = SGD(learning_rate=0.01, momentum=0.9)  # Higher LR with momentum

# Initialize optimizer states
embedding_state = embedding_optimizer.init({
    name: param for name, param in params.items() if "embedding" in name
})
main_state = main_optimizer.init({
    name: param for name, param in params.items() if "embedding" not in name
})

# Training loop with multiple optimizers
for epoch in range(num_epochs):
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

    # Split gradients by parameter group
    embedding_grads = {
        name: grad for name, grad in gradients.items() if "embedding" in name
    }
    main_grads = {
        name: grad for name, grad in gradients.items() if "embedding" not in name
    }

    # Update embeddings
    embedding_params, embedding_state = embedding_optimizer.update(
        {name: params[name] for name in embedding_grads},
        embedding_grads,
        embedding_state
    )

    # Update other parameters
    main_params, main_state = main_optimizer.update(
        {name: params[name] for name in main_grads},
        main_grads,
        main_state
    )

    # Combine parameter updates
    params.update(embedding_params)
    params.update(main_params)
'''

LISTINGS = {
    "Using Optimizer Classes": USING,
    "SGD (Stochastic Gradient Descent)": AVAILABLE_SGD,
    "Adam": AVAILABLE_ADAM,
    "RMSProp": AVAILABLE_RMSPROP,
    "AdaGrad": AVAILABLE_ADAGRAD,
    "Learning Rate Scheduling": SCHEDULING,
    "Custom Optimizers": CUSTOM,
    "Weight Decay (L2 Regularization)": WEIGHT_DECAY,
    "Gradient Clipping": CLIPPING,
    "Learning Rate Warmup": WARMUP,
    "Multi-Optimizer Training": MULTI,
}

# the guide's placeholder for "one training step" inside the scheduler loops
SCHED_PLACEHOLDER = "    # Training steps\n    # ...\n"
WARMUP_PLACEHOLDER = "    # Training step\n    # ...\n"


def host(x) -> np.ndarray:
    return x.detach().numpy().astype(np.float64) if isinstance(x, torch.Tensor) \
        else np.asarray(x, dtype=np.float64)


@functools.cache
def _compiled(name: str, kind: str):
    """(backend, compiled model, initial params as NumPy, inputs, targets), built once."""
    backend = BACKENDS[name](dtype="float32", seed=0)
    if kind == "mlp":
        model = ml.MLP(["tanh", "tanh", None], [32, 32, 10])
        model.set_shapes(input=[None, 784])
        inputs = {"input": backend.randn(32, 784)}  # Batch of 32 examples
    else:  # a model with an embedding, for the Multi-Optimizer listing
        model = ml.Model()
        model += ml.Embedding(50, 8)
        model += ml.Flatten()
        model += ml.Linear(10)
        model.set_shapes(input=[None, 4])
        inputs = {"input": backend.randint(0, 50, 32, 4)}
    targets = backend.randn(32, 10)  # Target outputs
    compiled_model = ml.compile(model, backend)
    p0 = {k: host(v).astype(np.float32) for k, v in compiled_model.get_parameters().items()}
    return backend, compiled_model, p0, inputs, targets


def namespace(name: str, kind: str = "mlp", num_epochs: int = 20, mean: bool = False) -> dict:
    """What the guide's listings assume: model, backend, params, inputs, targets, ...

    ``train_step`` uses the guide's loss gradient ``2 * (outputs - targets)`` (summed over the
    batch), or its batch mean with ``mean=True``."""
    backend, compiled_model, p0, inputs, targets = _compiled(name, kind)
    ns = {"ml": ml, "backend": backend, "compiled_model": compiled_model,
          "params": {k: backend.array(v) for k, v in p0.items()}, "inputs": inputs,
          "targets": targets, "num_epochs": num_epochs}

    def train_step():
        """One training step of ``ns["optimizer"]`` (state created on first use)."""
        opt = ns["optimizer"]
        if ns.get("_opt") is not opt:
            ns["_opt"], ns["_state"] = opt, opt.init(ns["params"])
        outputs = compiled_model.evaluate(ns["params"], inputs)
        loss = float(np.mean((host(outputs["output"]) - host(targets)) ** 2))
        cot = 2 * (outputs["output"] - targets)
        _, grads = compiled_model.evaluate(
            ns["params"], inputs, output_gradients={"output": cot / 32 if mean else cot})
        ns["params"], ns["_state"] = opt.update(ns["params"], grads, ns["_state"])
        return loss

    ns["train_step"] = train_step
    return ns


def loss_of(ns: dict, params=None) -> float:
    out = ns["compiled_model"].evaluate(params if params is not None else ns["params"],
                                        ns["inputs"])["output"]
    return float(np.mean((host(out) - host(ns["targets"])) ** 2))


def gradients_of(ns: dict, scale: float = 1.0) -> dict:
    cm, params = ns["compiled_model"], ns["params"]
    outputs = cm.evaluate(params, ns["inputs"])
    _, grads = cm.evaluate(params, ns["inputs"], output_gradients={
        "output": scale * 2 * (outputs["output"] - ns["targets"])})
    return dict(grads)


def run(listing: str, ns: dict, *edits: tuple[str, str]) -> dict:
    code = listing
    for old, new in edits:
        assert old in code, old
        code = code.replace(old, new)
    exec(compile(code, "<optimizers guide listing>", "exec"), ns)
    return ns


def _guide_blocks(path: str) -> dict[str, str]:
    heading, blocks = None, {}
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        if lines[i].strip() == "```python":
            j = lines.index("```", i + 1)
            blocks.setdefault(heading, "\n".join(x.rstrip() for x in lines[i + 1:j]) + "\n")
            i = j
        i += 1
    return blocks


# ---------------------------------------------------------------------------------------------


def test_listings_are_verbatim():
    path = next((p for p in GUIDE_CANDIDATES if p and os.path.exists(p)), None)
    assert path is not None, f"the seed guide is not at any of {GUIDE_CANDIDATES}"
    blocks = _guide_blocks(path)
    for heading, listing in LISTINGS.items():
        assert blocks.get(heading) == listing, heading


@pytest.mark.parametrize("name", list(BACKENDS))
def test_using_optimizer_classes(name):
    ns = namespace(name, num_epochs=25)
    before = loss_of(ns)
    run(USING, ns)
    after = loss_of(ns)
    assert ns["optimizer_state"].step == 25 and math.isfinite(after)
    assert after < 0.9 * before, (before, after)
    assert all(type(v) is type(ns["targets"]) for v in ns["params"].values())


@pytest.mark.parametrize("name", list(BACKENDS))
def test_available_optimizers(name):
    # batch-mean gradients: with the summed ones SGD(0.01, momentum=0.9) diverges on this model
    ns = namespace(name, mean=True)
    for listing in (AVAILABLE_SGD, AVAILABLE_ADAM, AVAILABLE_RMSPROP, AVAILABLE_ADAGRAD):
        run(listing, ns)
    sgd, mom, nest = ns["sgd"], ns["sgd_momentum"], ns["sgd_nesterov"]
    assert (sgd.learning_rate, sgd.momentum, mom.momentum, nest.nesterov) == (0.01, 0.0, 0.9, True)
    adam, rms, ada = ns["adam"], ns["rmsprop"], ns["adagrad"]
    assert (adam.beta1, adam.beta2, adam.epsilon, adam.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert (rms.learning_rate, rms.decay, rms.epsilon, rms.momentum) == (0.001, 0.9, 1e-8, 0.0)
    assert (ada.learning_rate, ada.epsilon) == (0.01, 1e-8)
    before = loss_of(ns)
    start = ns["params"]
    for key in ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "rmsprop", "adagrad"):
        ns["params"], ns["optimizer"] = start, ns[key]
        losses = [ns["train_step"]() for _ in range(10)]
        after = loss_of(ns)
        assert losses[0] == pytest.approx(before, rel=1e-5)
        assert after < before and all(map(math.isfinite, losses)), (key, before, after)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_learning_rate_scheduling(name, capsys):
    train = (SCHED_PLACEHOLDER, "    # Training steps\n    val_loss = train_step()\n")
    # As written the last `scheduler` is ReduceLROnPlateau, and the loop calls step() with no
    # metric ("For StepLR or CosineAnnealingLR"): it runs, warning each epoch, lr unchanged.
    ns = namespace(name, num_epochs=3)
    with pytest.warns(RuntimeWarning, match="without the monitored metric"):
        run(SCHEDULING, ns, train)
    assert ns["optimizer"].get_learning_rate() == 0.001 and ns["scheduler"].last_step == 0
    assert capsys.readouterr().out.strip().split("\n")[-1] == "Epoch 2, Learning rate: 0.001"

    # ... with the listing's alternative for ReduceLROnPlateau, scheduler.step(val_loss)
    ns = namespace(name, num_epochs=15)
    before = loss_of(ns)
    run(SCHEDULING, ns, train,
        ("    scheduler.step()  # For StepLR", "    # scheduler.step()  # For StepLR"),
        ("    # scheduler.step(val_loss)", "    scheduler.step(val_loss)"))
    printed = capsys.readouterr().out.strip().split("\n")
    assert printed[-1] == "Epoch 14, Learning rate: 0.001" and len(printed) == 15
    assert ns["scheduler"].num_bad_epochs == 0 and loss_of(ns) < before

    # ... and keeping CosineAnnealingLR (the plateau block left out): closed-form cosine decay
    ns = namespace(name, num_epochs=10)
    start = SCHEDULING.index("# Reduce LR on plateau scheduler")
    stop = SCHEDULING.index("# Training loop with scheduler")
    run(SCHEDULING, ns, train, (SCHEDULING[start:stop], ""))
    t, base, eta_min = 10, 0.001, 1e-6
    expected = eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / 100)) / 2
    assert ns["optimizer"].get_learning_rate() == pytest.approx(expected, rel=1e-12)
    assert ns["_state"].step == 10
    capsys.readouterr()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_custom_optimizer_listing(name):
    ns = namespace(name)
    run(CUSTOM, ns)
    ns["optimizer"] = ns["CustomOptimizer"](learning_rate=0.01, custom_param=0.5)
    before = loss_of(ns)
    losses = [ns["train_step"]() for _ in range(10)]
    assert ns["optimizer"].backend.name == name  # self.backend works inside init
    state = ns["_state"]
    assert set(state) == set(ns["params"]) and all(set(s) == {"momentum"} for s in state.values())
    assert loss_of(ns) < before and losses[-1] < losses[0]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_weight_decay_listing(name):
    ns = namespace(name)
    gradients = gradients_of(ns)
    ns.update(gradients=dict(gradients), weight_decay=1e-4)  # the listing's free variables
    run(WEIGHT_DECAY, ns)
    assert ns["optimizer"].weight_decay == 1e-4
    for k, p in ns["params"].items():
        expected = host(gradients[k]) + (1e-4 * host(p) if "weight" in k else 0.0)
        np.testing.assert_allclose(host(ns["gradients"][k]), expected, rtol=1e-6, atol=1e-9)
    # Adam(weight_decay=wd) is the same as adding wd * param to every gradient (coupled L2)
    p0 = {k: host(v) for k, v in ns["params"].items()}
    be = ns["backend"]
    a, b = Adam(learning_rate=0.001, weight_decay=1e-4), Adam(learning_rate=0.001)
    pa = {k: be.array(v) for k, v in p0.items()}
    pb = {k: be.array(v) for k, v in p0.items()}
    pa, _ = a.update(pa, gradients, a.init(pa))
    manual = {k: be.array(host(g) + 1e-4 * p0[k]) for k, g in gradients.items()}
    pb, _ = b.update(pb, manual, b.init(pb))
    for k in p0:
        np.testing.assert_allclose(host(pa[k]), host(pb[k]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_gradient_clipping_listing(name):
    ns = namespace(name)
    original = gradients_of(ns, scale=100.0)  # large gradients, so both clips act
    ns["gradients"] = dict(original)
    run(CLIPPING, ns)
    out = ns["gradients"]
    assert all(type(out[k]) is type(original[k]) and out[k].shape == original[k].shape
               for k in original)
    assert max(float(np.max(np.abs(host(g)))) for g in out.values()) <= 1.0
    assert global_norm(out) <= 5.0 * (1 + 1e-6)
    # the same as torch: clip_grad_value_(1.0) then clip_grad_norm_(5.0)
    ts = [torch.tensor(host(g), requires_grad=True) for g in original.values()]
    for t in ts:
        t.grad = t.detach().clone()
    torch.nn.utils.clip_grad_value_(ts, 1.0)
    torch.nn.utils.clip_grad_norm_(ts, 5.0)
    for g, t in zip(out.values(), ts, strict=True):
        np.testing.assert_allclose(host(g), t.grad.numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_learning_rate_warmup_listing(name):
    ns = namespace(name)
    ns["total_steps"] = 30
    before = loss_of(ns)
    run(WARMUP, ns, (WARMUP_PLACEHOLDER, "    # Training step\n    train_step()\n"))
    lr = ns["optimizer"].get_learning_rate()
    assert lr == pytest.approx(1e-6 + (0.001 - 1e-6) * 30 / 1000, rel=1e-12)
    assert ns["scheduler"].last_step == 30 and ns["_state"].step == 30
    assert loss_of(ns) < before


@pytest.mark.parametrize("name", list(BACKENDS))
def test_multi_optimizer_listing(name):
    ns = namespace(name, kind="embedding", num_epochs=20)
    start = {k: host(v) for k, v in ns["params"].items()}
    before = loss_of(ns)
    run(MULTI, ns)
    assert loss_of(ns) < 0.9 * before
    es, ms = ns["embedding_state"], ns["main_state"]
    assert es.step == ms.step == 20
    assert set(es.layout.names) == {"embedding.weight"}
    assert set(ms.layout.names) == {"linear.weight", "linear.bias"}
    # Adam(1e-4) moves each embedding entry by at most ~lr per step; SGD moves more
    emb = np.abs(host(ns["params"]["embedding.weight"]) - start["embedding.weight"])
    assert 0 < emb.max() <= 20 * 1e-4 * 1.01
    assert np.abs(host(ns["params"]["linear.weight"]) - start["linear.weight"]).max() > emb.max()
