"""Transforms that check data the way a bundle needs it, with errors naming the file at fault."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

__all__ = ["CheckLabelRanged", "CheckChannelsd", "LoadCheckedImaged"]


def _source(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """The file a loaded item came from (its metadata), or a description of the entry."""
    meta = getattr(data.get(key), "meta", None) or data.get(f"{key}_meta_dict") or {}
    return str(meta.get("filename_or_obj", f"the {key!r} entry"))


def _entry(data: Mapping[Hashable, Any]) -> str:
    """A short description of a datalist entry: its file paths."""
    files = [str(v) for v in data.values() if isinstance(v, (str, bytes)) or hasattr(v, "__fspath__")]
    return ", ".join(files) or repr(dict(data))[:200]


class LoadCheckedImaged(LoadImaged):
    """MONAI's ``LoadImaged`` (same arguments) whose errors name the datalist entry and file at fault.

    - an entry without one of ``keys`` (e.g. no ``"label"``) fails with the entry's files and the missing key,
      instead of a bare ``KeyError`` (unless ``allow_missing_keys``);
    - a file that cannot be read (truncated, corrupt, not an image) fails naming the file and the fix.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        if not self.allow_missing_keys:
            missing = [k for k in self.keys if k not in data]
            if missing:
                raise ValueError(
                    f"datalist entry ({_entry(data)}) has no {missing} key. To fix: give every entry of the datalist "
                    f"an {' and a '.join(map(repr, missing))} file (re-run the bundle's preparation command)."
                )
        try:
            return super().__call__(data, reader)
        except Exception as err:
            files = [str(data[k]) for k in self.keys if k in data]
            broken = []
            for file in files:  # which file fails on its own
                try:
                    self._loader(file, reader)
                except Exception:
                    broken.append(file)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"could not read {' / '.join(broken or files)} ({reason}). The file is truncated, corrupt or not an "
                "image. To fix: re-export or re-download it, or remove its entry from the datalist."
            ) from err


class CheckChannelsd(MapTransform):
    """Fail clearly when an image (after ``EnsureChannelFirstd``) has another channel count than the network takes.

    A greyscale or RGBA file among RGB images otherwise fails later inside batch collation or the first
    convolution, naming no file.

    Args:
        keys: the image keys to check.
        channels: the number of channels the network takes (e.g. ``"$@network_def.in_channels"``).
        key_hint: the config key that sets ``channels`` (named in the message).
        allow_missing_keys: do not fail when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int,
        key_hint: str = "network_def#in_channels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)
        self.key_hint = key_hint

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            found = int(d[key].shape[0])
            if found != self.channels:
                raise ValueError(
                    f"image {_source(d, key)} has {found} channel(s), the network takes {self.channels} "
                    f"({self.key_hint}). To fix: convert it ({'RGB' if self.channels == 3 else 'greyscale'}) and "
                    f"re-run the preparation command, or set {self.key_hint} to the channels of the data."
                )
        return d


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
