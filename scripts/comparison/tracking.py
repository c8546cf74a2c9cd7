"""MLflow records of a comparison: its experiment, the latest run of a name, and a job's tags, test metrics and
result file. Used by :mod:`.runner` and :mod:`.collect`; MLflow is imported only when a plan tracks its runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
