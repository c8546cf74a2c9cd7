"""Tests of the Kvasir-SEG / CVC-ClinicDB preparation, on small fixtures in the official layouts and on real data."""

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
from kd_components.data.polyp import main, prepare_polyp_data, read_mask, resize_pair

REAL_KVASIR = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "Kvasir-SEG"


# ---------------------------------------------------------------------------------------------------------------------
# fixtures in the official layouts


def _ellipse(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random ellipse as a bool (H, W) mask."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.15, 0.3) * width
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def _image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy reddish RGB uint8 image."""
    base = np.array([190, 100, 100]) + rng.normal(0, 20, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def make_kvasir(
    root: Path, sizes=((48, 64), (40, 40), (64, 50), (32, 48), (50, 50), (36, 60))
) -> dict[str, np.ndarray]:
    """Official Kvasir-SEG layout under ``root/Kvasir-SEG``: JPEG images and noisy JPEG masks; returns true masks."""
    rng = np.random.default_rng(0)
    (root / "Kvasir-SEG" / "images").mkdir(parents=True)
    (root / "Kvasir-SEG" / "masks").mkdir()
    truth = {}
    for i, (height, width) in enumerate(sizes):
        stem = f"cju{i:02d}abc"
        mask = _ellipse(height, width, rng)
        Image.fromarray(_image(height, width, rng)).save(root / "Kvasir-SEG" / "images" / f"{stem}.jpg", quality=90)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "Kvasir-SEG" / "masks" / f"{stem}.jpg", quality=60)
        truth[stem] = mask
    return truth


def make_clinicdb(
    root: Path, n: int = 4, suffix: str = ".tif", mask_dir: str = "Ground Truth"
) -> dict[str, np.ndarray]:
    """Official CVC-ClinicDB layout under ``root/CVC-ClinicDB``: TIFF images and masks (one RGB mask)."""
    rng = np.random.default_rng(1)
    (root / "CVC-ClinicDB" / "Original").mkdir(parents=True)
    (root / "CVC-ClinicDB" / mask_dir).mkdir()
    truth = {}
    for i in range(1, n + 1):
        mask = _ellipse(36, 48, rng)
        grey = mask.astype(np.uint8) * 255
        if i == 2:
            grey = np.stack([grey] * 3, axis=-1)  # some masks are stored as RGB
        for folder, array in (("Original", _image(36, 48, rng)), (mask_dir, grey)):
            path = root / "CVC-ClinicDB" / folder / f"{i}{suffix}"
            if suffix in (".tif", ".tiff"):
                tifffile.imwrite(path, array)
            else:
                Image.fromarray(array).save(path)
        truth[str(i)] = mask
    return truth


def _label(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / "labels" / f"{name}.png"))


def _all_entries(datalist: Path) -> list[dict[str, str]]:
    raw = json.loads(datalist.read_text())
    assert list(raw) == list(SPLIT_KEYS)
    return [entry for key in SPLIT_KEYS for entry in raw[key]]


# ---------------------------------------------------------------------------------------------------------------------
# conversion


def test_kvasir_jpeg_masks_are_thresholded_to_exactly_0_1(tmp_path):
    truth = make_kvasir(tmp_path / "in")
    noisy = np.asarray(Image.open(tmp_path / "in" / "Kvasir-SEG" / "masks" / "cju00abc.jpg"))
    assert len(np.unique(noisy)) > 2, "the fixture masks should carry JPEG noise"
    out = tmp_path / "out"
    datalist = prepare_polyp_data(out, kvasir_dir=tmp_path / "in" / "Kvasir-SEG")
    assert datalist == out / "datalist.json"
    for stem, mask in truth.items():
        label = _label(out, f"kvasir_{stem}")
        image = Image.open(out / "images" / f"kvasir_{stem}.png")
        assert image.mode == "RGB" and image.size == (mask.shape[1], mask.shape[0])
        assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
        assert np.mean(label == mask) > 0.98
    names = sorted(Path(e["image"]).stem for e in _all_entries(datalist))
    assert names == sorted(f"kvasir_{s}" for s in truth)


def test_kvasir_parent_folder_is_accepted_and_ambiguity_is_refused(tmp_path):
    make_kvasir(tmp_path / "in")
    prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path / "in")
    assert len(list((tmp_path / "out" / "labels").iterdir())) == 6
    shutil.copytree(tmp_path / "in" / "Kvasir-SEG", tmp_path / "in" / "Kvasir-SEG-copy")
    with pytest.raises(DatasetError, match="several dataset folders"):
        prepare_polyp_data(tmp_path / "out2", kvasir_dir=tmp_path / "in")


def test_clinicdb_tiff_with_ground_truth_folder_and_kvasir_together(tmp_path):
    kvasir = make_kvasir(tmp_path / "k")
    clinic = make_clinicdb(tmp_path / "c")
    out = tmp_path / "out"
    datalist = prepare_polyp_data(out, kvasir_dir=tmp_path / "k", clinicdb_dir=tmp_path / "c" / "CVC-ClinicDB")
    for stem, mask in clinic.items():
        label = _label(out, f"clinicdb_{stem}")
        assert label.dtype == np.uint8 and np.array_equal(label, mask.astype(np.uint8))
    raw = json.loads(datalist.read_text())
    names = {Path(e["image"]).stem for key in SPLIT_KEYS for e in raw[key]}
    assert names == {f"kvasir_{s}" for s in kvasir} | {f"clinicdb_{s}" for s in clinic}
    # split per dataset: 4 ClinicDB frames -> 2/1/1, 6 Kvasir images -> 4/1/1
    counts = {key: sum(Path(e["image"]).stem.startswith("clinicdb") for e in raw[key]) for key in SPLIT_KEYS}
    assert counts == {"training": 2, "validation": 1, "test": 1}


@pytest.mark.parametrize("suffix, mask_dir", [(".tiff", "GroundTruth"), (".png", "Ground Truth")])
def test_clinicdb_mirror_variants(tmp_path, suffix, mask_dir):
    truth = make_clinicdb(tmp_path, n=3, suffix=suffix, mask_dir=mask_dir)
    prepare_polyp_data(tmp_path / "out", clinicdb_dir=tmp_path)
    for stem, mask in truth.items():
        assert np.array_equal(_label(tmp_path / "out", f"clinicdb_{stem}"), mask)


def test_lossless_0_1_masks_are_kept_and_rgb_masks_go_through_grey(tmp_path):
    Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(tmp_path / "binary.png")
    assert np.array_equal(read_mask(tmp_path / "binary.png"), [[0, 1], [1, 0]])
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = 255  # white: polyp
    rgb[1, 1] = (255, 0, 0)  # pure red has luma 76: background
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_mask(tmp_path / "rgb.png"), [[1, 0], [0, 0]])


def test_max_size_keeps_aspect_and_binary_labels(tmp_path):
    make_kvasir(tmp_path / "in", sizes=((60, 100), (20, 30)))
    out = tmp_path / "out"
    prepare_polyp_data(out, kvasir_dir=tmp_path / "in", max_size=50, empty_masks="ignore")
    big, small = sorted((out / "images").iterdir())
    assert Image.open(big).size == (50, 30)
    assert Image.open(small).size == (30, 20)  # never enlarged
    label = _label(out, big.stem)
    assert label.shape == (30, 50) and set(np.unique(label)) <= {0, 1} and label.any()


def test_resize_pair_is_a_majority_vote_on_the_image_grid():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, :20] = 1
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, :20] = 200
    small_image, small_mask = resize_pair(image, mask, 10)
    assert small_image.shape == (10, 10, 3) and small_mask.shape == (10, 10)
    assert np.array_equal(small_mask[:, :5], np.ones((10, 5))) and not small_mask[:, 5:].any()
    assert np.array_equal(small_image[..., 0] > 100, small_mask.astype(bool))
    assert resize_pair(image, mask, None)[1] is mask


def test_limit_and_seed(tmp_path):
    make_kvasir(tmp_path / "in")
    first = prepare_polyp_data(tmp_path / "a", kvasir_dir=tmp_path / "in", limit=5, seed=1)
    again = prepare_polyp_data(tmp_path / "b", kvasir_dir=tmp_path / "in", limit=5, seed=1)
    assert len(_all_entries(first)) == 5
    assert first.read_text() == again.read_text()
    assert sorted(p.stem for p in (tmp_path / "a" / "images").iterdir()) == [f"kvasir_cju{i:02d}abc" for i in range(5)]


def test_datalist_loads_with_monai_transforms(tmp_path):
    make_kvasir(tmp_path / "k")
    make_clinicdb(tmp_path / "c")
    datalist = prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path / "k", clinicdb_dir=tmp_path / "c")
    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])
    seen = 0
    for key in SPLIT_KEYS:
        for item in load_decathlon_datalist(str(datalist), True, key):
            data = load(item)
            assert data["image"].shape[0] == 3 and data["label"].shape[0] == 1
            assert data["image"].shape[1:] == data["label"].shape[1:]
            assert set(np.unique(np.asarray(data["label"]))) == {0, 1}
            seen += 1
    assert seen == 10


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_missing_folder_and_wrong_layout(tmp_path):
    with pytest.raises(DatasetError, match=rf"Kvasir-SEG folder {tmp_path / 'nowhere'} does not exist"):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path / "nowhere")
    (tmp_path / "wrong" / "Images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"does not have the official layout.*masks/"):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path / "wrong")
    with pytest.raises(DatasetError, match=r"Original/ and Ground Truth/"):
        prepare_polyp_data(tmp_path / "out", clinicdb_dir=tmp_path / "wrong")
    with pytest.raises(DatasetError, match="no input"):
        prepare_polyp_data(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unpaired_files_are_named(tmp_path):
    make_kvasir(tmp_path)
    (tmp_path / "Kvasir-SEG" / "masks" / "cju03abc.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) in .*images have no mask: cju03abc.jpg"):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_jpeg_is_named(tmp_path, damage):
    make_kvasir(tmp_path / "in")
    bad = tmp_path / "in" / "Kvasir-SEG" / "images" / "cju02abc.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"this is not a JPEG file")
    with pytest.raises(DatasetError, match=rf"cannot read image file {bad}.*corrupt"):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path / "in")
    assert not (tmp_path / "out").exists()


def test_corrupt_tiff_is_named(tmp_path):
    make_clinicdb(tmp_path)
    bad = tmp_path / "CVC-ClinicDB" / "Ground Truth" / "3.tif"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DatasetError, match=rf"cannot read image file {bad}"):
        prepare_polyp_data(tmp_path / "out", clinicdb_dir=tmp_path)


def test_empty_mask_folder(tmp_path):
    make_kvasir(tmp_path)
    for path in (tmp_path / "Kvasir-SEG" / "masks").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"kvasir mask folder .*masks holds no .*\(it is empty\)"):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path)


def test_size_mismatch_names_both_files(tmp_path):
    make_kvasir(tmp_path)
    mask = tmp_path / "Kvasir-SEG" / "masks" / "cju01abc.jpg"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    with pytest.raises(
        DatasetError, match=r"image .*cju01abc.jpg is 40x40 \(WxH\) but its mask .*cju01abc.jpg is 12x10"
    ):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path)


def _blank_masks(root: Path, stems: list[str]) -> None:
    for stem in stems:
        path = root / "Kvasir-SEG" / "masks" / f"{stem}.jpg"
        Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)


def test_background_only_masks_warn_error_or_pass(tmp_path):
    make_kvasir(tmp_path / "in")
    _blank_masks(tmp_path / "in", ["cju01abc", "cju04abc"])
    with pytest.warns(DatasetWarning, match=r"2 of 6 masks .* cju01abc.jpg, cju04abc.jpg"):
        prepare_polyp_data(tmp_path / "warn", kvasir_dir=tmp_path / "in")
    assert not _label(tmp_path / "warn", "kvasir_cju01abc").any()
    with pytest.raises(DatasetError, match=r"mask .*cju01abc.jpg is all background"):
        prepare_polyp_data(tmp_path / "error", kvasir_dir=tmp_path / "in", empty_masks="error")
    assert not (tmp_path / "error").exists()
    prepare_polyp_data(tmp_path / "ignore", kvasir_dir=tmp_path / "in", empty_masks="ignore")
    _blank_masks(tmp_path / "in", [f"cju{i:02d}abc" for i in range(6)])
    with pytest.raises(DatasetError, match=r"all 6 masks in .*masks are background"):
        prepare_polyp_data(tmp_path / "all", kvasir_dir=tmp_path / "in")


def test_existing_output_needs_overwrite_and_survives_a_failed_run(tmp_path):
    make_kvasir(tmp_path / "in")
    out = tmp_path / "out"
    datalist = prepare_polyp_data(out, kvasir_dir=tmp_path / "in", limit=3)
    before = datalist.read_text()
    with pytest.raises(DatasetError, match=rf"output folder {out} already holds .*overwrite=True"):
        prepare_polyp_data(out, kvasir_dir=tmp_path / "in")
    (tmp_path / "in" / "Kvasir-SEG" / "images" / "cju05abc.jpg").write_bytes(b"broken")
    with pytest.raises(DatasetError, match="cju05abc.jpg"):
        prepare_polyp_data(out, kvasir_dir=tmp_path / "in", overwrite=True)
    assert datalist.read_text() == before and len(list((out / "images").iterdir())) == 3
    prepare_polyp_data(out, kvasir_dir=tmp_path / "in", overwrite=True, limit=5)
    assert datalist.read_text() != before and len(list((out / "images").iterdir())) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fractions": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"max_size": 0}, "max_size"),
        ({"limit": 0}, "limit"),
        ({"empty_masks": "maybe"}, "empty_masks"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    make_kvasir(tmp_path)
    with pytest.raises(DatasetError, match=match):
        prepare_polyp_data(tmp_path / "out", kvasir_dir=tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_cli(tmp_path, capsys):
    make_kvasir(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--kvasir", str(tmp_path / "in"), "--out", str(out), "--max-size", "32", "--seed", "2"]
    assert main([*args, "--fractions", "0.5", "0.25", "0.25"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "datalist.json")
    raw = json.loads((out / "datalist.json").read_text())
    assert [len(raw[k]) for k in SPLIT_KEYS] == [3, 2, 1]
    assert max(Image.open(p).size[0] for p in (out / "images").iterdir()) <= 32
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--limit", "2"]) == 0
    assert len(_all_entries(out / "datalist.json")) == 2


def test_cli_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--max-size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--out", "x"])
    assert info.value.code == 2
    assert "--kvasir DIR and/or --clinicdb DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# real data


def test_real_kvasir_subset(tmp_path):
    if not (REAL_KVASIR / "images").is_dir():
        pytest.skip(f"real Kvasir-SEG not found at {REAL_KVASIR}")
    out = tmp_path / "out"
    datalist = prepare_polyp_data(out, kvasir_dir=REAL_KVASIR, limit=20, max_size=128)
    raw = json.loads(datalist.read_text())
    assert [len(raw[k]) for k in SPLIT_KEYS] == [16, 2, 2]
    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])
    for key in SPLIT_KEYS:
        for item in load_decathlon_datalist(str(datalist), True, key):
            data = load(item)
            assert data["image"].shape[0] == 3 and max(data["image"].shape[1:]) == 128
            label = np.asarray(data["label"])
            assert set(np.unique(label)) == {0, 1}
            assert 0.005 < label.mean() < 0.9  # every Kvasir-SEG image shows a polyp
