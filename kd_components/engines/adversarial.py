"""The discriminator step of adversarial distillation terms, run by :class:`~kd_components.DistillationTrainer`.

A distiller whose terms include an :class:`~kd_components.losses.AdversarialDistillationLoss` trains that loss's
discriminator in its own step, before the student's step of each iteration (as MONAI's ``GanTrainer`` alternates
the discriminator and generator updates in its ``_iteration``). :class:`DiscriminatorStep` is that step: it holds
the discriminators (``distiller.discriminators()``, registered in their terms' losses), their optimizer and grad
scaler, and the cost levers (``discriminator_steps``, ``critic_every``, ``gp_every``, ``batched_critic``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from kd_components.distiller import Distiller
from kd_components.taps import unwrap_network
from kd_components.terms import DistillationTerm

__all__ = [
    "DiscriminatorStep",
    "adversarial_terms",
    "discriminator_value_name",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
"""A callable building an optimizer from parameters, e.g. a config's ``{"_target_": "torch.optim.Adam",
"_mode_": "callable", "lr": 2e-5}``."""


def discriminator_value_name(term: str) -> str:
    """The name a term's discriminator loss is reported under: ``"<term>_discriminator"``.

    The engine output key is then ``"loss_<term>_discriminator"`` and the epoch mean
    ``engine.state.metrics["train_<term>_discriminator"]``.
    """
    return f"{term}_discriminator"


def adversarial_terms(distiller: Distiller | nn.Module) -> list[DistillationTerm]:
    """The terms of ``distiller`` (possibly wrapped in DDP) whose loss is an :class:`AdversarialDistillationLoss`."""
    return _unwrap_distiller(distiller).adversarial_terms()


def _unwrap_distiller(distiller: Distiller | nn.Module) -> Distiller:
    module = unwrap_network(distiller)
    if not isinstance(module, Distiller):
        raise TypeError(f"distiller must be a kd_components.Distiller, got {type(module).__name__}")
    return module


class DiscriminatorStep:
    """The discriminator updates of one training iteration, for every adversarial term of a distiller.

    Called by :class:`~kd_components.DistillationTrainer` between the networks' forward passes and the student's
    loss. For every adversarial term it takes the term's inputs from the tensors already computed (student side
    detached, the "fake"; teacher side, the "real"; optional condition), applies the term's transforms and
    adapters without autograd, once, and runs ``discriminator_steps`` optimizer steps of that term's discriminator
    on them (``loss.discriminator_step_loss``: WGAN-GP critic or hinge loss), outside the student's autocast: with
    ``amp`` on CUDA in its own autocast and ``GradScaler``, otherwise in float32. Discriminator gradients are set to
    ``None`` after each step, so the student's step never sees them.

    Cost levers (the defaults are the plain schedule: every iteration, every step with its penalty, two passes):

    - ``critic_every=n``: the discriminators are updated in one iteration out of ``n`` (iterations 1, n+1, 2n+1,
      ...); the student's generator terms still run every iteration, against the latest discriminators. The
      discriminator losses are reported (and averaged) over the iterations that updated them.
    - ``gp_every=k``: lazy gradient penalty (as StyleGAN2's lazy R1): WGAN-GP's penalty is computed in one critic
      step out of ``k`` per term and multiplied by ``k`` there, so its expected weight is unchanged; the other steps
      skip its double backward. Objectives without a penalty (hinge) ignore it.
    - ``batched_critic=True``: one discriminator pass on ``cat([fake, real])`` (batch 2B) instead of one pass
      each. Equal for discriminators whose layers treat samples independently in training mode; a BatchNorm
      discriminator, or spectral normalisation's power iteration (one update per pass instead of two), makes it
      differ slightly, so it is off by default.

    Args:
        distiller: the :class:`~kd_components.Distiller` (possibly wrapped in DDP); its adversarial terms are
            stepped, ``distiller.discriminators()`` are trained.
        optimizer: the discriminators' optimizer (holding exactly their parameters), or a factory called with
            ``distiller.discriminators().parameters()``.
        steps: discriminator steps per update (0: discriminators fixed, nothing reported).
        amp: autocast + ``GradScaler`` for the discriminator steps on CUDA.
        amp_kwargs: the autocast arguments (dtype) when ``amp``.
        device: the engine's device.
        check_finite: raise ``FloatingPointError`` naming the term when a discriminator loss is not finite.
        critic_every: update the discriminators in one iteration out of ``critic_every``.
        gp_every: compute the gradient penalty in one critic step out of ``gp_every``, scaled by ``gp_every``.
        batched_critic: one discriminator pass on real and fake together.

    Raises:
        ValueError: when the distiller has no adversarial term, when ``steps``, ``critic_every`` or ``gp_every`` is
            out of range, or when a given optimizer does not hold exactly the discriminators' trainable parameters.
    """

    def __init__(
        self,
        distiller: Distiller | nn.Module,
        optimizer: Optimizer | OptimizerFactory,
        steps: int = 1,
        amp: bool = False,
        amp_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        check_finite: bool = True,
        critic_every: int = 1,
        gp_every: int = 1,
        batched_critic: bool = False,
    ) -> None:
        for name, value, low in (("discriminator_steps", steps, 0), ("critic_every", critic_every, 1)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(gp_every, bool) or int(gp_every) != gp_every or gp_every < 1:
            raise ValueError(f"gp_every must be an integer >= 1, got {gp_every!r}")
        distiller = _unwrap_distiller(distiller)
        self.terms = {t.name: t for t in distiller.adversarial_terms()}
        if not self.terms:
            raise ValueError(
                "no distillation term has an AdversarialDistillationLoss: there is no discriminator to train. "
                "Without adversarial terms, kd_components.DistillationTrainer needs no discriminators."
            )
        self.discriminators = distiller.discriminators()
        """``{term name: discriminator}`` (:meth:`~kd_components.Distiller.discriminators`)."""
        if isinstance(optimizer, Optimizer):
            _check_holds_exactly(optimizer, self.discriminators)
        else:
            optimizer = optimizer(self.discriminators.parameters())
        self.optimizer = optimizer
        self.steps = int(steps)
        self.critic_every = int(critic_every)
        self.gp_every = int(gp_every)
        self.batched_critic = bool(batched_critic)
        self.check_finite = check_finite
        self.amp_kwargs = dict(amp_kwargs or {})
        self.scaler = torch.amp.GradScaler("cuda", enabled=bool(amp) and torch.device(device).type == "cuda")
        self.critic_steps = dict.fromkeys(self.terms, 0)
        """Discriminator steps taken so far by each term (the lazy penalty's clock)."""

    def updates_at(self, iteration: int) -> bool:
        """Whether the discriminators are updated at engine iteration ``iteration`` (1-based)."""
        return self.steps > 0 and (iteration - 1) % self.critic_every == 0

    def __call__(
        self,
        sources: Mapping[str, torch.Tensor],
        iteration: int,
        epoch: int,
        sources_for_term: Callable[[DistillationTerm, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor] | None]
        | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run this iteration's discriminator steps; return ``{"<term>_discriminator": mean loss}`` (detached).

        Args:
            sources: the iteration's tensors, ``{source string: tensor}`` (student output and taps, teacher, ...).
            iteration: the engine iteration (1-based), for ``critic_every``.
            epoch: the engine epoch, for messages.
            sources_for_term: the sources a term is computed on, or ``None`` to skip it in this batch (reported as
                0); default: ``sources`` for every term.
        """
        reported: dict[str, torch.Tensor] = {}
        if not self.updates_at(iteration):
            return reported
        self.discriminators.train()
        for name, term in self.terms.items():
            term_sources = sources if sources_for_term is None else sources_for_term(term, sources)
            if term_sources is None:  # nothing to discriminate in this batch (e.g. no labelled sample)
                reported[discriminator_value_name(name)] = torch.zeros((), device=sources["student"].device)
                continue
            inputs = self.inputs(term, term_sources)
            values = [self.step(term, inputs, iteration, epoch) for _ in range(self.steps)]
            reported[discriminator_value_name(name)] = torch.stack(values).mean()
        return reported

    @staticmethod
    def inputs(term: DistillationTerm, sources: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The term's loss arguments, as :class:`DistillationTerm` builds them, without autograd (detached)."""
        with torch.no_grad():
            kwargs = {arg: sources[src] for arg, src in term.inputs.items()}
            for arg, transform in term.transforms.items():
                kwargs[arg] = transform(kwargs[arg])
            for arg, ref in term.align.items():
                kwargs[arg] = term.adapters[arg](kwargs[arg], kwargs[ref].shape[2:])
        return {arg: value.detach() for arg, value in kwargs.items()}

    def step(
        self, term: DistillationTerm, inputs: Mapping[str, torch.Tensor], iteration: int, epoch: int
    ) -> torch.Tensor:
        """One optimizer step of ``term``'s discriminator on ``inputs``; returns its loss (detached)."""
        device_type = next(iter(inputs.values())).device.type
        use_amp = self.scaler.is_enabled()
        objective_kwargs: dict[str, Any] = {}
        if self.gp_every != 1:
            lazy = self.critic_steps[term.name] % self.gp_every == 0
            objective_kwargs["gp_scale"] = float(self.gp_every) if lazy else 0.0
        if self.batched_critic:
            objective_kwargs["batched"] = True
        self.critic_steps[term.name] += 1
        optimizer, scaler = self.optimizer, self.scaler
        with torch.autocast(device_type, enabled=False):  # leave the student's autocast (backward must not run in it)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, enabled=use_amp, **(self.amp_kwargs if use_amp else {})):
                loss = term.loss.discriminator_step_loss(**inputs, **objective_kwargs)
            if self.check_finite and not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"non-finite discriminator loss of term {term.name!r} at epoch {epoch}, iteration {iteration}: "
                    f"{float(loss):.4g}. Lower the discriminator learning rate, or turn discriminator_amp off."
                )
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def settings(self) -> dict[str, Any]:
        """Flat ``kd.*`` parameters describing the step (recorded in MLflow)."""
        settings: dict[str, Any] = {
            "kd.discriminator_steps": self.steps,
            "kd.discriminator_optimizer": type(self.optimizer).__name__,
            "kd.discriminator_lr": self.optimizer.param_groups[0].get("lr"),
        }
        if self.critic_every != 1:
            settings["kd.critic_every"] = self.critic_every
        if self.gp_every != 1:
            settings["kd.gp_every"] = self.gp_every
        if self.batched_critic:
            settings["kd.batched_critic"] = True
        for name, module in self.discriminators.items():
            settings[f"kd.{name}.discriminator"] = type(module).__name__
            settings[f"kd.{name}.objective"] = type(self.terms[name].loss.objective).__name__
        return settings


def _check_holds_exactly(optimizer: Optimizer, discriminators: nn.Module) -> None:
    """Refuse a discriminator optimizer that misses a trainable discriminator parameter or holds anything else."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p): n for n, p in discriminators.named_parameters() if p.requires_grad}
    missing = [n for i, n in trainable.items() if i not in held]
    if missing:
        raise ValueError(
            f"discriminator parameters are missing from discriminator_optimizer (e.g. {missing[:3]}): give the "
            'trainer an optimizer factory ({"_target_": "torch.optim.Adam", "_mode_": "callable", ...}), which it '
            "builds from the discriminators' parameters."
        )
    if held - set(trainable):
        raise ValueError(
            "discriminator_optimizer holds parameters that are not the discriminators' (student, teacher or "
            "adapters): it must hold the discriminators only. Give the trainer an optimizer factory instead."
        )
