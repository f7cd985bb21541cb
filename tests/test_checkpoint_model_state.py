"""A checkpoint holds the model's state (BatchNorm's running statistics and its integer
``num_batches_tracked``) beside the parameters, as torch's ``state_dict`` holds a module's
buffers: ``save_checkpoint(..., model_state=state)``, ``load_checkpoint(...)["model_state"]``.
Saved from one backend, loaded into each, the eval-mode outputs equal torch's
``nn.BatchNorm1d`` with the same running statistics; bad input changes no file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mithril as ml
from mithril.backends import JaxBackend, NumpyBackend, TorchBackend
from mithril.errors import CheckpointError, DTypeError, KeyMismatchError, ShapeError
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.optimizers import Adam

MAKERS = {"numpy": lambda: NumpyBackend(dtype="float32", seed=0),
          "torch": lambda: TorchBackend(dtype="float32", seed=0),
          "jax": lambda: JaxBackend(dtype="float32", seed=0)}


def _compiled(backend):
    m = ml.Model()
    m |= ml.Linear(4)(input="input", output="h")
    m |= ml.BatchNorm1D(4)(input="h", output=ml.IOKey("output"))
    return ml.compile(m, backend, shapes={"input": [None, 3]})


def _trained(backend):
    c = _compiled(backend)
    params, state = c.randomize_params(), c.initial_state_dict
    rng = np.random.default_rng(1)
    for _ in range(3):
        _, state = c.evaluate(params, {"input": rng.standard_normal((8, 3)).astype(np.float32)},
                              state=state, training=True)
    return c, params, state


@pytest.mark.parametrize("src", sorted(MAKERS))
@pytest.mark.parametrize("dst", sorted(MAKERS))
def test_model_state_round_trips_across_backends_and_equals_torch(tmp_path, src, dst):
    c, params, state = _trained(MAKERS[src]())
    path = tmp_path / "ckpt.safetensors"
    opt = Adam(learning_rate=1e-3)
    save_checkpoint(path, params, opt, opt.init(params), model_state=state)
    c2 = _compiled(MAKERS[dst]())
    got = load_checkpoint(path, params_template=c2.randomize_params(), optimizer=Adam(),
                          model_state_template=c2.initial_state_dict)
    b2 = c2.backend
    ms = got["model_state"]
    assert sorted(ms) == sorted(state)
    assert int(b2.to_numpy(ms["batch_norm1_d.num_batches_tracked"])) == 3
    assert "int" in b2.dtype_name(ms["batch_norm1_d.num_batches_tracked"])
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    out, _ = c2.evaluate(got["params"], {"input": x}, state=ms, training=False)

    # torch: the same weights and running statistics in eval mode
    lin, bn = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4).eval()
    src_b = c.backend
    p = {k: torch.tensor(np.asarray(src_b.to_numpy(v))) for k, v in params.items()}
    s = {k: torch.tensor(np.asarray(src_b.to_numpy(v))) for k, v in state.items()}
    with torch.no_grad():
        w = p["linear.weight"]
        lin.weight.copy_(w if w.shape == (4, 3) else w.T)
        lin.bias.copy_(p["linear.bias"].reshape(4))
        bn.weight.copy_(p["batch_norm1_d.weight"].reshape(4))
        bn.bias.copy_(p["batch_norm1_d.bias"].reshape(4))
        bn.running_mean.copy_(s["batch_norm1_d.running_mean"].reshape(4))
        bn.running_var.copy_(s["batch_norm1_d.running_var"].reshape(4))
        ref = bn(lin(torch.tensor(x))).numpy()
    np.testing.assert_allclose(b2.to_numpy(out["output"]), ref, rtol=1e-5, atol=1e-6)


def test_without_model_state_the_load_gives_none_and_a_template_is_refused(tmp_path):
    c, params, _ = _trained(MAKERS["numpy"]())
    path = tmp_path / "p.safetensors"
    save_checkpoint(path, params)
    assert load_checkpoint(path)["model_state"] is None
    with pytest.raises(ValueError, match="holds no model state"):
        load_checkpoint(path, model_state_template=c.initial_state_dict)


def test_bad_model_state_is_refused_and_the_file_is_unchanged(tmp_path):
    c, params, state = _trained(MAKERS["numpy"]())
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, params, model_state=state)
    before = path.read_bytes()
    bad = {**state, "batch_norm1_d.running_mean": np.zeros(4, np.complex64)}
    with pytest.raises(DTypeError, match="model_state\\['batch_norm1_d.running_mean'\\]"):
        save_checkpoint(path, params, model_state=bad)
    with pytest.raises(TypeError, match="model_state\\['x'\\] is a list"):
        save_checkpoint(path, params, model_state={**state, "x": [1.0]})
    with pytest.raises(TypeError, match="without '/'"):
        save_checkpoint(path, params, model_state={"a/b": np.zeros(2, np.float32)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.safetensors"]
    template = c.initial_state_dict
    with pytest.raises(KeyMismatchError, match="running_var"):
        load_checkpoint(path, model_state_template={k: v for k, v in template.items()
                                                    if "running_var" not in k})
    with pytest.raises(ShapeError, match="'batch_norm1_d.running_mean' has shape"):
        load_checkpoint(path, model_state_template={**template, "batch_norm1_d.running_mean":
                                                    np.zeros(5, np.float32)})


def test_a_model_state_entry_the_metadata_does_not_describe_is_refused(tmp_path):
    # the metadata and the stored tensors must agree for the new field too
    from mithril.utils.checkpoint_io import read_file, write_file

    _, params, state = _trained(MAKERS["numpy"]())
    path = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, params, model_state=state)
    meta, arrays = read_file(path)
    arrays = dict(arrays)
    arrays["model/extra"] = np.zeros(2, np.float32)
    write_file(path, meta, arrays)
    with pytest.raises(CheckpointError, match="model/extra"):
        load_checkpoint(path)
