"""The array helpers of data-parallel training, for the NumPy arrays and torch tensors a
rank holds alike: the library of an array, a zero buffer or small float64 vector like
it, its host (NumPy) view, dtype name and size, Σx² in float64, and in-place scaling."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__: list[str] = []


def _kind(p: Any, other: Any = "raise") -> Any:
    """``"numpy"`` or ``"torch"``; for anything else ``other``, or where that is
    ``"raise"``, a NotImplementedError."""
    if isinstance(p, np.ndarray):
        return "numpy"
    if type(p).__module__.split(".", 1)[0] == "torch":
        return "torch"
    if other != "raise":
        return other
    raise NotImplementedError(f"DataParallel works on NumPy and torch arrays (torch.distributed); "
                              f"got a {type(p).__module__}.{type(p).__name__}")


def _empty(n: int, like: Any) -> Any:
    if isinstance(like, np.ndarray):
        return np.zeros(n, dtype=like.dtype)
    import torch

    return torch.zeros(n, dtype=like.dtype, device=like.device)


def _host(x: Any) -> np.ndarray:
    """``x`` as a NumPy array (a torch bfloat16 tensor as its exactly equal float32 values:
    NumPy has no bfloat16)."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach()
    if str(x.dtype) == "torch.bfloat16":
        x = x.float()
    return x.cpu().numpy()


def _dtype_name(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


_sumsq_kernel: Any = None


def _sumsq(x: Any) -> float:
    """Σx² accumulated in float64, one read of ``x`` (a small numba loop: BLAS would need a
    float64 copy, and contends with the optimizer's threads)."""
    global _sumsq_kernel
    if len(x) == 0:
        return 0.0
    if not isinstance(x, np.ndarray):
        if x.device.type != "cpu" or str(x.dtype) == "torch.bfloat16":  # (no NumPy view)
            import torch

            return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
        x = x.detach().numpy()
    if x.dtype not in (np.float32, np.float64):
        return float(np.sum(np.square(x, dtype=np.float64)))
    if _sumsq_kernel is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kernel(a: Any) -> float:  # pragma: no cover - compiled
            t = 0.0
            for i in range(a.shape[0]):
                v = np.float64(a[i])
                t += v * v
            return t

        _sumsq_kernel = kernel
    return float(_sumsq_kernel(x))


def _divide(x: Any, n: float) -> None:
    if isinstance(x, np.ndarray):
        x /= n
    else:
        x.div_(n)


def _multiply(x: Any, s: float) -> None:
    if isinstance(x, np.ndarray):
        x *= s
    else:
        x.mul_(s)


def _small(values: list[float], like: Any) -> Any:
    """A float64 vector on ``like``'s device (the small all-reduces)."""
    if isinstance(like, np.ndarray):
        return np.array(values, dtype=np.float64)
    import torch

    return torch.tensor(values, dtype=torch.float64, device=like.device)


def _nbytes(x: Any) -> int:
    return int(x.nbytes) if isinstance(x, np.ndarray) else int(x.element_size() * x.numel())
