"""A bundle's stages, run in this process: the config files of a method, a stage's ``ConfigWorkflow``, one training
stage, and the parameter count and weights digest of what was trained."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism

__all__ = ["REPO", "BUNDLES", "PARAPHRASER_CONFIG", "available_methods", "method_configs", "train_stage"]

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
PARAPHRASER_CONFIG = "train_paraphraser.json"
"""A bundle's paraphraser pre-training stage (merged onto ``train.json``), run once after the teacher when present."""


def _configs(bundle: Path, names: Sequence[str]) -> list[str]:
    return [str(bundle / "configs" / n) for n in names]


def available_methods(bundle: Path) -> list[str]:
    """The bundle's method override names (``configs/methods/*.json``), ``none`` first.

    Args:
        bundle: the bundle folder.
    """
    names = sorted(p.stem for p in (bundle / "configs" / "methods").glob("*.json"))
    return sorted(names, key=lambda n: n != "none")


def method_configs(bundle: Path, method: str) -> list[str]:
    """The config files of ``method``: ``train.json`` plus ``methods/<part>.json`` (or ``<part>.json``) per part.

    Args:
        bundle: the bundle folder.
        method: a method name, or several override names joined by ``+`` (merged in that order).
    """
    names = ["train.json"]
    for part in method.split("+"):
        if (bundle / "configs" / "methods" / f"{part}.json").is_file():
            names.append(f"methods/{part}.json")
        elif part and (bundle / "configs" / f"{part}.json").is_file():
            names.append(f"{part}.json")
        else:
            raise SystemExit(
                f"{bundle.name} has no method or override {part!r} (neither configs/methods/{part}.json nor "
                f"configs/{part}.json exists); methods: {available_methods(bundle)}"
            )
    return names


def _workflow(bundle: Path, names: Sequence[str], workflow_type: str, **override: Any) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=_configs(bundle, names),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle),
        **override,
    )


def train_stage(bundle: Path, names: Sequence[str], tracking: dict | None = None, **override: Any) -> float:
    """Run one training stage in this process; returns its wall-clock seconds.

    The global random state is seeded with the ``seed`` override (when given) before the workflow is built, so the
    stage does not depend on what ran before it in this process, even with an ``initialize`` that does not seed.

    Args:
        bundle: the bundle folder.
        names: config files under ``configs/``, merged in order.
        tracking: ``{"experiment_name", "run_name", "tracking_uri"}`` to record the run in MLflow, or None.
        override: config overrides (``dataset_dir``, ``ckpt_dir``, ``epochs``, ``seed``...).
    """
    if tracking:
        override = {**override, **tracking}
    if override.get("seed") is not None:
        set_determinism(seed=int(override["seed"]))
    wf = _workflow(bundle, names, "train", tracking="mlflow" if tracking else None, **override)
    start = time.perf_counter()
    wf.initialize()
    wf.run()
    wf.finalize()
    return time.perf_counter() - start


def _parameters(bundle: Path, net_id: str, **override: Any) -> int:
    """Parameters of the network ``net_id`` of ``train.json`` with the run's overrides (e.g. ``in_channels``)."""
    parser = _workflow(bundle, ["train.json"], "train", **override).parser
    return sum(p.numel() for p in parser.get_parsed_content(net_id, instantiate=True).parameters())


def _weights_digest(path: Path | Sequence[Path]) -> str | None:
    """MD5 of the tensors of a saved state dict (key order and values), or None when the file is missing; for
    several files (an ensemble's members), the MD5 of their digests in order."""
    if not isinstance(path, Path):
        digests = [_weights_digest(p) for p in path]
        return None if None in digests else hashlib.md5(" ".join(digests).encode()).hexdigest()
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    digest = hashlib.md5()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
