"""The plot of one evaluated set (``results_<set>.png``): each distilled student's mean over the cases with its
95 % bootstrap CI, against the teacher and the student alone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kd_components import stats

from .jobs import TEACHER_JOB
from .plan import PRIMARY_SET
from .report import _label
from .summary import _baseline_method

__all__ = ["plot_comparison"]


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
