"""Tests of the feature losses: attention transfer, FitNet, MGD, factor transfer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_components.losses import AttentionTransferLoss, FactorTransferLoss, FitNetLoss, MGDLoss
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
)

DTYPES = (torch.bfloat16, torch.float16)
SPATIAL = [(12,), (8, 10), (6, 5, 4)]


def _pair(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...] | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(student_shape, generator=g)
    return {"student": student, "teacher": torch.randn(teacher_shape or student_shape, generator=g)}


def _identical(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return {"student": x, "teacher": x.clone()}


def _call(loss):
    return lambda t: loss(**t)


# ---------------------------------------------------------------- attention transfer


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("p", [2.0, 4.0])
def test_at_properties(spatial: tuple[int, ...], p: float) -> None:
    call = _call(AttentionTransferLoss(p=p))
    assert_zero_at_identity(call, _identical((2, 4, *spatial)))
    assert_positive(call, _pair((2, 4, *spatial), (2, 6, *spatial)))
    assert_student_only_gradients(call, _pair((2, 4, *spatial), (2, 6, *spatial)), ("student",), ("teacher",))


def test_at_ignores_channel_count_and_global_scale() -> None:
    loss = AttentionTransferLoss()
    x = _pair((2, 3, 8, 8))
    ref = loss(x["student"], x["teacher"])
    # the attention map is a channel mean: duplicating the teacher's channels changes nothing
    assert torch.allclose(loss(x["student"], torch.cat([x["teacher"]] * 2, dim=1)), ref, atol=1e-7)
    # Q is normalised per sample: a global positive scale of either feature changes nothing
    assert torch.allclose(loss(3.7 * x["student"], 0.2 * x["teacher"]), ref, rtol=1e-5, atol=1e-8)


def test_at_hand_computed() -> None:
    # maps |F|² = [1, 4] and [4, 1]: Q = [1, 4]/√17 and [4, 1]/√17, squared differences 9/17 each
    student = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    teacher = torch.tensor([2.0, 1.0]).view(1, 1, 1, 2)
    assert torch.allclose(AttentionTransferLoss()(student, teacher), torch.tensor(9 / 17))
    # p = 1 on the same data: maps [1, 2] vs [2, 1], Q = [1, 2]/√5 and [2, 1]/√5, squared differences 1/5
    assert torch.allclose(AttentionTransferLoss(p=1)(student, -teacher), torch.tensor(1 / 5))


def test_at_resizes_student_map_to_teacher() -> None:
    loss = AttentionTransferLoss()
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)
    a_s = F.interpolate(student.pow(2).mean(1, keepdim=True), size=(8, 8), mode="bilinear", align_corners=False)
    q_s = F.normalize(a_s.flatten(1), dim=1)
    q_t = F.normalize(teacher.pow(2).mean(1).flatten(1), dim=1)
    assert torch.allclose(loss(student, teacher), (q_s - q_t).pow(2).mean())
    # a constant student attention matches a constant teacher attention at any size
    assert loss(torch.ones(1, 2, 3, 3), torch.full((1, 4, 9, 9), 2.0)) < 1e-10


def test_at_2d_3d_and_autocast() -> None:
    call = _call(AttentionTransferLoss())
    assert_2d_3d_consistent(call, _pair((2, 4, 6, 8), (2, 5, 12, 16)))
    for dtype in DTYPES:
        assert_finite_under_autocast(call, _pair((2, 4, 6, 5, 4)), dtype)


# ---------------------------------------------------------------- FitNet


@pytest.mark.parametrize("spatial", SPATIAL)
def test_fitnet_properties(spatial: tuple[int, ...]) -> None:
    call = _call(FitNetLoss())
    assert_zero_at_identity(call, _identical((2, 4, *spatial)))
    assert_positive(call, _pair((2, 4, *spatial)))
    assert_student_only_gradients(call, _pair((2, 4, *spatial)), ("student",), ("teacher",))


def test_fitnet_hand_and_2d_3d() -> None:
    student = torch.tensor([1.0, 2.0, 0.0, -1.0]).view(1, 2, 1, 2)
    assert torch.allclose(FitNetLoss()(student, torch.zeros_like(student)), torch.tensor(6 / 4))
    assert_2d_3d_consistent(_call(FitNetLoss()), _pair((2, 3, 5, 7)))


def test_fitnet_adapter() -> None:
    loss2d = FitNetLoss(student_channels=3, teacher_channels=5, spatial_dims=2)
    loss3d = FitNetLoss(student_channels=3, teacher_channels=5, spatial_dims=3)
    loss3d.adapter.weight.data.copy_(loss2d.adapter.weight.data.unsqueeze(-1))
    loss3d.adapter.bias.data.copy_(loss2d.adapter.bias.data)
    inputs = _pair((2, 3, 4, 6), (2, 5, 4, 6))
    assert_2d_3d_consistent(lambda t: (loss2d if t["student"].dim() == 4 else loss3d)(**t), inputs)
    assert_student_only_gradients(_call(loss2d), inputs, ("student",), ("teacher",))
    value = loss2d(**inputs)
    value.backward()
    assert loss2d.adapter.weight.grad is not None and loss2d.adapter.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="adapter"):
        FitNetLoss()(inputs["student"], inputs["teacher"])
    with pytest.raises(ValueError):
        FitNetLoss(student_channels=3)


def test_fitnet_autocast() -> None:
    for loss in (FitNetLoss(), FitNetLoss(4, 6, spatial_dims=3)):
        inputs = _pair((2, 4, 5, 4, 3), (2, 6 if loss.adapter is not None else 4, 5, 4, 3))
        for dtype in DTYPES:
            assert_finite_under_autocast(_call(loss), inputs, dtype)


# ---------------------------------------------------------------- MGD


def _identity_generator(loss: MGDLoss) -> MGDLoss:
    """Set both generator convolutions to the identity kernel (exact for non-negative inputs, as ReLU passes them)."""
    for block in loss.generation:
        conv = block.conv if hasattr(block, "conv") else block
        weight = torch.zeros_like(conv.weight)
        centre = tuple(k // 2 for k in weight.shape[2:])
        for c in range(weight.shape[0]):
            weight[(c, c, *centre)] = 1.0
        conv.weight.data.copy_(weight)
        conv.bias.data.zero_()
    return loss


def test_mgd_hand_computed_with_identity_generator() -> None:
    x = torch.rand(2, 2, 4, 4)
    loss = _identity_generator(MGDLoss(2, 2, mask_ratio=0.0))
    assert float(loss(x, x).detach()) < 1e-12  # no mask and an identity generator: the minimum, 0
    assert torch.allclose(loss(x, x + 1.0), torch.tensor(1.0))  # every element off by 1
    loss_sum = _identity_generator(MGDLoss(2, 2, mask_ratio=0.0, reduction="sum"))
    assert torch.allclose(loss_sum(x, x + 1.0), torch.tensor(2 * 16 * 1.0))  # sum of 2·2·16 ones / batch 2
    # with a mask the masked positions cannot be reconstructed by the identity: loss = kept-out mass / size
    masked = _identity_generator(MGDLoss(2, 2, mask_ratio=0.5, rng=torch.Generator().manual_seed(3)))
    keep = MGDLoss(2, 2, mask_ratio=0.5, rng=torch.Generator().manual_seed(3)).random_mask(x)
    assert torch.allclose(masked(x, x), (x * (1 - keep)).pow(2).mean())


def test_mgd_mask_ratio_and_seed() -> None:
    loss = MGDLoss(3, 3, mask_ratio=0.75, rng=torch.Generator().manual_seed(0))
    mask = loss.random_mask(torch.zeros(4, 3, 32, 32))
    assert mask.shape == (4, 1, 32, 32)  # the same positions for every channel
    assert abs(float(1 - mask.mean()) - 0.75) < 0.03
    a = MGDLoss(3, 5, rng=torch.Generator().manual_seed(7))
    b = MGDLoss(3, 5, rng=torch.Generator().manual_seed(7))
    b.load_state_dict(a.state_dict())
    inputs = _pair((2, 3, 6, 6), (2, 5, 6, 6))
    assert torch.equal(a(**inputs), b(**inputs))
    assert not torch.equal(a(**inputs), a(**inputs))  # a fresh mask every call


@pytest.mark.parametrize("spatial", SPATIAL)
def test_mgd_positive_and_gradients(spatial: tuple[int, ...]) -> None:
    loss = MGDLoss(3, 4, spatial_dims=len(spatial), rng=torch.Generator().manual_seed(0))
    inputs = _pair((2, 3, *spatial), (2, 4, *spatial))
    assert_positive(_call(loss), inputs)
    assert_student_only_gradients(_call(loss), inputs, ("student",), ("teacher",))
    loss.zero_grad()
    loss(**inputs).backward()
    for name, param in loss.named_parameters():  # generator and adapter are trained with the student
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_mgd_2d_3d_consistent() -> None:
    # the same weights as a 3D kernel that is zero off the middle slice, and the same mask draws
    loss2d = MGDLoss(3, 4, spatial_dims=2)
    loss3d = MGDLoss(3, 4, spatial_dims=3)
    for (name, p2), p3 in zip(loss2d.named_parameters(), loss3d.parameters(), strict=True):
        if p2.dim() == 4:
            kernel = torch.zeros_like(p3)
            kernel[..., p3.shape[-1] // 2] = p2.detach()
            p3.data.copy_(kernel)
        else:
            p3.data.copy_(p2.detach())
        assert p3.shape[: p2.dim()] == p2.shape, name

    def call(t: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = loss2d if t["student"].dim() == 4 else loss3d
        loss.rng = torch.Generator().manual_seed(11)
        return loss(**t)

    assert_2d_3d_consistent(call, _pair((2, 3, 6, 7), (2, 4, 6, 7)))


def test_mgd_autocast_and_errors() -> None:
    loss = MGDLoss(4, 4, spatial_dims=3)
    for dtype in DTYPES:
        assert_finite_under_autocast(_call(loss), _pair((2, 4, 4, 5, 3)), dtype)
    with pytest.raises(ValueError):
        MGDLoss(2, 2, mask_ratio=1.0)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4, 4, 5, 3), torch.randn(2, 4, 4, 5, 2))


# ---------------------------------------------------------------- factor transfer


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("p", [1, 2])
def test_ft_properties(spatial: tuple[int, ...], p: int) -> None:
    call = _call(FactorTransferLoss(p=p))
    assert_zero_at_identity(call, _identical((2, 4, *spatial)))
    assert_positive(call, _pair((2, 4, *spatial)))
    assert_student_only_gradients(call, _pair((2, 4, *spatial)), ("student",), ("teacher",))


def test_ft_hand_per_sample_scale_and_2d_3d() -> None:
    # [3, 4]/5 vs [4, 3]/5: |difference| = 0.2 at both elements
    student = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    teacher = torch.tensor([4.0, 3.0]).view(1, 1, 1, 2)
    assert torch.allclose(FactorTransferLoss()(student, teacher), torch.tensor(0.2))
    assert torch.allclose(FactorTransferLoss(p=2)(student, teacher), torch.tensor(0.04))
    loss = FactorTransferLoss()
    x = _pair((3, 4, 5, 5))
    scale = torch.tensor([0.1, 2.0, 30.0]).view(3, 1, 1, 1)
    assert torch.allclose(loss(scale * x["student"], x["teacher"] / scale), loss(**x), rtol=1e-5)
    assert_2d_3d_consistent(_call(loss), x)
    for dtype in DTYPES:
        assert_finite_under_autocast(_call(loss), _pair((2, 4, 4, 5, 3)), dtype)
    with pytest.raises(ValueError):
        loss(torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5))
