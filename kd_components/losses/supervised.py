"""Supervised segmentation losses: PraNet's structure loss (KDAS's supervised loss).

Reference: Fan et al., "PraNet: Parallel Reverse Attention Network for Polyp Segmentation", MICCAI 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.losses._grid import check_spatial

__all__ = ["StructureLoss", "box_filter"]


def box_filter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Mean over a ``kernel_size``-wide box along every spatial axis of size > 1, zero padding counted.

    Separable, so it costs O(d * k) per voxel; on axes of size > 1 it equals ``avg_pool{2,3}d(x, k, stride=1,
    padding=k // 2)`` (count_include_pad=True), i.e. PraNet's ``avg_pool2d(mask, 31, 1, 15)`` in 2D.
    """
    shape = x.shape
    for axis in range(2, x.dim()):
        length = shape[axis]
        if length == 1:
            continue
        moved = x.movedim(axis, -1)
        flat = moved.reshape(-1, 1, length)
        flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
        x = flat.reshape(moved.shape).movedim(-1, axis)
    return x


class StructureLoss(nn.Module):
    """PraNet structure loss (weighted BCE + weighted IoU): KDAS's supervised segmentation loss.

    Formulation used here: with mask m (the label) and foreground probability s = sigmoid(z), the per-pixel weight
    is ``w = 1 + edge_weight * |box_k(m) - m|`` (large near boundaries), ``wBCE = sum(w * BCE(z, m)) / sum(w)``
    and ``wIoU = 1 - (sum(w s m) + smooth) / (sum(w (s + m)) - sum(w s m) + smooth)``, sums per sample over space;
    the loss is the batch mean of ``wBCE + wIoU``.

    Departures from PraNet's code: (1) its BCE uses ``reduce='none'``, a deprecated flag that actually returns
    the *mean* BCE, so its "weighted" BCE is unweighted; here the BCE is really weighted per pixel.
    (2) N-D box: the 31 x 31 average pool becomes a separable box of width ``kernel_size`` along every spatial
    axis (zero padding counted, as ``avg_pool2d`` does): identical to PraNet in 2D, a 31^3 box in 3D at the cost
    of three 1-D passes; axes of size 1 are skipped, so a one-slice volume is weighted like the image.
    Two-channel logits use the foreground logit ``z_1 - z_0`` (sigmoid of it is softmax's foreground probability).

    KDAS weights it ``1 - alpha = 0.7`` (alpha = 0.3), summed over the two decoder heads.

    Args:
        kernel_size: odd box width per axis (PraNet: 31).
        edge_weight: boundary weight factor (PraNet: 5).
        smooth: additive smoothing of the IoU ratio (PraNet: 1).

    Reference: Fan et al., PraNet, MICCAI 2020, arXiv:2006.11392.
    """

    def __init__(self, kernel_size: int = 31, edge_weight: float = 5.0, smooth: float = 1.0) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.edge_weight = float(edge_weight)
        self.smooth = float(smooth)

    def forward(self, student: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: logits ``(B, 1, *S)`` or ``(B, 2, *S)``, 1 to 3 spatial dims.
            label: ``(B, 1, *S)`` class indices 0 / 1 (or a soft mask in [0, 1]).

        Returns:
            the scalar loss.
        """
        check_spatial(student, "student")
        logits = student.float()
        if logits.shape[1] == 2:
            logits = logits[:, 1:2] - logits[:, 0:1]
        elif logits.shape[1] != 1:
            raise ValueError(f"StructureLoss takes 1- or 2-channel logits, got {tuple(student.shape)}")
        mask = label.detach().float()
        if mask.shape != logits.shape:
            raise ValueError(f"label must be shaped {tuple(logits.shape)}, got {tuple(label.shape)}")
        dims = tuple(range(2, logits.dim()))
        weight = 1.0 + self.edge_weight * (box_filter(mask, self.kernel_size) - mask).abs()
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        wbce = (weight * bce).sum(dims) / weight.sum(dims)
        prob = torch.sigmoid(logits)
        inter = (weight * prob * mask).sum(dims)
        union = (weight * (prob + mask)).sum(dims)
        wiou = 1.0 - (inter + self.smooth) / (union - inter + self.smooth)
        return (wbce + wiou).mean()
