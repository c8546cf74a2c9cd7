"""The vessel_lightvessel bundle: its stages through ConfigWorkflow on tiny synthetic vessels, FOV, MLflow (each
method file and two-process DDP: tests/bundles/test_all_bundles.py)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ckpt_export
from PIL import Image

from kd_components import DistillationTrainer
from kd_components.data.common import DatasetError
from kd_components.data.synthetic_vessels import make_synthetic_vessels
from kd_components.distiller import probe_shapes
from kd_components.losses import AdversarialDistillationLoss, FeatureSimilarityDistillationLoss
from tests.bundles.conftest import BUNDLES, VESSEL_SIZE, make_workflow, root_cause, run_workflow
from tests.bundles.conftest import FAST as BUNDLE_FAST

BUNDLE = "vessel_lightvessel"
SIZE = VESSEL_SIZE  # (H, W) of the synthetic images: not square, so a transposed mask would be caught
FAST = BUNDLE_FAST[BUNDLE]


@pytest.fixture(scope="module")
def data_dir(tiny) -> Path:
    """Synthetic X-ray vessels (grey, no field of view): the bundle's default setting (the session's tiny setup)."""
    return tiny(BUNDLE).data_dir


@pytest.fixture(scope="module")
def fundus_dir(tmp_path_factory) -> Path:
    """Synthetic fundus vessels (RGB, circular field of view, entries with "fov")."""
    out = tmp_path_factory.mktemp("fundus")
    make_synthetic_vessels(out, n=12, size=SIZE, seed=1, modality="fundus", overwrite=True)
    return out


@pytest.fixture(scope="module")
def teacher_run(tiny) -> dict:
    """The session's tiny setup (teacher trained one epoch): its overrides, ``ckpt_dir`` the teacher's folder."""
    setup = tiny(BUNDLE)
    return {**setup.over, "ckpt_dir": str(setup.models)}


def _student_run(teacher_run: dict, tmp_path: Path, **extra) -> dict:
    """Overrides of a student run writing into ``tmp_path`` with the module's teacher."""
    over = {**teacher_run, "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path / "eval"), **extra}
    over["teacher_ckpt"] = str(Path(teacher_run["ckpt_dir"]) / "teacher.pt")
    return over


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_check_properties_train_and_infer(teacher_run, data_dir, tmp_path):
    train = make_workflow(BUNDLE, ["train.json"], **_student_run(teacher_run, tmp_path))
    train.initialize()
    assert train.check_properties() == []
    (tmp_path / "model.pt").touch()  # inference's initialize checks that the weights and images exist
    infer = make_workflow(
        BUNDLE, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path), dataset_dir=str(data_dir / "images")
    )
    infer.initialize()
    assert infer.check_properties() == []


def test_train_and_inference_networks_agree():
    """inference.json (MONAI only) defines exactly the student that train.json trains, for both modalities."""
    for over in ({}, {"in_channels": 3}):
        train = make_workflow(BUNDLE, ["train.json"], **over).parser
        infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer", **over).parser
        assert train.get_parsed_content("network_def").state_dict().keys() == (
            infer.get_parsed_content("network_def").state_dict().keys()
        )
        assert str(train.get_parsed_content("network_def")) == str(infer.get_parsed_content("network_def"))
        assert train.get_parsed_content("image_size") == infer.get_parsed_content("image_size")
        assert train.get_parsed_content("image_mode") == infer.get_parsed_content("image_mode")
    assert make_workflow(BUNDLE, ["train.json"]).parser.get_parsed_content("in_channels") == 1  # X-ray default
    assert "kd_components" not in (BUNDLES / BUNDLE / "configs/inference.json").read_text()
    train = make_workflow(BUNDLE, ["train.json"]).parser
    n_t = sum(p.numel() for p in train.get_parsed_content("teacher_def").parameters())
    n_s = sum(p.numel() for p in train.get_parsed_content("network_def").parameters())
    assert n_s <= 0.05 * n_t, f"student has {n_s / n_t:.1%} of the teacher's parameters, the bundle promises <= 5%"


def test_fsd_pairs_have_equal_widths_and_no_trainable_projection(teacher_run, tmp_path):
    """Each FSD term pairs an encoder and a decoder tap of the same shape in both networks, so no projection is
    needed (none on the teacher side could be gamed by the student); ASD sees (label, softmax) pairs."""
    wf = make_workflow(BUNDLE, ["train.json"], **_student_run(teacher_run, tmp_path))
    wf.initialize()
    distiller = wf.parser.get_parsed_content("distiller")
    fsd = [t for t in distiller.terms if isinstance(t.loss, FeatureSimilarityDistillationLoss)]
    assert [t.name for t in fsd] == ["fsd_half", "fsd_quarter"]
    student, teacher = wf.parser.get_parsed_content("network"), wf.parser.get_parsed_content("teacher")
    for kind, net in (("student", student), ("teacher", teacher)):
        shapes = probe_shapes(net, kind, distiller.taps(kind), (1, 1, 32, 32))
        for term, scale in zip(fsd, (2, 4)):
            enc, dec = shapes[term.inputs[f"{kind}_encoder"]], shapes[term.inputs[f"{kind}_decoder"]]
            assert enc == dec and enc[2:] == (32 // scale, 32 // scale), (term.name, kind, enc, dec)
    assert distiller.student_parameters() == []  # no trainable projection; the discriminator is its own group
    (asd,) = [t for t in distiller.terms if isinstance(t.loss, AdversarialDistillationLoss)]
    assert asd.inputs == {"student": "student", "teacher": "teacher", "condition": "label"}
    logits = torch.randn(2, 2, 8, 8)
    assert torch.allclose(asd.transforms["teacher"](logits).sum(1), torch.ones(2, 8, 8))
    first_conv = next(m for m in asd.loss.discriminator.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1 + 2  # label map + the two softmax channels


def test_distill_evaluate_infer_export(teacher_run, tmp_path):
    over = {**teacher_run, "output_dir": str(tmp_path / "eval")}
    ckpt_dir = Path(teacher_run["ckpt_dir"])
    teacher_before = torch.load(ckpt_dir / "teacher.pt", weights_only=True)
    wf = make_workflow(BUNDLE, ["train.json"], **over)
    wf.initialize()
    bank = wf.parser.get_parsed_content("train#trainer").discriminators
    disc_before = {k: v.detach().clone() for k, v in bank.state_dict().items()}
    wf.run()
    wf.finalize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer, DistillationTrainer) and trainer.adversarial is not None
    expected = {"train_fsd_half", "train_fsd_quarter", "train_asd", "train_asd_discriminator", "train_supervised"}
    assert expected <= set(trainer.state.metrics)
    assert all(np.isfinite(v) for v in trainer.state.metrics.values())
    teacher_after = torch.load(ckpt_dir / "teacher.pt", weights_only=True)
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert any(not torch.equal(disc_before[k], v) for k, v in bank.state_dict().items())  # the discriminator trained
    saved = torch.load(ckpt_dir / "discriminator" / "discriminator.pt", weights_only=True)
    assert set(saved) == {"discriminators", "discriminator_optimizer"}
    assert set(saved["discriminators"]) == set(disc_before)

    # models/model.pt is a plain student state dict whose keys match network_def exactly
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)
    student = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser.get_parsed_content("network_def")
    assert set(state) == set(student.state_dict())
    student.load_state_dict(state, strict=True)

    ev = run_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over)
    metrics = ev.parser.get_parsed_content("validate#evaluator").state.metrics
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("val_mean_dice", "val_mean_iou", "val_cldice"))
    datalist = json.loads((Path(teacher_run["dataset_dir"]) / "datalist.json").read_text())
    test_names = {Path(e["image"]).name for e in datalist["test"]}
    for metric in ("mean_dice", "mean_iou", "hd95", "cldice"):
        rows = _csv(tmp_path / "eval" / f"val_{metric}_raw.csv")
        assert list(rows[0]) == ["filename", "class0", "mean"], metric  # foreground only, as the runner expects
        assert {Path(r["filename"]).name for r in rows} == test_names
    assert float(_csv(tmp_path / "eval" / "val_cldice_raw.csv")[0]["class0"]) == pytest.approx(
        float(_csv(tmp_path / "eval" / "val_cldice_raw.csv")[0]["mean"])
    )

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
    assert mask.size == (SIZE[1], SIZE[0]) and set(mask.getdata()) <= {0, 255}

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt_dir / "model.pt"),
        meta_file=str(BUNDLES / BUNDLE / "configs/metadata.json"),
        config_file=str(BUNDLES / BUNDLE / "configs/inference.json"),
    )
    scripted = torch.jit.load(str(ts))
    assert scripted(torch.rand(1, 1, 32, 48)).shape == (1, 2, 32, 48)


def _all_vessel_student(path: Path, in_channels: int) -> None:
    """Save a student state dict that predicts "vessel" everywhere (its last block outputs logits (0, 10))."""
    student = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer", in_channels=in_channels)
    state = student.parser.get_parsed_content("network_def").state_dict()
    for key in state:
        if key.startswith("model.2.") and state[key].is_floating_point():
            state[key] = torch.zeros_like(state[key])
    state["model.2.0.adn.N.bias"] = torch.tensor([0.0, 10.0])  # batch norm (eval) output: the constant (0, 10)
    state["model.2.0.adn.N.running_var"] = torch.ones(2)
    torch.save(state, path)


def test_evaluation_counts_only_pixels_inside_the_fov(fundus_dir, tmp_path):
    """A student that calls every pixel vessel: inside the FOV its Dice is 2|G| / (|FOV| + |G|); without the FOV
    (the same datalist minus its "fov" keys) the whole image counts, 2|G| / (H·W + |G|)."""
    _all_vessel_student(tmp_path / "model.pt", in_channels=3)
    over = {**FAST, "in_channels": 3, "ckpt_dir": str(tmp_path)}
    run_workflow(
        BUNDLE,
        ["train.json", "evaluate.json"],
        "eval",
        dataset_dir=str(fundus_dir),
        output_dir=str(tmp_path / "fov"),
        **over,
    )
    no_fov = tmp_path / "no_fov"
    shutil.copytree(fundus_dir, no_fov)
    datalist = json.loads((no_fov / "datalist.json").read_text())
    test_split = [dict(e) for e in datalist["test"]]
    for entries in (datalist["training"], datalist["validation"], datalist["test"]):
        for entry in entries:
            entry.pop("fov")
    (no_fov / "datalist.json").write_text(json.dumps(datalist))
    run_workflow(
        BUNDLE,
        ["train.json", "evaluate.json"],
        "eval",
        dataset_dir=str(no_fov),
        output_dir=str(tmp_path / "all"),
        **over,
    )
    for entry, with_fov, whole in zip(
        test_split, _csv(tmp_path / "fov" / "val_mean_dice_raw.csv"), _csv(tmp_path / "all" / "val_mean_dice_raw.csv")
    ):
        label = np.array(Image.open(fundus_dir / entry["label"])) > 0
        fov = np.array(Image.open(fundus_dir / entry["fov"])) > 0
        assert 0 < fov.sum() < fov.size and not (label & ~fov).any()
        assert Path(with_fov["filename"]).name == Path(entry["image"]).name
        assert float(with_fov["class0"]) == pytest.approx(2 * label.sum() / (fov.sum() + label.sum()), rel=1e-5)
        assert float(whole["class0"]) == pytest.approx(2 * label.sum() / (label.size + label.sum()), rel=1e-5)
        iou = float(_csv(tmp_path / "fov" / "val_mean_iou_raw.csv")[0]["class0"])
        assert 0 < iou < 1


def test_fundus_student_trains_and_validates_within_the_fov(fundus_dir, tmp_path):
    """RGB fundus with --in_channels 3: the student alone trains and validates on entries that carry a FOV."""
    over = {**FAST, "in_channels": 3, "dataset_dir": str(fundus_dir), "ckpt_dir": str(tmp_path)}
    wf = run_workflow(BUNDLE, ["train.json", "methods/none.json"], output_dir=str(tmp_path / "eval"), **over)
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_mean_dice", "val_mean_iou", "val_cldice"} <= set(metrics)
    assert (tmp_path / "model.pt").is_file()


def test_channel_mismatch_says_what_to_do(fundus_dir, tmp_path):
    wf = make_workflow(
        BUNDLE, ["train.json", "train_teacher.json"], dataset_dir=str(fundus_dir), ckpt_dir=str(tmp_path), **FAST
    )
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    assert re.search("3-channel images .* in_channels is 1.*--in_channels 3", str(root_cause(err.value)))


def test_missing_teacher_checkpoint_says_what_to_do(data_dir, tmp_path):
    wf = make_workflow(BUNDLE, ["train.json"], dataset_dir=str(data_dir), ckpt_dir=str(tmp_path), **FAST)
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, FileNotFoundError) and "teacher checkpoint not found" in str(cause)
    assert "train_teacher.json" in str(cause)


def test_missing_or_empty_datalist_and_bad_labels_say_what_to_do(data_dir, tmp_path):
    wf = make_workflow(BUNDLE, ["train.json", "train_teacher.json"], **{**FAST, "dataset_dir": str(tmp_path)})
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    cause = root_cause(err.value)
    assert isinstance(cause, DatasetError) and "datalist not found" in str(cause)
    assert "kd_components.data.vessels" in str(cause) and "synthetic_vessels" in str(cause)

    empty = tmp_path / "empty"
    shutil.copytree(data_dir, empty)
    datalist = json.loads((empty / "datalist.json").read_text())
    (empty / "datalist.json").write_text(json.dumps({**datalist, "training": []}))
    wf = make_workflow(BUNDLE, ["train.json", "train_teacher.json"], **{**FAST, "dataset_dir": str(empty)})
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    assert re.search("'training' section .* is empty", str(root_cause(err.value)))

    bad = tmp_path / "bad"
    make_synthetic_vessels(bad, n=10, size=SIZE, seed=2, modality="xray")
    label = bad / json.loads((bad / "datalist.json").read_text())["training"][0]["label"]
    Image.fromarray((np.array(Image.open(label)) * 255).astype(np.uint8)).save(label)  # a 0/255 mask
    wf = make_workflow(
        BUNDLE, ["train.json", "train_teacher.json"], **{**FAST, "dataset_dir": str(bad), "ckpt_dir": str(tmp_path)}
    )
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert "outside the class indices 0..1" in str(cause) and label.name in str(cause)


def test_mlflow_tracking_records_loss_terms_and_settings(teacher_run, tmp_path):
    wf = make_workflow(
        BUNDLE, ["train.json"], tracking="mlflow", **_student_run(teacher_run, tmp_path, output_dir=str(tmp_path))
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    train_runs = [r for r in runs if "train_fsd_half" in r.data.metrics]
    assert len(train_runs) == 1
    run = train_runs[0]
    expected = {"train_fsd_quarter", "train_asd", "train_asd_discriminator", "train_supervised", "val_cldice"}
    assert expected <= set(run.data.metrics)
    assert run.data.params["kd.terms"] == "fsd_half,fsd_quarter,asd"
    assert run.data.params["kd.asd.discriminator"] == "PatchDiscriminator"
    assert run.data.params["kd.asd.objective"] == "HingeObjective"


METHODS = sorted(p.stem for p in (BUNDLES / BUNDLE / "configs" / "methods").glob("*.json"))


def test_method_list_covers_the_baselines_and_lightvessel_equals_the_default():
    baselines = {"logit_kd", "cwd", "dist", "at", "fitnet", "structured_kd", "ifvd", "emkd", "cirkd", "mgd", "idd"}
    assert baselines | {"none", "lightvessel", "fsd", "asd"} <= set(METHODS)
    default = make_workflow(BUNDLE, ["train.json"]).parser
    seed = make_workflow(BUNDLE, ["train.json", "methods/lightvessel.json"]).parser
    for key in ("distill", "train#trainer", "discriminator_def", "discriminator_learning_rate", "loss"):
        assert default.get(key) == seed.get(key), key
