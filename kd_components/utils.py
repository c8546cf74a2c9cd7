"""Helpers used from bundle configs: teacher loading, freezing, DDP wrapping, never losing a user's files."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_components.taps import unwrap_network

__all__ = [
    "count_parameters",
    "freeze",
    "load_state_dict_file",
    "load_teacher",
    "non_finite_tensors",
    "require_file",
    "state_dict_mismatch",
    "backup_existing",
    "wrap_ddp_if_trainable",
]

logger = logging.getLogger(__name__)


def count_parameters(network: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``network`` (looking through a data-parallel wrapper).

    Args:
        network: the network.
        trainable_only: count only parameters with ``requires_grad``.
    """
    params = unwrap_network(network).parameters()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def freeze(network: nn.Module) -> nn.Module:
    """Put ``network`` in eval mode and stop its parameters from recording gradients; returns it."""
    network.eval()
    network.requires_grad_(False)
    return network


def load_state_dict_file(path: str | Path, what: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``.

    Accepts a plain state dict, or a MONAI ``CheckpointSaver`` file holding several objects (its ``"model"``
    entry is used). A ``module.`` prefix left by ``DistributedDataParallel`` is removed.

    Args:
        path: the checkpoint file.
        what: how to call the file in error messages (e.g. ``"teacher checkpoint"``).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / non-weights files
        raise ValueError(f"{what} {path} could not be read as weights ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a state dict")
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected``; ``""`` if nothing.

    Args:
        expected: the module's own ``state_dict()``.
        state: the state dict read from a checkpoint.

    Returns:
        ``"missing keys [...], unexpected keys [...], shape mismatches [...]"`` (five of each at most), or ``""``.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong):
        return ""
    return f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}"


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict or checkpoint that hold NaN or Inf.

    Args:
        obj: a tensor, or mappings / lists / tuples of them (other values are ignored).
        prefix: the name of ``obj`` itself (nested names are joined with ``.`` and ``[i]``).
    """
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, Mapping):
        return [n for k, v in obj.items() for n in non_finite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in non_finite_tensors(v, f"{prefix}[{i}]")]
    return []


def require_file(path: str | Path, what: str, todo: str) -> Path:
    """Fail early, with what to do, when a file a run needs is missing.

    Args:
        path: the file.
        what: what the file is, e.g. ``"teacher checkpoint"``.
        todo: what the user should do to get it.

    Raises:
        FileNotFoundError: naming ``what``, ``path`` and ``todo``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. To fix: {todo}.")
    return path


def load_teacher(
    network: nn.Module,
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    hint: str = "",
    probe_shape: Sequence[int] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Load trained teacher weights strictly, move the teacher to ``device`` and freeze it.

    Args:
        network: the teacher architecture (e.g. the bundle's ``teacher_def``).
        checkpoint: path of the teacher's state dict, written by the bundle's teacher-training stage.
        device: where the teacher should run.
        hint: what the user should do when the file is missing (e.g. the command that trains the teacher).
        probe_shape: when given (e.g. ``[1, 3, 352, 352]``), run the loaded teacher once on a random input of this
            shape and refuse it when its output is not finite.
        state: the state dict, when the caller has already read it from ``checkpoint`` (e.g. unwrapped from a
            ``{"model": ...}`` checkpoint); ``checkpoint`` is then only named in messages.

    Raises:
        FileNotFoundError: when ``checkpoint`` does not exist.
        ValueError: when its keys or shapes do not fit ``network`` (the differing keys are listed), or its weights
            (or, with ``probe_shape``, its outputs) are not finite (a diverged teacher).
    """
    todo = hint or "train the teacher first (the bundle's teacher-training stage) or point `teacher_ckpt` to it"
    path = require_file(checkpoint, "teacher checkpoint", todo)
    if state is None:
        state = load_state_dict_file(path, "teacher checkpoint")
    mismatch = state_dict_mismatch(network.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"teacher checkpoint {path} does not fit {type(network).__name__}: {mismatch}. It was trained with "
            "another architecture: make `teacher_def` the network the teacher-training stage used."
        )
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(
            f"teacher checkpoint {path} holds NaN/Inf weights ({len(bad)} tensors, e.g. {bad[:3]}): the teacher's "
            "training diverged. To fix: retrain the teacher (lower its --learning_rate, or turn AMP off) or point "
            "`teacher_ckpt` to a good teacher."
        )
    network.load_state_dict(state)
    if device is not None:
        network.to(device)
    freeze(network)
    if probe_shape is not None:
        param = next(network.parameters(), None)
        probe = torch.rand(*probe_shape, device=param.device if param is not None else "cpu")
        with torch.no_grad():
            out = network(probe)
        outputs = out if isinstance(out, (list, tuple)) else [out]
        if not all(bool(torch.isfinite(o).all()) for o in outputs if isinstance(o, torch.Tensor)):
            raise ValueError(
                f"teacher checkpoint {path} gives NaN/Inf outputs on a random input of shape {list(probe_shape)}: the "
                "teacher's training diverged. To fix: retrain the teacher or point `teacher_ckpt` to a good teacher."
            )
    return network


def backup_existing(paths: Sequence[str | Path] | str | Path, backup_dir: str | Path | None = None) -> list[Path]:
    """Copy files a run is about to overwrite into a timestamped backup, so nothing the user made is lost.

    The originals stay in place (inference, evaluation and MONAI Label keep finding them) until the run replaces
    them atomically. Call it when the run really starts, e.g. through :class:`kd_components.BackupOnStart` in the
    trainer's handlers, for every file the run writes at a fixed path (e.g. ``models/model.pt``).

    Args:
        paths: the files the run will write.
        backup_dir: where backups go; default: a ``backup`` folder beside each file.

    Returns:
        the backup paths created (empty when nothing existed).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in map(Path, paths):
        if not p.is_file():
            continue
        folder = Path(backup_dir) if backup_dir is not None else p.parent / "backup"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{p.stem}.{stamp}{p.suffix}"
        n = 1
        while target.exists():
            target = folder / f"{p.stem}.{stamp}-{n}{p.suffix}"
            n += 1
        shutil.copy2(str(p), str(target))
        logger.warning("%s exists and may be overwritten by this run: copied to %s", p, target)
        moved.append(target)
    return moved


def wrap_ddp_if_trainable(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Wrap ``module`` in ``DistributedDataParallel`` when it has trainable parameters (adapters, discriminators).

    DDP refuses modules with nothing to train (e.g. a distiller of logit-only terms): those are returned as they
    are, moved to ``device``. Parameters the module tells DDP to ignore do not count: a
    :class:`~kd_components.Distiller` names its discriminators' (trained in their own step, through their own DDP
    wrapper: ``"discriminator": "$kd_components.wrap_ddp_if_trainable(@discriminator_def, @device)"``).

    Args:
        module: the module (e.g. the bundle's ``distiller``, or a discriminator).
        device: this rank's device; CUDA devices are passed to DDP as ``device_ids``.
    """
    device = torch.device(device)
    module = module.to(device)
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))  # what DDP reads for the same purpose
    if not any(p.requires_grad for n, p in module.named_parameters() if n not in ignored):
        return module
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
