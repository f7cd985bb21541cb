"""Sharded checkpoints (``save_sharded`` / ``load_sharded``) keep each tensor's missed-step
count (:meth:`OptimizerState.note_missed`: the applied steps it had no gradient at, which
its bias corrections leave out, as torch.optim's per-parameter ``step``). Each rank saves
the counts of the tensors it writes; the load merges them. Before, they were dropped: the
resumed run's Adam bias corrections for ``b`` counted its missed steps (off the unbroken
run by ~1e-3). Side by side: the unbroken run, and torch.optim.Adam (whose per-parameter
``step`` is the reference for what the counts mean), float64. A checkpoint saved before the
counts were kept still loads (counts 0); bad counts are refused, naming them. Two ranks
(``@pytest.mark.slow``: this file run as the worker, ``python
tests/test_sharded_missed_counts.py RANK WORLD INIT_FILE OUT FOLDER``, gloo on a
``file://`` init): each saves the counts of its tensors, and 2 -> 2, 2 -> 1 and 1 -> 2
resumes continue as the unbroken run."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

from mithril.distributed import DataParallel, load_sharded, save_sharded
from mithril.errors import CheckpointError
from mithril.utils.checkpoint_io import read_file, write_file
from mithril.utils.optimizers import Adam

STEPS, SAVE_AT, LR = 12, 7, 0.05
#: the steps at which ``b`` has no gradient (its first two, then now and then)
NONE_AT = {0, 1, 4, 9}
TOL = 1e-12


def _problem() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    p = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3),
         "c": rng.standard_normal(2)}
    grads = [{n: rng.standard_normal(a.shape) for n, a in p.items() if n != "b" or i not in
              NONE_AT} for i in range(STEPS)]
    return p, grads


def _step(dp: DataParallel, p: dict, g: dict, st):
    # (DataParallel counts the missed steps itself, each rank those of the tensors it holds:
    # mithril.distributed.missed_steps)
    return dp.update(p, g, st)


def _unbroken(shard: bool) -> dict[str, np.ndarray]:
    p0, grads = _problem()
    dp = DataParallel(Adam(LR), shard_state=shard)
    p, st = dict(p0), dp.init(dict(p0))
    for g in grads:
        p, st = _step(dp, p, g, st)
    return {n: np.array(a) for n, a in p.items()}


def _torch() -> dict[str, np.ndarray]:
    p0, grads = _problem()
    x = {n: torch.tensor(a, requires_grad=True) for n, a in p0.items()}
    opt = torch.optim.Adam(list(x.values()), lr=LR)
    for g in grads:
        for n, t in x.items():
            t.grad = torch.tensor(g[n]) if n in g else None
        opt.step()
    return {n: t.detach().numpy().copy() for n, t in x.items()}


def _saved(folder, shard: bool) -> tuple[dict, DataParallel]:
    p0, grads = _problem()
    dp = DataParallel(Adam(LR), shard_state=shard)
    p, st = dict(p0), dp.init(dict(p0))
    for g in grads[:SAVE_AT]:
        p, st = _step(dp, p, g, st)
    assert st.local.missed_counts() == {"b": 3}
    save_sharded(folder, p, dp, st)
    return p, dp


def _strip_missed(folder) -> None:
    """The shards as a save before the counts were kept wrote them: no ``"missed"``."""
    for f in glob.glob(os.path.join(folder, "shard-*.safetensors")):
        text, tensors = read_file(f)
        meta = json.loads(text)
        del meta["missed"]
        write_file(f, json.dumps(meta), tensors)


@pytest.mark.parametrize("shard", [False, True])
def test_the_resume_continues_bit_for_bit(tmp_path, shard):
    whole, ref = _unbroken(shard), _torch()
    for n in whole:  # what the counts mean: torch's per-parameter step
        np.testing.assert_allclose(whole[n], ref[n], rtol=0, atol=TOL, err_msg=n)
    _saved(tmp_path, shard)
    dp = DataParallel(Adam(LR), shard_state=shard)
    p, st = load_sharded(tmp_path, dp)
    assert st.local.missed_counts() == {"b": 3} and st.step == SAVE_AT
    for g in _problem()[1][SAVE_AT:]:
        p, st = _step(dp, p, g, st)
    for n in whole:
        np.testing.assert_array_equal(np.asarray(p[n]), whole[n], err_msg=n)


@pytest.mark.parametrize("shard", [False, True])
def test_a_checkpoint_without_the_counts_loads_as_before(tmp_path, shard):
    """An older checkpoint (no ``"missed"``) loads with counts 0: ``b``'s count is then the
    optimizer's, off the unbroken run by far more than rounding (what dropping them did)."""
    _saved(tmp_path, shard)
    _strip_missed(tmp_path)
    dp = DataParallel(Adam(LR), shard_state=shard)
    p, st = load_sharded(tmp_path, dp)
    assert st.local.missed is None and st.step == SAVE_AT
    for g in _problem()[1][SAVE_AT:]:
        p, st = _step(dp, p, g, st)
    whole = _unbroken(shard)
    np.testing.assert_array_equal(np.asarray(p["w"]), whole["w"])
    assert np.abs(np.asarray(p["b"]) - whole["b"]).max() > 1e-4


@pytest.mark.parametrize("bad, msg", [
    ({"b": 8}, r"'missed' of 'b' is 8, beyond the 7 steps"),
    ({"b": -1}, r"'missed' of 'b' must be an int >= 0, got -1"),
    ({"b": 1.5}, r"'missed' of 'b' must be an int >= 0, got 1.5"),
    ({"z": 1}, r"'missed' names unknown parameters \['z'\]"),
    ([1], r"'missed' must be a dict of parameter -> int, got list"),
])
def test_bad_counts_are_refused_and_change_nothing(tmp_path, bad, msg):
    _saved(tmp_path, True)
    for f in glob.glob(os.path.join(tmp_path, "shard-*.safetensors")):
        text, tensors = read_file(f)
        write_file(f, json.dumps({**json.loads(text), "missed": bad}), tensors)
    opt = Adam(LR, ema_decay=0.9)
    dp = DataParallel(opt, shard_state=True)
    before = dict(vars(opt))
    with pytest.raises(CheckpointError, match=msg):
        load_sharded(tmp_path, dp)
    assert vars(opt) == before


# -- two processes -------------------------------------------------------------------------

def _listed(p: dict) -> dict[str, list]:
    return {n: np.asarray(a).tolist() for n, a in p.items()}


def _worker(rank: int, world: int, init: str, out: str, folder: str) -> None:
    """One rank: for each mode, SAVE_AT steps (both ranks' gradients the whole batch's:
    their mean is it exactly), a save, the rest of the run (``whole``); then the 2-rank
    and the 1-process checkpoints loaded and run to the end (``resumed``, ``from_one``)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    results: dict = {}
    p0, grads = _problem()
    for shard in (False, True):
        key = f"shard={shard}"
        dp = DataParallel(Adam(LR), shard_state=shard)
        p, st = dict(p0), dp.init(dict(p0))
        for g in grads[:SAVE_AT]:
            p, st = _step(dp, p, g, st)
        two = os.path.join(folder, f"two-{shard}")
        save_sharded(two, p, dp, st)
        held = st.local.missed_counts()
        for g in grads[SAVE_AT:]:
            p, st = _step(dp, p, g, st)
        results[key] = {"whole": _listed(p), "held": list(st.local.layout.names),
                        "missed": held}
        for name, src in (("resumed", two), ("from_one", os.path.join(folder, f"one-{shard}"))):
            dp = DataParallel(Adam(LR), shard_state=shard)
            p, st = load_sharded(src, dp)
            results[key][name + "/missed"] = st.local.missed_counts()
            for g in grads[SAVE_AT:]:
                p, st = _step(dp, p, g, st)
            results[key][name] = _listed(p)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_save_and_merge_the_counts(tmp_path):
    from test_distributed import run_ranks

    for shard in (False, True):  # the 1 -> 2 checkpoint
        _saved(tmp_path / f"one-{shard}", shard)
    out, init = str(tmp_path / "out"), str(tmp_path / "init")
    results, logs = run_ranks(lambda r: [__file__, str(r), "2", init, out, str(tmp_path)],
                              out, 2, 240, 30, "sharded missed counts")
    for r, res in enumerate(results):
        if res is None:
            pytest.fail(f"rank {r} wrote nothing:\n{logs[r].decode()[-3000:]}")
    for shard in (False, True):
        whole = _unbroken(shard)
        key = f"shard={shard}"
        if shard:  # b is held (and its count saved) by one rank only
            assert [("b" in res[key]["held"]) for res in results] == [False, True]
            assert [res[key]["missed"] for res in results] == [{}, {"b": 3}]
        for r, res in enumerate(results):
            want_missed = {"b": 3} if "b" in res[key]["held"] else {}
            for name in ("whole", "resumed", "from_one"):
                for n in whole:
                    np.testing.assert_allclose(np.array(res[key][name][n]), whole[n], rtol=0,
                                               atol=TOL, err_msg=f"rank {r} {key} {name} {n}")
            for name in ("resumed", "from_one"):
                assert res[key][name + "/missed"] == want_missed, (r, key, name)
        # 2 -> 1: the merged counts, and the run on as the unbroken one
        dp = DataParallel(Adam(LR), shard_state=shard)
        p, st = load_sharded(tmp_path / f"two-{shard}", dp)
        assert st.local.missed_counts() == {"b": 3}
        for g in _problem()[1][SAVE_AT:]:
            p, st = _step(dp, p, g, st)
        for n in whole:
            np.testing.assert_allclose(np.asarray(p[n]), whole[n], rtol=0, atol=TOL, err_msg=n)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
