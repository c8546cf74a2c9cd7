"""Tests of the KDAS losses (attention KL, SGM) and the PraNet structure loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_components.losses.kdas import KDASAttentionLoss, KDASSGMLoss, StructureLoss, box_filter, symmetrise
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
)

DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _pair(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"student": torch.randn(shape, generator=g), "teacher": torch.randn(shape, generator=g)}


def _identical(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return {"student": x, "teacher": x.clone()}


DISTILL = {
    "attention": lambda: KDASAttentionLoss(grid=8),
    "attention_softmax": lambda: KDASAttentionLoss(grid=8, channel=1),
    "sgm": lambda: KDASSGMLoss(),
    "sgm_prob": lambda: KDASSGMLoss(grid=6, activation="auto"),
}


def _shape(name: str, spatial: tuple[int, ...]) -> tuple[int, ...]:
    return (2, 3 if name == "attention_softmax" else 1, *spatial)


@pytest.mark.parametrize("name", list(DISTILL))
@pytest.mark.parametrize("spatial", [(12,), (10, 12), (6, 5, 4)])
def test_distill_zero_positive_gradients(name: str, spatial: tuple[int, ...]) -> None:
    loss = DISTILL[name]()
    shape = _shape(name, spatial)
    call = lambda t: loss(**t)  # noqa: E731
    assert_zero_at_identity(call, _identical(shape))
    assert_positive(call, _pair(shape))
    assert_student_only_gradients(call, _pair(shape), ("student",), ("teacher",))


@pytest.mark.parametrize("name", list(DISTILL))
def test_distill_2d_3d_consistent(name: str) -> None:
    loss = DISTILL[name]()
    assert_2d_3d_consistent(lambda t: loss(**t), _pair(_shape(name, (9, 11))))


@pytest.mark.parametrize("name", list(DISTILL))
@pytest.mark.parametrize("dtype", DTYPES)
def test_distill_autocast(name: str, dtype: torch.dtype) -> None:
    loss = DISTILL[name]()
    assert_finite_under_autocast(lambda t: loss(**t), _pair(_shape(name, (8, 8)), seed=3), dtype)
    assert_finite_under_autocast(lambda t: loss(**t), _pair(_shape(name, (4, 4, 4)), seed=3), dtype)


def test_attention_hand_computed() -> None:
    """Two positions, no pooling: check against the formula written out with math."""
    zs, zt = [0.3, -1.2], [2.0, 0.5]
    tau = 2.0
    ps = [1 / (1 + math.exp(-z)) for z in zs]
    pt = [1 / (1 + math.exp(-z)) for z in zt]
    total = 0.0
    for i in range(2):
        es = [math.exp(ps[i] * ps[j] / tau) for j in range(2)]
        et = [math.exp(pt[i] * pt[j] / tau) for j in range(2)]
        qs = [e / sum(es) for e in es]
        qt = [e / sum(et) for e in et]
        total += sum(qt[j] * math.log(qt[j] / qs[j]) for j in range(2))
    expected = tau**2 * total / 2
    value = KDASAttentionLoss(temperature=tau)(torch.tensor([[zs]]), torch.tensor([[zt]]))
    assert value.item() == pytest.approx(expected, rel=1e-3)  # float32 cancellation in a small KL


def test_attention_student_gradient_is_not_zero_unlike_channel_softmax() -> None:
    """The released code's softmax over the singleton channel makes the target constant: ours must not."""
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    assert torch.autograd.grad(F.softmax(x, dim=1).sum(), x)[0].abs().max() == 0  # the released code's failure
    loss = KDASAttentionLoss(grid=4)(x, torch.randn(1, 1, 4, 4))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() > 1e-6


def test_attention_row_chunks_give_the_same_value_and_gradient() -> None:
    s = torch.randn(2, 1, 6, 6, requires_grad=True)
    t = torch.randn(2, 1, 6, 6)
    full = KDASAttentionLoss(row_chunk=4096)(s, t)
    (g_full,) = torch.autograd.grad(full, s)
    chunked = KDASAttentionLoss(row_chunk=5)(s, t)
    (g_chunk,) = torch.autograd.grad(chunked, s)
    assert torch.allclose(full, chunked, rtol=1e-5)
    assert torch.allclose(g_full, g_chunk, rtol=1e-4, atol=1e-7)


def test_attention_flip_invariance_and_channel_selection() -> None:
    """Self-attention is permutation-equivariant: flipping both maps leaves the loss unchanged; a two-class softmax
    foreground equals the sigmoid of the logit difference."""
    inputs = _pair((2, 1, 8, 10), seed=4)
    loss = KDASAttentionLoss(grid=4)
    base = loss(**inputs)
    flipped = loss(inputs["student"].flip(-1, -2), inputs["teacher"].flip(-1, -2))
    assert torch.allclose(base, flipped, rtol=2e-4)  # float32 rounding of a small KL
    two = {k: torch.cat([torch.zeros_like(v), v], dim=1) for k, v in inputs.items()}
    assert torch.allclose(base, loss(**two), rtol=2e-4)


def test_sgm_symmetrise_and_transpose_invariance() -> None:
    g = torch.Generator().manual_seed(7)
    m = torch.randn(1, 1, 3, 3, generator=g)
    assert torch.allclose(symmetrise(m), m + m.transpose(-1, -2), atol=1e-6)
    sv = symmetrise(torch.randn(1, 1, 3, 3, 3, generator=g))
    assert torch.allclose(sv, sv.permute(0, 1, 3, 2, 4), atol=1e-6)
    assert torch.allclose(sv, sv.permute(0, 1, 4, 3, 2), atol=1e-6)
    const = torch.full((1, 1, 2, 2, 2), 1.5)
    assert torch.allclose(symmetrise(const), 2 * const)  # same scale as P + P^T
    inputs = _pair((2, 1, 7, 7), seed=5)
    loss = KDASSGMLoss()
    base = loss(**inputs)
    assert torch.allclose(base, loss(inputs["student"].transpose(-1, -2), inputs["teacher"]), rtol=1e-5)
    vol = _pair((1, 1, 4, 4, 4), seed=6)
    assert torch.allclose(loss(**vol), loss(vol["student"].permute(0, 1, 4, 2, 3), vol["teacher"]), rtol=1e-5)
    # not transpose-invariant in general without the symmetrisation
    assert not torch.allclose(F.mse_loss(*inputs.values()), F.mse_loss(inputs["student"].mT, inputs["teacher"]))


def test_sgm_hand_computed() -> None:
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    # P + P^T: student [[2, 5], [5, 8]], teacher [[0, 2], [2, 0]] -> squared errors 4, 9, 9, 64
    assert KDASSGMLoss()(s, t).item() == pytest.approx((4 + 9 + 9 + 64) / 4)
    # pooled to 1x1 (means 2.5 and 0.5), symmetrised (x2): (5 - 1)^2 = 16
    assert KDASSGMLoss(grid=1)(s, t).item() == pytest.approx(16.0)


# ----------------------------------------------------------------------------------------------------- structure


def _pranet_2d(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PraNet's structure loss with a per-pixel weighted BCE, written out with avg_pool2d."""
    weit = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    bce = F.binary_cross_entropy_with_logits(pred, mask, reduction="none")
    wbce = (weit * bce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    p = torch.sigmoid(pred)
    inter = (p * mask * weit).sum(dim=(2, 3))
    union = ((p + mask) * weit).sum(dim=(2, 3))
    return (wbce + 1 - (inter + 1) / (union - inter + 1)).mean()


def _seg(spatial: tuple[int, ...], channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand((2, 1, *spatial), generator=g) > 0.6).long()
    return {"student": torch.randn((2, channels, *spatial), generator=g), "label": label}


def test_structure_matches_pranet_2d_and_two_channel() -> None:
    inputs = _seg((20, 24))
    loss = StructureLoss()
    value = loss(**inputs)
    assert torch.allclose(value, _pranet_2d(inputs["student"], inputs["label"].float()), rtol=1e-5)
    two = torch.cat([torch.zeros_like(inputs["student"]), inputs["student"]], dim=1)
    assert torch.allclose(value, loss(two, inputs["label"]), rtol=1e-5)
    shifted = torch.cat([two[:, :1] + 3.0, two[:, 1:] + 3.0], dim=1)  # softmax is shift invariant
    assert torch.allclose(value, loss(shifted, inputs["label"]), rtol=1e-5)


def test_box_filter_equals_avg_pool_3d() -> None:
    x = torch.rand(2, 1, 6, 7, 5)
    ref = F.avg_pool3d(x, kernel_size=5, stride=1, padding=2, count_include_pad=True)
    assert torch.allclose(box_filter(x, 5), ref, atol=1e-6)


@pytest.mark.parametrize("spatial", [(16,), (12, 10), (6, 5, 4)])
def test_structure_minimum_gradient_autocast(spatial: tuple[int, ...]) -> None:
    loss = StructureLoss()
    inputs = _seg(spatial, seed=2)
    perfect = (inputs["label"].float() * 2 - 1) * 30.0
    assert loss(perfect, inputs["label"]).item() < 1e-6  # minimum: confident and right
    assert loss(-perfect, inputs["label"]).item() > 1.0  # confident and wrong
    assert_positive(lambda t: loss(**t), inputs)
    assert_student_only_gradients(lambda t: loss(**t), inputs, ("student",), ())
    for dtype in DTYPES:
        assert_finite_under_autocast(lambda t: loss(**t), inputs, dtype)
    empty = {"student": inputs["student"], "label": torch.zeros_like(inputs["label"])}
    assert torch.isfinite(loss(**empty))


def test_structure_2d_3d_consistent() -> None:
    loss = StructureLoss()
    assert_2d_3d_consistent(lambda t: loss(**t), _seg((14, 18), channels=2, seed=3))


def test_structure_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        StructureLoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError):
        StructureLoss()(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError):
        StructureLoss(kernel_size=4)
