"""The multiorgan_graphflow bundle: every stage through ConfigWorkflow on tiny synthetic ACDC-like volumes.

The volumes are written in the SSL4MIS ACDC layout (imagesTr/ + labelsTr/ NIfTI, splits.csv) and prepared with the
real preparer (``kd_components.data.volumes``): volumes for per-volume validation / evaluation, 2D NPY slices for
training. They are 40x36 in-plane while the networks run at 32x32, so evaluation and inference must bring the
prediction back to each volume's own size.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ckpt_export

from kd_components import load_paraphraser_encoder
from kd_components.data.common import DatasetError
from kd_components.data.volumes import prepare_acdc_data, write_slices
from kd_components.modules import Paraphraser
from kd_components.taps import list_tap_candidates
from tests.bundles.conftest import (
    BUNDLES,
    SHARED,
    VOLUME_PATIENTS,
    VOLUME_SHAPE,
    make_workflow,
    root_cause,
    run_workflow,
)
from tests.bundles.conftest import FAST as BUNDLE_FAST

BUNDLE = "multiorgan_graphflow"
FAST = BUNDLE_FAST[BUNDLE]
SHAPE = VOLUME_SHAPE  # (H, W, Z) of the synthetic volumes
PATIENTS = VOLUME_PATIENTS[BUNDLE]  # patients 2 and 7 are the validation split of splits.csv


@pytest.fixture(scope="module")
def data_dir(tiny) -> Path:
    """Synthetic ACDC prepared by the real preparer (the session's tiny setup): volumes + datalist.json, slices/."""
    return tiny(BUNDLE).data_dir


@pytest.fixture(scope="module")
def teacher_run(tiny) -> dict:
    """The session's tiny setup (teacher trained one epoch): its overrides, ``ckpt_dir`` the teacher's folder."""
    setup = tiny(BUNDLE)
    return {**setup.over, "ckpt_dir": str(setup.models)}


@pytest.fixture(scope="module")
def paraphraser_run(tiny) -> dict:
    """The tiny setup's paraphraser stage (both paraphrasers, in the teacher's folder): its trainers' metrics."""
    setup = tiny(BUNDLE)
    assert {"paraphraser_shallow.pt", "paraphraser_deep.pt"} <= {p.name for p in setup.models.iterdir()}
    return {
        "shallow": dict(setup.paraphrasers.parser.get_parsed_content("train#trainer").state.metrics),
        "deep": dict(setup.paraphrasers.parser.get_parsed_content("paraphraser#deep_trainer").state.metrics),
    }


def student(teacher_run: dict, paraphraser_run: dict, out: Path) -> dict:
    """Overrides of a student run writing into ``out``, reading the module's teacher and paraphrasers."""
    models = Path(teacher_run["ckpt_dir"])
    return {
        **teacher_run,
        "ckpt_dir": str(out),
        "output_dir": str(out / "eval"),
        "teacher_ckpt": str(models / "teacher.pt"),
        "paraphraser_dir": str(models),
    }


def test_check_properties_of_every_stage(teacher_run, paraphraser_run, data_dir, tmp_path):
    over = student(teacher_run, paraphraser_run, tmp_path)
    for names in (
        ["train.json"],
        ["train.json", "train_teacher.json"],
        ["train.json", "train_paraphraser.json"],
        ["train.json", "semisupervised.json"],
        ["train.json", "methods/none.json", "labelled_only.json"],
    ):
        # the paraphraser stage backs up the paraphrasers in its paraphraser_dir: not the module's
        paraphrasers = {"paraphraser_dir": str(tmp_path / "p")} if "train_paraphraser.json" in names else {}
        wf = make_workflow(BUNDLE, names, **{**over, **paraphrasers})
        wf.initialize()
        assert wf.check_properties() == [], names
    (tmp_path / "model.pt").touch()  # inference's initialize checks that the weights and volumes exist
    images = str(data_dir / "volumes" / "images")
    infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path), dataset_dir=images)
    infer.initialize()
    assert infer.check_properties() == []


def test_class_names_in_metadata():
    """The metadata names ACDC's classes (verify_metadata / verify_net_in_out: tests/bundles/test_all_bundles.py)."""
    bundle = BUNDLES / BUNDLE
    metadata = json.loads((bundle / "configs/metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "background", "1": "RV", "2": "Myo", "3": "LV"}


def test_networks_and_graph_flow_taps():
    """inference.json defines the student train.json trains; the Graph Flow taps are one encoder and one decoder
    stage at a quarter of the input size, of one width per network, which the paraphrasers map to the student's."""
    train = make_workflow(BUNDLE, ["train.json"]).parser
    infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser
    infer["settings_path"] = ""  # no trained settings: inference.json's defaults
    for key in ("network_def", "num_classes", "sw_batch_size"):
        assert train.get(key) == infer.get(key), key
    assert train.get_parsed_content("image_size") == infer.get_parsed_content("image_size")
    assert infer.get("inferer") == train.get("validate#inferer")
    teacher, student_net = train.get_parsed_content("teacher_def"), train.get_parsed_content("network_def")
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student_net.parameters())
    assert n_s <= 0.1 * n_t, f"student has {n_s / n_t:.1%} of the teacher's parameters, the bundle promises <= 10%"
    taps, graph_flow = train.get_parsed_content("taps"), train.get_parsed_content("graph_flow")
    for net, side, width in ((student_net, "student", 16), (teacher, "teacher", 64)):
        shapes = {f"{side}:{name}": shape for name, _, shape in list_tap_candidates(net, (1, 1, 64, 64))}
        assert shapes[taps["shallow"][side]] == shapes[taps["deep"][side]] == (1, width, 16, 16)
        assert graph_flow[f"{side}_channels"] == width
    paraphraser = train.get_parsed_content("paraphraser#shallow_def")
    assert (paraphraser.encoder[0].conv.in_channels, paraphraser.factor_channels) == (64, 16)


def test_paraphraser_stage_trains_both_encoders(teacher_run, paraphraser_run):
    ckpt_dir = Path(teacher_run["ckpt_dir"])
    for role in ("shallow", "deep"):
        assert np.isfinite(paraphraser_run[role]["train_reconstruction"])
        encoder = load_paraphraser_encoder(Paraphraser(2, 64, 16), ckpt_dir / f"paraphraser_{role}.pt")
        assert encoder(torch.zeros(1, 64, 8, 8)).shape == (1, 16, 8, 8)
        assert not any(p.requires_grad for p in encoder.parameters())
    shallow = torch.load(ckpt_dir / "paraphraser_shallow.pt", weights_only=True)
    deep = torch.load(ckpt_dir / "paraphraser_deep.pt", weights_only=True)
    assert set(shallow) == set(Paraphraser(2, 64, 16).state_dict())
    assert any(not torch.equal(shallow[k], deep[k]) for k in shallow), "the two paraphrasers are the same"


def test_distill_evaluate_infer_export(teacher_run, paraphraser_run, data_dir, tmp_path):
    over = student(teacher_run, paraphraser_run, tmp_path / "models")
    models = Path(teacher_run["ckpt_dir"])
    before = {n: torch.load(models / n, weights_only=True) for n in ("teacher.pt", "paraphraser_shallow.pt")}
    wf = run_workflow(BUNDLE, ["train.json"], **over)
    trainer = wf.parser.get_parsed_content("train#trainer")
    expected = {"graph_flow", "adversarial", "adversarial_discriminator", "logit_kd", "supervised"}
    assert {f"train_{n}" for n in expected} <= set(trainer.state.metrics)
    assert all(np.isfinite(trainer.state.metrics[f"train_{n}"]) for n in expected)
    for name, state in before.items():  # the teacher and the frozen paraphrasers are not changed
        after = torch.load(models / name, weights_only=True)
        assert all(torch.equal(state[k], after[k]) for k in state), name

    # models/model.pt is a plain student state dict whose keys match network_def exactly (MONAI Label loads it
    # with strict=False, so a wrongly keyed file would fail silently); the discriminator is saved beside it
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    student_net = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser.get_parsed_content(
        "network_def"
    )
    assert set(state) == set(student_net.state_dict())
    student_net.load_state_dict(state, strict=True)
    adversarial = torch.load(tmp_path / "models" / "discriminator" / "model_discriminator.pt", weights_only=True)
    assert set(adversarial) == {"discriminators", "discriminator_optimizer"}
    assert all(k.startswith("adversarial.") for k in adversarial["discriminators"])

    # evaluation per volume, at each volume's own size, per class (background excluded)
    ev = run_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over)
    metrics = ev.parser.get_parsed_content("validate#evaluator").state.metrics
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["val_mean_iou"] <= 1.0
    test_cases = json.loads((data_dir / "datalist.json").read_text())["test"]
    for name in ("val_mean_dice_raw.csv", "val_mean_iou_raw.csv", "val_hd95_raw.csv"):
        rows = list(csv.reader((tmp_path / "models" / "eval" / name).open()))
        assert rows[0] == ["filename", "class0", "class1", "class2", "mean"], name
        assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(Path(c["image"]).name for c in test_cases)
    assert len(list((tmp_path / "models" / "eval" / "overlays").glob("*.png"))) == min(4, len(test_cases))

    # inference: NIfTI label volumes of each input's shape and affine
    out = tmp_path / "masks"
    images = data_dir / "volumes" / "images"
    run_workflow(
        BUNDLE,
        ["inference.json"],
        workflow_type="infer",
        dataset_dir=str(images),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(out),
        image_size=FAST["image_size"],
    )
    masks = sorted(out.glob("*_seg.nii.gz"))
    assert len(masks) == len(list(images.glob("*.nii.gz"))) == 2 * PATIENTS
    source = nib.load(str(images / masks[0].name.replace("_seg", "")))
    mask = nib.load(str(masks[0]))
    assert mask.shape == source.shape == SHAPE and np.allclose(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(tmp_path / "models" / "model.pt"),
        meta_file=str(BUNDLES / BUNDLE / "configs/metadata.json"),
        config_file=str(BUNDLES / BUNDLE / "configs/inference.json"),
    )
    assert torch.jit.load(str(ts))(torch.rand(1, 1, 32, 32)).shape == (1, 4, 32, 32)


def test_per_volume_postprocessing_restores_each_volume_size(data_dir):
    """Validation / evaluation bring a prediction made at image_size back to the volume's own size and grid: the
    true label, resized like the image (up: no information lost) and inverted by the bundle's postprocessing, scores
    Dice 1 per class, so prediction and label are aligned voxel for voxel."""
    over = {**FAST, "image_size": [48, 48]}
    parser = make_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over).parser
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    entry = json.loads((data_dir / "datalist.json").read_text())["test"][0]
    item = preprocessing({k: str(data_dir / entry[k]) for k in ("image", "label")})
    assert item["image"].shape == (1, 48, 48, SHAPE[2]) and item["label"].shape == (1, *SHAPE)
    one_hot = torch.nn.functional.one_hot(item["label"][0].long(), 4).permute(3, 0, 1, 2).float()
    logits = 20 * torch.nn.functional.interpolate(one_hot[None], size=item["image"].shape[1:], mode="nearest-exact")[0]
    out = postprocessing({**item, "pred": logits})
    assert out["pred"].shape == out["label"].shape == (4, *SHAPE)
    overlap = (out["pred"] * out["label"]).sum((1, 2, 3))
    dice = 2 * overlap / (out["pred"].sum((1, 2, 3)) + out["label"].sum((1, 2, 3)))
    assert torch.all(dice > 0.99), dice


def test_missing_teacher_or_paraphraser_says_what_to_run(teacher_run, paraphraser_run, tmp_path):
    wf = make_workflow(BUNDLE, ["train.json"], **{**teacher_run, "ckpt_dir": str(tmp_path)})
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, FileNotFoundError) and "teacher checkpoint not found" in str(cause)
    assert "train_teacher.json" in str(cause)

    over = {**student(teacher_run, paraphraser_run, tmp_path), "paraphraser_dir": str(tmp_path / "none")}
    wf = make_workflow(BUNDLE, ["train.json"], **over)
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, FileNotFoundError) and "paraphraser checkpoint not found" in str(cause)
    assert "paraphraser_shallow.pt" in str(cause) and "train_paraphraser.json" in str(cause)

    # the paraphraser stage itself needs the teacher
    wf = make_workflow(BUNDLE, ["train.json", "train_paraphraser.json"], **{**teacher_run, "ckpt_dir": str(tmp_path)})
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    assert "train_teacher.json" in str(root_cause(err.value))


def test_bad_data_says_what_to_do(teacher_run, data_dir, tmp_path):
    stage = ["train.json", "train_teacher.json"]

    def failure(dataset_dir: Path) -> BaseException:
        wf = make_workflow(BUNDLE, stage, **{**teacher_run, "dataset_dir": str(dataset_dir), "ckpt_dir": str(tmp_path)})
        with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
            wf.initialize()
            wf.run()
        return root_cause(err.value)

    cause = failure(tmp_path / "nothing")
    assert isinstance(cause, DatasetError) and "datalist not found" in str(cause)
    assert "kd_components.data.volumes" in str(cause)

    volumes_only = tmp_path / "volumes_only"  # prepared without --slices
    shutil.copytree(data_dir, volumes_only, ignore=shutil.ignore_patterns("slices"))
    cause = failure(volumes_only)
    assert "slices" in str(cause) and "write_slices" in str(cause)

    no_validation = tmp_path / "no_validation"
    shutil.copytree(data_dir, no_validation)
    datalist = json.loads((no_validation / "datalist.json").read_text())
    (no_validation / "datalist.json").write_text(json.dumps({**datalist, "validation": []}))
    cause = failure(no_validation)
    assert isinstance(cause, DatasetError) and "'validation' section" in str(cause) and "is empty" in str(cause)

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    label = sorted((bad / "slices" / "labels").glob("*.npy"))[0]
    np.save(label, np.where(np.load(label) == 3, 7, np.load(label)).astype(np.uint8))  # an unknown class
    cause = failure(bad)
    assert "outside the class indices 0..3" in str(cause) and label.name in str(cause)


def test_semisupervised_split_by_patient_with_mlflow(teacher_run, paraphraser_run, data_dir, tmp_path):
    """Labelled fraction chosen by patient (no patient on both sides); unlabelled slices train through the
    distillation terms only, Graph Flow's critic included; the run is tracked in MLflow with every term."""
    over = student(teacher_run, paraphraser_run, tmp_path)
    wf = make_workflow(BUNDLE, ["train.json", "semisupervised.json"], tracking="mlflow", **over)
    wf.initialize()
    split = wf.parser.get_parsed_content("labelled_split")
    volumes = json.loads((data_dir / "datalist.json").read_text())["training"]
    patient = {v["case"]: v["patient"] for v in volumes}
    labelled = {patient[item["case"]] for item in split if item["labelled"]}
    assert not labelled & {patient[item["case"]] for item in split if not item["labelled"]}
    assert len(labelled) == round(0.25 * len(set(patient.values())))
    assert all(("label" in item) == item["labelled"] for item in split)
    wf.run()
    wf.finalize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert type(trainer).__name__ == "DistillationTrainer" and trainer.semi_supervised
    assert trainer.adversarial is not None
    fraction = sum(item["labelled"] for item in split) / len(split)
    assert trainer.state.metrics["train_labelled_fraction"] == pytest.approx(fraction)
    assert np.isfinite(trainer.state.metrics["train_graph_flow"])
    client = MlflowClient(f"sqlite:///{tmp_path}/eval/mlruns.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = next(r for r in runs if "train_graph_flow" in r.data.metrics)
    assert {"train_adversarial", "train_logit_kd", "train_supervised", "val_mean_dice"} <= set(run.data.metrics)
    assert run.data.params["kd.terms"] == "graph_flow,adversarial,logit_kd,pixel_kd"
    assert np.isfinite(trainer.state.metrics["train_pixel_kd"]), "the teacher's per-pixel answers on every slice"
    # pixel_kd_weight 0 and the labelled-only baseline: the shared test in test_all_bundles.py (every bundle)


METHODS = sorted(p.stem for p in (BUNDLES / BUNDLE / "configs" / "methods").glob("*.json"))


def test_method_list_covers_the_baselines():
    expected = {"none", "graph_flow", "logit_kd", "cwd", "dist", "at", "fitnet", "structured_kd", "ifvd", "emkd"}
    assert expected | {"cirkd", "mgd", "idd"} <= set(METHODS)
    train = make_workflow(BUNDLE, ["train.json"]).parser
    seed = make_workflow(BUNDLE, ["train.json", "methods/graph_flow.json"]).parser
    assert seed.get("distill") == train.get("distill"), "methods/graph_flow.json must equal train.json's default"


ACDC = SHARED / "datasets" / "ACDC"


@pytest.mark.skipif(not (ACDC / "imagesTr").is_dir(), reason=f"real data not found at {ACDC}")
def test_short_real_data_run_on_acdc(tmp_path):
    """Prepare 4 real ACDC patients (shared SSL4MIS copy), train the teacher, the paraphrasers and the Graph Flow
    student for one epoch at 64x64, and evaluate per volume at the original resolution."""
    data = tmp_path / "data"
    write_slices(prepare_acdc_data(ACDC, data, limit=4))
    over = {**FAST, "image_size": [64, 64], "dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models")}
    run_workflow(BUNDLE, ["train.json", "train_teacher.json"], output_dir=str(tmp_path / "t"), **over)
    run_workflow(BUNDLE, ["train.json", "train_paraphraser.json"], **over)
    wf = run_workflow(BUNDLE, ["train.json"], output_dir=str(tmp_path / "s"), **over)
    metrics = wf.parser.get_parsed_content("train#trainer").state.metrics
    assert all(np.isfinite(v) for v in metrics.values())
    split = "test" if json.loads((data / "datalist.json").read_text())["test"] else "validation"
    evaluate = {"validate#dataset#data": f"$kd_components.data.datalist.load_datalist(@datalist, '{split}')"}
    run_workflow(BUNDLE, ["train.json", "evaluate.json"], "eval", output_dir=str(tmp_path / "e"), **over, **evaluate)
    rows = list(csv.DictReader((tmp_path / "e" / "val_mean_dice_raw.csv").open()))
    assert rows and all(0.0 <= float(r["mean"]) <= 1.0 for r in rows if np.isfinite(float(r["mean"])))
