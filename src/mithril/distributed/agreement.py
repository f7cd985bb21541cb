"""What every rank must hold alike, compared: descriptions (parameter names, shapes,
dtypes; the optimizer's settings) at ``init``, and the optimizer's settings at every step.

torch's DDP compares the parameters' shapes at construction and nothing of the optimizer:
a learning rate, a clipping threshold or a scheduler differing between ranks makes the
replicas drift apart silently, and a non-finite policy differing makes the ranks run
different collectives (a hang until the timeout). Here a differing setting is a
``ValueError`` naming it, on every rank, before anything changes: at ``init`` from the
whole description (one all-gather of a digest), at every step from three 16-bit digests
carried in the step's first all-reduce (:func:`settings_votes`: the sum of ``k`` and of
``k²`` over ``N`` ranks satisfy ``N·Σk² = (Σk)²`` exactly iff every ``k`` is equal).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any

from . import process_group as pg

#: the settings' digest is cut into this many 16-bit numbers: sums of their squares stay
#: exact in float64 up to 2**21 ranks, and unequal settings look equal with odds 2**-48
_PARTS = 3


def _plain(x: Any) -> Any:
    """A JSON value for a setting json cannot write: a number as a float, an array as a
    list, a callable (a group's name filter) by its name: its code cannot be compared."""
    if isinstance(x, numbers.Real):
        return float(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return getattr(x, "__qualname__", type(x).__name__)


def _public(opt: Any) -> dict[str, Any]:
    """``opt``'s settings as given (not :meth:`hyperparameters`: it lists a callable group
    by the names it matched at the last ``init``, which a sharded rank ran on its own
    tensors); a wrapped optimizer's (Lookahead's ``inner``) by its own."""
    out: dict[str, Any] = {k: _public(v) if hasattr(v, "hyperparameters") else v
                           for k, v in vars(opt).items() if not k.startswith("_")}
    for key, attr in (("param_groups", "_groups"), ("weight_decay_mask", "_wd_mask"),
                      ("exclude_weight_decay", "_wd_exclude")):
        if opt.__dict__.get(attr):
            out[key] = opt.__dict__[attr]
    return out


def settings(opt: Any) -> dict[str, Any]:
    """``opt``'s settings, flattened to dotted keys (``Adam.learning_rate``,
    ``Lookahead.inner.beta1``), JSON-normalised."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        else:
            out[prefix] = v

    walk(type(opt).__name__, _public(opt))
    return json.loads(json.dumps(out, default=_plain))


def same_everywhere(what: str, desc: dict[str, Any]) -> None:
    """Refuse, on every rank alike, a description that differs between ranks: a ValueError
    naming the first differing key, or the first differing ``[name, shape, dtype]`` of
    ``desc["params"]``, and the rank (a digest first: the whole only where they differ)."""
    text = json.dumps(desc, default=_plain, sort_keys=True)
    label = f"{what} (all-gather)"
    if len(set(pg.all_gather_bytes(pg.digest(text.encode()), label))) == 1:
        return
    every = [json.loads(d) for d in pg.all_gather_bytes(text.encode(), label)]
    ref = every[0]
    for r, d in enumerate(every[1:], 1):
        if d == ref:
            continue
        for key in [*ref, *(k for k in d if k not in ref)]:  # (a key one rank lacks too)
            if key != "params" and d.get(key) != ref.get(key):
                raise ValueError(f"{what}: rank {r} has {key}={d.get(key)!r}, rank 0 "
                                 f"{ref.get(key)!r} (every rank must use the same settings)")
        a, b = ref.get("params", []), d.get("params", [])
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            if x != y:
                name = (x or y)[0]
                raise ValueError(f"{what}: the ranks' parameters differ, first at "
                                 f"parameter {i} '{name}': rank 0 has {x}, rank {r} has {y} "
                                 f"([name, shape, dtype]; every rank must hold the same "
                                 f"parameters, in the same order)")
    raise ValueError(f"{what}: the ranks' descriptions differ")


def settings_votes(opt: Any) -> list[float]:
    """``k`` and ``k²`` for each 16-bit part ``k`` of the digest of ``opt``'s settings:
    numbers to add to a step's first all-reduce (summed exactly in float64)."""
    h = pg.digest(json.dumps(settings(opt), sort_keys=True).encode())
    ks = [int.from_bytes(h[2 * i:2 * i + 2], "big") for i in range(_PARTS)]
    return [float(v) for k in ks for v in (k, k * k)]


def check_settings_votes(what: str, opt: Any, sums: Any, world: int) -> None:
    """Given the summed :func:`settings_votes` of ``world`` ranks (every rank holds the
    same sums, so all take the same branch): return where every rank's settings are
    equal, else name the first differing one on every rank (:func:`same_everywhere`)."""
    s = [int(round(float(v))) for v in sums]
    if all(world * s[i + 1] == s[i] * s[i] for i in range(0, 2 * _PARTS, 2)):
        return
    same_everywhere(what, settings(opt))
