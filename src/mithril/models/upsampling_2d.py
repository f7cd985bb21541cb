"""torch's fixed-mode 2-D upsampling layers, ``nn.UpsamplingNearest2d`` and
``nn.UpsamplingBilinear2d``, as :class:`~mithril.models.resampling.Upsample` with the mode
(and, bilinear, ``align_corners=True``) set: (N, C, H, W) inputs only."""

from __future__ import annotations

from collections.abc import Sequence

from .resampling import Upsample


class UpsamplingNearest2D(Upsample):
    """``nn.UpsamplingNearest2d(size=None, scale_factor=None)``: ``Upsample(mode="nearest")``
    on (N, C, H, W)."""

    def __init__(self, size: int | Sequence[int] | None = None,
                 scale_factor: float | Sequence[float] | None = None) -> None:
        super().__init__(size, scale_factor, mode="nearest")
        self.mode_nd = 2  # (N, C, H, W) only, as torch's

    def __repr__(self) -> str:
        return f"UpsamplingNearest2D(size={self.size}, scale_factor={self.scale_factor})"


class UpsamplingBilinear2D(Upsample):
    """``nn.UpsamplingBilinear2d(size=None, scale_factor=None)``: ``Upsample(mode="bilinear",
    align_corners=True)`` on (N, C, H, W)."""

    def __init__(self, size: int | Sequence[int] | None = None,
                 scale_factor: float | Sequence[float] | None = None) -> None:
        super().__init__(size, scale_factor, mode="bilinear", align_corners=True)

    def __repr__(self) -> str:
        return f"UpsamplingBilinear2D(size={self.size}, scale_factor={self.scale_factor})"
