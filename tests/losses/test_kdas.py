"""Tests of the KDAS losses (attention KL, SGM) and the PraNet structure loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_components.losses.kdas import KDASAttentionLoss, KDASSGMLoss, attention_kl_sum, symmetrise
from kd_components.losses.supervised import StructureLoss, box_filter
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
    "attention_prob": lambda: KDASAttentionLoss(grid=8, activation="auto", standardize=False),
    "attention_raw_chunked": lambda: KDASAttentionLoss(grid=8, standardize=False, row_chunk=5),
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


def _hand_attention_kl(ps: list[float], pt: list[float], tau: float) -> float:
    """tau^2 * mean over rows i of KL(softmax_j(pt_i pt_j / tau) || softmax_j(ps_i ps_j / tau)), with math."""
    total = 0.0
    for i in range(len(ps)):
        es = [math.exp(ps[i] * ps[j] / tau) for j in range(len(ps))]
        et = [math.exp(pt[i] * pt[j] / tau) for j in range(len(pt))]
        qs = [e / sum(es) for e in es]
        qt = [e / sum(et) for e in et]
        total += sum(qt[j] * math.log(qt[j] / qs[j]) for j in range(len(ps)))
    return tau**2 * total / len(ps)


def _standardised(z: list[float]) -> list[float]:
    mean = sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / len(z)
    return [(v - mean) / math.sqrt(var + 1.0) for v in z]


def test_attention_hand_computed() -> None:
    """No pooling: check against the formula written out with math, for probabilities (the released code's
    activation) and for the default standardised log-odds."""
    zs, zt = [0.3, -1.2], [2.0, 0.5]
    tau = 2.0
    ps = [1 / (1 + math.exp(-z)) for z in zs]
    pt = [1 / (1 + math.exp(-z)) for z in zt]
    expected = _hand_attention_kl(ps, pt, tau)
    loss = KDASAttentionLoss(temperature=tau, activation="sigmoid", standardize=False)
    value = loss(torch.tensor([[zs]]), torch.tensor([[zt]]))
    assert value.item() == pytest.approx(expected, rel=1e-3)  # float32 cancellation in a small KL
    zs, zt = [0.3, -1.2, 2.5], [4.0, -3.0, 0.5]
    expected = _hand_attention_kl(_standardised(zs), _standardised(zt), tau)
    value = KDASAttentionLoss(temperature=tau)(torch.tensor([[zs]]), torch.tensor([[zt]]))
    assert value.item() == pytest.approx(expected, rel=1e-4)
    # raw log-odds of a two-class output: z_1 - z_0
    two = torch.tensor([[[0.0, 1.0, -2.0], zs]]), torch.tensor([[[1.0, 0.0, 0.5], zt]])
    expected = _hand_attention_kl(
        [z - o for z, o in zip(zs, [0.0, 1.0, -2.0])], [z - o for z, o in zip(zt, [1, 0, 0.5])], tau
    )
    assert KDASAttentionLoss(standardize=False)(*two).item() == pytest.approx(expected, rel=1e-4)


def _dense_attention_kl(p_s: torch.Tensor, p_t: torch.Tensor, tau: float) -> torch.Tensor:
    """The sum over rows of the KL, with the full (B, N, N) matrices (the straightforward implementation)."""
    log_q_s = torch.log_softmax(p_s.unsqueeze(-1) * p_s.unsqueeze(-2) / tau, dim=-1)
    log_q_t = torch.log_softmax(p_t.unsqueeze(-1) * p_t.unsqueeze(-2) / tau, dim=-1)
    return (log_q_t.exp() * (log_q_t - log_q_s)).sum()


@pytest.mark.parametrize("row_chunk", [3, 16, 1000])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_rank_one_attention_matches_dense(row_chunk: int, scale: float) -> None:
    """The one-pass rank-one evaluation (value and gradient accumulated in forward) equals the dense formula."""
    g = torch.Generator().manual_seed(11)
    p_s = (scale * torch.randn(3, 40, generator=g, dtype=torch.float64)).requires_grad_(True)
    p_t = scale * torch.randn(3, 40, generator=g, dtype=torch.float64)
    value = attention_kl_sum(p_s, p_t, 2.0, row_chunk)
    (grad,) = torch.autograd.grad(3.0 * value, p_s)
    dense = _dense_attention_kl(p_s.float(), p_t.float(), 2.0)
    (grad_dense,) = torch.autograd.grad(3.0 * dense, p_s)
    assert torch.allclose(value, dense, rtol=1e-4, atol=1e-4)
    assert torch.allclose(grad, grad_dense, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(attention_kl_sum(p_s, p_t, 2.0, row_chunk), value)
    assert attention_kl_sum(p_t, p_t, 2.0, row_chunk).item() == 0.0


def test_attention_keeps_no_quadratic_tensor_for_backward() -> None:
    """Nothing of size N^2 is saved for backward (the gradient is accumulated in the forward pass)."""
    sizes = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel())
        return x

    s = torch.randn(2, 1, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = KDASAttentionLoss(grid=16)(s, torch.randn(2, 1, 16, 16))
    loss.backward()
    assert max(sizes) < 256 * 256 and s.grad is not None


def test_attention_standardised_map_signal() -> None:
    """Standardised log-odds: unchanged by adding a constant to the logits, far from uniform rows (unlike
    probabilities, whose rows are nearly uniform and give a tiny KL)."""
    inputs = _pair((2, 1, 16, 16), seed=8)
    inputs = {k: 4.0 * v for k, v in inputs.items()}
    loss = KDASAttentionLoss(grid=8)
    base = loss(**inputs)
    assert torch.allclose(base, loss(inputs["student"] + 3.0, inputs["teacher"] - 1.0), rtol=1e-4)
    prob = KDASAttentionLoss(grid=8, activation="auto", standardize=False)(**inputs)
    assert base > 20 * prob


def test_attention_student_gradient_is_not_zero_unlike_channel_softmax() -> None:
    """The released code's softmax over the singleton channel makes the target constant: ours must not."""
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    assert torch.autograd.grad(F.softmax(x, dim=1).sum(), x)[0].abs().max() == 0  # the released code's failure
    loss = KDASAttentionLoss(grid=4)(x, torch.randn(1, 1, 4, 4))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().max() > 1e-6


def test_attention_row_chunks_give_the_same_value_and_gradient() -> None:
    s = (3 * torch.randn(2, 1, 6, 6)).requires_grad_(True)
    t = 3 * torch.randn(2, 1, 6, 6)
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
