"""Tests of the volume preparation (ACDC, Synapse / BTCV) and 2D slicing, on small fixtures and on real data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from kd_components.data.common import SPLIT_KEYS, DatasetError, DatasetWarning, split_names_fixed
from kd_components.data.volumes import (
    BTCV_TO_SYNAPSE8,
    SelectSliced,
    main,
    normalise_intensity,
    prepare_acdc_data,
    prepare_synapse_data,
    remap_labels,
    slice_datalist,
    window_ct,
    write_slices,
)

REAL_ACDC = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "ACDC"
SHAPE = (12, 10, 4)  # (H, W, Z)
ACDC_SPACING = (1.5625, 1.5625, 10.0)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures in the official layouts


def _save(path: Path, array: np.ndarray, spacing: tuple[float, ...] | None = None) -> None:
    """NIfTI file with a diagonal affine of ``spacing`` (an identity affine without qform/sform code if None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if spacing is None:
        image = nib.Nifti1Image(array, np.eye(4))
        image.set_sform(None, code=0)
        image.set_qform(None, code=0)
    else:
        image = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    nib.save(image, str(path))


def _labels(rng: np.random.Generator, num_classes: int, shape=SHAPE, empty_slices: int = 1) -> np.ndarray:
    """Label volume with a block of every class and ``empty_slices`` all-background slices at the end."""
    label = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        y, x = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        label[y : y + 3, x : x + 3, : shape[2] - empty_slices] = c
    return label


def make_acdc_release(root: Path, training=(1, 2, 3, 4, 5), testing=(101, 102), info: bool = True) -> Path:
    """Official ACDC release: database/{training,testing}/patientXXX/ with ED/ES frames, _gt, 4D cine, Info.cfg."""
    rng = np.random.default_rng(0)
    for folder, patients in (("training", training), ("testing", testing)):
        for number in patients:
            patient = root / "database" / folder / f"patient{number:03d}"
            ed, es = 1, 9 + number % 5
            for frame in (ed, es):
                raw = rng.integers(0, 700, SHAPE).astype(np.int16)
                _save(patient / f"patient{number:03d}_frame{frame:02d}.nii.gz", raw, ACDC_SPACING)
                _save(patient / f"patient{number:03d}_frame{frame:02d}_gt.nii.gz", _labels(rng, 4), ACDC_SPACING)
            _save(patient / f"patient{number:03d}_4d.nii.gz", np.zeros((*SHAPE, 3), np.int16), ACDC_SPACING)
            if info:
                (patient / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\n")
    return root / "database"


def make_ssl4mis(root: Path, patients=(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), val=(2, 7), with_csv: bool = True) -> Path:
    """The shared copy's SSL4MIS layout: imagesTr/ + labelsTr/ (float32 [0, 1], identity affine) and splits.csv."""
    rng = np.random.default_rng(1)
    rows = []
    for number in patients:
        for frame in ("01", "02"):
            name = f"patient{number:03d}_frame{frame}.nii.gz"
            image = rng.random(SHAPE, dtype=np.float32)
            image.flat[0], image.flat[1] = 0.0, 1.0
            _save(root / "ACDC" / "imagesTr" / name, image)
            _save(root / "ACDC" / "labelsTr" / name, _labels(rng, 4))
            split = "val" if number in val else "train"
            rows.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "split_ssl4mis": split})
    if with_csv:
        with (root / "ACDC" / "splits.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["image", "label", "split_ssl4mis"])
            writer.writeheader()
            writer.writerows(rows)
    return root / "ACDC"


def make_btcv(root: Path, cases=(1, 2, 3, 4, 5)) -> Path:
    """BTCV RawData: Training/img/imgXXXX.nii.gz (HU int16) + Training/label/labelXXXX.nii.gz (0..13); Testing/img."""
    rng = np.random.default_rng(2)
    for number in cases:
        hu = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
        hu[0, 0, 0], hu[0, 1, 0], hu[0, 2, 0] = -125, 75, 275
        _save(root / "RawData" / "Training" / "img" / f"img{number:04d}.nii.gz", hu, (0.7, 0.7, 3.0))
        _save(root / "RawData" / "Training" / "label" / f"label{number:04d}.nii.gz", _labels(rng, 14), (0.7, 0.7, 3.0))
    _save(root / "RawData" / "Testing" / "img" / "img0061.nii.gz", np.zeros(SHAPE, np.int16), (0.7, 0.7, 3.0))
    return root / "RawData"


def make_transunet(root: Path, cases=(5, 6, 7, 9), slices: int = 4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TransUNet's train_npz/caseXXXX_sliceYYY.npz (image in [0, 1], labels 0..8); returns the true volumes."""
    rng = np.random.default_rng(3)
    folder = root / "Synapse" / "train_npz"
    folder.mkdir(parents=True)
    volumes = {}
    for number in cases:
        image = rng.random((*SHAPE[:2], slices), dtype=np.float32)
        label = _labels(rng, 9, (*SHAPE[:2], slices)).astype(np.float32)
        for k in range(slices):
            np.savez(folder / f"case{number:04d}_slice{k:03d}.npz", image=image[..., k], label=label[..., k])
        volumes[f"case{number:04d}"] = (image, label)
    return volumes


def _datalist(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def _cases(data: dict, key: str) -> list[str]:
    return [e["case"] for e in data[key]]


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


# ---------------------------------------------------------------------------------------------------------------------
# intensity and labels


def test_normalisation_and_ct_window():
    volume = np.array([[[10.0, 20.0], [30.0, 1000.0]]] * 50)
    scaled = normalise_intensity(volume)
    assert scaled.dtype == np.float32 and scaled.min() == 0 and scaled.max() == 1
    np.testing.assert_allclose(scaled[0, 0], [0, 10 / 990])
    robust = normalise_intensity(volume, "percentile", (0, 70))  # the 70th percentile is 30: 1000 is clipped to it
    np.testing.assert_allclose(robust[0], [[0, 0.5], [1, 1]])
    assert normalise_intensity(np.full((2, 2, 2), 5.0)).max() == 0
    with pytest.raises(DatasetError, match=r"x\.nii\.gz has values 10..1000, outside \[0, 1\]"):
        normalise_intensity(volume, "none", path="x.nii.gz")
    np.testing.assert_allclose(window_ct(np.array([-1000, -125, 75, 275, 3000])), [0, 0, 0.5, 1, 1])
    with pytest.raises(DatasetError, match="low < high"):
        window_ct(np.zeros(1), (10, 10))


def test_synapse8_mapping_keeps_the_eight_organs():
    label = np.arange(14, dtype=np.uint8)
    assert remap_labels(label, BTCV_TO_SYNAPSE8).tolist() == [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]


def test_split_with_fixed_splits():
    names = [f"p{i}" for i in range(20)]
    splits = split_names_fixed(names, {"test": ["p3", "p4"]}, (0.8, 0.1, 0.1), seed=0)
    assert splits["test"] == ["p3", "p4"] and len(splits["validation"]) == 2 and len(splits["training"]) == 16
    assert split_names_fixed(names, {"test": ["p3", "p4"]}, seed=0) == splits
    splits = split_names_fixed(names, {"validation": ["p0"]}, seed=1)
    assert splits["validation"] == ["p0"] and len(splits["test"]) == 2
    with pytest.raises(DatasetError, match="not in the dataset: zz"):
        split_names_fixed(names, {"test": ["zz"]})
    with pytest.raises(DatasetError, match="fractions of the other splits"):
        split_names_fixed(names, {"test": ["p1"]}, (0.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------------
# ACDC


def test_acdc_release_layout(tmp_path):
    database = make_acdc_release(tmp_path)
    out = tmp_path / "out"
    prepare_acdc_data(tmp_path, out)
    data = _datalist(out)
    assert data["metadata"]["spacing_known"] is True and data["metadata"]["num_classes"] == 4
    assert sorted({e["patient"] for e in data["test"]}) == ["patient101", "patient102"]  # testing/ is the test split
    assert len(data["training"]) + len(data["validation"]) == 10 and len(data["validation"]) >= 2
    for key in SPLIT_KEYS:
        patients = [e["patient"] for e in data[key]]
        assert all(patients.count(p) == 2 for p in patients)  # both frames of a patient in one split
    entry = next(e for e in data["training"] + data["validation"] if e["case"] == "patient003_frame01")
    assert entry["phase"] == "ED" and entry["spacing"] == list(ACDC_SPACING)
    raw_path = database / "training" / "patient003" / "patient003_frame01.nii.gz"
    image, raw = _array(out / entry["image"]), _array(raw_path).astype(np.float32)
    assert image.dtype == np.float32 and image.shape == SHAPE and image.min() == 0 and image.max() == 1
    np.testing.assert_allclose(image, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    label = _array(out / entry["label"])
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, _array(database / "training" / "patient003" / "patient003_frame01_gt.nii.gz"))
    np.testing.assert_allclose(nib.load(str(out / entry["image"])).header.get_zooms(), ACDC_SPACING)
    es = next(e for e in data["test"] if e["case"].startswith("patient101") and e["case"] != "patient101_frame01")
    assert es["phase"] == "ES"
    loaded = Compose([LoadImaged(("image", "label")), EnsureChannelFirstd(("image", "label"))])(
        load_decathlon_datalist(str(out / "datalist.json"), True, "test")[0]
    )
    assert loaded["image"].shape == (1, *SHAPE) and loaded["label"].shape == (1, *SHAPE)


def test_acdc_release_without_info_cfg_and_percentile_normalisation(tmp_path):
    make_acdc_release(tmp_path, training=(1, 2, 3), testing=(), info=False)
    out = tmp_path / "out"
    with pytest.warns(DatasetWarning, match=r"3 ACDC patient folder\(s\) .* have no Info\.cfg"):
        prepare_acdc_data(tmp_path / "database" / "training", out, normalise="percentile", fractions=(0.4, 0.3, 0.3))
    data = _datalist(out)
    assert [len(data[k]) for k in SPLIT_KEYS] == [2, 2, 2] and "phase" not in data["training"][0]
    assert "percentiles" in data["metadata"]["intensity"]


def test_acdc_ssl4mis_layout_with_splits_csv(tmp_path):
    root = make_ssl4mis(tmp_path)
    out = tmp_path / "out"
    prepare_acdc_data(tmp_path, out)
    data = _datalist(out)
    assert sorted({e["patient"] for e in data["validation"]}) == ["patient002", "patient007"]
    test = sorted({e["patient"] for e in data["test"]})
    assert len(test) == 1 and test[0] not in ("patient002", "patient007")  # 1/9 of the 8 train patients
    assert len(data["training"]) == 14 and data["metadata"]["spacing_known"] is False
    assert "spacing" not in data["training"][0] and "splits.csv" in data["metadata"]["split"]
    name = data["training"][0]["case"] + ".nii.gz"
    np.testing.assert_allclose(_array(out / data["training"][0]["image"]), _array(root / "imagesTr" / name), atol=1e-6)
    # the same data without splits.csv: a seeded patient-level split
    seeded = tmp_path / "seeded"
    prepare_acdc_data(root, seeded, use_splits=False, seed=4)
    data = _datalist(seeded)
    assert [len(data[k]) for k in SPLIT_KEYS] == [16, 2, 2]
    for key in SPLIT_KEYS:
        patients = [e["patient"] for e in data[key]]
        assert all(patients.count(p) == 2 for p in patients)


def test_acdc_splits_csv_errors(tmp_path):
    root = make_ssl4mis(tmp_path, patients=(1, 2, 3))
    rows = (root / "splits.csv").read_text().splitlines()
    (root / "splits.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(
        DatasetError, match=r"1 case\(s\) are not in .*splits\.csv: patient003_frame02.*--ignore-splits"
    ):
        prepare_acdc_data(root, tmp_path / "out")
    (root / "splits.csv").write_text("\n".join([*rows[:-1], rows[-1].replace(",train", ",val")]) + "\n")
    with pytest.raises(DatasetError, match=r"splits\.csv puts the frames of patient003 in different splits"):
        prepare_acdc_data(root, tmp_path / "out")
    (root / "splits.csv").write_text("\n".join([*rows[:-1], rows[-1].replace(",train", ",holdout")]) + "\n")
    with pytest.raises(DatasetError, match=r"splits\.csv, line 7: unknown split 'holdout'"):
        prepare_acdc_data(root, tmp_path / "out")


def test_acdc_bad_inputs_name_the_files(tmp_path):
    database = make_acdc_release(tmp_path, training=(1, 2, 3), testing=())
    patient = database / "training" / "patient002"
    (patient / "patient002_frame01_gt.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"have no mask: patient002_frame01\.nii\.gz"):
        prepare_acdc_data(database, tmp_path / "out")
    _save(patient / "patient002_frame01_gt.nii.gz", np.zeros((12, 11, 4), np.uint8), ACDC_SPACING)
    with pytest.raises(
        DatasetError,
        match=r"patient002_frame01\.nii\.gz has shape \(12, 10, 4\) but its label .*_gt\.nii\.gz has shape",
    ):
        prepare_acdc_data(database, tmp_path / "out")
    bad = np.zeros(SHAPE, np.uint8)
    bad[0, 0, 0] = 7
    _save(patient / "patient002_frame01_gt.nii.gz", bad, ACDC_SPACING)
    with pytest.raises(DatasetError, match=r"label .*patient002_frame01_gt\.nii\.gz holds the values 7 outside 0\.\.3"):
        prepare_acdc_data(database, tmp_path / "out")
    _save(patient / "patient002_frame01_gt.nii.gz", np.zeros(SHAPE[:2], np.uint8), ACDC_SPACING)
    with pytest.raises(
        DatasetError, match=r"patient002_frame01_gt\.nii\.gz has shape \(12, 10\): expected a 3D volume"
    ):
        prepare_acdc_data(database, tmp_path / "out")
    (patient / "patient002_frame01_gt.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DatasetError, match=r"cannot read NIfTI file .*patient002_frame01_gt\.nii\.gz"):
        prepare_acdc_data(database, tmp_path / "out")
    (patient / "Info.cfg").write_text("ED: one\n")
    with pytest.raises(DatasetError, match=r"malformed .*patient002.Info\.cfg: ED is 'one'"):
        prepare_acdc_data(database, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_empty_and_existing_outputs(tmp_path):
    with pytest.raises(DatasetError, match=rf"ACDC folder {tmp_path / 'nope'} does not exist"):
        prepare_acdc_data(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "ACDC" / "imagesTr").mkdir(parents=True)
    (tmp_path / "ACDC" / "labelsTr").mkdir()
    with pytest.raises(DatasetError, match=r"imagesTr holds no \.gz/\.nii files \(it is empty\)"):
        prepare_acdc_data(tmp_path / "ACDC", tmp_path / "out")
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="does not have a known layout"):
        prepare_synapse_data(tmp_path / "other", tmp_path / "out")
    root = make_ssl4mis(tmp_path / "ok", patients=(1, 2, 3), val=(2,))
    prepare_acdc_data(root, tmp_path / "out")
    with pytest.raises(DatasetError, match=r"already holds prepared data \(volumes/images, volumes/labels, datalist"):
        prepare_acdc_data(root, tmp_path / "out")
    stale = tmp_path / "out" / "volumes" / "images" / "stale.nii.gz"
    stale.write_bytes(b"")
    prepare_acdc_data(root, tmp_path / "out", overwrite=True)
    assert not stale.exists() and len(list((tmp_path / "out" / "volumes" / "labels").iterdir())) == 6


# ---------------------------------------------------------------------------------------------------------------------
# Synapse / BTCV


def test_btcv_nifti_window_and_label_maps(tmp_path):
    make_btcv(tmp_path)
    out13, out8 = tmp_path / "out13", tmp_path / "out8"
    prepare_synapse_data(tmp_path, out13)
    prepare_synapse_data(tmp_path / "RawData" / "Training", out8, label_map="synapse8")
    data13, data8 = _datalist(out13), _datalist(out8)
    assert data13["metadata"]["num_classes"] == 14 and data8["metadata"]["num_classes"] == 9
    assert data8["metadata"]["labels"]["5"] == "liver" and data8["metadata"]["spacing_known"] is True
    assert sorted(c for k in SPLIT_KEYS for c in _cases(data13, k)) == [f"case{i:04d}" for i in range(1, 6)]
    assert [_cases(data13, k) for k in SPLIT_KEYS] == [_cases(data8, k) for k in SPLIT_KEYS]
    entry = data13["training"][0]
    assert entry["spacing"] == pytest.approx([0.7, 0.7, 3.0])
    image = _array(out13 / entry["image"])
    np.testing.assert_allclose(image[0, :3, 0], [0.0, 0.5, 1.0], atol=1e-6)
    assert image.dtype == np.float32 and image.min() == 0 and image.max() == 1
    number = entry["case"].removeprefix("case")
    raw = _array(tmp_path / "RawData" / "Training" / "label" / f"label{number}.nii.gz")
    np.testing.assert_array_equal(_array(out13 / entry["label"]), raw)
    np.testing.assert_array_equal(_array(out8 / entry["label"]), remap_labels(raw, BTCV_TO_SYNAPSE8))
    assert set(np.unique(_array(out8 / entry["label"]))) <= set(range(9))


def test_transunet_npz_slices_are_stacked_into_volumes(tmp_path):
    volumes = make_transunet(tmp_path)
    out = tmp_path / "out"
    prepare_synapse_data(tmp_path, out, fractions=(0.5, 0.25, 0.25))
    data = _datalist(out)
    assert [len(data[k]) for k in SPLIT_KEYS] == [2, 1, 1] and data["metadata"]["spacing_known"] is False
    for key in SPLIT_KEYS:
        for entry in data[key]:
            image, label = volumes[entry["case"]]
            np.testing.assert_array_equal(_array(out / entry["image"]), image)
            np.testing.assert_array_equal(_array(out / entry["label"]), label.astype(np.uint8))
    (tmp_path / "Synapse" / "train_npz" / "case0006_slice002.npz").unlink()
    with pytest.raises(DatasetError, match=r"slices 2 of case0006 are missing \(it has 0\.\.3\)"):
        prepare_synapse_data(tmp_path, tmp_path / "out2")
    np.savez(tmp_path / "Synapse" / "train_npz" / "case0006_slice002.npz", img=np.zeros(SHAPE[:2]))
    with pytest.raises(DatasetError, match=r"case0006_slice002\.npz has no \['image', 'label'\] array"):
        prepare_synapse_data(tmp_path, tmp_path / "out2")


def test_transunet_h5_volumes_need_h5py(tmp_path):
    make_transunet(tmp_path, cases=(5, 6, 7))
    folder = tmp_path / "Synapse" / "test_vol_h5"
    folder.mkdir()
    try:
        import h5py
    except ImportError:
        (folder / "case0001.npy.h5").write_bytes(b"")
        with pytest.raises(DatasetError, match="needs h5py, which is not installed: pip install h5py"):
            prepare_synapse_data(tmp_path, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    rng = np.random.default_rng(4)
    image, label = rng.random((3, *SHAPE[:2]), dtype=np.float32), rng.integers(0, 9, (3, *SHAPE[:2]))
    with h5py.File(folder / "case0001.npy.h5", "w") as handle:
        handle["image"], handle["label"] = image, label.astype(np.float32)
    prepare_synapse_data(tmp_path, tmp_path / "out")
    data = _datalist(tmp_path / "out")
    assert _cases(data, "test") == ["case0001"]
    np.testing.assert_array_equal(_array(tmp_path / "out" / data["test"][0]["image"]), np.moveaxis(image, 0, -1))


# ---------------------------------------------------------------------------------------------------------------------
# 2D slices


def test_write_slices_loads_with_monai(tmp_path):
    root = make_ssl4mis(tmp_path, patients=(1, 2, 3, 4), val=(2,))
    out = tmp_path / "out"
    datalist = prepare_acdc_data(root, out)
    path = write_slices(datalist)
    assert path == out / "slices" / "datalist.json"
    data = json.loads(path.read_text())
    volumes = _datalist(out)
    assert len(data["training"]) == len(volumes["training"]) * SHAPE[2] and data["validation"] == []
    assert data["metadata"]["slice_axis"] == 2 and data["metadata"]["num_classes"] == 4
    first = data["training"][0]
    assert first["slice"] == 0 and first["image"] == f"images/{first['case']}_000.npy"
    volume = _array(out / "volumes" / "images" / f"{first['case']}.nii.gz")
    transform = Compose(
        [
            LoadImaged(("image", "label"), reader="NumpyReader"),
            EnsureChannelFirstd(("image", "label"), channel_dim="no_channel"),
        ]
    )
    loaded = transform(load_decathlon_datalist(str(path), True, "training")[0])
    assert loaded["image"].shape == (1, *SHAPE[:2])
    np.testing.assert_array_equal(loaded["image"][0].numpy(), volume[..., 0])
    with pytest.raises(DatasetError, match="already holds prepared data"):
        write_slices(datalist)
    path = write_slices(datalist, tmp_path / "nonempty", splits=SPLIT_KEYS, skip_empty=True)
    data = json.loads(path.read_text())
    assert len(data["validation"]) == 2 * (SHAPE[2] - 1)  # the last slice of every fixture volume is empty
    assert all(np.load(path.parent / e["label"]).any() for e in data["validation"])


def test_slice_datalist_with_select_sliced(tmp_path):
    root = make_ssl4mis(tmp_path, patients=(1, 2), val=(2,))
    datalist = prepare_acdc_data(root, tmp_path / "out")
    volumes = load_decathlon_datalist(str(datalist), True, "validation")
    entries = slice_datalist(volumes, skip_empty=True)
    assert [e["slice"] for e in entries] == [0, 1, 2] * 2 and entries[0]["case"] == volumes[0]["case"]
    transform = Compose(
        [LoadImaged(("image", "label")), EnsureChannelFirstd(("image", "label")), SelectSliced(("image", "label"))]
    )
    item = transform(entries[1])
    assert item["image"].shape == (1, *SHAPE[:2])
    np.testing.assert_array_equal(item["label"][0].numpy(), _array(Path(volumes[0]["label"]))[..., 1])


def test_command_line(tmp_path, capsys):
    make_btcv(tmp_path, cases=(1, 2, 3))
    out = tmp_path / "out"
    args = ["--synapse", str(tmp_path), "--out", str(out), "--label-map", "synapse8", "--slices"]
    assert main([*args, "--limit", "2", "--fractions", "0.5", "0.5", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "datalist.json"), str(out / "slices" / "datalist.json")]
    assert len(_datalist(out)["training"]) == 1 and len(_datalist(out / "slices")["training"]) == SHAPE[2]
    assert main(args) == 1
    assert "already holds prepared data" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# real data


def test_real_acdc_subset(tmp_path):
    if not (REAL_ACDC / "imagesTr").is_dir():
        pytest.skip(f"real ACDC not found at {REAL_ACDC}")
    cases = sorted(p.name for p in (REAL_ACDC / "imagesTr").glob("*.nii.gz"))[:6]  # 3 patients, both frames
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "ACDC" / sub).mkdir(parents=True)
        for name in cases:
            (tmp_path / "ACDC" / sub / name).symlink_to(REAL_ACDC / sub / name)
    (tmp_path / "ACDC" / "splits.csv").symlink_to(REAL_ACDC / "splits.csv")
    out = tmp_path / "out"
    datalist = prepare_acdc_data(tmp_path / "ACDC", out)
    data = _datalist(out)
    assert data["metadata"]["spacing_known"] is False
    assert sum(len(data[k]) for k in SPLIT_KEYS) == 6
    with (REAL_ACDC / "splits.csv").open() as handle:
        val = {
            Path(row["image"]).name[: -len(".nii.gz")]
            for row in csv.DictReader(handle)
            if row["split_ssl4mis"] == "val"
        }
    assert {e["case"] for e in data["validation"]} == val & {c[: -len(".nii.gz")] for c in cases}
    transform = Compose([LoadImaged(("image", "label")), EnsureChannelFirstd(("image", "label"))])
    for entry in load_decathlon_datalist(str(datalist), True, "training")[:2]:
        item = transform(entry)
        original = _array(REAL_ACDC / "imagesTr" / Path(entry["image"]).name)
        assert item["image"].shape == (1, *original.shape) and item["label"].shape == item["image"].shape
        np.testing.assert_allclose(item["image"][0].numpy(), original, atol=1e-6)
        assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 3}
    slices = write_slices(datalist, skip_empty=True)
    entries = load_decathlon_datalist(str(slices), True, "training")
    assert entries and all(np.load(e["label"]).any() for e in entries)
