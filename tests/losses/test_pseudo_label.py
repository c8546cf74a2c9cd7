"""Tests of PseudoLabelLoss: the teacher's hard masks scored by a supervised loss."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from kd_components.losses import PseudoLabelLoss, StructureLoss
from kd_components.losses.pseudo_label import teacher_mask
from tests.helpers import assert_2d_3d_consistent, assert_student_only_gradients


def _pair(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"student": 2 * torch.randn(shape, generator=g), "teacher": 2 * torch.randn(shape, generator=g)}


def _dice_ce() -> DiceCELoss:
    return DiceCELoss(to_onehot_y=True, softmax=True)


def test_teacher_mask_argmax_and_one_channel() -> None:
    logits = torch.tensor([[[[0.0, 3.0]], [[1.0, -1.0]], [[-2.0, 0.5]]]])  # (1, 3, 1, 2)
    assert teacher_mask(logits).tolist() == [[[[1, 0]]]]
    one = torch.tensor([[[[-0.1, 0.2, 3.0]]]])  # (1, 1, 1, 3)
    assert teacher_mask(one).tolist() == [[[[0, 1, 1]]]]


@pytest.mark.parametrize("shape", [(2, 3, 10), (2, 4, 6, 5), (2, 3, 4, 3, 5)])
def test_equals_the_supervised_loss_on_the_teacher_masks(shape: tuple[int, ...]) -> None:
    """The value is the wrapped loss with the teacher's argmax as the label, in 1D, 2D and 3D."""
    pair = _pair(shape)
    label = pair["teacher"].argmax(dim=1, keepdim=True)
    expected = _dice_ce()(pair["student"], label)
    assert torch.allclose(PseudoLabelLoss(_dice_ce())(**pair), expected)


def test_only_the_teacher_decision_counts() -> None:
    """Rescaling or shifting the teacher's logits per position keeps its decisions, so the loss does not change
    (per-pixel KL would)."""
    pair = _pair((2, 3, 8, 8), seed=3)
    loss = PseudoLabelLoss(_dice_ce())
    reference = loss(**pair)
    bent = 5.0 * pair["teacher"] + torch.randn(2, 1, 8, 8)
    assert torch.allclose(loss(pair["student"], bent), reference)


def test_falls_to_zero_as_the_student_agrees_with_confidence() -> None:
    """A student whose logits pick the teacher's classes with growing margin drives the loss towards 0."""
    teacher = _pair((2, 3, 8, 8), seed=4)["teacher"]
    onehot = torch.nn.functional.one_hot(teacher.argmax(dim=1), 3).movedim(-1, 1).float()
    loss = PseudoLabelLoss(DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-6))
    values = [float(loss(margin * onehot, teacher)) for margin in (1.0, 4.0, 16.0)]
    assert values[0] > values[1] > values[2]
    assert values[2] < 1e-3
    wrong = torch.roll(onehot, 1, dims=1)
    assert float(loss(16.0 * wrong, teacher)) > 1.0


def test_one_channel_logits_with_the_structure_loss() -> None:
    """A one-channel teacher gives the mask z > 0, as PraNet's structure loss reads its labels."""
    pair = _pair((2, 1, 16, 16), seed=5)
    expected = StructureLoss()(pair["student"], (pair["teacher"] > 0).float())
    assert torch.allclose(PseudoLabelLoss(StructureLoss())(**pair), expected)


def test_gradients_reach_only_the_student() -> None:
    loss = PseudoLabelLoss(_dice_ce())
    assert_student_only_gradients(lambda t: loss(**t), _pair((2, 3, 6, 6)), ("student",), ("teacher",))


def test_2d_3d_consistent() -> None:
    loss = PseudoLabelLoss(_dice_ce())
    assert_2d_3d_consistent(lambda t: loss(**t), _pair((2, 3, 7, 6)))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="callable supervised loss"):
        PseudoLabelLoss(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        PseudoLabelLoss(_dice_ce())(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
