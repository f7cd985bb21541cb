"""A checkpoint's bytes depend only on what is saved: the same training run saved in two
fresh processes (different hash seeds) gives the same file, byte for byte. safetensors keeps
the header's ``__metadata__`` in a hash map, so before ``checkpoint_io.encode`` fixed its
order two processes wrote the same checkpoint in up to six different headers (digests
included), and a build that hashes its artefacts saw a new file every run."""

from __future__ import annotations

import hashlib
import json

from conftest import run_python

SAVE = """
import hashlib
import numpy as np
from mithril.utils.checkpoint import load_checkpoint, save_checkpoint
from mithril.utils.lr_schedulers import StepLR
from mithril.utils.optimizers import AdamW

rng = np.random.default_rng(0)
params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4),
          "é": rng.standard_normal(2)}
opt = AdamW(learning_rate=1e-2, weight_decay=0.1, ema_decay=0.9)
sched = StepLR(opt, step_size=2, gamma=0.5)
state = opt.init(params)
for _ in range(3):
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    params, state = opt.update(params, grads, state)
    sched.step()
path = "PATH"
save_checkpoint(path, params, opt, state, sched, extra={"epoch": 3, "seen": [1, 2]})
load_checkpoint(path)  # (it reads back)
print(hashlib.sha256(open(path, "rb").read()).hexdigest())
"""


def test_same_checkpoint_same_bytes_in_fresh_processes(tmp_path):
    digests = set()
    for seed in ("0", "1", "2", "3"):
        path = tmp_path / f"c{seed}.safetensors"
        digests.add(run_python(SAVE.replace("PATH", str(path)), env={"PYTHONHASHSEED": seed}).strip())
    assert len(digests) == 1, digests


def test_metadata_fields_in_fixed_order(tmp_path):
    run_python(SAVE.replace("PATH", str(tmp_path / "c.safetensors")))
    raw = (tmp_path / "c.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert list(header)[0] == "__metadata__"
    assert list(header["__metadata__"]) == ["mithril", "mithril_tensor_sha256", "mithril_sha256"]
    # the stored digest is the header's, with its own 64 digits zeroed
    digest = header["__metadata__"]["mithril_sha256"]
    zeroed = raw[:8 + n].replace(digest.encode(), b"0" * 64)
    assert hashlib.sha256(zeroed).hexdigest() == digest
