"""Adversarial distillation training: a discriminator step and the student step in each Ignite iteration."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from kd_components.distiller import Distiller
from kd_components.losses.adversarial import AdversarialDistillationLoss
from kd_components.taps import unwrap_network
from kd_components.terms import DistillationTerm
from kd_components.trainer import SUPERVISED, DistillationTrainer

__all__ = ["AdversarialDistillationTrainer", "AdversarialState", "DiscriminatorBank", "discriminator_value_name"]


def discriminator_value_name(term: str) -> str:
    """The name a term's discriminator loss is reported under: ``"<term>_discriminator"``.

    The engine output key is then ``"loss_<term>_discriminator"`` and the epoch mean
    ``engine.state.metrics["train_<term>_discriminator"]``.
    """
    return f"{term}_discriminator"


def adversarial_terms(distiller: Distiller | nn.Module) -> list[DistillationTerm]:
    """The terms of ``distiller`` (possibly wrapped in DDP) whose loss is an :class:`AdversarialDistillationLoss`."""
    terms = unwrap_network(distiller)
    if not isinstance(terms, Distiller):
        raise TypeError(f"distiller must be a kd_components.Distiller, got {type(terms).__name__}")
    return [t for t in terms.terms if isinstance(t.loss, AdversarialDistillationLoss)]


class DiscriminatorBank(nn.ModuleDict):
    """The discriminators of a distiller's adversarial terms, registered as one module keyed by term name.

    :class:`AdversarialDistillationLoss` holds its discriminator outside its module registry on purpose (so the
    student's optimizer, built from ``distiller.parameters()``, never includes it). This bank is where the
    discriminators *are* registered: ``bank.parameters()`` is what the discriminator optimizer trains, and the bank
    is an ``nn.Module`` that MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` ``save_dict`` / ``load_dict`` can
    hold. A discriminator wrapped in ``DistributedDataParallel`` inside its loss is registered unwrapped, so state
    dict keys have no ``module.`` prefix and checkpoints load with or without DDP.

    Args:
        distiller: the :class:`~kd_components.Distiller` (possibly wrapped in DDP); every term whose loss is an
            :class:`AdversarialDistillationLoss` contributes its discriminator.
        names: only these adversarial terms (default: all of them).

    Raises:
        ValueError: when the distiller has no adversarial term, or ``names`` lists a term that is not one.
    """

    def __init__(self, distiller: Distiller | nn.Module, names: Sequence[str] | None = None) -> None:
        found = {t.name: unwrap_network(t.loss.discriminator) for t in adversarial_terms(distiller)}
        if not found:
            raise ValueError(
                "no distillation term has an AdversarialDistillationLoss: there is no discriminator to train. "
                "Use kd_components.DistillationTrainer for non-adversarial distillation."
            )
        if names is not None:
            unknown = [n for n in names if n not in found]
            if unknown:
                raise ValueError(f"{unknown} are not adversarial distillation terms; those are {list(found)}")
            found = {n: found[n] for n in names}
        super().__init__(found)


class AdversarialState:
    """Everything the adversarial training adds to a checkpoint: discriminators, their optimizer and grad scaler.

    Has ``state_dict()`` / ``load_state_dict()``, so it can go in a MONAI ``CheckpointSaver`` ``save_dict`` built
    in Python (in a bundle config, referencing the trainer from a handler is circular: save ``@discriminators``
    and ``@discriminator_optimizer`` instead).

    Args:
        discriminators: the :class:`DiscriminatorBank`.
        optimizer: the discriminator optimizer.
        scaler: the discriminator's ``GradScaler`` (disabled without AMP on CUDA).
    """

    def __init__(self, discriminators: DiscriminatorBank, optimizer: Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.discriminators = discriminators
        self.optimizer = optimizer
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        """``{"discriminators": ..., "optimizer": ..., "scaler": ...}`` state dicts."""
        return {
            "discriminators": self.discriminators.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (discriminator weights strictly; the scaler if it was saved)."""
        self.discriminators.load_state_dict(state["discriminators"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class AdversarialDistillationTrainer(DistillationTrainer):
    """:class:`~kd_components.DistillationTrainer` that also trains the discriminators of adversarial terms.

    Each Ignite iteration of MONAI's ``SupervisedTrainer`` loop (unchanged) does, in this order:

    1. the student's forward pass, then the teacher's (no autograd), recording the taps the terms read;
    2. for every adversarial term, ``discriminator_steps`` discriminator steps with the discriminator optimizer,
       on that term's inputs taken from the outputs already computed — student side detached (the "fake"),
       teacher side (the "real"), optional condition — with the term's transforms / adapters applied without
       autograd: ``loss.discriminator_step_loss(...)`` (WGAN-GP critic loss or hinge loss), backward, step;
    3. the student step: supervised loss plus every term, the adversarial terms giving the generator loss
       ``-mean D(student)`` against the *just updated* discriminators, whose parameters are frozen while that
       graph is built — the student's backward never writes a discriminator ``.grad``.

    Discriminator gradients are set to ``None`` after each discriminator step. The discriminator steps run outside
    the student's autocast: with ``discriminator_amp`` on CUDA they have their own autocast and their own
    ``GradScaler``; otherwise they run in float32. With gradient accumulation (``accumulation_steps``) the
    discriminators still step every iteration. The discriminator steps of one iteration reuse that iteration's
    batch (WGAN's ``n_critic`` usually draws new batches; here the student and teacher outputs are reused).

    Reported values: each discriminator loss (mean over the iteration's discriminator steps) is in the engine
    output as ``"loss_<term>_discriminator"`` and its epoch mean in ``engine.state.metrics`` as
    ``"train_<term>_discriminator"`` (not part of the student's ``"loss"``). With ``discriminator_steps=0`` the
    discriminators are fixed and nothing is reported for them.

    The discriminators are moved to ``device`` here (``distiller.to()`` does not reach them).

    Checkpoints: save the :class:`DiscriminatorBank` (``discriminators``) and ``discriminator_optimizer`` with
    MONAI's ``CheckpointSaver``, or :attr:`adversarial_state` (bank, optimizer and grad scaler) from Python.

    DDP: a discriminator may be wrapped in ``DistributedDataParallel`` (e.g. by
    :func:`kd_components.wrap_ddp_if_trainable`) before it is given to its :class:`AdversarialDistillationLoss`:
    the discriminator step runs through the wrapper (gradients are averaged across ranks), the generator term and
    the bank use the module inside it.

    Args:
        device: the device the engine runs on.
        max_epochs: number of training epochs.
        train_data_loader: the training data loader.
        network: the student network (possibly wrapped in ``DistributedDataParallel``).
        optimizer: the optimizer of the student and of ``distiller.parameters()``; no discriminator may be in it.
        loss_function: the supervised loss ``(pred, label) -> loss``.
        teacher: the trained teacher network; frozen here.
        distiller: the :class:`~kd_components.Distiller`, with at least one term whose loss is an
            :class:`AdversarialDistillationLoss`.
        discriminator_optimizer: the optimizer of every trainable discriminator parameter (e.g. Graph Flow: Adam,
            lr 2e-5, betas (0.9, 0.99)), built from ``discriminators.parameters()``.
        discriminator_steps: discriminator steps per student step (0: discriminators fixed).
        discriminators: the :class:`DiscriminatorBank` to train; default: built from every adversarial term of
            ``distiller``. Give it when the config also uses it for the optimizer and the checkpoint.
        discriminator_amp: autocast + ``GradScaler`` for the discriminator steps on CUDA; default: as ``amp``.
            WGAN-GP's gradient penalty is more accurate in float32 (``false``).
        kwargs: every other argument of :class:`~kd_components.DistillationTrainer` (``supervised_weight``,
            ``amp``, ``train_handlers``, ``inferer``, ...).

    Raises:
        ValueError: when there is no adversarial term, when a discriminator parameter is in the student optimizer
            or missing from ``discriminator_optimizer``, or when a student, teacher or distiller parameter is in
            ``discriminator_optimizer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        teacher: nn.Module,
        distiller: Distiller | nn.Module,
        discriminator_optimizer: Optimizer,
        discriminator_steps: int = 1,
        discriminators: DiscriminatorBank | None = None,
        discriminator_amp: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if int(discriminator_steps) != discriminator_steps or discriminator_steps < 0:
            raise ValueError(f"discriminator_steps must be an integer >= 0, got {discriminator_steps!r}")
        # set before the base constructor, whose distillation_settings() (MLflow parameters) reports them
        self.discriminators = discriminators if discriminators is not None else DiscriminatorBank(distiller)
        self.discriminators.to(device)  # distiller.to() does not reach them (held outside the losses' registry)
        self.discriminator_optimizer = discriminator_optimizer
        self.discriminator_steps = int(discriminator_steps)
        self._adversarial = _check_bank(self.discriminators, distiller)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            teacher=teacher,
            distiller=distiller,
            **kwargs,
        )
        self.discriminator_amp = self.amp if discriminator_amp is None else bool(discriminator_amp)
        on_cuda = torch.device(device).type == "cuda"
        self.discriminator_scaler = torch.amp.GradScaler("cuda", enabled=self.discriminator_amp and on_cuda)
        self.adversarial_state = AdversarialState(
            self.discriminators, self.discriminator_optimizer, self.discriminator_scaler
        )
        reserved = {SUPERVISED, *(t.name for t in self._terms.terms)}
        clash = [n for n in map(discriminator_value_name, self._adversarial) if n in reserved]
        if clash:
            raise ValueError(f"term names {clash} clash with the reported discriminator losses: rename those terms")
        _check_optimizers(self.discriminators, discriminator_optimizer, optimizer, network, teacher, distiller)

    def distillation_settings(self) -> dict[str, Any]:
        """The base settings plus the discriminator steps, optimizer and each discriminator's type."""
        settings = super().distillation_settings()
        settings["kd.discriminator_steps"] = self.discriminator_steps
        settings["kd.discriminator_optimizer"] = type(self.discriminator_optimizer).__name__
        settings["kd.discriminator_lr"] = self.discriminator_optimizer.param_groups[0].get("lr")
        for name, module in self.discriminators.items():
            settings[f"kd.{name}.discriminator"] = type(module).__name__
            settings[f"kd.{name}.objective"] = type(self._adversarial[name].loss.objective).__name__
        return settings

    def _before_terms(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The discriminator steps of this iteration, before the generator terms are built."""
        reported = super()._before_terms(sources)
        if self.discriminator_steps == 0:
            return reported
        self.discriminators.train()
        for name, term in self._adversarial.items():
            inputs = self._discriminator_inputs(term, sources)
            if inputs is None:  # nothing to discriminate in this batch (see _sources_for_term)
                reported[discriminator_value_name(name)] = torch.zeros((), device=sources["student"].device)
                continue
            values = [self._discriminator_step(term, inputs) for _ in range(self.discriminator_steps)]
            reported[discriminator_value_name(name)] = torch.stack(values).mean()
        return reported

    def _sources_for_term(
        self, term: DistillationTerm, sources: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """The sources a term is computed on; ``None`` skips it. Here all of them (semi-supervised overrides it)."""
        return sources

    def _discriminator_inputs(
        self, term: DistillationTerm, sources: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """The term's loss arguments, as :class:`DistillationTerm` builds them, detached (no autograd)."""
        sources = self._sources_for_term(term, sources)
        if sources is None:
            return None
        with torch.no_grad():
            kwargs = {arg: sources[src] for arg, src in term.inputs.items()}
            for arg, transform in term.transforms.items():
                kwargs[arg] = transform(kwargs[arg])
            for arg, ref in term.align.items():
                kwargs[arg] = term.adapters[arg](kwargs[arg], kwargs[ref].shape[2:])
        return {arg: value.detach() for arg, value in kwargs.items()}

    def _discriminator_step(self, term: DistillationTerm, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step of ``term``'s discriminator; returns its loss (detached)."""
        device_type = next(iter(inputs.values())).device.type
        use_amp = self.discriminator_scaler.is_enabled()
        optimizer, scaler = self.discriminator_optimizer, self.discriminator_scaler
        with torch.autocast(device_type, enabled=False):  # leave the student's autocast (backward must not run in it)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, enabled=use_amp, **(self.amp_kwargs if use_amp else {})):
                loss = term.loss.discriminator_step_loss(**inputs)
            if self.check_finite and not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"non-finite discriminator loss of term {term.name!r} at epoch {self.state.epoch}, iteration "
                    f"{self.state.iteration}: {float(loss):.4g}. Lower the discriminator learning rate, or turn "
                    "discriminator_amp off."
                )
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _check_bank(bank: DiscriminatorBank, distiller: Distiller | nn.Module) -> dict[str, DistillationTerm]:
    """Map each bank entry to its adversarial term, checking that the bank holds that term's discriminator."""
    terms = {t.name: t for t in adversarial_terms(distiller)}
    if not isinstance(bank, DiscriminatorBank):
        raise TypeError(f"discriminators must be a kd_components.DiscriminatorBank, got {type(bank).__name__}")
    out = {}
    for name, module in bank.items():
        if name not in terms:
            raise ValueError(f"discriminator {name!r} belongs to no adversarial term of the distiller ({list(terms)})")
        if unwrap_network(terms[name].loss.discriminator) is not module:
            raise ValueError(
                f"the bank's discriminator {name!r} is not the one term {name!r} uses: build the DiscriminatorBank "
                "from the same distiller the trainer gets"
            )
        out[name] = terms[name]
    return out


def _check_optimizers(
    bank: DiscriminatorBank,
    discriminator_optimizer: Optimizer,
    optimizer: Optimizer,
    network: nn.Module,
    teacher: nn.Module,
    distiller: nn.Module,
) -> None:
    def ids(opt: Optimizer) -> set[int]:
        return {id(p) for group in opt.param_groups for p in group["params"]}

    in_d, in_student = ids(discriminator_optimizer), ids(optimizer)
    trainable = [(n, p) for n, p in bank.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the discriminators have no trainable parameter")
    leaked = [n for n, p in trainable if id(p) in in_student]
    if leaked:
        raise ValueError(
            f"discriminator parameters are in the student optimizer (e.g. {leaked[:3]}): the student step would "
            "train them. Build the student optimizer from the student's and the distiller's parameters only."
        )
    missing = [n for n, p in trainable if id(p) not in in_d]
    if missing:
        raise ValueError(
            f"discriminator parameters are missing from discriminator_optimizer (e.g. {missing[:3]}): build it with "
            '"params": "$@discriminators.parameters()".'
        )
    for what, module in (("student", network), ("teacher", teacher), ("distiller", distiller)):
        if any(id(p) in in_d for p in module.parameters()):
            raise ValueError(f"{what} parameters are in discriminator_optimizer: it must hold discriminators only")
