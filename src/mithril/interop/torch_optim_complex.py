"""Complex parameters in a :class:`~mithril.interop.torch_optim.TorchOptimizer`, as
``torch.optim`` takes them: each complex tensor is optimized as ``torch.view_as_real`` of it
(its real and imaginary parts two real elements, a trailing axis of 2), which is what every
``torch.optim`` optimizer that takes complex parameters does (SGD, Adam, AdamW, Adamax,
NAdam, RAdam, RMSprop, Adagrad, Adadelta, ASGD, Rprop; LBFGS flattens the real views). The
mithril optimizer sees the real views (a complex64 parameter is a float32 one, so complex
and real parameters of one precision share the flat buffer), and each ``nn.Parameter``
keeps its complex dtype: its data is ``torch.view_as_complex`` of its slice of the buffer,
or its own memory, copied in and out at each step, where real parameters share the buffer
(``torch.save`` refuses a storage viewed as two types: :func:`aliased`).
State slots of the parameter's real shape show as complex tensors (``state_dict()``,
``opt.state[p]``), as torch's; a state dict's complex slots load as their real views.

Optimizers that update a tensor as a matrix or by its axes (Muon, Adafactor, GaLore, SM3,
NoisySGD: :class:`~mithril.utils.optimizers.tensorwise.TensorwiseOptimizer`) are refused
complex parameters by name, as ``torch.optim.Muon`` / ``Adafactor`` refuse them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..utils.optimizers import Optimizer

__all__ = ["aliased", "check_complex", "point", "real", "real_dtype", "reals", "shown_as"]


def real(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, a complex one as its real view (shares its memory; a copy for one
    marked conjugate, e.g. ``p.data = p.data.conj()``, whose real view torch refuses)."""
    t = t.detach()
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def reals(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`real` of each parameter."""
    return [real(p) for p in params]


def point(p: torch.Tensor, v: torch.Tensor, alias: bool = True) -> None:
    """Point parameter ``p`` at the array ``v`` (its slice of the optimizer's buffer,
    real): ``p.data = v``, a complex one's as its complex view, unless ``alias`` is False
    (:func:`aliased`): then ``v`` is copied into ``p``, which keeps its own memory (each
    step copies it in and out), as where the slice, at an odd offset, has no complex
    view."""
    if not p.is_complex():
        p.data = v
        return
    try:
        if alias:
            p.data = torch.view_as_complex(v)
            return
    except RuntimeError:  # (torch: "Tensor must have a storage_offset divisible by 2")
        pass
    torch.view_as_real(p.detach().resolve_conj()).copy_(v)


def aliased(params: Sequence[torch.Tensor]) -> bool:
    """Whether complex ``params`` may lie in the optimizer's buffer: not where real ones
    share it. Why: ``torch.save`` refuses tensors of two types viewing one storage
    ("Cannot save multiple tensors or storages that view the same data as different
    types"), so ``torch.save(model.state_dict())`` of a model holding both failed after
    the first step."""
    kinds = {p.is_complex() for p in params}
    return kinds != {True, False}


def shown_as(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A state slot ``v`` of parameter ``p`` as torch shows it: complex (a view) where ``p``
    is and the slot has its real shape (moments, Rprop's step sizes, ASGD's ``ax``), else
    as it is (0-d values: ASGD's ``eta``, Novograd's ``nu``). A slice at an odd offset of
    the buffer has no complex view: it is shown real (a live view, of shape ``(..., 2)``)
    rather than as a copy whose writes would be lost."""
    if p.is_complex() and v.dim() == p.dim() + 1 and v.shape[-1] == 2 \
            and tuple(v.shape[:-1]) == tuple(p.shape):
        try:
            return torch.view_as_complex(v)
        except RuntimeError:  # (torch: "Tensor must have a storage_offset divisible by 2")
            return v
    return v


def real_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype the optimizer works in for ``p`` (complex64 -> float32)."""
    return p.real.dtype if p.is_complex() else p.dtype


def check_complex(opt: Optimizer, names: Sequence[str], params: Sequence[Any]) -> None:
    """Refuse complex parameters for an optimizer whose update reads a tensor's shape
    (a matrix, a factored or per-axis statistic): on the real view it would be another
    update than torch's (torch's Muon and Adafactor refuse them too)."""
    odd = [n for n, p in zip(names, params)
           if isinstance(p, torch.Tensor) and p.is_complex()]
    if not odd:
        return
    from ..utils.optimizers.tensorwise import TensorwiseOptimizer

    holder = next((h for h in opt.hyper_holders() if isinstance(h, TensorwiseOptimizer)), None)
    if holder is not None:
        name = type(holder).__name__
        raise TypeError(f"{name} does not take complex parameters ({odd[:3]}"
                        f"{' ...' if len(odd) > 3 else ''}): it updates each tensor by its "
                        f"shape (torch.optim.Muon and Adafactor refuse them too); optimize "
                        f"torch.view_as_real of them as real parameters, or use an "
                        f"elementwise optimizer (Adam, SGD, ...)")
