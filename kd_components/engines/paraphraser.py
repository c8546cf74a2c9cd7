"""Factor Transfer's paraphraser pre-training stage, and loading its frozen encoder for distillation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from kd_components.modules.paraphraser import Paraphraser
from kd_components.taps import FeatureTaps, unwrap_network
from kd_components.utils import freeze, load_state_dict_file, require_file, state_dict_mismatch

__all__ = ["FrozenEncoder", "ParaphraserTrainer", "load_paraphraser_encoder", "reconstruction_l2"]

RECONSTRUCTION = "reconstruction"
"""Name of the reconstruction loss's epoch mean: ``engine.state.metrics["train_reconstruction"]``."""

PARAPHRASER_HINT = (
    "run the paraphraser pre-training stage first (kd_components.ParaphraserTrainer, e.g. the bundle's "
    "train_paraphraser config), or point the config's paraphraser checkpoint path to an existing paraphraser.pt"
)


def reconstruction_l2(reconstruction: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Factor Transfer's reconstruction loss ``mean((P(F) - F)²)`` in float32.

    Args:
        reconstruction: the paraphraser's output P(F), shape (B, C, *S).
        feature: the teacher feature F, shape (B, C, *S) (detached here).
    """
    return F.mse_loss(reconstruction.float(), feature.detach().float())


class ParaphraserTrainer(SupervisedTrainer):
    """Pre-train a :class:`~kd_components.modules.Paraphraser` unsupervised on a frozen teacher's tap feature.

    MONAI's ``SupervisedTrainer`` loop, unchanged, with the paraphraser as its network: each batch's images go
    through the frozen teacher (eval mode, no autograd; inside autocast when ``amp`` is on CUDA) and the feature of
    submodule ``tap`` becomes both the network input and the target; the loss is the L2 reconstruction
    :func:`reconstruction_l2`. Labels are not used, so unlabelled images serve as well. The engine output's
    ``"loss"`` is the batch's reconstruction loss; its epoch mean is ``engine.state.metrics["train_reconstruction"]``.

    Save the result as a plain state dict with a ``CheckpointSaver`` whose ``save_dict`` holds only the paraphraser,
    e.g. ``save_final=True, final_filename="paraphraser.pt"``; load its frozen encoder for distillation with
    :func:`load_paraphraser_encoder`. One paraphraser per run: for two taps (Graph Flow), run the stage twice.

    Args:
        device: the device the engine runs on.
        max_epochs: number of training epochs (Factor Transfer: 10).
        train_data_loader: loader of batches with an image under ``image_key`` (labels are ignored).
        network: the paraphraser, ``in_channels`` = the tap's channels (possibly wrapped in DDP).
        optimizer: the paraphraser's optimizer.
        teacher: the trained teacher; frozen here (eval mode, ``requires_grad=False``).
        tap: the teacher submodule whose output is paraphrased: a name in ``teacher.named_modules()``, or the same
            as a term source ``"teacher:<name>"`` (e.g. a bundle's ``@taps#deep#teacher``).
        image_key: the batch key of the images.
        check_finite: stop with ``FloatingPointError`` when the reconstruction loss is NaN/Inf, before backward and
            the optimizer step (so diverged weights are never saved).
        train_handlers: handlers attached after the trainer's own (so they see ``train_reconstruction``).
        kwargs: every other argument of ``SupervisedTrainer`` (``amp``, ``inferer`` for the
            paraphraser, ...) except ``loss_function`` and ``prepare_batch``.

    Raises:
        TapNotFoundError: when ``tap`` is not a submodule of the teacher.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        teacher: nn.Module,
        tap: str,
        image_key: str = "image",
        check_finite: bool = True,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        for fixed in ("loss_function", "prepare_batch"):
            if fixed in kwargs:
                raise TypeError(f"ParaphraserTrainer sets {fixed} itself (reconstruction of the teacher's tap)")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=reconstruction_l2,
            prepare_batch=self._teacher_feature,
            train_handlers=None,
            **kwargs,
        )
        self.teacher = freeze(teacher)
        kind, sep, name = tap.partition(":")
        if sep and kind != "teacher":
            raise ValueError(f"the paraphraser stage reads a teacher tap; got {tap!r} (use 'teacher:<module name>')")
        tap = name if sep else tap
        self.tap = tap
        self.image_key = image_key
        self.teacher_taps = FeatureTaps(teacher, [tap], owner="teacher", active=False)
        self._sum, self._count = 0.0, 0
        self.check_finite = check_finite
        if check_finite:
            self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._check_finite_loss)
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch_mean)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._write_epoch_mean)
        if train_handlers:  # after the epoch mean is written, so StatsHandler / MLflow see it
            self._register_handlers(list(train_handlers))

    def _teacher_feature(
        self, batchdata: Any, device: str | torch.device, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``prepare_batch``: the teacher's tap feature (B, C, *S) of the batch's images, as (input, target)."""
        if isinstance(batchdata, Mapping):
            images = batchdata[self.image_key]
        elif isinstance(batchdata, Sequence) and not isinstance(batchdata, torch.Tensor):
            images = batchdata[0]
        else:
            images = batchdata
        images = images.to(device=device, non_blocking=non_blocking, **kwargs)
        if hasattr(images, "as_tensor"):  # MetaTensor: plain tensor for the feature
            images = images.as_tensor()
        device_type = torch.device(device).type
        self.teacher.eval()
        self.teacher_taps.active = True
        try:
            with torch.no_grad(), torch.autocast(device_type, enabled=bool(self.amp) and device_type == "cuda"):
                self.teacher(images)
            feature = self.teacher_taps[self.tap].detach()
        finally:
            self.teacher_taps.active = False
            self.teacher_taps.clear()
        expected = _in_channels(self.network)
        if expected is not None and feature.shape[1] != expected:
            raise ValueError(
                f"the paraphraser takes {expected} channels but teacher tap {self.tap!r} gives a feature of shape "
                f"{tuple(feature.shape)}: set the paraphraser's in_channels to {feature.shape[1]}"
            )
        return feature, feature

    def _check_finite_loss(self) -> None:
        """Raise when this iteration's reconstruction loss is not finite (before backward and the step)."""
        loss = self.state.output[Keys.LOSS]
        if not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(
                f"paraphraser stage stopped: non-finite reconstruction loss {float(loss.detach())} of teacher tap "
                f"{self.tap!r} at epoch {self.state.epoch}, iteration {self.state.iteration}; the paraphraser was "
                "not saved. To fix: lower paraphraser_learning_rate, check the teacher (its features may be NaN/Inf), "
                "or turn AMP off."
            )

    def _reset_epoch_mean(self) -> None:
        self._sum, self._count = 0.0, 0

    def _accumulate(self) -> None:
        output = self.state.output
        loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
        self._sum += float(loss)
        self._count += 1

    def _write_epoch_mean(self) -> None:
        self.state.metrics[f"train_{RECONSTRUCTION}"] = self._sum / max(self._count, 1)


def _in_channels(network: nn.Module) -> int | None:
    """Input channels of the first convolution of ``network`` (None when it has none)."""
    for module in unwrap_network(network).modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


class FrozenEncoder(nn.Module):
    """A fixed module for the teacher side of a distillation term: frozen, and in eval mode for good.

    ``train()`` keeps it in eval mode (a distiller put in training mode does not reach it) and its parameters
    never record gradients, so the student's optimizer, even when built from ``distiller.parameters()``, never
    changes it (``distiller.student_parameters()`` leaves it out altogether).

    Args:
        encoder: the module to freeze, e.g. a trained paraphraser's ``encoder``.

    Shapes:
        input (B, C, *S) → the encoder's output, e.g. the factor (B, K, *S).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = freeze(encoder)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever ``mode`` is."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) → encoder output."""
        return self.encoder(x)


def load_paraphraser_encoder(
    paraphraser: Paraphraser,
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    hint: str = "",
) -> FrozenEncoder:
    """Load a pre-trained paraphraser's weights and return its frozen encoder, for a term's teacher side.

    Use it in a :class:`~kd_components.DistillationTerm` ``transforms`` on the teacher argument, with a
    :class:`~kd_components.modules.Translator` on the student argument (Factor Transfer, CoCo, Graph Flow).

    Args:
        paraphraser: a :class:`~kd_components.modules.Paraphraser` built as in the pre-training stage.
        checkpoint: the paraphraser's state dict (``paraphraser.pt``), read with ``torch.load(weights_only=True)``.
        device: where the encoder should run.
        hint: what the user should do when the file is missing; default: run the pre-training stage.

    Returns:
        the paraphraser's encoder inside a :class:`FrozenEncoder` (eval mode, no gradients).

    Raises:
        FileNotFoundError: when ``checkpoint`` does not exist (the message says which stage to run).
        ValueError: when its keys or shapes do not fit ``paraphraser``.
    """
    path = require_file(checkpoint, "paraphraser checkpoint", hint or PARAPHRASER_HINT)
    state = load_state_dict_file(path, "paraphraser checkpoint")
    mismatch = state_dict_mismatch(paraphraser.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"paraphraser checkpoint {path} does not fit this {type(paraphraser).__name__}: {mismatch}. "
            "Build the paraphraser with the spatial_dims, in_channels and factor_channels of the pre-training stage."
        )
    paraphraser.load_state_dict(state)
    if device is not None:
        paraphraser.to(device)
    paraphraser.freeze()
    return FrozenEncoder(paraphraser.encoder)
