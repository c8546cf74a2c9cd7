"""Evaluation of one model with the bundle's ``evaluate.json``: the per-case metrics that MONAI's ``MetricsSaver``
writes (``val_<metric>_raw.csv``), read back with the cases' names and the HD95 penalty flags."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .stages import _workflow

__all__ = ["HD95_PENALISED", "CORE_CSVS", "CLASS_PREFIXES", "evaluate_stage"]

HD95_PENALISED = "val_hd95_penalised"
"""The per-case flags that ``kd_components.metrics.SpacedHausdorffDistance(empty_penalty=...)`` records."""
CORE_CSVS = {"mean_dice": "val_mean_dice_raw.csv", "mean_iou": "val_mean_iou_raw.csv", "hd95": "val_hd95_raw.csv"}
CLASS_PREFIXES = {"mean_dice": "dice", "mean_iou": "iou", "hd95": "hd95"}


def _csv_means(path: Path) -> dict[str, float]:
    """Mean over cases of each column (except ``filename``) of a MetricsSaver ``*_raw.csv``, ignoring NaN/inf."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    means: dict[str, float] = {}
    for column in rows[0].keys() if rows else []:
        if column == "filename":
            continue
        values = [float(r[column]) for r in rows if math.isfinite(float(r[column]))]
        means[column] = sum(values) / len(values) if values else float("nan")
    return means


def _read_raw_csv(path: Path) -> tuple[list[str], dict[str, list[float]]]:
    """The ``filename`` column and every value column of a MetricsSaver ``*_raw.csv``, in row order."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    names = [r["filename"] for r in rows]
    columns = [c for c in (rows[0].keys() if rows else []) if c != "filename"]
    return names, {c: [float(r[c]) for r in rows] for c in columns}


def _case_id(filename: str, root: Path | None) -> str:
    """A case's name: its path relative to ``root`` when it lies under it (machine-independent), else as written."""
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(filename).resolve().relative_to(root.resolve()).as_posix()
    return filename


def _unique(ids: Sequence[str]) -> list[str]:
    """``ids`` with repeated names numbered (``name#2``...), so that every case has its own key."""
    seen: dict[str, int] = {}
    out = []
    for name in ids:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _class_names(bundle: Path) -> list[str]:
    """The foreground class names of the bundle's ``metadata.json`` (the prediction's channels but 0)."""
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    return [channels[k] for k in sorted(channels, key=int) if k != "0"]


def evaluate_stage(
    bundle: Path, names: Sequence[str], out_dir: Path, case_root: Path | None = None, **override: Any
) -> dict[str, Any]:
    """Evaluate a checkpoint with the bundle's ``evaluate.json`` (on the datalist's ``test`` split).

    Args:
        bundle: the bundle folder.
        names: the model's config files under ``configs/`` (``evaluate.json`` is appended).
        out_dir: where ``evaluate.json``'s ``MetricsSaver`` writes its CSVs.
        case_root: cases are named by their image path relative to this folder (the dataset's); None keeps the
            paths as written.
        override: config overrides (``dataset_dir``, ``datalist``, ``ckpt_dir``, ``ckpt_name``...).

    Returns:
        ``{"dice": {class: mean}, "mean_dice", "mean_iou", "hd95", "extra": {name: mean}, "cases"}`` (means over
        the cases with a finite value; HD95 in pixels/voxels or the header's unit) and ``"per_case"``:
        ``{"cases": [names], "main": [the metrics of the CSVs' mean columns], "metrics": {metric: [value per
        case]}, "hd95_penalised": [0/1 per case] or None (no penalty in ``evaluate.json``), "hd95_nonfinite":
        count}``; per-class metrics are named ``dice_<class>`` (and, with several classes, ``iou_<class>``,
        ``hd95_<class>``, ``<extra>_<class>``).
    """
    wf = _workflow(bundle, [*names, "evaluate.json"], "eval", output_dir=str(out_dir), **override)
    wf.initialize()
    wf.run()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    details = getattr(evaluator.state, "metric_details", {}) or {}
    wf.finalize()
    names_fg = _class_names(bundle)
    missing = [name for name in CORE_CSVS.values() if not (out_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"{bundle.name}'s evaluate.json wrote no {missing} in {out_dir}: it must save per-case metrics with "
            "MetricsSaver (see bundles/polyp_kdas/configs/evaluate.json)"
        )
    files = {**CORE_CSVS}
    for path in sorted(out_dir.glob("val_*_raw.csv")):
        if path.name not in CORE_CSVS.values():
            files[path.name[len("val_") : -len("_raw.csv")]] = path.name
    filenames: list[str] | None = None
    per_case: dict[str, list[float]] = {}
    for metric, file in files.items():
        rows, columns = _read_raw_csv(out_dir / file)
        if filenames is None:
            filenames = rows
        elif rows != filenames:
            raise SystemExit(f"{out_dir / file} lists other cases than {out_dir / CORE_CSVS['mean_dice']}")
        per_case[metric] = columns.get("mean", [])
        prefix = CLASS_PREFIXES.get(metric, metric)
        for i, name in enumerate(names_fg):
            if f"class{i}" in columns and (len(names_fg) > 1 or metric in ("mean_dice",)):
                per_case[f"{prefix}_{name}"] = columns[f"class{i}"]
    filenames = filenames or []
    flags = details.get(HD95_PENALISED)
    penalised = None
    if flags is not None:
        flags = torch.as_tensor(flags)
        penalised = [int(v) for v in flags.reshape(flags.shape[0], -1).bool().any(dim=1).tolist()]
        if len(penalised) != len(filenames):
            penalised = None
    dice = _csv_means(out_dir / CORE_CSVS["mean_dice"])
    extra = {m: _csv_means(out_dir / f).get("mean", float("nan")) for m, f in files.items() if m not in CORE_CSVS}
    return {
        "dice": {name: dice.get(f"class{i}", float("nan")) for i, name in enumerate(names_fg)},
        "mean_dice": dice["mean"],
        "mean_iou": _csv_means(out_dir / CORE_CSVS["mean_iou"])["mean"],
        "hd95": _csv_means(out_dir / CORE_CSVS["hd95"])["mean"],
        "extra": extra,
        "cases": len(filenames),
        "per_case": {
            "cases": _unique([_case_id(f, case_root) for f in filenames]),
            "main": list(files),
            "metrics": per_case,
            "hd95_penalised": penalised,
            "hd95_nonfinite": sum(1 for v in per_case["hd95"] if not math.isfinite(v)),
        },
    }
