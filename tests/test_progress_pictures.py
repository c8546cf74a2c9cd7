"""Progress lines, loss curves and prediction overlays: what a user sees of a long run."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from ignite.engine import Engine, Events

from kd_components.pictures import LossCurves, OverlaySaver, overlay_panels
from kd_components.progress import TrainingProgress, format_duration


def _trainer(outputs: list[dict], epochs: int = 2) -> Engine:
    """An engine whose iterations return the given outputs in turn."""

    def step(engine: Engine, batch: int) -> dict:
        return outputs[(engine.state.iteration - 1) % len(outputs)]

    engine = Engine(step)
    engine.state.max_epochs = epochs
    return engine


@pytest.mark.parametrize(
    "seconds, text", [(4.2, "4 s"), (65, "1 min 05 s"), (3725, "1 h 02 min"), (-1, "?"), (float("nan"), "?")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_one_line_per_epoch_with_loss_means(caplog):
    outputs = [{"loss": torch.tensor(1.0), "loss_cwd": torch.tensor(0.5)}, {"loss": torch.tensor(3.0), "loss_cwd": 1.5}]
    engine = _trainer(outputs)
    progress = TrainingProgress(stage="student", interactive=False)
    progress.attach(engine)
    with caplog.at_level(logging.INFO, logger="kd_components.progress"):
        engine.run(range(2), max_epochs=3)
    assert len(progress.lines) == 3  # one per epoch, none per iteration
    assert progress.lines[0].startswith("student epoch 1/3: loss 2.0000 (loss_cwd 1.0000)")
    assert "ETA" in progress.lines[0] and "ETA" not in progress.lines[-1]
    assert sum("student epoch" in r.getMessage() for r in caplog.records) == 3


def test_progress_shows_validation_metrics_and_best():
    validator = Engine(lambda e, b: None)
    validator.state.metrics = {"val_mean_dice": 0.71}
    validator.state.key_metric_name = "val_mean_dice"
    validator.state.best_metric, validator.state.best_metric_epoch = 0.72, 1
    engine = _trainer([{"loss": 1.0}])
    progress = TrainingProgress(validator=validator, interactive=False)
    progress.attach(engine)
    engine.run(range(1), max_epochs=2)
    assert "val_mean_dice 0.7100 (best 0.7200, epoch 1)" in progress.lines[-1]


def test_progress_bar_on_a_terminal_writes_to_the_stream():
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    engine = _trainer([{"loss": 1.0}])
    TrainingProgress(interactive=True, stream=stream).attach(engine)
    engine.run(range(3), max_epochs=1)
    assert "Iteration: [2/3]" in stream.getvalue() and "loss=1" in stream.getvalue()


def test_loss_curves_record_epoch_means_and_write_png(tmp_path):
    outputs = [{"loss": 1.0, "loss_kd": 0.25}, {"loss": 3.0, "loss_kd": 0.75}]
    engine = _trainer(outputs)
    validator = Engine(lambda e, b: None)
    validator.state.metrics = {"val_mean_dice": 0.5}
    curves = LossCurves(tmp_path / "out", validator=validator)
    curves.attach(engine)
    engine.run(range(2), max_epochs=2)
    assert curves.history["loss"] == [(1, 2.0), (2, 2.0)]
    assert curves.history["loss_kd"] == [(1, 0.5), (2, 0.5)]
    assert curves.history["validation/val_mean_dice"] == [(1, 0.5), (2, 0.5)]
    assert curves.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(curves.json_path.read_text())["loss_kd"] == [[1, 0.5], [2, 0.5]]


def test_decollated_outputs_give_one_value_per_loss():
    from kd_components.progress import loss_scalars

    batch = [{"loss": torch.tensor(2.0), "loss_kd": 0.5, "pred": torch.zeros(2)} for _ in range(4)]
    assert loss_scalars(batch) == {"loss": 2.0, "loss_kd": 0.5}
    assert loss_scalars({"loss": 1.0, "other": 3.0}) == {"loss": 1.0}


def test_loss_curves_logged_to_the_mlflow_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from monai.handlers import MLFlowHandler

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    engine = _trainer([{"loss": 1.0}])
    curves = LossCurves(tmp_path / "out")
    curves.attach(engine)
    MLFlowHandler(tracking_uri=uri, experiment_name="pictures", output_transform=lambda x: x["loss"]).attach(engine)
    engine.run(range(2), max_epochs=1)
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs(client.get_experiment_by_name("pictures").experiment_id)[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curves.png", "loss_curves.json"} <= names


@pytest.mark.parametrize("spatial", [(16, 20), (12, 16, 6)])
def test_overlay_panels_2d_and_3d(tmp_path, spatial):
    label = torch.zeros(1, *spatial)
    label[(0, slice(4, 8), slice(4, 10)) + ((slice(2, 3),) if len(spatial) == 3 else ())] = 1
    image = torch.rand(3 if len(spatial) == 2 else 1, *[s // 2 for s in spatial])  # resampled to the label's size
    pred = torch.nn.functional.one_hot(label[0].long(), 2).movedim(-1, 0).float()
    path = overlay_panels(image, label, {"teacher": pred, "student": torch.zeros(1, *spatial)}, tmp_path / "a.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_overlay_saver_draws_the_first_cases_with_the_teacher(tmp_path):
    teacher = torch.nn.Conv2d(1, 2, 1)

    def step(engine: Engine, batch: dict) -> list[dict]:
        return [{"image": batch["image"][i], "label": batch["label"][i], "pred": torch.rand(2, 8, 8)} for i in range(2)]

    evaluator = Engine(step)
    evaluator.state.device = torch.device("cpu")
    saver = OverlaySaver(tmp_path, num_cases=3, teacher=teacher)
    saver.attach(evaluator)
    calls = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: calls.append(1))
    batches = [{"image": torch.rand(2, 1, 8, 8), "label": (torch.rand(2, 1, 8, 8) > 0.5).float()} for _ in range(3)]
    evaluator.run(batches)
    assert len(saver.written) == 3 and all(p.is_file() for p in saver.written)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == [p.name for p in saver.written]
