"""Transforms that check data the way a bundle needs it, with errors naming the file at fault."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["CheckLabelRanged"]


class CheckLabelRanged(MapTransform):
    """Fail clearly when a label map holds values other than the class indices ``0 .. num_classes - 1``.

    A mask saved as 0/255, or with a class the network has no output for, would otherwise train silently on
    wrong targets (one-hot encoding maps out-of-range values to nothing). Put it in the deterministic part of
    the preprocessing so that, with a ``CacheDataset``, each file is checked once.

    Args:
        keys: the label keys to check.
        num_classes: the number of classes, background included.
        allow_missing_keys: do not fail when a key is absent.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            values = torch.unique(label)
            bad = values[(values < 0) | (values > self.num_classes - 1) | (values != torch.round(values))]
            if bad.numel():
                source = getattr(d[key], "meta", {}).get("filename_or_obj", f"the {key!r} entry")
                raise ValueError(
                    f"label {source} holds values {bad.tolist()[:10]} outside the class indices "
                    f"0..{self.num_classes - 1}. To fix: save masks as class indices (e.g. 0/1, not 0/255; the "
                    "preparation scripts in kd_components.data do this), or set num_classes to the number of classes."
                )
        return d
