"""One job of a plan, run in this process: the teacher (and the paraphrasers) or one student trained, then
evaluated on every set of the plan, with deterministic algorithms and a fixed thread count; writes its
``result.json`` and records its MLflow run."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .evaluation import evaluate_stage
from .jobs import RESULT_FILE, TEACHER_JOB, _jsonable, _parse_job, job_dir
from .plan import PRIMARY_SET, ensemble_overrides, read_plan, teacher_checkpoints
from .stages import BUNDLES, PARAPHRASER_CONFIG, _parameters, _weights_digest, method_configs, train_stage
from .tracking import _experiment_id, _latest_run, _record_run, _tracking

__all__ = ["run_job"]


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
