"""Collecting a comparison (``--collect``): the finished jobs' results summarized into ``results.json``,
``results.md`` and one plot per evaluated set, logged to an MLflow run named ``comparison``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .jobs import _finished_jobs, _jsonable
from .join import JOINED_DIR, join_plans, versus_own_method
from .plan import read_plan
from .plot import plot_comparison
from .report import markdown_report
from .summary import summarize
from .tracking import _client, _experiment_id, _tracking

__all__ = ["collect"]


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
