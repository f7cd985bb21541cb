"""PyTorch backend: gradients from autograd.

``get_parameters()`` returns leaf tensors that do not require grad: a ``torch.optim``
optimizer can update them in place and the next ``evaluate`` sees the new values.
``evaluate(..., output_gradients=...)`` differentiates detached aliases of them, so
no autograd graph outlives a call.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..compiler.codegen import forward_plan
from .backend import Backend, Evaluator
from .helpers import dtype_arg, refuse_device_mesh


class _TorchNumpy:
    """The few numpy-style functions operator forwards use, on torch tensors."""

    def __init__(self) -> None:
        import torch

        self.t = torch
        self.F = torch.nn.functional  # fused kernels for the operators (``functional_of``)
        #: the model's float dtype (the backend's), for results torch would otherwise give
        #: in its default dtype (an integer quotient)
        self.float_dtype = torch.float32
        self.tanh, self.exp, self.log, self.sqrt, self.where = (
            torch.tanh, torch.exp, torch.log, torch.sqrt, torch.where)

    def maximum(self, x: Any, y: Any) -> Any:
        if isinstance(y, self.t.Tensor):
            return self.t.maximum(x, y)
        # relu's backward (mask from the output) is cheaper than clamp_min's
        return self.t.relu(x) if y == 0 else self.t.clamp_min(x, y)

    def max(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        return self.t.amax(x, dim=axis, keepdim=keepdims) if axis is not None else x.max()

    def sum(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        return self.t.sum(x, dim=axis, keepdim=keepdims) if axis is not None else x.sum()

    def mean(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        return self.t.mean(x, dim=axis, keepdim=keepdims) if axis is not None else x.mean()

    def take_along_axis(self, x: Any, idx: Any, axis: int) -> Any:
        return self.t.gather(x, axis, idx.long())


def _from_numpy(data: Any) -> Any:
    """A tensor sharing ``data``'s memory when it can, else a copy (read-only buffers, such
    as JAX arrays seen through NumPy, must not be aliased; torch takes no negative strides
    and no ml_dtypes bfloat16)."""
    import torch

    a = np.asarray(data)
    if a.dtype.name == "bfloat16":
        return torch.as_tensor(a.astype(np.float32)).to(torch.bfloat16)
    return torch.as_tensor(a if a.flags.writeable and a.flags.c_contiguous else a.copy())


def torch_device(device: Any, who: str) -> Any:
    """``device`` (``"cpu"``, ``"cuda:1"``, a ``torch.device``; ``None`` is ``"cpu"``) as a
    ``torch.device`` this process can put tensors on, else a ``ValueError`` naming it and the
    devices there are: torch itself accepts ``"cuda"`` on a machine without CUDA and fails
    at the first tensor, deep inside (``AssertionError: Torch not compiled with CUDA``)."""
    import torch

    try:
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda":  # (without creating a CUDA context, as a tensor would)
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0 or (dev.index or 0) >= n:
                raise RuntimeError(f"{n} CUDA device(s) present")
        elif dev.type not in ("cpu", "meta"):
            torch.empty(0, device=dev)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())
                           if torch.cuda.is_available()]
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]  # (torch's start)
        raise ValueError(f"{who}(device={device!r}): no such torch device here ({why}); "
                         f"devices present: {found}") from None
    return dev


_TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64", "int64", "int32", "int16", "int8",
                 "uint8", "bool")


class _TorchHelpers:
    """``numpy``-named functions on tensors, for the backend's array helpers."""

    def __init__(self) -> None:
        import torch

        self.t = torch
        for name in ("abs", "sign", "sin", "cos", "tanh", "exp", "log", "sqrt", "where", "isnan",
                     "nan_to_num", "reshape", "squeeze", "all", "any", "zeros_like", "ones_like"):
            setattr(self, name, getattr(torch, name))

    def _red(self, fn: Any, x: Any, axis: Any, keepdims: bool) -> Any:
        return fn(x) if axis is None and not keepdims else fn(
            x, dim=axis if axis is not None else tuple(range(x.ndim)), keepdim=keepdims)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self._red(self.t.sum, x, axis, keepdims)

    def mean(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self._red(self.t.mean, x, axis, keepdims)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self._red(self.t.amax, x, axis, keepdims)

    def min(self, x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self._red(self.t.amin, x, axis, keepdims)

    def argmax(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        out = self.t.argmax(x, dim=axis, keepdim=keepdims)
        return out.reshape((1,) * x.ndim) if axis is None and keepdims else out

    def argmin(self, x: Any, axis: int | None = None, keepdims: bool = False) -> Any:
        out = self.t.argmin(x, dim=axis, keepdim=keepdims)
        return out.reshape((1,) * x.ndim) if axis is None and keepdims else out

    def clip(self, x: Any, lo: Any, hi: Any) -> Any:
        return self.t.clamp(x, lo, hi)

    def sort(self, x: Any, axis: int = -1) -> Any:
        return self.t.sort(x, dim=axis).values

    def flip(self, x: Any, axis: int) -> Any:
        return self.t.flip(x, dims=(axis,))

    def transpose(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.permute(*axes)

    def expand_dims(self, x: Any, axis: int) -> Any:
        return x.unsqueeze(axis)

    def stack(self, xs: list[Any], axis: int = 0) -> Any:
        return self.t.stack(xs, dim=axis)

    def concatenate(self, xs: list[Any], axis: int = 0) -> Any:
        return self.t.cat(xs, dim=axis)

    def pad(self, x: Any, widths: list[tuple[int, int]]) -> Any:
        flat = [v for w in reversed(widths) for v in w]  # torch lists the last axis first
        return self.t.nn.functional.pad(x, flat)


class TorchBackend(Backend):
    """Arrays are ``torch.Tensor`` on ``device`` (default ``"cpu"``)."""

    name = "torch"

    def __init__(self, dtype: str | None = None, seed: int = 0, device: Any = "cpu", *,
                 precision: int | None = None, device_mesh: Any = None) -> None:
        """``dtype`` / ``precision`` and ``seed`` as :class:`~mithril.backends.Backend`;
        ``device``: a torch device (``"cpu"``, ``"cuda:0"``); ``device_mesh`` is refused (see
        :mod:`mithril.distributed`)."""
        refuse_device_mesh(device_mesh, "TorchBackend")
        import torch

        self.device = torch_device(device, "TorchBackend")
        self.native_type = torch.Tensor
        super().__init__(dtype, seed, precision=precision)
        self._namespaces()

    def _namespaces(self) -> None:
        import torch

        self._xp = _TorchNumpy()  # the operators' forwards
        self._xp.float_dtype = getattr(torch, self.dtype)
        self._helpers = _TorchHelpers()

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle`` (an optimizer or its state holds its
        backend): the settings and the generator's state, without the torch namespaces."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_xp", "_helpers")}
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.device = torch_device(state["device"], "TorchBackend")
        self._namespaces()

    is_manualgrad = False

    def _ns(self) -> Any:
        return self._helpers

    def set_seed(self, seed: int) -> None:
        import torch

        super().set_seed(seed)
        torch.manual_seed(self.seed)

    def native_dtype(self, name: str | None = None) -> Any:
        import torch

        name = name or self.dtype
        if name not in _TORCH_DTYPES:
            raise ValueError(f"unsupported dtype {name!r}")
        return getattr(torch, name)

    def array(self, data: Any, dtype: Any = None, device_mesh: Any = None) -> Any:
        """``data`` as a tensor on the backend's device (floats in the backend dtype unless
        ``dtype``: a name, ``ml.float32`` or a torch / NumPy dtype)."""
        refuse_device_mesh(device_mesh, "TorchBackend.array")
        import torch

        dtype = dtype if dtype is None or isinstance(dtype, str) else dtype_arg(dtype)
        t = data if isinstance(data, torch.Tensor) else _from_numpy(data)
        if dtype is None and t.is_floating_point():
            dtype = self.dtype
        return t.to(device=self.device, dtype=self.native_dtype(dtype) if dtype else None)

    def to_torch(self, x: Any) -> Any:
        """A tensor on this backend's device (numpy / jax arrays are converted)."""
        import torch

        return (x if isinstance(x, torch.Tensor) else _from_numpy(x)).to(self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            return x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
        return np.asarray(x)

    def stop_gradient(self, input: Any) -> Any:
        return self._native(input).detach()

    def to_device(self, data: Any, device: str, asynchronous: bool = True) -> Any:
        """``data`` on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
        dev = torch_device(device, "TorchBackend.to_device")
        return self._native(data).to(dev, non_blocking=asynchronous)

    def block_until_ready(self, data: Any = None) -> Any:
        """Wait for the device's queued work (CUDA); returns ``data``."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return data

    def empty_cache(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def evaluator(self, program: Any, jit: bool) -> Evaluator:
        return _TorchEvaluator(program, self._xp)


def _engine() -> Any:
    """torch's own call into its C++ autograd engine (what ``torch.autograd.grad`` ends in,
    after its Python checks of the arguments: ~10 µs of a small model's step), or None where
    this torch has no such function (``torch.autograd.grad`` is then called)."""
    try:
        from torch.autograd.graph import _engine_run_backward
    except ImportError:  # pragma: no cover - torch < 2.2
        return None
    return _engine_run_backward


class _TorchEvaluator(Evaluator):
    """The program's forward as straight-line Python generated from it (made on first use;
    see :mod:`~mithril.compiler.codegen`), differentiated by torch's autograd.

    The backward pass goes to torch's autograd engine directly when every output and
    cotangent is a plain ``torch.Tensor`` of the same shape (what ``torch.autograd.grad``
    checks in Python first; the compiled model has checked the cotangents' dtypes): the
    same engine call, so the same gradients, bit for bit. Otherwise (a tensor subclass with
    ``__torch_function__``, a shape that differs) ``torch.autograd.grad`` runs, and raises
    what it raises."""

    def __init__(self, prog: Any, xp: _TorchNumpy) -> None:
        self.prog, self.xp = prog, xp
        self._plan: Any = None
        self._torch = xp.t
        self._set_grad = xp.t._C._set_grad_enabled
        self._engine = _engine()
        #: device cotangents found to be 1 (by object: its version then, and the answer)
        self._units: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _run(self, params: Mapping[str, Any], inputs: Mapping[str, Any], run: Any) -> dict:
        if self._plan is None:
            self._plan = forward_plan(self.prog)
        return self._plan(self.xp, params, inputs, run)

    def forward(self, params: Mapping[str, Any], inputs: Mapping[str, Any],
                run: Any = None) -> dict[str, Any]:
        with self._torch.no_grad():
            return self._run(params, inputs, run)

    def forward_vjp(self, params, inputs, cotangents, run=None):
        torch = self._torch
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        was = torch.is_grad_enabled()
        self._set_grad(True)  # (torch.enable_grad's own switch, without its object)
        try:
            out = self._run(leaves, inputs, run)
        finally:
            self._set_grad(was)
        if run is not None:
            run.new_state = {k: v.detach() for k, v in run.new_state.items()}
        names = [k for k in cotangents if out[k].requires_grad]
        if names and leaves:  # (no leaves: the engine would write .grad of a given input)
            grads = self._grad([out[k] for k in names], [cotangents[k] for k in names],
                               tuple(leaves.values()))
            gdict = {k: g if g is not None else torch.zeros_like(params[k])
                     for k, g in zip(leaves, grads)}
        else:
            gdict = {k: torch.zeros_like(v) for k, v in params.items()}
        return {k: v.detach() for k, v in out.items()}, gdict

    def _grad(self, outs: list, cots: list, leaves: tuple) -> Any:
        """The gradients of ``leaves`` (None where unreached) for ``outs`` given ``cots``."""
        torch = self._torch
        tensor = torch.Tensor
        if self._engine is not None and all(type(x) is tensor for x in (*outs, *cots)) \
                and all(o.shape == c.shape for o, c in zip(outs, cots)):  # (else grad says so)
            return self._engine(tuple(outs), tuple(cots), False, False, leaves, True, False)
        return torch.autograd.grad(outs, leaves, [None if self._unit(o, c) else c
                                                  for o, c in zip(outs, cots)],
                                   allow_unused=True)

    def _unit(self, out: Any, cot: Any) -> bool:
        """Whether ``cot`` is a 1 of ``out``'s one-element shape and dtype (a loss's 1.0),
        which torch then makes itself (``grad_outputs`` None: ``ones_like(out)``, the same
        bits). torch checks a given cotangent's shape with its symbolic-shape machinery,
        whose first use in a process imports sympy (~0.35 s of a first training step). A
        CPU value is read every call (~1 us); a device one once per version of the tensor
        (an in-place change bumps it), since reading it waits for the device."""
        if (out.numel() != 1 or cot.shape != out.shape or cot.dtype != out.dtype
                or cot.device != out.device or cot.requires_grad):
            return False
        if cot.device.type == "cpu":
            return bool(cot.item() == 1)
        seen = self._units.get(cot)
        if seen is None or seen[0] != cot._version:
            seen = self._units[cot] = (cot._version, bool(cot.item() == 1))
        return seen[1]
