"""Joining comparisons (``--collect --join``): the finished students of other plans (same bundle, evaluated sets and
teacher) as rows of one table, named by the settings they change, each also compared with the same method of the
first plan."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kd_components import stats

from .jobs import TEACHER_JOB, _finished_jobs
from .plan import read_plan, teacher_checkpoints
from .stages import _weights_digest
from .summary import _metric_names, _paired_delta, _per_case

__all__ = ["JOINED_DIR", "JOIN_LABEL_VALUE", "JOIN_SETTINGS", "join_label", "join_plans", "versus_own_method"]

JOINED_DIR = "joined"
"""Where ``--collect --join`` writes its report, inside the main comparison's folder (its own files stay)."""
JOIN_LABEL_VALUE = 24
"""Longest override value written out in a joined row's name."""
JOIN_SETTINGS = ("bundle", "sets", "hd95_unit")
"""Plan settings that must be equal for two plans' students to share one table."""


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
