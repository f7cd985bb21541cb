"""The parameters a :class:`~.torch_optim.TorchOptimizer` is given: checked (floating
point or complex, leaves, one dtype and device, none repeated or sharing memory) and named, from a plain
iterable of tensors, of ``(name, tensor)`` pairs, or torch's list of parameter-group dicts,
or a group added later (:func:`added_parameters`); and what a step does with them (counts
its update in their version counters, tells whether one still lies in the flat buffer,
densifies a sparse gradient)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import KeyMismatchError
from .torch_optim_complex import real_dtype

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def split(params: Any, start: int = 0
          ) -> tuple[list[Any], list[dict[str, Any]] | None, list[int]]:
    """(every group's parameter items in order, each torch group's other entries, the
    number of parameters of each); the entries are None for a plain iterable of tensors or
    of (name, tensor) pairs. Errors name ``param_groups[start + i]``."""
    if isinstance(params, (torch.Tensor, Mapping)) or not isinstance(params, Iterable):
        return params, None, []
    items = list(params)
    if not any(isinstance(x, Mapping) for x in items):
        return items, None, []
    flat: list[Any] = []
    extras, counts = [], []
    for i, g in enumerate(items, start):
        if not isinstance(g, Mapping):
            raise TypeError(f"params mix parameter-group dicts with a {type(g).__name__} "
                            f"(item {i}): give a list of dicts, each with 'params'")
        if "params" not in g:
            raise KeyMismatchError(f"param_groups[{i}] has no 'params'")
        ps = g["params"]
        if isinstance(ps, torch.Tensor):
            ps = [ps]  # (torch takes one tensor there too)
        elif isinstance(ps, (set, Mapping)) or not isinstance(ps, Iterable):
            raise TypeError(f"param_groups[{i}]['params'] must be a list of tensors or of "
                            f"(name, tensor) pairs, got {type(ps).__name__}")
        ps = list(ps)
        flat += ps
        counts.append(len(ps))
        extras.append({k: v for k, v in g.items() if k != "params"})
    return flat, extras, counts


def parameters(params: Any, allow_empty: bool = False
               ) -> tuple[list[str], list[torch.Tensor], bool]:
    """(names, tensors, whether named) from an iterable of tensors or (name, tensor) pairs
    (``allow_empty``: none may be given, as torch takes groups that are all empty, e.g.
    ``[{"params": []}]`` to ``add_param_group`` to later)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors (e.g. model.parameters() or "
                        "model.named_parameters()), got a single tensor")
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}")
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    if not items and not allow_empty:
        raise ValueError("torch_optimizer got an empty parameter list")
    named = bool(items) and isinstance(items[0], tuple)
    if named:
        bad = [x for x in items if not (isinstance(x, tuple) and len(x) == 2
                                        and isinstance(x[0], str))]
        if bad:
            raise TypeError(f"params mix (name, tensor) pairs with other items, e.g. "
                            f"{type(bad[0]).__name__}")
        names, tensors = [x[0] for x in items], [x[1] for x in items]
    else:
        if any(isinstance(x, tuple) for x in items):
            raise TypeError("params mix tensors with (name, tensor) pairs")
        names, tensors = [f"param{i}" for i in range(len(items))], items
    for name, p in zip(names, tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter '{name}' is a {type(p).__name__}, not a torch tensor")
        if not (p.is_leaf or p.retains_grad):
            raise ValueError(f"parameter '{name}' is not a leaf tensor: can't optimize it")
        # (float8 too: it passed here and was refused by the first step(), after the
        # model was built and a forward/backward run)
        if real_dtype(p) not in _DTYPES:
            raise TypeError(f"parameter '{name}' has dtype {p.dtype}; optimizers need "
                            f"floating-point (or complex) parameters: float16, bfloat16, "
                            f"float32 or float64")
    seen: dict[int, str] = {}
    for name, p in zip(names, tensors):
        if id(p) in seen:
            raise ValueError(f"parameter '{name}' is the same tensor as '{seen[id(p)]}': pass "
                             f"each parameter once")
        seen[id(p)] = name
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names repeat: {dup}")
    check_no_overlap(names, tensors)
    # (a complex parameter is optimized as its real view: complex64 with float32 is one dtype)
    for what, key in (("dtype", lambda p: str(real_dtype(p))),
                      ("device", lambda p: str(p.device))):
        found: dict[str, list[str]] = {}
        for name, p in zip(names, tensors):
            found.setdefault(key(p), []).append(name)
        if len(found) > 1:
            ranked = sorted(found.items(), key=lambda kv: -len(kv[1]))
            odd = [n for _, ns in ranked[1:] for n in ns]
            raise TypeError(f"parameters mix {what}s ({'; '.join(f'{k}: {v}' for k, v in ranked)})"
                            f": one optimizer needs one {what}; the odd one(s) out: {odd}")
    return names, tensors, named


def check_no_overlap(names: list[str], tensors: list[torch.Tensor]) -> None:
    """``ValueError`` naming two parameters whose memory overlaps (``b.data = a.data``).
    Why: torch.optim updates such a shared storage with both gradients; here each parameter
    moves to its own slice of the flat buffer, so the tie was broken silently."""
    spans = []
    for name, p in zip(names, tensors):
        if p.numel():
            ext = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
            spans.append((p.data_ptr(), p.data_ptr() + ext * p.element_size(), name))
    spans.sort()
    end, last = -1, ""
    for start, stop, name in spans:
        if start < end:
            raise ValueError(f"parameters '{last}' and '{name}' share memory (e.g. b.data = "
                             f"a.data): a mithril torch_optimizer keeps each parameter in its "
                             f"own slice of one buffer and cannot keep them tied; share one "
                             f"Parameter instead (pass it once)")
        if stop > end:
            end, last = stop, name


def added_parameters(items: list[Any], group: int, count: int, by_name: bool,
                     existing: Sequence[tuple[str, torch.Tensor]]
                     ) -> tuple[list[str], list[Any]]:
    """(names, tensors) of the parameter ``items`` of a group added later
    (``param_groups[group]``; ``count`` parameters before it): ``(name, tensor)`` pairs if
    the groups have names (``by_name``), else tensors, named ``param{count + i}``. Refused
    as torch refuses them: names in some groups only, a parameter of another group
    (``existing``: (name, tensor) of each). The rest is checked by :func:`parameters`."""
    pairs = [isinstance(x, tuple) for x in items]
    if any(pairs) and not all(pairs):
        raise TypeError(f"param_groups[{group}]['params'] mix tensors with (name, tensor) pairs")
    named = bool(items) and all(pairs)
    if named != by_name:
        raise ValueError(f"all optimizer param groups should be with/without names. cannot "
                         f"add param group {'with' if named else 'without'} names to the "
                         f"optimizer (param_groups[{group}])")
    if named:
        bad = [x for x in items if len(x) != 2 or not isinstance(x[0], str)]
        if bad:
            raise TypeError(f"param_groups[{group}]['params'] must be (name, tensor) pairs, "
                            f"got {bad[0]!r:.80}")
        names, tensors = [x[0] for x in items], [x[1] for x in items]
    else:
        names, tensors = [f"param{count + i}" for i in range(len(items))], list(items)
    held = {id(p): n for n, p in existing}
    for name, p in zip(names, tensors):
        if id(p) in held:
            raise ValueError(f"some parameters appear in more than one parameter group "
                             f"(param_groups[{group}]: '{name}' is '{held[id(p)]}', already "
                             f"optimized)")
    return names, tensors


#: sets autograd version counters (torch-private; without it, a graph built before a step is
#: not known to be stale, see TorchOptimizer.step)
SET_VERSIONS = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


def count_in_place(stepped: list[torch.Tensor]) -> None:
    """Count an update written behind autograd's back as the in-place update it is, so that
    a backward through a graph built before the step fails as with torch.optim instead of
    using the new values."""
    if SET_VERSIONS is not None and stepped:
        SET_VERSIONS(stepped, [p._version + 1 for p in stepped])


def lies_at(p: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether parameter ``p`` is the array ``v`` (address, shape and strides: a transposed
    square matrix has the first two)."""
    return p.data_ptr() == v.data_ptr() and p.shape == v.shape and p.stride() == v.stride()


def lies_at_real(p: torch.Tensor, v: torch.Tensor) -> bool:
    """:func:`lies_at` of a complex parameter too (as its real view: torch_optim_complex)."""
    if not p.is_complex():
        return lies_at(p, v)
    return not p.is_conj() and lies_at(torch.view_as_real(p.detach()), v)


def dense(g: torch.Tensor) -> torch.Tensor:
    """A sparse gradient (``nn.Embedding(sparse=True)``, ``EmbeddingBag``) as the dense one
    it stands for (duplicate indices summed). Why: the update reads dense arrays, and a
    sparse one failed every step with a TypeError where ``torch.optim.SGD`` / ``Adagrad``
    take it; their sparse updates equal the dense update of the densified gradient (rows
    without a gradient move only by what a zero gradient gives)."""
    return g if g.layout == torch.strided else g.to_dense()
