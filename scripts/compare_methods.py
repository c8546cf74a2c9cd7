"""Compare distillation methods on one bundle over seeds, with confidence intervals that say if a difference is real.

For a bundle and a list of methods (``configs/methods/<name>.json`` override files; ``none`` is the student
alone), this trains the teacher once (or reuses ``--teacher_ckpt``), trains the student with each method once per
seed, evaluates the teacher and every student on the same test split (and on further datasets with
``--eval_sets``), and writes ``results.md``, ``results.json`` and one plot per evaluated set in ``--out``::

    python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
        --dataset_dir <prepared data> --out outputs/compare_polyp --epochs 20 --image_size 128 128

    mlflow ui --backend-store-uri sqlite:///outputs/compare_polyp/mlruns.db

Runs and files
    The teacher is trained once, with the first seed, into ``<out>/teacher/`` (or ``--teacher_ckpt`` is reused);
    each method is trained once per seed into ``<out>/<method>/seed<k>/`` (``models/``, ``eval/``, ``test/`` with
    the per-case CSVs, ``result.json``). ``--methods all`` runs every override file of the bundle (``none`` first).
    A method may combine override files with ``+``: ``none+labelled_only`` merges ``methods/none.json`` then
    ``labelled_only.json`` (each part is looked up in ``configs/methods/`` first, then in ``configs/``). Bundles with
    a paraphraser stage (``configs/train_paraphraser.json``) get it run once, after the teacher, into the teacher's
    ``models`` folder (or ``<out>/paraphraser/models`` with ``--teacher_ckpt``); ``--paraphraser_dir`` reuses
    paraphrasers trained before. Every training is one MLflow run, tagged ``method`` and ``seed`` (run names
    ``teacher``, ``paraphraser``, ``<method> seed<k>``), with its test metrics and ``result.json``; one more run,
    ``comparison``, holds ``results.md``, ``results.json`` and the plots.

Ensemble teacher (``--teacher_ckpt a.pt b.pt c.pt``)
    Several checkpoints of the bundle's ``teacher_def`` (e.g. teachers trained with different seeds or folds) make
    one teacher, :func:`kd_components.load_ensemble_teacher`: the mean of the members' logits, with the feature taps
    of the first member (``tap_member=0``). Every job then uses the ensemble where the bundle's config has a
    teacher (a method that sets ``"teacher": null``, e.g. ``none``, keeps none): the students distil from it, the
    paraphrasers are trained on it, and the teacher job evaluates the ensemble itself (the bundle's
    ``evaluate.json`` with its ``network`` overridden by the ensemble and its ``CheckpointLoader`` of ``@network``
    disabled, so any bundle works), so the table's teacher row and teacher–student gap are the ensemble's. Its
    ``params`` are those of every member together. The overlays of the students' evaluations still draw the first
    member as their teacher panel. A single ``--teacher_ckpt`` is the plain teacher, as before::

        python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
            --dataset_dir data/kvasir --out outputs/cmp_ensemble \\
            --teacher_ckpt teachers/seed0/teacher.pt teachers/seed1/teacher.pt teachers/seed2/teacher.pt

The table (``results.md``, one section per evaluated set)
    - every metric (Dice per class, mean Dice, IoU, HD95, extra metrics such as clDice) as mean ± sd over seeds of
      each run's mean over the cases;
    - Δ vs ``none`` (or else the first ``none+<override>``), with a 95 % paired bootstrap CI over test cases: each
      model's per-case metric is averaged over its seeds, then the per-case differences to the student alone are
      resampled (``--n_resamples``, default 10000, seeded, so the same results give the same interval);
    - a verdict: ``better`` / ``worse`` when the CI excludes 0 on that side (for HD95 lower is better),
      ``no evidence`` otherwise;
    - the teacher–student gap (teacher − none, with its CI, on a line above the table and in the teacher's row) and
      the fraction of it each distilled student closes, (distilled − none) / (teacher − none), n/a when the teacher
      is not better than the student alone;
    - HD95 honesty: the bundles' ``evaluate.json`` score a class whose prediction is empty while its label is not
      (or the reverse) with the image diagonal of that case (``kd_components.metrics.SpacedHausdorffDistance``
      with ``empty_penalty="diagonal"``), instead of MONAI's inf/NaN that a mean silently drops; the table counts
      those cases per run. With an ``evaluate.json`` without the penalty, the non-finite cases are counted and
      stated as left out.

Further datasets (``--eval_sets name=path ...``)
    Every trained model, the teacher included, is also evaluated on each named prepared dataset (a folder holding a
    ``datalist.json`` in the bundle's format, e.g. prepared with the same ``kd_components.data`` command as the
    training data): on its ``test`` split when it has one, otherwise on every labelled item of all its splits.
    A dataset used only for evaluation is best prepared whole as its test split (``--fractions 0 0 1``); with
    the default split only its ``test`` tenth would be evaluated (the section header names the split and the
    number of cases). Each set gets its own section with its own values, Δ, CIs and verdicts. E.g. polyp models
    trained on Kvasir-SEG, tested on CVC-ClinicDB too::

        python -m kd_components.data.polyp --kvasir <Kvasir-SEG> --out data/kvasir
        python -m kd_components.data.polyp --clinicdb <CVC-ClinicDB> --out data/cvc --fractions 0 0 1
        python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
            --dataset_dir data/kvasir --eval_sets cvc=data/cvc --out outputs/kvasir_vs_cvc

    The images are preprocessed by the bundle's ``evaluate.json`` exactly as the test split (same size, same
    intensity scaling); the set must have the same classes and channels as the training data.

Scale-out (every (method, seed) run is an independent job)
    ``--plan`` writes ``<out>/plan.json`` (all settings) and ``<out>/jobs.sh`` (one command per job) and trains
    nothing. Run the ``teacher`` job first (it trains the teacher and the paraphrasers and evaluates the teacher),
    then the others in any order or in parallel (on your GPUs or through your scheduler), then ``--collect``::

        python scripts/compare_methods.py --bundle polyp_kdas --methods none kdas --seeds 0 1 2 \\
            --dataset_dir data/kvasir --out outputs/cmp --plan
        python scripts/compare_methods.py --out outputs/cmp --only_job teacher
        python scripts/compare_methods.py --out outputs/cmp --only_job kdas:1      # <method>:<seed>, any order
        python scripts/compare_methods.py --out outputs/cmp --collect

    Each job writes ``<out>/<method>/seed<k>/result.json`` (``<out>/teacher/result.json``) with its per-case,
    per-set metrics; ``--collect`` builds ``results.md`` / ``results.json`` / plots from the finished ones (missing
    jobs are listed). ``--only_job`` and ``--collect`` read every setting from ``plan.json``. The default (no
    ``--plan``) writes the same plan and runs the jobs one after the other, then collects. Parallel jobs write to
    one MLflow store: the default ``sqlite:///<out>/mlruns.db`` is fine on one machine; across machines pass
    ``--tracking_uri`` (an MLflow server) at planning time, or ``--no_mlflow``.

Joining comparisons (``--collect --join OTHER ...``)
    A variant trained later in a plan of its own (one override changed, e.g. a cheaper critic, over the same seeds)
    is compared in one table with the first plan's student alone, teacher and methods: ``--join`` adds the other
    plans' finished students as rows named by the settings they change (``lightvessel [critic_every=2]``), paired on
    the same test cases with the same statistics, and each joined row is also compared with the same method of the
    first plan (a section of its own: Δ, CI, verdict). The plans must share the bundle, the evaluated sets and the
    teacher's weights (else it stops and says which differs). The report goes to ``<out>/joined/``::

        python scripts/compare_methods.py --out outputs/cmp --collect --join outputs/cmp_cheap_critic

Determinism
    Each stage is seeded (``monai.utils.set_determinism`` before the workflow is built, and again by the bundles'
    ``initialize``) and runs with ``torch.use_deterministic_algorithms(True, warn_only=True)``: the same seed
    gives the same numbers on the same machine, with the same number of torch threads (``--threads``; the
    default is torch's, one per core). A different thread count or another machine changes the floating-point
    summation order, and so the numbers, as much as a different seed can. Each ``result.json`` records the thread
    count, device and a digest of the trained weights.

Evaluation reads the CSVs that the bundle's ``evaluate.json`` writes with MONAI's ``MetricsSaver``:
``val_mean_dice_raw.csv`` (one ``class<i>`` column per foreground class), ``val_mean_iou_raw.csv``,
``val_hd95_raw.csv``, and any other ``val_<name>_raw.csv`` becomes one more metric (e.g. clDice). Cases are named
by their image path relative to the dataset folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # kd_components, when the script runs from elsewhere
    sys.path.insert(0, str(REPO))

from kd_components import stats  # noqa: E402
from kd_components.progress import format_duration  # noqa: E402

BUNDLES = REPO / "bundles"
PARAPHRASER_CONFIG = "train_paraphraser.json"
"""A bundle's paraphraser pre-training stage (merged onto ``train.json``), run once after the teacher when present."""
PLAN_FILE = "plan.json"
JOBS_FILE = "jobs.sh"
RESULT_FILE = "result.json"
TEACHER_JOB = "teacher"
PRIMARY_SET = "test"
"""The name of the ``--dataset_dir`` test split among the evaluated sets."""
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
HD95_PENALISED = "val_hd95_penalised"
"""The per-case flags that ``kd_components.metrics.SpacedHausdorffDistance(empty_penalty=...)`` records."""

__all__ = [
    "available_methods",
    "method_configs",
    "train_stage",
    "evaluate_stage",
    "make_plan",
    "read_plan",
    "teacher_checkpoints",
    "ensemble_overrides",
    "plan_jobs",
    "job_command",
    "job_dir",
    "run_job",
    "collect",
    "join_plans",
    "join_label",
    "versus_own_method",
    "run_comparison",
    "compare",
    "summarize",
    "markdown_table",
    "markdown_report",
    "plot_comparison",
    "main",
]


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


CORE_CSVS = {"mean_dice": "val_mean_dice_raw.csv", "mean_iou": "val_mean_iou_raw.csv", "hd95": "val_hd95_raw.csv"}
CLASS_PREFIXES = {"mean_dice": "dice", "mean_iou": "iou", "hd95": "hd95"}


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


# ---------------------------------------------------------------------------------------------------------------- #
# MLflow


def _tracking(plan: Mapping[str, Any]) -> dict[str, str] | None:
    if not plan["track"]:
        return None
    return {"experiment_name": plan["experiment_name"], "tracking_uri": plan["tracking_uri"]}


def _client(tracking: Mapping[str, str]) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking["tracking_uri"])


def _experiment_id(tracking: Mapping[str, str], artifact_dir: Path) -> str:
    """The comparison's MLflow experiment, created with its artifacts under ``artifact_dir`` when new."""
    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking["experiment_name"])
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(tracking["experiment_name"], artifact_location=artifact_dir.as_uri())
    except Exception:  # created meanwhile by a parallel job
        return client.get_experiment_by_name(tracking["experiment_name"]).experiment_id


def _latest_run(tracking: Mapping[str, str], run_name: str) -> str | None:
    """The id of the latest MLflow run named ``run_name`` in the comparison's experiment."""
    client = _client(tracking)
    experiment = client.get_experiment_by_name(tracking["experiment_name"])
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.runName = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _record_run(
    tracking: Mapping[str, str], run_id: str | None, tags: Mapping[str, Any], result: Mapping[str, Any] | None = None
) -> None:
    """Tag an MLflow run and log a job's test metrics (``test_*``, ``<set>_*``) and its result file there."""
    if run_id is None:
        return
    client = _client(tracking)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
    if result is None:
        return
    for set_name, values in result["sets"].items():
        metrics = {"mean_dice": values["mean_dice"], "mean_iou": values["mean_iou"], "hd95": values["hd95"]}
        metrics.update({f"dice_{k}": v for k, v in values["dice"].items()})
        metrics.update(values.get("extra", {}))
        if values["per_case"]["hd95_penalised"] is not None:
            metrics["hd95_penalised"] = sum(values["per_case"]["hd95_penalised"])
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                client.log_metric(run_id, f"{set_name}_{key}", float(value))
    if result.get("result_file"):
        client.log_artifact(run_id, result["result_file"])


# ---------------------------------------------------------------------------------------------------------------- #
# plan and jobs


def _student_seeds(seeds: Sequence[int] | None, override: dict[str, Any]) -> list[int]:
    """The seeds: ``seeds``, else the ``seed`` override (removed from ``override``), else 0."""
    single = override.pop("seed", None)
    if seeds is None or len(seeds) == 0:
        seeds = [0 if single is None else int(single)]
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds are repeated: {seeds}")
    return seeds


def _parse_eval_sets(eval_sets: Mapping[str, str | Path] | Sequence[str] | None) -> dict[str, Path]:
    """``{name: folder}`` from a mapping or ``name=path`` strings."""
    if not eval_sets:
        return {}
    if not isinstance(eval_sets, Mapping):
        parsed: dict[str, str] = {}
        for item in eval_sets:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise SystemExit(f"--eval_sets takes name=path pairs, got {item!r}")
            if name in parsed:
                raise SystemExit(f"--eval_sets names {name!r} twice")
            parsed[name] = path
        eval_sets = parsed
    out = {}
    for name, path in eval_sets.items():
        if not name.replace("_", "").replace("-", "").isalnum() or name == PRIMARY_SET:
            raise SystemExit(
                f"an --eval_sets name must be letters, digits, '_' or '-', and not {PRIMARY_SET!r}: {name!r}"
            )
        folder = Path(path).resolve()
        if not (folder / "datalist.json").is_file():
            raise SystemExit(f"--eval_sets {name}: {folder} holds no datalist.json (prepare the dataset first)")
        out[name] = folder
    return out


def _absolute_item(item: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """A datalist item with every relative path that exists under ``root`` made absolute."""
    out = {}
    for key, value in item.items():
        if isinstance(value, str) and not os.path.isabs(value) and (root / value).exists():
            value = str((root / value).resolve())
        out[key] = value
    return out


def _eval_set_entry(name: str, folder: Path, out: Path) -> dict[str, str]:
    """How a set is evaluated: its own ``datalist.json`` when it has a non-empty ``test`` split; else a datalist
    written to ``<out>/eval_sets/<name>/datalist.json`` whose ``test`` split holds every labelled item of all its
    splits (absolute paths; other top-level entries, e.g. ``metadata``, are kept)."""
    datalist = json.loads((folder / "datalist.json").read_text())
    if isinstance(datalist.get("test"), list) and datalist["test"]:
        return {"dataset_dir": str(folder), "datalist": str(folder / "datalist.json"), "split": "test"}
    items = [
        _absolute_item(item, folder)
        for value in datalist.values()
        if isinstance(value, list)
        for item in value
        if isinstance(item, Mapping) and "label" in item
    ]
    if not items:
        raise SystemExit(f"--eval_sets {name}: {folder / 'datalist.json'} has no labelled item to evaluate")
    derived = {k: v for k, v in datalist.items() if not isinstance(v, list)}
    derived["test"] = items
    path = out / "eval_sets" / name / "datalist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(derived, indent=2))
    return {"dataset_dir": str(folder), "datalist": str(path), "split": "all labelled items"}


def _plan_id(plan: Mapping[str, Any]) -> str:
    content = {k: v for k, v in plan.items() if k not in ("plan_id", "created")}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_plan(
    bundle_name: str,
    methods: Sequence[str],
    dataset_dir: str | Path,
    out: str | Path,
    seeds: Sequence[int] | None = None,
    teacher_ckpt: str | Path | Sequence[str | Path] | None = None,
    teacher_epochs: int | None = None,
    track: bool = True,
    paraphraser_dir: str | Path | None = None,
    hd95_unit: str = "px",
    eval_sets: Mapping[str, str | Path] | Sequence[str] | None = None,
    n_resamples: int = 10000,
    tracking_uri: str | None = None,
    deterministic: bool = True,
    **override: Any,
) -> dict[str, Any]:
    """Check the settings of a comparison and write them to ``<out>/plan.json``; trains nothing.

    Args:
        bundle_name: a folder under ``bundles/``.
        methods: method names (``configs/methods/<name>.json``, ``a+b`` merges two; ``["all"]``: every method).
        dataset_dir: the prepared data folder (holding ``datalist.json``); its ``test`` split is the main set.
        out: the output folder.
        seeds: the students' seeds (one run per method and seed); None: the ``seed`` override, else 0. The teacher
            and paraphrasers are trained once, with the first seed.
        teacher_ckpt: an already trained teacher, or several checkpoints of ``teacher_def`` that make an ensemble
            teacher (see :func:`ensemble_overrides`); trained into ``<out>/teacher`` when None. The plan's
            ``teacher_ckpt`` is one path (a single checkpoint, as in earlier plans) or a list of paths (an ensemble).
        teacher_epochs: the teacher's epochs (default: the same as the students').
        track: record each training as an MLflow run in the experiment ``compare_<bundle>``.
        paraphraser_dir: paraphrasers already trained for this teacher; when None and the bundle has a
            ``train_paraphraser.json``, they are trained once, after the teacher.
        hd95_unit: the unit of the HD95 column: ``"px"``, ``"vox"`` (volumes of unknown spacing) or ``"mm"``.
        eval_sets: further prepared datasets, ``{name: folder}`` or ``["name=folder", ...]``.
        n_resamples: bootstrap resamples of the CIs.
        tracking_uri: the MLflow store; None: ``sqlite:///<out>/mlruns.db``.
        deterministic: run the jobs with ``torch.use_deterministic_algorithms(True, warn_only=True)``.
        override: config overrides shared by every stage (``epochs``, ``image_size``, ``batch_size``...).

    Returns:
        the plan (also in ``<out>/plan.json``).
    """
    bundle = BUNDLES / bundle_name
    if not (bundle / "configs" / "train.json").is_file():
        raise SystemExit(f"no bundle {bundle_name!r} in {BUNDLES}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    override = dict(override)
    seeds = _student_seeds(seeds, override)
    methods = list(methods)
    if methods == ["all"]:
        methods = available_methods(bundle)
    if not methods or len(set(methods)) != len(methods):
        raise SystemExit(f"--methods must name each method once, got {methods}")
    for method in methods:  # fail before hours of training, not after
        method_configs(bundle, method)
    dataset_dir = Path(dataset_dir).resolve()
    if not (dataset_dir / "datalist.json").is_file():
        raise SystemExit(f"--dataset_dir {dataset_dir} holds no datalist.json (prepare the data first)")
    sets = {
        PRIMARY_SET: {"dataset_dir": str(dataset_dir), "datalist": str(dataset_dir / "datalist.json"), "split": "test"}
    }
    for name, folder in _parse_eval_sets(eval_sets).items():
        sets[name] = _eval_set_entry(name, folder, out)
    if isinstance(teacher_ckpt, (str, Path)):
        teacher_ckpt = [teacher_ckpt]
    trained_teacher = teacher_ckpt is None or len(teacher_ckpt) == 0
    if trained_teacher:
        teacher_paths = [out / "teacher" / "models" / "teacher.pt"]
    else:
        teacher_paths = [Path(p).resolve() for p in teacher_ckpt]
        for i, path in enumerate(teacher_paths):
            if not path.is_file():
                which = f"teacher checkpoint {path}" if len(teacher_paths) == 1 else f"ensemble member {i} {path}"
                raise SystemExit(f"{which} not found: train it first or omit --teacher_ckpt")
        repeated = sorted({str(p) for p in teacher_paths if teacher_paths.count(p) > 1})
        if repeated:
            raise SystemExit(f"--teacher_ckpt lists {repeated} more than once: give each ensemble member once")
    teacher_path = teacher_paths[0]
    train_paraphraser = paraphraser_dir is None and (bundle / "configs" / PARAPHRASER_CONFIG).is_file()
    if train_paraphraser:
        paraphraser_dir = teacher_path.parent if trained_teacher else out / "paraphraser" / "models"
    plan: dict[str, Any] = {
        "bundle": bundle_name,
        "methods": methods,
        "seeds": seeds,
        "sets": sets,
        # one path: the plain teacher (the format of earlier plans); several: an ensemble of those checkpoints
        "teacher_ckpt": str(teacher_path) if len(teacher_paths) == 1 else [str(p) for p in teacher_paths],
        "train_teacher": trained_teacher,
        "teacher_epochs": teacher_epochs,
        "paraphraser_dir": None if paraphraser_dir is None else str(Path(paraphraser_dir).resolve()),
        "train_paraphraser": train_paraphraser,
        "hd95_unit": hd95_unit,
        "n_resamples": int(n_resamples),
        "track": bool(track),
        "tracking_uri": tracking_uri or f"sqlite:///{out / 'mlruns.db'}",
        "experiment_name": f"compare_{bundle_name}",
        "deterministic": bool(deterministic),
        "override": override,
        "out": str(out),
    }
    plan["plan_id"] = _plan_id(plan)
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    return plan


def read_plan(out: str | Path) -> dict[str, Any]:
    """The plan of a comparison folder (written by :func:`make_plan`, ``--plan`` or a sequential run).

    Args:
        out: the comparison's output folder.
    """
    path = Path(out).resolve() / PLAN_FILE
    if not path.is_file():
        raise SystemExit(
            f"no {PLAN_FILE} in {path.parent}: write one with --plan (or run the comparison once without --plan)"
        )
    return json.loads(path.read_text())


def teacher_checkpoints(plan: Mapping[str, Any]) -> list[Path]:
    """The teacher checkpoint(s) of a plan: one path for a plain teacher, several for an ensemble teacher.

    Args:
        plan: a plan from :func:`make_plan` / :func:`read_plan` (its ``teacher_ckpt`` is a path or a list of paths).
    """
    value = plan["teacher_ckpt"]
    return [Path(value)] if isinstance(value, str) else [Path(p) for p in value]


def ensemble_overrides(
    bundle: Path, names: Sequence[str], checkpoints: Sequence[str | Path], evaluated: bool = False
) -> dict[str, Any]:
    """Config overrides that make the ensemble of ``checkpoints`` the teacher of a bundle's stage.

    The bundle's ``teacher`` becomes ``kd_components.load_ensemble_teacher(@teacher_def, [checkpoints], @device,
    tap_member=0, hint=@teacher_hint)`` (the mean of the members' logits, the first member's feature taps), unless
    the merged configs set ``"teacher": null`` (the student alone keeps no teacher). With ``evaluated``, the
    ensemble is also the network that ``evaluate.json`` evaluates: ``network`` is overridden by it, and each
    ``CheckpointLoader`` of ``validate#handlers`` that loads into ``@network`` is disabled (``_disabled_``: the
    members are loaded from their own files; one file loaded into the ensemble would not fit it).

    Args:
        bundle: the bundle folder.
        names: the stage's config files under ``configs/`` (``evaluate.json`` is appended with ``evaluated``).
        checkpoints: the members' state-dict files of ``teacher_def``, tap member first.
        evaluated: override the evaluated network too (the teacher job's evaluation of the ensemble).

    Returns:
        ``{"teacher": ...}`` (or ``{}`` when the configs set no teacher), and with ``evaluated`` also
        ``{"network": ..., "validate#handlers#<i>#_disabled_": True}``.
    """
    members = repr([str(p) for p in checkpoints])
    ensemble = (
        f"$kd_components.load_ensemble_teacher(@teacher_def, {members}, @device, tap_member=0, hint=@teacher_hint)"
    )
    configs = [*names, "evaluate.json"] if evaluated else list(names)
    parser = _workflow(bundle, configs, "eval" if evaluated else "train").parser
    override: dict[str, Any] = {} if parser.get("teacher", "") is None else {"teacher": ensemble}
    if not evaluated:
        return override
    override["network"] = ensemble
    handlers = parser.get("validate#handlers", [])
    for i, handler in enumerate(handlers if isinstance(handlers, list) else []):
        target = str(handler.get("_target_", "")) if isinstance(handler, Mapping) else ""
        load_dict = handler.get("load_dict") if isinstance(handler, Mapping) else None
        if target.rsplit(".", 1)[-1] == "CheckpointLoader" and "@network" in dict(load_dict or {}).values():
            override[f"validate#handlers#{i}#_disabled_"] = True
    return override


def plan_jobs(plan: Mapping[str, Any]) -> list[str]:
    """The jobs of a plan: ``teacher`` first, then ``<method>:<seed>`` for every seed and method (seed by seed).

    Args:
        plan: a plan from :func:`make_plan` / :func:`read_plan`.
    """
    return [TEACHER_JOB, *[f"{m}:{s}" for s in plan["seeds"] for m in plan["methods"]]]


def _parse_job(plan: Mapping[str, Any], job: str) -> tuple[str, int | None]:
    if job == TEACHER_JOB:
        return TEACHER_JOB, None
    method, sep, seed = job.rpartition(":")
    if not sep or not seed.lstrip("-").isdigit() or method not in plan["methods"] or int(seed) not in plan["seeds"]:
        raise SystemExit(f"unknown job {job!r}: the plan's jobs are {plan_jobs(plan)}")
    return method, int(seed)


def job_dir(plan: Mapping[str, Any], job: str) -> Path:
    """The folder of one job of a plan (``<out>/teacher`` or ``<out>/<method>/seed<k>``): its run, log and result."""
    method, seed = _parse_job(plan, job)
    out = Path(plan["out"])
    return out / TEACHER_JOB if seed is None else out / method / f"seed{seed}"


def job_command(plan: Mapping[str, Any], job: str, threads: int | None = None) -> str:
    """The shell command that runs one job of a plan (``--collect`` for ``job="collect"``).

    Args:
        plan: a plan from :func:`make_plan`.
        job: ``teacher``, ``<method>:<seed>`` or ``collect``.
        threads: torch CPU threads to pass on (``--threads``), or None.
    """
    args = ["python", str(Path(__file__).resolve()), "--out", plan["out"]]
    args += ["--collect"] if job == "collect" else ["--only_job", job]
    if threads and job != "collect":
        args += ["--threads", str(threads)]
    return shlex.join(args)


def _write_jobs_file(plan: Mapping[str, Any], threads: int | None = None) -> Path:
    jobs = plan_jobs(plan)
    lines = [
        "#!/bin/sh",
        f"# {len(jobs)} jobs of the comparison in {plan['out']} (plan {plan['plan_id']}).",
        "# 1. the teacher job first: it trains the teacher (and the paraphrasers) and evaluates the teacher",
        job_command(plan, jobs[0], threads),
        "# 2. these are independent: run them in any order, in parallel, or submit each to your scheduler",
        *[job_command(plan, job, threads) for job in jobs[1:]],
        "# 3. when they have finished (missing jobs are listed): the tables, plots and results.json",
        job_command(plan, "collect"),
    ]
    path = Path(plan["out"]) / JOBS_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def _reproducible(deterministic: bool, threads: int | None) -> Iterator[None]:
    """Deterministic torch algorithms (warn-only) and a fixed thread count for one job; restored afterwards."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA >= 10.2)
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])


def _environment() -> dict[str, Any]:
    return {
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _evaluate_sets(
    plan: Mapping[str, Any], bundle: Path, names: Sequence[str], run_dir: Path, stage: Mapping[str, Any]
) -> dict[str, Any]:
    """Evaluate one model on every set of the plan; ``{set: evaluate_stage(...) result}``."""
    results = {}
    for set_name, entry in plan["sets"].items():
        out_dir = run_dir / "test" if set_name == PRIMARY_SET else run_dir / "eval_sets" / set_name
        data = {"dataset_dir": entry["dataset_dir"], "datalist": entry["datalist"]}
        results[set_name] = evaluate_stage(
            bundle, names, out_dir, case_root=Path(entry["dataset_dir"]), **{**stage, **data}
        )
    return results


def run_job(out: str | Path, job: str, threads: int | None = None) -> dict[str, Any]:
    """Run one job of the plan in ``out`` and write its ``result.json``.

    ``teacher``: trains the teacher (unless the plan reuses one) and the paraphrasers (when the bundle has them and
    the plan does not reuse them), then evaluates the teacher on every set. ``<method>:<seed>``: trains the student
    with that method and seed (into ``<out>/<method>/seed<k>/``) and evaluates it on every set. With several
    teacher checkpoints in the plan, the teacher is their ensemble (:func:`ensemble_overrides`) in every stage,
    and the teacher job evaluates the ensemble.

    Args:
        out: the comparison's output folder (holding ``plan.json``).
        job: ``teacher`` or ``<method>:<seed>``.
        threads: torch CPU threads for this job; None keeps the current setting.

    Returns:
        the job's result (also in ``<run folder>/result.json``).
    """
    plan = read_plan(out)
    method, seed = _parse_job(plan, job)
    bundle = BUNDLES / plan["bundle"]
    run_dir = job_dir(plan, job)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking = _tracking(plan)
    if tracking:
        _experiment_id(tracking, Path(plan["out"]) / "mlruns")
    primary = plan["sets"][PRIMARY_SET]
    common = {"dataset_dir": primary["dataset_dir"], **plan["override"]}
    members = teacher_checkpoints(plan)
    teacher_ckpt = members[0]  # the plain teacher, or the ensemble's tap member
    ensemble = len(members) > 1
    tags = {"bundle": plan["bundle"], "job": job, "plan": plan["plan_id"]}
    run_id = None
    with _reproducible(plan["deterministic"], threads):
        if seed is None:  # the teacher job
            seed = plan["seeds"][0]
            common["seed"] = seed
            train_s = float("nan")
            names = ["train.json", "train_teacher.json"]
            if plan["train_teacher"]:
                epochs = {"epochs": plan["teacher_epochs"]} if plan["teacher_epochs"] else {}
                train_s = train_stage(
                    bundle,
                    names,
                    tracking={**tracking, "run_name": "teacher"} if tracking else None,
                    **{**common, **epochs, "ckpt_dir": str(teacher_ckpt.parent), "output_dir": str(run_dir / "eval")},
                )
                run_id = _latest_run(tracking, "teacher") if tracking else None
            for path in members:
                if not path.is_file():
                    raise SystemExit(f"teacher checkpoint {path} not found: train it first or omit --teacher_ckpt")
            if plan["train_paraphraser"]:
                paraphraser_dir = Path(plan["paraphraser_dir"])
                paraphraser_dir.mkdir(parents=True, exist_ok=True)
                train_stage(
                    bundle,
                    ["train.json", PARAPHRASER_CONFIG],
                    tracking={**tracking, "run_name": "paraphraser"} if tracking else None,
                    **{
                        **common,
                        "teacher_ckpt": str(teacher_ckpt),
                        **(ensemble_overrides(bundle, ["train.json", PARAPHRASER_CONFIG], members) if ensemble else {}),
                        "ckpt_dir": str(paraphraser_dir),
                        "paraphraser_dir": str(paraphraser_dir),  # where the bundles' stage writes them
                        "output_dir": str(Path(plan["out"]) / "paraphraser" / "eval"),
                    },
                )
                if tracking:
                    _record_run(
                        tracking, _latest_run(tracking, "paraphraser"), {**tags, "method": "paraphraser", "seed": seed}
                    )
            stage = {**common, "ckpt_dir": str(teacher_ckpt.parent), "ckpt_name": teacher_ckpt.name}
            if ensemble:  # the evaluated network is the ensemble, built from its members' files
                stage.update(ensemble_overrides(bundle, names, members, evaluated=True))
            sets = _evaluate_sets(plan, bundle, names, run_dir, stage)
            params = _parameters(bundle, "teacher_def", **common) * len(members)
            weights = members if ensemble else teacher_ckpt
            model = TEACHER_JOB
        else:
            names = method_configs(bundle, method)
            shared = {"teacher_ckpt": str(teacher_ckpt)}
            if ensemble:
                shared.update(ensemble_overrides(bundle, names, members))
            if plan["paraphraser_dir"] is not None:
                shared["paraphraser_dir"] = plan["paraphraser_dir"]
            stage = {**common, **shared, "seed": seed, "ckpt_dir": str(run_dir / "models")}
            run_name = f"{method} seed{seed}"
            train_s = train_stage(
                bundle,
                names,
                tracking={**tracking, "run_name": run_name} if tracking else None,
                **{**stage, "output_dir": str(run_dir / "eval")},
            )
            run_id = _latest_run(tracking, run_name) if tracking else None
            sets = _evaluate_sets(plan, bundle, names, run_dir, stage)
            params = _parameters(bundle, "network_def", **common)
            weights = run_dir / "models" / "model.pt"
            model = f"student: {method}"
        result = {
            "job": job,
            "plan_id": plan["plan_id"],
            "model": model,
            "method": method,
            "seed": seed if (method != TEACHER_JOB or plan["train_teacher"]) else None,
            "params": params,
            "train_s": train_s,
            "weights": [str(w) for w in weights] if isinstance(weights, list) else str(weights),
            "weights_md5": _weights_digest(weights),
            "environment": _environment(),
            "sets": sets,
        }
    path = run_dir / RESULT_FILE
    result["result_file"] = str(path)
    path.write_text(json.dumps(_jsonable(result), indent=2))
    if tracking and run_id is not None:
        _record_run(tracking, run_id, {**tags, "method": method, "seed": result["seed"]}, result)
    return result


def _jsonable(value: Any) -> Any:
    """``value`` with NaN / inf floats as None (strict JSON), tuples and arrays as lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([float("nan") if v is None else float(v) for v in values], dtype=float)


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------------------------------------------------- #
# statistics


def _baseline_method(methods: Sequence[str]) -> str | None:
    """``none``, else the first ``none+<override>`` (the student alone on the same data), else None."""
    if "none" in methods:
        return "none"
    return next((m for m in methods if m.startswith("none+")), None)


def _metric_names(runs: Sequence[Mapping[str, Any]], set_name: str) -> list[str]:
    """The per-case metrics of a set, in table order: per-class Dice, mean Dice, IoU, HD95, then the others."""
    found: list[str] = []
    for run in runs:
        for name in run["sets"].get(set_name, {}).get("per_case", {}).get("metrics", {}):
            if name not in found:
                found.append(name)
    first = [m for m in found if m.startswith("dice_")] + [m for m in ("mean_dice", "mean_iou", "hd95") if m in found]
    return first + [m for m in found if m not in first]


def _per_case(runs: Sequence[Mapping[str, Any]], set_name: str, metric: str, cases: Sequence[str]) -> np.ndarray:
    """``(n_runs, n_cases)`` values of ``metric`` aligned on ``cases`` (NaN where a run lacks a case)."""
    table = np.full((len(runs), len(cases)), np.nan)
    index = {c: i for i, c in enumerate(cases)}
    for r, run in enumerate(runs):
        data = run["sets"][set_name]["per_case"]
        for case, value in zip(data["cases"], _floats(data["metrics"].get(metric, []))):
            if case in index:
                table[r, index[case]] = value
    return table


def _paired_delta(
    model: np.ndarray, reference: np.ndarray, metric: str, n_resamples: int
) -> dict[str, float | int | str]:
    """``model − reference`` on seed-averaged per-case values of ``metric`` (aligned on the same cases): the mean
    difference with its paired bootstrap CI (seeded) and the verdict in the metric's direction.

    Returns:
        ``delta``, ``ci_low``, ``ci_high``, ``n_paired``, ``verdict``.
    """
    diff = stats.paired_bootstrap_ci(model, reference, n_resamples, CONFIDENCE, BOOTSTRAP_SEED)
    return {
        "delta": diff.estimate,
        "ci_low": diff.low,
        "ci_high": diff.high,
        "n_paired": diff.n,
        "verdict": stats.verdict(diff.low, diff.high, stats.higher_is_better(metric)),
    }


def summarize(
    plan: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]], n_resamples: int | None = None
) -> list[dict[str, Any]]:
    """One row per model (teacher first, then the methods in plan order) with the statistics of every set.

    Each row has ``model``, ``method``, ``seeds``, ``params``, ``train_s`` (mean over seeds), the main set's means
    over seeds as in earlier versions (``dice``, ``mean_dice``, ``mean_iou``, ``hd95``, ``extra``, ``cases``) and
    ``sets``: ``{set: {"cases", "metrics": {metric: {"mean", "sd", "per_seed", "delta", "ci_low", "ci_high",
    "n_paired", "verdict", "gap_closed", "case_mean", "mean_ci_low", "mean_ci_high"}}, "hd95_penalised":
    [count per seed] or None, "hd95_nonfinite": [count per seed]}}``. ``delta`` is the mean over cases of the
    per-case difference to the student alone (each model's per-case values averaged over its seeds first), with a
    paired bootstrap CI; the teacher's is the teacher–student gap. ``gap_closed`` is
    (distilled − none) / (teacher − none) on ``mean``, NaN when the teacher is not better.

    Args:
        plan: the comparison's plan.
        results: the finished jobs' results, by job name (``teacher``, ``<method>:<seed>``).
        n_resamples: bootstrap resamples; None: the plan's.
    """
    n_resamples = n_resamples or plan["n_resamples"]
    models: list[tuple[str, str, list[Mapping[str, Any]]]] = []
    if TEACHER_JOB in results:
        models.append((TEACHER_JOB, TEACHER_JOB, [results[TEACHER_JOB]]))
    for method in plan["methods"]:
        runs = [results[f"{method}:{s}"] for s in plan["seeds"] if f"{method}:{s}" in results]
        if runs:
            models.append((f"student: {method}", method, runs))
    baseline = _baseline_method([m for _, m, _ in models])
    rows: list[dict[str, Any]] = []
    seed_averages: dict[tuple[str, str, str], np.ndarray] = {}
    for model, method, runs in models:
        row: dict[str, Any] = {
            "model": model,
            "method": method,
            "seeds": [r["seed"] for r in runs],
            "params": runs[0]["params"],
            "train_s": stats.mean_sd([_nan(r["train_s"]) for r in runs])[0],
            "n_resamples": n_resamples,
            "sets": {},
        }
        for set_name in plan["sets"]:
            with_set = [r for r in runs if set_name in r["sets"]]
            if not with_set:
                continue
            reference = next((r for _, _, rs in models for r in rs if set_name in r["sets"]), with_set[0])
            cases = reference["sets"][set_name]["per_case"]["cases"]
            main_metrics = with_set[0]["sets"][set_name]["per_case"].get("main", ["mean_dice", "mean_iou", "hd95"])
            entry: dict[str, Any] = {"cases": len(cases), "main": list(main_metrics), "metrics": {}}
            for metric in _metric_names(with_set, set_name):
                table = _per_case(with_set, set_name, metric, cases)
                finite = np.isfinite(table)
                per_seed = [
                    float(table[i][finite[i]].mean()) if finite[i].any() else float("nan") for i in range(len(table))
                ]
                mean, sd = stats.mean_sd(per_seed)
                averaged = stats.seed_average(table)
                seed_averages[(model, set_name, metric)] = averaged
                ci = stats.bootstrap_mean_ci(averaged, n_resamples, CONFIDENCE, BOOTSTRAP_SEED)
                entry["metrics"][metric] = {
                    "mean": mean,
                    "sd": sd,
                    "per_seed": per_seed,
                    "case_mean": ci.estimate,
                    "mean_ci_low": ci.low,
                    "mean_ci_high": ci.high,
                }
            penalised = [r["sets"][set_name]["per_case"].get("hd95_penalised") for r in with_set]
            entry["hd95_penalised"] = None if any(p is None for p in penalised) else [int(sum(p)) for p in penalised]
            entry["hd95_nonfinite"] = [int(r["sets"][set_name]["per_case"].get("hd95_nonfinite", 0)) for r in with_set]
            row["sets"][set_name] = entry
        main = row["sets"].get(PRIMARY_SET)
        if main:
            values = {m: v["mean"] for m, v in main["metrics"].items()}
            dice_keys = [m for m in values if m.startswith("dice_")]
            row.update(
                {
                    "dice": {m[len("dice_") :]: values[m] for m in dice_keys},
                    "mean_dice": values.get("mean_dice", float("nan")),
                    "mean_iou": values.get("mean_iou", float("nan")),
                    "hd95": values.get("hd95", float("nan")),
                    "extra": {m: values[m] for m in main["main"] if m not in CORE_CSVS and m in values},
                    "cases": main["cases"],
                }
            )
        rows.append(row)
    by_method = {r["method"]: r for r in rows}
    base = by_method.get(baseline) if baseline else None
    teacher = by_method.get(TEACHER_JOB)
    for row in rows:
        for set_name, entry in row["sets"].items():
            for metric, values in entry["metrics"].items():
                direction = stats.higher_is_better(metric)
                values.update(
                    {
                        "higher_is_better": direction,
                        "delta": float("nan"),
                        "ci_low": float("nan"),
                        "ci_high": float("nan"),
                        "n_paired": 0,
                        "verdict": "",
                        "gap_closed": float("nan"),
                    }
                )
                if base is None or row is base or (base["model"], set_name, metric) not in seed_averages:
                    continue
                values.update(
                    _paired_delta(
                        seed_averages[(row["model"], set_name, metric)],
                        seed_averages[(base["model"], set_name, metric)],
                        metric,
                        n_resamples,
                    )
                )
                if row is not teacher and teacher is not None and set_name in teacher["sets"]:
                    teacher_value = teacher["sets"][set_name]["metrics"].get(metric, {}).get("mean", float("nan"))
                    base_value = base["sets"][set_name]["metrics"][metric]["mean"]
                    values["gap_closed"] = stats.gap_closed(values["mean"], base_value, teacher_value, direction)
    return rows


# ---------------------------------------------------------------------------------------------------------------- #
# tables and plots


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 4) -> str:
    """``value`` with its sign; a non-zero value too small for ``digits`` decimals in scientific notation (so
    that a CI bound just above 0 does not read ``+0.0000``)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value != 0 and abs(value) < 0.5 * 10**-digits:
        return f"{value:+.1e}"
    return f"{value:+.{digits}f}"


EXTRA_LABELS = {"cldice": "clDice"}
"""Column titles of extra metrics (by their ``val_<name>_raw.csv`` name); others are shown as named."""


def _label(metric: str, hd95_unit: str) -> str:
    if metric == "mean_dice":
        return "mean Dice"
    if metric == "mean_iou":
        return "IoU"
    if metric == "hd95":
        return f"HD95 ({hd95_unit})"
    for prefix, title in (("dice_", "Dice "), ("iou_", "IoU "), ("hd95_", "HD95 ")):
        if metric.startswith(prefix):
            return title + metric[len(prefix) :]
    return EXTRA_LABELS.get(metric, metric)


def _digits(metric: str) -> int:
    return 2 if not stats.higher_is_better(metric) else 4


def _legacy_table(rows: Sequence[Mapping[str, Any]], hd95_unit: str) -> str:
    """The single-run table of rows without per-case statistics (as written by earlier versions)."""
    classes = list(rows[0]["dice"]) if rows else []
    extras = list(rows[0].get("extra", {})) if rows else []
    baseline = next((r for r in rows if r["model"] == "student: none"), None)
    if baseline is None:
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
        skip = baseline is None or r is baseline or r["model"] == TEACHER_JOB
        cells = [
            r["model"],
            *[_fmt(r["dice"][c]) for c in classes],
            _fmt(r["mean_dice"]),
            "" if skip else f"{r['mean_dice'] - baseline['mean_dice']:+.4f}",
            _fmt(r["mean_iou"]),
            _fmt(r["hd95"], 2),
            *[_fmt(r.get("extra", {}).get(e, float("nan"))) for e in extras],
            f"{r['params']:,}",
            _fmt(r["train_s"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd_cell(values: Mapping[str, Any], digits: int) -> str:
    if len(values["per_seed"]) > 1 and math.isfinite(values["sd"]):
        return f"{_fmt(values['mean'], digits)} ± {_fmt(values['sd'], digits)}"
    return _fmt(values["mean"], digits)


def _penalty_cell(entry: Mapping[str, Any]) -> str:
    counts = entry["hd95_penalised"] if entry["hd95_penalised"] is not None else entry["hd95_nonfinite"]
    return ", ".join(str(c) for c in counts) + f" of {entry['cases']}"


def footnotes(rows: Sequence[Mapping[str, Any]], hd95_unit: str = "px", n_resamples: int = 10000) -> str:
    """The notes under a table of :func:`markdown_table`: what the values, CIs, verdicts and HD95 penalty mean.

    Args:
        rows: result rows of :func:`summarize`.
        hd95_unit: the HD95 unit.
        n_resamples: bootstrap resamples used.
    """
    seeds = sorted({s for r in rows if r["method"] != TEACHER_JOB for s in r["seeds"] if s is not None})
    teacher = next((r for r in rows if r["method"] == TEACHER_JOB), None)
    baseline = _baseline_method([r["method"] for r in rows]) or "none"
    penalty = all(e["hd95_penalised"] is not None for r in rows for e in r["sets"].values())
    notes = [
        f"- Values: mean ± sd over the seeds {seeds} of each run's mean over the cases"
        + (
            f"; the teacher is one run (seed {teacher['seeds'][0]})."
            if teacher and teacher["seeds"] and teacher["seeds"][0] is not None
            else "; the teacher is one (given) checkpoint."
        ),
        f"- Δ vs {baseline}: mean over the cases of the per-case difference to the student alone, each model's "
        f"per-case metric averaged over its seeds first; [95 % CI]: percentile bootstrap over the cases "
        f"({n_resamples} resamples, seed {BOOTSTRAP_SEED}). Verdict: better / worse when the CI excludes 0 on that "
        "side (for HD95 lower is better), no evidence otherwise. The teacher's Δ is the teacher–student gap.",
        f"- Gap closed: (distilled − {baseline}) / (teacher − {baseline}) on the mean values; n/a when the teacher is "
        "not better than the student alone (nothing to close).",
    ]
    if penalty:
        notes.append(
            "- HD95: a class whose prediction is empty while its label is not (or the reverse) scores the diagonal "
            f"of that case's evaluated image, sqrt(Σ (size × spacing)²), in {hd95_unit}, instead of being left out; "
            "'HD95 penalised' counts those cases in each run (per seed). A class empty in both is not scored."
        )
    else:
        notes.append(
            "- HD95: this bundle's evaluate.json has no empty_penalty, so cases with an empty prediction "
            "(non-finite HD95) are LEFT OUT of the HD95 mean; 'HD95 non-finite' counts them in each run (per seed)."
        )
    return "\n".join(notes)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    hd95_unit: str = "px",
    set_name: str = PRIMARY_SET,
    notes: bool = True,
    n_resamples: int | None = None,
) -> str:
    """The markdown tables of one evaluated set: the teacher–student gap, every metric per model (mean ± sd over
    seeds), then each model's Δ vs the student alone (``none``, else the first ``none+<override>``) per metric
    with its 95 % CI, verdict and gap closed; with ``notes``, what these mean.

    Rows without per-case statistics (earlier versions' rows) give the single-run table of earlier versions.

    Args:
        rows: result rows of :func:`compare` / :func:`summarize`.
        hd95_unit: the HD95 column's unit: ``"px"``, ``"vox"`` (volumes of unknown spacing) or ``"mm"``.
        set_name: the evaluated set (``"test"``: the ``--dataset_dir`` test split; else an ``--eval_sets`` name).
        notes: append :func:`footnotes`.
        n_resamples: the bootstrap resamples named in the notes; None: those the rows were computed with.
    """
    if not rows:
        return "(no finished run)"
    if any("sets" not in r for r in rows):
        return _legacy_table(rows, hd95_unit)
    n_resamples = n_resamples or int(rows[0].get("n_resamples", 10000))
    rows = [r for r in rows if set_name in r["sets"]]
    if not rows:
        return f"(no finished run was evaluated on {set_name!r})"
    first = rows[0]["sets"][set_name]
    metrics = [m for m in first["metrics"] if m.startswith("dice_") or m in first["main"]]
    main = set_name == PRIMARY_SET
    penalty = all(r["sets"][set_name]["hd95_penalised"] is not None for r in rows)
    baseline_method = _baseline_method([r["method"] for r in rows])
    teacher = next((r for r in rows if r["method"] == TEACHER_JOB), None)
    lines = []
    if teacher is not None and baseline_method is not None:
        gap = teacher["sets"][set_name]["metrics"].get("mean_dice")
        if gap is not None:
            judged = {
                "better": "the teacher is better than the student alone",
                "worse": "the teacher is WORSE than the student alone: nothing to distil",
                "no evidence": "no evidence that the teacher is better than the student alone: little to distil",
            }.get(gap["verdict"], "")
            lines += [
                f"Teacher − student alone ({baseline_method}), mean Dice: {_signed(gap['delta'])} "
                f"[95 % CI {_signed(gap['ci_low'])}, {_signed(gap['ci_high'])}] over {gap['n_paired']} cases: "
                f"{judged}.",
                "",
            ]
    header = ["model", *[_label(m, hd95_unit) for m in metrics], "HD95 penalised" if penalty else "HD95 non-finite"]
    if main:
        header += ["params", "train s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        entry = r["sets"][set_name]
        cells = [r["model"]]
        cells += [_mean_sd_cell(entry["metrics"][m], _digits(m)) if m in entry["metrics"] else "n/a" for m in metrics]
        cells.append(_penalty_cell(entry))
        if main:
            cells += [f"{r['params']:,}", _fmt(r["train_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline_method is not None:
        delta_metrics = [
            m for m in metrics if not (m.startswith("dice_") and sum(k.startswith("dice_") for k in metrics) == 1)
        ]
        lines += [
            "",
            f"| model | metric | Δ vs {baseline_method} [95 % CI] | verdict | gap closed |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["method"] == baseline_method:
                continue
            for m in delta_metrics:
                values = r["sets"][set_name]["metrics"].get(m)
                if values is None:
                    continue
                d = _digits(m)
                gap_closed = values["gap_closed"]
                gap = (
                    ""
                    if r["method"] == TEACHER_JOB
                    else ("n/a" if not math.isfinite(gap_closed) else f"{gap_closed:.0%}")
                )
                lines.append(
                    f"| {r['model']} | {_label(m, hd95_unit)} | {_signed(values['delta'], d)} "
                    f"[{_signed(values['ci_low'], d)}, {_signed(values['ci_high'], d)}] | {values['verdict']} | {gap} |"
                )
    if notes:
        lines += ["", footnotes(rows, hd95_unit, n_resamples)]
    return "\n".join(lines)


def markdown_report(results: Mapping[str, Any]) -> str:
    """The whole ``results.md``: settings, one section per evaluated set (:func:`markdown_table`), missing jobs.

    Args:
        results: the content of ``results.json`` (:func:`collect`).
    """
    plan = results["settings"]
    rows = results["rows"]
    unit = plan["hd95_unit"]
    budget = ", ".join(f"{k}={json.dumps(v)}" for k, v in plan["override"].items()) or "the bundle's defaults"
    members = teacher_checkpoints(plan)
    teacher = (
        f"an ensemble of {len(members)} (mean of logits, feature taps of the first): {', '.join(map(str, members))}"
        if len(members) > 1
        else str(members[0])
    )
    lines = [
        f"# {plan['bundle']}: {', '.join(plan['methods'])} (seeds {plan['seeds']})",
        "",
        f"Teacher: {teacher}"
        + (" (trained here, first seed)" if plan["train_teacher"] else " (given)")
        + f"; settings: {budget}"
        + (f", teacher epochs {plan['teacher_epochs']}" if plan["teacher_epochs"] else "")
        + ".",
    ]
    environments = {json.dumps(r.get("environment", {}), sort_keys=True) for r in results["runs"]}
    if len(environments) > 1:
        lines += [
            "",
            "Note: the runs used different environments (threads / device / torch): " + "; ".join(sorted(environments)),
        ]
    for record in results.get("joined", []):
        names = "; ".join(f"{m} as `{label}`" for m, label in record["rows"].items())
        lines += ["", f"Joined from {record['out']} (plan {record['plan_id']}, same teacher and test cases): {names}."]
    if results.get("missing_jobs"):
        lines += ["", f"**Missing jobs** (not finished, or from another plan): {', '.join(results['missing_jobs'])}."]
    for set_name, entry in plan["sets"].items():
        lines += [
            "",
            f"## {set_name}: {entry['dataset_dir']} ({entry['split']}, "
            f"{max((r['sets'][set_name]['cases'] for r in rows if set_name in r['sets']), default=0)} cases)",
            "",
            markdown_table(rows, unit, set_name, notes=False, n_resamples=plan["n_resamples"]),
        ]
    versus = results.get("versus_own_method", [])
    if versus:
        lines += [
            "",
            "## Joined rows against the same method of the first plan",
            "",
            "| row | against | set | metric | Δ [95 % CI] | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for e in versus:
            digits = _digits(e["metric"])
            lines.append(
                f"| {e['row']} | {e['against']} | {e['set']} | {_label(e['metric'], unit)} | "
                f"{_signed(e['delta'], digits)} [{_signed(e['ci_low'], digits)}, {_signed(e['ci_high'], digits)}] | "
                f"{e['verdict']} |"
            )
    lines += ["", footnotes(rows, unit, plan["n_resamples"]) if rows and all("sets" in r for r in rows) else ""]
    return "\n".join(lines).rstrip() + "\n"


def plot_comparison(
    rows: Sequence[Mapping[str, Any]], path: str | Path, set_name: str = PRIMARY_SET, hd95_unit: str = "px"
) -> Path | None:
    """A PNG with one panel per metric: each distilled student's mean over the cases (per-case values averaged over
    seeds) with its 95 % bootstrap CI, the teacher and the student alone as reference lines with their CI bands.

    Args:
        rows: result rows of :func:`summarize`.
        path: the PNG to write.
        set_name: the evaluated set.
        hd95_unit: the HD95 unit (axis label).

    Returns:
        the PNG's path, or None when no row has that set.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if set_name in r.get("sets", {})]
    if not rows:
        return None
    first = rows[0]["sets"][set_name]
    metrics = [m for m in first["metrics"] if m in first["main"]]
    baseline = _baseline_method([r["method"] for r in rows])
    references = [r for r in rows if r["method"] in (TEACHER_JOB, baseline)]
    students = [r for r in rows if r not in references]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.1 * len(students) + 2.5) * len(metrics), 4.2))
    axes = np.atleast_1d(axes)
    styles = {TEACHER_JOB: ("tab:green", "-"), baseline: ("tab:red", "--")}
    for ax, metric in zip(axes, metrics):
        for ref in references:
            values = ref["sets"][set_name]["metrics"].get(metric)
            if values is None:
                continue
            color, style = styles[ref["method"]]
            ax.axhline(values["case_mean"], color=color, linestyle=style, label=ref["model"])
            if math.isfinite(values["mean_ci_low"]):
                ax.axhspan(values["mean_ci_low"], values["mean_ci_high"], color=color, alpha=0.12)
        for i, row in enumerate(students):
            values = row["sets"][set_name]["metrics"].get(metric)
            if values is None:
                continue
            low, high = values["mean_ci_low"], values["mean_ci_high"]
            err = [[values["case_mean"] - low], [high - values["case_mean"]]] if math.isfinite(low) else None
            ax.errorbar([i], [values["case_mean"]], yerr=err, fmt="o", color="tab:blue", capsize=4)
        ax.set_xticks(range(len(students)))
        ax.set_xticklabels([r["method"] for r in students], rotation=30, ha="right")
        ax.set_xlim(-0.6, max(len(students), 1) - 0.4)
        ax.set_title(_label(metric, hd95_unit) + (" (lower is better)" if not stats.higher_is_better(metric) else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    fig.suptitle(f"{set_name}: mean over cases (per-case values averaged over seeds), 95 % bootstrap CI")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


JOINED_DIR = "joined"
"""Where ``--collect --join`` writes its report, inside the main comparison's folder (its own files stay)."""
JOIN_LABEL_VALUE = 24
"""Longest override value written out in a joined row's name."""
JOIN_SETTINGS = ("bundle", "sets", "hd95_unit")
"""Plan settings that must be equal for two plans' students to share one table."""


def _finished_jobs(plan: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The finished jobs of a plan (their ``result.json``, by job name) and the missing ones (not finished, or from
    another plan of the same folder)."""
    finished: dict[str, dict[str, Any]] = {}
    missing = []
    for job in plan_jobs(plan):
        path = job_dir(plan, job) / RESULT_FILE
        result = json.loads(path.read_text()) if path.is_file() else None
        if result is None or result.get("plan_id") != plan["plan_id"]:
            missing.append(job)
        else:
            finished[job] = result
    return finished, missing


def _teacher_identity(plan: Mapping[str, Any]) -> str:
    """What makes two plans' teachers the same: the digest of the teacher weights when the files exist, else their
    resolved paths."""
    members = teacher_checkpoints(plan)
    return _weights_digest(members) or " ".join(str(p.resolve()) for p in members)


def join_label(main: Mapping[str, Any], other: Mapping[str, Any], method: str) -> str:
    """The row name of ``method`` from the joined plan ``other``: the method and the settings in which ``other``
    differs from ``main`` (``key=value``, a value longer than ``JOIN_LABEL_VALUE`` characters cut short with
    ``...``; ``key=default`` for an override only ``main`` sets), else the folder name.

    Args:
        main: the plan whose folder holds the joined report.
        other: a joined plan.
        method: one of ``other``'s methods.
    """
    mine, theirs = main["override"], other["override"]

    def short(value: Any) -> str:  # long values (a component's config) shortened; plan.json has them whole
        text = json.dumps(value)
        return text if len(text) <= JOIN_LABEL_VALUE else text[: JOIN_LABEL_VALUE - 3] + "..."

    parts = [f"{k}={short(v)}" for k, v in theirs.items() if k not in mine or mine[k] != v]
    parts += [f"{k}=default" for k in mine if k not in theirs]
    if (main.get("paraphraser_dir") or None) != (other.get("paraphraser_dir") or None):
        parts.append(f"paraphraser_dir={other.get('paraphraser_dir')}")
    return f"{method} [{', '.join(parts) or Path(other['out']).name}]"


def join_plans(
    plan: Mapping[str, Any], finished: dict[str, dict[str, Any]], others: Sequence[str | Path]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Add the finished students of other plans to one comparison, as rows named by :func:`join_label`.

    A joined plan must share the bundle, the evaluated sets and the HD95 unit of ``plan`` and the same teacher
    (equal weights), so that every row is paired on the same test cases and measured against the same student alone
    and teacher gap; its own teacher job is not needed. E.g. a cost lever trained in a plan of its own (same
    seeds, one override changed) is compared with the student alone and the method's default in one table.

    Args:
        plan: the main plan (its ``none`` is the baseline, its teacher the teacher row).
        finished: the main plan's finished jobs; the joined rows' jobs (``<label>:<seed>``) are added to it.
        others: the joined comparisons' folders.

    Returns:
        the plan seen by :func:`summarize` (methods and seeds extended), one record per joined plan (``out``,
        ``plan_id``, ``rows``: method -> row name) and the joined plans' missing student jobs.

    Raises:
        SystemExit: a joined plan differs in a shared setting or in its teacher, or a row name repeats.
    """
    view = {**plan, "methods": list(plan["methods"]), "seeds": list(plan["seeds"])}
    joined: list[dict[str, Any]] = []
    missing: list[str] = []
    teacher = _teacher_identity(plan)
    for out in others:
        other = read_plan(out)
        for key in JOIN_SETTINGS:
            if other[key] != plan[key]:
                raise SystemExit(
                    f"cannot join {other['out']} to {plan['out']}: their {key} differ "
                    f"({json.dumps(other[key])} against {json.dumps(plan[key])}); join only plans on the same bundle "
                    "and test cases"
                )
        if _teacher_identity(other) != teacher:
            raise SystemExit(
                f"cannot join {other['out']} to {plan['out']}: their teachers differ "
                f"({teacher_checkpoints(other)} against {teacher_checkpoints(plan)}); the gap and Δ would mix teachers"
            )
        done, not_done = _finished_jobs(other)
        rows = {}
        for method in other["methods"]:
            label = join_label(plan, other, method)
            if label in view["methods"]:
                raise SystemExit(f"cannot join {other['out']}: its row {label!r} is already in the table")
            view["methods"].append(label)
            rows[method] = label
            for seed in other["seeds"]:
                result = done.get(f"{method}:{seed}")
                if result is not None:
                    finished[f"{label}:{seed}"] = {**result, "method": label, "model": f"student: {label}"}
        view["seeds"] = sorted(set(view["seeds"]) | set(other["seeds"]))
        missing += [f"{Path(other['out']).name}/{job}" for job in not_done if job != TEACHER_JOB]
        joined.append({"out": other["out"], "plan_id": other["plan_id"], "rows": rows})
    return view, joined, missing


def versus_own_method(
    plan: Mapping[str, Any],
    finished: Mapping[str, Mapping[str, Any]],
    joined: Sequence[Mapping[str, Any]],
    n_resamples: int | None = None,
) -> list[dict[str, Any]]:
    """Each joined row against the same method of the main plan (e.g. a cheaper critic against the paper's), with
    the table's statistics: per-case values averaged over each row's seeds, paired bootstrap CI of the difference
    over the cases, verdict.

    Args:
        plan: the plan seen by :func:`summarize` (from :func:`join_plans`).
        finished: every finished job, joined rows included (``<label>:<seed>``).
        joined: the joined plans' records (:func:`join_plans`).
        n_resamples: bootstrap resamples; None: the plan's.

    Returns:
        one entry per (joined row, set, metric): ``row``, ``against``, ``set``, ``metric``, ``delta``, ``ci_low``,
        ``ci_high``, ``n_paired``, ``verdict``.
    """
    n_resamples = n_resamples or plan["n_resamples"]
    entries: list[dict[str, Any]] = []
    for record in joined:
        for method, label in record["rows"].items():
            for set_name in plan["sets"]:
                mine = [finished[f"{label}:{s}"] for s in plan["seeds"] if f"{label}:{s}" in finished]
                theirs = [finished[f"{method}:{s}"] for s in plan["seeds"] if f"{method}:{s}" in finished]
                mine = [r for r in mine if set_name in r["sets"]]
                theirs = [r for r in theirs if set_name in r["sets"]]
                if not mine or not theirs:
                    continue
                cases = theirs[0]["sets"][set_name]["per_case"]["cases"]
                for metric in _metric_names(theirs, set_name):
                    delta = _paired_delta(
                        stats.seed_average(_per_case(mine, set_name, metric, cases)),
                        stats.seed_average(_per_case(theirs, set_name, metric, cases)),
                        metric,
                        n_resamples,
                    )
                    entries.append({"row": label, "against": method, "set": set_name, "metric": metric, **delta})
    return entries


def collect(out: str | Path, write: bool = True, join: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Build the comparison from the finished jobs' result files of the plan in ``out``.

    Writes ``results.json`` (settings, every job's per-case, per-seed metrics under ``runs``, the summary ``rows``,
    ``missing_jobs``), ``results.md`` and a plot per evaluated set (``results_<set>.png``), and logs the three to an
    MLflow run named ``comparison``. Result files of another plan (an older ``plan.json``) count as missing.

    Args:
        out: the comparison's output folder (holding ``plan.json``).
        write: write the files and the MLflow run (False: only return the results).
        join: other comparisons' folders whose students become rows of this table (:func:`join_plans`); the report
            then goes to ``<out>/joined/`` and names the joined plans (``results.json``: ``joined``).

    Returns:
        the content of ``results.json``.
    """
    plan = read_plan(out)
    finished, missing = _finished_jobs(plan)
    view, joined, joined_missing = join_plans(plan, finished, join) if join else (plan, [], [])
    rows = summarize(view, finished)
    results = {
        "settings": view,
        "missing_jobs": missing + joined_missing,
        "rows": rows,
        "runs": list(finished.values()),
    }
    if joined:
        results["joined"] = joined
        results["versus_own_method"] = versus_own_method(view, finished, joined)
    if not write:
        return results
    out = Path(plan["out"]) / (JOINED_DIR if joined else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    (out / "results.md").write_text(markdown_report(results))
    plots = [
        plot_comparison(rows, out / f"results_{set_name}.png", set_name, plan["hd95_unit"]) for set_name in plan["sets"]
    ]
    tracking = _tracking(plan)
    if tracking:
        client = _client(tracking)
        experiment_id = _experiment_id(tracking, Path(plan["out"]) / "mlruns")
        run = client.create_run(
            experiment_id,
            run_name="comparison (joined)" if joined else "comparison",
            tags={"method": "comparison", "plan": plan["plan_id"]},
        )
        for path in [out / "results.md", out / "results.json", *[p for p in plots if p is not None]]:
            client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
    return results


def run_comparison(
    bundle_name: str,
    methods: Sequence[str],
    dataset_dir: str | Path,
    out: str | Path,
    threads: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Plan, run every job one after the other (teacher first), then collect.

    Prints one line as each job starts and ends, with its time and the estimated time left.

    Args:
        bundle_name: a folder under ``bundles/``.
        methods: method names; see :func:`make_plan`.
        dataset_dir: the prepared data folder.
        out: the output folder.
        threads: torch CPU threads of every job; None keeps the current setting.
        settings: :func:`make_plan`'s other arguments (``seeds``, ``teacher_ckpt``, ``eval_sets``...) and config
            overrides (``epochs``, ``image_size``...).

    Returns:
        the content of ``results.json`` (see :func:`collect`).
    """
    plan = make_plan(bundle_name, methods, dataset_dir, out, **settings)
    jobs = plan_jobs(plan)
    start = time.perf_counter()
    for i, job in enumerate(jobs, 1):
        job_start = time.perf_counter()
        print(f"comparison job {i}/{len(jobs)}: {job} (into {job_dir(plan, job)})", flush=True)
        run_job(plan["out"], job, threads=threads)
        now = time.perf_counter()
        left = (now - start) / i * (len(jobs) - i)
        eta = f", about {format_duration(left)} left" if i < len(jobs) else ""
        print(f"comparison job {i}/{len(jobs)}: {job} finished in {format_duration(now - job_start)}{eta}", flush=True)
    return collect(plan["out"])


def compare(
    bundle_name: str,
    methods: Sequence[str],
    dataset_dir: str | Path,
    out: str | Path,
    teacher_ckpt: str | Path | Sequence[str | Path] | None = None,
    teacher_epochs: int | None = None,
    track: bool = True,
    paraphraser_dir: str | Path | None = None,
    hd95_unit: str = "px",
    seeds: Sequence[int] | None = None,
    eval_sets: Mapping[str, str | Path] | Sequence[str] | None = None,
    n_resamples: int = 10000,
    **override: Any,
) -> list[dict[str, Any]]:
    """Train the teacher (unless given) and each method once per seed with the same settings, evaluate all, write
    the tables, plots and ``results.json``; see :func:`run_comparison` for the whole results.

    Args:
        bundle_name: a folder under ``bundles/``.
        methods: method names (``configs/methods/<name>.json``); ``none`` trains the student alone.
        dataset_dir: the prepared data folder (holding ``datalist.json``).
        out: output folder: one sub-folder per model and seed, ``results.md``, ``results.json``, ``mlruns.db``.
        teacher_ckpt: an already trained teacher, or several checkpoints of it that make an ensemble teacher;
            trained into ``<out>/teacher`` when None.
        teacher_epochs: the teacher's epochs (default: the same as the students').
        track: record each training as an MLflow run in the experiment ``compare_<bundle>``.
        paraphraser_dir: paraphrasers already trained for this teacher; when None and the bundle has a
            ``train_paraphraser.json``, they are trained once, after the teacher.
        hd95_unit: the unit of the table's HD95 column (see :func:`markdown_table`).
        seeds: the students' seeds; None: the ``seed`` override, else 0.
        eval_sets: further prepared datasets to evaluate every model on, ``{name: folder}``.
        n_resamples: bootstrap resamples of the CIs.
        override: config overrides shared by every stage (``epochs``, ``image_size``, ``batch_size``, ``seed``...).

    Returns:
        one result row per model (teacher first), with the statistics of :func:`summarize`.
    """
    results = run_comparison(
        bundle_name,
        methods,
        dataset_dir,
        out,
        teacher_ckpt=teacher_ckpt,
        teacher_epochs=teacher_epochs,
        track=track,
        paraphraser_dir=paraphraser_dir,
        hd95_unit=hd95_unit,
        seeds=seeds,
        eval_sets=eval_sets,
        n_resamples=n_resamples,
        **override,
    )
    return results["rows"]


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


PLAN_ARGUMENTS = (
    "bundle",
    "methods",
    "dataset_dir",
    "seeds",
    "seed",
    "teacher_ckpt",
    "epochs",
    "teacher_epochs",
    "paraphraser_dir",
    "hd95_unit",
    "image_size",
    "batch_size",
    "num_workers",
    "eval_sets",
    "n_resamples",
    "tracking_uri",
)
"""Arguments that define a plan: ``--only_job`` and ``--collect`` read them from ``plan.json`` instead."""


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; see the module docstring.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default=None, help="bundle folder name under bundles/")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="method override names ('none' = student alone; 'all' = every configs/methods file; 'a+b' merges two)",
    )
    parser.add_argument("--dataset_dir", default=None, help="prepared data folder holding datalist.json")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one student run per method and seed")
    parser.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds K; default 0)")
    parser.add_argument(
        "--teacher_ckpt",
        nargs="+",
        default=None,
        help="a trained teacher (skips teacher training); several checkpoints: their ensemble is the teacher "
        "(mean of logits, feature taps of the first)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every student (default: the bundle's)")
    parser.add_argument("--teacher_epochs", type=int, default=None, help="epochs of the teacher")
    parser.add_argument("--paraphraser_dir", default=None, help="paraphrasers already trained for this teacher")
    parser.add_argument("--hd95_unit", default=None, help="unit of the HD95 column: px (default), vox or mm")
    parser.add_argument("--image_size", type=int, nargs="+", default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument(
        "--eval_sets",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="further prepared datasets to evaluate every model on (their test split, else all labelled items)",
    )
    parser.add_argument("--n_resamples", type=int, default=None, help="bootstrap resamples of the CIs (10000)")
    parser.add_argument("--no_mlflow", action="store_true", help="do not record MLflow runs")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default sqlite:///<out>/mlruns.db)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); the same count is needed for the same numbers",
    )
    parser.add_argument(
        "--no_deterministic_algorithms",
        action="store_true",
        help="do not call torch.use_deterministic_algorithms(True, warn_only=True) (faster on some GPUs)",
    )
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides, key=value (JSON value)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="write <out>/plan.json and <out>/jobs.sh; train nothing")
    mode.add_argument(
        "--only_job", default=None, metavar="JOB", help="run one job of <out>/plan.json: teacher or METHOD:SEED"
    )
    mode.add_argument("--collect", action="store_true", help="tables from the finished jobs of <out>/plan.json")
    parser.add_argument(
        "--join",
        nargs="+",
        default=[],
        metavar="OUT",
        help="with --collect: add the students of these comparisons (same bundle, test cases and teacher) as rows, "
        "each named by the settings it changes; the report goes to <out>/joined/",
    )
    args = parser.parse_args(argv)

    if args.join and not args.collect:
        raise SystemExit("--join adds rows to a --collect table: add --collect")
    if args.only_job or args.collect:
        given = [f"--{a}" for a in PLAN_ARGUMENTS if getattr(args, a) is not None]
        given += ["--override"] if args.override else []
        given += ["--no_mlflow"] if args.no_mlflow else []
        given += ["--no_deterministic_algorithms"] if args.no_deterministic_algorithms else []
        if given:
            raise SystemExit(f"--only_job and --collect take their settings from <out>/{PLAN_FILE}; drop {given}")
        if args.only_job:
            result = run_job(args.out, args.only_job, threads=args.threads)
            print(f"{args.only_job}: written {result['result_file']}")
            return 0
        results = collect(args.out, join=args.join)
        print(markdown_report(results))
        where = Path(args.out) / (JOINED_DIR if args.join else "")
        print(f"written: {where / 'results.md'}, {where / 'results.json'}")
        return 0 if not results["missing_jobs"] else 1

    missing = [f"--{a}" for a in ("bundle", "methods", "dataset_dir") if getattr(args, a) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
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
    settings = {
        "seeds": args.seeds,
        "teacher_ckpt": args.teacher_ckpt,
        "teacher_epochs": args.teacher_epochs,
        "track": not args.no_mlflow,
        "paraphraser_dir": args.paraphraser_dir,
        "hd95_unit": args.hd95_unit or "px",
        "eval_sets": args.eval_sets,
        "n_resamples": args.n_resamples or 10000,
        "tracking_uri": args.tracking_uri,
        "deterministic": not args.no_deterministic_algorithms,
        **override,
    }
    if args.plan:
        plan = make_plan(args.bundle, args.methods, args.dataset_dir, args.out, **settings)
        path = _write_jobs_file(plan, args.threads)
        print(path.read_text(), end="")
        print(f"\nwritten: {Path(plan['out']) / PLAN_FILE}, {path}")
        return 0
    results = run_comparison(args.bundle, args.methods, args.dataset_dir, args.out, threads=args.threads, **settings)
    print(markdown_report(results))
    print(f"written: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
