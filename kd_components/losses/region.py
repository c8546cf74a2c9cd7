"""Region / class-prototype distillation: IFVD, IDD inter-class distance and position information, EMKD region
affinity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.losses._grid import autocast_off, check_spatial

__all__ = [
    "IFVDLoss",
    "InterClassDistanceLoss",
    "PositionInformationLoss",
    "EMKDRegionAffinityLoss",
    "class_prototypes",
]


def _resize_label(label: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Integer labels ``(B, *S_f)`` at the feature's spatial size, by nearest-neighbour resampling."""
    if label.dim() == feature.dim() - 1:
        label = label.unsqueeze(1)
    if label.dim() != feature.dim() or label.shape[1] != 1 or label.shape[0] != feature.shape[0]:
        raise ValueError(f"label must be shaped (B, 1, *spatial) for feature {tuple(feature.shape)}, got {label.shape}")
    label = label.detach().float()
    if label.shape[2:] != feature.shape[2:]:
        label = F.interpolate(label, size=feature.shape[2:], mode="nearest")
    return label.round().long()[:, 0]


def class_prototypes(
    feature: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image class prototypes: the mask-average of ``feature`` over each class's positions.

    The label is nearest-resampled to the feature's spatial size. Positions whose label is outside
    ``[0, num_classes)`` or equal to ``ignore_index`` belong to no class. Computed in float32.

    Args:
        feature: ``(B, C, *S)``.
        label: ``(B, 1, *S_l)`` integer class indices.
        num_classes: number of classes K.
        ignore_index: a label value to leave out.

    Returns:
        ``(prototypes (B, K, C), present (B, K) bool, one_hot (B, K, N))`` with N the flattened feature positions;
        the prototype of an absent class is zero.
    """
    idx = _resize_label(label, feature).flatten(1)  # (B, N)
    if ignore_index is not None:
        idx = idx.masked_fill(idx == ignore_index, -1)
    classes = torch.arange(num_classes, device=idx.device)
    one_hot = (idx.unsqueeze(1) == classes.view(1, -1, 1)).float()  # (B, K, N); out-of-range labels match nothing
    counts = one_hot.sum(-1)
    feat = feature.float().flatten(2)
    with autocast_off(feat):
        protos = one_hot @ feat.transpose(1, 2) / counts.clamp_min(1.0).unsqueeze(-1)
    return protos, counts > 0, one_hot


class _RegionLoss(nn.Module):
    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index

    def _check(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        if check_spatial(student, "student") != check_spatial(teacher, "teacher"):
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in dims")
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} batch sizes differ")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; zero (still attached to the graph) when the mask is empty."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class IFVDLoss(_RegionLoss):
    """IFVD: intra-class feature variation distillation.

    Formulation used here: per image and network, class prototypes are the mask-averages of the feature over each
    class (labels nearest-downsampled to the feature size, :func:`class_prototypes`); the intra-class feature
    variation map is ``M(x) = cos(f(x), p_{label(x)})``; the loss is the mean over labelled positions of
    ``(M_S(x) - M_T(x))^2``. Student and teacher may differ in width; they must share the spatial size.
    Unchanged by a global positive scaling or an orthogonal rotation of either network's features.

    Default weight in the authors' code: 200 (the squared cosine differences are small).

    Args:
        num_classes: number of classes K in the label.
        ignore_index: a label value to leave out.

    Reference: Wang et al., "Intra-class Feature Variation Distillation for Semantic Segmentation", ECCV 2020.
    """

    def _variation_map(self, feature: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        protos, _, one_hot = class_prototypes(feature, label, self.num_classes, self.ignore_index)
        with autocast_off(protos):
            own = protos.transpose(1, 2) @ one_hot  # (B, C, N): each position's own class prototype
        cos = F.cosine_similarity(feature.float().flatten(2), own, dim=1, eps=1e-8)
        return cos, one_hot.sum(1) > 0

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student features ``(B, C_s, *S)``, 1 to 3 spatial dims.
            teacher: teacher features ``(B, C_t, *S)``.
            label: ``(B, 1, *S_l)`` integer class indices (any spatial size; nearest-resampled).

        Returns:
            the scalar loss.
        """
        self._check(student, teacher)
        if student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} spatial sizes differ")
        m_s, valid = self._variation_map(student, label)
        m_t, _ = self._variation_map(teacher.detach(), label)
        return _masked_mean((m_s - m_t).pow(2), valid)


class InterClassDistanceLoss(_RegionLoss):
    """IDD inter-class distance distillation: match the distances between class centres.

    Formulation used here: per image and network, class centres are the mask-averages of the feature
    (:func:`class_prototypes`). Distances are measured in units of the feature cloud's spread,
    ``D_kl = ||mu_k - mu_l|| / sigma`` with ``sigma^2`` the mean squared distance of the image's labelled feature
    vectors to their mean, so they are comparable between networks of any width or activation scale (and unchanged
    by a global scaling, translation or rotation of the features). Dividing by the mean pairwise distance
    (RKD-style) was rejected: with two classes (binary segmentation) the only distance would always be 1.
    The loss is the mean over images and over pairs k < l of classes present in both networks' downsampled labels of
    ``(D^S_kl - D^T_kl)^2``; zero when fewer than two classes are present.

    The exact IDD formula is not public; this is the principled version described in METHODS.md.

    Args:
        num_classes: number of classes K in the label.
        ignore_index: a label value to leave out.
        eps: keeps the square roots differentiable at zero.

    Reference: Zhang et al., "Inter-class Distance Distillation for Semantic Segmentation", IJCAI 2022
    (arXiv:2205.03650).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, eps: float = 1e-8) -> None:
        super().__init__(num_classes, ignore_index)
        self.eps = float(eps)

    def _distances(self, feature: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        protos, present, one_hot = class_prototypes(feature, label, self.num_classes, self.ignore_index)
        feat = feature.float().flatten(2)  # (B, C, N)
        weight = one_hot.sum(1, keepdim=True)  # (B, 1, N): labelled positions
        count = weight.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (feat * weight).sum(-1, keepdim=True) / count
        spread = (((feat - mean) ** 2).sum(1, keepdim=True) * weight).sum(-1) / count[..., 0]  # (B, 1)
        diff = protos.unsqueeze(2) - protos.unsqueeze(1)  # (B, K, K, C)
        sq = diff.pow(2).sum(-1) / spread.clamp_min(1e-12).unsqueeze(-1)
        return torch.sqrt(sq + self.eps), present

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student features ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher features ``(B, C_t, *S_t)``.
            label: ``(B, 1, *S_l)`` integer class indices (any spatial size; nearest-resampled per network).

        Returns:
            the scalar loss.
        """
        self._check(student, teacher)
        d_s, present_s = self._distances(student, label)
        d_t, present_t = self._distances(teacher.detach(), label)
        present = present_s & present_t
        upper = torch.ones(self.num_classes, self.num_classes, dtype=torch.bool, device=d_s.device).triu(1)
        pairs = present.unsqueeze(2) & present.unsqueeze(1) & upper
        return _masked_mean((d_s - d_t).pow(2), pairs)


def _coordinates(size: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1] per axis, ``(d, N)``; a size-1 axis has the coordinate 0."""
    axes = [(2 * torch.arange(n, device=device, dtype=torch.float32) + 1) / n - 1 for n in size]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([g.flatten() for g in grids])


class PositionInformationLoss(nn.Module):
    """IDD position information distillation: each channel should respond *where* the teacher's channel responds.

    Formulation used here: every channel's energy ``|f_c(x)|^p`` is normalised into a spatial distribution
    ``q_c(x)``; its centroid ``mu_c = sum_x q_c(x) x`` in normalised pixel-centre coordinates ([-1, 1] per axis) is
    the channel's position code. The loss is ``sum over axes, mean over B and C of (mu^S_c - mu^T_c)^2``.

    Why this form: the exact IDD form is not public. A trainable coordinate-decoding probe would need a trained
    teacher-side probe (an extra stage, or gradients that change a teacher-side module), and a closed-form probe
    fitted on the batch overfits when channels outnumber positions. Centroids need no parameters, cost O(C |S|),
    are unchanged by any rescaling (or sign flip) of a channel, compare networks at different resolutions (the
    coordinates are normalised), and change when content moves: they carry exactly the position information.
    Channel c of the student is compared with channel c of the teacher, so the widths must match (use an adapter /
    ``align`` in the term).

    Args:
        p: exponent of the channel energy, ``p > 0`` (2, as attention transfer).
        eps: guards the normalisation of an all-zero channel (its centroid is then 0).

    Reference: Zhang et al., "Inter-class Distance Distillation for Semantic Segmentation", IJCAI 2022
    (arXiv:2205.03650).
    """

    def __init__(self, p: float = 2.0, eps: float = 1e-12) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = float(p)
        self.eps = float(eps)

    def _centroids(self, feature: torch.Tensor) -> torch.Tensor:
        energy = feature.float().flatten(2).abs().pow(self.p)  # (B, C, N)
        q = energy / energy.sum(-1, keepdim=True).clamp_min(self.eps)
        coords = _coordinates(feature.shape[2:], feature.device)  # (d, N)
        with autocast_off(q):
            return q @ coords.t()  # (B, C, d)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student features ``(B, C, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher features ``(B, C, *S_t)``, same batch, width and number of spatial dims.

        Returns:
            the scalar loss.
        """
        if check_spatial(student, "student") != check_spatial(teacher, "teacher"):
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in dims")
        if student.shape[:2] != teacher.shape[:2]:
            raise ValueError(
                f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must share batch and channels; "
                "add an adapter (align) to match the widths"
            )
        mu_s = self._centroids(student)
        mu_t = self._centroids(teacher.detach())
        return (mu_s - mu_t).pow(2).sum(-1).mean()


class EMKDRegionAffinityLoss(nn.Module):
    """EMKD region affinity distillation: the similarity between the foreground and background regions.

    Formulation used here: per image and network, foreground (label > 0) and background (label == 0) prototypes are
    the mask-averages of the feature (labels nearest-downsampled, :func:`class_prototypes`); the region affinity is
    ``cos(mu_fg, mu_bg)``; the loss is the mean over images where both regions are present (in both networks'
    downsampled labels) of ``(a_S - a_T)^2``; zero when no image has both. Widths and resolutions may differ.

    Paper's weight: 0.9 (with pixel KD tau = 4, weight 0.1, and AT p = 4, weight 0.9).

    Args:
        ignore_index: a label value to leave out.

    Reference: Qin et al., "Efficient Medical Image Segmentation Based on Knowledge Distillation", IEEE TMI 2021.
    """

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def _affinity(self, feature: torch.Tensor, binary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        protos, present, _ = class_prototypes(feature, binary, 2)
        return F.cosine_similarity(protos[:, 1], protos[:, 0], dim=-1, eps=1e-8), present.all(dim=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student features ``(B, C_s, *S_s)``, 1 to 3 spatial dims.
            teacher: teacher features ``(B, C_t, *S_t)``.
            label: ``(B, 1, *S_l)`` integer class indices; every class > 0 is foreground.

        Returns:
            the scalar loss.
        """
        if check_spatial(student, "student") != check_spatial(teacher, "teacher"):
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in dims")
        label = label.detach().round().long()
        binary = (label > 0).long()
        invalid = label < 0 if self.ignore_index is None else (label < 0) | (label == self.ignore_index)
        binary = binary.masked_fill(invalid, -1)
        a_s, ok_s = self._affinity(student, binary)
        a_t, ok_t = self._affinity(teacher.detach(), binary)
        return _masked_mean((a_s - a_t).pow(2), ok_s & ok_t)
