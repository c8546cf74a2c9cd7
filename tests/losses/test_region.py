"""Tests of the region / prototype distillation losses: IFVD, IDD (inter-class distance, position), EMKD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_components.losses.region import (
    EMKDRegionAffinityLoss,
    IFVDLoss,
    InterClassDistanceLoss,
    PositionInformationLoss,
    class_prototypes,
)
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
    clone_inputs,
)

LABELLED = {
    "ifvd": lambda: IFVDLoss(num_classes=3),
    "idd": lambda: InterClassDistanceLoss(num_classes=3),
    "emkd": lambda: EMKDRegionAffinityLoss(),
}
LOSSES = {**LABELLED, "position": lambda: PositionInformationLoss()}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(
    spatial: tuple[int, ...], channels: tuple[int, int] = (4, 4), seed: int = 0, label_scale: int = 2
) -> dict[str, torch.Tensor]:
    """Features at ``spatial``; labels at ``label_scale`` times that size (nearest-downsampled by the losses)."""
    g = torch.Generator().manual_seed(seed)
    label_shape = (2, 1, *(label_scale * s for s in spatial))
    return {
        "student": torch.randn((2, channels[0], *spatial), generator=g),
        "teacher": torch.randn((2, channels[1], *spatial), generator=g),
        "label": torch.randint(0, 3, label_shape, generator=g),
    }


def _call(loss: torch.nn.Module, name: str):
    if name == "position":
        return lambda t: loss(t["student"], t["teacher"])
    return lambda t: loss(**t)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("spatial", [(10,), (6, 5), (4, 3, 5)])
def test_zero_positive_gradients(name: str, spatial: tuple[int, ...]) -> None:
    call = _call(LOSSES[name](), name)
    same = _inputs(spatial, seed=1)
    same["teacher"] = same["student"].clone()
    assert_zero_at_identity(call, same)
    widths = (4, 4) if name == "position" else (4, 6)  # label-based losses take different widths
    assert_positive(call, _inputs(spatial, widths))
    assert_student_only_gradients(call, _inputs(spatial, widths), ("student",), ("teacher",))


@pytest.mark.parametrize("name", list(LOSSES))
def test_2d_3d_consistent(name: str) -> None:
    assert_2d_3d_consistent(_call(LOSSES[name](), name), _inputs((7, 6), seed=2))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(name: str, dtype: torch.dtype) -> None:
    call = _call(LOSSES[name](), name)
    assert_finite_under_autocast(call, _inputs((6, 6), seed=3), dtype)
    assert_finite_under_autocast(call, _inputs((3, 4, 3), seed=3), dtype)


@pytest.mark.parametrize("name", list(LABELLED))
@pytest.mark.parametrize("fill", [0, 2])
def test_single_class_labels_stay_finite(name: str, fill: int) -> None:
    """All-background (or all one class) labels: absent classes must not produce NaN values or gradients."""
    inputs = _inputs((5, 6), seed=4)
    inputs["label"] = torch.full_like(inputs["label"], fill)
    for dtype in (None, torch.bfloat16):
        tensors = clone_inputs(inputs, requires_grad=("student",))
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            value = LABELLED[name]()(**tensors)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(tensors["student"].grad).all()
        if name != "ifvd":  # no pair of regions: nothing to match
            assert value.item() == 0.0


def test_class_prototypes_hand_computed() -> None:
    feat = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]])  # (1, 2, 4)
    label = torch.tensor([[[0, 0, 1, 5]]])  # 5 is out of range: no class
    protos, present, one_hot = class_prototypes(feat, label, num_classes=3)
    assert torch.allclose(protos[0], torch.tensor([[1.5, 0.0], [3.0, 2.0], [0.0, 0.0]]))
    assert present.tolist() == [[True, True, False]] and one_hot.sum().item() == 3
    up = torch.tensor([[[0, 0, 0, 0, 1, 1, 2, 2]]])  # nearest-downsampled from twice the size
    protos, present, _ = class_prototypes(feat, up, num_classes=3, ignore_index=2)
    assert torch.allclose(protos[0, 1], torch.tensor([3.0, 2.0])) and present.tolist() == [[True, True, False]]


def test_ifvd_hand_computed_and_invariances() -> None:
    # one image, 3 positions, class 0 at positions 0 and 1, class 1 at position 2
    s = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]])  # prototype 0 = (0.5, 0.5); position 2 is its own
    t = torch.tensor([[[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]])  # prototype 0 = (1, 0)
    label = torch.tensor([[[0, 0, 1]]])
    c = 1 / math.sqrt(2)  # cos((1,0),(.5,.5)) = cos((0,1),(.5,.5))
    expected = ((c - 1) ** 2 + (c - 1) ** 2 + 0.0) / 3
    assert IFVDLoss(num_classes=2)(s, t, label=label).item() == pytest.approx(expected, rel=1e-5)
    inputs = _inputs((6, 6), (4, 5))
    loss = IFVDLoss(num_classes=3)
    base = loss(**inputs)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    rotated = torch.einsum("dc,bchw->bdhw", q, inputs["student"]) * 3.0
    assert torch.allclose(base, loss(rotated, inputs["teacher"], label=inputs["label"]), rtol=1e-4)
    scale = torch.rand(2, 1, 6, 6) + 0.5  # per-position scaling moves the prototypes: not invariant
    assert not torch.allclose(base, loss(inputs["student"] * scale, inputs["teacher"], label=inputs["label"]))


def test_idd_hand_computed_and_invariances() -> None:
    # 1D, one image, classes at positions [0, 0, 1, 1]
    s = torch.tensor([[[0.0, 0.0, 2.0, 2.0]]])  # centres 0 and 2; spread^2 = mean (x - 1)^2 = 1 -> D = 2
    t = torch.tensor([[[0.0, 1.0, 3.0, 4.0]]])  # centres 0.5, 3.5; mean 2; spread^2 = (4+1+1+4)/4 = 2.5
    label = torch.tensor([[[0, 0, 1, 1]]])
    d_t = 3.0 / math.sqrt(2.5)
    value = InterClassDistanceLoss(num_classes=2, eps=0.0)(s, t, label=label)
    assert value.item() == pytest.approx((2.0 - d_t) ** 2, rel=1e-5)
    inputs = _inputs((6, 5), (4, 7))
    loss = InterClassDistanceLoss(num_classes=3)
    base = loss(**inputs)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    moved = 5.0 * torch.einsum("dc,bchw->bdhw", q, inputs["student"]) + torch.randn(1, 4, 1, 1)
    assert torch.allclose(base, loss(moved, inputs["teacher"], label=inputs["label"]), rtol=1e-4)
    # binary labels still carry a signal (a mean-distance normalisation would make it vanish)
    binary = {**inputs, "label": inputs["label"].clamp(max=1)}
    assert_positive(lambda t: InterClassDistanceLoss(num_classes=2)(**t), binary)


def test_position_hand_computed_and_invariances() -> None:
    s = torch.tensor([[[1.0, 0.0, 1.0]]])  # energy at both ends: centroid 0
    t = torch.tensor([[[0.0, 0.0, 2.0]]])  # centroid at the last pixel centre, 2/3
    assert PositionInformationLoss()(s, t).item() == pytest.approx((2 / 3) ** 2, rel=1e-5)
    feats = torch.randn(2, 3, 6, 5)
    other = torch.randn(2, 3, 6, 5)
    loss = PositionInformationLoss()
    base = loss(feats, other)
    channel_scale = torch.tensor([2.0, -0.5, 7.0]).view(1, 3, 1, 1)
    assert torch.allclose(base, loss(feats * channel_scale, other), rtol=1e-5)
    assert not torch.allclose(base, loss(feats.roll(2, dims=-1), other), rtol=1e-3)  # content moved
    # resolution-free coordinates: a nearest-upsampled copy has the same centroids
    up = F.interpolate(feats, scale_factor=2, mode="nearest")
    assert loss(feats, up).item() < 1e-10
    zero = torch.zeros(1, 2, 4, 4, requires_grad=True)
    value = loss(zero, torch.randn(1, 2, 4, 4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError):
        loss(torch.randn(1, 3, 4, 4), torch.randn(1, 5, 4, 4))


def test_emkd_hand_computed_and_missing_regions() -> None:
    # two images; the second has no foreground and is left out
    s = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]])
    t = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 2.0, 3.0], [1.0, 5.0, 1.0]]])
    label = torch.tensor([[[0, 0, 3]], [[0, 0, 0]]])  # any class > 0 is foreground
    # image 0: student bg (0.5, 0.5), fg (1, 1): cos 1; teacher bg (1, 0), fg (0, 1): cos 0
    assert EMKDRegionAffinityLoss()(s, t, label=label).item() == pytest.approx(1.0, rel=1e-5)
    ignored = torch.tensor([[[0, 255, 3]], [[0, 0, 0]]])
    # with position 1 ignored: student bg (1, 0), fg (1, 1): cos 1/sqrt2; teacher bg (1, 0), fg (0, 1): cos 0
    value = EMKDRegionAffinityLoss(ignore_index=255)(s, t, label=ignored)
    assert value.item() == pytest.approx(0.5, rel=1e-5)
