"""Shape helpers shared by the distillation losses: spatial grids and N-D adaptive pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["autocast_off", "check_spatial", "check_logit_pair", "clip_grid", "adaptive_pool"]


def autocast_off(x: torch.Tensor) -> torch.autocast:
    """A context that disables autocast on ``x``'s device, so matrix products of float32 inputs stay float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def check_spatial(x: torch.Tensor, name: str) -> int:
    """Return the number of spatial dims of ``x`` shaped ``(B, C, *S)``, raising if it is not 1, 2 or 3."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"{name} must be shaped (B, C, *spatial) with 1, 2 or 3 spatial dims, got {tuple(x.shape)}")
    return x.dim() - 2


def check_logit_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise unless ``student`` is shaped ``(B, K, *S)`` with 1 to 3 spatial dims and ``teacher`` has its shape."""
    check_spatial(student, "student")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits must have the same shape"
        )


def clip_grid(grid: int | Sequence[int], *spatial_shapes: Sequence[int]) -> tuple[int, ...]:
    """The pooling grid: ``grid`` per spatial dim, never larger than any of the given spatial shapes.

    Clipping means pooling never upsamples, and a one-slice volume ``(H, W, 1)`` pools to the same grid as the
    image ``(H, W)``, so 2D and one-slice 3D inputs give the same result.

    Args:
        grid: one size for every spatial dim, or one size per dim.
        spatial_shapes: the spatial shapes of the tensors that will be pooled (all of the same length).
    """
    ndim = len(spatial_shapes[0])
    sizes = [int(grid)] * ndim if isinstance(grid, int) else [int(g) for g in grid]
    if len(sizes) != ndim or any(g < 1 for g in sizes):
        raise ValueError(f"grid must be a positive int or {ndim} positive ints, got {grid!r}")
    for shape in spatial_shapes:
        if len(shape) != ndim:
            raise ValueError(f"inputs have different numbers of spatial dims: {[tuple(s) for s in spatial_shapes]}")
        sizes = [min(g, int(s)) for g, s in zip(sizes, shape)]
    return tuple(sizes)


def adaptive_pool(x: torch.Tensor, size: Sequence[int], mode: str = "avg") -> torch.Tensor:
    """Adaptive average or max pooling of ``x`` shaped ``(B, C, *S)`` (1 to 3 spatial dims) to ``size``.

    Args:
        x: input tensor.
        size: output spatial size, one int per spatial dim.
        mode: ``"avg"`` or ``"max"``.
    """
    ndim = x.dim() - 2
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "avg":
        fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[ndim - 1]
    elif mode == "max":
        fn = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[ndim - 1]
    else:
        raise ValueError(f"pooling mode must be 'avg' or 'max', got {mode!r}")
    return fn(x, tuple(size))
