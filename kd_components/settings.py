"""The settings a student was trained with, recorded beside its weights so inference uses the same ones.

Training writes ``<ckpt stem>_settings.json`` (e.g. ``models/model_settings.json``) next to the checkpoint each time
:class:`kd_components.AtomicCheckpointSaver` writes the checkpoint (``settings=`` argument); every bundle's
``inference.json`` reads it with the standard library only, so MONAI Label and users without this package run the
student at the image size it was trained at:

.. code-block:: json

    "settings_path": "$os.path.splitext(@ckpt_path)[0] + '_settings.json'",
    "trained_settings": "$json.loads(pathlib.Path(@settings_path).read_text())
                         if os.path.isfile(@settings_path) else {}",
    "image_size": "$@trained_settings.get('image_size', [352, 352])"

A ``--image_size`` given on the command line still wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SETTINGS_SUFFIX", "trained_settings_path", "write_trained_settings", "read_trained_settings"]

SETTINGS_SUFFIX = "_settings.json"
"""What replaces a checkpoint's ``.pt`` in the name of its settings file."""


def trained_settings_path(ckpt_path: str | os.PathLike) -> Path:
    """The settings file that belongs to ``ckpt_path`` (``models/model.pt`` -> ``models/model_settings.json``)."""
    path = Path(ckpt_path)
    return path.with_name(path.stem + SETTINGS_SUFFIX)


def _jsonable(value: Any) -> Any:
    """``value`` with tuples, tensors and numpy values turned into JSON types (lists, numbers)."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_trained_settings(ckpt_path: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write ``settings`` as JSON beside ``ckpt_path``, atomically (temporary file, then ``os.replace``).

    Args:
        ckpt_path: the checkpoint the settings describe (it need not exist yet).
        settings: JSON-able values (tuples, tensors and numpy values are converted), e.g.
            ``{"image_size": [352, 352]}``.

    Returns:
        the settings file written.
    """
    target = trained_settings_path(ckpt_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(dict(settings)), indent=4, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_trained_settings(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """The settings recorded beside ``ckpt_path``, or ``{}`` when there are none (weights from elsewhere)."""
    path = trained_settings_path(ckpt_path)
    return json.loads(path.read_text()) if path.is_file() else {}
