"""Pseudo-label distillation: the teacher's hard masks, scored by a supervised segmentation loss."""

from __future__ import annotations

import torch
from torch import nn

from kd_components.losses._grid import check_logit_pair, check_spatial

__all__ = ["PseudoLabelLoss", "teacher_mask"]


def teacher_mask(teacher: torch.Tensor) -> torch.Tensor:
    """The teacher's hard segmentation ``(B, 1, *S)`` of its logits ``(B, K, *S)``, as class indices.

    ``argmax`` over the channels; a one-channel (sigmoid) output gives ``z > 0`` (foreground probability above 1/2).
    Computed without gradient.
    """
    check_spatial(teacher, "teacher")
    with torch.no_grad():
        if teacher.shape[1] == 1:
            return (teacher > 0).to(torch.long)
        return teacher.argmax(dim=1, keepdim=True)


class PseudoLabelLoss(nn.Module):
    """The teacher's hard masks as labels for the student: ``loss(student, argmax_k teacher)``.

    Formulation used here: the teacher's per-position class ``y_T = argmax_k z_T`` (``z_T > 0`` for one channel) is
    treated as a label of shape ``(B, 1, *S)`` and the student's logits are scored against it by ``loss``, normally
    the bundle's own supervised loss (Dice + CE, PraNet's structure loss, ...). On images without a label this is
    self-training from the teacher (pseudo-labelling); unlike per-pixel KL (:class:`~kd_components.losses.LogitKDLoss`)
    it asks the student for the teacher's *decision* at each position, not for its logit values, and a region loss
    (Dice, IoU) in ``loss`` weighs whole structures rather than single pixels. The loss is 0 only when ``loss`` is 0
    for that label: it does not vanish when the student's logits equal the teacher's (a teacher is not sure of its
    own masks).

    Args:
        loss: a supervised loss called as ``loss(student_logits, label)`` with ``label`` ``(B, 1, *S)`` class
            indices, e.g. ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``.

    Reference: Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural Networks",
    ICML 2013 Workshop; Xie et al., "Self-training with Noisy Student improves ImageNet classification", CVPR 2020.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a callable supervised loss, got {type(loss).__name__}")
        self.loss = loss

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student: student logits ``(B, K, *S)``, 1 to 3 spatial dims.
            teacher: teacher logits with the same shape.

        Returns:
            the scalar ``loss(student, teacher_mask(teacher))``.
        """
        check_logit_pair(student, teacher)
        return self.loss(student, teacher_mask(teacher))
