"""Compare distillation methods on one bundle: same data split, seed and budget; one table, one MLflow experiment.

For a bundle and a list of methods (``configs/methods/<name>.json`` override files; ``none`` is the student
alone), this trains the teacher once (or reuses ``--teacher_ckpt``), trains the student with each method, evaluates
the teacher and every student on the same test split, and writes ``results.md`` and ``results.json`` in ``--out``.
Every training is one MLflow run (named after the method) in one experiment, stored in ``<out>/mlruns.db``::

    python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas \\
        --dataset_dir <prepared data> --out outputs/compare_polyp --epochs 20 --image_size 128 128

    mlflow ui --backend-store-uri sqlite:///outputs/compare_polyp/mlruns.db

``--methods all`` runs every override file of the bundle (``none`` first). A method may combine override files with
``+``: ``none+labelled_only`` merges ``methods/none.json`` then ``labelled_only.json`` (each part is looked up in
``configs/methods/`` first, then in ``configs/``), e.g. to compare semi-supervised variants.

Bundles with a paraphraser stage (a ``configs/train_paraphraser.json``) get it run once, after the teacher, into the
teacher's ``models`` folder (or into ``<out>/paraphraser/models`` when ``--teacher_ckpt`` is given); every method
then receives ``paraphraser_dir`` pointing there (``--paraphraser_dir`` reuses paraphrasers trained before).

Evaluation reads the CSVs that the bundle's ``evaluate.json`` writes with MONAI's ``MetricsSaver``:
``val_mean_dice_raw.csv`` (one ``class<i>`` column per foreground class), ``val_mean_iou_raw.csv``,
``val_hd95_raw.csv``, and any other ``val_<name>_raw.csv`` becomes one more column (e.g. clDice).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PARAPHRASER_CONFIG = "train_paraphraser.json"
"""A bundle's paraphraser pre-training stage (merged onto ``train.json``), run once after the teacher when present."""

__all__ = ["available_methods", "method_configs", "train_stage", "evaluate_stage", "compare", "markdown_table", "main"]


def _configs(bundle: Path, names: Sequence[str]) -> list[str]:
    return [str(bundle / "configs" / n) for n in names]


def available_methods(bundle: Path) -> list[str]:
    """The bundle's method override names (``configs/methods/*.json``), ``none`` first."""
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

    Args:
        bundle: the bundle folder.
        names: config files under ``configs/``, merged in order.
        tracking: ``{"experiment_name", "run_name", "tracking_uri"}`` to record the run in MLflow, or None.
        override: config overrides (``dataset_dir``, ``ckpt_dir``, ``epochs``...).
    """
    if tracking:
        override = {**override, **tracking}
    wf = _workflow(bundle, names, "train", tracking="mlflow" if tracking else None, **override)
    start = time.perf_counter()
    wf.initialize()
    wf.run()
    wf.finalize()
    return time.perf_counter() - start


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


def evaluate_stage(bundle: Path, names: Sequence[str], out_dir: Path, **override: Any) -> dict[str, Any]:
    """Evaluate a checkpoint on the test split with the bundle's ``evaluate.json``.

    Returns:
        ``{"dice": {class: mean}, "mean_dice", "mean_iou", "hd95", "cases"}`` (HD95 in pixels/voxels).
    """
    wf = _workflow(bundle, [*names, "evaluate.json"], "eval", output_dir=str(out_dir), **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    names_fg = [channels[k] for k in sorted(channels, key=int) if k != "0"]
    core = {"mean_dice": "val_mean_dice_raw.csv", "mean_iou": "val_mean_iou_raw.csv", "hd95": "val_hd95_raw.csv"}
    missing = [name for name in core.values() if not (out_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"{bundle.name}'s evaluate.json wrote no {missing} in {out_dir}: it must save per-case metrics with "
            "MetricsSaver (see bundles/polyp_kdas/configs/evaluate.json)"
        )
    dice = _csv_means(out_dir / core["mean_dice"])
    with (out_dir / core["mean_dice"]).open() as f:
        cases = sum(1 for _ in f) - 1
    extra = {
        path.name[len("val_") : -len("_raw.csv")]: _csv_means(path).get("mean", float("nan"))
        for path in sorted(out_dir.glob("val_*_raw.csv"))
        if path.name not in core.values()
    }
    return {
        "dice": {name: dice.get(f"class{i}", float("nan")) for i, name in enumerate(names_fg)},
        "mean_dice": dice["mean"],
        "mean_iou": _csv_means(out_dir / core["mean_iou"])["mean"],
        "hd95": _csv_means(out_dir / core["hd95"])["mean"],
        "extra": extra,
        "cases": cases,
    }


def _parameters(bundle: Path, net_id: str, **override: Any) -> int:
    """Parameters of the network ``net_id`` of ``train.json`` with the run's overrides (e.g. ``in_channels``)."""
    parser = _workflow(bundle, ["train.json"], "train", **override).parser
    return sum(p.numel() for p in parser.get_parsed_content(net_id, instantiate=True).parameters())


def _log_test_metrics(tracking: dict, run_name: str, result: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking["tracking_uri"])
    experiment = client.get_experiment_by_name(tracking["experiment_name"])
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    if not runs:
        return
    metrics = {"test_mean_dice": result["mean_dice"], "test_mean_iou": result["mean_iou"], "test_hd95": result["hd95"]}
    metrics.update({f"test_dice_{k}": v for k, v in result["dice"].items()})
    metrics.update({f"test_{k}": v for k, v in result.get("extra", {}).items()})
    for key, value in metrics.items():
        if math.isfinite(value):
            client.log_metric(runs[0].info.run_id, key, value)


def compare(
    bundle_name: str,
    methods: Sequence[str],
    dataset_dir: str | Path,
    out: str | Path,
    teacher_ckpt: str | Path | None = None,
    teacher_epochs: int | None = None,
    track: bool = True,
    paraphraser_dir: str | Path | None = None,
    hd95_unit: str = "px",
    **override: Any,
) -> list[dict[str, Any]]:
    """Train the teacher (unless given) and each method with the same settings, evaluate all; write the tables.

    Args:
        bundle_name: a folder under ``bundles/``.
        methods: method names (``configs/methods/<name>.json``); ``none`` trains the student alone.
        dataset_dir: the prepared data folder (holding ``datalist.json``).
        out: output folder: one sub-folder per model, ``results.md``, ``results.json``, ``mlruns.db``.
        teacher_ckpt: an already trained teacher; trained into ``<out>/teacher`` when None.
        teacher_epochs: the teacher's epochs (default: the same as the students').
        track: record each training as an MLflow run in the experiment ``compare_<bundle>``.
        paraphraser_dir: paraphrasers already trained for this teacher; when None and the bundle has a
            ``train_paraphraser.json``, they are trained once, after the teacher.
        hd95_unit: the unit of the table's HD95 column (see :func:`markdown_table`).
        override: config overrides shared by every stage (``epochs``, ``image_size``, ``batch_size``, ``seed``...).

    Returns:
        one result row per model (teacher first).
    """
    bundle = BUNDLES / bundle_name
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"dataset_dir": str(Path(dataset_dir).resolve()), **override}
    uri = f"sqlite:///{out / 'mlruns.db'}"
    tracking = {"experiment_name": f"compare_{bundle_name}", "tracking_uri": uri} if track else None

    rows = []
    teacher_time = float("nan")
    trained_teacher = teacher_ckpt is None
    if trained_teacher:
        teacher_dir = out / "teacher"
        teacher_ckpt = teacher_dir / "models" / "teacher.pt"
        epochs = {"epochs": teacher_epochs} if teacher_epochs else {}
        teacher_time = train_stage(
            bundle,
            ["train.json", "train_teacher.json"],
            tracking={**tracking, "run_name": "teacher"} if tracking else None,
            **{**common, **epochs, "ckpt_dir": str(teacher_dir / "models"), "output_dir": str(teacher_dir / "eval")},
        )
    teacher_ckpt = Path(teacher_ckpt).resolve()
    if not teacher_ckpt.is_file():
        raise SystemExit(f"teacher checkpoint {teacher_ckpt} not found: train it first or omit --teacher_ckpt")
    result = evaluate_stage(
        bundle,
        ["train.json", "train_teacher.json"],
        out / "teacher" / "test",
        **{**common, "ckpt_dir": str(teacher_ckpt.parent), "ckpt_name": teacher_ckpt.name},
    )
    if tracking and trained_teacher:
        _log_test_metrics(tracking, "teacher", result)
    rows.append(
        {"model": "teacher", "params": _parameters(bundle, "teacher_def", **common), "train_s": teacher_time, **result}
    )

    if list(methods) == ["all"]:
        methods = available_methods(bundle)
    for method in methods:  # fail before hours of training, not after
        method_configs(bundle, method)
    shared = {"teacher_ckpt": str(teacher_ckpt)}
    if paraphraser_dir is None and (bundle / "configs" / PARAPHRASER_CONFIG).is_file():
        paraphraser_dir = teacher_ckpt.parent if trained_teacher else out / "paraphraser" / "models"
        train_stage(
            bundle,
            ["train.json", PARAPHRASER_CONFIG],
            tracking={**tracking, "run_name": "paraphraser"} if tracking else None,
            **{**common, **shared, "ckpt_dir": str(paraphraser_dir), "output_dir": str(out / "paraphraser" / "eval")},
        )
    if paraphraser_dir is not None:
        shared["paraphraser_dir"] = str(Path(paraphraser_dir).resolve())

    student_params = _parameters(bundle, "network_def", **common)
    for method in methods:
        names = method_configs(bundle, method)
        run_dir = out / method
        stage = {**common, **shared, "ckpt_dir": str(run_dir / "models")}
        seconds = train_stage(
            bundle,
            names,
            tracking={**tracking, "run_name": method} if tracking else None,
            **{**stage, "output_dir": str(run_dir / "eval")},
        )
        result = evaluate_stage(bundle, names, run_dir / "test", **stage)
        if tracking:
            _log_test_metrics(tracking, method, result)
        rows.append({"model": f"student: {method}", "params": student_params, "train_s": seconds, **result})

    settings = {
        "bundle": bundle_name,
        "hd95_unit": hd95_unit,
        "methods": list(methods),
        "teacher_ckpt": str(teacher_ckpt),
        **{k: v for k, v in {**common, **shared}.items() if k not in ("dataset_dir", "teacher_ckpt")},
    }
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    (out / "results.md").write_text(markdown_table(rows, hd95_unit) + "\n")
    return rows


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


EXTRA_LABELS = {"cldice": "clDice"}
"""Column titles of extra metrics (by their ``val_<name>_raw.csv`` name); others are shown as named."""


def markdown_table(rows: Sequence[dict[str, Any]], hd95_unit: str = "px") -> str:
    """A markdown table: model, Dice per class, mean Dice, IoU, HD95, extra metrics (e.g. clDice), parameters,
    training time; the difference of each distilled student to the student alone (``none``, or else the first
    ``none+<override>``) when it is in the table.

    Args:
        rows: result rows of :func:`compare`.
        hd95_unit: the HD95 column's unit: ``"px"``, ``"vox"`` (volumes of unknown spacing) or ``"mm"``.
    """
    classes = list(rows[0]["dice"]) if rows else []
    extras = list(rows[0].get("extra", {})) if rows else []
    baseline = next((r for r in rows if r["model"] == "student: none"), None)
    if baseline is None:  # e.g. "none+labelled_only": the student alone on the same data
        baseline = next((r for r in rows if r["model"].startswith("student: none+")), None)
    header = [
        "model",
        *[f"Dice {c}" for c in classes],
        "mean Dice",
        "Δ vs none",
        "IoU",
        f"HD95 ({hd95_unit})",
        *[EXTRA_LABELS.get(e, e) for e in extras],
        "params",
        "train s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        delta = (
            ""
            if baseline is None or r is baseline or r["model"] == "teacher"
            else r["mean_dice"] - baseline["mean_dice"]
        )
        cells = [
            r["model"],
            *[_fmt(r["dice"][c]) for c in classes],
            _fmt(r["mean_dice"]),
            "" if delta == "" else f"{delta:+.4f}",
            _fmt(r["mean_iou"]),
            _fmt(r["hd95"], 2),
            *[_fmt(r.get("extra", {}).get(e, float("nan"))) for e in extras],
            f"{r['params']:,}",
            _fmt(r["train_s"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_override(items: Sequence[str]) -> dict[str, Any]:
    override = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override takes key=value pairs, got {item!r}")
        try:
            override[key] = json.loads(value)
        except json.JSONDecodeError:
            override[key] = value
    return override


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle folder name under bundles/")
    parser.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="method override names ('none' = student alone; 'all' = every configs/methods file; 'a+b' merges two)",
    )
    parser.add_argument("--dataset_dir", required=True, help="prepared data folder holding datalist.json")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--teacher_ckpt", default=None, help="a trained teacher (skips teacher training)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every student (default: the bundle's)")
    parser.add_argument("--teacher_epochs", type=int, default=None, help="epochs of the teacher")
    parser.add_argument("--paraphraser_dir", default=None, help="paraphrasers already trained for this teacher")
    parser.add_argument("--hd95_unit", default="px", help="unit of the HD95 column: px, vox (unknown spacing) or mm")
    parser.add_argument("--image_size", type=int, nargs="+", default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_mlflow", action="store_true", help="do not record MLflow runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); use 1 when other jobs share the cores",
    )
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides, key=value (JSON value)")
    args = parser.parse_args(argv)
    override = {
        k: v
        for k, v in {
            "epochs": args.epochs,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    override.update(_parse_override(args.override))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = compare(
        args.bundle,
        args.methods,
        args.dataset_dir,
        args.out,
        teacher_ckpt=args.teacher_ckpt,
        teacher_epochs=args.teacher_epochs,
        track=not args.no_mlflow,
        paraphraser_dir=args.paraphraser_dir,
        hd95_unit=args.hd95_unit,
        **override,
    )
    print(markdown_table(rows, hd95_unit=args.hd95_unit))
    print(f"\nwritten: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
