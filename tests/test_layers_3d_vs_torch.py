"""The 3-D (volumetric) layers against ``torch.nn.functional`` / ``torch.nn``.

1. Convolution3D, ConvTranspose3D, MaxPool3D, AvgPool3D, AdaptiveAvg/MaxPool3D, BatchNorm3D,
   InstanceNorm3D, the 3-D padding layers and ``Upsample`` (nearest, trilinear) on
   (N, C, D, H, W): strides, per-side / "same" / "valid" paddings, padding modes, dilations,
   groups, output_padding, ceil_mode, count_include_pad, divisor_override, ties, odd sizes
   and unbatched inputs. The output and every input and parameter gradient in float64 on
   NumPy, torch and JAX (a fresh process: x64) within 1e-10 of torch autograd's. A seeded
   sweep of convolution / pooling configurations runs under ``-m slow`` (a few by default).
2. A small 3-D CNN (Convolution3D → BatchNorm3D → ReLU → MaxPool3D → AdaptiveAvgPool3D →
   Flatten → Linear → cross-entropy) trained 5 Adam steps side by side with the same
   ``torch.nn.Module``: loss, parameters and BatchNorm's running statistics within 1e-10.
3. Wrong ranks and bad arguments named.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, run_python
from layer_edges import Case, compare, run_mithril, torch_pad_order

import mithril as ml
from mithril.backends import NumpyBackend
from mithril.utils.optimizers import Adam

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

_TIES = np.round(1.5 * np.random.default_rng(7).standard_normal((2, 2, 4, 5, 3)))


def unary(fn):
    return lambda t, d: {"output": fn(t["input"])}


def wb(t: dict):
    """The block's weight and bias (None without one) from torch's tensors by full name."""
    return (next((v for k, v in t.items() if k.endswith(".weight")), None),
            next((v for k, v in t.items() if k.endswith(".bias")), None))


def conv_case(shape, *, pads=None, mode="zeros", **kw) -> Case:
    """Convolution3D(**kw) against F.conv3d; ``pads`` (before, after) per axis go through
    F.pad (in ``mode``) first, as nn.Conv3d's padding_mode does."""
    stride, dilation, groups = kw.get("stride", 1), kw.get("dilation", 1), kw.get("groups", 1)

    def ref(t, _):
        w, b = wb(t)
        x = t["input"]
        if pads is None:
            return {"output": F.conv3d(x, w, b, stride, kw.get("padding", 0), dilation, groups)}
        xb = x if x.ndim == 5 else x[None]
        xb = F.pad(xb, torch_pad_order(pads), mode="constant" if mode == "zeros" else mode)
        y = F.conv3d(xb, w, b, stride, 0, dilation, groups)
        return {"output": y if x.ndim == 5 else y[0]}
    return Case(lambda: ml.Convolution3D(padding_mode=mode, **kw), {"input": shape}, ref)


def transpose_case(shape, **kw) -> Case:
    def ref(t, _):
        w, b = wb(t)
        return {"output": F.conv_transpose3d(t["input"], w, b, kw.get("stride", 1),
                                             kw.get("padding", 0), kw.get("output_padding", 0),
                                             kw.get("groups", 1), kw.get("dilation", 1))}
    return Case(lambda: ml.ConvTranspose3D(**kw), {"input": shape}, ref)


def max_case(inputs, **kw) -> Case:
    return Case(lambda: ml.MaxPool3D(**kw), {"input": inputs},
                unary(lambda x: F.max_pool3d(x, **kw)))


def avg_case(shape, **kw) -> Case:
    return Case(lambda: ml.AvgPool3D(**kw), {"input": shape},
                unary(lambda x: F.avg_pool3d(x, **kw)))


def pad_case(block, shape, torch_pad, mode="constant", value=0.0) -> Case:
    def ref(x):
        if mode == "constant":
            return F.pad(x, torch_pad, value=value)
        return F.pad(x[None], torch_pad, mode=mode)[0] if x.ndim == 4 else F.pad(x, torch_pad, mode=mode)
    return Case(block, {"input": shape}, unary(ref))


def nearest_by_gather(x: torch.Tensor, **kw) -> torch.Tensor:
    """torch's 3-D nearest forward as a gather of the indices it reads per axis (autograd then
    gives that forward's true gradient: torch's 3-D backward takes the out = n / 2n shortcuts
    its forward does not, as in 1-D); equal to F.interpolate's output, checked here."""
    y = x
    for ax in range(2, 5):
        probe = torch.zeros(x.shape[2:], dtype=torch.float64)
        probe = probe + torch.arange(float(x.shape[ax])).reshape([-1 if a == ax - 2 else 1 for a in range(3)])
        idx = F.interpolate(probe[None, None], **kw)[0, 0]
        idx = idx.movedim(ax - 2, 0).reshape(idx.shape[ax - 2], -1)[:, 0].long()
        y = y.index_select(ax, idx)
    assert torch.equal(y, F.interpolate(x, **kw))
    return y


def _fuzz(count: int, seed: int) -> dict[str, Case]:
    """``count`` random valid Convolution3D / ConvTranspose3D / MaxPool3D / AvgPool3D cases."""
    rng = np.random.default_rng(seed)
    out: dict[str, Case] = {}
    while len(out) < count:
        kind = ("conv", "transpose", "max", "avg")[len(out) % 4]
        k = tuple(int(v) for v in rng.integers(1, 4, 3))
        s = tuple(int(v) for v in rng.integers(1, 3, 3))
        d = tuple(int(v) for v in rng.integers(1, 3, 3)) if kind != "avg" else (1, 1, 1)
        spatial = tuple(int(v) for v in rng.integers(2, 6, 3))
        batch = () if rng.random() < 0.25 else (int(rng.integers(1, 3)),)
        groups = int(rng.choice([1, 2]))
        cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
        name = f"fuzz{len(out)}_{kind}"
        if kind in ("max", "avg"):
            p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
            if any(dd * (kk - 1) + 1 > n + 2 * pp or kind == "avg" and n < kk  # avg_pool3d's rule
                   for n, kk, dd, pp in zip(spatial, k, d, p)):
                continue
            kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=bool(rng.random() < 0.5))
            if kind == "max":
                out[name] = max_case((*batch, 2, *spatial), dilation=d, **kw)
            else:
                out[name] = avg_case((*batch, 2, *spatial), count_include_pad=bool(rng.random() < 0.5), **kw)
        elif kind == "conv":
            p = tuple(int(v) for v in rng.integers(0, 3, 3))
            if any(dd * (kk - 1) + 1 > n + 2 * pp for n, kk, dd, pp in zip(spatial, k, d, p)):
                continue
            out[name] = conv_case((*batch, cin, *spatial), kernel_size=k, out_channels=cout,
                                  stride=s, padding=p, dilation=d, groups=groups,
                                  use_bias=bool(rng.random() < 0.7))
        else:
            p = tuple(int(v) for v in rng.integers(0, 2, 3))
            op = tuple(int(rng.integers(0, max(a, b))) for a, b in zip(s, d))
            if any((n - 1) * a - 2 * q + e * (kk - 1) + o + 1 <= 0
                   for n, a, q, e, kk, o in zip(spatial, s, p, d, k, op)):
                continue
            out[name] = transpose_case((*batch, cin, *spatial), kernel_size=k, out_channels=cout,
                                       stride=s, padding=p, output_padding=op, dilation=d,
                                       groups=groups, use_bias=bool(rng.random() < 0.7))
    return out


CASES: dict[str, Case] = {
    # -- Convolution3D ----------------------------------------------------------------------
    "conv": conv_case((2, 3, 4, 5, 6), kernel_size=3, out_channels=4),
    "conv_all": conv_case((2, 6, 5, 7, 6), kernel_size=(3, 2, 3), out_channels=6,
                          stride=(1, 2, 2), padding=(1, 0, 2), dilation=(1, 2, 1), groups=3),
    "conv_same": conv_case((1, 2, 5, 4, 6), kernel_size=(2, 3, 4), out_channels=2,
                           padding="same", dilation=(2, 1, 1)),
    "conv_valid_no_bias": conv_case((2, 2, 5, 6, 5), kernel_size=2, out_channels=3, stride=2,
                                    padding="valid", use_bias=False),
    "conv_pairs": conv_case((2, 2, 3, 4, 5), kernel_size=3, out_channels=2,
                            padding=((1, 0), (0, 2), (2, 1)), pads=((1, 0), (0, 2), (2, 1))),
    "conv_unbatched_depthwise": conv_case((3, 4, 3, 5), kernel_size=(2, 2, 3), out_channels=3,
                                          groups=3, stride=(2, 1, 2), padding=1),
    **{f"conv_{mode}": conv_case((2, 2, 3, 4, 4), kernel_size=(2, 3, 3), out_channels=2,
                                 padding=(1, 2, 1), pads=((1, 1), (2, 2), (1, 1)), mode=mode)
       for mode in ("reflect", "replicate", "circular")},
    # -- ConvTranspose3D --------------------------------------------------------------------
    "transpose": transpose_case((2, 3, 3, 4, 2), kernel_size=3, out_channels=2, stride=2),
    "transpose_all": transpose_case((2, 4, 3, 3, 2), kernel_size=(2, 3, 2), out_channels=4,
                                    stride=(2, 1, 3), padding=(1, 1, 0), output_padding=(1, 0, 2),
                                    dilation=(1, 2, 1), groups=2),
    "transpose_unbatched_no_bias": transpose_case((2, 3, 2, 3), kernel_size=2, out_channels=3,
                                                  stride=(1, 2, 2), padding=1, use_bias=False),
    # -- MaxPool3D / AvgPool3D --------------------------------------------------------------
    "max_ceil": max_case((2, 3, 5, 6, 7), kernel_size=2, ceil_mode=True),
    "max_all": max_case((2, 2, 6, 7, 7), kernel_size=(3, 2, 3), stride=(2, 1, 2),
                        padding=(1, 1, 0), dilation=(1, 2, 2), ceil_mode=True),
    "max_ties": max_case(_TIES, kernel_size=2, stride=1),
    "max_unbatched": max_case((2, 5, 4, 5), kernel_size=3, stride=2, padding=1),
    "avg": avg_case((2, 3, 5, 6, 5), kernel_size=3, stride=2, padding=1),
    "avg_exclude_pad_ceil": avg_case((2, 2, 5, 6, 4), kernel_size=(2, 3, 2), stride=(2, 2, 1),
                                     padding=(1, 1, 0), count_include_pad=False, ceil_mode=True),
    "avg_divisor": avg_case((2, 2, 4, 5, 4), kernel_size=2, padding=1, divisor_override=5),
    "avg_unbatched_ceil": avg_case((2, 5, 5, 4), kernel_size=2, ceil_mode=True),
    "avg_pairs": Case(lambda: ml.AvgPool3D(3, stride=2, padding=((1, 0), (0, 1), (1, 1))),
                      {"input": (2, 2, 5, 4, 6)},
                      unary(lambda x: F.avg_pool3d(F.pad(x, (1, 1, 0, 1, 1, 0)), 3, 2))),
    # -- adaptive pools ---------------------------------------------------------------------
    "adaptive_avg": Case(lambda: ml.AdaptiveAvgPool3D((2, 3, None)), {"input": (2, 2, 5, 7, 4)},
                         unary(lambda x: F.adaptive_avg_pool3d(x, (2, 3, None)))),
    "adaptive_avg_unbatched_up": Case(lambda: ml.AdaptiveAvgPool3D(4), {"input": (2, 3, 5, 6)},
                                      unary(lambda x: F.adaptive_avg_pool3d(x, 4))),
    "adaptive_max_ties": Case(lambda: ml.AdaptiveMaxPool3D((3, 2, 2)), {"input": _TIES},
                              unary(lambda x: F.adaptive_max_pool3d(x, (3, 2, 2)))),
    "adaptive_max_unbatched": Case(lambda: ml.AdaptiveMaxPool3D((2, 4, 3)), {"input": (2, 5, 7, 4)},
                                   unary(lambda x: F.adaptive_max_pool3d(x, (2, 4, 3)))),
    # -- BatchNorm3D / InstanceNorm3D -------------------------------------------------------
    "batch_norm_train": Case(lambda: ml.BatchNorm3D(3), {"input": (2, 3, 3, 4, 2)},
                             lambda t, _: {"output": F.batch_norm(t["input"], None, None, *wb(t),
                                                                  True, 0.1, 1e-5)}, training=True),
    "batch_norm_eval": Case(lambda: ml.BatchNorm3D(3, eps=1e-3), {"input": (2, 3, 3, 4, 2)},
                            lambda t, _: {"output": F.batch_norm(
                                t["input"], torch.zeros(3, dtype=torch.float64),
                                torch.ones(3, dtype=torch.float64), *wb(t), False, 0.1, 1e-3)},
                            training=False),
    "instance_norm_affine": Case(lambda: ml.InstanceNorm3D(3, affine=True), {"input": (2, 3, 3, 4, 2)},
                                 lambda t, _: {"output": F.instance_norm(t["input"], weight=wb(t)[0],
                                                                         bias=wb(t)[1])}),
    "instance_norm_unbatched": Case(lambda: ml.InstanceNorm3D(2), {"input": (2, 3, 2, 4)},
                                    unary(lambda x: F.instance_norm(x[None])[0])),
    # -- padding ----------------------------------------------------------------------------
    "constant_pad": pad_case(lambda: ml.ConstantPad3D((1, 2, 0, 1, 2, 0), 1.5), (2, 2, 3, 2, 4),
                             (1, 2, 0, 1, 2, 0), value=1.5),
    "zero_pad_unbatched": pad_case(lambda: ml.ZeroPad3D(1), (2, 3, 2, 3), (1,) * 6),
    "reflection_pad": pad_case(lambda: ml.ReflectionPad3D((1, 2, 2, 0, 1, 1)), (2, 2, 3, 4, 3),
                               (1, 2, 2, 0, 1, 1), "reflect"),
    "replication_pad_unbatched": pad_case(lambda: ml.ReplicationPad3D((2, 0, 1, 3, 0, 2)),
                                          (2, 2, 3, 2), (2, 0, 1, 3, 0, 2), "replicate"),
    "circular_pad": pad_case(lambda: ml.CircularPad3D((1, 2, 0, 1, 2, 1)), (1, 2, 3, 2, 3),
                             (1, 2, 0, 1, 2, 1), "circular"),
    "pad_reflect_negative": pad_case(lambda: ml.Pad((-1, 2, 1, -1, 0, 1), mode="reflect"),
                                     (2, 1, 3, 4, 4), (-1, 2, 1, -1, 0, 1), "reflect"),
    # -- Upsample ---------------------------------------------------------------------------
    **{f"upsample_{name}": Case(lambda kw=kw: ml.Upsample(**kw), {"input": shape},
                                unary(lambda x, kw=kw: nearest_by_gather(x, **kw) if "mode" not in kw
                                      else F.interpolate(x, **kw)))
       for name, kw, shape in [
           ("nearest_2", dict(scale_factor=2), (1, 2, 2, 3, 2)),
           ("nearest_odd", dict(scale_factor=(1.7, 0.6, 2.1)), (2, 1, 3, 5, 2)),
           ("nearest_size", dict(size=(3, 4, 7)), (1, 2, 2, 5, 3)),
           ("nearest_same_and_double", dict(scale_factor=(1.2, 2.1, 1)), (1, 1, 3, 2, 2)),
           ("trilinear", dict(scale_factor=(1.5, 2, 0.7), mode="trilinear"), (2, 2, 3, 2, 5)),
           ("trilinear_align", dict(scale_factor=1.5, mode="trilinear", align_corners=True),
            (1, 2, 3, 4, 2)),
           ("trilinear_recompute", dict(scale_factor=1.3, mode="trilinear",
                                        recompute_scale_factor=True), (1, 2, 4, 3, 5)),
           ("trilinear_size_1_align", dict(size=(1, 3, 4), mode="trilinear", align_corners=True),
            (2, 1, 3, 4, 2)),
           ("trilinear_down", dict(size=(2, 3, 1), mode="trilinear"), (1, 2, 5, 4, 3))]},
    **_fuzz(24, seed=31),
}

#: the sweep's cases beyond the first four run under ``-m slow``
SLOW = {name for name in CASES if name.startswith("fuzz") and int(name[4:].split("_")[0]) >= 4}
#: JAX (one compile per case, in a fresh process) runs these by default, every case when slow
JAX_DEFAULT = ["conv_all", "conv_reflect", "transpose_all", "max_all", "avg_exclude_pad_ceil",
               "adaptive_max_ties", "batch_norm_train", "upsample_trilinear"]

def _params(names) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", _params(CASES))
def test_equals_torch(name: str, backend_name: str) -> None:
    compare(name, CASES[name], *run_mithril(name, CASES[name], backend_name), what=backend_name)


@pytest.mark.parametrize("name", ["conv_all", "transpose_all", "max_all", "max_ties"])
def test_numpy_without_compiled_loops_equals_torch(name: str, monkeypatch) -> None:
    """The 1-D/2-D compiled loops are not 3-D's path: switching them off changes nothing."""
    from mithril.models import window_kernels

    monkeypatch.setattr(window_kernels, "_COMPILED", ())
    compare(name, CASES[name], *run_mithril(name, CASES[name], "numpy"), what="numpy")


def jax_run(names: list[str], train: bool) -> tuple[dict, dict | None]:
    """``names``' runs on JAX float64 (:func:`layer_edges.jax_column`'s) and, ``train``, the
    CNN's training (:func:`train_cnn`), in one fresh process (JAX x64 is process-wide)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "jax.npz")
        run_python(f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import jax
            jax.config.update("jax_enable_x64", True)
            import numpy as np
            import layer_edges as le
            import test_layers_3d_vs_torch as m
            flat = {{}}
            for name in {names!r}:
                for kind, d in zip("pcog", le.run_mithril(name, m.CASES[name], "jax")):
                    flat.update({{f"{{name}}|{{kind}}|{{k}}": v for k, v in d.items()}})
            if {train!r}:
                flat.update({{f"train|{{k}}": v for k, v in m.train_cnn("jax").items()}})
            np.savez({path!r}, **flat)
            """, timeout=600)
        flat = dict(np.load(path))
    runs: dict = {}
    for key, v in flat.items():
        name, kind, k = key.split("|", 2) if not key.startswith("train|") else ("", "", "")
        if name:
            runs.setdefault(name, {c: {} for c in "pcog"})[kind][k] = v
    trained = {k[6:]: v for k, v in flat.items() if k.startswith("train|")} if train else None
    return {n: tuple(d[c] for c in "pcog") for n, d in runs.items()}, trained


@pytest.fixture(scope="module")
def jax_results() -> tuple[dict, dict | None]:
    return jax_run(JAX_DEFAULT, train=True)


@pytest.mark.parametrize("name", JAX_DEFAULT)
def test_jax_equals_torch(name: str, jax_results) -> None:
    compare(name, CASES[name], *jax_results[0][name], what="jax")


@pytest.mark.slow
def test_jax_equals_torch_every_case() -> None:
    rest = [n for n in CASES if n not in JAX_DEFAULT]
    results = jax_run(rest, train=False)[0]
    for name in rest:
        compare(name, CASES[name], *results[name], what="jax")


# -- a 3-D CNN trained 5 Adam steps side by side with torch --------------------------------
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)  # (BatchNorm cancels a bias:
        # its gradient is rounding noise, which Adam's normalised step would amplify)
        self.bn = torch.nn.BatchNorm3d(4)
        self.head = torch.nn.Linear(4 * 2 * 1 * 2, 3)

    def forward(self, input, target):
        x = F.max_pool3d(torch.relu(self.bn(self.conv(input))), 2)
        x = F.adaptive_avg_pool3d(x, (2, 1, 2))
        return F.cross_entropy(self.head(x.flatten(1)), target)


NAMES = {"convolution3_d.weight": "conv.weight",
         "batch_norm3_d.weight": "bn.weight", "batch_norm3_d.bias": "bn.bias",
         "linear.weight": "head.weight", "linear.bias": "head.bias"}
STATE = {"batch_norm3_d.running_mean": "bn.running_mean", "batch_norm3_d.running_var": "bn.running_var",
         "batch_norm3_d.num_batches_tracked": "bn.num_batches_tracked"}


def cnn() -> ml.Model:
    m = ml.Model()
    m |= ml.Convolution3D(3, 4, padding=1, use_bias=False)(input="input", output=ml.IOKey("c", expose=False))
    m |= ml.BatchNorm3D(4)(input="c", output=ml.IOKey("b", expose=False))
    m |= ml.Relu()(input="b", output=ml.IOKey("r", expose=False))
    m |= ml.MaxPool3D(2)(input="r", output=ml.IOKey("p", expose=False))
    m |= ml.AdaptiveAvgPool3D((2, 1, 2))(input="p", output=ml.IOKey("a", expose=False))
    m |= ml.Flatten()(input="a", output=ml.IOKey("f", expose=False))
    m |= ml.Linear(3)(input="f", output="logits")
    m |= ml.CrossEntropy()(input="logits", target="target", output="loss")
    return m


def train_cnn(backend_name: str) -> dict[str, np.ndarray]:
    """Five Adam steps of :func:`cnn` from torch's initial :class:`Net` on ``backend_name``
    (float64): per step the loss, then the parameters and BatchNorm's state by torch's names."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(cnn(), backend, shapes={"input": [None, 2, 5, 4, 6]})
    torch.manual_seed(0)
    net = Net().double()
    theirs = dict(net.named_parameters())
    assert set(compiled.get_parameters()) == set(NAMES)
    assert set(compiled.initial_state_dict) == set(STATE)
    params = {k: backend.array(theirs[t].detach().numpy().copy()) for k, t in NAMES.items()}
    state = compiled.initial_state_dict
    optimizer = Adam(learning_rate=0.05)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(5)
    losses = []
    for _ in range(5):
        x, y = rng.standard_normal((3, 2, 5, 4, 6)), rng.integers(0, 3, 3)
        out, grads, state = compiled.evaluate(
            params, {"input": backend.array(x), "target": backend.array(y, backend.int_dtype)},
            output_gradients={"loss": 1.0}, state=state)
        params, opt_state = optimizer.update(params, grads, opt_state)
        losses.append(float(backend.to_numpy(out["loss"])))
    res = {"loss": np.array(losses)}
    res.update({t: np.asarray(backend.to_numpy(params[k]), np.float64) for k, t in NAMES.items()})
    res.update({t: np.asarray(backend.to_numpy(state[k]), np.float64) for k, t in STATE.items()})
    return res


def train_torch() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    net = Net().double()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    rng = np.random.default_rng(5)
    losses = []
    for _ in range(5):
        x, y = rng.standard_normal((3, 2, 5, 4, 6)), rng.integers(0, 3, 3)
        opt.zero_grad()
        loss = net(torch.tensor(x), torch.tensor(y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    res = {"loss": np.array(losses)}
    res.update({k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()})
    return res


@pytest.fixture(scope="module")
def torch_training() -> dict[str, np.ndarray]:
    return train_torch()


def _assert_trained_as_torch(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {k: float(np.abs(got[k] - want[k]).max()) for k in want}
    assert all(e <= 1e-10 for e in errs.values()), f"{what}: {errs}"


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
def test_cnn_3d_trains_as_torch(backend_name: str, torch_training) -> None:
    _assert_trained_as_torch(train_cnn(backend_name), torch_training, backend_name)


def test_cnn_3d_trains_as_torch_on_jax(jax_results, torch_training) -> None:
    _assert_trained_as_torch(jax_results[1], torch_training, "jax")


# -- running statistics of BatchNorm3D / InstanceNorm3D --------------------------------------
@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("ours, theirs", [
    (lambda: ml.BatchNorm3D(3, momentum=None), lambda: torch.nn.BatchNorm3d(3, momentum=None)),
    (lambda: ml.InstanceNorm3D(3, affine=True, track_running_stats=True, momentum=0.3),
     lambda: torch.nn.InstanceNorm3d(3, affine=True, track_running_stats=True, momentum=0.3)),
], ids=["batch_norm_cumulative", "instance_norm_running"])
def test_running_statistics_as_torch(ours, theirs, backend_name: str) -> None:
    """Two training steps then one in inference mode, side by side with the torch module:
    the output, the input gradient and the running statistics after each step."""
    backend = BACKENDS[backend_name](dtype="float64")
    compiled = ml.compile(ours(), backend, shapes={"input": [2, 3, 3, 2, 4]}, trainable_keys=["input"])
    module = theirs().double()
    rng = np.random.default_rng(11)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(rng.standard_normal(3)))
        module.bias.copy_(torch.tensor(rng.standard_normal(3)))
    prefix = next(iter(compiled.initial_state_dict)).rsplit(".", 1)[0]
    params = {f"{prefix}.{k}": backend.array(v.detach().numpy().copy())
              for k, v in module.named_parameters()}
    state = compiled.initial_state_dict
    for step, training in enumerate((True, True, False)):
        x = rng.standard_normal((2, 3, 3, 2, 4)) * 2 + rng.standard_normal((1, 3, 1, 1, 1))
        cot = rng.standard_normal(x.shape)
        out, grads, state = compiled.evaluate({**params, "input": backend.array(x)}, {},
                                              output_gradients={"output": backend.array(cot)},
                                              state=state, training=training)
        module.train(training)
        xt = torch.tensor(x, requires_grad=True)
        yt = module(xt)
        yt.backward(torch.tensor(cot))
        errs = {"output": np.abs(backend.to_numpy(out["output"]) - yt.detach().numpy()).max(),
                "d/d input": np.abs(backend.to_numpy(grads["input"]) - xt.grad.numpy()).max()}
        errs.update({k: np.abs(np.asarray(backend.to_numpy(state[f"{prefix}.{k}"]), np.float64)
                               - v.numpy()).max()
                     for k, v in module.named_buffers() if f"{prefix}.{k}" in state})
        assert len(errs) >= 4 and all(e <= 1e-10 for e in errs.values()), f"step {step}: {errs}"


# -- errors ----------------------------------------------------------------------------------
def _compile(block, shape):
    model = ml.Model()
    model |= block(input="input", output="output")
    return ml.compile(model, NumpyBackend(dtype="float64"), shapes={"input": list(shape)})


@pytest.mark.parametrize("block, shape, message", [
    (lambda: ml.Convolution3D(3, 2), (3, 4, 5), r"Convolution3D: 'input' must have rank 5 "
     r"\(N, C, D, H, W\) or 4 \(without the batch axis\), got shape \[3, 4, 5\]"),
    (lambda: ml.Convolution3D(3, 4, groups=2), (1, 3, 4, 4, 4),
     r"Convolution3D: input channels \(3\) must be divisible by groups \(2\)"),
    (lambda: ml.Convolution3D((2, 5, 2), 2), (1, 1, 4, 4, 4),
     r"Convolution3D: kernel size 5 is larger than the padded input along spatial axis 1"),
    (lambda: ml.Convolution3D(3, 2, padding=3, padding_mode="reflect"), (1, 1, 3, 4, 4),
     r"Convolution3D: padding_mode='reflect' needs each padding less than"),
    (lambda: ml.ConvTranspose3D(2, 2), (2, 3, 3), r"ConvTranspose3D: 'input' must have rank 5"),
    (lambda: ml.MaxPool3D(2), (2, 3, 4, 5, 6, 7), r"MaxPool3D: 'input' must have rank 5 "
     r"\(N, C, D, H, W\)"),
    (lambda: ml.AvgPool3D(3), (1, 1, 2, 4, 4), r"AvgPool3D: kernel size 3 is larger than the "
     r"padded input along spatial axis 0"),
    (lambda: ml.AvgPool3D(3, padding=1), (1, 1, 2, 4, 4), r"AvgPool3D: 'input' of shape "
     r"\[1, 1, 2, 4, 4\] is smaller than the kernel size \(3, 3, 3\)"),
    (lambda: ml.AdaptiveAvgPool3D(2), (2, 3, 4), r"AdaptiveAvgPool3D: 'input' must have rank 5"),
    (lambda: ml.AdaptiveMaxPool3D(2), (2, 3, 4, 0, 2), r"AdaptiveMaxPool3D: 'input' has an empty"),
    (lambda: ml.BatchNorm3D(3), (2, 3, 4, 4), r"BatchNorm3D: 'input' must be \(N, C, D, H, W\)"),
    (lambda: ml.BatchNorm3D(3), (2, 4, 2, 2, 2), r"BatchNorm3D: 'input' has 4 channels"),
    (lambda: ml.InstanceNorm3D(3), (3, 4, 4), r"InstanceNorm3D: 'input' must have rank 5 "
     r"\(N, C, D, H, W\) or 4 \(C, D, H, W: unbatched\)"),
    (lambda: ml.ReflectionPad3D((0, 0, 0, 0, 3, 0)), (1, 1, 3, 4, 4),
     r"ReflectionPad3D: mode='reflect' needs each padding less than .* padding 3\+0 on "
     r"spatial axis 0 of size 3"),
    (lambda: ml.ZeroPad3D(1), (2, 3, 4), r"ZeroPad3D: 'input' must have rank 5"),
    (lambda: ml.Upsample(scale_factor=2, mode="trilinear"), (1, 2, 3, 4),
     r"Upsample: mode='trilinear' needs an 'input' of rank 5 \(N, C, D, H, W\), got rank 4"),
    (lambda: ml.Upsample(size=(2, 3)), (1, 2, 3, 4, 5), r"Upsample: size \(2, 3\) has 2 entries "
     r"for an input with 3 spatial axes"),
])
def test_wrong_shapes_are_named(block, shape, message):
    with pytest.raises(ml.ShapeError, match=message):
        _compile(block(), shape)


@pytest.mark.parametrize("make, error, message", [
    (lambda: ml.Convolution3D((3, 3), 2), ValueError,
     r"Convolution3D: kernel_size must be an int or a sequence of 3 ints"),
    (lambda: ml.Convolution3D(3, 2, stride=2, padding="same"), ValueError,
     r"Convolution3D: padding='same' needs stride 1"),
    (lambda: ml.Convolution3D(3, 2, bias=False), TypeError, r"Convolution3D: no bias= argument"),
    (lambda: ml.ConvTranspose3D(3, 2, stride=2, output_padding=(0, 2, 0)), ValueError,
     r"ConvTranspose3D: output_padding \(0, 2, 0\) must be smaller than either stride"),
    (lambda: ml.MaxPool3D(2, padding=2), ValueError, r"MaxPool3D: padding must be at most half"),
    (lambda: ml.AvgPool3D(2, divisor_override=0), ValueError, r"AvgPool3D: divisor_override must"),
    (lambda: ml.AdaptiveAvgPool3D((2, 2)), ValueError, r"AdaptiveAvgPool3D: output_size must be a "
     r"positive int \(or None\) or 3 of them"),
    (lambda: ml.ZeroPad3D((1, 1, 1, 1)), ValueError, r"ZeroPad3D: padding must be an int or 6 ints"),
    (lambda: ml.Pad((1,) * 8), ValueError, r"Pad: padding must be 2 ints .* or 6"),
    (lambda: ml.Upsample(size=2, mode="nearest", align_corners=True), ValueError,
     r"Upsample: align_corners can only be set with the interpolating modes linear / bilinear / "
     r"trilinear"),
])
def test_bad_arguments_are_named(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_refused_shapes_fail_in_torch_too():
    """The shape refusals above that are torch's own."""
    for fn in (lambda: F.conv3d(torch.zeros(1, 3, 4, 4, 4), torch.zeros(4, 1, 3, 3, 3), groups=2),
               lambda: F.avg_pool3d(torch.zeros(1, 1, 2, 4, 4), 3),
               lambda: F.avg_pool3d(torch.zeros(1, 1, 2, 4, 4), 3, padding=1),
               lambda: F.pad(torch.zeros(1, 1, 3, 4, 4), (0, 0, 0, 0, 3, 0), mode="reflect"),
               lambda: torch.nn.BatchNorm3d(3)(torch.zeros(2, 3, 4, 4)),
               lambda: F.interpolate(torch.zeros(1, 2, 3, 4), scale_factor=2, mode="trilinear")):
        with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
            fn()

