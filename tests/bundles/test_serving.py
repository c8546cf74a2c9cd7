"""What MONAI Label and model-zoo users get from every bundle: the trained image size, 2D masks the writer can
write at the image's size, the packages inference really needs, and a teacher MONAI Label does not offer."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import SaveImaged
from PIL import Image

from kd_components import AtomicCheckpointSaver
from kd_components.settings import read_trained_settings, trained_settings_path, write_trained_settings
from tests.bundles.conftest import BUNDLES, configs, make_workflow

NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "inference.json").is_file())
VOLUME_BUNDLES = ["multiorgan_graphflow", "cardiac3d_swin"]
IMAGE_BUNDLES = [n for n in NAMES if n not in VOLUME_BUNDLES]
INFERENCE_PACKAGES = {"pytorch-ignite", "fire"}  # + torch and monai (pytorch_version, monai_version)


def _parser(bundle: str, name: str = "inference.json", **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(configs(bundle, name)[0])
    parser.update({"bundle_root": str(BUNDLES / bundle), **override})
    return parser


def test_settings_file_sits_beside_its_checkpoint(tmp_path):
    assert trained_settings_path(tmp_path / "model.pt") == tmp_path / "model_settings.json"
    assert read_trained_settings(tmp_path / "model.pt") == {}
    written = write_trained_settings(tmp_path / "model.pt", {"image_size": (64, 48), "scale": np.float32(0.5)})
    assert json.loads(written.read_text()) == {"image_size": [64, 48], "scale": 0.5}
    assert read_trained_settings(tmp_path / "model.pt") == {"image_size": [64, 48], "scale": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["model_settings.json"]  # no temporary file left


def test_saver_records_the_settings_with_each_checkpoint(tmp_path):
    """The settings are written when (and only when) the key-metric checkpoint is: never ahead of the weights."""
    from ignite.engine import Engine, Events

    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    scores = iter([0.5, 0.4, 0.9])

    @engine.on(Events.EPOCH_COMPLETED)
    def _score(e):
        e.state.metrics = {"dice": next(scores)}
        e.state.key_metric_name = "dice"
        e.state.best_metric = -1

    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt",
        settings={"image_size": (32, 32)},
    )  # fmt: skip
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    assert json.loads((tmp_path / "model_settings.json").read_text()) == {"image_size": [32, 32]}
    (tmp_path / "model_settings.json").unlink()
    engine.run([0], max_epochs=2)  # 0.4 < 0.5: no new model, so no new settings
    assert not (tmp_path / "model_settings.json").exists()


@pytest.mark.parametrize("bundle", NAMES)
def test_every_model_saver_records_the_image_size(bundle):
    """train.json's student saver (the one writing ``@ckpt_name``) records ``image_size`` for inference."""
    parser = _parser(bundle, "train.json")
    savers = [h for h in parser["validate#handlers"] if h.get("key_metric_filename") == "@ckpt_name"]
    assert len(savers) == 1 and savers[0]["settings"] == {"image_size": "@image_size"}


@pytest.mark.parametrize("bundle", NAMES)
def test_inference_uses_the_trained_image_size(bundle, tmp_path):
    default = _parser(bundle, ckpt_dir=str(tmp_path)).get_parsed_content("image_size")
    assert default == _parser(bundle, "train.json").get_parsed_content("image_size")  # nothing recorded: defaults
    write_trained_settings(tmp_path / "model.pt", {"image_size": [48, 40]})
    parser = _parser(bundle, ckpt_dir=str(tmp_path))
    assert parser.get_parsed_content("image_size") == [48, 40]
    assert _parser(bundle, ckpt_dir=str(tmp_path), image_size=[16, 16]).get_parsed_content("image_size") == [16, 16]


def _monailabel_restored(pred: np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    """``monailabel.transform.post.Restored`` (0.8.5), the last transform MONAI Label applies before writing.

    It takes dim 0 as the channel: it resizes when ``pred.shape[1:]`` differs from the image's trailing sizes
    (nothing must differ here) and drops a singleton channel only from arrays of 4 or more dims.
    """
    current = pred.shape[1:]
    assert tuple(current) == tuple(spatial_shape[-len(current) :]), "Restored would resize this prediction"
    return pred if pred.ndim <= 3 else pred[0] if pred.shape[0] == 1 else pred


def _monailabel_write_png(pred: np.ndarray, path: Path) -> None:
    """``monailabel.transform.writer.write_itk`` (0.8.5) for a ``.png`` result: transpose, then ITK writes it."""
    itk = pytest.importorskip("itk")
    array = pred.transpose().copy().astype(np.uint8)
    itk.imwrite(itk.image_from_array(array), str(path))


@pytest.mark.parametrize("bundle", IMAGE_BUNDLES)
def test_monai_label_writes_the_2d_mask_at_the_image_size(bundle, tmp_path):
    """The bundle's pre- and postprocessing as MONAI Label runs them (SaveImaged dropped, then its Restored and
    writer): the PNG it returns has the image's height and width and the mask where the object is."""
    height, width = 30, 40  # not square: a (W, H) / (H, W) mix-up shows
    image = np.zeros((height, width, 3), np.uint8)
    image[:10, :20] = 255  # the object: top-left, 10 rows x 20 columns
    Image.fromarray(image).save(tmp_path / "case.png")
    write_trained_settings(tmp_path / "model.pt", {"image_size": [32, 32]})
    parser = _parser(bundle, ckpt_dir=str(tmp_path))
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "case.png")})
    x = data["image"].as_tensor()[:1]
    logits = torch.cat([5.0 - 10.0 * x, 10.0 * x - 5.0])  # "network": channel 1 where the image is bright
    post = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)]
    data["pred"] = logits
    for t in post:
        data = t(data)
    pred = np.asarray(data["pred"])
    assert pred.ndim == 2, f"a 2D mask must reach MONAI Label's writer without channel, got {pred.shape}"
    restored = _monailabel_restored(pred, tuple(data["image"].meta["spatial_shape"]))
    _monailabel_write_png(restored, tmp_path / "result.png")
    result = np.asarray(Image.open(tmp_path / "result.png"))
    assert result.shape == (height, width)
    expected = np.zeros((height, width), bool)
    expected[:10, :20] = True
    assert np.mean((result > 0) == expected) > 0.97


@pytest.mark.parametrize("bundle", VOLUME_BUNDLES)
def test_volume_masks_keep_their_channel_for_the_nifti_writer(bundle, tmp_path):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.random.rand(40, 30, 3).astype(np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    parser = _parser(bundle, ckpt_dir=str(tmp_path))
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "v.nii.gz")})
    num_classes = parser.get_parsed_content("num_classes")
    data["pred"] = torch.rand(num_classes, *data["image"].shape[1:])
    for t in parser.get_parsed_content("postprocessing").transforms:
        if not isinstance(t, SaveImaged):
            data = t(data)
    restored = _monailabel_restored(np.asarray(data["pred"]), tuple(data["image"].meta["spatial_shape"]))
    assert restored.shape == (40, 30, 3)


@pytest.mark.parametrize("bundle", NAMES)
def test_required_packages_are_what_inference_needs(bundle):
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    required = set(meta["required_packages_version"])
    reader = "nibabel" if bundle in VOLUME_BUNDLES else "pillow"
    assert required == INFERENCE_PACKAGES | {reader}
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("bundle", NAMES)
def test_the_teacher_is_not_offered_as_a_model(bundle, tmp_path):
    """MONAI Label offers every ``models/*.pt`` (``glob(models/*.pt)``); the teacher is written and read below it."""
    root = tmp_path / bundle
    train = _parser(bundle, "train.json", bundle_root=str(root))
    teacher_ckpt = Path(train.get_parsed_content("teacher_ckpt"))
    assert teacher_ckpt == root / "models" / "teacher" / "teacher.pt"
    stage = ConfigParser()
    stage.read_config(configs(bundle, "train.json", "train_teacher.json"))
    stage.update({"bundle_root": str(root)})
    written = Path(stage.get_parsed_content("ckpt_dir")) / stage.get_parsed_content("ckpt_name")
    assert written == teacher_ckpt  # the teacher stage writes where distillation reads
    written.parent.mkdir(parents=True)
    written.touch()
    (root / "models" / "model.pt").touch()
    offered = [os.path.basename(p) for p in glob.glob(os.path.join(root, "models", "*.pt"))]
    assert offered == ["model.pt"]


def test_inference_runs_as_a_workflow_with_recorded_size(tmp_path):
    """The trained size reaches the network input (a UNet of stride 16 refuses sizes it does not divide)."""
    bundle = "polyp_kdas"
    net = _parser(bundle).get_parsed_content("network_def")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    write_trained_settings(tmp_path / "model.pt", {"image_size": [48, 64]})
    (tmp_path / "in").mkdir()
    Image.fromarray((np.random.rand(30, 40, 3) * 255).astype(np.uint8)).save(tmp_path / "in" / "a.png")
    wf = make_workflow(
        bundle, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path),
        dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    wf.initialize()
    seen = []
    wf.parser.get_parsed_content("network").register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    wf.run()
    wf.finalize()
    assert seen == [(1, 3, 48, 64)]
    mask = Image.open(tmp_path / "out" / "a_seg.png")
    assert mask.size == (40, 30) and set(np.unique(np.asarray(mask))) <= {0, 255}


@pytest.mark.parametrize("bundle", NAMES)
def test_retraining_keeps_the_size_of_the_model_it_replaces(bundle, tmp_path):
    """train.json's default image size is the one recorded for ``ckpt_path`` (MONAI Label fine-tunes the served model,
    whose config it has already parsed at that size), else the bundle's default; ``--image_size`` still wins."""
    default = _parser(bundle, "train.json", ckpt_dir=str(tmp_path)).get_parsed_content("image_size")
    assert default == _parser(bundle, ckpt_dir=str(tmp_path)).get_parsed_content("image_size")
    write_trained_settings(tmp_path / "model.pt", {"image_size": [48, 64]})
    assert _parser(bundle, "train.json", ckpt_dir=str(tmp_path)).get_parsed_content("image_size") == [48, 64]
    override = _parser(bundle, "train.json", ckpt_dir=str(tmp_path), image_size=[32, 32])
    assert override.get_parsed_content("image_size") == [32, 32]


def test_training_without_validation_data_fails_clearly(tmp_path):
    """MONAI Label's /train/ with val_split 0 sets ``validate#dataset#data`` to []: the saver (on validation) would
    never run and the run would end "successfully" without a model; initialize refuses it, naming the fix."""
    from kd_components import require_validation_data
    from kd_components.data.synthetic import make_synthetic_polyps
    from tests.bundles.conftest import root_cause

    require_validation_data([{"image": "a.png"}])
    data = tmp_path / "data"
    make_synthetic_polyps(data, n=6, size=(32, 32), seed=0, overwrite=True)
    wf = make_workflow(
        "polyp_kdas", ["train.json"], dataset_dir=str(data), ckpt_dir=str(tmp_path / "models"), image_size=[32, 32],
        **{"validate#dataset#data": []},
    )  # fmt: skip
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    assert isinstance(root_cause(err.value), ValueError)
    assert "no validation data" in str(root_cause(err.value)) and "val_split > 0" in str(root_cause(err.value))
    assert not (tmp_path / "models" / "model.pt").exists()


@pytest.mark.parametrize("bundle", [n for n in NAMES if (BUNDLES / n / "configs" / "train_paraphraser.json").is_file()])
def test_paraphrasers_live_with_their_teacher(bundle, tmp_path):
    """Paraphrasers default to the teacher's folder: in the default layout not ``models/*.pt`` (offered by MONAI
    Label); with a flat ``<ckpt_dir>/teacher.pt`` beside them, as before."""
    root = tmp_path / bundle
    parser = _parser(bundle, "train.json", bundle_root=str(root))
    assert Path(parser.get_parsed_content("paraphraser_dir")) == root / "models" / "teacher"
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "teacher.pt").touch()
    parser = _parser(bundle, "train.json", ckpt_dir=str(flat))
    assert Path(parser.get_parsed_content("teacher_ckpt")) == flat / "teacher.pt"
    assert Path(parser.get_parsed_content("paraphraser_dir")) == flat
