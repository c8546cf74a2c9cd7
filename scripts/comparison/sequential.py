"""A whole comparison in one process: the plan, every job one after the other (teacher first) with a progress line
as each starts and ends, then the collected results."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_components.progress import format_duration

from .collect import collect
from .jobs import job_dir, plan_jobs
from .plan import make_plan
from .runner import run_job

__all__ = ["run_comparison", "compare"]


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
