"""Semi-supervised distillation (Graph Flow's dual-efficient paradigm): KD on every sample, supervision on some.

Pieces, in the order a bundle uses them:

- :func:`split_labelled`: keep the labels of a seeded fraction of a datalist, drop the others;
- :class:`PlaceholderLabeld`: give unlabelled samples an all-zero label (so batches collate) and every sample a
  ``labelled`` flag, which the loader collates into a (B,) bool mask;
- :class:`~kd_components.DistillationTrainer` with ``semi_supervised=True``: supervised loss on the labelled
  samples only, distillation terms on all of them (adversarial terms included: Graph Flow's unified framework
  trained semi-supervised). ``SemiSupervisedDistillationTrainer`` and
  ``SemiSupervisedAdversarialDistillationTrainer`` are its deprecated aliases.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from kd_components.engines.distillation import LABELLED, deprecated_trainer_alias

__all__ = [
    "LABELLED",
    "PlaceholderLabeld",
    "SemiSupervisedAdversarialDistillationTrainer",
    "SemiSupervisedDistillationTrainer",
    "labelled_only",
    "split_labelled",
]


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


SemiSupervisedDistillationTrainer = deprecated_trainer_alias("SemiSupervisedDistillationTrainer", semi_supervised=True)
SemiSupervisedAdversarialDistillationTrainer = deprecated_trainer_alias(
    "SemiSupervisedAdversarialDistillationTrainer", semi_supervised=True
)
