"""Checkpoints that never destroy the last good model: atomic writes, a MONAI-compatible saver, resumable state.

Every file is written to a temporary file in the target folder, flushed to disk, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows). A kill, a full disk or an unwritable folder therefore leaves the
previous file untouched, never a truncated one.

- :func:`atomic_save`: ``torch.save`` made atomic; the one helper every checkpoint write goes through;
- :func:`save_state_dict`: a module's state dict, atomically (e.g. a paraphraser at the end of its stage);
- :class:`AtomicCheckpointSaver`: MONAI's ``CheckpointSaver`` with atomic writes that removes a replaced
  checkpoint only after its successor is complete, and refuses to write non-finite weights;
- :class:`TrainingStateCheckpoint`: the full training state each epoch (network, optimizer, engine epoch and
  iteration, distiller and adapters, discriminators and their optimizer, grad scalers, RNG, best metric), and
  resuming from it with ``resume=True``.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from kd_components.settings import write_trained_settings
from kd_components.utils import non_finite_tensors

__all__ = [
    "CheckpointWriteError",
    "atomic_save",
    "save_state_dict",
    "check_writable_dir",
    "AtomicDiskSaver",
    "AtomicCheckpointSaver",
    "TrainingStateCheckpoint",
    "RESUMABLE_ATTRIBUTES",
]

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, unwritable folder); the previous file is unchanged."""


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def check_writable_dir(folder: str | os.PathLike, what: str = "checkpoint folder", key: str = "ckpt_dir") -> Path:
    """Create ``folder`` if needed and check that a file can be created in it, before any work is done.

    Args:
        folder: the folder a run writes to.
        what: how to call it in the error message.
        key: the config key that sets it (named in the message).

    Raises:
        CheckpointWriteError: naming the folder, the reason and the fix.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise CheckpointWriteError(
            f"the {what} {folder} is not writable ({err.strerror or err}). To fix: make it writable, or pass "
            f"--{key} <a writable folder>."
        ) from err
    return folder


def atomic_save(obj: Any, path: str | os.PathLike, check_finite: bool = False) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file: temporary file, fsync, then ``os.replace``.

    The previous ``path``, if any, stays complete until the new file is; on failure the temporary file is removed.

    Args:
        obj: what to save (a state dict, or a dict of them).
        path: the target file; its folder is created if needed.
        check_finite: refuse to save when a floating-point tensor in ``obj`` holds NaN or Inf.

    Returns:
        the path written.

    Raises:
        FloatingPointError: with ``check_finite``, naming the non-finite tensors (nothing is written).
        CheckpointWriteError: when the folder cannot be written or the disk is full, naming the folder; the
            previous ``path`` is unchanged.
    """
    path = Path(path)
    folder = path.parent
    if check_finite:
        bad = non_finite_tensors(obj)
        if bad:
            raise FloatingPointError(
                f"refusing to write {path}: {len(bad)} tensor(s) hold NaN/Inf ({', '.join(bad[:5])}); the previous "
                f"file is kept. Training diverged: lower the learning rate or turn AMP off."
            )
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it the permissions of a normal file
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as err:  # torch reports failed writes as RuntimeError
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise CheckpointWriteError(
            f"could not write {path.name} in folder {folder} ({reason}). The previous {path.name} there, if any, is "
            f"unchanged. To fix: free disk space in {folder} or make it writable, or pass --ckpt_dir <another folder>."
        ) from err
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
    return path


def save_state_dict(module: torch.nn.Module, path: str | os.PathLike, check_finite: bool = True) -> Path:
    """Atomically save ``module.state_dict()`` to ``path`` (use in configs instead of ``torch.save``).

    Args:
        module: the network (e.g. a trained paraphraser).
        path: the target file.
        check_finite: refuse to save non-finite weights (the previous file is kept).
    """
    return atomic_save(module.state_dict(), path, check_finite=check_finite)


class AtomicDiskSaver(BaseSaveHandler):
    """An ignite save handler that writes with :func:`atomic_save` and defers removals until the next save is done.

    ignite's ``Checkpoint`` removes the checkpoint it replaces *before* saving the new one (with one file kept and
    a fixed name, that deletes the best model first); here a removal only happens after the next file is complete,
    and never removes the file just written.

    Args:
        dirname: the folder checkpoints go to.
        filename: a fixed file name to use instead of ignite's (MONAI's ``key_metric_filename`` / ``final_filename``).
        check_finite: refuse to write checkpoints holding NaN/Inf.
        settings: when given, also written (after the checkpoint) as ``<stem>_settings.json`` beside it, with
            :func:`kd_components.settings.write_trained_settings` (e.g. the image size inference must use).
    """

    def __init__(
        self,
        dirname: str | os.PathLike,
        filename: str | None = None,
        check_finite: bool = True,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self.check_finite = check_finite
        self.settings = settings
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        if _is_main_process():
            atomic_save(checkpoint, self.dirname / name, check_finite=self.check_finite)
            if self.settings is not None:
                write_trained_settings(self.dirname / name, self.settings)
            for old in self._pending:
                if old != name:
                    (self.dirname / old).unlink(missing_ok=True)
        self._pending = []

    def remove(self, filename: str) -> None:
        """Remove ``filename`` once the next checkpoint has been written (not now)."""
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose every write is atomic and never loses the last good file.

    - each file is written to a temporary file in ``save_dir`` and renamed over the target when complete;
    - the checkpoint it replaces is removed only after that (MONAI/ignite delete it first);
    - a full disk or unwritable folder raises :class:`CheckpointWriteError` naming the folder; the previous file
      survives;
    - with ``check_finite`` (default), weights holding NaN/Inf are never written, and no "final" checkpoint is
      written when training stopped on a non-finite loss.

    - with ``settings`` (e.g. ``{"image_size": "@image_size"}``), the key-metric and final checkpoints get a
      ``<stem>_settings.json`` beside them, written each time they are, which ``inference.json`` reads.

    ``save_dir`` is checked for writability when the saver is built, before any training.

    Args:
        save_dir: the target directory.
        save_dict: the objects to save, as for ``CheckpointSaver``.
        check_finite: refuse to write non-finite weights.
        settings: the training settings inference needs, recorded beside the key-metric and final checkpoints.
        kwargs: every other argument of MONAI's ``CheckpointSaver``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        check_finite: bool = True,
        settings: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if _is_main_process():
            check_writable_dir(save_dir)
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        self.check_finite = check_finite
        self.settings = settings
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attr, filename in fixed.items():
            ckpt = getattr(self, attr)
            if ckpt is not None:
                ckpt.save_handler = AtomicDiskSaver(
                    save_dir,
                    filename=filename,
                    check_finite=check_finite,
                    settings=settings if filename is not None else None,
                )

    def state_dict(self) -> dict[str, Any]:
        """The key-metric tracking (best score so far), for :class:`TrainingStateCheckpoint`."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the key-metric tracking saved by :meth:`state_dict`."""
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)

    def metrics_completed(self, engine: Engine) -> None:
        """Save when the key metric improved; after a failed write the tracking still names the file on disk."""
        ckpt = self._key_metric_checkpoint
        saved = list(ckpt._saved) if ckpt is not None else []
        try:
            super().metrics_completed(engine)
        except BaseException:
            if ckpt is not None:
                ckpt._saved = saved
            raise

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Save the final checkpoint on an exception, except when training diverged (the weights are not finite)."""
        if isinstance(e, FloatingPointError):
            raise e
        super().exception_raised(engine, e)


RESUMABLE_ATTRIBUTES = (
    "network",
    "optimizer",
    "scaler",
    "distiller",
    "discriminator_optimizer",
    "discriminator_scaler",
)
"""Attributes of a trainer that :class:`TrainingStateCheckpoint` saves and restores when present (the distiller's
state holds the adversarial terms' discriminators)."""


def _handler_owners(engine: Engine) -> list[Any]:
    """The objects behind ``engine``'s event handlers: handler objects, or the owners of bound-method handlers."""
    found: list[Any] = []
    for handlers in engine._event_handlers.values():
        for handler, *_ in handlers:
            parent = getattr(handler, "_parent", None)  # ignite wraps filtered handlers (``every=n``)
            handler = parent() if parent is not None else handler
            owner = getattr(handler, "__self__", handler)
            if all(owner is not f for f in found):
                found.append(owner)
    return found


def _attached_savers(engine: Engine) -> list[AtomicCheckpointSaver]:
    """The :class:`AtomicCheckpointSaver` objects attached to ``engine`` (in attachment order)."""
    return [h for h in _handler_owners(engine) if isinstance(h, AtomicCheckpointSaver)]


def _validators(engine: Engine) -> list[Engine]:
    """The evaluators run by MONAI ``ValidationHandler`` objects attached to ``engine``."""
    found: list[Engine] = []
    for owner in _handler_owners(engine):
        validator = getattr(owner, "validator", None)
        if isinstance(validator, Engine) and all(validator is not f for f in found):
            found.append(validator)
    return found


def _rng_state() -> dict[str, Any]:
    """The torch, numpy and Python RNG states, as tensors and plain types (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingStateCheckpoint:
    """Save a trainer's full state at the end of every epoch, and resume from it.

    What is saved (atomically, to ``path``, separate from the best-model file): every attribute of the trainer
    named in :data:`RESUMABLE_ATTRIBUTES` that exists (student, optimizer, AMP scaler, distiller with its adapters
    and discriminators, the discriminators' optimizer and scaler), the objects in ``save_dict``, the engine's epoch and
    iteration and its ``state_dict_user_keys`` (e.g. frozen balanced term weights), the RNG states, and, for each
    validator of a ``ValidationHandler``, its best metric and the best-model tracking of its
    :class:`AtomicCheckpointSaver` (so a resumed run does not overwrite a better model).
    Schedules (e.g. :class:`~kd_components.LinearWarmup`) follow the restored epoch and iteration.

    With ``resume=True`` the state is loaded when the run starts (``Events.STARTED``) and training continues with
    the next epoch, up to the trainer's ``max_epochs`` (which may be larger than in the first run). A run killed
    during an epoch redoes at most that epoch. Without a state file, a resumed run starts from epoch 1 (with a
    warning).

    Attach it after the ``ValidationHandler`` (last in ``train#handlers``): the state is then written after the
    epoch's validation and best-model save. In distributed runs every rank loads, rank 0 writes.

    Args:
        path: the state file, e.g. ``models/model_resume.pt``.
        resume: load ``path`` when the run starts.
        save_dict: further objects with ``state_dict`` / ``load_state_dict`` (e.g. an LR scheduler).
        save_interval: save every this many epochs.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resume: bool = False,
        save_dict: Mapping[str, Any] | None = None,
        save_interval: int = 1,
    ) -> None:
        if not isinstance(resume, bool):
            raise TypeError(f"resume must be true or false, got {resume!r} (set --resume true to continue a run)")
        self.path = Path(path)
        self.resume = resume
        self.save_dict = dict(save_dict or {})
        self.save_interval = int(save_interval)
        self.loaded: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Load at ``STARTED`` (when resuming, before any other handler), save at every ``save_interval`` epochs."""
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
            started = engine._event_handlers[Events.STARTED]
            started.insert(0, started.pop())  # restore before anything else sees the engine state
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objects = {name: getattr(engine, name, None) for name in RESUMABLE_ATTRIBUTES}
        objects.update(self.save_dict)
        return {
            k: v
            for k, v in objects.items()
            if hasattr(v, "state_dict") and getattr(v, "is_enabled", lambda: True)()  # not a disabled GradScaler
        }

    def state(self, engine: Engine) -> dict[str, Any]:
        """The state that :meth:`save` writes (tensors as they are; ``torch.save`` copies them)."""
        state: dict[str, Any] = {name: obj.state_dict() for name, obj in self._objects(engine).items()}
        state["engine"] = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "epoch_length": engine.state.epoch_length,
            # e.g. the trainer's frozen balanced term weights (ignite's state_dict_user_keys)
            "user": {k: getattr(engine.state, k, None) for k in getattr(engine, "state_dict_user_keys", [])},
        }
        state["validators"] = [
            {
                "best_metric": getattr(v.state, "best_metric", -1),
                "best_metric_epoch": getattr(v.state, "best_metric_epoch", -1),
                "savers": [s.state_dict() for s in _attached_savers(v)],
            }
            for v in _validators(engine)
        ]
        state["rng"] = _rng_state()
        return state

    def save(self, engine: Engine) -> None:
        """Write the training state to ``path`` (rank 0 only), atomically."""
        if _is_main_process():
            atomic_save(self.state(engine), self.path, check_finite=True)

    def load(self, engine: Engine) -> None:
        """Restore the state saved in ``path`` into the trainer and its validators.

        Raises:
            ValueError: when the file cannot be read, or was written by a different setup (its objects do not
                fit), naming the file.
        """
        if not self.path.is_file():
            logger.warning("--resume: no training state at %s, starting from epoch 1", self.path)
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"training state {self.path} could not be read ({type(err).__name__}: {err}). To fix: delete it "
                "and run without --resume true."
            ) from err
        objects = self._objects(engine)
        missing = sorted(set(objects) - set(state))
        if missing:
            raise ValueError(
                f"training state {self.path} has no {missing}: it was written by another stage or method. To fix: "
                "resume with the configs of the interrupted run, or run without --resume true."
            )
        for name, obj in objects.items():
            try:
                obj.load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(
                    f"training state {self.path}: {name!r} does not fit ({err}). It was written by another setup "
                    "(other configs, or a kd_components from before the discriminators were part of the distiller's "
                    "state): resume with the configs of the interrupted run, or run without --resume true."
                ) from err
        saved = state["engine"]
        if saved["epoch"] > engine.state.max_epochs:
            raise ValueError(
                f"training state {self.path} is at epoch {saved['epoch']}, beyond --epochs {engine.state.max_epochs}."
                " To fix: pass --epochs of at least that, or run without --resume true."
            )
        if engine.state.epoch_length is not None and saved["epoch_length"] not in (None, engine.state.epoch_length):
            logger.warning(
                "training state %s had %s iterations per epoch, this run has %s (the data or batch size changed)",
                self.path,
                saved["epoch_length"],
                engine.state.epoch_length,
            )
        engine.state.epoch = saved["epoch"]
        engine.state.iteration = saved["iteration"]
        for key, value in saved.get("user", {}).items():
            setattr(engine.state, key, value)
        for validator, vstate in zip(_validators(engine), state.get("validators", [])):
            validator.state.best_metric = vstate["best_metric"]
            validator.state.best_metric_epoch = vstate["best_metric_epoch"]
            for saver, sstate in zip(_attached_savers(validator), vstate["savers"]):
                saver.load_state_dict(sstate)
        _set_rng_state(state.get("rng", {}))
        self.loaded = state
        logger.info("resumed from %s: epoch %d of %d done", self.path, saved["epoch"], engine.state.max_epochs)
