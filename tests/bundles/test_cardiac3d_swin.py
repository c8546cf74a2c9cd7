"""The cardiac3d_swin bundle: every stage through ConfigWorkflow on tiny synthetic ACDC-like volumes.

The volumes (40x36x4, prepared by the real preparer) are resampled to pixdim (2, 2, 1), padded to the patch and
trained one iteration per stage (``epoch_length`` 1) at 64x32x32, the smallest patch the SwinUNETR
teacher takes in training (a multiple of 32 per axis, and more than one voxel at its bottleneck for instance norm).
Metadata, ``verify_net_in_out``, the method files' merge with multi-GPU training, each method file's training and
two-process DDP training are checked for every bundle in tests/bundles/test_all_bundles.py; TorchScript / ONNX export
of the student in tests/scripts/test_export_student.py.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ckpt_export

from kd_components import FeatureTaps
from tests.bundles.conftest import BUNDLES, VOLUME_PATIENTS, VOLUME_SHAPE, make_workflow, root_cause, run_workflow
from tests.bundles.conftest import FAST as BUNDLE_FAST

BUNDLE = "cardiac3d_swin"
FAST = BUNDLE_FAST[BUNDLE]
PATCH = FAST["image_size"]
SHAPE = VOLUME_SHAPE  # (H, W, Z) of the synthetic volumes
PATIENTS = VOLUME_PATIENTS[BUNDLE]  # patient 2 is the validation split
METHODS = sorted(p.stem for p in (BUNDLES / BUNDLE / "configs" / "methods").glob("*.json"))


@pytest.fixture(scope="module")
def data_dir(tiny) -> Path:
    """Synthetic ACDC prepared by the real preparer (the session's tiny setup): volumes + datalist.json."""
    return tiny(BUNDLE).data_dir


@pytest.fixture(scope="module")
def teacher_run(tiny) -> dict:
    """The session's tiny setup (SwinUNETR teacher trained one iteration): its overrides, ``ckpt_dir`` its folder."""
    setup = tiny(BUNDLE)
    return {**setup.over, "ckpt_dir": str(setup.models)}


def student(teacher_run: dict, out: Path) -> dict:
    """Overrides of a student run writing into ``out``, reading the module's teacher."""
    return {
        **teacher_run,
        "ckpt_dir": str(out),
        "output_dir": str(out / "eval"),
        "teacher_ckpt": str(Path(teacher_run["ckpt_dir"]) / "teacher.pt"),
    }


def test_check_properties_of_every_stage(teacher_run, data_dir, tmp_path):
    over = student(teacher_run, tmp_path)
    for names in (["train.json"], ["train.json", "train_teacher.json"]):
        wf = make_workflow(BUNDLE, names, **over)
        wf.initialize()
        assert wf.check_properties() == [], names
        wf.finalize()
    (tmp_path / "model.pt").touch()  # inference's initialize checks that the weights and volumes exist
    images = str(data_dir / "volumes" / "images")
    infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path), dataset_dir=images)
    infer.initialize()
    assert infer.check_properties() == []


def test_networks_sizes_and_speed():
    """inference.json serves the student train.json trains; it has <= 10% of the teacher's parameters and runs at
    least 5x faster on CPU at the same input (best of 3 runs each; the docs give the measured figures)."""
    train = make_workflow(BUNDLE, ["train.json"]).parser
    infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser
    infer["settings_path"] = ""  # no trained settings: inference.json's defaults
    for key in ("network_def", "num_classes", "pixdim", "sw_batch_size", "sw_overlap", "inferer"):
        assert train.get(key) == infer.get(key) or train.get(f"validate#{key}") == infer.get(key), key
    assert train.get_parsed_content("image_size") == infer.get_parsed_content("image_size")
    teacher, student_net = train.get_parsed_content("teacher_def"), train.get_parsed_content("network_def")
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student_net.parameters())
    assert n_s <= 0.1 * n_t, f"student has {n_s / n_t:.1%} of the teacher's parameters, the bundle promises <= 10%"

    def seconds(net: torch.nn.Module, x: torch.Tensor) -> float:
        best = float("inf")
        with torch.no_grad():
            net.eval()
            net(x)
            for _ in range(3):
                start = time.perf_counter()
                net(x)
                best = min(best, time.perf_counter() - start)
        return best

    x = torch.rand(1, 1, *PATCH)
    speedup = seconds(teacher, x) / seconds(student_net, x)
    assert speedup >= 5, f"the student is only {speedup:.1f}x faster than the teacher on CPU"


def test_swin_taps_have_the_shapes_the_methods_use():
    """The taps named once in train.json: SwinUNETR's patch embedding (feature_size channels at 1/2) and its first two
    Swin stages (2x and 4x feature_size channels at 1/4 and 1/8), each on the grid of the student tap it is paired
    with; the channels differ, so the methods that compare features project the student (``align``)."""
    parser = make_workflow(BUNDLE, ["train.json"]).parser
    taps = parser.get_parsed_content("taps")
    networks = {
        "teacher": parser.get_parsed_content("teacher_def"),
        "student": parser.get_parsed_content("network_def"),
    }
    size = [96, 96, 32]
    shapes = {}
    for side, net in networks.items():
        names = [taps[level][side].split(":", 1)[1] for level in ("embed", "shallow", "deep")]
        with FeatureTaps(net, names, owner=side) as recorder, torch.no_grad():
            net.eval()
            net(torch.zeros(1, 1, *size))
            shapes[side] = [tuple(recorder[n].shape) for n in names]
    fs = parser.get_parsed_content("teacher_def#feature_size")
    grids = [tuple(s // f for s in size) for f in (2, 4, 8)]
    assert shapes["teacher"] == [(1, c, *g) for c, g in zip((fs, 2 * fs, 4 * fs), grids)]
    assert shapes["student"] == [(1, c, *g) for c, g in zip((8, 16, 32), grids)]


def test_distill_evaluate_infer_export(teacher_run, data_dir, tmp_path):
    over = student(teacher_run, tmp_path / "models")
    teacher_before = torch.load(Path(teacher_run["ckpt_dir"]) / "teacher.pt", weights_only=True)
    wf = run_workflow(BUNDLE, ["train.json"], **over)
    trainer = wf.parser.get_parsed_content("train#trainer")
    expected = {"stage_embed", "stage_shallow", "stage_deep", "logit_kd", "supervised"}
    assert {f"train_{n}" for n in expected} <= set(trainer.state.metrics)
    assert all(np.isfinite(trainer.state.metrics[f"train_{n}"]) for n in expected)
    after = torch.load(Path(teacher_run["ckpt_dir"]) / "teacher.pt", weights_only=True)
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before), "the teacher changed"

    # models/model.pt: a plain student state dict whose keys match inference.json's network_def exactly
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    net = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser.get_parsed_content("network_def")
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state, strict=True)
    assert json.loads((tmp_path / "models" / "model_settings.json").read_text()) == {"image_size": PATCH}

    # evaluation per volume on its own grid, per foreground class, HD95 in voxels (identity affine)
    ev = run_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over)
    metrics = ev.parser.get_parsed_content("validate#evaluator").state.metrics
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["val_mean_iou"] <= 1.0
    test_cases = json.loads((data_dir / "datalist.json").read_text())["test"]
    for name in ("val_mean_dice_raw.csv", "val_mean_iou_raw.csv", "val_hd95_raw.csv"):
        rows = list(csv.reader((tmp_path / "models" / "eval" / name).open()))
        assert rows[0] == ["filename", "class0", "class1", "class2", "mean"], name
        assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(Path(c["image"]).name for c in test_cases)
    assert len(list((tmp_path / "models" / "eval" / "overlays").glob("*.png"))) == min(4, len(test_cases))

    # inference (MONAI only): NIfTI label volumes of each input's shape and affine, at the recorded patch size
    out = tmp_path / "masks"
    images = data_dir / "volumes" / "images"
    infer = run_workflow(
        BUNDLE,
        ["inference.json"],
        workflow_type="infer",
        dataset_dir=str(images),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(out),
    )
    assert infer.parser.get_parsed_content("inferer").roi_size == PATCH
    assert "kd_components" not in (BUNDLES / BUNDLE / "configs" / "inference.json").read_text()
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
    x = torch.rand(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net.eval()(x), rtol=0, atol=1e-5)


def test_validation_restores_each_volume_grid(data_dir):
    """Validation resamples the image (pixdim) and brings the prediction back to the label's grid: the true label,
    resampled like the image (finer here, so no information is lost) and inverted by the bundle's postprocessing,
    scores Dice 1 per class, so prediction and label are aligned voxel for voxel."""
    over = {**FAST, "pixdim": [0.5, 0.5, 1.0]}
    parser = make_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over).parser
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    entry = json.loads((data_dir / "datalist.json").read_text())["test"][0]
    item = preprocessing({k: str(data_dir / entry[k]) for k in ("image", "label")})
    assert item["image"].shape == (1, 79, 71, SHAPE[2]) and item["label"].shape == (1, *SHAPE)
    one_hot = torch.nn.functional.one_hot(item["label"][0].long(), 4).permute(3, 0, 1, 2).float()
    logits = 20 * torch.nn.functional.interpolate(one_hot[None], size=item["image"].shape[1:], mode="nearest-exact")[0]
    out = postprocessing({**item, "pred": logits})
    assert out["pred"].shape == out["label"].shape == (4, *SHAPE)
    overlap = (out["pred"] * out["label"]).sum((1, 2, 3))
    dice = 2 * overlap / (out["pred"].sum((1, 2, 3)) + out["label"].sum((1, 2, 3)))
    assert torch.all(dice > 0.99), dice


def test_patch_size_the_teacher_refuses_is_named(teacher_run, tmp_path):
    wf = make_workflow(BUNDLE, ["train.json"], **{**student(teacher_run, tmp_path), "image_size": [64, 32, 16]})
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    assert "multiple of 32" in str(root_cause(err.value)) and "--image_size [64, 32, 32]" in str(root_cause(err.value))


def test_method_files():
    """The baselines, the feature methods across architectures and the cross-architecture method; the default
    distillation of train.json is methods/stage_space.json."""
    assert {"none", "logit_kd", "cwd", "dist", "at", "fitnet", "stage_space"} <= set(METHODS)
    train = make_workflow(BUNDLE, ["train.json"]).parser
    seed = make_workflow(BUNDLE, ["train.json", "methods/stage_space.json"]).parser
    assert seed.get("distill") == train.get("distill"), "methods/stage_space.json must equal train.json's default"


def test_the_seed_method_warm_up_reaches_every_term():
    """``distill#warmup_epochs`` ramps every term of the seed method from 0 (default 2 epochs; 0: full weight at
    once); its named weights are the terms' weights (default: TransKD's stage weights × 0.1, measured over three
    seeds in the docs)."""
    names = ["train.json", "methods/stage_space.json"]
    terms = make_workflow(BUNDLE, names).parser.get_parsed_content("distill#terms")
    assert [t.name for t in terms] == ["stage_embed", "stage_shallow", "stage_deep", "logit_kd"]
    assert [t.weight for t in terms] == [0.01, 0.05, 0.1, 1.0]
    assert [t.schedule(1, 1) for t in terms] == [0.0] * 4
    assert [t.schedule(1, 2) for t in terms] == [0.5] * 4
    assert [t.schedule(1, 3) for t in terms] == [1.0] * 4
    parser = make_workflow(BUNDLE, names, **{"distill#warmup_epochs": 0, "distill#stage_weights#deep": 0.3}).parser
    terms = parser.get_parsed_content("distill#terms")
    assert [t.weight for t in terms] == [0.01, 0.05, 0.3, 1.0]
    assert {t.schedule(1, 1) for t in terms} == {1.0}
