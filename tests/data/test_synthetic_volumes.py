"""Tests of the synthetic ACDC-like volume generator (SSL4MIS layout, read by the real ACDC preparer)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from kd_components.data.synthetic_volumes import make_synthetic_volumes, synthetic_heart_volume
from kd_components.data.volumes import prepare_acdc_data, write_slices


def test_heart_volume_classes_and_range():
    image, label = synthetic_heart_volume(np.random.default_rng(0), (24, 20, 3))
    assert image.shape == label.shape == (24, 20, 3) and image.dtype == np.float32 and label.dtype == np.uint8
    assert image.min() == 0 and image.max() == 1
    assert set(np.unique(label)) == {0, 1, 2, 3}
    for k in range(3):  # every slice holds every structure
        assert set(np.unique(label[..., k])) == {0, 1, 2, 3}
    again, _ = synthetic_heart_volume(np.random.default_rng(0), (24, 20, 3))
    assert np.array_equal(image, again)


def test_layout_prepares_into_volumes_and_slices(tmp_path):
    raw = make_synthetic_volumes(tmp_path / "ACDC", patients=5, shape=(16, 12, 3), val=(2,))
    images = sorted((raw / "imagesTr").glob("*.nii.gz"))
    assert len(images) == len(list((raw / "labelsTr").glob("*.nii.gz"))) == 10
    rows = list(csv.DictReader((raw / "splits.csv").open()))
    assert len(rows) == 10 and {r["split_ssl4mis"] for r in rows if "patient002" in r["image"]} == {"val"}
    volume = nib.load(str(images[0]))
    assert volume.shape == (16, 12, 3) and int(volume.header["sform_code"]) == int(volume.header["qform_code"]) == 0

    datalist = prepare_acdc_data(raw, tmp_path / "data")
    data = json.loads(datalist.read_text())
    assert [e["image"] for e in data["validation"]] and all("patient002" in e["image"] for e in data["validation"])
    slices = json.loads(write_slices(datalist).read_text())
    assert len(slices["training"]) == 3 * len(data["training"])


def test_bad_patient_count(tmp_path):
    with pytest.raises(ValueError, match="patients"):
        make_synthetic_volumes(tmp_path, patients=0)
