"""Checks a bundle's ``initialize`` runs before any data is cached or any epoch is trained."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.transforms import Compose
from torch import nn

from kd_components.taps import unwrap_network

__all__ = ["network_stride", "check_input", "require_validation_data"]


def network_stride(network: nn.Module) -> int:
    """The total down-sampling factor of an encoder-decoder with a ``strides`` attribute (MONAI ``UNet``), else 1."""
    strides = getattr(unwrap_network(network), "strides", None)
    if not strides:
        return 1
    total = 1
    for s in strides:
        total *= int(max(s)) if isinstance(s, Sequence) else int(s)
    return total


def _first_conv_channels(network: nn.Module) -> int | None:
    for module in unwrap_network(network).modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


def check_input(
    network: nn.Module,
    transforms: Sequence[Callable] | Callable | None = None,
    data: Sequence[Mapping[str, Any]] | None = None,
    spatial_size: Sequence[int] | None = None,
    size_key: str = "image_size",
    channels_key: str = "network_def#in_channels",
    image_key: str = "image",
) -> None:
    """Fail before training when the data or the input size do not fit the network, naming the key and the fix.

    - ``spatial_size`` must be divisible by the network's total stride (a MONAI ``UNet`` with strides
      ``[2, 2, 2, 2]`` needs multiples of 16; otherwise its skip connections fail in the first forward pass);
    - the first item of ``data``, through ``transforms`` (the deterministic preprocessing), must have the channel
      count of the network's first convolution; transform errors (a corrupt file, a missing key) surface here too,
      naming the file.

    Args:
        network: the network to train (e.g. ``@network_def``).
        transforms: the deterministic preprocessing (a list of transforms, or a callable).
        data: the training datalist; only its first item is loaded.
        spatial_size: the network's input size (e.g. ``@image_size``).
        size_key: the config key of ``spatial_size`` (named in the message).
        channels_key: the config key of the network's input channels (named in the message).
        image_key: the image key of the data items.

    Raises:
        ValueError: naming the key, the values and the fix.
    """
    stride = network_stride(network)
    if spatial_size is not None and stride > 1:
        sizes = [int(s) for s in spatial_size]
        if any(s % stride for s in sizes):
            fixed = [max(stride, int(math.ceil(s / stride)) * stride) for s in sizes]
            raise ValueError(
                f"{size_key} {sizes} does not fit the network: its strides down-sample by {stride}, so every size "
                f"must be a multiple of {stride}. To fix: pass --{size_key} {fixed}."
            )
    if transforms is None or not data:
        return
    pipeline = transforms if callable(transforms) else Compose(list(transforms))
    item = pipeline(dict(data[0]))
    expected = _first_conv_channels(network)
    if expected is None or image_key not in item:
        return
    found = int(item[image_key].shape[0])
    if found != expected:
        source = getattr(item[image_key], "meta", {}).get("filename_or_obj", data[0].get(image_key))
        raise ValueError(
            f"{channels_key} is {expected} but the images have {found} channel(s) (first training image: "
            f"{source}). To fix: pass --{channels_key} {found} (for every network of the bundle, teacher included), "
            "or prepare images with the expected channels."
        )


def require_validation_data(data: Sequence[Any] | None, what: str = "models/model.pt") -> None:
    """Refuse to train without validation cases: the student is saved when its validation metric improves.

    With no validation data the checkpoint saver never runs, so a run would end "successfully" without writing
    ``what``. MONAI Label's ``/train/`` with ``val_split`` 0 (or too few labels for its split) does exactly that.

    Args:
        data: the validation datalist (``@validate#dataset#data``).
        what: the file such a run would fail to write (named in the message).

    Raises:
        ValueError: when ``data`` is empty, naming the fix.
    """
    if data is None or len(data) == 0:
        raise ValueError(
            f"no validation data: the student is saved ({what}) when its validation metric improves, so this run "
            "would never save it. To fix: give validation cases (from MONAI Label: label more images and set "
            "val_split > 0 so at least one labelled image is held out; from the command line: a non-empty "
            "'validation' section in datalist.json)."
        )
