"""The polyp_kdas bundle: its stages through ConfigWorkflow on tiny synthetic data, MLflow, bad inputs (each method
file and two-process DDP: tests/bundles/test_all_bundles.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ckpt_export
from PIL import Image

from kd_components import TapNotFoundError
from kd_components.data.common import DatasetError
from kd_components.data.polyp import prepare_polyp_data
from kd_components.data.synthetic import make_synthetic_polyps
from tests.bundles.conftest import BUNDLES, SHARED, make_workflow, root_cause, run_workflow
from tests.bundles.conftest import FAST as BUNDLE_FAST

BUNDLE = "polyp_kdas"
FAST = BUNDLE_FAST[BUNDLE]


@pytest.fixture(scope="module")
def data_dir(tiny) -> Path:
    return tiny(BUNDLE).data_dir


@pytest.fixture(scope="module")
def teacher_run(tiny) -> dict:
    """The session's tiny setup (teacher trained one epoch): its overrides, ``ckpt_dir`` the teacher's folder."""
    setup = tiny(BUNDLE)
    return {**setup.over, "ckpt_dir": str(setup.models)}


def test_check_properties_train_and_infer(teacher_run, data_dir, tmp_path):
    over = {**teacher_run, "ckpt_dir": str(tmp_path), "teacher_ckpt": str(Path(teacher_run["ckpt_dir"]) / "teacher.pt")}
    train = make_workflow(BUNDLE, ["train.json"], **over)
    train.initialize()
    assert train.check_properties() == []
    (tmp_path / "model.pt").touch()  # inference's initialize checks that the weights and images exist
    infer = make_workflow(
        BUNDLE, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path), dataset_dir=str(data_dir / "images")
    )
    infer.initialize()
    assert infer.check_properties() == []


def test_train_and_inference_networks_agree():
    """inference.json (MONAI only) defines exactly the student that train.json trains."""
    train = make_workflow(BUNDLE, ["train.json"]).parser
    infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser
    assert train.get("network_def") == infer.get("network_def")
    assert train.get_parsed_content("image_size") == infer.get_parsed_content("image_size")
    teacher = train.get_parsed_content("teacher_def")
    student = train.get_parsed_content("network_def")
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s <= 0.1 * n_t, f"student has {n_s / n_t:.1%} of the teacher's parameters, the bundle promises <= 10%"


def test_distill_evaluate_infer_export(teacher_run, tmp_path):
    over = {**teacher_run, "output_dir": str(tmp_path / "eval")}
    ckpt_dir = Path(teacher_run["ckpt_dir"])
    teacher_before = torch.load(ckpt_dir / "teacher.pt", weights_only=True)
    wf = run_workflow(BUNDLE, ["train.json"], **over)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert {"train_kdas_attention", "train_kdas_sgm", "train_supervised"} <= set(trainer.state.metrics)
    curves = json.loads((tmp_path / "eval" / "loss_curves.json").read_text())  # one point per epoch and term
    expected = {"loss", "loss_supervised", "loss_kdas_attention", "loss_kdas_sgm", "validation/val_mean_dice"}
    assert expected <= set(curves) and all(len(curves[k]) == over["epochs"] for k in expected)
    assert (tmp_path / "eval" / "loss_curves.png").is_file()
    teacher_after = torch.load(ckpt_dir / "teacher.pt", weights_only=True)
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)

    # models/model.pt is a plain student state dict whose keys match network_def exactly (MONAI Label loads it
    # with strict=False, so a wrongly keyed file would fail silently)
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)
    student = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser.get_parsed_content("network_def")
    assert set(state) == set(student.state_dict())
    student.load_state_dict(state, strict=True)

    ev = run_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over)
    metrics = ev.parser.get_parsed_content("validate#evaluator").state.metrics
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["val_mean_iou"] <= 1.0
    per_case = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(per_case) == 1 + 2  # header + the test split of 20 images (10%)
    overlays = sorted((tmp_path / "eval" / "overlays").glob("*.png"))  # image, truth, teacher, student per case
    assert len(overlays) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in overlays)

    out = tmp_path / "masks"
    run_workflow(
        BUNDLE,
        ["inference.json"],
        workflow_type="infer",
        dataset_dir=str(Path(teacher_run["dataset_dir"]) / "images"),
        ckpt_dir=str(ckpt_dir),
        output_dir=str(out),
        image_size=FAST["image_size"],
    )
    masks = sorted(out.glob("*_seg.png"))
    assert len(masks) == 20
    mask = Image.open(masks[0])
    assert mask.size == (32, 32) and set(mask.getdata()) <= {0, 255}

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt_dir / "model.pt"),
        meta_file=str(BUNDLES / BUNDLE / "configs/metadata.json"),
        config_file=str(BUNDLES / BUNDLE / "configs/inference.json"),
    )
    scripted = torch.jit.load(str(ts))
    assert scripted(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_missing_teacher_checkpoint_says_what_to_do(data_dir, tmp_path):
    wf = make_workflow(BUNDLE, ["train.json"], dataset_dir=str(data_dir), ckpt_dir=str(tmp_path), **FAST)
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, FileNotFoundError) and "teacher checkpoint not found" in str(cause)
    assert "train_teacher.json" in str(cause)


def test_unknown_tap_lists_close_names(teacher_run, tmp_path):
    term = {
        "_target_": "kd_components.DistillationTerm",
        "name": "fitnet",
        "loss": {"_target_": "kd_components.losses.FitNetLoss"},
        "inputs": {"student": "student:model.1.submodul", "teacher": "teacher:model.1.submodule"},
    }
    wf = make_workflow(BUNDLE, ["train.json"], output_dir=str(tmp_path), **{**teacher_run, "distill#terms": [term]})
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, TapNotFoundError) and "'model.1.submodule'" in str(cause)
    assert "list_taps" in str(cause)


def test_missing_datalist_and_bad_labels_say_what_to_do(teacher_run, tmp_path):
    wf = make_workflow(
        BUNDLE,
        ["train.json", "train_teacher.json"],
        **{**teacher_run, "dataset_dir": str(tmp_path), "ckpt_dir": str(tmp_path)},
    )
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, DatasetError) and "datalist not found" in str(cause)
    assert "kd_components.data.polyp" in str(cause)

    bad = tmp_path / "bad"
    make_synthetic_polyps(bad, n=10, size=(32, 32), seed=1)
    label = sorted((bad / "labels").glob("*.png"))[0]
    Image.fromarray((np.array(Image.open(label)) * 255).astype(np.uint8)).save(label)  # a 0/255 mask
    wf = make_workflow(
        BUNDLE,
        ["train.json", "train_teacher.json"],
        **{**teacher_run, "dataset_dir": str(bad), "ckpt_dir": str(tmp_path)},
    )
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert "outside the class indices 0..1" in str(cause) and label.name in str(cause)


def test_feature_term_with_automatic_adapter_trains(teacher_run, tmp_path):
    """A FitNet term between taps of different widths gets an adapter that trains with the student."""
    term = {
        "_target_": "kd_components.DistillationTerm",
        "name": "fitnet",
        "loss": {"_target_": "kd_components.losses.FitNetLoss"},
        "inputs": {"student": "student:model.1.submodule.0", "teacher": "teacher:model.1.submodule.0"},
        "align": {"student": "teacher"},
    }
    over = {**teacher_run, "output_dir": str(tmp_path), "ckpt_dir": str(tmp_path), "distill#terms": [term]}
    over["teacher_ckpt"] = str(Path(teacher_run["ckpt_dir"]) / "teacher.pt")
    wf = make_workflow(BUNDLE, ["train.json"], **over)
    wf.initialize()
    adapter = wf.parser.get_parsed_content("distiller").terms[0].adapters["student"]
    assert (adapter.proj.in_channels, adapter.proj.out_channels) == (16, 64)
    before = adapter.proj.weight.detach().clone()
    wf.run()
    assert not torch.equal(before, adapter.proj.weight)


def test_structured_kd_holistic_discriminator_sees_the_image_and_the_score_map(teacher_run, tmp_path):
    """The full Structured KD (pixel + pair + holistic): its one discriminator reads (image, score map). That it
    trains, leaves the teacher alone and is saved: test_each_method_file_trains in test_all_bundles.py."""
    over = {**teacher_run, "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path / "eval")}
    over["teacher_ckpt"] = str(Path(teacher_run["ckpt_dir"]) / "teacher.pt")
    wf = make_workflow(BUNDLE, ["train.json", "methods/structured_kd_holistic.json"], **over)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert [t.name for t in trainer.distiller.terms] == ["pixel_wise", "pair_wise", "holistic"]
    bank = trainer.discriminators
    assert list(bank) == ["holistic"] and type(bank["holistic"]).__name__ == "SelfAttentionDiscriminator"
    assert bank["holistic"].features[0].in_channels == 3 + 2  # (image, score map)
    wf.finalize()


def test_mlflow_tracking_records_loss_terms_and_settings(teacher_run, tmp_path):
    over = {**teacher_run, "output_dir": str(tmp_path), "ckpt_dir": str(tmp_path)}
    over["teacher_ckpt"] = str(Path(teacher_run["ckpt_dir"]) / "teacher.pt")
    wf = make_workflow(BUNDLE, ["train.json"], tracking="mlflow", **over)
    wf.initialize()
    wf.run()
    wf.finalize()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    train_runs = [r for r in runs if "train_kdas_attention" in r.data.metrics]
    assert len(train_runs) == 1
    run = train_runs[0]
    assert {"train_kdas_sgm", "train_supervised", "train_loss", "lr_group_0", "val_mean_dice"} <= set(run.data.metrics)
    assert run.data.params["kd.terms"] == "kdas_attention,kdas_sgm"
    assert float(run.data.params["kd.supervised_weight"]) == pytest.approx(0.7)


KVASIR = SHARED / "datasets" / "Kvasir-SEG"


@pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"real data not found at {KVASIR}")
def test_short_real_data_run_on_kvasir(tmp_path):
    """Prepare 24 real Kvasir-SEG pairs (official layout), train the teacher and distil for one epoch each."""
    subset = tmp_path / "Kvasir-SEG"
    for sub in ("images", "masks"):
        (subset / sub).mkdir(parents=True)
    for image in sorted((KVASIR / "images").glob("*.jpg"))[:24]:
        (subset / "images" / image.name).symlink_to(image)
        (subset / "masks" / image.name).symlink_to(KVASIR / "masks" / image.name)
    data = tmp_path / "data"
    prepare_polyp_data(data, kvasir_dir=subset, max_size=96)
    over = {**FAST, "image_size": [64, 64], "dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models")}
    run_workflow(BUNDLE, ["train.json", "train_teacher.json"], output_dir=str(tmp_path / "t"), **over)
    wf = run_workflow(BUNDLE, ["train.json"], output_dir=str(tmp_path / "s"), **over)
    metrics = wf.parser.get_parsed_content("train#trainer").state.metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert (tmp_path / "models" / "model.pt").is_file()


METHODS = sorted(p.stem for p in (BUNDLES / BUNDLE / "configs" / "methods").glob("*.json"))


def test_method_list_covers_the_baselines():
    expected = {"none", "kdas", "logit_kd", "cwd", "dist", "at", "fitnet", "structured_kd", "ifvd", "emkd", "cirkd"}
    assert expected | {"mgd", "idd"} <= set(METHODS)
