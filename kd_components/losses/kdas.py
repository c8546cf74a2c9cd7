"""KDAS: attention supervision and the Symmetrical Guiding Module, plus PraNet's structure loss.

Reference: Trinh et al., "KDAS: Knowledge Distillation via Attention Supervision Framework for Polyp
Segmentation", ICASSP 2024 (arXiv:2312.08555). Structure loss: Fan et al., "PraNet: Parallel Reverse Attention
Network for Polyp Segmentation", MICCAI 2020.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kd_components.losses._grid import adaptive_pool, check_spatial, clip_grid

__all__ = ["KDASAttentionLoss", "KDASSGMLoss", "StructureLoss"]

_ACTIVATIONS = ("auto", "sigmoid", "softmax", "none")


def prediction_map(logits: torch.Tensor, channel: int, activation: str) -> torch.Tensor:
    """One prediction map ``(B, 1, *S)`` in float32 from logits ``(B, C, *S)``.

    Args:
        logits: network output, ``(B, C, *S)``.
        channel: the channel to keep (negative indices count from the end).
        activation: ``"sigmoid"`` (of the chosen channel), ``"softmax"`` (over C, then the chosen channel),
            ``"none"`` (the raw channel) or ``"auto"`` (sigmoid when C == 1, softmax otherwise).
    """
    logits = logits.float()
    num_channels = logits.shape[1]
    if activation == "auto":
        activation = "sigmoid" if num_channels == 1 else "softmax"
    if activation == "softmax":
        if num_channels < 2:
            raise ValueError("activation='softmax' needs at least two channels; use 'sigmoid' for one-channel logits")
        out = torch.softmax(logits, dim=1)[:, channel]
    elif activation == "sigmoid":
        out = torch.sigmoid(logits[:, channel])
    elif activation == "none":
        out = logits[:, channel]
    else:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return out.unsqueeze(1)


def _attention_kl_rows(
    rows_s: torch.Tensor, rows_t: torch.Tensor, p_s: torch.Tensor, p_t: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over a block of rows of KL(softmax(A_T / tau) || softmax(A_S / tau)), where A = p p^T.

    ``rows_*`` are ``(B, r)`` (the row positions' values), ``p_*`` are ``(B, N)``.
    """
    log_q_s = torch.log_softmax(rows_s.unsqueeze(-1) * p_s.unsqueeze(-2) / temperature, dim=-1)
    log_q_t = torch.log_softmax(rows_t.unsqueeze(-1) * p_t.unsqueeze(-2) / temperature, dim=-1)
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum()


class KDASAttentionLoss(nn.Module):
    """KDAS attention supervision: match the spatial self-attention of the student's prediction map to the
    teacher's.

    Formulation used here: each network's prediction map P (a one-channel logit map, or one chosen channel of
    multi-class logits) is turned into probabilities, adaptively average-pooled to a grid (``grid`` per spatial dim,
    never more than the input size), and flattened to ``p`` of shape ``(B, N)``. The self-attention is
    ``A = p p^T`` ``(B, N, N)``; each row is turned into a distribution over positions by a softmax over the
    *last (spatial) axis* at temperature ``tau``, for both teacher and student. The loss is
    ``tau^2 * mean over the B*N rows of KL(softmax(A_T / tau) || softmax(A_S / tau))``.

    Departure from the released code: it applies the softmax over the singleton channel axis, which makes every
    student "distribution" the constant 1 and gives the student no gradient. The paper intends a distribution
    over positions, which is what is done here.

    Cost: O(B * N^2) time. Memory is bounded by evaluating rows in blocks of ``row_chunk`` (recomputed in
    backward), so the default 32 per dim (N = 32768 in 3D) fits on a GPU; a smaller ``grid`` is much faster.

    The paper's setting: tau = 2, KL term weight alpha = 0.3 shared with SGM (total
    ``(1 - alpha) * L_seg + alpha * (tau^2 KL + SGM)``); applied to each of the two decoder heads.

    Args:
        temperature: softmax temperature tau (paper: 2).
        grid: pooling grid, one int for every spatial dim or one per dim (default 32).
        channel: which channel of the logits is the foreground map (default -1: the only channel of a one-channel
            output, the foreground of a two-class output).
        activation: ``"auto"`` (sigmoid for one channel, softmax over channels otherwise), ``"sigmoid"``,
            ``"softmax"`` or ``"none"`` (use the raw logit).
        row_chunk: number of attention rows evaluated at once (memory control only; the result does not change).

    Reference: Trinh et al., KDAS, ICASSP 2024, arXiv:2312.08555.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        grid: int | Sequence[int] = 32,
        channel: int = -1,
        activation: str = "auto",
        row_chunk: int = 1024,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if row_chunk < 1:
            raise ValueError(f"row_chunk must be positive, got {row_chunk}")
        self.temperature = float(temperature)
        self.grid = grid
        self.channel = channel
        self.activation = activation
        self.row_chunk = int(row_chunk)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher logits ``(B, C_t, *S_t)``, same batch and number of spatial dims.

        Returns:
            the scalar loss.
        """
        check_spatial(student, "student")
        check_spatial(teacher, "teacher")
        teacher = teacher.detach()
        size = clip_grid(self.grid, student.shape[2:], teacher.shape[2:])
        p_s = adaptive_pool(prediction_map(student, self.channel, self.activation), size).flatten(1)
        p_t = adaptive_pool(prediction_map(teacher, self.channel, self.activation), size).flatten(1)
        if p_s.shape != p_t.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} batch sizes differ")
        batch, num = p_s.shape
        total = p_s.new_zeros(())
        use_checkpoint = num > self.row_chunk and torch.is_grad_enabled() and p_s.requires_grad
        for start in range(0, num, self.row_chunk):
            rows = slice(start, start + self.row_chunk)
            args = (p_s[:, rows], p_t[:, rows], p_s, p_t, self.temperature)
            if use_checkpoint:
                # deterministic and RNG-free: skip the RNG-state saving and the (slow) recomputation check
                total = total + checkpoint(
                    _attention_kl_rows, *args, use_reentrant=False, preserve_rng_state=False, determinism_check="none"
                )
            else:
                total = total + _attention_kl_rows(*args)
        return total * self.temperature**2 / (batch * num)


def symmetrise(x: torch.Tensor) -> torch.Tensor:
    """Symmetrise the spatial axes of ``x`` ``(B, C, *S)`` (all spatial sizes equal): ``(2 / d!) * sum`` over the d!
    permutations of the d spatial axes. In 2D this is exactly ``P + P^T``; in 3D it is a third of the sum of the six
    axis permutations, so the result has the same scale in every dimension."""
    ndim = x.dim() - 2
    perms = list(itertools.permutations(range(2, x.dim())))
    out = sum(x.permute(0, 1, *perm) for perm in perms)
    return out * (2.0 / math.factorial(ndim))


class KDASSGMLoss(nn.Module):
    """KDAS Symmetrical Guiding Module (SGM): MSE between the symmetrised prediction maps of student and teacher.

    Formulation used here: the prediction map P (one channel, optionally passed through an activation) is
    adaptively average-pooled to a square (2D) or cubic (3D) grid and symmetrised over its spatial axes, as the
    released code does with the 2D map itself: ``P + P^T`` in 2D; in 3D the generalisation
    ``(1/3) * sum over the 6 permutations of the axes`` (same scale as ``P + P^T``). The loss is the mean squared
    difference of the teacher's and the student's symmetrised maps. Symmetrising the flattened-grid affinity
    ``p p^T`` instead would be a no-op (it is already symmetric), so the map itself is symmetrised.

    Spatial axes of size 1 in both inputs are dropped first (a one-slice volume is an image), so a one-slice 3D
    input gives the 2D result. Consequence of the symmetrisation: the loss is unchanged when either map is
    transposed (any permutation of its spatial axes in 3D).

    Defaults follow the released code: raw logits (``activation="none"``) and a grid equal to the largest spatial
    side (the code pools a square H x W map to H x H). The paper's weight: alpha = 0.3, shared with the attention
    KL term.

    Args:
        grid: side of the square / cubic grid; ``None`` (default) uses the largest spatial side of the inputs.
        channel: which channel of the logits is the foreground map (default -1).
        activation: ``"none"`` (default, raw logits as in the released code), ``"auto"``, ``"sigmoid"`` or
            ``"softmax"`` (see :class:`KDASAttentionLoss`).

    Reference: Trinh et al., KDAS, ICASSP 2024, arXiv:2312.08555.
    """

    def __init__(self, grid: int | None = None, channel: int = -1, activation: str = "none") -> None:
        super().__init__()
        if grid is not None and grid < 1:
            raise ValueError(f"grid must be a positive int or None, got {grid}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.grid = grid
        self.channel = channel
        self.activation = activation

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher logits ``(B, C_t, *S_t)``, same batch and number of spatial dims.

        Returns:
            the scalar loss.
        """
        ndim = check_spatial(student, "student")
        if check_spatial(teacher, "teacher") != ndim:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in dims")
        teacher = teacher.detach()
        m_s = prediction_map(student, self.channel, self.activation)
        m_t = prediction_map(teacher, self.channel, self.activation)
        single = tuple(2 + i for i in range(ndim) if m_s.shape[2 + i] == 1 and m_t.shape[2 + i] == 1)
        if single:
            m_s, m_t = m_s.squeeze(single), m_t.squeeze(single)
        if m_s.dim() > 2:
            side = self.grid or max(max(m_s.shape[2:]), max(m_t.shape[2:]))
            size = (side,) * (m_s.dim() - 2)
            m_s, m_t = adaptive_pool(m_s, size), adaptive_pool(m_t, size)
        return F.mse_loss(symmetrise(m_s), symmetrise(m_t))


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
