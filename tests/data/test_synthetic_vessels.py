"""Tests of the synthetic thin-vessel dataset generator."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from kd_components.data.common import SPLIT_KEYS, DatasetError
from kd_components.data.synthetic_vessels import main, make_synthetic_vessels, synthetic_vessel_arrays


def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with the 3x3 cross (outside the image counts as background)."""
    padded = np.pad(mask, 1)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _best_global_threshold_dice(values: np.ndarray, labels: np.ndarray, inside: np.ndarray) -> float:
    """The best Dice of ``values < t`` or ``values > t`` (inside the FOV) over all thresholds ``t``."""
    best = 0.0
    for threshold in range(0, 256, 2):
        for pred in (values < threshold, values > threshold):
            pred = pred & inside
            best = max(best, 2 * float((pred & labels).sum()) / float(pred.sum() + labels.sum()))
    return best


def test_deterministic_and_seed_dependent():
    first = synthetic_vessel_arrays(4, (48, 40), seed=3)
    again = synthetic_vessel_arrays(4, (48, 40), seed=3)
    other = synthetic_vessel_arrays(4, (48, 40), seed=4)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    images, labels, fovs = first
    assert images.shape == (4, 48, 40, 3) and labels.shape == fovs.shape == (4, 48, 40)
    assert images.dtype == labels.dtype == fovs.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1} and set(np.unique(fovs)) == {0, 1}


def test_fundus_fov_restricts_labels_and_is_black_outside():
    images, labels, fovs = synthetic_vessel_arrays(8, (64, 64), seed=0)
    assert not (labels & (1 - fovs)).any()
    assert images[fovs == 0].max() <= 4 and images[fovs == 1].mean() > 60
    assert 0.5 < fovs.mean() < 0.9  # a disc of about the image's width
    images, labels, fovs = synthetic_vessel_arrays(4, (64, 64), seed=0, modality="xray")
    assert images.shape == (4, 64, 64) and fovs is None
    assert synthetic_vessel_arrays(2, (32, 32), seed=0, modality="xray", fov=True)[2] is not None


def test_thin_structures():
    _, labels, _ = synthetic_vessel_arrays(32, (96, 96), seed=1)
    vessels = labels.astype(bool)
    assert 0.02 < vessels.mean() < 0.2 and all(label.any() for label in vessels)
    for label in vessels:  # a pixel surviving 4 erosions with the cross is more than 4 px from the background
        eroded = label
        for _ in range(4):
            eroded = _erode_cross(eroded)
        assert eroded.sum() <= 0.02 * label.sum()
    one_step = np.mean([(_erode_cross(label).sum() / label.sum()) for label in vessels])
    assert one_step < 0.6  # most vessel pixels are on a vessel's border: 1 to 4 px widths


@pytest.mark.parametrize("modality", ["fundus", "xray"])
def test_no_single_threshold_separates_vessels(modality):
    images, labels, fovs = synthetic_vessel_arrays(16, (96, 96), seed=2, modality=modality)
    values = images[..., 1] if modality == "fundus" else images  # the green channel shows fundus vessels best
    inside = fovs.astype(bool) if fovs is not None else np.ones(labels.shape, bool)
    assert _best_global_threshold_dice(values, labels.astype(bool), inside) < 0.5


def test_contrast_polarity():
    for contrast, sign in (("dark", -1), ("bright", 1)):
        images, labels, _ = synthetic_vessel_arrays(6, (64, 64), seed=5, modality="xray", contrast=contrast)
        for image, label in zip(images.astype(float), labels.astype(bool)):
            ring = ~label & ~_erode_cross(~label)  # background pixels next to a vessel
            assert sign * (image[label].mean() - image[ring].mean()) > 0


def test_layout_datalist_and_speed(tmp_path):
    start = time.perf_counter()
    datalist = make_synthetic_vessels(tmp_path / "out", n=64, size=(96, 96), seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"64 images of 96x96 took {elapsed:.2f} s"  # about 1 s on one core
    raw = json.loads(datalist.read_text())
    assert list(raw) == [*SPLIT_KEYS, "unlabeled", "metadata"] and raw["unlabeled"] == []
    assert [len(raw[key]) for key in SPLIT_KEYS] == [51, 7, 6]
    assert raw["metadata"]["channels"] == 3 and raw["metadata"]["modality"] == "fundus"
    entry = raw["training"][0]
    name = entry["image"].split("/")[-1]
    assert entry == {"image": f"images/{name}", "label": f"labels/{name}", "fov": f"fov/{name}"}
    for folder in ("images", "labels", "fov"):
        assert len(list((tmp_path / "out" / folder).iterdir())) == 64
    load = Compose([LoadImaged(keys=["image", "label", "fov"]), EnsureChannelFirstd(keys=["image", "label", "fov"])])
    data = load(load_decathlon_datalist(str(datalist), True, "validation")[0])
    assert data["image"].shape == (3, 96, 96) and data["label"].shape == data["fov"].shape == (1, 96, 96)


def test_xray_layout_has_grey_images_and_no_fov(tmp_path):
    datalist = make_synthetic_vessels(tmp_path / "x", n=5, size=(40, 48), seed=1, modality="xray")
    raw = json.loads(datalist.read_text())
    assert raw["metadata"]["channels"] == 1 and raw["metadata"]["fov"] is None
    assert not (tmp_path / "x" / "fov").exists() and all("fov" not in e for k in SPLIT_KEYS for e in raw[k])
    image = Image.open(tmp_path / "x" / raw["training"][0]["image"])
    assert image.mode == "L" and image.size == (48, 40)


def test_bad_arguments_and_existing_output(tmp_path):
    for kwargs, match in (
        ({"n": 0}, "positive number"),
        ({"size": (8, 64)}, "at least 16"),
        ({"modality": "ct"}, "modality"),
        ({"contrast": "grey"}, "contrast"),
    ):
        with pytest.raises(DatasetError, match=match):
            make_synthetic_vessels(tmp_path / "bad", **kwargs)
    make_synthetic_vessels(tmp_path / "out", n=3, size=(32, 32))
    with pytest.raises(DatasetError, match="already holds"):
        make_synthetic_vessels(tmp_path / "out", n=3, size=(32, 32))


def test_cli(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--out", str(out), "--n", "6", "--size", "32", "40", "--seed", "1", "--modality", "xray"]
    assert main([*args, "--fov"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "datalist.json")
    assert len(list((out / "fov").iterdir())) == 6
    assert Image.open(next((out / "images").iterdir())).size == (40, 32)
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--no-fov", "--contrast", "mixed"]) == 0
    assert not (out / "fov").exists() or not any((out / "fov").iterdir())
