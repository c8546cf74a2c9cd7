"""The statistics of a comparison: per model and evaluated set, each metric's mean ± sd over seeds and the paired
bootstrap CI of its difference to the student alone over the cases, with a verdict and the fraction of the
teacher–student gap closed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kd_components import stats

from .evaluation import CORE_CSVS
from .jobs import TEACHER_JOB
from .plan import PRIMARY_SET

__all__ = ["CONFIDENCE", "BOOTSTRAP_SEED", "summarize"]

CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([float("nan") if v is None else float(v) for v in values], dtype=float)


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


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
