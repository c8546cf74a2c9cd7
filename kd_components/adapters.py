"""Adapters that align a student feature to the shape of a teacher feature."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

__all__ = ["FeatureAdapter", "match_spatial_size"]


def match_spatial_size(x: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resize ``x`` of shape (B, C, *S) to spatial size ``size`` (no-op when it already matches).

    Args:
        x: tensor of shape (B, C, *S) with 1 to 3 spatial dimensions.
        size: the target spatial size, ``len(size) == x.dim() - 2``.
        mode: ``"linear"`` (bi/trilinear as the dimensionality requires) or ``"nearest"``.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if len(size) != x.dim() - 2:
        raise ValueError(f"cannot resize a tensor of shape {tuple(x.shape)} to spatial size {size}")
    if mode == "linear":
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(x, size=size, mode=interp, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)


class FeatureAdapter(nn.Module):
    """Map a student feature (B, C_s, *S_s) to the teacher's channels and size (B, C_t, *S_t).

    Channels are mapped by a 1×1 (×1) convolution, spatial size by interpolation. The resize is done on the
    side with fewer elements: a larger student map is resized down before the convolution, a smaller one is
    resized up after it. The adapter is trained with the student and discarded after distillation.

    Args:
        in_channels: student channels C_s.
        out_channels: teacher channels C_t.
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        bias: whether the 1×1 convolution has a bias.
        mode: interpolation mode, ``"linear"`` or ``"nearest"``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, spatial_dims: int = 2, bias: bool = True, mode: str = "linear"
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.mode = mode
        self.proj = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """
        Args:
            x: student feature of shape (B, C_s, *S_s).
            size: teacher spatial size S_t; ``None`` keeps S_s.

        Returns:
            tensor of shape (B, C_t, *S_t).
        """
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"FeatureAdapter built for {self.spatial_dims}D features got a tensor of shape {tuple(x.shape)}"
            )
        if size is None or tuple(size) == tuple(x.shape[2:]):
            return self.proj(x)
        if torch.Size(size).numel() < x.shape[2:].numel():
            return self.proj(match_spatial_size(x, size, self.mode))
        return match_spatial_size(self.proj(x), size, self.mode)
