"""Feature distillation losses: attention transfer, FitNet hints, masked generative distillation, factor transfer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv
from torch import nn

from kd_components.adapters import match_spatial_size

from ._grid import autocast_off, check_spatial

__all__ = ["AttentionTransferLoss", "FactorTransferLoss", "FitNetLoss", "MGDLoss"]


class AttentionTransferLoss(nn.Module):
    """Attention transfer (AT): match the normalised spatial attention maps of a student and a teacher feature.

    Formulation used here: for a feature F of shape (B, C, *S), the attention map is ``mean_c |F|^p`` (B, *S). If
    the student map's spatial size differs from the teacher's, the student map (not the feature) is resized to the
    teacher's size (bi/trilinear). Each map is flattened and L2-normalised per sample, Q = a / ‖a‖₂, and the loss
    is ``mean((Q_S - Q_T)²)`` over batch and positions, as in the authors' code (the paper writes the p-norm of the
    difference; the mean of squares is what their released code and most re-implementations use).

    The loss is invariant to a global positive scaling of either feature and does not depend on channel counts.

    Paper defaults: p = 2, weight β = 1000 / 2 on this mean (classification); EMKD uses p = 4 with weight 0.9.

    Args:
        p: exponent of the absolute activation, ``p > 0``.
        eps: floor of the L2 norm in the normalisation.

    Reference:
        Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
    """

    def __init__(self, p: float = 2.0, eps: float = 1e-12) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = p
        self.eps = eps

    def attention(self, feature: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention map ``mean_c |F|^p`` of ``feature`` (B, C, *S), shaped (B, 1, *S), float32."""
        return feature.float().abs().pow(self.p).mean(dim=1, keepdim=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student feature of shape (B, C_s, *S_s).
            teacher: teacher feature of shape (B, C_t, *S_t), same batch and number of spatial dims.

        Returns:
            scalar loss.
        """
        teacher = teacher.detach()
        if check_spatial(student, "student") != check_spatial(teacher, "teacher") or len(student) != len(teacher):
            raise ValueError(f"incompatible shapes: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
        with autocast_off(student):
            a_s = match_spatial_size(self.attention(student), teacher.shape[2:])
            a_t = self.attention(teacher)
            q_s = F.normalize(a_s.flatten(1), dim=1, eps=self.eps)
            q_t = F.normalize(a_t.flatten(1), dim=1, eps=self.eps)
            return (q_s - q_t).pow(2).mean()


class FitNetLoss(nn.Module):
    """FitNet hint loss: mean squared error between an (adapted) student feature and a teacher feature.

    Formulation used here: ``mean((r(F_S) - F_T)²)`` where ``r`` is the identity, or a 1×1 convolution owned by
    this loss when ``student_channels`` and ``teacher_channels`` are given (the "regressor" of FitNets, here a 1×1
    conv as in most segmentation KD code rather than the paper's wider conv regressor). The adapter is a trainable
    submodule: add this loss's parameters to the student optimizer. Spatial sizes must already match.

    Paper defaults: hint stage trained alone before KD; in segmentation KD benchmarks (e.g. CIRKD) weight ~1.

    Args:
        student_channels: student channels C_s; together with ``teacher_channels`` creates the 1×1 adapter.
        teacher_channels: teacher channels C_t.
        spatial_dims: spatial dims of the adapter convolution (1, 2 or 3); only used with an adapter.

    Reference:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    """

    def __init__(
        self, student_channels: int | None = None, teacher_channels: int | None = None, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("give both student_channels and teacher_channels (for an adapter) or neither")
        self.adapter: nn.Module | None = None
        if student_channels is not None:
            self.adapter = Conv[Conv.CONV, spatial_dims](student_channels, teacher_channels, kernel_size=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student feature (B, C_s, *S); C_s must equal C_t when there is no adapter.
            teacher: teacher feature (B, C_t, *S).

        Returns:
            scalar loss.
        """
        teacher = teacher.detach()
        check_spatial(student, "student")
        check_spatial(teacher, "teacher")
        if self.adapter is not None:
            student = self.adapter(student)
        if student.shape != teacher.shape:
            raise ValueError(
                f"(adapted) student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ: give "
                "student_channels/teacher_channels for a 1×1 adapter and resize the taps to a common size upstream"
            )
        with autocast_off(student):
            return F.mse_loss(student.float(), teacher.float())


class MGDLoss(nn.Module):
    """Masked generative distillation (MGD): a generator reconstructs the teacher feature from a masked student one.

    Formulation used here: the student feature is mapped to the teacher's channels by a 1×1 conv when the channel
    counts differ (identity otherwise); random spatial positions are zeroed (the same positions for every channel;
    each position is masked with probability ``mask_ratio``); a generator ``conv3×3 → ReLU → conv3×3`` (N-D, teacher
    width) predicts the full teacher feature, and the loss is the squared error to the teacher feature, either the
    mean over all elements (``reduction="mean"``, O(1) weights) or the paper's sum divided by the batch size
    (``reduction="sum"``). The mask is drawn in every call (train and eval); pass ``rng`` to make it reproducible.
    The generator and the adapter are trainable submodules: add this loss's parameters to the student optimizer;
    both are discarded after distillation. The loss is not zero when student equals teacher (an untrained generator
    is not the identity): its minimum depends on the generator.

    Paper defaults: mask ratio λ = 0.75 and weight α = 2e-5 with ``reduction="sum"`` for semantic segmentation
    (0.65 for detection, 0.5 and 7e-5 for classification); with ``reduction="mean"`` the equivalent weight is
    α·C_t·|S_t|.

    Channels: give ``student_channels`` and ``teacher_channels``, or leave them ``None`` in a distillation term and
    the :class:`~kd_components.Distiller` probes the tapped features when it is built (as it sizes ``align``
    adapters) and calls :meth:`build` with their shapes; the generator is created then, with the probed channels
    and number of spatial dimensions.

    Args:
        student_channels: student channels C_s; ``None``: probed by the distiller.
        teacher_channels: teacher channels C_t; ``None``: probed by the distiller.
        spatial_dims: 1, 2 or 3 (with probed channels: the probed features' number of spatial dimensions).
        mask_ratio: probability that a spatial position is masked, in [0, 1).
        reduction: ``"mean"`` (mean over all elements) or ``"sum"`` (sum over elements / batch size, as the paper).
        rng: optional ``torch.Generator`` for the mask; it must live on the features' device.

    Reference:
        Yang et al., "Masked Generative Distillation", ECCV 2022.
    """

    def __init__(
        self,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        spatial_dims: int = 2,
        mask_ratio: float = 0.75,
        reduction: str = "mean",
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.mask_ratio = mask_ratio
        self.reduction = reduction
        self.rng = rng
        self.spatial_dims = spatial_dims
        self.align: nn.Module = nn.Identity()
        self.generation: nn.Module | None = None
        if student_channels is not None and teacher_channels is not None:
            self._build_modules(student_channels, teacher_channels)
        elif student_channels is not None or teacher_channels is not None:
            raise ValueError("give both student_channels and teacher_channels, or neither (probed by the Distiller)")

    @property
    def needs_shapes(self) -> bool:
        """Whether the channel counts are still unknown (the :class:`~kd_components.Distiller` probes them)."""
        return self.generation is None

    def build(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Create the adapter and the generator from the probed input shapes.

        Args:
            shapes: the shape of each input argument, e.g. ``{"student": (1, 32, 16, 16), "teacher": (1, 128, 16,
                16)}``: C_s and C_t are the channels (dim 1), the spatial dimensions are the trailing ones.
        """
        self.spatial_dims = len(shapes["teacher"]) - 2
        self._build_modules(int(shapes["student"][1]), int(shapes["teacher"][1]))

    def _build_modules(self, student_channels: int, teacher_channels: int) -> None:
        if student_channels != teacher_channels:
            self.align = Conv[Conv.CONV, self.spatial_dims](student_channels, teacher_channels, kernel_size=1)
        self.generation = nn.Sequential(
            Convolution(self.spatial_dims, teacher_channels, teacher_channels, kernel_size=3, act="relu", norm=None),
            Convolution(self.spatial_dims, teacher_channels, teacher_channels, kernel_size=3, conv_only=True),
        )

    def random_mask(self, feature: torch.Tensor) -> torch.Tensor:
        """A keep-mask (B, 1, *S) of 0/1 for ``feature`` (B, C, *S): 0 with probability ``mask_ratio``."""
        shape = (feature.shape[0], 1, *feature.shape[2:])
        device = self.rng.device if self.rng is not None else feature.device
        draw = torch.rand(shape, generator=self.rng, device=device).to(feature.device)
        return (draw >= self.mask_ratio).to(feature.dtype)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student feature (B, C_s, *S).
            teacher: teacher feature (B, C_t, *S), same spatial size.

        Returns:
            scalar loss.
        """
        teacher = teacher.detach()
        check_spatial(student, "student")
        check_spatial(teacher, "teacher")
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(
                f"batch and spatial sizes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
            )
        if self.generation is None:
            raise RuntimeError(
                "MGDLoss has no channel counts: give student_channels and teacher_channels, or use it in a "
                "DistillationTerm of a Distiller built with student, teacher and example_input_shape (it probes them)"
            )
        aligned = self.align(student)
        generated = self.generation(aligned * self.random_mask(aligned))
        with autocast_off(student):
            sq = (generated.float() - teacher.float()).pow(2)
            return sq.mean() if self.reduction == "mean" else sq.sum() / teacher.shape[0]


class FactorTransferLoss(nn.Module):
    """Factor transfer (FT): match the per-sample L2-normalised factors of a student translator and teacher paraphraser.

    Formulation used here: each factor (B, C, *S) is flattened per sample and divided by its L2 norm; the loss is
    ``mean(|F_T/‖F_T‖₂ - F_S/‖F_S‖₂|^p)`` over all elements (p = 1 in the paper). Factors come from
    :class:`kd_components.modules.Translator` (student) and the frozen encoder of a pre-trained
    :class:`kd_components.modules.Paraphraser` (teacher) and must have the same shape. Invariant to a per-sample
    positive scaling of either factor.

    Paper defaults: p = 1, weight β = 1000 (classification; the mean over elements makes the raw value small).

    Args:
        p: 1 (paper) or 2.
        eps: floor of the L2 norm in the normalisation.

    Reference:
        Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer", NeurIPS 2018.
    """

    def __init__(self, p: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        self.p = p
        self.eps = eps

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student factor (translator output) of shape (B, K, *S).
            teacher: teacher factor (paraphraser encoder output) of the same shape.

        Returns:
            scalar loss.
        """
        teacher = teacher.detach()
        check_spatial(student, "student")
        check_spatial(teacher, "teacher")
        if student.shape != teacher.shape:
            raise ValueError(f"factor shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
        with autocast_off(student):
            f_s = F.normalize(student.float().flatten(1), dim=1, eps=self.eps)
            f_t = F.normalize(teacher.float().flatten(1), dim=1, eps=self.eps)
            return (f_t - f_s).abs().pow(self.p).mean()
