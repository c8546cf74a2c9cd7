"""Pictures of a run: curves of every loss term during training, overlays of predictions at evaluation.

Both are written as PNG files and, when the engine has a MONAI ``MLFlowHandler`` (``--tracking mlflow``), logged
as artifacts of its run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from kd_components.engines.epoch_means import EpochMeans
from kd_components.progress import loss_scalars

__all__ = ["LossCurves", "OverlaySaver", "log_artifacts_to_mlflow", "optional_teacher", "overlay_panels"]

logger = logging.getLogger(__name__)


def _mlflow_handlers(engine: Engine) -> list[Any]:
    """The MONAI ``MLFlowHandler`` instances attached to ``engine`` (by their bound event methods)."""
    from monai.handlers import MLFlowHandler

    found: list[Any] = []
    for handlers in engine._event_handlers.values():
        for entry in handlers:
            owner = getattr(entry[0], "__self__", None)
            if isinstance(owner, MLFlowHandler) and owner not in found:
                found.append(owner)
    return found


def log_artifacts_to_mlflow(engine: Engine, paths: Sequence[str | Path], run_ids: Sequence[str] = ()) -> int:
    """Log files as artifacts of the MLflow run(s) of the engine's ``MLFlowHandler`` (none attached: nothing).

    Args:
        engine: the engine whose MLflow handler holds the run.
        paths: the files to log.
        run_ids: runs to log to when the handler has already closed its run (remembered earlier).

    Returns:
        how many (file, run) pairs were logged.
    """
    logged = 0
    for handler in _mlflow_handlers(engine):
        run = getattr(handler, "cur_run", None)
        ids = [run.info.run_id] if run is not None else list(run_ids)
        for run_id in ids:
            for path in paths:
                if Path(path).is_file():
                    handler.client.log_artifact(run_id, str(path))
                    logged += 1
    return logged


def _remember_runs(engine: Engine) -> list[str]:
    return [h.cur_run.info.run_id for h in _mlflow_handlers(engine) if getattr(h, "cur_run", None) is not None]


class LossCurves:
    """Plot the epoch mean of every loss term (and the validation key metric) as training goes.

    After every epoch it writes ``<output_dir>/<name>.png`` (one panel per loss: ``loss`` and each ``loss_<term>``
    of the engine output, plus one for the validation metrics when ``validator`` is given) and
    ``<output_dir>/<name>.json`` (the values), and at the end of training logs both to MLflow when an
    ``MLFlowHandler`` is attached. Attach it after the ``ValidationHandler`` so the epoch's metrics are there.

    Args:
        output_dir: the folder to write to (created).
        validator: the validation evaluator whose metrics to plot, or None.
        name: the file stem.
        stage: the title of the figure.
    """

    def __init__(
        self,
        output_dir: str | Path,
        validator: Engine | None = None,
        name: str = "loss_curves",
        stage: str = "training",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.validator = validator
        self.name = name
        self.stage = stage
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._means = EpochMeans(prefix="")
        self._run_ids: list[str] = []

    @property
    def png_path(self) -> Path:
        """The PNG written after each epoch."""
        return self.output_dir / f"{self.name}.png"

    @property
    def json_path(self) -> Path:
        """The values behind the PNG."""
        return self.output_dir / f"{self.name}.json"

    def attach(self, engine: Engine) -> None:
        """Attach to a training engine.

        Args:
            engine: the trainer.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return  # rank 0 writes the curves (of its own shard's losses)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._means.reset()
        self._run_ids = self._run_ids or _remember_runs(engine)

    def _iteration_completed(self, engine: Engine) -> None:
        self._means.add({key: torch.tensor(value) for key, value in loss_scalars(engine.state.output).items()})

    def _epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        for key, value in self._means.means().items():
            self.history.setdefault(key, []).append((epoch, value))
        if self.validator is not None:
            for key, value in self.validator.state.metrics.items():
                if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                    self.history.setdefault(f"validation/{key}", []).append((epoch, float(value)))
        self.write()

    def _completed(self, engine: Engine) -> None:
        if self.png_path.is_file():
            log_artifacts_to_mlflow(engine, [self.png_path, self.json_path], self._run_ids)

    def write(self) -> Path:
        """Write the PNG and the JSON of the curves so far; returns the PNG's path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.history, indent=1))
        losses = sorted(k for k in self.history if not k.startswith("validation/"))
        panels = [[k] for k in losses]
        metrics = sorted(k for k in self.history if k.startswith("validation/"))
        if metrics:
            panels.append(metrics)
        fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 2.8), squeeze=False)
        for ax, keys in zip(axes[0], panels):
            for key in keys:
                epochs, values = zip(*self.history[key])
                ax.plot(epochs, values, marker=".", label=key.removeprefix("validation/"))
            ax.set_title("validation" if keys[0].startswith("validation/") else keys[0], fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            if len(keys) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(self.stage, fontsize=10)
        fig.tight_layout()
        fig.savefig(self.png_path, dpi=90)
        plt.close(fig)
        return self.png_path


def _labels_map(x: torch.Tensor) -> torch.Tensor:
    """A label map ``(*spatial)`` from a one-hot/probability ``(C, *spatial)`` or a label ``(1, *spatial)`` tensor."""
    x = torch.as_tensor(x).detach().cpu()
    return x.argmax(0) if x.shape[0] > 1 else x[0].round().long()


def _slice_2d(volume: torch.Tensor, index: int | None) -> torch.Tensor:
    """``(*spatial)`` to 2D: 2D stays, 3D takes slice ``index`` of the last axis."""
    return volume if volume.ndim == 2 else volume[..., index]


def overlay_panels(
    image: torch.Tensor,
    label: torch.Tensor,
    predictions: dict[str, torch.Tensor],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write one PNG: the image, the ground truth and each prediction drawn over the image.

    Everything is shown at the label's size (the image is resampled bilinearly, predictions nearest). For a volume
    the slice along the last axis with the most ground-truth foreground is shown (the middle one if it has none).

    Args:
        image: ``(C, *spatial)`` image; the first channel, or the RGB mean for 3 channels, is shown.
        label: ``(1, *spatial)`` label map or ``(K, *spatial)`` one-hot.
        predictions: panel title to ``(K, *spatial)`` one-hot/probabilities or ``(1, *spatial)`` label map.
        path: the PNG to write.
        title: the figure title (e.g. the case's file name).

    Returns:
        the PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gt = _labels_map(label)
    size = tuple(gt.shape)
    img = torch.as_tensor(image).detach().cpu().float()
    img = img.mean(0, keepdim=True) if img.shape[0] == 3 else img[:1]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    img = F.interpolate(img[None], size=size, mode=mode, align_corners=False)[0, 0]
    maps = {}
    for name, pred in predictions.items():
        lab = _labels_map(pred)
        if tuple(lab.shape) != size:
            lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
        maps[name] = lab
    index = None
    if len(size) == 3:
        fg = (gt > 0).flatten(0, 1).sum(0)
        index = int(fg.argmax()) if fg.max() > 0 else size[-1] // 2
    img2 = _slice_2d(img, index).numpy()
    lo, hi = np.percentile(img2, [1, 99])
    img2 = np.clip((img2 - lo) / max(hi - lo, 1e-8), 0, 1)
    panels = {"image": None, "ground truth": gt, **maps}
    num_classes = max(int(m.max()) for m in [gt, *maps.values()]) + 1
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    for ax, (name, lab) in zip(axes[0], panels.items()):
        ax.imshow(img2, cmap="gray")
        if lab is not None:
            lab2 = _slice_2d(lab, index).numpy().astype(float)
            ax.imshow(
                np.ma.masked_where(lab2 == 0, lab2), cmap="autumn", alpha=0.45, vmin=1, vmax=max(num_classes - 1, 1)
            )
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title + (f" (slice {index})" if index is not None else ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def optional_teacher(
    network: torch.nn.Module, checkpoint: str | Path, device: str | torch.device | None = None
) -> torch.nn.Module | None:
    """The trained teacher for the overlays' teacher panel, or None (with a log line) when its file is absent.

    A downloaded bundle holds the student only; its evaluation still draws image, ground truth and student.

    Args:
        network: the teacher architecture (the bundle's ``teacher_def``).
        checkpoint: the teacher's state-dict file.
        device: where to run it.
    """
    from kd_components.utils import load_teacher

    if not Path(checkpoint).is_file():
        logger.info("no teacher at %s: the overlays show the ground truth and the model only", checkpoint)
        return None
    return load_teacher(network, checkpoint, device)


class OverlaySaver:
    """At evaluation, draw the first ``num_cases`` cases: image, ground truth, teacher (optional) and the model.

    Reads the evaluator's decollated output (``"image"``, ``"label"``, ``"pred"`` after post-processing; the
    prediction may be inverted to the label's size) and, when a teacher is given, runs it on the same
    pre-processed batch (``engine.state.batch["image"]``) with ``inferer``. Writes
    ``<output_dir>/overlays/<case>.png`` and logs them to MLflow at the end when an ``MLFlowHandler`` is attached.

    Args:
        output_dir: the folder whose ``overlays/`` subfolder receives the PNGs.
        num_cases: how many cases to draw.
        teacher: the teacher network (trained, or its architecture when ``teacher_checkpoint`` is given), or None.
        teacher_checkpoint: the teacher's weights, loaded into ``teacher`` when the evaluation starts; a missing file
            drops the teacher panel (a downloaded bundle has the student only).
        network: the evaluated network; when it is ``teacher`` itself (evaluating the teacher), the teacher panel is
            dropped and the model panel is called "teacher".
        inferer: how to run the teacher (a MONAI inferer, e.g. ``SlidingWindowInferer``); None calls it directly.
        model_name: the model panel's title.
    """

    def __init__(
        self,
        output_dir: str | Path,
        num_cases: int = 4,
        teacher: torch.nn.Module | None = None,
        teacher_checkpoint: str | Path | None = None,
        network: torch.nn.Module | None = None,
        inferer: Any | None = None,
        model_name: str = "student",
    ) -> None:
        self.output_dir = Path(output_dir) / "overlays"
        self.num_cases = num_cases
        if teacher is not None and network is not None and teacher is network:
            teacher, teacher_checkpoint, model_name = None, None, "teacher"
        self.teacher = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.inferer = inferer
        self.model_name = model_name
        self.written: list[Path] = []
        self._run_ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Attach to an evaluator.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self.written = []
        self._run_ids = _remember_runs(engine)
        if self.teacher is not None and self.teacher_checkpoint is not None:
            self.teacher = optional_teacher(self.teacher, self.teacher_checkpoint, engine.state.device)
            self.teacher_checkpoint = None

    @torch.no_grad()
    def _teacher_predictions(self, engine: Engine) -> list[torch.Tensor] | None:
        if self.teacher is None:
            return None
        batch = engine.state.batch  # a dict, or a list of per-case dicts once MONAI has decollated it
        if isinstance(batch, dict):
            images = batch["image"]
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], dict):
            images = torch.stack([torch.as_tensor(item["image"]) for item in batch])
        else:
            images = batch[0]
        images = torch.as_tensor(images).to(engine.state.device)
        was_training = self.teacher.training
        self.teacher.eval()
        logits = self.inferer(images, self.teacher) if self.inferer is not None else self.teacher(images)
        self.teacher.train(was_training)
        return [x.softmax(0).cpu() if x.shape[0] > 1 else (x.sigmoid() > 0.5).long().cpu() for x in logits]

    def _iteration_completed(self, engine: Engine) -> None:
        if len(self.written) >= self.num_cases:
            return
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        teacher = self._teacher_predictions(engine)
        for i, item in enumerate(outputs):
            if len(self.written) >= self.num_cases:
                break
            preds = {}
            if teacher is not None:
                preds["teacher"] = teacher[i]
            preds[self.model_name] = item["pred"]
            meta = getattr(item["image"], "meta", {}) or {}
            source = meta.get("filename_or_obj", "")
            name = Path(str(source)).name.split(".")[0] if source else f"case_{len(self.written):03d}"
            path = self.output_dir / f"{len(self.written):02d}_{name}.png"
            self.written.append(overlay_panels(item["image"], item["label"], preds, path, title=name))

    def _completed(self, engine: Engine) -> None:
        log_artifacts_to_mlflow(engine, self.written, self._run_ids)
