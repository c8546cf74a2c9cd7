"""Tests of the affinity distillation losses: Structured KD pair-wise and CIRKD mini-batch."""

from __future__ import annotations

import math

import pytest
import torch

from kd_components.losses.affinity import CIRKDLoss, PairWiseAffinityLoss, pooled_unit_features
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
)

LOSSES = {
    "pairwise": lambda: PairWiseAffinityLoss(grid=4),
    "pairwise_avg": lambda: PairWiseAffinityLoss(grid=3, pooling="avg"),
    "cirkd": lambda: CIRKDLoss(grid=4),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _pair(s_shape: tuple[int, ...], t_channels: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t_shape = (s_shape[0], t_channels or s_shape[1], *s_shape[2:])
    return {"student": torch.randn(s_shape, generator=g), "teacher": torch.randn(t_shape, generator=g)}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(2, 4, 12), (2, 4, 8, 7), (2, 3, 6, 5, 4)])
def test_zero_positive_gradients(name: str, shape: tuple[int, ...]) -> None:
    loss = LOSSES[name]()
    call = lambda t: loss(**t)  # noqa: E731
    same = _pair(shape, seed=1)
    same["teacher"] = same["student"].clone()
    assert_zero_at_identity(call, same)
    assert_positive(call, _pair(shape, t_channels=6))  # channel counts may differ
    assert_student_only_gradients(call, _pair(shape, t_channels=6), ("student",), ("teacher",))


@pytest.mark.parametrize("name", list(LOSSES))
def test_2d_3d_consistent(name: str) -> None:
    loss = LOSSES[name]()
    assert_2d_3d_consistent(lambda t: loss(**t), _pair((2, 5, 9, 8), t_channels=3))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(name: str, dtype: torch.dtype) -> None:
    loss = LOSSES[name]()
    assert_finite_under_autocast(lambda t: loss(**t), _pair((2, 4, 8, 8)), dtype)
    assert_finite_under_autocast(lambda t: loss(**t), _pair((2, 4, 4, 4, 4)), dtype)


@pytest.mark.parametrize("name", list(LOSSES))
def test_invariant_to_position_scaling_and_channel_rotation(name: str) -> None:
    """Affinities are cosines: rescaling each position's feature vector by a positive factor, or permuting channels,
    changes nothing; with average pooling (linear) any rotation of the channel space too (max pooling is taken per
    channel, so only permutations); a non-orthogonal channel mix changes the loss."""
    loss = LOSSES[name]()
    inputs = _pair((2, 4, 8, 6), t_channels=5)
    base = loss(**inputs)
    scale = torch.rand(2, 1, 8, 6) * 10 + 0.1
    assert torch.allclose(base, loss(inputs["student"] * scale, inputs["teacher"]), rtol=1e-4, atol=1e-6)
    permuted = inputs["student"][:, torch.tensor([2, 0, 3, 1])]
    assert torch.allclose(base, loss(permuted, inputs["teacher"]), rtol=1e-4, atol=1e-6)
    if loss.pooling == "avg":
        q, _ = torch.linalg.qr(torch.randn(4, 4))
        rotated = torch.einsum("dc,bchw->bdhw", q, inputs["student"])
        assert torch.allclose(base, loss(rotated, inputs["teacher"]), rtol=1e-4, atol=1e-6)
    mixed = torch.einsum("dc,bchw->bdhw", torch.randn(4, 4), inputs["student"])
    assert not torch.allclose(base, loss(mixed, inputs["teacher"]), rtol=1e-3)


def test_pooled_unit_features_clip_and_norm() -> None:
    f_s, f_t = pooled_unit_features(torch.randn(2, 3, 10, 4), torch.randn(2, 7, 6, 9), 5, "max")
    assert f_s.shape == (2, 3, 5 * 4) and f_t.shape == (2, 7, 5 * 4)
    assert torch.allclose(f_s.norm(dim=1), torch.ones(2, 20), atol=1e-5)


def test_pairwise_hand_computed() -> None:
    # two positions, no pooling (grid = size): cosines between the two positions
    s = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # channel vectors (1, 0) and (1, 1)
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 0) and (0, 1)
    cos_s, cos_t = 1 / math.sqrt(2), 0.0
    expected = 2 * (cos_s - cos_t) ** 2 / 4  # two off-diagonal entries, diagonals equal, / N^2
    assert PairWiseAffinityLoss()(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_cirkd_hand_computed_and_batch_order() -> None:
    # two images, one position each: rows are [A_i1, A_i2] over images j
    s = torch.tensor([[[1.0], [0.0]], [[1.0], [1.0]]])  # (2, 2, 1): unit (1, 0) and (1, 1)/sqrt2
    t = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # (1, 0) and (0, 1)
    tau = 0.1
    c = 1 / math.sqrt(2)
    rows_s, rows_t = [[1.0, c], [c, 1.0]], [[1.0, 0.0], [0.0, 1.0]]
    # softmax within each image j (per pair, as the paper): one position per image makes every row's distribution
    # [1], so the loss is zero although the affinities differ (a softmax over the whole batch would not be)
    assert CIRKDLoss(temperature=tau)(s, t).item() == pytest.approx(0.0, abs=1e-6)
    # two positions per image, one image: per-row softmax over two positions
    s2 = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    t2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    total = 0.0
    for rs, rt in zip(rows_s, rows_t):
        qs = [math.exp(v / tau) for v in rs]
        qt = [math.exp(v / tau) for v in rt]
        qs, qt = [v / sum(qs) for v in qs], [v / sum(qt) for v in qt]
        total += sum(a * math.log(a / b) for a, b in zip(qt, qs))
    assert CIRKDLoss(temperature=tau)(s2, t2).item() == pytest.approx(total / 2, rel=1e-4)
    # reordering the batch (both networks alike) changes nothing; the cross-image terms matter
    inputs = _pair((3, 4, 6, 6))
    perm = torch.tensor([2, 0, 1])
    base = CIRKDLoss()(**inputs)
    assert torch.allclose(base, CIRKDLoss()(inputs["student"][perm], inputs["teacher"][perm]), rtol=1e-5)
    per_image = sum(CIRKDLoss()(inputs["student"][i : i + 1], inputs["teacher"][i : i + 1]) for i in range(3)) / 3
    assert not torch.allclose(base, per_image, rtol=1e-3)


@pytest.mark.parametrize("name", list(LOSSES))
def test_affinities_stay_float32_under_autocast(name: str) -> None:
    """Matrix products run with autocast disabled: a bfloat16 affinity / 0.1 would be visibly off."""
    loss = LOSSES[name]()
    inputs = _pair((2, 8, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(**inputs)
    assert low.dtype == torch.float32
    assert torch.allclose(low, loss(**inputs), rtol=1e-5)


def _pairwise_written_out(loss: PairWiseAffinityLoss, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The loss with the N×N affinities formed (the formulation before the Gram form)."""
    f_s, f_t = pooled_unit_features(student, teacher, loss.grid, loss.pooling)
    return (f_t.transpose(1, 2) @ f_t - f_s.transpose(1, 2) @ f_s).pow(2).mean()


@pytest.mark.parametrize(
    "s_shape, t_channels, grid",
    [((4, 16, 32, 32), 64, 16), ((2, 5, 12, 8, 8), 7, (6, 4, 4)), ((3, 4, 40), 6, 20), ((2, 8, 16, 16), 8, 4)],
)
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pairwise_gram_form_equals_written_out(s_shape, t_channels, grid, pooling: str) -> None:
    """Features narrower than the N grid positions take the channel×channel path: the value and the student's
    gradient equal the N×N form's, also when the student nearly equals the teacher (the Gram terms cancel)."""
    inputs = _pair(s_shape, t_channels, seed=2)
    student = inputs["student"].requires_grad_(True)
    loss = PairWiseAffinityLoss(grid=grid, pooling=pooling)
    value, reference = loss(student, inputs["teacher"]), _pairwise_written_out(loss, student, inputs["teacher"])
    assert value.dtype == torch.float32 and torch.allclose(value, reference, rtol=1e-4, atol=1e-9)
    (got,), (want,) = torch.autograd.grad(value, [student]), torch.autograd.grad(reference, [student])
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6 * want.abs().max())
    near = inputs["teacher"][:, : s_shape[1]] + 1e-3 * torch.randn(s_shape)
    close = _pairwise_written_out(loss, near, inputs["teacher"])
    assert torch.allclose(loss(near, inputs["teacher"]), close, rtol=1e-3, atol=1e-12)


def test_pairwise_wide_features_use_the_written_out_form() -> None:
    inputs = _pair((2, 20, 8, 8), 24)  # grid 4: N = 16 ≤ 20 channels
    loss = PairWiseAffinityLoss(grid=4)
    assert torch.equal(loss(**inputs), _pairwise_written_out(loss, inputs["student"], inputs["teacher"]))
