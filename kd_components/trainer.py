"""DistillationTrainer: MONAI's SupervisedTrainer with a frozen teacher and weighted distillation terms."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
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
from kd_components.ensemble import EnsembleTeacher
from kd_components.taps import FeatureTaps, unwrap_network
from kd_components.terms import DistillationTerm
from kd_components.utils import count_parameters, freeze

__all__ = ["DistillationTrainer", "SUPERVISED", "BALANCED_WEIGHTS_KEY", "balanced_weight_key", "term_output_key"]

SUPERVISED = "supervised"
"""Name under which the supervised loss is reported beside the distillation terms."""

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


logger = logging.getLogger(__name__)


def _plain(x: Any) -> Any:
    """Drop MONAI's metadata wrapper (keeps autograd) so losses run on plain tensors."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class DistillationTrainer(SupervisedTrainer):
    """Train a student with its supervised loss plus weighted distillation terms from a frozen teacher.

    The training loop is MONAI's :class:`~monai.engines.SupervisedTrainer` unchanged (AMP, gradient accumulation,
    events, handlers); the trainer only supplies the loss. For each iteration, inside the same autocast as the
    student:

    1. the student runs (by ``SupervisedTrainer``); forward hooks record the student taps the terms read;
    2. the teacher runs once, in eval mode and without autograd, recording its taps;
    3. the loss is ``supervised_weight * loss_function(pred, label)`` plus each term's scheduled weight times
       its value; every tap is released as soon as the loss is built.

    The engine output carries the total under ``"loss"`` and every unweighted term under ``"loss_<name>"``
    (the supervised loss as ``"loss_supervised"``); at the end of each epoch, their epoch means are written to
    ``engine.state.metrics`` as ``train_<name>`` so that ``StatsHandler`` and ``MLFlowHandler``
    (``--tracking mlflow``) record them. Any ``MLFlowHandler`` among ``train_handlers`` also records the
    distillation settings as run parameters.

    Automatic term balancing (optional, off by default: ``balance_iterations=0`` changes nothing). With
    ``balance_iterations=N``:

    - during the first ``N`` training iterations the distillation terms have weight **0** (they are computed,
      reported and kept in the graph with a zero factor, so the student learns from the supervised loss alone);
      in each of these iterations the trainer measures ``g_sup = ‖∇_θ L_sup‖₂`` and, for every term,
      ``g_i = ‖∇_θ L_i‖₂``: the gradient norms of the *unweighted* values with respect to the student's trainable
      parameters ``θ`` (``torch.autograd.grad(..., retain_graph=True)``, outside autocast; with AMP the values are
      unscaled, as is every value the terms return). Adapters and other distiller modules are not in ``θ``;
    - at the end of iteration ``N`` each term's weight is set from the means of the norms over those iterations
      so that its weighted gradient norm is ``ratio_i`` times that of the weighted supervised loss:
      ``w_i = ratio_i · supervised_weight · mean(g_sup) / mean(g_i)``, and then frozen for the rest of training.
      ``ratio_i`` is ``balance_ratio`` when given, otherwise the term's configured ``weight`` read as a target
      ratio (so ``"weight": 0.5`` asks for half the supervised gradient). A term's ``schedule`` still multiplies the
      balanced weight (a warm-up ramps it in as before);
    - a value without a graph in an iteration (e.g. a semi-supervised batch without labels) is left out of that
      norm's mean; a term whose mean norm is 0 (it does not reach the student's parameters, or was never
      measured) keeps its configured weight, with a warning, as do all terms when the supervised loss was never
      measured;
    - the weights are logged (``logger.info``), written to ``engine.state.metrics`` as
      ``"kd.<term>.balanced_weight"`` (recorded at every epoch by ``StatsHandler`` / ``MLFlowHandler``), exposed
      as :attr:`balanced_weights` and kept in ``engine.state.kd_balanced_weights``, a key of
      ``trainer.state_dict()``: a run resumed with MONAI's ``CheckpointLoader`` (``load_dict`` with the trainer)
      restores them and does not measure again. The mean norms are in :attr:`balance_norms`.

    Measuring costs one extra backward pass per value (supervised + each term) in each of the ``N`` iterations
    only. Under DDP the norms' means are averaged over the ranks, so every rank uses the same weights. It works
    with the adversarial and semi-supervised subclasses (it balances the student-side terms; discriminator losses
    are not terms).

    Args:
        device: the device the engine runs on.
        max_epochs: number of training epochs.
        train_data_loader: the training data loader.
        network: the student network (possibly wrapped in ``DistributedDataParallel``).
        optimizer: the optimizer of the student and of ``distiller.parameters()``; the teacher must not be in it.
        loss_function: the supervised loss ``(pred, label) -> loss``.
        teacher: the trained teacher network; it is frozen here (eval mode, ``requires_grad=False``).
        distiller: the :class:`Distiller` holding the terms (possibly wrapped in ``DistributedDataParallel``).
        supervised_weight: the weight of the supervised loss (e.g. ``1 - alpha`` in KDAS).
        check_finite: raise a clear error naming the term when the loss becomes NaN or infinite.
        train_handlers: handlers attached after the trainer's own bookkeeping handlers.
        balance_iterations: the number ``N`` of first training iterations over which the gradient norms are
            measured before the term weights are set and frozen; 0 (default) turns balancing off.
        balance_ratio: the target ratio of every term's weighted gradient norm to the weighted supervised loss's;
            ``None`` (default): each term's configured ``weight`` is its own target ratio.
        kwargs: every other argument of :class:`~monai.engines.SupervisedTrainer`.

    Raises:
        ValueError: when the teacher's parameters are in the optimizer, when trainable distillation modules
            (adapters) are missing from it, or when the balancing arguments are invalid (negative
            ``balance_iterations``, non-positive ``balance_ratio``, balancing with ``supervised_weight=0``).
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
        supervised_weight: float = 1.0,
        check_finite: bool = True,
        train_handlers: Sequence | None = None,
        balance_iterations: int = 0,
        balance_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        _check_balance_args(balance_iterations, balance_ratio, supervised_weight)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=self._distillation_loss,
            train_handlers=None,
            **kwargs,
        )
        self.supervised_loss = loss_function
        self.supervised_weight = float(supervised_weight)
        self.check_finite = check_finite
        self.teacher = freeze(teacher)
        self.distiller = distiller
        terms = unwrap_network(distiller)
        if not isinstance(terms, Distiller):
            raise TypeError(f"distiller must be a kd_components.Distiller, got {type(terms).__name__}")
        self._terms = terms
        if any(t.name == SUPERVISED for t in terms.terms):
            raise ValueError(f"{SUPERVISED!r} is reserved for the supervised loss: rename that distillation term")
        _check_optimizer(optimizer, teacher, terms)
        self._needs_teacher = terms.uses("teacher")
        self.student_taps = FeatureTaps(network, terms.taps("student"), owner="student", active=False)
        self.teacher_taps = FeatureTaps(teacher, terms.taps("teacher"), owner="teacher", active=False)
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
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
        self.add_event_handler(Events.ITERATION_STARTED, self._start_recording)
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

    def distillation_settings(self) -> dict[str, Any]:
        """The distillation setup as flat ``{name: value}`` parameters (recorded in MLflow)."""
        settings: dict[str, Any] = {
            "kd.teacher": type(unwrap_network(self.teacher)).__name__,
            "kd.teacher_params": count_parameters(self.teacher),
            "kd.student": type(unwrap_network(self.network)).__name__,
            "kd.student_params": count_parameters(self.network),
            "kd.supervised_weight": self.supervised_weight,
            "kd.terms": ",".join(t.name for t in self._terms.terms),
        }
        teacher = unwrap_network(self.teacher)
        if isinstance(teacher, EnsembleTeacher):
            settings["kd.teacher_ensemble"] = teacher.describe()
        if self.balance_iterations:
            settings["kd.balance_iterations"] = self.balance_iterations
            settings["kd.balance_ratio"] = "term weights" if self.balance_ratio is None else self.balance_ratio
        for term in self._terms.terms:
            prefix = f"kd.{term.name}"
            settings[f"{prefix}.loss"] = _describe(term.loss)
            settings[f"{prefix}.weight"] = term.weight
            settings[f"{prefix}.inputs"] = ", ".join(f"{a}={s}" for a, s in term.inputs.items())
            if term.schedule is not None:
                settings[f"{prefix}.schedule"] = repr(term.schedule)
            if term.align:
                settings[f"{prefix}.align"] = ", ".join(f"{a}->{r}" for a, r in term.align.items())
        return settings

    def _distillation_loss(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The loss ``SupervisedTrainer`` calls after the student's forward pass (inside its autocast)."""
        image = self.state.output[Keys.IMAGE]
        sources: dict[str, torch.Tensor] = {"student": _plain(pred), "label": _plain(label), "image": _plain(image)}
        try:
            for name in self.student_taps.names:
                sources[f"student:{name}"] = _plain(self.student_taps[name])
            if self._needs_teacher:
                self.teacher.eval()
                self.teacher_taps.active = True
                with torch.no_grad():  # not inference_mode: terms may save teacher tensors for backward
                    sources["teacher"] = _plain(self.inferer(_plain(image), self.teacher))
                for name in self.teacher_taps.names:
                    sources[f"teacher:{name}"] = _plain(self.teacher_taps[name])
            supervised = self._supervised_value(pred, label)
            extra = self._before_terms(sources)
            values = self._term_values(sources)
        finally:
            for taps in (self.student_taps, self.teacher_taps):
                taps.active = False
                taps.clear()
        total = self.supervised_weight * supervised
        for term in self._terms.terms:
            total = total + self._term_weight(term) * values[term.name]
        if self._measuring():
            self._measure_gradient_norms(supervised, values, pred.device.type)
        terms = {SUPERVISED: supervised.detach(), **{k: v.detach() for k, v in values.items()}}
        terms.update({k: v.detach() for k, v in extra.items()})  # reported only, not part of the total
        for name, value in terms.items():
            self.state.output[term_output_key(name)] = value
        if self.check_finite:  # checked in _check_finite_loss, without a host sync here
            self._pending_check = (torch.isfinite(total.detach()), terms)
        self._accumulate(terms)
        return total

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

    # Hooks for subclasses (adversarial, semi-supervised trainers); the defaults are the plain behaviour.

    def _supervised_value(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The unweighted supervised loss of the batch (a scalar): ``loss_function(pred, label).mean()``."""
        return self.supervised_loss(pred, label).mean()

    def _before_terms(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called once per iteration when ``sources`` holds both networks' outputs and taps, before the terms.

        Returns extra values to report (engine output ``loss_<name>``, epoch means ``train_<name>``) that are not
        part of the loss, e.g. a discriminator step's loss. Default: nothing.
        """
        return {}

    def _term_values(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted value of every distillation term, ``{term name: scalar}``: ``distiller(sources)``."""
        return self.distiller(sources)

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
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.float()
        self._count += 1

    def _start_recording(self) -> None:
        """Record the student's taps during this iteration's training forward pass only."""
        self.student_taps.clear()
        self.student_taps.active = True

    def _reset_epoch_means(self) -> None:
        self._sums = {}
        self._count = 0

    def _write_epoch_means(self) -> None:
        for name, total in self._sums.items():
            self.state.metrics[f"train_{name}"] = float(total) / max(self._count, 1)
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


def _check_optimizer(optimizer: Optimizer, teacher: nn.Module, distiller: Distiller) -> None:
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) in in_optimizer for p in teacher.parameters()):
        raise ValueError(
            "the teacher's parameters are in the optimizer: the teacher must stay frozen. Build the optimizer from "
            "the student's and the distiller's parameters only, e.g. "
            '"params": "$list(@network.parameters()) + list(@distiller.parameters())".'
        )
    missing = [n for n, p in distiller.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"trainable distillation modules are not in the optimizer (e.g. {missing[:3]}): they would never learn. "
            'Add them: "params": "$list(@network.parameters()) + list(@distiller.parameters())".'
        )
