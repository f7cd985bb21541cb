"""Review 49: the files of checkpoints as a torch / Keras / orbax user meets them.

safetensors reads ours as they are; foreign files (torch.save's zip or pickle, HDF5, .npy),
damaged ones, folders and another model's or optimizer's checkpoints are refused by name,
changing nothing; metrics and NumPy numbers in ``extra`` are kept; a float16 template takes
values as torch's ``load_state_dict`` does. The resume programs are in
``test_review_resume49.py``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from mithril.errors import CheckpointError, KeyMismatchError, ShapeError
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import SGD, Adam


def test_safetensors_reads_our_file_as_it_is(tmp_path):
    import safetensors.numpy
    import safetensors.torch

    p = {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.array([0.5, -2.0])}
    opt = Adam(0.1)
    state = opt.init(p)
    p, state = opt.update(p, {k: np.ones_like(v) for k, v in p.items()}, state)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, p, opt, state)
    flat = safetensors.numpy.load_file(path)
    assert sorted(flat) == ["opt/m/b", "opt/m/w", "opt/v/b", "opt/v/w", "params/b", "params/w"]
    for k, v in p.items():
        assert flat[f"params/{k}"].dtype == v.dtype
        np.testing.assert_array_equal(flat[f"params/{k}"], v)
        np.testing.assert_array_equal(flat[f"opt/m/{k}"], state.slot("m")[k])
    t = safetensors.torch.load_file(path)
    assert torch.equal(t["params/w"], torch.from_numpy(p["w"]))


# ---------------------------------------------------------------------------------------------
# refused loads: named, and nothing changed
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    p = {"a.w": np.ones((2, 3)), "a.b": np.zeros(3)}
    opt = Adam(0.1, beta1=0.8)
    state = opt.init(p)
    p, state = opt.update(p, {k: np.ones_like(v) for k, v in p.items()}, state)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, p, opt, state, StepLR(opt, 2))
    return path, p


FOREIGN = {
    "torch.save": ("zip archive \\(torch.save", lambda f: torch.save({"w": torch.ones(2)}, f)),
    "pickle": ("a pickle", lambda f: f.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))),
    "keras h5": ("HDF5 file", lambda f: f.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))),
    "npy": ("a .npy file", lambda f: np.save(f, np.ones(40))),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_a_foreign_file_is_named_for_what_it_is(tmp_path, kind):
    words, write = FOREIGN[kind]
    path = tmp_path / "model.ckpt"
    write(path)
    if not path.exists():  # (np.save adds .npy)
        path = tmp_path / "model.ckpt.npy"
    opt = Adam(0.3)
    with pytest.raises(CheckpointError, match=f"'{path}'.*{words}.*not a mithril checkpoint"):
        load_checkpoint(path, optimizer=opt)
    assert opt.learning_rate == 0.3 and opt.beta1 == 0.9


def test_loads_into_another_model_or_optimizer_are_named_and_change_nothing(saved):
    path, p = saved
    opt = Adam(0.3)
    sched = StepLR(opt, 5)
    other = {"a.w": np.ones((3, 3)), "a.b": np.zeros(3)}
    with pytest.raises(ShapeError, match=r"'a.w' has shape \(2, 3\).*\(3, 3\)"):
        load_checkpoint(path, params_template=other, optimizer=opt, scheduler=sched)
    with pytest.raises(KeyMismatchError, match=r"not in template \['a.b'\]"):
        load_checkpoint(path, params_template={"a.w": p["a.w"]}, optimizer=opt)
    with pytest.raises(ValueError, match=f"'{path}'.*holds optimizer Adam.*into SGD"):
        load_checkpoint(path, optimizer=SGD(0.3))
    assert opt.learning_rate == 0.3 and opt.beta1 == 0.9 and sched.last_step == 0
    # a float64 checkpoint into float32 parameters takes their dtype, as torch's copy_
    ck = load_checkpoint(path, params_template={k: v.astype(np.float32) for k, v in p.items()},
                         optimizer=opt)
    assert ck["params"]["a.w"].dtype == ck["state"].slot("m")["a.w"].dtype == np.float32
    assert opt.beta1 == 0.8


def test_truncated_file_is_named_and_a_refused_save_leaves_the_old_one(saved, tmp_path):
    path, p = saved
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-7])
    with pytest.raises(CheckpointError, match=f"'{cut}'"):
        load_checkpoint(cut)
    opt = Adam(0.1)
    with pytest.raises(TypeError, match=r"metrics\['val'\] is 'low', not a real number"):
        save_checkpoint(path, p, opt, opt.init(p), metrics={"val": "low"})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, p, extra={"rng": torch.get_rng_state()})  # a tensor: not JSON
    assert path.read_bytes() == raw and sorted(x.name for x in tmp_path.iterdir()) == [
        "c.safetensors", "cut.safetensors"]


def test_metrics_are_kept_with_nan_and_numbers_of_any_backend(tmp_path):
    import jax.numpy as jnp

    p = {"w": np.ones(2)}
    got = {"loss": torch.tensor(0.25, requires_grad=True) * 1, "acc": np.float32(0.5),
           "top5": jnp.float32(0.75), "steps": 7, "diverged": float("nan"),
           "best": -float("inf")}
    save_checkpoint(tmp_path / "m.safetensors", p, metrics=got)
    back = load_checkpoint(tmp_path / "m.safetensors")["metrics"]
    assert {k: v for k, v in back.items() if k != "diverged"} == {
        "loss": 0.25, "acc": 0.5, "top5": 0.75, "steps": 7.0, "best": -float("inf")}
    assert np.isnan(back["diverged"])
    assert load_checkpoint(tmp_path / "m.safetensors")["metadata"]["metrics"]["diverged"] == "nan"
    save_checkpoint(tmp_path / "n.safetensors", p)
    assert load_checkpoint(tmp_path / "n.safetensors")["metrics"] is None
    for bad in (np.ones(2), True, 1j, None):
        with pytest.raises(TypeError, match=r"metrics\['x'\]"):
            save_checkpoint(tmp_path / "n.safetensors", p, metrics={"x": bad})


def test_a_save_checkpoint_file_under_a_shards_name_is_named_for_what_it_is(tmp_path):
    """Before: "the checkpoint is of None, not Adam" (the shard's format was not read)."""
    from mithril import distributed as dist

    save_checkpoint(tmp_path / "shard-00000-of-00001.safetensors", {"w": np.ones(3)})
    dp = dist.DataParallel(Adam(0.1))
    with pytest.raises(CheckpointError, match="shard-00000-of-00001.safetensors' is not a "
                                              "shard of save_sharded.*read by load_checkpoint"):
        dist.load_sharded(tmp_path, dp)
    assert dp.optimizer.learning_rate == 0.1


def test_numpy_numbers_in_extra_are_saved_as_torch_save_would_keep_them(tmp_path):
    """Before: TypeError "Object of type int64 is not JSON serializable" for an epoch from
    NumPy (torch.save takes it)."""
    p = {"w": np.ones(2)}
    rng = np.random.default_rng(0)
    extra = {"epoch": rng.integers(5, 6), "acc": np.float32(0.5), "done": np.bool_(False)}
    save_checkpoint(tmp_path / "c.safetensors", p, extra=extra)
    back = load_checkpoint(tmp_path / "c.safetensors")["extra"]
    assert back == {"epoch": 5, "acc": 0.5, "done": False}
    assert type(back["epoch"]) is int and type(back["done"]) is bool
    with pytest.raises(TypeError, match=r"JSON-serialisable.*\(in extra\)"):
        save_checkpoint(tmp_path / "c.safetensors", p, extra={"acc": {1, 2}})
    assert load_checkpoint(tmp_path / "c.safetensors")["extra"] == back
    # a NumPy NaN is kept since e72f12cb (as torch.save keeps it), read back as a float
    save_checkpoint(tmp_path / "c.safetensors", p, extra={"acc": np.float32("nan")})
    acc = load_checkpoint(tmp_path / "c.safetensors")["extra"]["acc"]
    assert type(acc) is float and np.isnan(acc)


def test_a_missing_folder_is_named_not_the_temporary_file(tmp_path):
    """Before: "No such file or directory: '.../.ckpt-c.safetensors-<host>-<pid>-<hex>.tmp'"."""
    target = tmp_path / "runs" / "c.safetensors"
    with pytest.raises(FileNotFoundError, match=f"folder '{tmp_path / 'runs'}': there is none"
                                                f".*'{target}'"):
        save_checkpoint(target, {"w": np.ones(2)})
    assert list(tmp_path.iterdir()) == []



def test_values_beyond_float16_become_inf_in_a_float16_template_as_in_torch(tmp_path):
    """As torch's load_state_dict into a half model (copy_); `mithril predict --dtype
    float16` refuses such weights itself, naming them."""
    p = {"w": np.array([1.0, 7e4, -3.0]), "b": np.array([np.nan, np.inf])}
    save_checkpoint(tmp_path / "c.safetensors", p)
    half = torch.nn.Linear(1, 3).half()
    half.load_state_dict({"weight": torch.tensor(p["w"]).reshape(3, 1)}, strict=False)
    template = {k: np.zeros_like(v, np.float16) for k, v in p.items()}
    with np.errstate(over="ignore"):
        got = load_checkpoint(tmp_path / "c.safetensors", params_template=template)["params"]
    np.testing.assert_array_equal(got["w"], half.weight.detach().numpy().reshape(3))
    assert got["w"].dtype == np.float16 and got["w"][1] == np.inf and np.isnan(got["b"][0])


def test_a_folder_given_for_a_file_says_which_loader_reads_it(tmp_path):
    """Before: "[Errno 21] Is a directory" (orbax users pass their checkpoint folders)."""
    from mithril.utils.checkpoint import CheckpointManager

    CheckpointManager(tmp_path / "ckpts").save(1, {"w": np.ones(2)})
    with pytest.raises(IsADirectoryError, match=r"CheckpointManager\(folder\).latest\(\).*"
                                                 f"'{tmp_path / 'ckpts'}'"):
        load_checkpoint(tmp_path / "ckpts")
    assert load_checkpoint(CheckpointManager(tmp_path / "ckpts").latest())["params"]["w"].sum() == 2
