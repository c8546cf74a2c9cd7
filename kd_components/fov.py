"""Restrict evaluation to a field of view (FOV): pixels outside it count as neither false positive nor negative.

Retinal fundus images (DRIVE, CHASE_DB1) are only imaged inside a circular camera aperture; the standard protocol
scores vessel segmentation inside that aperture only. The vessel preparers of :mod:`kd_components.data.vessels`
write a 0/1 FOV mask per fundus image (datalist entries carry ``"fov"``); X-ray angiograms have none, as they are
imaged everywhere. :class:`ApplyFOVd` zeroes the one-hot prediction and label outside the FOV after MONAI's
post-processing, so every metric that follows (Dice, IoU, HD95, clDice on the foreground channels) ignores those
pixels; an entry without a FOV passes through unchanged (the whole image counts).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["ApplyFOVd"]


class ApplyFOVd(MapTransform):
    """Multiply each of ``keys`` by the binary field of view ``data[fov_key]`` when the entry has one.

    Use it in evaluation post-processing after ``AsDiscreted`` (argmax / one-hot) on the prediction and the label:
    a pixel outside the FOV is then background-free and foreground-free in both, so it is neither a false
    positive nor a false negative for foreground metrics (``include_background=False``). Entries without
    ``fov_key`` (e.g. X-ray images) are returned unchanged, so one pipeline serves datalists with and without FOV.

    Args:
        keys: the tensors to mask, each ``(C, *spatial)`` (e.g. one-hot ``pred`` and ``label``).
        fov_key: the key of the FOV mask, ``(1, *spatial)`` or ``(*spatial)``; values ``> 0`` are inside.
            The masked tensors keep their type and meta data.
        allow_missing_keys: do not fail when one of ``keys`` is absent.

    Raises:
        ValueError: when the FOV's spatial shape differs from a masked tensor's, naming the FOV file.
    """

    def __init__(self, keys: KeysCollection, fov_key: str = "fov", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fov_key = fov_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        fov = d.get(self.fov_key)
        if fov is None:
            return d
        if isinstance(fov, (str, bytes)):
            raise ValueError(
                f"the {self.fov_key!r} entry is the path {fov!r}, not an image: load it first (LoadImaged and "
                f"EnsureChannelFirstd with keys including {self.fov_key!r}, allow_missing_keys=true)"
            )
        fov_tensor = fov.as_tensor() if isinstance(fov, MetaTensor) else torch.as_tensor(fov)
        source = getattr(fov, "meta", {}).get("filename_or_obj", f"the {self.fov_key!r} entry")
        for key in self.key_iterator(d):
            value = d[key]
            inside = fov_tensor[0] if fov_tensor.dim() == value.dim() and fov_tensor.shape[0] == 1 else fov_tensor
            if tuple(value.shape[1:]) != tuple(inside.shape):
                raise ValueError(
                    f"field of view {source} has shape {tuple(fov_tensor.shape)} but {key!r} has spatial shape "
                    f"{tuple(value.shape[1:])}. To fix: give the FOV mask the size of its image (the vessel preparers "
                    "write it so), one channel, and apply the same spatial transforms to it as to the label"
                )
            d[key] = value * (inside > 0).to(device=value.device, dtype=value.dtype).unsqueeze(0)
        return d
