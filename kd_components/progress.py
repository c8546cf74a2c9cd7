"""Progress of long work: ignite's progress bar on a terminal, one concise line per epoch otherwise."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, TextIO

import torch
from ignite.engine import Engine, Events

from kd_components.engines.epoch_means import EpochMeans
from kd_components.handlers import _scalars

__all__ = ["TrainingProgress", "format_duration", "loss_scalars"]

logger = logging.getLogger(__name__)


def loss_scalars(output: Any) -> dict[str, float]:
    """The scalar losses of an engine output: ``"loss"`` and every ``"loss_<term>"`` entry.

    MONAI's trainers decollate the batch, so the output is often a list of per-sample dicts that repeat the batch's
    losses; each loss is then the mean over the list (the batch value when they repeat it).

    Args:
        output: ``engine.state.output``, a dict or a list of dicts.
    """
    items = output if isinstance(output, list) else [output]
    sums: dict[str, list[float]] = {}
    for item in items:
        for key, value in _scalars(item, None).items():
            sums.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def format_duration(seconds: float) -> str:
    """A short human duration: ``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``.

    Args:
        seconds: the duration; negative or non-finite values give ``"?"``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TrainingProgress:
    """Show a training stage's progress: a progress bar on a terminal, one line per epoch otherwise.

    On a terminal (``interactive=None`` and ``stream`` is a TTY), ignite's ``ProgressBar`` shows the iterations of
    the current epoch with the running loss. In every case, each epoch ends with one line through ``logging``::

        teacher epoch 3/40: loss 0.5231 (loss_cwd 0.1210) | val_mean_dice 0.7120 (best 0.72, epoch 2) | 21 s, ETA 13 min

    so a log file gets one line per epoch instead of one per iteration (set the bundle's ``StatsHandler`` to
    ``iteration_log: false``). The loss means are over the epoch's iterations, for ``"loss"`` and every
    ``"loss_<term>"`` entry of the engine output (a dict, or a list of dicts). Validation metrics are read from
    ``validator`` (its ``state.metrics`` and best metric), so attach this handler after the ``ValidationHandler``.
    With several processes (``torchrun``) only rank 0 shows progress.

    Args:
        stage: how to call the run in the lines (``"training"``, ``"teacher"``, ``"student"``, ...).
        validator: the validation evaluator whose metrics to show, or None.
        interactive: show the progress bar; None decides from ``stream.isatty()``.
        stream: where the progress bar writes (default ``sys.stderr``).
    """

    def __init__(
        self,
        stage: str = "training",
        validator: Engine | None = None,
        interactive: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stage = stage
        self.validator = validator
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)()) if interactive is None else interactive
        self._means = EpochMeans(prefix="")
        self._epoch_start = 0.0
        self._run_start = 0.0
        self._first_epoch = 1
        self.lines: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Attach to a training engine.

        Args:
            engine: the trainer.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return  # one progress display per run: rank 0's
        if self.interactive:
            try:
                from ignite.handlers import ProgressBar
            except ImportError:  # tqdm missing: the epoch lines still come
                logger.info("tqdm is not installed: showing one line per epoch instead of a progress bar")
            else:
                ProgressBar(persist=False, file=self.stream).attach(
                    engine, output_transform=lambda output: {"loss": loss_scalars(output).get("loss", float("nan"))}
                )
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Engine) -> None:
        self._run_start = time.perf_counter()
        self._first_epoch = engine.state.epoch + 1  # a resumed run starts after its saved epoch

    def _epoch_started(self, engine: Engine) -> None:
        self._means.reset()
        self._epoch_start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        self._means.add({key: torch.tensor(value) for key, value in loss_scalars(engine.state.output).items()})

    def epoch_means(self) -> dict[str, float]:
        """The mean of each loss over the current epoch's iterations so far."""
        return self._means.means()

    def _epoch_completed(self, engine: Engine) -> None:
        self.lines.append(self.epoch_line(engine))
        logger.info(self.lines[-1])

    def epoch_line(self, engine: Engine) -> str:
        """The line that ends an epoch: losses, validation metrics, time and the estimated time left.

        Args:
            engine: the trainer, at the end of an epoch.
        """
        epoch, max_epochs = engine.state.epoch, engine.state.max_epochs or engine.state.epoch
        means = self.epoch_means()
        parts = [f"{self.stage} epoch {epoch}/{max_epochs}:"]
        if "loss" in means:
            parts.append(f"loss {means['loss']:.4f}")
        terms = [f"{k} {v:.4f}" for k, v in sorted(means.items()) if k != "loss"]
        if terms:
            parts.append("(" + ", ".join(terms) + ")")
        text = " ".join(parts)
        validation = self._validation_text()
        if validation:
            text += " | " + validation
        now = time.perf_counter()
        done = epoch - self._first_epoch + 1
        left = (now - self._run_start) / max(done, 1) * (max_epochs - epoch)
        text += f" | {format_duration(now - self._epoch_start)}"
        if epoch < max_epochs:
            text += f", ETA {format_duration(left)}"
        return text

    def _validation_text(self) -> str:
        if self.validator is None or not self.validator.state.metrics:
            return ""
        state = self.validator.state
        key = getattr(state, "key_metric_name", None)
        metrics: dict[str, Any] = state.metrics
        shown = [f"{k} {float(v):.4f}" for k, v in metrics.items() if isinstance(v, (int, float))]
        best = getattr(state, "best_metric", None)
        best_epoch = getattr(state, "best_metric_epoch", -1)
        if key and best is not None and best_epoch is not None and best_epoch >= 0:
            shown.append(f"(best {float(best):.4f}, epoch {best_epoch})")
        return " ".join(shown)
