"""Semi-supervised distillation (Graph Flow's dual-efficient paradigm): KD on every sample, supervision on some.

Pieces, in the order a bundle uses them:

- :func:`split_labelled`: keep the labels of a seeded fraction of a datalist, drop the others;
- :class:`PlaceholderLabeld`: give unlabelled samples an all-zero label (so batches collate) and every sample a
  ``labelled`` flag, which the loader collates into a (B,) bool mask;
- :class:`SemiSupervisedDistillationTrainer`: supervised loss on the labelled samples only, distillation terms on
  all of them; :class:`SemiSupervisedAdversarialDistillationTrainer` adds the discriminator steps (Graph Flow's
  unified framework trained semi-supervised).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.config import KeysCollection
from monai.transforms import MapTransform
from torch import nn
from torch.optim import Optimizer

from kd_components.adversarial_trainer import AdversarialDistillationTrainer, discriminator_value_name
from kd_components.distiller import Distiller
from kd_components.terms import DistillationTerm
from kd_components.trainer import SUPERVISED, DistillationTrainer

__all__ = [
    "LABELLED",
    "PlaceholderLabeld",
    "SemiSupervisedAdversarialDistillationTrainer",
    "SemiSupervisedDistillationTrainer",
    "labelled_only",
    "split_labelled",
]

LABELLED = "labelled"
"""Default key of the per-sample flag (a bool; collated into a (B,) bool tensor)."""


def split_labelled(
    datalist: Sequence[Mapping[str, Any]],
    labelled_fraction: float,
    seed: int = 0,
    label_key: str = "label",
    flag_key: str = LABELLED,
) -> list[dict[str, Any]]:
    """Keep the labels of a seeded random fraction of a datalist; the other items lose theirs.

    Items that have no ``label_key`` are unlabelled from the start; the fraction applies to the items that have
    one: ``round(fraction · n)`` of them (at least one when ``fraction > 0``) keep it. The choice depends only on
    ``seed``, ``labelled_fraction`` and the order of ``datalist``. Every returned item is a copy carrying
    ``flag_key``: ``True`` when it kept its label, ``False`` otherwise (the unlabelled items have no ``label_key``).

    Args:
        datalist: items like ``{"image": path, "label": path}`` (e.g. a MONAI datalist's training section).
        labelled_fraction: fraction in [0, 1] of the labelled items that keep their label.
        seed: the seed of the choice.
        label_key: the key of the label.
        flag_key: the key of the flag added to every item.

    Returns:
        the items in their original order.

    Raises:
        ValueError: when ``labelled_fraction`` is outside [0, 1].
    """
    if not 0.0 <= float(labelled_fraction) <= 1.0:
        raise ValueError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
    with_label = [i for i, item in enumerate(datalist) if item.get(label_key) is not None]
    count = round(labelled_fraction * len(with_label))
    if labelled_fraction > 0 and with_label:
        count = max(1, count)
    keep = set(random.Random(seed).sample(with_label, count))
    out = []
    for i, item in enumerate(datalist):
        item = dict(item)
        if i not in keep:
            item.pop(label_key, None)
        item[flag_key] = i in keep
        out.append(item)
    return out


def labelled_only(
    datalist: Sequence[Mapping[str, Any]], flag_key: str = LABELLED, same_length: bool = True
) -> list[dict[str, Any]]:
    """The labelled items of a :func:`split_labelled` datalist: the training data of the student-alone baseline.

    With ``same_length`` the labelled items are repeated, in order, until the list is as long as ``datalist``, so
    that an epoch of the labelled-only baseline has as many samples, batches and optimizer steps as an epoch of the
    semi-supervised run on the whole list. Without it, the baseline would take several times fewer steps at the same
    number of epochs, and a semi-supervised gain would partly be a longer training.

    Args:
        datalist: items carrying ``flag_key`` (``True`` for the items that kept their label).
        flag_key: the key of the flag.
        same_length: repeat the labelled items to ``len(datalist)`` items.

    Returns:
        copies of the labelled items.

    Raises:
        ValueError: when no item is labelled.
    """
    labelled = [dict(item) for item in datalist if item.get(flag_key, False)]
    if not labelled:
        raise ValueError(f"no item of the datalist is labelled ({flag_key!r} is never true): raise labelled_fraction")
    if not same_length:
        return labelled
    return [dict(labelled[i % len(labelled)]) for i in range(len(datalist))]


class PlaceholderLabeld(MapTransform):
    """Give a sample without a label an all-zero placeholder label, and every sample a ``labelled`` flag.

    The placeholder has one channel and the spatial size (and metadata) of ``reference_key``'s image, so it goes
    through the same spatial transforms and collates with real labels; the flag (a bool tensor, collated into a
    (B,) mask) tells the trainer to ignore it. A sample whose flag is already ``False`` (e.g. from
    :func:`split_labelled`) stays unlabelled even if it has a label. Place it after the image is loaded and made
    channel-first, with ``allow_missing_keys=True`` on the transforms before it that name the label::

        {"_target_": "LoadImaged", "keys": ["image", "label"], "allow_missing_keys": true},
        {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"], "allow_missing_keys": true},
        {"_target_": "kd_components.semisupervised.PlaceholderLabeld", "keys": "label"}

    Args:
        keys: the label key(s).
        reference_key: the channel-first image whose spatial size the placeholder takes.
        flag_key: the key of the flag.
        allow_missing_keys: unused (missing labels are what this transform handles); kept for MONAI's signature.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        reference_key: str = "image",
        flag_key: str = LABELLED,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.reference_key = reference_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        labelled = bool(d.get(self.flag_key, True))
        for key in self.keys:
            if d.get(key) is None:
                labelled = False
                reference = d[self.reference_key]
                d[key] = torch.zeros_like(torch.as_tensor(reference)[:1])
        d[self.flag_key] = torch.tensor(labelled)
        return d


class SemiSupervisedDistillationTrainer(DistillationTrainer):
    """Distillation on a mix of labelled and unlabelled samples: supervision where there is a label, KD everywhere.

    Graph Flow's "dual-efficient" paradigm: the student learns from labelled samples through the supervised loss
    and the distillation terms, and from unlabelled samples through the distillation terms only (the teacher is
    the only signal). Batches carry a per-sample flag under ``labelled_key`` (a (B,) bool tensor, e.g. from
    :class:`PlaceholderLabeld`); unlabelled samples carry a placeholder label that is never used. Each iteration:

    - the supervised loss is ``loss_function(pred[m], label[m]).mean()`` on the labelled samples ``m`` only; a
      batch without labelled samples gets 0 (a constant, no graph) and ``loss_function`` is not called;
    - every term that does not read ``label`` is computed on all samples;
    - terms that read ``label`` (IFVD, IDD, EMKD region affinity, a label-conditioned discriminator, ...) are
      computed on the labelled samples only, and count 0 in a batch without any (``label_terms="labelled"``);
      ``label_terms="error"`` refuses them instead.

    Reported values: the engine output has every term as usual (0 for skipped ones). The epoch means of the
    supervised loss and of the label-reading terms (``train_supervised``, ``train_<term>``) average the batches
    that had labelled samples only (NaN in an epoch without any); ``train_labelled_fraction`` is the epoch's
    fraction of labelled samples. Metrics computed by ``key_train_metric`` see the placeholder labels of the
    unlabelled samples: judge the student on the validation set.

    DDP: with a label-reading term that owns trainable modules (e.g. an ``align`` adapter), a rank whose batch has
    no labelled sample does not use them; wrap the distiller with ``find_unused_parameters=True``.

    Args:
        device: the device the engine runs on.
        max_epochs: number of training epochs.
        train_data_loader: loader of batches with ``labelled_key``.
        network: the student network (possibly wrapped in ``DistributedDataParallel``).
        optimizer: the optimizer of the student and of ``distiller.parameters()``.
        loss_function: the supervised loss ``(pred, label) -> loss``, called on the labelled samples only.
        teacher: the trained teacher network; frozen here.
        distiller: the :class:`~kd_components.Distiller`; at least one term must not read ``label``.
        labelled_key: the batch key of the per-sample flag.
        label_terms: ``"labelled"`` (compute label-reading terms on the labelled samples) or ``"error"``.
        kwargs: every other argument of :class:`~kd_components.DistillationTrainer`.

    Raises:
        ValueError: when every term reads ``label`` (unlabelled samples would teach nothing), when a term reads
            ``label`` and ``label_terms="error"``, or when DDP would miss the unused modules of such a term.
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
        labelled_key: str = LABELLED,
        label_terms: str = "labelled",
        **kwargs: Any,
    ) -> None:
        if label_terms not in ("labelled", "error"):
            raise ValueError(f"label_terms must be 'labelled' or 'error', got {label_terms!r}")
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
        self.labelled_key = labelled_key
        names = [t.name for t in self._terms.terms]
        self._label_terms = [t.name for t in self._terms.terms if t.uses("label")]
        self._other_terms = [n for n in names if n not in self._label_terms]
        if self._label_terms and label_terms == "error":
            raise ValueError(
                f"terms {self._label_terms} read 'label', which unlabelled samples do not have. Remove them, or "
                'set label_terms="labelled" to compute them on the labelled samples of each batch only.'
            )
        if not self._other_terms:
            raise ValueError(
                f"every distillation term reads 'label' ({self._label_terms}): unlabelled samples would teach the "
                "student nothing. Add a term that reads only the networks' outputs or taps (e.g. logit KD)."
            )
        _check_ddp(distiller, [t for t in self._terms.terms if t.name in self._label_terms])
        self._labelled_only = {SUPERVISED, *self._label_terms, *map(discriminator_value_name, self._label_terms)}
        self._mask: torch.Tensor | None = None
        self._labelled_sums: dict[str, torch.Tensor] = {}
        self._labelled_batches = 0
        self._samples = [0, 0]  # labelled, all in this epoch
        self.add_event_handler(Events.ITERATION_STARTED, self._read_mask)

    def _read_mask(self) -> None:
        batch = self.state.batch
        if not isinstance(batch, Mapping) or self.labelled_key not in batch:
            raise KeyError(
                f"semi-supervised batches need a per-sample {self.labelled_key!r} flag: add "
                "kd_components.semisupervised.PlaceholderLabeld to the training transforms (and split the datalist "
                "with kd_components.semisupervised.split_labelled)"
            )
        mask = torch.as_tensor(batch[self.labelled_key]).reshape(-1).bool()
        self._mask = mask.to(self.state.device)
        self._samples[0] += int(mask.sum())
        self._samples[1] += mask.numel()

    def _labelled(self, x: torch.Tensor) -> torch.Tensor:
        """The labelled samples of a batch-first tensor (a plain tensor: metadata does not follow a mask)."""
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x[self._mask]

    def _supervised_value(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The supervised loss on the labelled samples; 0 without calling the loss when there are none."""
        mask = self._mask
        if mask.numel() != pred.shape[0]:
            raise ValueError(f"{self.labelled_key!r} holds {mask.numel()} flags for a batch of {pred.shape[0]}")
        if bool(mask.all()):
            return super()._supervised_value(pred, label)
        if not bool(mask.any()):
            return torch.zeros((), device=pred.device)
        return super()._supervised_value(self._labelled(pred), self._labelled(label))

    def _sources_for_term(
        self, term: DistillationTerm, sources: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """All sources for a term that does not read ``label``; the labelled samples (or ``None``) for one that does."""
        if term.name not in self._label_terms or bool(self._mask.all()):
            return sources
        if not bool(self._mask.any()):
            return None
        batch = self._mask.numel()
        return {k: self._labelled(v) if v.dim() > 0 and v.shape[0] == batch else v for k, v in sources.items()}

    def _term_values(self, sources: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Label-free terms on every sample; label-reading terms on the labelled ones (0 when there are none)."""
        if not self._label_terms or bool(self._mask.all()):
            return super()._term_values(sources)
        values = self.distiller(sources, names=self._other_terms)
        label_term = next(t for t in self._terms.terms if t.name in self._label_terms)
        labelled = self._sources_for_term(label_term, sources)
        if labelled is None:
            zero = torch.zeros((), device=sources["student"].device)
            values.update({name: zero for name in self._label_terms})
        else:
            values.update(self.distiller(labelled, names=self._label_terms))
        return {t.name: values[t.name] for t in self._terms.terms}

    def _accumulate(self, terms: dict[str, torch.Tensor]) -> None:
        super()._accumulate(terms)
        if self._mask is not None and bool(self._mask.any()):
            for name in self._labelled_only.intersection(terms):
                self._labelled_sums[name] = self._labelled_sums.get(name, 0.0) + terms[name].float()
            self._labelled_batches += 1

    def _reset_epoch_means(self) -> None:
        super()._reset_epoch_means()
        self._labelled_sums, self._labelled_batches, self._samples = {}, 0, [0, 0]

    def _write_epoch_means(self) -> None:
        super()._write_epoch_means()
        for name in self._labelled_only:
            if f"train_{name}" in self.state.metrics:
                total = self._labelled_sums.get(name)
                mean = float(total) / self._labelled_batches if total is not None else math.nan
                self.state.metrics[f"train_{name}"] = mean
        self.state.metrics["train_labelled_fraction"] = self._samples[0] / max(self._samples[1], 1)


class SemiSupervisedAdversarialDistillationTrainer(SemiSupervisedDistillationTrainer, AdversarialDistillationTrainer):
    """Semi-supervised distillation with discriminator steps: Graph Flow's unified framework, dual-efficient.

    Combines :class:`SemiSupervisedDistillationTrainer` (supervised loss on labelled samples only) and
    :class:`~kd_components.adversarial_trainer.AdversarialDistillationTrainer` (discriminator steps before the
    generator terms). An adversarial term on network outputs (Graph Flow: teacher vs student logits) trains its
    discriminator on every sample; one that reads ``label`` (e.g. LightVessel's ASD, label-conditioned) trains it
    on the labelled samples only and skips its discriminator step in a batch without any.

    Args:
        kwargs: the arguments of both trainers (``discriminator_optimizer``, ``discriminator_steps``,
            ``labelled_key``, ``label_terms``, ...).
    """


def _check_ddp(distiller: nn.Module, label_terms: list[DistillationTerm]) -> None:
    """Refuse a DDP distiller that would wait for gradients of skipped label-reading terms."""
    if not isinstance(distiller, nn.parallel.DistributedDataParallel) or distiller.find_unused_parameters:
        return
    trainable = [t.name for t in label_terms if any(p.requires_grad for p in t.parameters())]
    if trainable:
        raise ValueError(
            f"label-reading terms {trainable} own trainable modules that a rank without labelled samples leaves "
            "unused: wrap the distiller in DistributedDataParallel(..., find_unused_parameters=True)"
        )
