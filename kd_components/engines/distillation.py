"""DistillationTrainer: one engine for every distillation, where the terms decide what each iteration does.

MONAI's :class:`~monai.engines.SupervisedTrainer` with a frozen teacher and weighted distillation terms. Its
``_iteration`` is the ``SupervisedTrainer`` iteration (same events, AMP, gradient accumulation, handlers) with the
distillation steps placed between the student's forward pass and its loss, as MONAI's ``GanTrainer`` alternates
its updates in ``_iteration``:

1. the student's forward pass (recording its taps), then the teacher's (once, no autograd), when a term reads it;
2. the discriminator steps of the adversarial terms, if any (:class:`~kd_components.engines.DiscriminatorStep`);
3. the loss: the supervised loss (on the labelled samples of a semi-supervised batch) plus every weighted term.

No distillation is an empty term list: the same trainer then trains the student alone (and needs no teacher).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import MLFlowHandler
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from kd_components.distiller import Distiller
from kd_components.engines.adversarial import (
    DiscriminatorStep,
    OptimizerFactory,
    discriminator_value_name,
)
from kd_components.engines.epoch_means import EpochMeans
from kd_components.ensemble import EnsembleTeacher
from kd_components.taps import FeatureTaps, unwrap_network
from kd_components.terms import DistillationTerm
from kd_components.utils import count_parameters, freeze

__all__ = [
    "BALANCED_WEIGHTS_KEY",
    "LABELLED",
    "SUPERVISED",
    "DistillationTrainer",
    "balanced_weight_key",
    "term_output_key",
]

SUPERVISED = "supervised"
"""Name under which the supervised loss is reported beside the distillation terms."""

LABELLED = "labelled"
"""Default batch key of the per-sample labelled flag (a bool per sample, collated into a (B,) bool tensor)."""

BALANCED_WEIGHTS_KEY = "kd_balanced_weights"
"""The ``engine.state`` attribute (and ``trainer.state_dict()`` key) holding the balanced weights, or ``None``."""


def balanced_weight_key(name: str) -> str:
    """The ``engine.state.metrics`` key of a term's balanced weight: ``"kd.<name>.balanced_weight"``."""
    return f"kd.{name}.balanced_weight"


def term_output_key(name: str) -> str:
    """The engine-output key of a loss term's unweighted value: ``"loss_<name>"``.

    Keys are flat (not a nested dict) so that MONAI's per-sample decollation of the output keeps them.
    """
    return f"loss_{name}"


logger = logging.getLogger("kd_components.trainer")  # the name users and logging.conf know


def _plain(x: Any) -> Any:
    """Drop MONAI's metadata wrapper (keeps autograd) so losses run on plain tensors."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class DistillationTrainer(SupervisedTrainer):
    """Train a student with its supervised loss plus weighted distillation terms from a frozen teacher.

    One trainer for every method: what an iteration does follows from the distiller's terms and the batch.

    - **Plain terms**: for each iteration, inside the student's autocast, the student runs (its forward hooks
      record the taps the terms read), then the teacher once, in eval mode and without autograd, when a term reads
      it; the loss is ``supervised_weight * loss_function(pred, label)`` plus each term's scheduled weight times its
      value; every tap is released as soon as the loss is built.
    - **Adversarial terms** (an :class:`~kd_components.losses.AdversarialDistillationLoss`): before the student's
      loss, their discriminators take ``discriminator_steps`` optimizer steps on this iteration's (detached) student
      and teacher tensors, outside the student's autocast (:class:`~kd_components.engines.DiscriminatorStep`); the
      generator terms then run against the just-updated discriminators, whose parameters are frozen while that
      graph is built. The discriminators' optimizer is built here from their parameters
      (``discriminator_optimizer`` a factory, e.g. a config's ``"_mode_": "callable"`` optimizer), or given.
    - **Semi-supervised batches** (``semi_supervised=True``): each batch carries a per-sample flag under
      ``labelled_key`` (a (B,) bool tensor, from :class:`~kd_components.PlaceholderLabeld`); the supervised loss
      runs on the labelled samples only (0, without calling ``loss_function``, when there are none); terms that
      do not read ``label`` run on every sample; terms that read ``label`` (IFVD, IDD, EMKD region affinity, a
      label-conditioned discriminator) on the labelled samples only (0 without any; ``label_terms="error"``
      refuses them instead).
    - **No terms**: the student alone, with the same loop, outputs and logging; the teacher may be ``None``.

    The engine output carries the total under ``"loss"`` and every unweighted term under ``"loss_<name>"`` (the
    supervised loss as ``"loss_supervised"``, each discriminator loss as ``"loss_<term>_discriminator"``, not part
    of the total); at the end of each epoch, their means are written to ``engine.state.metrics`` as
    ``train_<name>`` (one :class:`~kd_components.engines.EpochMeans`), so ``StatsHandler`` and ``MLFlowHandler``
    record them. In semi-supervised mode the means of the supervised loss and of label-reading terms average the
    batches that had labelled samples (NaN in an epoch without any) and ``train_labelled_fraction`` is the epoch's
    fraction of labelled samples. Any ``MLFlowHandler`` among ``train_handlers`` also records the distillation
    settings as run parameters.

    Automatic term balancing (optional, off by default: ``balance_iterations=0`` changes nothing). With
    ``balance_iterations=N``:

    - during the first ``N`` training iterations the distillation terms have weight **0** (they are computed,
      reported and kept in the graph with a zero factor, so the student learns from the supervised loss alone);
      in each of these iterations the trainer measures ``g_sup = ‖∇_θ L_sup‖₂`` and, for every term,
      ``g_i = ‖∇_θ L_i‖₂``: the gradient norms of the *unweighted* values with respect to the student's trainable
      parameters ``θ`` (``torch.autograd.grad(..., retain_graph=True)``, outside autocast). Adapters and other
      distiller modules are not in ``θ``;
    - at the end of iteration ``N`` each term's weight is set from the means of the norms over those iterations
      so that its weighted gradient norm is ``ratio_i`` times that of the weighted supervised loss:
      ``w_i = ratio_i · supervised_weight · mean(g_sup) / mean(g_i)``, and then frozen for the rest of training.
      ``ratio_i`` is ``balance_ratio`` when given, otherwise the term's configured ``weight`` read as a target
      ratio. A term's ``schedule`` still multiplies the balanced weight;
    - a value without a graph in an iteration (e.g. a semi-supervised batch without labels) is left out of that
      norm's mean; a term whose mean norm is 0 keeps its configured weight, with a warning, as do all terms when
      the supervised loss was never measured;
    - the weights are logged, written to ``engine.state.metrics`` as ``"kd.<term>.balanced_weight"``, exposed as
      :attr:`balanced_weights` and kept in ``engine.state.kd_balanced_weights``, a key of
      ``trainer.state_dict()`` (a resumed run restores them and does not measure again). The mean norms are in
      :attr:`balance_norms`. Under DDP the norms' means are averaged over the ranks.

    Args:
        device: the device the engine runs on.
        max_epochs: number of training epochs.
        train_data_loader: the training data loader.
        network: the student network (possibly wrapped in ``DistributedDataParallel``).
        optimizer: the optimizer of the student and of ``distiller.student_parameters()`` (adapters,
            translators); the teacher and the discriminators must not be in it.
        loss_function: the supervised loss ``(pred, label) -> loss``.
        teacher: the trained teacher network; it is frozen here (eval mode, ``requires_grad=False``). ``None`` is
            allowed when no term reads the teacher (e.g. no terms: the student alone).
        distiller: the :class:`Distiller` holding the terms (possibly wrapped in ``DistributedDataParallel``).
        supervised_weight: the weight of the supervised loss (e.g. ``1 - alpha`` in KDAS).
        check_finite: raise a clear error naming the term when the loss becomes NaN or infinite.
        train_handlers: handlers attached after the trainer's own bookkeeping handlers.
        balance_iterations: the number ``N`` of first training iterations over which the gradient norms are
            measured before the term weights are set and frozen; 0 (default) turns balancing off.
        balance_ratio: the target ratio of every term's weighted gradient norm to the weighted supervised loss's;
            ``None`` (default): each term's configured ``weight`` is its own target ratio.
        discriminator_optimizer: for adversarial terms, the optimizer of their discriminators: a factory called
            with their parameter group, ``distiller.discriminators().parameters()`` (e.g.
            ``functools.partial(torch.optim.Adam, lr=2e-5)``), or an optimizer built from it. Unused without
            adversarial terms (an optimizer instance is then refused: there is no discriminator for it to train).
        discriminator_steps: discriminator steps per update (0: discriminators fixed, nothing reported).
        discriminator_amp: autocast + ``GradScaler`` for the discriminator steps on CUDA; default: as ``amp``.
            WGAN-GP's gradient penalty is more accurate in float32 (``false``).
        critic_every: update the discriminators in one iteration out of ``critic_every`` (default 1: every
            iteration); the generator terms run every iteration.
        gp_every: lazy gradient penalty: WGAN-GP's penalty in one critic step out of ``gp_every`` per term,
            multiplied by ``gp_every`` (default 1: every step, unscaled).
        batched_critic: one discriminator pass on real and fake stacked along the batch instead of two passes
            (default ``False``; see :class:`~kd_components.engines.DiscriminatorStep` for when it differs).
        semi_supervised: batches carry a per-sample labelled flag (``labelled_key``): supervision on the labelled
            samples only, label-reading terms likewise.
        labelled_key: the batch key of the per-sample flag.
        label_terms: ``"labelled"`` (compute label-reading terms on the labelled samples) or ``"error"``.
        kwargs: every other argument of :class:`~monai.engines.SupervisedTrainer`.

    Raises:
        ValueError: when the teacher's parameters are in the optimizer, when trainable distillation modules
            (adapters) are missing from it, when a term reads a missing teacher, when the balancing arguments are
            invalid, when adversarial terms have no ``discriminator_optimizer`` (or discriminator parameters are in
            the student's), when semi-supervised terms all read ``label``, or when a term's name is reserved.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        teacher: nn.Module | None,
        distiller: Distiller | nn.Module,
        supervised_weight: float = 1.0,
        check_finite: bool = True,
        train_handlers: Sequence | None = None,
        balance_iterations: int = 0,
        balance_ratio: float | None = None,
        discriminator_optimizer: Optimizer | OptimizerFactory | None = None,
        discriminator_steps: int = 1,
        discriminator_amp: bool | None = None,
        critic_every: int = 1,
        gp_every: int = 1,
        batched_critic: bool = False,
        semi_supervised: bool = False,
        labelled_key: str = LABELLED,
        label_terms: str = "labelled",
        **kwargs: Any,
    ) -> None:
        _check_balance_args(balance_iterations, balance_ratio, supervised_weight)
        if label_terms not in ("labelled", "error"):
            raise ValueError(f"label_terms must be 'labelled' or 'error', got {label_terms!r}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            train_handlers=None,
            **kwargs,
        )
        self.supervised_weight = float(supervised_weight)
        self.check_finite = check_finite
        self.distiller = distiller
        terms = unwrap_network(distiller)
        if not isinstance(terms, Distiller):
            raise TypeError(f"distiller must be a kd_components.Distiller, got {type(terms).__name__}")
        self._terms = terms
        self._needs_teacher = terms.uses("teacher")
        if teacher is None and self._needs_teacher:
            raise ValueError("the distillation terms read the teacher, but teacher is None: give the trained teacher")
        self.teacher = freeze(teacher) if teacher is not None else None
        if any(t.name == SUPERVISED for t in terms.terms):
            raise ValueError(f"{SUPERVISED!r} is reserved for the supervised loss: rename that distillation term")
        _check_optimizer(optimizer, self.teacher, terms)
        self.student_taps = FeatureTaps(network, terms.taps("student"), owner="student", active=False)
        self.teacher_taps = (
            FeatureTaps(self.teacher, terms.taps("teacher"), owner="teacher", active=False)
            if self.teacher is not None
            else FeatureTaps(nn.Identity(), [], owner="teacher", active=False)
        )
        self._setup_adversarial(
            distiller,
            discriminator_optimizer,
            discriminator_steps,
            discriminator_amp,
            critic_every,
            gp_every,
            batched_critic,
        )
        self._setup_semi_supervised(semi_supervised, labelled_key, label_terms)
        self.epoch_means = EpochMeans()
        self._pending_check: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.balance_iterations = int(balance_iterations)
        self.balance_ratio = None if balance_ratio is None else float(balance_ratio)
        self.balance_norms: dict[str, float | None] = {}
        self._norm_sums: dict[str, float] = {}
        self._norm_counts: dict[str, int] = {}
        self._measured = 0
        if self.balance_iterations:
            setattr(self.state, BALANCED_WEIGHTS_KEY, None)
            self.state_dict_user_keys.append(BALANCED_WEIGHTS_KEY)
        elif balance_ratio is not None:
            logger.warning("balance_ratio=%s is ignored: balancing is off (balance_iterations=0)", balance_ratio)
        # the finiteness check waits until backward is queued (one host sync, before the optimizer step)
        self.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._check_finite_loss)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._check_finite_loss)  # iterations without backward
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch_means)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._write_epoch_means)
        handlers = list(train_handlers or [])
        settings = self.distillation_settings()
        for handler in handlers:
            if isinstance(handler, MLFlowHandler):
                handler.experiment_param = {**settings, **(handler.experiment_param or {})}
        if handlers:
            self._register_handlers(handlers)

    # construction

    def _setup_adversarial(
        self,
        distiller: Distiller | nn.Module,
        discriminator_optimizer: Optimizer | OptimizerFactory | None,
        steps: int,
        amp: bool | None,
        critic_every: int,
        gp_every: int,
        batched_critic: bool,
    ) -> None:
        """Build the discriminator step when the distiller has adversarial terms (``self.adversarial``).

        Sets ``discriminators`` (``{term name: discriminator}``), ``discriminator_optimizer`` and
        ``discriminator_scaler``: what the discriminator checkpoint and the resumable training state hold.
        """
        self.adversarial: DiscriminatorStep | None = None
        self.discriminators: nn.ModuleDict | None = None
        self.discriminator_optimizer: Optimizer | None = None
        self.discriminator_scaler: torch.amp.GradScaler | None = None
        if not self._terms.adversarial_terms():
            if isinstance(discriminator_optimizer, Optimizer):
                raise ValueError(
                    "no distillation term has an AdversarialDistillationLoss: there is no discriminator to train. "
                    "Drop discriminator_optimizer, or add an adversarial term."
                )
            return
        if discriminator_optimizer is None:
            raise ValueError(
                "the distiller has adversarial terms: give the trainer a discriminator_optimizer, e.g. "
                '{"_target_": "torch.optim.Adam", "_mode_": "callable", "lr": 2e-5, "betas": [0.9, 0.99]}'
            )
        step = DiscriminatorStep(
            distiller,
            discriminator_optimizer,
            steps=steps,
            amp=self.amp if amp is None else bool(amp),
            amp_kwargs=self.amp_kwargs,
            device=self.state.device,
            check_finite=self.check_finite,
            critic_every=critic_every,
            gp_every=gp_every,
            batched_critic=batched_critic,
        )
        reserved = {SUPERVISED, *(t.name for t in self._terms.terms)}
        clash = [n for n in map(discriminator_value_name, step.terms) if n in reserved]
        if clash:
            raise ValueError(f"term names {clash} clash with the reported discriminator losses: rename those terms")
        self.adversarial = step
        self.discriminators, self.discriminator_optimizer = step.discriminators, step.optimizer
        self.discriminator_scaler = step.scaler
        self.discriminator_steps = step.steps
        self.discriminator_amp = self.amp if amp is None else bool(amp)

    @property
    def supervised_loss(self) -> Callable:
        """The supervised loss ``(pred, label) -> loss`` (the engine's ``loss_function``)."""
        return self.loss_function

    def _setup_semi_supervised(self, enabled: bool, labelled_key: str, label_terms: str) -> None:
        self.semi_supervised = bool(enabled)
        self.labelled_key = labelled_key
        self._mask: torch.Tensor | None = None
        self._label_terms = [t.name for t in self._terms.terms if t.uses("label")]
        self._other_terms = [t.name for t in self._terms.terms if t.name not in self._label_terms]
        self._labelled_only = {SUPERVISED, *self._label_terms, *map(discriminator_value_name, self._label_terms)}
        self._samples = [0, 0]  # labelled, all in this epoch
        if not self.semi_supervised:
            return
        if self._label_terms and label_terms == "error":
            raise ValueError(
                f"terms {self._label_terms} read 'label', which unlabelled samples do not have. Remove them, or "
                'set label_terms="labelled" to compute them on the labelled samples of each batch only.'
            )
        if self._terms.terms and not self._other_terms:
            raise ValueError(
                f"every distillation term reads 'label' ({self._label_terms}): unlabelled samples would teach the "
                "student nothing. Add a term that reads only the networks' outputs or taps (e.g. logit KD)."
            )
        _check_ddp(self.distiller, [t for t in self._terms.terms if t.name in self._label_terms])

    def distillation_settings(self) -> dict[str, Any]:
        """The distillation setup as flat ``{name: value}`` parameters (recorded in MLflow)."""
        settings: dict[str, Any] = {
            "kd.teacher": type(unwrap_network(self.teacher)).__name__ if self.teacher is not None else "None",
            "kd.teacher_params": count_parameters(self.teacher) if self.teacher is not None else 0,
            "kd.student": type(unwrap_network(self.network)).__name__,
            "kd.student_params": count_parameters(self.network),
            "kd.supervised_weight": self.supervised_weight,
            "kd.terms": ",".join(t.name for t in self._terms.terms),
        }
        teacher = unwrap_network(self.teacher) if self.teacher is not None else None
        if isinstance(teacher, EnsembleTeacher):
            settings["kd.teacher_ensemble"] = teacher.describe()
        if self.balance_iterations:
            settings["kd.balance_iterations"] = self.balance_iterations
            settings["kd.balance_ratio"] = "term weights" if self.balance_ratio is None else self.balance_ratio
        if self.semi_supervised:
            settings["kd.semi_supervised"] = True
        for term in self._terms.terms:
            prefix = f"kd.{term.name}"
            settings[f"{prefix}.loss"] = _describe(term.loss)
            settings[f"{prefix}.weight"] = term.weight
            settings[f"{prefix}.inputs"] = ", ".join(f"{a}={s}" for a, s in term.inputs.items())
            if term.schedule is not None:
                settings[f"{prefix}.schedule"] = repr(term.schedule)
            if term.align:
                settings[f"{prefix}.align"] = ", ".join(f"{a}->{r}" for a, r in term.align.items())
        if self.adversarial is not None:
            settings.update(self.adversarial.settings())
        return settings

    # one iteration

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One training iteration: ``SupervisedTrainer``'s, with the distillation steps before the loss.

        Same events, in the same order, as ``SupervisedTrainer._iteration`` (``FORWARD_COMPLETED`` after the
        student's forward pass, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``), AMP and gradient
        accumulation. Before the student's forward pass: the teacher's (same autocast, no gradients); between the
        student's forward pass and its loss: the discriminator steps (outside the autocast).

        Args:
            engine: this trainer (Ignite passes the engine).
            batchdata: the batch, a dictionary (or tuple) of tensors.

        Returns:
            ``engine.state.output``: image, label, pred, ``"loss"`` and every ``"loss_<name>"``.

        Raises:
            ValueError: when ``batchdata`` is None.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        self._mask = self._read_mask(batchdata) if self.semi_supervised else None
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args: tuple = ()
            kwargs: dict = {}
        else:
            inputs, targets, args, kwargs = batch
        metas: dict[str, MetaTensor] = {}
        if self.compile:  # as SupervisedTrainer: compiled networks get plain tensors, metadata is put back after
            for key, value in ((Keys.IMAGE, inputs), (Keys.LABEL, targets)):
                if isinstance(value, MetaTensor):
                    metas[key] = value
            inputs, targets = _plain(inputs), _plain(targets)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        acc = engine.accumulation_steps
        should_zero_grad, should_step = True, True
        if acc > 1:
            epoch_length = engine.state.epoch_length
            local_iter = engine.state.iteration - 1
            if epoch_length is not None:
                local_iter %= epoch_length  # 0-indexed within epoch
                should_step = (local_iter + 1) % acc == 0 or (local_iter + 1) == epoch_length
            else:
                should_step = (local_iter + 1) % acc == 0
            should_zero_grad = local_iter % acc == 0

        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None

        def student_autocast() -> Any:
            return torch.autocast("cuda", **engine.amp_kwargs) if use_scaler else nullcontext()

        try:
            with student_autocast():
                teacher = self._teacher_sources(inputs)  # first: its activations are freed before the student's exist
                self.student_taps.clear()
                self.student_taps.active = True
                engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
                self.student_taps.active = False
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                sources = {**self._student_sources(engine.state.output[Keys.PRED], targets, inputs), **teacher}
            reported = self._discriminator_step(sources)
            with student_autocast():
                loss, values = self._loss(engine.state.output[Keys.PRED], targets, sources, reported)
        finally:
            for taps in (self.student_taps, self.teacher_taps):
                taps.active = False
                taps.clear()
        engine.state.output[Keys.LOSS] = loss
        for name, value in values.items():
            engine.state.output[term_output_key(name)] = value
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        if use_scaler:
            engine.scaler.scale(loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            (loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.optimizer.step()
        for key, meta in metas.items():
            engine.state.output[key] = MetaTensor(
                engine.state.output[key], meta=meta.meta, applied_operations=meta.applied_operations
            )
        if Keys.IMAGE in metas:
            image = metas[Keys.IMAGE]
            engine.state.output[Keys.PRED] = MetaTensor(
                engine.state.output[Keys.PRED], meta=image.meta, applied_operations=image.applied_operations
            )
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _student_sources(self, pred: torch.Tensor, label: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's side of what a term may read, ``{source: tensor}``: its output and taps, label, image."""
        sources: dict[str, torch.Tensor] = {"student": _plain(pred), "label": _plain(label), "image": _plain(image)}
        for name in self.student_taps.names:
            sources[f"student:{name}"] = _plain(self.student_taps[name])
        return sources

    def _teacher_sources(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's output and taps, ``{"teacher": logits, "teacher:<tap>": feature}``, from one pass without
        gradients (empty when no term reads the teacher).

        Run before the student's forward pass: the teacher's intermediate activations are then freed before the
        student's graph exists, so the iteration's peak memory is the larger of the two, not their sum (torchdistill's
        order; same values, since the two passes are independent).
        """
        if not self._needs_teacher:
            return {}
        self.teacher.eval()
        self.teacher_taps.clear()
        self.teacher_taps.active = True
        try:
            with torch.no_grad():  # not inference_mode: terms may save teacher tensors for backward
                sources = {"teacher": _plain(self.inferer(_plain(image), self.teacher))}
        finally:
            self.teacher_taps.active = False
        for name in self.teacher_taps.names:
            sources[f"teacher:{name}"] = _plain(self.teacher_taps[name])
        return sources

    def _discriminator_step(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This iteration's discriminator updates (none without adversarial terms); their losses, to report."""
        if self.adversarial is None:
            return {}
        return self.adversarial(sources, self.state.iteration, self.state.epoch, self._sources_for_term)

    def _loss(
        self,
        pred: torch.Tensor,
        label: torch.Tensor,
        sources: dict[str, torch.Tensor],
        reported: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's total loss and every unweighted value to report (supervised, terms, ``reported``)."""
        supervised = self._supervised_value(pred, label)
        values = self._term_values(sources)
        total = self.supervised_weight * supervised
        for term in self._terms.terms:
            total = total + self._term_weight(term) * values[term.name]
        if self._measuring():
            self._measure_gradient_norms(supervised, values, pred.device.type)
        terms = {SUPERVISED: supervised.detach(), **{k: v.detach() for k, v in values.items()}}
        terms.update({k: v.detach() for k, v in reported.items()})  # reported only, not part of the total
        if self.check_finite:  # checked in _check_finite_loss, without a host sync here
            self._pending_check = (torch.isfinite(total.detach()), terms)
        self._accumulate(terms)
        return total, terms

    def _supervised_value(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The unweighted supervised loss: ``loss_function(pred, label).mean()`` on the labelled samples.

        0 (a constant, no graph) without calling the loss when a semi-supervised batch has no labelled sample.
        """
        mask = self._mask
        if mask is None or bool(mask.all()):
            return self.loss_function(pred, label).mean()
        if not bool(mask.any()):
            return torch.zeros((), device=pred.device)
        return self.loss_function(self._labelled(pred), self._labelled(label)).mean()

    def _term_values(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted value of every term; label-reading ones on the labelled samples (0 without any)."""
        mask = self._mask
        if mask is None or not self._label_terms or bool(mask.all()):
            return self.distiller(sources)
        values = self.distiller(sources, names=self._other_terms)
        labelled = self._labelled_sources(sources)
        if labelled is None:
            zero = torch.zeros((), device=sources["student"].device)
            values.update({name: zero for name in self._label_terms})
        else:
            values.update(self.distiller(labelled, names=self._label_terms))
        return {t.name: values[t.name] for t in self._terms.terms}

    # semi-supervised batches

    def _read_mask(self, batch: Any) -> torch.Tensor:
        """The batch's (B,) bool labelled mask, on the engine's device; counts the epoch's labelled samples."""
        if not isinstance(batch, Mapping) or self.labelled_key not in batch:
            raise KeyError(
                f"semi-supervised batches need a per-sample {self.labelled_key!r} flag: add "
                "kd_components.semisupervised.PlaceholderLabeld to the training transforms (and split the datalist "
                "with kd_components.semisupervised.split_labelled)"
            )
        mask = torch.as_tensor(batch[self.labelled_key]).reshape(-1).bool()
        self._samples[0] += int(mask.sum())
        self._samples[1] += mask.numel()
        return mask.to(self.state.device)

    def _labelled(self, x: torch.Tensor) -> torch.Tensor:
        """The labelled samples of a batch-first tensor (a plain tensor: metadata does not follow a mask)."""
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        if self._mask.numel() != x.shape[0]:
            raise ValueError(f"{self.labelled_key!r} holds {self._mask.numel()} flags for a batch of {x.shape[0]}")
        return x[self._mask]

    def _labelled_sources(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``sources`` restricted to the labelled samples; ``None`` when the batch has none."""
        if not bool(self._mask.any()):
            return None
        batch = self._mask.numel()
        return {k: self._labelled(v) if v.dim() > 0 and v.shape[0] == batch else v for k, v in sources.items()}

    def _sources_for_term(
        self, term: DistillationTerm, sources: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """The sources a term is computed on this iteration: all, or the labelled samples for a label reader."""
        if self._mask is None or term.name not in self._label_terms or bool(self._mask.all()):
            return sources
        return self._labelled_sources(sources)

    # balancing

    @property
    def balanced_weights(self) -> dict[str, float] | None:
        """The frozen balanced weight of every term, ``{term name: weight}``; ``None`` before (or without) them."""
        return getattr(self.state, BALANCED_WEIGHTS_KEY, None) if self.balance_iterations else None

    def _measuring(self) -> bool:
        """Whether this iteration measures gradient norms (balancing on, weights not set yet)."""
        return self.balance_iterations > 0 and self.balanced_weights is None

    def _term_weight(self, term: DistillationTerm) -> float:
        """A term's weight at this iteration: configured (times schedule), 0 while measuring, or balanced."""
        if not self.balance_iterations:
            return term.weight_at(self.state.iteration, self.state.epoch)
        weights = self.balanced_weights
        if weights is None:
            return 0.0
        if term.name not in weights:
            raise ValueError(
                f"the balanced weights {weights} (restored from a checkpoint?) have no entry for term {term.name!r}: "
                "the checkpoint was written with other terms"
            )
        factor = term.schedule(self.state.iteration, self.state.epoch) if term.schedule is not None else 1.0
        return weights[term.name] * factor

    def _measure_gradient_norms(
        self, supervised: torch.Tensor, values: dict[str, torch.Tensor], device_type: str
    ) -> None:
        """Add this iteration's gradient norms (w.r.t. the student's trainable parameters); freeze after N."""
        params = [p for p in unwrap_network(self.network).parameters() if p.requires_grad]
        with torch.autocast(device_type, enabled=False):  # backward outside the student's autocast
            for name, value in {SUPERVISED: supervised, **values}.items():
                norm = _gradient_norm(value, params)
                if norm is not None:
                    self._norm_sums[name] = self._norm_sums.get(name, 0.0) + norm
                    self._norm_counts[name] = self._norm_counts.get(name, 0) + 1
        self._measured += 1
        if self._measured >= self.balance_iterations:
            self._freeze_balanced_weights()

    def _freeze_balanced_weights(self) -> None:
        """Set every term's weight from the mean gradient norms, store, log and report them."""
        names = [SUPERVISED, *(t.name for t in self._terms.terms)]
        sums = [self._norm_sums.get(n, 0.0) for n in names]
        counts = [float(self._norm_counts.get(n, 0)) for n in names]
        if dist.is_available() and dist.is_initialized():  # every rank must use the same weights
            device = torch.device(self.state.device) if self.state.device is not None else torch.device("cpu")
            both = torch.tensor(sums + counts, dtype=torch.float64, device=device)
            dist.all_reduce(both)
            sums, counts = both[: len(names)].tolist(), both[len(names) :].tolist()
        means = {n: (s / c if c > 0 else None) for n, s, c in zip(names, sums, counts)}
        self.balance_norms = means
        reference = means[SUPERVISED]
        weights: dict[str, float] = {}
        for term in self._terms.terms:
            norm = means[term.name]
            ratio = self.balance_ratio if self.balance_ratio is not None else term.weight
            if not reference:
                logger.warning(
                    "term balancing: the supervised loss had no gradient in the %d measuring iterations; term %r "
                    "keeps its configured weight %g",
                    self._measured,
                    term.name,
                    term.weight,
                )
                weights[term.name] = term.weight
            elif not norm:
                logger.warning(
                    "term balancing: term %r had a zero gradient w.r.t. the student's parameters in the %d measuring "
                    "iterations (it does not reach the student, or had no graph); it keeps its configured weight %g",
                    term.name,
                    self._measured,
                    term.weight,
                )
                weights[term.name] = term.weight
            else:
                weights[term.name] = ratio * self.supervised_weight * reference / norm
        setattr(self.state, BALANCED_WEIGHTS_KEY, weights)
        self._write_balanced_weights()
        logger.info(
            "term balancing after %d iterations: mean gradient norms %s; balanced weights %s (frozen from now on)",
            self._measured,
            {n: (None if v is None else float(f"{v:.4g}")) for n, v in means.items()},
            {n: float(f"{w:.4g}") for n, w in weights.items()},
        )

    def _write_balanced_weights(self) -> None:
        weights = self.balanced_weights
        if weights:
            for name, weight in weights.items():
                self.state.metrics[balanced_weight_key(name)] = weight

    def _check_finite_loss(self) -> None:
        """Raise the non-finite-loss error of this iteration, if any.

        Runs at ``BACKWARD_COMPLETED``: the device has the whole forward and backward pass queued, and the optimizer
        has not stepped, so the weights are never updated from a non-finite loss. Checking right after the loss
        would stall the host (on CUDA) before it could queue the backward pass.
        """
        pending, self._pending_check = self._pending_check, None
        if pending is not None and not bool(pending[0]):
            self._raise_non_finite(pending[1])

    def _raise_non_finite(self, terms: dict[str, torch.Tensor]) -> None:
        bad = [f"{k}={float(v):.4g}" for k, v in terms.items() if not bool(torch.isfinite(v))]
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        raise FloatingPointError(
            f"non-finite loss at epoch {self.state.epoch}, iteration {self.state.iteration}: "
            f"{', '.join(bad) or 'the total'} "
            f"(all terms: {values}). Lower the learning rate or the weight of the failing term, check the inputs for "
            "NaN/inf (intensity scaling), or turn AMP off to see whether float16 overflows."
        )

    def _accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        """Add this iteration's reported values to the epoch means (labelled-only ones: labelled batches only)."""
        skip: set[str] = set()
        if self._mask is not None and not bool(self._mask.any()):
            skip = self._labelled_only
        self.epoch_means.add(terms, skip=skip)

    def _reset_epoch_means(self) -> None:
        self.epoch_means.reset()
        self._samples = [0, 0]

    def _write_epoch_means(self) -> None:
        self.epoch_means.write(self.state.metrics)
        if self.semi_supervised:
            self.state.metrics["train_labelled_fraction"] = self._samples[0] / max(self._samples[1], 1)
        self._write_balanced_weights()


def _gradient_norm(value: torch.Tensor, params: Sequence[torch.Tensor]) -> float | None:
    """``‖∂ value / ∂ params‖₂`` over all ``params`` (float); ``None`` when ``value`` has no graph or it is not finite.

    Args:
        value: a scalar loss.
        params: the parameters (leaf tensors with ``requires_grad``).
    """
    if not value.requires_grad or not params:
        return None
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    if not squares:
        return 0.0
    norm = float(torch.stack(squares).sum().sqrt())
    return norm if math.isfinite(norm) else None


def _check_balance_args(iterations: Any, ratio: float | None, supervised_weight: float) -> None:
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 0:
        raise ValueError(f"balance_iterations must be an integer >= 0, got {iterations!r}")
    if ratio is not None and not (math.isfinite(float(ratio)) and float(ratio) > 0):
        raise ValueError(f"balance_ratio must be a positive number or None, got {ratio!r}")
    if iterations and float(supervised_weight) == 0:
        raise ValueError(
            "term balancing sets each term's weight relative to the weighted supervised loss, which is 0 here "
            "(supervised_weight=0): set a positive supervised_weight or turn balancing off (balance_iterations=0)"
        )


def _describe(loss: Any) -> str:
    """``ClassName(a=1, b=2)`` from a loss's public scalar attributes (short enough for an MLflow parameter)."""
    fields = {
        k: v
        for k, v in getattr(loss, "__dict__", {}).items()  # builtins (e.g. torch.dist) have no __dict__
        if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))
    }
    return f"{type(loss).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(fields.items()))})"[:500]


def _check_optimizer(optimizer: Optimizer, teacher: nn.Module | None, distiller: Distiller) -> None:
    """Refuse a student optimizer holding the teacher or a discriminator, or missing a trainable adapter."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    fix = 'Build it as "params": "$list(@network.parameters()) + @distill#distiller.student_parameters()".'
    if teacher is not None and any(id(p) in in_optimizer for p in teacher.parameters()):
        raise ValueError(f"the teacher's parameters are in the optimizer: the teacher must stay frozen. {fix}")
    leaked = [n for n, p in distiller.discriminators().named_parameters() if id(p) in in_optimizer]
    if leaked:
        raise ValueError(
            f"discriminator parameters are in the student optimizer (e.g. {leaked[:3]}): the student step would "
            f"train them (distiller.parameters() includes them; the discriminators have their own optimizer). {fix}"
        )
    missing = [n for n, p in distiller.named_student_parameters() if id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"trainable distillation modules are not in the optimizer (e.g. {missing[:3]}): they would never learn. "
            f"{fix}"
        )


def _check_ddp(distiller: nn.Module, label_terms: list[DistillationTerm]) -> None:
    """Refuse a DDP distiller that would wait for gradients of skipped label-reading terms."""
    if not isinstance(distiller, nn.parallel.DistributedDataParallel) or distiller.find_unused_parameters:
        return
    synced = {id(p) for p in distiller.module.student_parameters()}  # DDP ignores the discriminators
    trainable = [t.name for t in label_terms if any(id(p) in synced for p in t.parameters())]
    if trainable:
        raise ValueError(
            f"label-reading terms {trainable} own trainable modules that a rank without labelled samples leaves "
            "unused: wrap the distiller in DistributedDataParallel(..., find_unused_parameters=True)"
        )


def deprecated_trainer_alias(old_name: str, **fixed: Any) -> Callable[..., DistillationTrainer]:
    """A deprecated trainer name kept as a function building :class:`DistillationTrainer` (one warning per call).

    Args:
        old_name: the old class name, e.g. ``"AdversarialDistillationTrainer"``.
        fixed: arguments the old class implied, e.g. ``semi_supervised=True``.
    """
    use = "kd_components.DistillationTrainer" + "".join(f", {k}={v!r}" for k, v in fixed.items())

    def alias(*args: Any, **kwargs: Any) -> DistillationTrainer:
        warnings.warn(f"{old_name} is deprecated: use {use}", DeprecationWarning, stacklevel=2)
        return DistillationTrainer(*args, **fixed, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated: ``{use}`` (the same arguments). Returns a :class:`DistillationTrainer`."
    return alias
