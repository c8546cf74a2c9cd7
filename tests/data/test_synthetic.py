"""Tests of the synthetic polyp-like data generator."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from kd_components.data.common import SPLIT_KEYS, DatasetError
from kd_components.data.synthetic import main, make_synthetic_polyps, synthetic_polyp, synthetic_polyp_arrays


@pytest.fixture(scope="module")
def arrays():
    return synthetic_polyp_arrays(64, (64, 64), seed=0)


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return 2 * np.sum(prediction & truth) / max(1, prediction.sum() + truth.sum())


def _best_threshold_dice(feature: np.ndarray, truth: np.ndarray) -> float:
    """Best Dice of one global threshold (either direction) of a per-pixel feature over the whole set."""
    thresholds = np.quantile(feature, np.linspace(0.01, 0.99, 99))
    return max(max(_dice(feature > t, truth), _dice(feature <= t, truth)) for t in thresholds)


def _box_mean(images: np.ndarray, k: int) -> np.ndarray:
    """Mean over a k x k window (edge padded) of (N, H, W) arrays."""
    padded = np.pad(images.astype(float), ((0, 0), (k // 2, k // 2), (k // 2, k // 2)), mode="edge")
    c = np.pad(padded.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / k**2


def test_arrays_shape_values_and_determinism(arrays):
    images, masks = arrays
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (64, 64, 64) and masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 1}
    again = synthetic_polyp_arrays(64, (64, 64), seed=0)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], masks)
    other = synthetic_polyp_arrays(64, (64, 64), seed=1)
    assert not np.array_equal(other[1], masks)
    rectangular = synthetic_polyp_arrays(3, (32, 48), seed=0)
    assert rectangular[0].shape == (3, 32, 48, 3) and rectangular[1].shape == (3, 32, 48)


def test_blobs_present_in_most_images(arrays):
    _, masks = arrays
    per_image = masks.reshape(len(masks), -1).mean(axis=1)
    assert np.sum(per_image > 0) >= 0.85 * len(masks)
    assert 0.03 < masks.mean() < 0.3
    assert synthetic_polyp_arrays(4, (32, 32), seed=0, empty_fraction=1.0)[1].max() == 0
    assert synthetic_polyp_arrays(16, (32, 32), seed=0, empty_fraction=0.0)[1].reshape(16, -1).max(1).min() == 1


def test_images_look_like_mucosa(arrays):
    images, masks = arrays
    background = images[masks == 0].astype(float).mean(axis=0)
    assert background[0] > background[1] + 40 and background[0] > background[2] + 40  # reddish
    assert images.std() > 10  # textured and noisy, not flat


def test_not_separable_by_one_channel_threshold_but_by_local_contrast(arrays):
    images, masks = arrays
    truth = masks.astype(bool)
    global_best = max(_best_threshold_dice(images[..., c].astype(float), truth) for c in range(3))
    assert global_best < 0.6
    green = images[..., 1].astype(float)
    local_best = _best_threshold_dice(green - _box_mean(green, 47), truth)
    assert local_best > global_best + 0.1  # blobs stand out from their surroundings


def test_zero_blobs_gives_empty_mask():
    image, mask = synthetic_polyp(np.random.default_rng(0), (40, 30), n_blobs=0)
    assert image.shape == (40, 30, 3) and mask.shape == (40, 30) and not mask.any()


def test_written_dataset_is_fast_and_loads_with_monai(tmp_path):
    start = time.perf_counter()
    datalist = make_synthetic_polyps(tmp_path / "syn", n=64, size=(64, 64), seed=0)
    assert time.perf_counter() - start < 3.0  # about 0.25 s on an idle machine; generous for a loaded one
    assert datalist == tmp_path / "syn" / "datalist.json"
    raw = json.loads(datalist.read_text())
    assert list(raw) == list(SPLIT_KEYS) and [len(raw[k]) for k in SPLIT_KEYS] == [51, 7, 6]
    images, masks = synthetic_polyp_arrays(64, (64, 64), seed=0)
    first = raw["training"][0]
    index = int(first["image"].split("_")[-1].split(".")[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "syn" / first["image"])), images[index])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "syn" / first["label"])), masks[index])
    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])
    for key in SPLIT_KEYS:
        for item in load_decathlon_datalist(str(datalist), True, key)[:2]:
            data = load(item)
            assert tuple(data["image"].shape) == (3, 64, 64) and tuple(data["label"].shape) == (1, 64, 64)
            assert set(np.unique(np.asarray(data["label"]))) <= {0, 1}


def test_same_layout_as_prepared_data(tmp_path):
    make_synthetic_polyps(tmp_path / "syn", n=10, size=(32, 32), seed=3)
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == ["datalist.json", "images", "labels"]
    images = sorted(p.name for p in (tmp_path / "syn" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "syn" / "labels").iterdir())
    assert images[0] == "synthetic_0000.png" and len(images) == 10
    assert Image.open(tmp_path / "syn" / "images" / images[0]).mode == "RGB"
    assert Image.open(tmp_path / "syn" / "labels" / images[0]).mode == "L"


def test_overwrite_guard_and_bad_arguments(tmp_path):
    out = tmp_path / "syn"
    make_synthetic_polyps(out, n=4, size=(16, 16))
    with pytest.raises(DatasetError, match=rf"{out} already holds .*overwrite=True"):
        make_synthetic_polyps(out, n=4, size=(16, 16))
    make_synthetic_polyps(out, n=3, size=(16, 16), overwrite=True)
    assert len(list((out / "images").iterdir())) == 3
    for kwargs, match in [
        ({"n": 0}, "n must be"),
        ({"size": (4, 64)}, "size must be"),
        ({"max_blobs": 0}, "max_blobs"),
        ({"empty_fraction": 1.5}, "empty_fraction"),
        ({"fractions": (0.9, 0.2, 0.1)}, "sum to 1"),
    ]:
        with pytest.raises(DatasetError, match=match):
            make_synthetic_polyps(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["--out", str(out), "--n", "8", "--size", "24", "32", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "datalist.json")
    assert Image.open(next((out / "images").iterdir())).size == (32, 24)
    assert main(["--out", str(out), "--n", "8"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--size H W" in capsys.readouterr().out
