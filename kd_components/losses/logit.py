"""Logit (output) distillation: Hinton KD per pixel / voxel, channel-wise distillation, DIST, Structured KD
pixel-wise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.losses._grid import check_logit_pair

__all__ = ["LogitKDLoss", "PixelWiseKDLoss", "ChannelWiseDistillationLoss", "DISTLoss"]


def class_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log class probabilities ``(B, K, *S)`` in float32 of ``logits / temperature``.

    Softmax over the channel axis; a one-channel (sigmoid) output is read as two classes
    ``[sigmoid(-z / tau), sigmoid(z / tau)]``, so binary networks with a single output channel work too.
    """
    z = logits.float() / temperature
    if z.shape[1] == 1:
        return torch.cat([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    return torch.log_softmax(z, dim=1)


class LogitKDLoss(nn.Module):
    """Hinton knowledge distillation applied per pixel / voxel.

    Formulation used here: ``tau^2 * mean over the B * |S| positions of KL(softmax(z_T / tau) || softmax(z_S / tau))``,
    the KL summed over classes at each position. One-channel logits are read as the two classes
    ``[sigmoid(-z), sigmoid(z)]``.

    Default tau = 4 (as EMKD's pixel KD, weight 0.1 there; Graph Flow uses weight 1). The tau^2 factor keeps the
    gradient scale independent of tau.

    Args:
        temperature: softmax temperature tau.

    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, K, *S)``, 1 to 3 spatial dims.
            teacher: teacher logits, same shape.

        Returns:
            the scalar loss.
        """
        check_logit_pair(student, teacher)
        teacher = teacher.detach()
        log_p_s = class_log_probs(student, self.temperature)
        log_p_t = class_log_probs(teacher, self.temperature)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        return kl.mean() * self.temperature**2


class PixelWiseKDLoss(LogitKDLoss):
    """Structured KD pixel-wise distillation: :class:`LogitKDLoss` with tau = 1.

    Formulation used here: ``mean over pixels of KL(p_T || p_S)`` with p the class softmax (tau = 1, so the tau^2
    factor is 1). The paper weights it 10.

    Args:
        temperature: softmax temperature (paper: 1).

    Reference: Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019
    (extended in TPAMI 2020).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(temperature=temperature)


class ChannelWiseDistillationLoss(nn.Module):
    """Channel-wise distillation (CWD): each channel's activation map, softmax-normalised over space, is matched.

    Formulation used here: for each sample b and channel c, ``q_c = softmax over all spatial positions of z_c / tau``;
    the loss is ``tau^2 / (B * C) * sum over b, c of KL(q_c^T || q_c^S)``. Adding a constant to any channel map
    (per sample) does not change the loss. Applied to logits by default (also usable on features of equal width).

    Paper's defaults on logits: tau = 4, weight 3.

    Args:
        temperature: spatial-softmax temperature tau.

    Reference: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits or features ``(B, C, *S)``, 1 to 3 spatial dims.
            teacher: teacher tensor, same shape.

        Returns:
            the scalar loss.
        """
        check_logit_pair(student, teacher)
        teacher = teacher.detach()
        log_q_s = torch.log_softmax(student.float().flatten(2) / self.temperature, dim=-1)
        log_q_t = torch.log_softmax(teacher.float().flatten(2) / self.temperature, dim=-1)
        kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=-1)  # (B, C)
        return kl.mean() * self.temperature**2


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 - mean over rows of Pearson(a_row, b_row)`` for ``(rows, n)`` tensors."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=eps).mean()


class DISTLoss(nn.Module):
    """DIST: distillation from a stronger teacher by Pearson correlation of class probabilities.

    Formulation used here: with ``P = softmax(z / tau)`` over classes arranged as a matrix of shape (B * |S|, K)
    (each pixel / voxel is a sample),
    ``inter = 1 - mean over pixels of Pearson(P_S[x, :], P_T[x, :])`` (relation between classes at a pixel) and
    ``intra = 1 - mean over classes of Pearson(P_S[:, k], P_T[:, k])`` (relation between pixels for a class);
    loss ``= tau^2 * (beta * inter + gamma * intra)``. Pearson correlation ignores any positive affine map, so the
    loss vanishes when, e.g., the student's probabilities are a mix ``lam * P_T + (1 - lam) / K`` of the teacher's
    with the uniform distribution: DIST asks for the same ranking / relations, not the same values.
    With only two classes the per-pixel (inter) correlation is +-1 and has zero gradient; the intra term carries
    the signal. One-channel logits are read as two classes ``[sigmoid(-z), sigmoid(z)]``.

    Paper's defaults: beta = gamma = 1, tau = 1 (segmentation).

    Args:
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: softmax temperature tau.
        eps: guards the correlation of constant vectors.

    Reference: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.eps = float(eps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, K, *S)``, 1 to 3 spatial dims.
            teacher: teacher logits, same shape.

        Returns:
            the scalar loss.
        """
        check_logit_pair(student, teacher)
        teacher = teacher.detach()
        if student.shape[1] <= 2:
            return self._two_class(student, teacher)
        p_s = class_log_probs(student, self.temperature).exp()
        p_t = class_log_probs(teacher, self.temperature).exp()
        num_classes = p_s.shape[1]
        p_s = p_s.movedim(1, -1).reshape(-1, num_classes)
        p_t = p_t.movedim(1, -1).reshape(-1, num_classes)
        inter = _pearson_distance(p_s, p_t, self.eps)
        intra = _pearson_distance(p_s.t(), p_t.t(), self.eps)
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)

    def _two_class(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The same loss for one- or two-channel logits ``(B, K, *S)``, from the foreground probability alone.

        With ``p = P[:, 1]`` (``P[:, 0] = 1 - p``) the centred class vector of a pixel is ``(-d, d)``, ``d = p - 1/2``:
        its Pearson correlation is ``2 d_S d_T / (max(√2|d_S|, eps) · max(√2|d_T|, eps))`` (±1, computed without
        gradient: it has none), and both classes' correlations over pixels equal ``Pearson(p_S, p_T)``. One pass
        over ``(B, *S)`` instead of the ``(B·|S|, K)`` copies; equal to the general formula (tested, also its
        gradient, which here has no rounding noise from the per-pixel term near ``p = 1/2``).
        """

        def foreground(logits: torch.Tensor) -> torch.Tensor:
            z = logits.float() / self.temperature
            return torch.sigmoid(z[:, 0] if z.shape[1] == 1 else z[:, 1] - z[:, 0])

        p_s, p_t = foreground(student), foreground(teacher)
        with torch.no_grad():
            d_s, d_t = p_s - 0.5, p_t - 0.5
            norms = (2.0**0.5 * d_s.abs()).clamp_min(self.eps) * (2.0**0.5 * d_t.abs()).clamp_min(self.eps)
            inter = 1.0 - (2 * d_s * d_t / norms).mean()
        intra = _pearson_distance(p_s.reshape(1, -1), p_t.reshape(1, -1), self.eps)
        return self.temperature**2 * (self.beta * inter + self.gamma * intra)
