"""Ignite handlers that keep a run from losing or corrupting a model: divergence guard, backups at the start,
the discriminators' checkpoint."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from kd_components.utils import backup_existing

__all__ = ["FiniteLossGuard", "BackupOnStart", "DiscriminatorCheckpointSaver"]

logger = logging.getLogger(__name__)


def _scalars(output: Any, keys: Sequence[str] | None) -> dict[str, float]:
    """The scalar losses of an engine output (a dict, or a list of dicts): ``keys``, or every ``loss*`` entry."""
    items = output if isinstance(output, list) else [output]
    values: dict[str, float] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if not isinstance(key, str) or (key not in keys if keys else not key.startswith("loss")):
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value.detach())
            if isinstance(value, (int, float)):
                values[key if len(items) == 1 else f"{key}[{i}]"] = float(value)
    return values


class FiniteLossGuard:
    """Stop training as soon as a loss is NaN or Inf, before the optimizer step, naming the failing loss.

    MONAI's ``SupervisedTrainer`` (the teacher stage, the student alone) trains on through NaN and its
    ``CheckpointSaver`` then writes NaN weights. This handler checks the engine output's losses (``"loss"`` and
    every ``"loss_<term>"``, or ``keys``) when the loss is computed (``IterationEvents.LOSS_COMPLETED``, before
    backward and the optimizer step; at ``ITERATION_COMPLETED`` on engines without that event) and raises
    ``FloatingPointError``: the run stops, no epoch-end handler saves the diverged weights, and the best model
    saved so far stays as it is.

    Trainers that check their own loss (``check_finite=True`` of :class:`~kd_components.DistillationTrainer` and
    its subclasses) are left alone, to avoid a second host synchronisation per iteration.

    Args:
        keys: the output keys to check; default ``"loss"`` and every key starting with ``"loss"``.
        stage: how to call the run in the message (e.g. ``"teacher"``).
    """

    def __init__(self, keys: Sequence[str] | None = None, stage: str = "training") -> None:
        self.keys = list(keys) if keys else None
        self.stage = stage

    def attach(self, engine: Engine) -> None:
        """Check every iteration's losses (unless ``engine`` checks them itself)."""
        if getattr(engine, "check_finite", False):
            return
        event = IterationEvents.LOSS_COMPLETED if engine.has_registered_events(IterationEvents.LOSS_COMPLETED) else None
        engine.add_event_handler(event or Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Raise ``FloatingPointError`` when a loss of this iteration is not finite."""
        values = _scalars(engine.state.output, self.keys)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(
                f"{self.stage} stopped: non-finite loss at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration}: {', '.join(f'{k}={v}' for k, v in bad.items())}. The weights of this "
                "iteration were not saved; the best checkpoint so far is unchanged. To fix: lower --learning_rate, "
                "check the inputs for NaN/Inf (intensity scaling), or turn AMP off (--amp false)."
            )


class BackupOnStart:
    """Copy the files a run will overwrite into ``backup/`` when the run really starts (``Events.STARTED``).

    A run that fails while its config is parsed or its components are built (a bad override, a missing teacher)
    never reaches ``STARTED``, so it backs up nothing; the originals are copied, never moved, so they stay where
    inference and MONAI Label look for them until the run writes a better model. In distributed runs only rank 0
    copies.

    Args:
        paths: the files the run writes (e.g. ``[@ckpt_path]``); missing ones are skipped.
        backup_dir: where copies go; default ``backup/`` beside each file.
    """

    def __init__(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, backup_dir: str | None = None) -> None:
        self.paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.backup_dir = backup_dir
        self.done = False

    def attach(self, engine: Engine) -> None:
        """Back up at the engine's ``STARTED`` event."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Copy the existing files once (a second ``run()`` of the same engine copies nothing)."""
        if self.done:
            return
        self.done = True
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        backup_existing(self.paths, self.backup_dir)


class DiscriminatorCheckpointSaver:
    """Save the trainer's discriminators and their optimizer when its terms have any; nothing otherwise.

    A train handler, so a bundle's ``train.json`` can always list it: attached to a
    :class:`~kd_components.DistillationTrainer` whose distiller has adversarial terms, it attaches an
    :class:`~kd_components.AtomicCheckpointSaver` of ``{"discriminators": trainer.discriminators,
    "discriminator_optimizer": trainer.discriminator_optimizer}`` (the trainer builds that optimizer; the config
    never holds it); attached to a trainer without discriminators (no adversarial term, or a plain
    ``SupervisedTrainer``), it does nothing. Method files thus never enable or disable it.

    With ``validator`` the file is written with the student's best checkpoint (the validator's key metric, the
    pair stays consistent); without it, at the end of training (``save_final``). Only the main process saves under
    ``torch.distributed``.

    Args:
        save_dir: the folder of the checkpoint.
        filename: the file name, e.g. ``"discriminator.pt"``.
        validator: the evaluator whose key metric selects the saved epoch; ``None``: save at the end of training.
        backup: first move an existing ``save_dir/filename`` aside (:func:`kd_components.backup_existing`).
    """

    def __init__(
        self, save_dir: str, filename: str = "discriminator.pt", validator: Engine | None = None, backup: bool = False
    ) -> None:
        self.save_dir = save_dir
        self.filename = filename
        self.validator = validator
        self.backup = backup
        self.saver: Any = None
        """The :class:`~kd_components.AtomicCheckpointSaver` attached, or ``None`` (no discriminators)."""

    def attach(self, engine: Engine) -> None:
        """Attach the saver when ``engine`` trains discriminators (to the validator, or to ``engine``).

        Args:
            engine: the trainer.
        """
        from kd_components.checkpoint import AtomicCheckpointSaver

        discriminators = getattr(engine, "discriminators", None)
        optimizer = getattr(engine, "discriminator_optimizer", None)
        if discriminators is None or optimizer is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return
        if self.backup:
            backup_existing(os.path.join(self.save_dir, self.filename))
        save_dict = {"discriminators": discriminators, "discriminator_optimizer": optimizer}
        if self.validator is not None:
            self.saver = AtomicCheckpointSaver(
                save_dir=self.save_dir, save_dict=save_dict, save_key_metric=True, key_metric_filename=self.filename
            )
            self.saver.attach(self.validator)
        else:
            self.saver = AtomicCheckpointSaver(
                save_dir=self.save_dir, save_dict=save_dict, save_final=True, final_filename=self.filename
            )
            self.saver.attach(engine)
