"""Tests of the logit distillation losses: LogitKDLoss, PixelWiseKDLoss, ChannelWiseDistillationLoss, DISTLoss."""

from __future__ import annotations

import math

import pytest
import torch

from kd_components.losses.logit import ChannelWiseDistillationLoss, DISTLoss, LogitKDLoss, PixelWiseKDLoss
from tests.helpers import (
    assert_2d_3d_consistent,
    assert_finite_under_autocast,
    assert_positive,
    assert_student_only_gradients,
    assert_zero_at_identity,
)

LOSSES = {
    "logit_kd": LogitKDLoss,
    "pixel_wise": PixelWiseKDLoss,
    "cwd": ChannelWiseDistillationLoss,
    "dist": DISTLoss,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _pair(shape: tuple[int, ...], seed: int = 0, scale: float = 2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"student": scale * torch.randn(shape, generator=g), "teacher": scale * torch.randn(shape, generator=g)}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(2, 3, 10), (2, 4, 6, 5), (2, 3, 4, 3, 5), (2, 1, 6, 6)])
def test_zero_positive_gradients(name: str, shape: tuple[int, ...]) -> None:
    loss = LOSSES[name]()
    call = lambda t: loss(**t)  # noqa: E731
    same = _pair(shape, seed=1)
    same["teacher"] = same["student"].clone()
    assert_zero_at_identity(call, same)
    assert_positive(call, _pair(shape))
    assert_student_only_gradients(call, _pair(shape), ("student",), ("teacher",))


@pytest.mark.parametrize("name", list(LOSSES))
def test_2d_3d_consistent(name: str) -> None:
    loss = LOSSES[name]()
    assert_2d_3d_consistent(lambda t: loss(**t), _pair((2, 3, 7, 6)))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(name: str, dtype: torch.dtype) -> None:
    loss = LOSSES[name]()
    assert_finite_under_autocast(lambda t: loss(**t), _pair((2, 3, 6, 6), scale=20.0), dtype)
    assert_finite_under_autocast(lambda t: loss(**t), _pair((1, 2, 3, 4, 5), scale=20.0), dtype)


def _softmax(z: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_logit_kd_hand_computed() -> None:
    zs = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]  # two pixels, three classes
    zt = [[2.0, -1.0, 0.0], [0.0, 1.0, 1.0]]
    tau = 4.0
    expected = tau**2 * sum(_kl(_softmax(t, tau), _softmax(s, tau)) for s, t in zip(zs, zt)) / 2
    student = torch.tensor(zs).t().reshape(1, 3, 2)
    teacher = torch.tensor(zt).t().reshape(1, 3, 2)
    assert LogitKDLoss(temperature=tau)(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    expected_1 = sum(_kl(_softmax(t, 1.0), _softmax(s, 1.0)) for s, t in zip(zs, zt)) / 2
    assert PixelWiseKDLoss()(student, teacher).item() == pytest.approx(expected_1, rel=1e-5)


def test_one_channel_logits_are_binary_distributions() -> None:
    z = torch.randn(2, 1, 5, 5)
    t = torch.randn(2, 1, 5, 5)
    two_s, two_t = torch.cat([torch.zeros_like(z), z], 1), torch.cat([torch.zeros_like(t), t], 1)
    for cls in (LogitKDLoss, DISTLoss):
        assert torch.allclose(cls()(z, t), cls()(two_s, two_t), rtol=1e-5, atol=1e-7)


def test_pixel_wise_is_logit_kd_at_tau_one() -> None:
    inputs = _pair((2, 4, 5, 5))
    assert isinstance(PixelWiseKDLoss(), LogitKDLoss) and PixelWiseKDLoss().temperature == 1.0
    assert torch.allclose(PixelWiseKDLoss()(**inputs), LogitKDLoss(temperature=1.0)(**inputs))
    assert not torch.allclose(PixelWiseKDLoss()(**inputs), LogitKDLoss()(**inputs))


def test_logit_kd_invariant_to_per_pixel_shift() -> None:
    inputs = _pair((2, 4, 5, 5))
    shift = torch.randn(2, 1, 5, 5) * 5
    base = LogitKDLoss()(**inputs)
    assert torch.allclose(base, LogitKDLoss()(inputs["student"] + shift, inputs["teacher"]), rtol=1e-4)
    # but not to a per-channel shift (the classes' relative scores change)
    assert not torch.allclose(base, LogitKDLoss()(inputs["student"] + torch.randn(1, 4, 1, 1), inputs["teacher"]))


def test_cwd_hand_computed_and_channel_shift_invariance() -> None:
    zs = [[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 1.0, 3.0]]  # one sample, two channels, four positions
    zt = [[0.5, 1.0, 1.0, 0.0], [2.0, -2.0, 0.0, 1.0]]
    tau = 4.0
    expected = tau**2 * sum(_kl(_softmax(t, tau), _softmax(s, tau)) for s, t in zip(zs, zt)) / 2
    student, teacher = torch.tensor([zs]).reshape(1, 2, 2, 2), torch.tensor([zt]).reshape(1, 2, 2, 2)
    loss = ChannelWiseDistillationLoss()
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    inputs = _pair((2, 3, 6, 5))
    shift = torch.randn(2, 3, 1, 1) * 10
    assert torch.allclose(loss(**inputs), loss(inputs["student"] + shift, inputs["teacher"] - shift), rtol=1e-4)
    assert not torch.allclose(loss(**inputs), loss(inputs["student"] * 2, inputs["teacher"]), rtol=1e-3)


def test_dist_affine_invariance_hand_computed() -> None:
    """A student whose probabilities are an affine mix of the teacher's with the uniform distribution has the same
    Pearson relations: DISTLoss is zero although the KL is not."""
    teacher = torch.randn(2, 4, 6, 6) * 2
    p_t = torch.softmax(teacher, dim=1)
    student = torch.log(0.3 * p_t + 0.7 / 4)
    assert DISTLoss()(student, teacher).item() < 1e-5
    assert LogitKDLoss(temperature=1.0)(student, teacher).item() > 1e-2
    # hand-computed inter term: one pixel, three classes, intra term switched off
    ps, pt = [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]
    ms, mt = sum(ps) / 3, sum(pt) / 3
    cov = sum((a - ms) * (b - mt) for a, b in zip(ps, pt))
    corr = cov / math.sqrt(sum((a - ms) ** 2 for a in ps) * sum((b - mt) ** 2 for b in pt))
    value = DISTLoss(gamma=0.0)(
        torch.log(torch.tensor(ps)).reshape(1, 3, 1), torch.log(torch.tensor(pt)).reshape(1, 3, 1)
    )
    assert value.item() == pytest.approx(1 - corr, rel=1e-5)
    assert value.item() > 1.5  # anti-correlated


def test_dist_finite_for_uniform_pixels() -> None:
    """All-equal logits give a constant probability vector, whose correlation is undefined: must stay finite."""
    student = torch.zeros(1, 3, 4, 4, requires_grad=True)
    value = DISTLoss()(student, torch.randn(1, 3, 4, 4))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def _dist_general_float64(student: torch.Tensor, teacher: torch.Tensor, tau: float, eps: float = 1e-8):
    """DIST by its general formula (``(B·|S|, K)`` rows, every class), in float64."""
    z_s, z_t = student.double() / tau, teacher.double() / tau
    if z_s.shape[1] == 1:
        z_s, z_t = torch.cat([-z_s, z_s], 1) / 2, torch.cat([-z_t, z_t], 1) / 2  # softmax = [σ(-z), σ(z)]
    p_s = torch.softmax(z_s, 1).movedim(1, -1).reshape(-1, 2)
    p_t = torch.softmax(z_t, 1).movedim(1, -1).reshape(-1, 2)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=eps).mean()

    return tau**2 * (distance(p_s, p_t) + distance(p_s.t(), p_t.t()))


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_two_classes_equal_general_formula(channels: int, tau: float) -> None:
    """One or two channels use the foreground probability alone: value and gradient equal to the general
    (K-class) formula computed in float64 (the general formula in float32 has a gradient with rounding noise from
    the per-pixel term near p = 1/2, 1e-5 to 1e-3 of its norm; the two-class path has none)."""
    g = torch.Generator().manual_seed(channels)
    student = (2 * torch.randn(3, channels, 24, 20, generator=g)).requires_grad_(True)
    teacher = 2 * torch.randn(3, channels, 24, 20, generator=g)
    loss = DISTLoss(temperature=tau)
    value = loss(student, teacher)
    (grad,) = torch.autograd.grad(value, student)
    reference = _dist_general_float64(student, teacher, tau)
    (grad_ref,) = torch.autograd.grad(reference, student)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert ((grad.double() - grad_ref).norm() / grad_ref.norm()).item() < 1e-5


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        LogitKDLoss()(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError):
        ChannelWiseDistillationLoss()(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize(
    "old, new",
    [
        ("LogitKD", LogitKDLoss),
        ("PixelWiseKD", PixelWiseKDLoss),
        ("ChannelWiseDistillation", ChannelWiseDistillationLoss),
        ("DIST", DISTLoss),
    ],
)
def test_pre_rename_names_are_deprecated_aliases(old, new):
    import kd_components.losses as losses

    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use {new.__name__}"):
        assert getattr(losses, old) is new
    with pytest.raises(AttributeError):
        losses.NoSuchLoss  # noqa: B018
