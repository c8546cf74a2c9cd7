"""Tests of the DRIVE / CHASE_DB1 / ARCADE / XCAD preparation, on small fixtures in the official layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from kd_components.data.common import SPLIT_KEYS, DatasetError, DatasetWarning
from kd_components.data.vessels import (
    VesselCase,
    assign_splits,
    binarise_annotation,
    derive_fov,
    main,
    prepare_vessel_data,
    rasterise_polygons,
    resize_label,
)

# ---------------------------------------------------------------------------------------------------------------------
# fixtures in the official layouts


def _disc(height: int, width: int, radius: float) -> np.ndarray:
    """A centred disc (the camera aperture of a fundus image) as a bool mask."""
    yy, xx = np.mgrid[:height, :width]
    return (yy - (height - 1) / 2) ** 2 + (xx - (width - 1) / 2) ** 2 < radius**2


def _vessels(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A few random thin lines as a bool mask."""
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(3):
        row, col = rng.integers(4, height - 4), rng.integers(4, width - 4)
        mask[row, 2 : width - 2] = True
        mask[2 : height - 2, col] = True
    return mask


def _fundus(mask: np.ndarray, fov: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An orange fundus-like RGB uint8 image: dark vessels inside the FOV, black outside."""
    image = np.array([170, 80, 30]) + rng.normal(0, 6, (*mask.shape, 3))
    image[mask] *= 0.6
    image[~fov] = rng.uniform(0, 4, (int((~fov).sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _gif(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def make_drive(root: Path, n_train: int = 5, n_test: int = 3, test_labels: bool = True) -> dict[str, tuple]:
    """Official DRIVE layout under ``root/DRIVE``; returns {output name: (vessel mask, fov mask)}."""
    rng = np.random.default_rng(0)
    height, width = 30, 28
    fov = _disc(height, width, 13)
    truth = {}
    parts = (("training", range(21, 21 + n_train)), ("test", range(1, 1 + n_test)))
    for part, ids in parts:
        folders = ["images", "mask"] + (["1st_manual"] if part == "training" or test_labels else [])
        for sub in folders:
            (root / "DRIVE" / part / sub).mkdir(parents=True)
        for i in ids:
            vessels = _vessels(height, width, rng) & fov
            tifffile.imwrite(root / "DRIVE" / part / "images" / f"{i:02d}_{part}.tif", _fundus(vessels, fov, rng))
            _gif(fov, root / "DRIVE" / part / "mask" / f"{i:02d}_{part}_mask.gif")
            if "1st_manual" in folders:
                _gif(vessels, root / "DRIVE" / part / "1st_manual" / f"{i:02d}_manual1.gif")
            truth[f"drive_{i:02d}_{part}"] = (vessels, fov)
    return truth


def make_chase(root: Path, subjects: int = 5) -> dict[str, tuple]:
    """Official CHASE_DB1 layout (flat folder) under ``root/CHASE_DB1``; returns {name: (1stHO, 2ndHO, fov)}."""
    rng = np.random.default_rng(1)
    folder = root / "CHASE_DB1"
    folder.mkdir(parents=True)
    height, width = 36, 40
    fov = _disc(height, width, 16)
    truth = {}
    for subject in range(1, subjects + 1):
        for eye in "LR":
            stem = f"Image_{subject:02d}{eye}"
            first = _vessels(height, width, rng) & fov
            second = first.copy()
            second[fov & (rng.random((height, width)) < 0.05)] = True
            Image.fromarray(_fundus(first, fov, rng)).save(folder / f"{stem}.jpg", quality=95)
            Image.fromarray(first.astype(np.uint8) * 255).save(folder / f"{stem}_1stHO.png")
            Image.fromarray(second.astype(np.uint8) * 255).save(folder / f"{stem}_2ndHO.png")
            truth[f"chase_{stem}"] = (first, second, fov)
    return truth


def _band(x0: float, y0: float, x1: float, y1: float, half_width: float) -> list[float]:
    """A flat COCO polygon: the rectangle of width 2 * half_width around the segment (x0, y0)-(x1, y1)."""
    direction = np.array([x1 - x0, y1 - y0], dtype=float)
    normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction) * half_width
    corners = [(x0, y0) + normal, (x1, y1) + normal, (x1, y1) - normal, (x0, y0) - normal]
    return [float(v) for corner in corners for v in corner]


def _polygon_area(polygon: list[float]) -> float:
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def make_arcade(root: Path, counts=(("train", 4), ("val", 2), ("test", 2)), json_case: str = "lower") -> dict:
    """ARCADE COCO release under ``root/arcade/syntax``; returns {output name: [(category, polygon), ...]}."""
    rng = np.random.default_rng(2)
    size = 48
    truth = {}
    for part, n in counts:
        folder = root / "arcade" / "syntax" / part
        (folder / "images").mkdir(parents=True)
        (folder / "annotations").mkdir()
        images, annotations = [], []
        for i in range(1, n + 1):
            image = np.clip(rng.normal(140, 10, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / "images" / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
            segments = []
            for category in rng.choice(np.arange(1, 27), size=2, replace=False):
                polygon = _band(*rng.uniform(6, 42, size=4), half_width=rng.uniform(1.2, 3))
                segments.append((int(category), polygon))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i,
                        "category_id": int(category),
                        "segmentation": [polygon],
                        "area": _polygon_area(polygon),
                    }
                )
            truth[f"arcade_{part}_{i}"] = segments
        coco = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in range(1, 27)],
        }
        name = f"{part}.json" if json_case == "lower" else f"{part}.JSON"
        (folder / "annotations" / name).write_text(json.dumps(coco))
    return truth


def make_xcad(root: Path, n_labelled: int = 6, n_unlabelled: int = 3) -> dict[str, np.ndarray]:
    """XCAD as distributed under ``root/XCAD``; returns {output name: mask}."""
    rng = np.random.default_rng(3)
    for sub in ("test/images", "test/masks", "train/trainB", "train/trainC"):
        (root / "XCAD" / sub).mkdir(parents=True)
    truth = {}
    for i in range(n_labelled):
        mask = _vessels(32, 32, rng)
        image = np.where(mask, 60, 150) + rng.normal(0, 5, mask.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            root / "XCAD" / "test" / "images" / f"{i:03d}.png"
        )
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "XCAD" / "test" / "masks" / f"{i:03d}.png")
        truth[f"xcad_{i:03d}"] = mask
    for i in range(n_unlabelled):
        for sub in ("trainB", "trainC"):
            image = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            Image.fromarray(image).save(root / "XCAD" / "train" / sub / f"{i:04d}.png")
    return truth


def _read(out: Path, folder: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / folder / f"{name}.png"))


def _datalist(path: Path) -> dict:
    return json.loads(path.read_text())


def _names(raw: dict, key: str) -> list[str]:
    return [Path(entry["image"]).stem for entry in raw[key]]


# ---------------------------------------------------------------------------------------------------------------------
# DRIVE


def test_drive_official_split_labels_and_fov(tmp_path):
    truth = make_drive(tmp_path / "in")
    out = tmp_path / "out"
    raw = _datalist(prepare_vessel_data(out, "drive", tmp_path / "in"))  # the parent folder of DRIVE/ is accepted
    assert list(raw) == [*SPLIT_KEYS, "unlabeled", "metadata"]
    assert sorted(_names(raw, "test")) == [f"drive_{i:02d}_test" for i in (1, 2, 3)]
    train_val = _names(raw, "training") + _names(raw, "validation")
    assert sorted(train_val) == [f"drive_{i}_training" for i in range(21, 26)]
    assert len(raw["validation"]) == 1 and raw["unlabeled"] == []
    for key in SPLIT_KEYS:
        for entry in raw[key]:
            assert entry == {k: f"{folder}/{Path(entry['image']).name}" for k, folder in
                             (("image", "images"), ("label", "labels"), ("fov", "fov"))}  # fmt: skip
    for name, (vessels, fov) in truth.items():
        assert np.array_equal(_read(out, "labels", name), vessels)
        assert np.array_equal(_read(out, "fov", name), fov)
        image = Image.open(out / "images" / f"{name}.png")
        assert image.mode == "RGB" and image.size == (28, 30)
    meta = raw["metadata"]
    assert meta["channels"] == 3 and meta["dataset"] == "drive" and meta["official_splits"] == ["training", "test"]
    assert meta["labels"] == {"0": "background", "1": "vessel"} and meta["counts"]["test"] == 3


def test_drive_without_test_annotations_lists_test_images_as_unlabeled(tmp_path):
    make_drive(tmp_path, n_train=6, test_labels=False)
    raw = _datalist(prepare_vessel_data(tmp_path / "out", "drive", tmp_path / "DRIVE"))
    assert [len(raw[key]) for key in SPLIT_KEYS] == [4, 1, 1]
    assert all(Path(e["image"]).stem.endswith("_training") for key in SPLIT_KEYS for e in raw[key])
    assert sorted(_names(raw, "unlabeled")) == [f"drive_{i:02d}_test" for i in (1, 2, 3)]
    assert all(set(entry) == {"image", "fov"} for entry in raw["unlabeled"])
    assert raw["metadata"]["official_splits"] == ["training"]
    raw = _datalist(prepare_vessel_data(tmp_path / "out2", "drive", tmp_path / "DRIVE", unlabeled=False))
    assert raw["unlabeled"] == [] and not (tmp_path / "out2" / "images" / "drive_01_test.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# CHASE_DB1


def test_chase_subject_split_annotators_and_derived_fov(tmp_path):
    truth = make_chase(tmp_path, subjects=6)
    out = tmp_path / "out"
    for seed in range(4):
        raw = _datalist(prepare_vessel_data(out, "chase", tmp_path, seed=seed, overwrite=True))
        for key in SPLIT_KEYS:
            for name in _names(raw, key):  # both eyes of a child in the same split
                other = name[:-1] + ("R" if name.endswith("L") else "L")
                assert other in _names(raw, key)
        assert sum(len(raw[key]) for key in SPLIT_KEYS) == 12
    for name, (first, _, fov) in truth.items():
        assert np.array_equal(_read(out, "labels", name), first)
        derived = _read(out, "fov", name).astype(bool)  # JPEG blurs the aperture's edge by about a pixel
        assert derived[fov].all() and not derived[~_disc(*fov.shape, 16 + 1.5)].any()
    assert raw["metadata"]["fov"].startswith("derived") and raw["metadata"]["official_splits"] == []
    prepare_vessel_data(tmp_path / "second", "chase", tmp_path / "CHASE_DB1", annotator=2)
    for name, (_, second, _) in truth.items():
        assert np.array_equal(_read(tmp_path / "second", "labels", name), second)


def test_derive_fov_fills_dark_spots_and_drops_noise():
    fov = _disc(60, 64, 27)
    image = np.zeros((60, 64, 3), np.uint8)
    image[fov] = (150, 70, 20)
    image[28:33, 30:35] = 5  # a dark spot inside the aperture
    image[2, 2] = 200  # an isolated noisy pixel outside
    derived = derive_fov(image).astype(bool)
    assert (derived & fov).sum() / (derived | fov).sum() > 0.97
    assert derived[30, 32] and not derived[2, 2]


# ---------------------------------------------------------------------------------------------------------------------
# ARCADE


def test_arcade_official_splits_and_rasterised_area(tmp_path):
    truth = make_arcade(tmp_path, json_case="upper")  # the Zenodo description names the files train.JSON...
    out = tmp_path / "out"
    raw = _datalist(prepare_vessel_data(out, "arcade", tmp_path))
    assert sorted(_names(raw, "training")) == [f"arcade_train_{i}" for i in range(1, 5)]
    assert sorted(_names(raw, "validation")) == ["arcade_val_1", "arcade_val_2"]
    assert sorted(_names(raw, "test")) == ["arcade_test_1", "arcade_test_2"]
    assert not (out / "fov").exists() and all("fov" not in e for key in SPLIT_KEYS for e in raw[key])
    meta = raw["metadata"]
    assert meta["channels"] == 1 and meta["official_splits"] == list(SPLIT_KEYS) and meta["fov"] is None
    for name, segments in truth.items():
        label = _read(out, "labels", name)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        for _, polygon in segments:  # each band is inside the label, with about its area
            alone = rasterise_polygons([polygon], label.shape)
            assert abs(alone.sum() / _polygon_area(polygon) - 1) < 0.15 and label[alone].all()
        assert Image.open(out / "images" / f"{name}.png").mode == "L"


def test_arcade_segment_labels(tmp_path):
    truth = make_arcade(tmp_path, counts=(("train", 2), ("val", 1)))
    out = tmp_path / "out"
    raw = _datalist(prepare_vessel_data(out, "arcade", tmp_path / "arcade" / "syntax", arcade_segments=True))
    assert raw["metadata"]["labels"]["16"] == "segment 16" and len(raw["metadata"]["labels"]) == 27
    assert raw["metadata"]["official_splits"] == ["training", "validation"]
    assert len(raw["test"]) == 1 and len(raw["training"]) == 1  # no official test: drawn from train
    for name, segments in truth.items():
        label = _read(out, "labels", name)
        (first, p1), (second, p2) = segments
        assert (label[rasterise_polygons([p2], label.shape)] == second).all()
        only_first = rasterise_polygons([p1], label.shape) & ~rasterise_polygons([p2], label.shape)
        assert (label[only_first] == first).all()
        assert set(np.unique(label)) == {0, first, second}


def test_rasterise_polygons_matches_polygon_area():
    square = [2.0, 3.0, 12.0, 3.0, 12.0, 9.0, 2.0, 9.0]  # pixels 2..11 x 3..8 exactly
    mask = rasterise_polygons([square], (16, 16))
    assert mask.sum() == 60 and mask[3:9, 2:12].all()
    rng = np.random.default_rng(0)
    bands = [_band(*rng.uniform(8, 56, size=4), half_width=rng.uniform(1, 3)) for _ in range(30)]
    ratios = [rasterise_polygons([band], (64, 64)).sum() / _polygon_area(band) for band in bands]
    assert abs(np.mean(ratios) - 1) < 0.05
    assert not rasterise_polygons([[100.0, 100.0, 120.0, 100.0, 110.0, 120.0]], (16, 16)).any()  # outside


# ---------------------------------------------------------------------------------------------------------------------
# XCAD


def test_xcad_pairs_and_unlabeled_trainB(tmp_path):
    truth = make_xcad(tmp_path)
    out = tmp_path / "out"
    raw = _datalist(prepare_vessel_data(out, "xcad", tmp_path / "XCAD"))
    assert sorted(n for key in SPLIT_KEYS for n in _names(raw, key)) == sorted(truth)
    assert [len(raw[key]) for key in SPLIT_KEYS] == [4, 1, 1]
    assert sorted(_names(raw, "unlabeled")) == [f"xcad_trainB_{i:04d}" for i in range(3)]  # trainC is not used
    for name, mask in truth.items():
        assert np.array_equal(_read(out, "labels", name), mask)
    assert raw["metadata"]["channels"] == 1 and raw["metadata"]["official_splits"] == []
    flat = _datalist(prepare_vessel_data(tmp_path / "flat", "xcad", tmp_path / "XCAD" / "test"))
    assert flat["unlabeled"] == [] and sum(len(flat[key]) for key in SPLIT_KEYS) == 6


# ---------------------------------------------------------------------------------------------------------------------
# reading the outputs, resizing


def test_outputs_load_with_monai(tmp_path):
    make_drive(tmp_path / "d", n_train=3, n_test=1)
    make_arcade(tmp_path / "a", counts=(("train", 2), ("val", 1), ("test", 1)))
    for dataset, folder, channels, keys in (
        ("drive", tmp_path / "d", 3, ["image", "label", "fov"]),
        ("arcade", tmp_path / "a", 1, ["image", "label"]),
    ):
        datalist = prepare_vessel_data(tmp_path / f"out_{dataset}", dataset, folder)
        load = Compose([LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys)])
        for key in SPLIT_KEYS:
            for item in load_decathlon_datalist(str(datalist), True, key):
                data = load(item)
                assert data["image"].shape[0] == channels and data["label"].shape[0] == 1
                assert all(data[k].shape[1:] == data["image"].shape[1:] for k in keys)
                assert set(np.unique(np.asarray(data["label"]))) <= {0, 1}


def test_max_size_shrinks_images_labels_and_fov(tmp_path):
    make_drive(tmp_path, n_train=3, n_test=1)
    out = tmp_path / "out"
    prepare_vessel_data(out, "drive", tmp_path, max_size=15)
    for folder in ("images", "labels", "fov"):
        assert Image.open(out / folder / "drive_21_training.png").size == (14, 15)
    assert set(np.unique(_read(out, "fov", "drive_21_training"))) == {0, 1}


def test_resize_label_is_a_per_class_majority_vote():
    label = np.zeros((8, 8), np.uint8)
    label[:, :4] = 3
    label[:2, 4:] = 7
    small = resize_label(label, (4, 4))
    assert np.array_equal(small[:, :2], np.full((4, 2), 3)) and (small[0, 2:] == 7).all()
    assert (small[1:, 2:] == 0).all()


def test_binarise_annotation():
    assert np.array_equal(binarise_annotation(np.array([[0, 1], [1, 0]], np.uint8), "a.png"), [[0, 1], [1, 0]])
    assert np.array_equal(binarise_annotation(np.array([[0, 255]], np.uint8), "a.png"), [[0, 1]])
    assert not binarise_annotation(np.zeros((2, 2), np.uint8), "a.png").any()
    noisy = np.array([[0, 3, 250, 255]] * 30, np.uint8)  # a few levels near the extremes: thresholded
    assert np.array_equal(binarise_annotation(noisy, "a.png")[0], [0, 0, 1, 1])
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1))
    with pytest.raises(DatasetError, match=r"annotation a.png is not binary: it holds 64 grey levels"):
        binarise_annotation(ramp, "a.png")
    assert binarise_annotation(ramp, "a.jpg", lossless=False).sum() == 4 * 32


def test_assign_splits_renormalises_over_the_missing_splits():
    cases = [VesselCase(f"t{i}", Path("x"), "pool", f"g{i // 2}") for i in range(12)]  # 6 groups of 2
    cases += [VesselCase("v0", Path("x"), "validation", "v"), VesselCase("u", Path("x"), "unlabeled", "u")]
    splits = assign_splits(cases, (0.5, 0.25, 0.25), seed=0)  # pool: 2/3 training, 1/3 test
    assert splits["validation"] == ["v0"] and [len(splits[k]) for k in SPLIT_KEYS] == [8, 1, 4]
    for i in range(0, 12, 2):
        assert (f"t{i}" in splits["test"]) == (f"t{i + 1}" in splits["test"])
    assert "u" not in sum(splits.values(), [])
    with pytest.raises(DatasetError, match="leave nothing for the training"):
        assign_splits(cases, (0.0, 1.0, 0.0), seed=0)  # validation is official: nowhere to put the pool


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match=rf"DRIVE folder {tmp_path / 'nowhere'} does not exist"):
        prepare_vessel_data(tmp_path / "out", "drive", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    for dataset, match in (
        ("drive", "training/ and test/"),
        ("chase", "Image_01L.jpg"),
        ("arcade", r"syntax/\{train,val,test\}"),
        ("xcad", "test/images/ and test/masks/"),
    ):
        with pytest.raises(
            DatasetError, match=rf"folder {tmp_path / 'empty'} does not have the official layout.*{match}"
        ):
            prepare_vessel_data(tmp_path / "out", dataset, tmp_path / "empty")
    make_drive(tmp_path / "d", n_train=2, n_test=1)
    shutil.copytree(tmp_path / "d" / "DRIVE", tmp_path / "twice" / "DRIVE")
    shutil.copytree(tmp_path / "d" / "DRIVE", tmp_path / "twice" / "copy" / "DRIVE")
    with pytest.raises(DatasetError, match=r"DRIVE: several dataset folders under"):
        prepare_vessel_data(tmp_path / "out", "drive", tmp_path / "twice")
    for path in (tmp_path / "d" / "DRIVE" / "training" / "mask").iterdir():
        path.unlink()
    (tmp_path / "d" / "DRIVE" / "training" / "mask").rmdir()
    with pytest.raises(DatasetError, match=r"DRIVE training FOV mask folder .*training/mask does not exist"):
        prepare_vessel_data(tmp_path / "out", "drive", tmp_path / "d")
    assert not (tmp_path / "out").exists()


def test_unpaired_files_are_named(tmp_path):
    make_drive(tmp_path, n_train=3, n_test=1)
    (tmp_path / "DRIVE" / "training" / "1st_manual" / "22_manual1.gif").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) in .*images have no mask: 22_training.tif"):
        prepare_vessel_data(tmp_path / "out", "drive", tmp_path)
    make_chase(tmp_path / "c", subjects=2)
    (tmp_path / "c" / "CHASE_DB1" / "Image_02R_1stHO.png").unlink()
    with pytest.raises(DatasetError, match=r"have no mask: Image_02R.jpg"):
        prepare_vessel_data(tmp_path / "out", "chase", tmp_path / "c")
    make_xcad(tmp_path / "x")
    (tmp_path / "x" / "XCAD" / "test" / "images" / "002.png").unlink()
    with pytest.raises(DatasetError, match=r"1 mask\(s\) in .*masks have no image: 002.png"):
        prepare_vessel_data(tmp_path / "out", "xcad", tmp_path / "x")


def test_unreadable_gif_and_tiff_are_named(tmp_path):
    make_drive(tmp_path, n_train=3, n_test=1)
    gif = tmp_path / "DRIVE" / "training" / "1st_manual" / "23_manual1.gif"
    gif.write_bytes(b"GIF89a broken")
    with pytest.raises(DatasetError, match=rf"cannot read image file {gif}"):
        prepare_vessel_data(tmp_path / "out", "drive", tmp_path)
    _gif(np.zeros((30, 28), bool), gif)
    tif = tmp_path / "DRIVE" / "test" / "images" / "01_test.tif"
    tif.write_bytes(tif.read_bytes()[:60])
    with pytest.raises(DatasetError, match=rf"cannot read image file {tif}"):
        prepare_vessel_data(tmp_path / "out", "drive", tmp_path)
    assert not (tmp_path / "out").exists()


def test_non_binary_annotation_is_explained(tmp_path):
    make_chase(tmp_path, subjects=2)
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (36, 1))
    Image.fromarray(ramp).save(tmp_path / "CHASE_DB1" / "Image_01R_1stHO.png")
    with pytest.raises(DatasetError, match=r"Image_01R_1stHO.png is not binary.*image rather than an annotation"):
        prepare_vessel_data(tmp_path / "out", "chase", tmp_path)


def _edit_coco(root: Path, edit) -> Path:
    path = root / "arcade" / "syntax" / "train" / "annotations" / "train.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("annotations"), r"the top level lacks the key\(s\) 'annotations'"),
        (lambda c: c["annotations"][0].pop("segmentation"), r"an annotation lacks the key\(s\) 'segmentation'"),
        (lambda c: c["images"][0].pop("file_name"), r"an entry of 'images' lacks the key\(s\) 'file_name'"),
        (lambda c: c["annotations"][1].update(image_id=99), r"annotation 2 refers to image_id 99, which is not in"),
        (lambda c: c["images"][0].update(file_name="77.png"), r"lists image '77.png' \(id 1\), which is not in"),
        (lambda c: c["annotations"][0].update(segmentation=[[1, 2, 3]]), "not a flat list of at least 3"),
        (lambda c: c["annotations"][0].update(segmentation={"counts": "x"}), "RLE segmentation"),
    ],
)
def test_malformed_coco_json_names_the_file_and_keys(tmp_path, edit, match):
    make_arcade(tmp_path, counts=(("train", 2),))
    path = _edit_coco(tmp_path, edit)
    with pytest.raises(DatasetError, match=rf"COCO file {path}: {match}|{match}"):
        prepare_vessel_data(tmp_path / "out", "arcade", tmp_path)


def test_coco_json_that_is_not_json_and_unlisted_images(tmp_path):
    make_arcade(tmp_path, counts=(("train", 2),))
    path = tmp_path / "arcade" / "syntax" / "train" / "annotations" / "train.json"
    text = path.read_text()
    path.write_text(text[:50])
    with pytest.raises(DatasetError, match=rf"cannot read COCO annotation file {path}"):
        prepare_vessel_data(tmp_path / "out", "arcade", tmp_path)
    path.write_text(text)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path.parents[1] / "images" / "3.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) in .*images are not listed in .*train.json: 3.png"):
        prepare_vessel_data(tmp_path / "out", "arcade", tmp_path)
    (path.parents[1] / "images" / "3.png").unlink()
    _edit_coco(tmp_path, lambda coco: coco["annotations"][0].update(category_id=55))
    with pytest.raises(DatasetError, match=r"category_id 55, which is not one of"):
        prepare_vessel_data(tmp_path / "out", "arcade", tmp_path, arcade_segments=True)


def test_empty_dataset_and_empty_labels(tmp_path):
    make_xcad(tmp_path)
    for path in (tmp_path / "XCAD" / "test" / "masks").iterdir():
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    with pytest.raises(DatasetError, match="all 6 xcad labels are background"):
        prepare_vessel_data(tmp_path / "out", "xcad", tmp_path)
    Image.fromarray(np.eye(32, dtype=np.uint8) * 255).save(tmp_path / "XCAD" / "test" / "masks" / "000.png")
    with pytest.warns(DatasetWarning, match=r"5 of 6 xcad labels are all background"):
        prepare_vessel_data(tmp_path / "out", "xcad", tmp_path)
    for sub in ("images", "masks"):
        for path in (tmp_path / "XCAD" / "test" / sub).iterdir():
            path.unlink()
    with pytest.raises(DatasetError, match=r"XCAD image folder .*images holds no .png"):
        prepare_vessel_data(tmp_path / "out2", "xcad", tmp_path)


def test_existing_output_needs_overwrite_and_bad_arguments(tmp_path):
    make_xcad(tmp_path)
    out = tmp_path / "out"
    datalist = prepare_vessel_data(out, "xcad", tmp_path)
    before = datalist.read_text()
    with pytest.raises(DatasetError, match=rf"output folder {out} already holds .*overwrite=True"):
        prepare_vessel_data(out, "xcad", tmp_path, seed=3)
    assert datalist.read_text() == before
    prepare_vessel_data(out, "xcad", tmp_path, seed=3, overwrite=True)
    for kwargs, match in (
        ({"dataset": "stare"}, "unknown vessel dataset"),
        ({"max_size": 0}, "max_size"),
        ({"fractions": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"annotator": 2}, "only CHASE_DB1"),
        ({"arcade_segments": True}, "ARCADE only"),
    ):
        with pytest.raises(DatasetError, match=match):
            prepare_vessel_data(tmp_path / "other", **{"dataset": "xcad", "source_dir": tmp_path, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_cli(tmp_path, capsys):
    make_drive(tmp_path / "in", n_train=4, n_test=1)
    out = tmp_path / "out"
    args = ["--drive", str(tmp_path / "in"), "--out", str(out), "--seed", "1"]
    assert main([*args, "--fractions", "0.5", "0.5", "0", "--max-size", "20"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "datalist.json")
    raw = _datalist(out / "datalist.json")
    assert [len(raw[k]) for k in SPLIT_KEYS] == [2, 2, 1]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--drive", "a", "--chase", "b", "--out", "x"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--arcade-segments" in capsys.readouterr().out
