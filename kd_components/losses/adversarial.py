"""Adversarial distillation: WGAN-GP and hinge objectives, and a student-side adversarial distillation term."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_components.taps import unwrap_network

from ._grid import autocast_off

__all__ = ["AdversarialDistillationLoss", "AdversarialObjective", "HingeObjective", "WGANGPObjective"]


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``module``'s parameters do not record gradients (restored on exit).

    A graph built inside the context treats the parameters as constants, so a later backward through it leaves their
    ``.grad`` untouched while gradients still flow to the module's *inputs*.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def _scores(discriminator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Discriminator output as float32, flattened to (B, M) (M = 1 for a global critic, #patches for PatchGAN)."""
    return discriminator(x).float().flatten(1)


def _real_fake_scores(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, batched: bool, fake_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, M) of ``real`` and ``fake``: two discriminator passes (in the order given: a spectral-norm
    discriminator updates at each pass), or one pass on both stacked along the batch."""
    if batched:
        scores = _scores(discriminator, torch.cat([real, fake]))
        return scores[: real.shape[0]], scores[real.shape[0] :]
    if fake_first:
        score_fake = _scores(discriminator, fake)
        return _scores(discriminator, real), score_fake
    score_real = _scores(discriminator, real)
    return score_real, _scores(discriminator, fake)


class AdversarialObjective:
    """Base of the GAN objectives: ``discriminator_loss`` (discriminator step), ``generator_loss`` (student step).

    ``real`` is the teacher side, ``fake`` the student side, both (B, C, *S) as fed to the discriminator. In
    :meth:`discriminator_loss` both are detached (the discriminator step never reaches the student); in
    :meth:`generator_loss` the discriminator's parameters are frozen while its graph is built, so the student step
    never accumulates gradients in the discriminator.
    """

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        real: torch.Tensor,
        fake: torch.Tensor,
        gp_scale: float = 1.0,
        batched: bool = False,
    ) -> torch.Tensor:
        """Scalar loss to minimise w.r.t. the discriminator's parameters.

        Args:
            discriminator: the discriminator.
            real: the teacher side (B, C, *S), detached here.
            fake: the student side (B, C, *S), detached here.
            gp_scale: factor of a regulariser such as WGAN-GP's gradient penalty (0 skips it; ``k`` in one step
                out of ``k`` is the lazy penalty); objectives without one ignore it.
            batched: score real and fake in one discriminator pass (batch 2B) instead of two.
        """
        raise NotImplementedError

    def generator_loss(self, discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
        """Scalar loss to minimise w.r.t. the student (``fake``): ``-mean D(fake)`` (WGAN and hinge alike)."""
        with frozen(discriminator):
            # the module inside a data-parallel wrapper: the wrapper's hooks must not see a generator step
            return -_scores(unwrap_network(discriminator), fake).mean()


class WGANGPObjective(AdversarialObjective):
    """Wasserstein GAN with gradient penalty.

    Discriminator (critic) loss: ``mean D(fake) - mean D(real) + λ_gp · mean_b (‖∇ₓ D(x̂_b)‖₂ - 1)²`` with
    ``x̂ = ε·real + (1-ε)·fake``, ε ~ U(0, 1) per sample, and D(x̂_b) the mean of sample b's scores (one score for
    a global critic, the patch average for a PatchGAN). Works for any number of spatial dims. Generator loss:
    ``-mean D(fake)``.

    Paper defaults: λ_gp = 10 (also Structured KD and Graph Flow; Graph Flow lr_D 2e-5, Adam (0.9, 0.99)).

    Args:
        gp_weight: λ_gp.
        rng: optional ``torch.Generator`` for ε, on the inputs' device.

    Reference:
        Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017.
    """

    def __init__(self, gp_weight: float = 10.0, rng: torch.Generator | None = None) -> None:
        self.gp_weight = gp_weight
        self.rng = rng

    def gradient_penalty(self, discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """``mean_b (‖∇ₓ D(x̂_b)‖₂ - 1)²`` on random interpolates of (detached) ``real`` and ``fake``."""
        real, fake = real.detach().float(), fake.detach().float()
        if real.shape != fake.shape:
            raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} shapes differ")
        shape = (real.shape[0],) + (1,) * (real.dim() - 1)
        device = self.rng.device if self.rng is not None else real.device
        eps = torch.rand(shape, generator=self.rng, device=device).to(real.device)
        mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
        with torch.enable_grad():
            critic = _scores(discriminator, mixed).mean(dim=1)
            (grad,) = torch.autograd.grad(critic.sum(), mixed, create_graph=True)
        with autocast_off(grad):
            norm = (grad.float().flatten(1).pow(2).sum(dim=1) + 1e-12).sqrt()
            return (norm - 1).pow(2).mean()

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        real: torch.Tensor,
        fake: torch.Tensor,
        gp_scale: float = 1.0,
        batched: bool = False,
    ) -> torch.Tensor:
        real, fake = real.detach(), fake.detach()
        score_real, score_fake = _real_fake_scores(discriminator, real, fake, batched, fake_first=True)
        loss = score_fake.mean() - score_real.mean()
        if self.gp_weight and gp_scale:
            weight = self.gp_weight if gp_scale == 1.0 else self.gp_weight * gp_scale
            loss = loss + weight * self.gradient_penalty(discriminator, real, fake)
        return loss


class HingeObjective(AdversarialObjective):
    """Hinge GAN objective (SAGAN / SN-GAN).

    Discriminator loss: ``mean relu(1 - D(real)) + mean relu(1 + D(fake))`` (per score, i.e. per patch for a
    PatchGAN); generator loss: ``-mean D(fake)``.

    Reference:
        Lim & Ye, "Geometric GAN", 2017; Zhang et al., "Self-Attention Generative Adversarial Networks", ICML 2019.
    """

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        real: torch.Tensor,
        fake: torch.Tensor,
        gp_scale: float = 1.0,
        batched: bool = False,
    ) -> torch.Tensor:
        real, fake = real.detach(), fake.detach()
        score_real, score_fake = _real_fake_scores(discriminator, real, fake, batched)
        return F.relu(1 - score_real).mean() + F.relu(1 + score_fake).mean()


_OBJECTIVES = {"wgan-gp": WGANGPObjective, "hinge": HingeObjective}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class AdversarialDistillationLoss(nn.Module):
    """Adversarial distillation (AD): the student's output should look like the teacher's to a discriminator.

    Formulation used here: the teacher's tensor (e.g. logits) is "real", the student's "fake"; an optional
    ``condition`` (e.g. the image, or for LightVessel's ASD the label map) is concatenated along channels to both,
    making the discriminator conditional. The forward pass — the distillation term of the *student* step — returns
    the objective's generator loss ``-mean D(fake)``, built with the discriminator's parameters frozen, so it never
    fills their ``.grad``. The discriminator is trained in its own step with its own optimizer:
    ``loss.discriminator_step_loss(student, teacher)`` (student and teacher detached).

    The discriminator is a registered submodule: ``.to()``, ``.train()``/``.eval()`` and ``state_dict()`` of the
    loss (and of the :class:`~kd_components.Distiller` holding it) reach it. It has its own parameter group: the
    student's optimizer takes ``distiller.student_parameters()``, which leaves it out, and the trainer builds the
    discriminator's optimizer from ``distiller.discriminators().parameters()``. Inputs reach the discriminator as
    given (use the discriminator's ``tanh_inputs`` for logits, as Graph Flow). The generator term has no minimum at
    student == teacher; what vanishes there is the critic's Wasserstein estimate ``mean D(fake) - mean D(real)``.

    Paper defaults: Graph Flow λ_adv = 0.1, WGAN-GP (λ_gp 10), SAGAN discriminator on logits with tanh,
    lr_D 2e-5; Structured KD holistic term weight 0.1 with WGAN-GP on (image, score map).

    A cost lever: ``input_pool=f`` average-pools both sides (condition included) by ``f`` along every spatial axis
    before the discriminator sees them, so the critic works on ``|S| / f^d`` positions: every convolution, its
    self-attention (``(|S| / f^d)²``) and WGAN-GP's double backward shrink with it. The critic then judges the
    coarse layout of the student's output, not its finest detail; the penalty constrains its gradient with respect
    to the pooled input. An axis is pooled by at most what keeps it as large as the discriminator's
    ``min_input_size`` (when it has one, as :class:`~kd_components.modules.PatchDiscriminator`; otherwise 1): small
    patches and one-slice volumes are pooled less, or not at all.

    Args:
        discriminator: the discriminator (e.g. :class:`kd_components.modules.SelfAttentionDiscriminator`), possibly
            wrapped in ``DistributedDataParallel`` for its own step (see :func:`kd_components.wrap_ddp_if_trainable`).
        objective: ``"wgan-gp"``, ``"hinge"`` or an :class:`AdversarialObjective` instance.
        input_pool: average-pooling factor of the discriminator's inputs, one per spatial axis or one for all
            (default 1: the inputs as given).

    Reference:
        Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019; Zou et al., CoCo
        DistillNet (BIBM 2021) and Graph Flow (TMI 2023).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        objective: str | AdversarialObjective = "wgan-gp",
        input_pool: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        if isinstance(objective, str):
            if objective not in _OBJECTIVES:
                raise ValueError(f"objective must be one of {sorted(_OBJECTIVES)} or an AdversarialObjective")
            objective = _OBJECTIVES[objective]()
        factors = tuple(input_pool) if isinstance(input_pool, Sequence) else (input_pool,)
        if not factors or any(isinstance(f, bool) or int(f) != f or f < 1 for f in factors):
            raise ValueError(f"input_pool must be a positive integer or a sequence of them, got {input_pool!r}")
        self.objective = objective
        self.discriminator = discriminator
        self.input_pool = tuple(int(f) for f in factors)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) → (B, C, *S') average-pooled by ``input_pool`` (clipped to the discriminator's smallest input)."""
        dims = x.ndim - 2
        factors = self.input_pool * dims if len(self.input_pool) == 1 else self.input_pool
        if len(factors) != dims:
            raise ValueError(f"input_pool {self.input_pool} has {len(factors)} factors for {dims} spatial axes")
        smallest = getattr(unwrap_network(self.discriminator), "min_input_size", 1)
        kernel = [max(1, min(f, size // smallest)) for f, size in zip(factors, x.shape[2:])]
        if all(k == 1 for k in kernel):
            return x
        return _AVG_POOL[dims](x, kernel_size=kernel, stride=kernel)

    @staticmethod
    def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")

    def _critic_input(self, x: torch.Tensor, condition: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """What the discriminator sees of one side: ``[condition, x]`` along channels (the condition detached and
        cast to ``dtype``, the student's), pooled by ``input_pool``."""
        if condition is not None:
            x = torch.cat([condition.detach().to(dtype), x], dim=1)
        return self._pool(x)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            student: student tensor (B, C, *S), e.g. logits; receives the gradient.
            teacher: teacher tensor of the same shape (only checked here; it is the discriminator's "real").
            condition: optional (B, C_c, *S) tensor concatenated along channels to both sides.

        Returns:
            scalar generator loss for the student step.
        """
        self._check_shapes(student, teacher)
        return self.objective.generator_loss(self.discriminator, self._critic_input(student, condition, student.dtype))

    def discriminator_step_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        condition: torch.Tensor | None = None,
        **objective_kwargs: Any,
    ) -> torch.Tensor:
        """Scalar discriminator loss for the discriminator step; student and teacher are detached.

        Args:
            student: student tensor (B, C, *S) ("fake").
            teacher: teacher tensor (B, C, *S) ("real").
            condition: optional (B, C_c, *S) tensor concatenated along channels to both sides.
            objective_kwargs: passed to the objective's ``discriminator_loss`` (``gp_scale``, ``batched``).
        """
        self._check_shapes(student, teacher)
        fake = self._critic_input(student.detach(), condition, student.dtype)
        real = self._critic_input(teacher.detach(), condition, student.dtype)
        return self.objective.discriminator_loss(self.discriminator, real, fake, **objective_kwargs)
