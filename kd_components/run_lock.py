"""One run per output folder: a lock file in the checkpoint folder, taken over when its run is gone."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from kd_components.checkpoint import check_writable_dir

__all__ = ["LOCK_NAME", "RunLockError", "acquire_run_lock", "release_run_lock"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".kd_run.lock"
"""Name of the lock file in the checkpoint folder."""

_held: dict[Path, int] = {}


class RunLockError(RuntimeError):
    """Another live run writes to the same checkpoint folder."""


def _alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _create(path: Path, info: dict) -> bool:
    """Create the lock file exclusively; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return True


def acquire_run_lock(ckpt_dir: str | os.PathLike, key: str = "ckpt_dir") -> Path:
    """Claim ``ckpt_dir`` for this process, so that a second run on the same folder fails fast.

    The lock file (``<ckpt_dir>/.kd_run.lock``) records the PID, host, start time and command. It is removed when
    the process exits normally. A lock left by a killed run (its PID no longer exists on this host) is taken over
    with a warning. The same process may take its own lock again (stages run one after another in one process).

    Args:
        ckpt_dir: the folder the run writes its checkpoints to (created if needed).
        key: the config key that sets the folder (named in the message).

    Returns:
        the lock file.

    Raises:
        RunLockError: when another live run holds the folder, naming its PID, start time and command.
        CheckpointWriteError: when the folder cannot be created or written, naming it and ``key``.
    """
    folder = check_writable_dir(Path(ckpt_dir).resolve(), key=key)
    path = folder / LOCK_NAME
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    for _ in range(3):
        if _create(path, info):
            break
        other = _read(path)
        pid = int(other.get("pid", -1)) if str(other.get("pid", "")).lstrip("-").isdigit() else -1
        same_host = other.get("host", host) == host
        if pid == os.getpid() and same_host:
            break  # our own lock (an earlier stage in this process)
        if not other and time.time() - path.stat().st_mtime < 5:  # being written right now
            time.sleep(0.2)
            continue
        if same_host and not _alive(pid):
            logger.warning("%s: taking over a stale lock of run PID %s (no longer running)", folder, pid)
            path.unlink(missing_ok=True)
            continue
        where = "" if same_host else f" on host {other.get('host')}"
        command = " ".join(map(str, other.get("argv", [])))[:300]
        raise RunLockError(
            f"another run (PID {pid}{where}, started {other.get('started', '?')}: {command}) is writing to "
            f"{folder}. Two runs in one folder overwrite each other's models. To fix: wait for it to finish, or pass "
            f"--{key} <another folder>. If that run is gone, delete {path}."
        )
    else:
        raise RunLockError(f"could not take the lock {path}; delete it if no run is using {folder}")
    if folder not in _held:
        _held[folder] = os.getpid()
        atexit.register(release_run_lock, folder)
    return path


def release_run_lock(ckpt_dir: str | os.PathLike) -> None:
    """Remove this process's lock on ``ckpt_dir`` (a lock of another process is left alone)."""
    folder = Path(ckpt_dir).resolve()
    path = folder / LOCK_NAME
    if _read(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)
    _held.pop(folder, None)
