"""Tests of the adversarial objectives (WGAN-GP, hinge) and the adversarial distillation term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_components.losses import AdversarialDistillationLoss, HingeObjective, WGANGPObjective
from kd_components.modules import PatchDiscriminator, SelfAttentionDiscriminator
from tests.helpers import assert_finite_under_autocast, assert_student_only_gradients

DTYPES = (torch.bfloat16, torch.float16)


class LinearCritic(nn.Module):
    """D(x) = ⟨w, vec(x)⟩ with a fixed weight norm: its input gradient is w everywhere, of norm ``norm``."""

    def __init__(self, numel: int, norm: float, seed: int = 0) -> None:
        super().__init__()
        w = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(norm * w / w.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.weight).unsqueeze(1)


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) + 1.0, torch.randn(shape, generator=g) - 1.0


@pytest.mark.parametrize("shape", [(3, 2, 8), (3, 2, 4, 5), (3, 2, 4, 3, 2)])
def test_gradient_penalty_linear_critic(shape: tuple[int, ...]) -> None:
    real, fake = _pair(shape)
    numel = real[0].numel()
    objective = WGANGPObjective(rng=torch.Generator().manual_seed(0))
    # 1-Lipschitz linear critic with a unit-norm weight: ‖∇D‖ = 1 everywhere -> no penalty
    unit = LinearCritic(numel, 1.0)
    assert float(objective.gradient_penalty(unit, real, fake).detach()) < 1e-6
    # weight of norm 2: (2 - 1)² = 1 at every interpolate; by hand the critic loss is
    # mean D(fake) - mean D(real) + 10 · 1
    double = LinearCritic(numel, 2.0)
    assert torch.allclose(objective.gradient_penalty(double, real, fake), torch.tensor(1.0))
    expected = double(fake).mean() - double(real).mean() + 10.0
    assert torch.allclose(objective.discriminator_loss(double, real, fake), expected, atol=1e-5)
    # a non-linear discriminator is penalised too
    tanh_critic = nn.Sequential(nn.Flatten(), nn.Linear(numel, 1), nn.Tanh())
    assert float(objective.gradient_penalty(tanh_critic, real, fake).detach()) > 0


def test_hinge_hand_computed() -> None:
    real, fake = _pair((4, 2, 3, 3))
    critic = LinearCritic(18, 1.0)
    d_real, d_fake = critic(real), critic(fake)
    expected = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
    assert torch.allclose(HingeObjective().discriminator_loss(critic, real, fake), expected)
    assert torch.allclose(HingeObjective().generator_loss(critic, fake), -d_fake.mean())
    # constant critic 0.5: relu(0.5) + relu(1.5) = 2
    const = nn.Sequential(nn.Flatten(), nn.Linear(18, 1))
    nn.init.zeros_(const[1].weight)
    nn.init.constant_(const[1].bias, 0.5)
    assert torch.allclose(HingeObjective().discriminator_loss(const, real, fake), torch.tensor(2.0))


@pytest.mark.parametrize("objective", ["wgan-gp", "hinge"])
def test_generator_step_leaves_discriminator_grads_none(objective: str) -> None:
    disc = PatchDiscriminator(2, 3, channels=4, num_layers=2)
    loss = AdversarialDistillationLoss(disc, objective)
    assert loss.discriminator is disc and loss.objective is not None
    # a registered submodule: .to(), .train()/.eval() and state_dict() of the loss reach it
    assert [id(p) for p in loss.parameters()] == [id(p) for p in disc.parameters()]
    assert set(loss.state_dict()) == {f"discriminator.{k}" for k in disc.state_dict()}
    loss.eval()
    assert not disc.training
    loss.train()
    student, teacher = _pair((2, 3, 16, 16))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss(student, teacher).backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # restored after the step
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # the discriminator step trains the discriminator only
    student.grad = None
    loss.discriminator_step_loss(student, teacher).backward()
    assert student.grad is None and teacher.grad is None
    assert all(p.grad is not None for p in disc.parameters())


def test_student_only_gradients_and_identity() -> None:
    disc = SelfAttentionDiscriminator(2, 2, channels=(4, 8), attention_blocks=(1,))
    loss = AdversarialDistillationLoss(disc, WGANGPObjective(gp_weight=0.0))
    student, teacher = _pair((2, 2, 8, 8))
    assert_student_only_gradients(
        lambda t: loss(**t), {"student": student, "teacher": teacher}, ("student",), ("teacher",)
    )
    # The generator term -D(student) has no minimum at student == teacher; what vanishes there is the critic's
    # Wasserstein estimate mean D(fake) - mean D(real) (eval mode: spectral norm does no power iteration).
    disc.eval()
    assert abs(float(loss.discriminator_step_loss(student, student.clone()).detach())) < 1e-6
    assert abs(float(loss.discriminator_step_loss(student, teacher).detach())) > 0


def test_condition_is_concatenated() -> None:
    disc = PatchDiscriminator(2, 5, channels=4, num_layers=2, kernel_size=3)
    loss = AdversarialDistillationLoss(disc, "hinge")
    student, teacher = _pair((2, 3, 8, 8))
    image = torch.randn(2, 2, 8, 8)
    assert torch.isfinite(loss(student, teacher, condition=image))
    assert torch.isfinite(loss.discriminator_step_loss(student, teacher, condition=image))
    with pytest.raises(ValueError):
        loss(student, teacher[:, :2])
    with pytest.raises(ValueError):
        AdversarialDistillationLoss(disc, "lsgan")


@pytest.mark.parametrize("objective", ["wgan-gp", "hinge"])
@pytest.mark.parametrize("kind", ["patch", "self_attention"])
def test_discriminator_steps_reduce_loss(objective: str, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "patch":
        disc = PatchDiscriminator(2, 2, channels=4, num_layers=2, kernel_size=3)
    else:
        disc = SelfAttentionDiscriminator(2, 2, channels=(4, 8), attention_blocks=(1,))
    rng = torch.Generator().manual_seed(0)
    obj = WGANGPObjective(rng=rng) if objective == "wgan-gp" else HingeObjective()
    loss = AdversarialDistillationLoss(disc, obj)
    optimizer = torch.optim.Adam(disc.parameters(), lr=5e-3, betas=(0.5, 0.99))
    student, teacher = _pair((4, 2, 8, 8))  # teacher ~ N(1, 1), student ~ N(-1, 1): separable
    values = []
    for _ in range(8):
        optimizer.zero_grad()
        value = loss.discriminator_step_loss(student, teacher)
        value.backward()
        optimizer.step()
        values.append(float(value))
    assert values[-1] < values[0] - 0.1, values


def test_3d_and_autocast() -> None:
    # discriminators are dimension-specific modules, so there is no 2D / one-slice 3D identity to test; 3D runs
    disc = PatchDiscriminator(3, 2, channels=4, num_layers=2, kernel_size=3)
    loss = AdversarialDistillationLoss(disc, WGANGPObjective(rng=torch.Generator().manual_seed(0)))
    student, teacher = _pair((2, 2, 8, 8, 4))
    assert torch.isfinite(loss(student, teacher))
    assert torch.isfinite(loss.discriminator_step_loss(student, teacher))
    for dtype in DTYPES:
        assert_finite_under_autocast(lambda t: loss(**t), {"student": student, "teacher": teacher}, dtype)
        assert_finite_under_autocast(
            lambda t: loss.discriminator_step_loss(**t), {"student": student, "teacher": teacher}, dtype
        )


class RecordingCritic(nn.Module):
    """A linear critic on the channel means that records the shapes it is given."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, channels))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return (x.flatten(2).mean(2) @ self.weight).unsqueeze(1)


@pytest.mark.parametrize(
    "shape, pool, seen",
    [
        ((2, 2, 8, 12), 2, (2, 2, 4, 6)),
        ((2, 2, 8, 12), (4, 2), (2, 2, 2, 6)),
        ((2, 2, 8, 8, 4), 2, (2, 2, 4, 4, 2)),
        ((2, 2, 8, 8, 1), 4, (2, 2, 2, 2, 1)),  # a one-slice volume: its thin axis is pooled by its length, 1
    ],
)
def test_input_pool_is_what_the_critic_sees(shape: tuple[int, ...], pool, seen: tuple[int, ...]) -> None:
    critic = RecordingCritic(shape[1])
    loss = AdversarialDistillationLoss(critic, WGANGPObjective(rng=torch.Generator().manual_seed(0)), input_pool=pool)
    student, teacher = _pair(shape)
    loss(student, teacher)
    loss.discriminator_step_loss(student, teacher)
    assert set(critic.shapes) == {seen}
    # a critic of channel means is unchanged by average pooling over whole windows: same value as unpooled
    plain = AdversarialDistillationLoss(critic, WGANGPObjective(gp_weight=0.0))
    pooled = AdversarialDistillationLoss(critic, WGANGPObjective(gp_weight=0.0), input_pool=pool)
    torch.testing.assert_close(pooled(student, teacher), plain(student, teacher))


def test_input_pool_matches_pooling_by_hand_and_keeps_student_only_gradients() -> None:
    torch.manual_seed(0)
    disc = SelfAttentionDiscriminator(2, 5, channels=(4, 8), attention_blocks=(1,)).eval()
    loss = AdversarialDistillationLoss(disc, "hinge", input_pool=2)
    student, teacher = _pair((2, 3, 8, 8))
    image = torch.randn(2, 2, 8, 8)
    by_hand = -disc(torch.nn.functional.avg_pool2d(torch.cat([image, student], 1), 2)).mean()
    torch.testing.assert_close(loss(student, teacher, condition=image), by_hand)
    assert_student_only_gradients(
        lambda t: loss(**t),
        {"student": student, "teacher": teacher, "condition": image},
        ("student",),
        ("teacher", "condition"),
    )


@pytest.mark.parametrize("pool", [0, -1, 1.5, True, (), (2, 0)])
def test_input_pool_rejects_bad_factors(pool) -> None:
    with pytest.raises(ValueError, match="input_pool"):
        AdversarialDistillationLoss(RecordingCritic(2), input_pool=pool)


def test_input_pool_needs_one_factor_per_axis() -> None:
    loss = AdversarialDistillationLoss(RecordingCritic(2), input_pool=(2, 2))
    student, teacher = _pair((2, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="3 spatial axes"):
        loss(student, teacher)


@pytest.mark.parametrize("size, pooled", [(128, 64), (48, 24), (32, 32), (24, 24)])
def test_input_pool_never_goes_below_the_discriminator_smallest_input(size: int, pooled: int) -> None:
    disc = PatchDiscriminator(2, 2, channels=4, num_layers=3, kernel_size=4)  # needs 24 per axis
    assert disc.min_input_size == 24
    loss = AdversarialDistillationLoss(disc, "hinge", input_pool=2)
    student, teacher = _pair((2, 2, size, size))
    assert loss._pool(student).shape[2:] == (pooled, pooled)
    assert torch.isfinite(loss(student, teacher)) and torch.isfinite(loss.discriminator_step_loss(student, teacher))
