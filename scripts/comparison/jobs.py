"""The jobs of a plan (``teacher``, ``<method>:<seed>``): their folders, the shell commands that run them
(``jobs.sh``), and their result files (``result.json``, strict JSON) read back when finished."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCRIPT", "JOBS_FILE", "RESULT_FILE", "TEACHER_JOB", "plan_jobs", "job_dir", "job_command"]

SCRIPT = Path(__file__).resolve().parents[1] / "compare_methods.py"
"""The command line that runs a job (``python scripts/compare_methods.py --out <out> --only_job <job>``)."""
JOBS_FILE = "jobs.sh"
RESULT_FILE = "result.json"
TEACHER_JOB = "teacher"


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
    args = ["python", str(SCRIPT), "--out", plan["out"]]
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
