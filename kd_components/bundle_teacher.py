"""Any MONAI bundle as the teacher: its own ``network_def`` and ``models/model.pt``, checked against the student's task.

A model-zoo bundle (downloaded with ``python -m monai.bundle download``) or one trained here can teach a student
without copying its architecture into ``teacher_def``:

.. code-block:: bash

    python -m monai.bundle run --config_file configs/train.json \\
        --teacher "\\$kd_components.load_bundle_teacher('/models/my_teacher_bundle', @device, \\
                   num_classes=@num_classes, in_channels=@network_def.in_channels, \\
                   probe_shape=[1, @network_def.in_channels] + list(@image_size))"

The bundle's outputs must fit the student's task: the same number of output channels (``num_classes``), the same
input channels, and, when both name them, the same labels in the same order (``channel_def`` of the bundle's
``metadata.json``). Anything else is refused with a message saying what differs, before any training.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

from kd_components.utils import load_teacher

__all__ = ["BUNDLE_CONFIGS", "BundleTeacherError", "bundle_network", "bundle_channel_def", "load_bundle_teacher"]

logger = logging.getLogger(__name__)

BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml", "train.yml")
"""The configs searched, in order, for the bundle's ``network_def``."""


class BundleTeacherError(ValueError):
    """A bundle cannot teach this student: its outputs, inputs or labels do not fit the student's task."""


def _config_file(bundle_dir: Path, config_file: str | None) -> Path:
    candidates = [config_file] if config_file else BUNDLE_CONFIGS
    for name in candidates:
        path = bundle_dir / "configs" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no {' or '.join(candidates)} in {bundle_dir / 'configs'}: is {bundle_dir} a MONAI bundle folder (with "
        "configs/ and models/)? To fix: pass the folder that `python -m monai.bundle download` created."
    )


def bundle_network(bundle_dir: str | Path, config_file: str | None = None, net_id: str = "network_def") -> nn.Module:
    """Instantiate the network ``net_id`` of a bundle's config (``inference.json`` first, else ``train.json``).

    ``bundle_root`` is set to ``bundle_dir`` and the bundle folder is on ``sys.path`` while parsing, as MONAI
    Label does, so bundles with their own ``scripts`` package work.
    """
    bundle_dir = Path(bundle_dir)
    path = _config_file(bundle_dir, config_file)
    parser = ConfigParser()
    parser.read_config(str(path))
    if net_id not in parser:
        raise KeyError(f"{path} has no {net_id!r}: pass net_id=<the id of the bundle's network>")
    parser["bundle_root"] = str(bundle_dir)
    sys.path.insert(0, str(bundle_dir))
    try:
        return parser.get_parsed_content(net_id, instantiate=True)
    finally:
        sys.path.remove(str(bundle_dir))


def bundle_channel_def(bundle_dir: str | Path) -> tuple[int | None, int | None, dict[int, str]]:
    """``(input channels, output channels, labels by channel)`` from a bundle's ``metadata.json``
    (``network_data_format``); ``None`` / ``{}`` where the metadata does not say."""
    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta_file.is_file():
        return None, None, {}
    fmt = json.loads(meta_file.read_text()).get("network_data_format", {})
    inputs = next(iter(fmt.get("inputs", {}).values()), {})
    outputs = next(iter(fmt.get("outputs", {}).values()), {})
    labels = {int(k): str(v) for k, v in outputs.get("channel_def", {}).items()}
    return inputs.get("num_channels"), outputs.get("num_channels"), labels


def _labels(labels: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    return dict(enumerate(map(str, labels)))


def _state_dict(checkpoint: Any) -> Any:
    """The network's state dict inside common checkpoint layouts: plain, ``{"model": ...}``, ``{"state_dict": ...}``."""
    if isinstance(checkpoint, Mapping) and not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        for key in ("model", "state_dict", "network"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    return checkpoint


def load_bundle_teacher(
    bundle_dir: str | Path,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    labels: Mapping[int, str] | Sequence[str] | None = None,
    probe_shape: Sequence[int] | None = None,
    config_file: str | None = None,
    net_id: str = "network_def",
    weights: str = "models/model.pt",
) -> nn.Module:
    """Load a MONAI bundle's network and weights as a frozen teacher, after checking it fits the student's task.

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/``), e.g. one ``monai.bundle download`` wrote.
        device: where the teacher runs.
        num_classes: the student's output channels; the bundle's must be equal (metadata and, with
            ``probe_shape``, the real output).
        in_channels: the student's input channels; the bundle's must be equal.
        labels: the student's labels by channel (e.g. ``{0: "background", 1: "polyp"}`` or a list); when the
            bundle's ``metadata.json`` names its channels too, the names must agree (case-insensitive).
        probe_shape: when given (e.g. ``[1, 3, 352, 352]``), run the teacher once on a random input of this shape:
            its output must be finite and have ``num_classes`` channels.
        config_file: the config holding the network (default: ``inference.json``, else ``train.json``).
        net_id: the network's id in that config.
        weights: the weights file, relative to ``bundle_dir``; a plain state dict or one under ``"model"`` /
            ``"state_dict"``; keys must match the network exactly.

    Returns:
        the teacher, frozen and in eval mode, on ``device``.

    Raises:
        FileNotFoundError: no config or no weights in ``bundle_dir``.
        BundleTeacherError: the bundle's channels or labels do not fit the student's task.
        ValueError: the weights do not fit the bundle's own network, or are not finite.
    """
    bundle_dir = Path(bundle_dir)
    name = bundle_dir.name
    meta_in, meta_out, meta_labels = bundle_channel_def(bundle_dir)
    if num_classes is not None and meta_out is not None and int(meta_out) != int(num_classes):
        raise BundleTeacherError(
            f"bundle {name} predicts {meta_out} channels ({_describe(meta_labels)}), the student {num_classes}: a "
            "teacher must predict the student's classes. To fix: use a bundle trained on the same labels, or set the "
            f"student's num_classes to {meta_out} if its task has these labels."
        )
    if in_channels is not None and meta_in is not None and int(meta_in) != int(in_channels):
        raise BundleTeacherError(
            f"bundle {name} takes {meta_in} input channels, the student {in_channels}: they must see the same images."
        )
    wanted = _labels(labels)
    if wanted and meta_labels:
        theirs = {k: v.strip().lower() for k, v in meta_labels.items()}
        ours = {k: v.strip().lower() for k, v in wanted.items()}
        if theirs != ours:
            raise BundleTeacherError(
                f"bundle {name}'s labels {_describe(meta_labels)} differ from the student's {_describe(wanted)}: "
                "the same channel must mean the same class in both. To fix: use a bundle with these labels in this "
                "order."
            )
    network = bundle_network(bundle_dir, config_file, net_id)
    ckpt = bundle_dir / weights
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"teacher weights not found: {ckpt}. To fix: download the bundle with its weights (`python -m "
            "monai.bundle download`) or train it; TorchScript-only bundles (models/model.ts) cannot teach here."
        )
    state = _state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    if state is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{ckpt} is not a state dict of {net_id} (nor one under 'model' / 'state_dict')")
    teacher = load_teacher(network, ckpt, device, probe_shape=probe_shape, state=state)
    if probe_shape is not None and num_classes is not None:
        param = next(teacher.parameters(), None)
        with torch.no_grad():
            out = teacher(torch.rand(*probe_shape, device=param.device if param is not None else "cpu"))
        out = out[0] if isinstance(out, (list, tuple)) else out
        if out.shape[1] != int(num_classes):
            raise BundleTeacherError(
                f"bundle {name}'s network gives {out.shape[1]} output channels on an input of shape "
                f"{list(probe_shape)}, the student {num_classes} (its metadata says {meta_out})."
            )
    logger.info("teacher: bundle %s (%s, %s)", name, type(teacher).__name__, ckpt)
    return teacher


def _describe(labels: Mapping[int, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(labels.items())) if labels else "labels not named"
