"""PNG figures of the commands, drawn with matplotlib's Agg canvas (no display, no pyplot
global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import atomic_file


def _figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    """Draw ``fig`` into ``path`` (format from its suffix) through a temporary file."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format=Path(path).suffix.lstrip(".").lower() or "png")
    return path


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so curves stay aligned with steps."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(np.nan_to_num(v), 0, 0.0))
    n = np.arange(1, v.size + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)


def _window(n_steps: int, steps_per_epoch: int) -> int:
    return max(1, min(steps_per_epoch, n_steps // 20))


def training_figure(result: Any, path: Path, steps_per_epoch: int) -> Path:
    """Loss, accuracy, learning rate and gradient norm against the step."""
    fig, ax = _figure(2, 2, (11, 7.5))
    s = result.steps
    step = np.array([r["step"] for r in s])
    ep = result.epochs
    ep_step = [e["step"] for e in ep]
    w = _window(len(s), steps_per_epoch)
    loss = [r["loss"] for r in s]
    key = getattr(result, "metric", "acc")  # "rmse" for regression
    acc = [r[key] for r in s]

    a = ax[0, 0]
    a.plot(step, loss, color="tab:blue", alpha=0.25, lw=0.8, label="batch")
    a.plot(step, smooth(loss, w), color="tab:blue", lw=1.5, label=f"batch (mean of {w})")
    a.plot(ep_step, [e["train_loss"] for e in ep], "o-", color="tab:green", ms=3, label="train")
    a.plot(ep_step, [e["test_loss"] for e in ep], "s-", color="tab:red", ms=3, label="test")
    a.set(title="loss", xlabel="step", yscale="log")
    a.legend(fontsize=8)

    a = ax[0, 1]
    a.plot(step, smooth(acc, w), color="tab:blue", lw=1.5, label=f"batch (mean of {w})")
    a.plot(ep_step, [e[f"train_{key}"] for e in ep], "o-", color="tab:green", ms=3, label="train")
    a.plot(ep_step, [e[f"test_{key}"] for e in ep], "s-", color="tab:red", ms=3, label="test")
    if key == "acc":
        a.set(title="accuracy", xlabel="step",
              ylim=(max(0.0, min(acc, default=0) - 0.02), 1.005))
        a.legend(fontsize=8, loc="lower right")
    else:
        a.set(title="RMSE (the target's units)", xlabel="step", yscale="log")
        a.legend(fontsize=8)

    a = ax[1, 0]
    a.plot(step, [r["lr"] for r in s], color="tab:purple")
    a.set(title="learning rate (used by each step)", xlabel="step")
    a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    a = ax[1, 1]
    norms = np.array([r["grad_norm"] for r in s], dtype=np.float64)
    a.plot(step, norms, color="tab:orange", alpha=0.3, lw=0.8)
    a.plot(step, smooth(norms, w), color="tab:orange", lw=1.5)
    a.set(title="global gradient norm (before clipping)", xlabel="step", yscale="log")

    cfg = result.config
    status = "  [interrupted]" if result.interrupted else ""
    f = result.final
    score = f"test acc {f['test_acc']:.2%}" if key == "acc" else \
        f"test RMSE {f['test_rmse']:.4g}, R² {f['test_r2']:.4f}"
    if "test_bpc" in f:
        score += f", {f['test_bpc']:.3f} bits/char"
    what = getattr(result, "model", f"digits MLP {list(cfg.hidden)}")
    fig.suptitle(f"{what} · {cfg.backend} · {result.label} · "
                 f"batch {cfg.batch_size} · seed {cfg.seed}\n"
                 f"schedule: {result.schedule} · {score}{status}", fontsize=9)
    return _save(fig, path)


def compare_figure(results: Sequence[Any], labels: Sequence[str], path: Path,
                   steps_per_epoch: int, title: str) -> Path:
    """Smoothed training loss against the step, and test accuracy (a regression: test RMSE)
    after each epoch."""
    fig, ax = _figure(1, 2, (12, 4.8))
    rmse = bool(results) and results[0].metric == "rmse"
    key = "test_rmse" if rmse else "test_acc"
    for res, label in zip(results, labels):
        steps = [r["step"] for r in res.steps]
        w = _window(len(steps), steps_per_epoch)
        final = f"{res.final[key]:.4g}" if rmse else f"{res.final[key]:.1%}"
        line, = ax[0, 0].plot(steps, smooth([r["loss"] for r in res.steps], w), lw=1.4,
                              label=f"{label} ({final})")
        ax[0, 1].plot([e["epoch"] for e in res.epochs], [e[key] for e in res.epochs],
                      "o-", ms=3, color=line.get_color(), label=label)
    ax[0, 0].set(title="training loss (moving average over batches)", xlabel="step",
                 yscale="log")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].set(title="test RMSE" if rmse else "test accuracy", xlabel="epoch")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def schedule_figure(lrs: Sequence[float], path: Path, title: str,
                    marks: Sequence[tuple[int, str]] = ()) -> Path:
    """The learning rate of each step, with vertical lines at ``marks`` (step, label)."""
    fig, ax = _figure(1, 1, (8, 4))
    a = ax[0, 0]
    a.plot(np.arange(len(lrs)), lrs, color="tab:purple", lw=1.5)
    for step, label in marks:
        a.axvline(step, color="grey", ls=":", lw=1)
        a.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=8,
                   rotation=90, va="top", ha="right", color="grey")
    a.set(xlabel="step", ylabel="learning rate", title=title)
    a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    a.grid(alpha=0.3)
    return _save(fig, path)
