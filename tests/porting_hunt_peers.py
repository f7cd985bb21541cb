"""The optax and Keras 3 halves of ``tests/test_porting_hunt.py``: each runs in a fresh
interpreter (``conftest.run_python``: JAX's float64 and Keras's backend are process-wide), runs
the peer's script and our port of it on the same data and initial weights, and returns the
largest differences as plain numbers."""

from __future__ import annotations

import os

import numpy as np

STEPS, BATCH = 40, 32


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((128, 6)), rng.integers(0, 3, 128)


def _mlp(backend):
    import mithril as ml

    model = ml.Model()
    model |= ml.MLP(["relu", None], [16, 3])(input="input", output="logits")
    model |= ml.CrossEntropy()(input="logits", target="target", output=ml.IOKey("loss"))
    return ml.compile(model, backend, shapes={"input": [None, 6]})


def optax_run() -> dict[str, float]:
    """optax.chain(clip_by_global_norm(c), adamw(warmup_cosine_decay_schedule, weight_decay,
    mask=matrices only)) in a jitted step, against ``make_train_step`` on JAX and the separate
    calls on NumPy, float64. ``c`` = 1.0 never binds here (the global norms are 0.26-0.64),
    0.3 does."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    import mithril as ml
    from mithril.utils.lr_schedulers import WSD
    from mithril.utils.optimizers import AdamW, clip_gradients
    from mithril.utils.training import make_train_step

    x, y = _data()
    batches = [np.random.default_rng(100 + t).choice(len(y), BATCH, replace=False)
               for t in range(STEPS)]
    backend = ml.JaxBackend(dtype="float64")
    compiled = _mlp(backend)
    p0 = {k: np.asarray(v) for k, v in compiled.get_parameters().items()}
    w0, b0, w1, b1 = p0  # (out, in) weights: x @ w.T, as torch.nn.Linear

    def loss_fn(p, xb, yb):
        logits = jax.nn.relu(xb @ p[w0].T + p[b0]) @ p[w1].T + p[b1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    schedule = optax.warmup_cosine_decay_schedule(0.0, 5e-2, 5, STEPS, 1e-4)

    def peer(clip: float, sched) -> dict[str, np.ndarray]:
        tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(
            sched, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p)))

        @jax.jit
        def train_step(p, s, xb, yb):
            g = jax.grad(loss_fn)(p, xb, yb)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = {k: jnp.asarray(v) for k, v in p0.items()}
        s = tx.init(p)
        for b in batches:
            p, s = train_step(p, s, x[b], y[b])
        return {k: np.asarray(v) for k, v in p.items()}

    def port(clip: float | None) -> tuple[AdamW, WSD]:
        # optax's mask: a callable of the names (or a regex), True where the decay applies;
        # optax's clip_by_global_norm has no 1e-6 in the norm: clip_eps=0
        opt = AdamW(learning_rate=5e-2, weight_decay=0.1, clip_norm=clip, clip_eps=0.0,
                    weight_decay_mask=lambda name: name.endswith("weight"))
        return opt, WSD(opt, 5, 0, STEPS - 5, 0.0, 1e-4, "cosine")

    def fused(clip: float) -> dict[str, np.ndarray]:
        opt, sched = port(clip)
        step = make_train_step(compiled, opt, loss="loss")
        p = {k: backend.array(v) for k, v in p0.items()}
        s = step.init(p)
        assert step.fused
        for b in batches:
            p, s, _ = step(p, s, {"input": backend.array(x[b]),
                                  "target": backend.array(y[b], backend.int_dtype)})
            sched.step()
        return {k: np.asarray(v) for k, v in p.items()}

    def separate(clip: float) -> dict[str, np.ndarray]:
        # the separate calls: clip_gradients(eps=0) before an unclipped update
        opt, sched = port(None)
        c = _mlp(ml.NumpyBackend(dtype="float64"))
        p = {k: v.copy() for k, v in p0.items()}
        s = opt.init(p)
        for b in batches:
            _, g = c.evaluate(p, {"input": x[b], "target": y[b]}, output_gradients={"loss": 1.0})
            p, s = opt.update(p, clip_gradients(g, clip_norm=clip, eps=0.0), s)
            sched.step()
        return p

    def diff(a, b) -> float:
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    # optax evaluates the schedule at its int32 count: float32 values even under x64
    schedule64 = lambda count: schedule(jnp.asarray(count, jnp.float64))  # noqa: E731
    return {
        "schedule_dtype_at_int32": str(schedule(jnp.asarray(7, jnp.int32)).dtype),
        "fused_vs_optax_f64_schedule": diff(fused(1.0), peer(1.0, schedule64)),
        "fused_vs_optax_as_is": diff(fused(1.0), peer(1.0, schedule)),
        "separate_eps0_vs_optax_clipping": diff(separate(0.3), peer(0.3, schedule64)),
        "fused_vs_optax_clipping": diff(fused(0.3), peer(0.3, schedule64)),
    }


def keras_run() -> dict[str, float]:
    """model.compile(Adam(global_clipnorm=0.4, use_ema=True, ema_momentum=0.9)) + model.fit on
    arrays (the clip binds: norms 0.34-0.58), then model.evaluate, against our loop."""
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    jax.config.update("jax_enable_x64", True)
    import keras

    import mithril as ml
    from mithril.utils.optimizers import Adam
    from mithril.utils.training import make_train_step

    keras.config.set_floatx("float64")
    x, y = _data()
    rng = np.random.default_rng(1)
    x_test, y_test = rng.standard_normal((64, 6)), rng.integers(0, 3, 64)
    compiled = _mlp(ml.NumpyBackend(dtype="float64"))
    p0 = {k: v.copy() for k, v in compiled.get_parameters().items()}
    names = list(p0)
    epochs, clip = 3, 0.4

    def as_keras(p):  # Dense kernels are (in, out)
        return [p[names[0]].T, p[names[1]], p[names[2]].T, p[names[3]]]

    def keras_fit(global_clipnorm: float | None):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3)])
        model.set_weights(as_keras(p0))
        model.compile(optimizer=keras.optimizers.Adam(
            learning_rate=2e-2, global_clipnorm=global_clipnorm, use_ema=True, ema_momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
        history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
        return model, history

    model, history = keras_fit(clip)
    k_loss, k_acc = model.evaluate(x_test, y_test, verbose=0)

    # Keras's Adam: ε = 1e-7 added to the uncorrected √v (convention="keras"); use_ema is
    # ema_decay; global_clipnorm is clip_norm with no 1e-6 in the norm (clip_eps=0)
    keras_adam = {"learning_rate": 2e-2, "epsilon": 1e-7, "convention": "keras",
                  "ema_decay": 0.9, "clip_norm": clip, "clip_eps": 0.0}
    opt = Adam(**keras_adam)
    p = {k: v.copy() for k, v in p0.items()}
    s = opt.init(p)
    losses = []
    for _ in range(epochs):
        batch_losses = []
        for i in range(0, len(y), BATCH):
            out, g = compiled.evaluate(p, {"input": x[i:i + BATCH], "target": y[i:i + BATCH]},
                                       output_gradients={"loss": 1.0})
            p, s = opt.update(p, g, s)
            batch_losses.append(float(out["loss"]))
        losses.append(float(np.mean(batch_losses)))
    # fit ends with finalize_variable_values: the model's weights become the EMA
    ema = opt.ema_params(s)
    test = compiled.evaluate(ema, {"input": x_test, "target": y_test})
    ours, raw = as_keras(ema), as_keras(p)

    # the one-program JAX step, the same clip; its EMA read through to_optimizer_state
    backend = ml.JaxBackend(dtype="float64")
    opt = Adam(**keras_adam)
    step = make_train_step(_mlp(backend), opt, loss="loss")
    p = {k: backend.array(v) for k, v in p0.items()}
    s = step.init(p)
    for _ in range(epochs):
        for i in range(0, len(y), BATCH):
            p, s, _ = step(p, s, {"input": backend.array(x[i:i + BATCH]),
                                  "target": backend.array(y[i:i + BATCH], backend.int_dtype)})
    assert step.fused
    fused_ema = {k: np.asarray(v) for k, v in
                 opt.ema_params(step.to_optimizer_state(s, p)).items()}
    return {
        "fused_weights_vs_ema": max(float(np.abs(a - b).max()) for a, b in
                                    zip(model.get_weights(), as_keras(fused_ema))),
        "loss_history": float(np.abs(np.array(history.history["loss"]) - losses).max()),
        "weights_vs_ema": max(float(np.abs(a - b).max())
                              for a, b in zip(model.get_weights(), ours)),
        "weights_vs_raw": max(float(np.abs(a - b).max())
                              for a, b in zip(model.get_weights(), raw)),
        "eval_loss": abs(k_loss - float(test["loss"])),
        "eval_acc": abs(k_acc - float(np.mean(test["logits"].argmax(1) == y_test))),
    }


def torch_cnn_on_jax_run() -> dict[str, float]:
    """The torch CNN script of ``tests/test_porting_hunt.py`` (AdamW, OneCycleLR cycling β₁ per
    batch, clip_grad_norm_) against its port on ``make_train_step``'s one JAX program, float64:
    β₁ and the learning rate change every step (traced arguments: one rebuild)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import test_porting_hunt as t

    import mithril as ml

    x, y, _, _ = t._digits()
    orders = [np.random.default_rng(e).permutation(len(x)) for e in range(t.EPOCHS)]
    backend = ml.JaxBackend(dtype="float64")
    compiled = ml.compile(t._cnn(), backend, shapes={"input": [None, 1, 8, 8]})
    p0 = {k: np.asarray(v).copy() for k, v in compiled.get_parameters().items()}
    net, ref_losses, _ = t._torch_run(p0, x, y, orders)
    _, sched, step = t._port(compiled)
    params = {k: backend.array(v) for k, v in p0.items()}
    losses: list[float] = []
    params, _ = t._epochs(step, sched, params, step.init(params), x, y, orders, losses)
    return {"fused": float(step.fused), "rebuilds": float(step.rebuilds),
            "losses": float(np.abs(np.array(losses) - ref_losses).max()),
            "params": max(float(np.abs(w.detach().numpy() - np.asarray(params[k])).max())
                          for w, k in zip(net.parameters(), params))}
