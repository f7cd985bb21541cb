"""Checkpoints (``mithril.utils.checkpoint``): safetensors arrays + JSON metadata, no pickle.

The main property: train 10 steps, save, load into *fresh* optimizer / scheduler objects (built
with different hyperparameters, which the checkpoint overrides), train 10 more steps - the
params, optimizer slots, step counts and learning rate are bitwise identical to 20
uninterrupted steps.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import KeyMismatchError, ShapeError
from mithril.utils.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import CosineAnnealingLR, StepLR
from mithril.utils.optimizers import SGD, Adam, RMSProp

BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def host(x) -> np.ndarray:
    return x.detach().float().numpy().copy() if isinstance(x, torch.Tensor) and \
        x.dtype == torch.bfloat16 else (x.detach().numpy().copy() if isinstance(x, torch.Tensor)
                                        else np.array(x))


def _setup(name):
    backend = BACKENDS[name](dtype="float32", seed=0)
    model = ml.MLP(["tanh", None], [16, 4])
    model.set_shapes(input=[None, 8])
    cm = ml.compile(model, backend)
    p0 = {k: host(v) for k, v in cm.get_parameters().items()}
    rng = np.random.default_rng(1)
    x = backend.array(rng.standard_normal((32, 8)))
    y = backend.array(rng.standard_normal((32, 4)))
    return backend, cm, p0, x, y


def _train(cm, params, opt, state, sched, x, y, steps):
    losses = []
    for _ in range(steps):
        out = cm.evaluate(params, {"input": x})["output"]
        losses.append(float(((host(out) - host(y)) ** 2).mean()))
        _, grads = cm.evaluate(params, {"input": x}, output_gradients={"output": 2 * (out - y)})
        params, state = opt.update(params, grads, state)
        sched.step()
    return params, state, losses


@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "jax-jit"])
def test_resume_is_bitwise_identical(name, tmp_path, monkeypatch):
    if name == "jax-jit":  # the jitted engine (default on accelerators) instead of numba
        import mithril.utils.optimizers.engines as engines

        monkeypatch.setattr(engines, "JAX_ENGINE", "jit")
        name = "jax"
    backend, cm, p0, x, y = _setup(name)

    # 20 uninterrupted steps
    opt = Adam(learning_rate=0.05, weight_decay=1e-3)
    sched = StepLR(opt, step_size=4, gamma=0.5)
    params = {k: backend.array(v) for k, v in p0.items()}
    state = opt.init(params)
    engine = type(state.engine).__name__
    ref_params, ref_state, ref_losses = _train(cm, params, opt, state, sched, x, y, 20)
    assert ref_losses[-1] < ref_losses[0]

    # 10 steps, save, load into fresh objects, 10 more
    opt1 = Adam(learning_rate=0.05, weight_decay=1e-3)
    sched1 = StepLR(opt1, step_size=4, gamma=0.5)
    params = {k: backend.array(v) for k, v in p0.items()}
    params, state, _ = _train(cm, params, opt1, opt1.init(params), sched1, x, y, 10)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, opt1, state, sched1, extra={"epoch": 10, "note": "half way"})
    del params, state, opt1, sched1

    opt2 = Adam(learning_rate=1.0, beta1=0.5)  # hyperparameters come from the checkpoint
    sched2 = StepLR(opt2, step_size=100, gamma=0.9)
    template = {k: backend.array(v) for k, v in p0.items()}
    ck = load_checkpoint(path, params_template=template, optimizer=opt2, scheduler=sched2)
    assert ck["extra"] == {"epoch": 10, "note": "half way"} and ck["step"] == 10
    assert ck["state"].step == 10 and opt2.beta1 == 0.9 and opt2.weight_decay == 1e-3
    assert sched2.last_step == 10 and sched2.step_size == 4
    assert opt2.get_learning_rate() == 0.05 * 0.5**2
    assert all(type(v) is type(template[k]) for k, v in ck["params"].items())
    params, state, _ = _train(cm, ck["params"], opt2, ck["state"], sched2, x, y, 10)

    assert state.step == ref_state.step == 20 and type(state.engine).__name__ == engine
    assert opt2.get_learning_rate() == opt.get_learning_rate()
    for k in p0:
        np.testing.assert_array_equal(host(params[k]), host(ref_params[k]), err_msg=k)
    for s in ("m", "v"):
        for k, v in state.slot(s).items():
            np.testing.assert_array_equal(host(v), host(ref_state.slot(s)[k]), err_msg=f"{s}/{k}")


def test_file_layout_is_safetensors_with_json_metadata(tmp_path):
    params = {"layer.weight": np.arange(6, dtype=np.float64).reshape(2, 3), "s": np.array(1.5)}
    opt = RMSProp(0.01, momentum=0.5, centered=True)
    state = opt.init(params)
    params, state = opt.update(params, {k: np.ones_like(v) for k, v in params.items()}, state)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params, opt, state, extra={"metrics": [0.5, 0.25]})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])  # plain JSON header: no pickle anywhere
    keys = set(header) - {"__metadata__"}
    assert keys == {"params/layer.weight", "params/s", *(f"opt/{slot}/{k}" for slot in
                    ("v", "grad_avg", "momentum") for k in ("layer.weight", "s"))}
    assert header["params/s"]["shape"] == [] and header["params/s"]["dtype"] == "F64"
    meta = json.loads(header["__metadata__"]["mithril"])
    assert meta["format"] == FORMAT and meta["extra"] == {"metrics": [0.5, 0.25]}
    assert meta["optimizer"]["class"] == "RMSProp" and meta["optimizer"]["step"] == 1
    assert meta["optimizer"]["hyperparameters"]["centered"] is True
    assert list(meta["params"]) == ["layer.weight", "s"]

    ck = load_checkpoint(path)  # no template / optimizer: NumPy arrays of the saved dtype
    for k, v in params.items():
        assert ck["params"][k].dtype == np.float64 and ck["params"][k].shape == v.shape
        np.testing.assert_array_equal(ck["params"][k], v)
    sd = ck["optimizer_state_dict"]
    assert ck["state"] is None and sd["step"] == 1 and set(sd["slots"]) == {"v", "grad_avg", "momentum"}
    st = RMSProp(0.01, momentum=0.5, centered=True).load_state_dict(sd, ck["params"])
    for s in state.slots:
        for k, v in state.slot(s).items():
            np.testing.assert_array_equal(st.slot(s)[k], v)


def test_cross_backend_and_hyperparameters_only(tmp_path):
    p = {"w": torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)}
    opt = SGD(0.1, momentum=0.9, nesterov=True)
    state = opt.init(p)
    p, state = opt.update(p, {"w": torch.ones(2, 3, dtype=torch.float64)}, state)
    save_checkpoint(tmp_path / "t.safetensors", p, opt, state)
    opt_np = SGD(0.5)
    ck = load_checkpoint(tmp_path / "t.safetensors", optimizer=opt_np,
                         backend=NumpyBackend(dtype="float64"))
    assert isinstance(ck["params"]["w"], np.ndarray) and opt_np.nesterov and opt_np.momentum == 0.9
    np.testing.assert_array_equal(ck["params"]["w"], p["w"].numpy())
    np.testing.assert_array_equal(ck["state"].slot("momentum")["w"], 1.0)
    # the restored numpy optimizer continues exactly as the torch one
    p_t, _ = opt.update(p, {"w": torch.full((2, 3), 2.0, dtype=torch.float64)}, state)
    p_n, _ = opt_np.update(ck["params"], {"w": np.full((2, 3), 2.0)}, ck["state"])
    np.testing.assert_array_equal(p_n["w"], p_t["w"].numpy())

    # optimizer without state: hyperparameters only
    save_checkpoint(tmp_path / "h.safetensors", p, Adam(0.003, beta2=0.99))
    fresh = Adam()
    ck = load_checkpoint(tmp_path / "h.safetensors", optimizer=fresh)
    assert ck["state"] is None and ck["optimizer_state_dict"] is None
    assert fresh.learning_rate == 0.003 and fresh.beta2 == 0.99


def test_bfloat16_torch_params(tmp_path):
    p = {"w": torch.randn(3, 4, dtype=torch.bfloat16)}
    opt = Adam(0.1)
    state = opt.init(p)
    p, state = opt.update(p, {"w": torch.randn(3, 4, dtype=torch.bfloat16)}, state)
    save_checkpoint(tmp_path / "b.safetensors", p, opt, state)
    ck = load_checkpoint(tmp_path / "b.safetensors", params_template=p, optimizer=Adam())
    assert ck["params"]["w"].dtype == torch.bfloat16
    assert torch.equal(ck["params"]["w"], p["w"])
    assert torch.equal(ck["state"].slot("v")["w"], state.slot("v")["w"])


# ---------------------------------------------------------------------------------------------
# mismatches and bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    params = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    opt = Adam(0.01)
    state = opt.init(params)
    params, state = opt.update(params, {k: np.ones_like(v) for k, v in params.items()}, state)
    sched = StepLR(opt, step_size=2)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, opt, state, sched)
    return path, params


def test_other_optimizer_is_a_clear_error(saved):
    path, params = saved
    sgd = SGD(0.3, momentum=0.5)
    before = dict(vars(sgd))
    with pytest.raises(ValueError, match="checkpoint holds optimizer Adam, cannot load it into SGD"):
        load_checkpoint(path, params_template=params, optimizer=sgd)
    assert vars(sgd) == before


def test_other_scheduler_is_a_clear_error(saved):
    path, params = saved
    opt = Adam(0.5)
    sched = CosineAnnealingLR(opt, T_max=10)
    with pytest.raises(ValueError, match="scheduler StepLR, cannot load it into CosineAnnealingLR"):
        load_checkpoint(path, params_template=params, optimizer=opt, scheduler=sched)
    assert opt.learning_rate == 0.5 and sched.last_step == 0  # nothing was restored


def test_template_mismatch(saved):
    path, params = saved
    with pytest.raises(KeyMismatchError, match=r"missing in checkpoint \['c'\]"):
        load_checkpoint(path, params_template={**params, "c": np.ones(1, np.float32)})
    with pytest.raises(ShapeError, match="'b'.*\\(3,\\).*\\(4,\\)"):
        load_checkpoint(path, params_template={**params, "b": np.ones(4, np.float32)})


def test_missing_parts(tmp_path):
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, {"a": np.ones(2)})
    with pytest.raises(ValueError, match="no optimizer"):
        load_checkpoint(path, optimizer=Adam())
    with pytest.raises(ValueError, match="no scheduler"):
        load_checkpoint(path, scheduler=StepLR(Adam(), step_size=1))
    from safetensors.numpy import save_file

    save_file({"x": np.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a mithril checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_bad_save_inputs_leave_no_file(saved, tmp_path):
    path, params = saved
    before = path.read_bytes()
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, params, extra={"obj": object()})
    with pytest.raises(ValueError, match="without its optimizer"):
        save_checkpoint(path, params, state=Adam().init(params))
    with pytest.raises(ValueError, match="made by SGD"):
        save_checkpoint(path, params, Adam(), SGD(0.1, momentum=0.9).init(params))
    with pytest.raises(KeyMismatchError):
        save_checkpoint(path, {"a": params["a"]}, Adam(), Adam().init(params))
    with pytest.raises(TypeError, match="OptimizerState"):
        save_checkpoint(path, params, Adam(), {"a": {"m": params["a"]}})
    with pytest.raises(TypeError, match="params must be a dict"):
        save_checkpoint(path, [params["a"]])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


# ---------------------------------------------------------------------------------------------
# atomic saves, temporary files, what a save refuses
# ---------------------------------------------------------------------------------------------


def test_save_fsyncs_file_then_replaces_then_fsyncs_folder(saved, monkeypatch):
    import os
    import stat

    path, params = saved
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(os.path.abspath(dst))
        assert os.path.basename(src).startswith(".ckpt-ckpt.safetensors-")
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(path, {k: v * 2 for k, v in params.items()})
    assert events == ["fsync file", "replace", "fsync folder"]
    np.testing.assert_array_equal(load_checkpoint(path)["params"]["a"], params["a"] * 2)


@pytest.mark.parametrize("fail", ["fsync", "replace", "write"])
def test_failed_write_keeps_the_old_file_and_no_temporary(saved, tmp_path, monkeypatch, fail):
    import builtins
    import os

    path, params = saved
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    if fail == "write":
        real_open = builtins.open

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, b):
                self.f.write(bytes(memoryview(b))[:3])
                broken()

        monkeypatch.setattr(builtins, "open", lambda p, m="r", *a, **k: Half(real_open(p, m))
                            if m == "xb" else real_open(p, m, *a, **k))
    else:
        monkeypatch.setattr(os, fail, broken)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {k: v + 1 for k, v in params.items()})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_stale_temporaries_of_the_target_are_removed(saved, tmp_path):
    import os
    import subprocess
    import sys

    from mithril.utils.checkpoint_io import _host_tag

    path, params = saved
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    host, name = _host_tag(), path.name
    files = {f".ckpt-{name}-{host}-{dead}-0a1b.tmp": False,  # killed save: removed
             f".ckpt-{name}-{host}-{os.getpid()}-77.tmp": False,  # ours, not being written
             f".ckpt-{name}-{host}-{os.getppid()}-0a1c.tmp": True,  # a live process's
             f".ckpt-other.safetensors-{host}-{dead}-0a1d.tmp": True,  # another target's
             f".ckpt-{name}-{'0' if host[0] != '0' else '1'}{host[1:]}-{dead}-0a1e.tmp": True,
             ".ckpt-x1y2z3.tmp": True}  # old style: cannot be tied to a target
    for f in files:
        (tmp_path / f).write_bytes(b"partial")
    save_checkpoint(path, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name] + [f for f, keep in files.items() if keep])


def test_save_refuses_what_load_would_refuse(saved, tmp_path):
    from mithril.errors import DTypeError

    path, params = saved
    before = path.read_bytes()
    with pytest.raises(DTypeError, match=r"params\['i'\] has dtype int64"):
        save_checkpoint(path, {**params, "i": np.arange(3)})
    with pytest.raises(TypeError, match=r"params\['l'\] is a list"):
        save_checkpoint(path, {**params, "l": [1.0]})
    deep: list = []
    for _ in range(63):
        deep = [deep]  # 64 levels
    with pytest.raises(ValueError, match="extra nests deeper than 63 levels"):
        save_checkpoint(path, params, extra=deep)
    with pytest.raises(TypeError, match="must be JSON-serialisable"):
        save_checkpoint(path, params, extra={"loss": object()})
    # an attribute set out of range is not checked when set (as torch's param_groups and
    # Keras' attributes): the save refuses it, naming it, rather than writing a file that
    # load_checkpoint would refuse
    opt = Adam(0.01)
    state = opt.init(params)
    opt.beta1 = 1.5
    with pytest.raises(ValueError, match=r"Adam's hyperparameters would not load back: "
                                         r"beta1 must be in \[0, 1\), got 1.5"):
        save_checkpoint(path, params, opt, state)
    assert opt.beta1 == 1.5
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    save_checkpoint(path, params, extra=deep[0])  # 63 levels are fine
    assert load_checkpoint(path)["extra"] == deep[0]


def test_bfloat16_jax_params(tmp_path):
    import jax.numpy as jnp

    p = {"w": jnp.asarray(np.linspace(-2, 2, 12).reshape(3, 4), dtype=jnp.bfloat16)}
    save_checkpoint(tmp_path / "j.safetensors", p, Adam(0.1))
    ck = load_checkpoint(tmp_path / "j.safetensors", params_template=p)
    assert ck["metadata"]["params"]["w"]["dtype"] == "bfloat16"
    assert ck["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ck["params"]["w"], np.float32),
                                  np.asarray(p["w"], np.float32))
