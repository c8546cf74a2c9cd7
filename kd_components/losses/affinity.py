"""Affinity (relation) distillation: Structured KD pair-wise affinity and CIRKD cross-image pixel affinity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.losses._grid import adaptive_pool, autocast_off, check_spatial, clip_grid

__all__ = ["PairWiseAffinityLoss", "CIRKDLoss", "pooled_unit_features"]


def pooled_unit_features(
    student: torch.Tensor, teacher: torch.Tensor, grid: int | Sequence[int], mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher features as unit channel vectors on a common coarse grid, flattened to ``(B, C, N)``.

    Each position's channel vector is L2-normalised, the map is adaptively pooled (``mode`` ``"max"`` or ``"avg"``)
    to ``grid`` per spatial dim (never more than either input's size), and the pooled vectors are L2-normalised
    again, in float32. Normalising *before* pooling makes the result exactly invariant to a positive rescaling of
    each position's feature vector; normalising after pooling makes dot products cosines. Channel counts and
    spatial sizes of student and teacher may differ; the numbers of spatial dims must match.
    """
    check_spatial(student, "student")
    check_spatial(teacher, "teacher")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} batch sizes differ")
    size = clip_grid(grid, student.shape[2:], teacher.shape[2:])
    out = []
    for x in (student, teacher):
        x = F.normalize(x.float(), dim=1)
        x = F.normalize(adaptive_pool(x, size, mode), dim=1)
        out.append(x.flatten(2))
    return out[0], out[1]


class PairWiseAffinityLoss(nn.Module):
    """Structured KD pair-wise distillation: match the spatial self-affinity (cosine similarity between all pairs of
    positions) of student and teacher features.

    Formulation used here: features are L2-normalised over channels, max-pooled to a coarse grid and normalised
    again (see :func:`pooled_unit_features`), giving ``F`` of shape ``(B, C, N)``; ``A = F^T F`` ``(B, N, N)``; the
    loss is ``sum (A_T - A_S)^2 / (B * N^2)``. Departure from the paper's code: it pools raw features and then
    normalises; normalising first as well makes the loss exactly invariant to per-position positive scaling of
    the features, at no cost. Student and teacher may have different channel counts.

    Cost: written out, ``A`` is N×N: O(B * N^2 * C) time and O(B * N^2) memory; with the default grid 16 that is
    N = 256 in 2D and 4096 in 3D. When both features have fewer channels than N the loss is computed without forming
    ``A``: ``sum (A_T - A_S)^2 = |F_T F_T^T|^2 + |F_S F_S^T|^2 - 2 |F_T F_S^T|^2`` (Frobenius norms of
    channel×channel matrices), O(B * N * C^2) time and no N×N tensor, in float64 (the terms nearly cancel when
    student and teacher agree); equal to the written-out form to rounding (tested).

    Paper's weight: 0.5.

    Args:
        grid: pooled grid size, one int for every spatial dim or one per dim.
        pooling: ``"max"`` (paper) or ``"avg"``.

    Reference: Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019.
    """

    def __init__(self, grid: int | Sequence[int] = 16, pooling: str = "max") -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.grid = grid
        self.pooling = pooling

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student features ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher features ``(B, C_t, *S_t)``, same batch and number of spatial dims.

        Returns:
            the scalar loss.
        """
        f_s, f_t = pooled_unit_features(student, teacher.detach(), self.grid, self.pooling)
        batch, n = f_s.shape[0], f_s.shape[-1]
        with autocast_off(f_s):
            if max(f_s.shape[1], f_t.shape[1]) < n:  # channel×channel Gram matrices instead of N×N affinities
                g_s, g_t = f_s.double(), f_t.double()
                total = sum(
                    sign * (x @ y.transpose(1, 2)).pow(2).sum()
                    for sign, x, y in ((1.0, g_t, g_t), (1.0, g_s, g_s), (-2.0, g_t, g_s))
                )
                return (total / (batch * float(n) ** 2)).float()
            a_s = f_s.transpose(1, 2) @ f_s
            a_t = f_t.transpose(1, 2) @ f_t
        return (a_t - a_s).pow(2).mean()


class CIRKDLoss(nn.Module):
    """CIRKD mini-batch cross-image pixel affinity distillation.

    Formulation used here (as in the paper's mini-batch variant): features pooled and L2-normalised
    (:func:`pooled_unit_features`, average pooling), ``F`` ``(B, C, N)``. For every ordered pair of images (i, j)
    in the batch, the affinity ``A_ij = F_i^T F_j`` ``(N, N)``; each row (an anchor position of image i against all
    positions of image j) becomes a distribution by a softmax at temperature tau; the loss is the mean over all
    B * B * N rows of ``KL(softmax(A^T_ij / tau) || softmax(A^S_ij / tau))``. No tau^2 factor (as in the authors' code).
    Invariant to a per-position positive scaling of features and to a reordering of the batch. Student and teacher
    may have different channel counts.

    Cost: O(B^2 * N^2) memory; with the default grid 16, N = 256 in 2D and 4096 in 3D (use a smaller grid there).

    Paper's defaults: tau = 0.1, weight 1.

    Args:
        temperature: row-softmax temperature tau.
        grid: pooled grid size, one int for every spatial dim or one per dim.
        pooling: ``"avg"`` (paper) or ``"max"``.

    Reference: Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022.
    """

    def __init__(self, temperature: float = 0.1, grid: int | Sequence[int] = 16, pooling: str = "avg") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.temperature = float(temperature)
        self.grid = grid
        self.pooling = pooling

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student features ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher features ``(B, C_t, *S_t)``, same batch and number of spatial dims.

        Returns:
            the scalar loss.
        """
        f_s, f_t = pooled_unit_features(student, teacher.detach(), self.grid, self.pooling)
        with autocast_off(f_s):  # (B, N, B, N): row (i, n) against every position m of image j
            a_s = torch.einsum("icn,jcm->injm", f_s, f_s)
            a_t = torch.einsum("icn,jcm->injm", f_t, f_t)
        log_q_s = torch.log_softmax(a_s / self.temperature, dim=-1)
        log_q_t = torch.log_softmax(a_t / self.temperature, dim=-1)
        return (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=-1).mean()
