"""Tests of the shared dataset preparation pieces: split, pairing, listing, datalist, output folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from kd_components.data.common import (
    DATALIST_NAME,
    IMAGES_DIR,
    LABELS_DIR,
    SPLIT_KEYS,
    DatasetError,
    check_output_dir,
    datalist_entries,
    list_files,
    pair_by_stem,
    save_png,
    split_counts,
    split_names,
    staged_output,
    validate_fractions,
    write_datalist,
)

NAMES = [f"case_{i:03d}" for i in range(100)]


# ---------------------------------------------------------------------------------------------------------------------
# split


def test_split_is_deterministic_and_independent_of_input_order():
    shuffled = NAMES[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != NAMES
    reference = split_names(NAMES, seed=3)
    assert split_names(shuffled, seed=3) == reference
    assert split_names(reversed(NAMES), seed=3) == reference
    assert split_names(NAMES, seed=3) == reference


def test_split_is_a_partition_with_the_requested_fractions():
    splits = split_names(NAMES, (0.8, 0.1, 0.1), seed=0)
    assert list(splits) == list(SPLIT_KEYS)
    assert [len(splits[k]) for k in SPLIT_KEYS] == [80, 10, 10]
    members = [set(splits[k]) for k in SPLIT_KEYS]
    assert not members[0] & members[1] and not members[0] & members[2] and not members[1] & members[2]
    assert set().union(*members) == set(NAMES)
    assert all(splits[k] == sorted(splits[k]) for k in SPLIT_KEYS)


def test_split_is_shuffled_and_depends_on_the_seed():
    first, second = split_names(NAMES, seed=0), split_names(NAMES, seed=1)
    assert first["training"] != second["training"]
    assert first["validation"] != NAMES[80:90]  # not a plain cut of the sorted names


def test_same_name_same_split_whatever_the_other_names_order():
    names = [f"img{i}.jpg" for i in range(30)]
    splits = [split_names(random.Random(s).sample(names, len(names)), (0.6, 0.2, 0.2), seed=7) for s in range(5)]
    for name in names:
        keys = {next(k for k in SPLIT_KEYS if name in split[k]) for split in splits}
        assert len(keys) == 1, name


@pytest.mark.parametrize(
    "n, fractions, expected",
    [
        (100, (0.8, 0.1, 0.1), (80, 10, 10)),
        (37, (0.7, 0.2, 0.1), (26, 7, 4)),
        (5, (0.8, 0.1, 0.1), (3, 1, 1)),  # validation and test are never silently empty
        (2, (0.8, 0.1, 0.1), (1, 1, 0)),
        (1, (0.8, 0.1, 0.1), (1, 0, 0)),
        (0, (0.8, 0.1, 0.1), (0, 0, 0)),
        (10, (1.0, 0.0, 0.0), (10, 0, 0)),
        (10, (0.0, 0.5, 0.5), (0, 5, 5)),
    ],
)
def test_split_counts(n, fractions, expected):
    assert split_counts(n, fractions) == expected
    assert sum(expected) == n


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1), (0.5, float("nan"), 0.5)])
def test_invalid_fractions_raise(fractions):
    with pytest.raises(DatasetError, match="fractions"):
        validate_fractions(fractions)
    with pytest.raises(DatasetError):
        split_names(NAMES, fractions)


def test_duplicate_names_raise():
    with pytest.raises(DatasetError, match="case_001"):
        split_names(NAMES + ["case_001"])


# ---------------------------------------------------------------------------------------------------------------------
# listing and pairing


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_list_files_filters_suffixes_case_insensitively_and_skips_hidden(tmp_path):
    folder = _touch(tmp_path / "images", "b.JPG", "a.jpg", "c.png", ".DS_Store", "._a.jpg", "notes.txt")
    assert [p.name for p in list_files(folder, (".jpg",))] == ["a.jpg", "b.JPG"]


def test_list_files_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetError, match=r"images folder .*nowhere does not exist"):
        list_files(tmp_path / "nowhere", (".jpg",), "images")


def test_list_files_empty_folder_names_it(tmp_path):
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"masks folder .*masks holds no \.jpg files \(it is empty\)"):
        list_files(tmp_path / "masks", (".jpg",), "masks")
    _touch(tmp_path / "masks", "readme.txt")
    with pytest.raises(DatasetError, match="readme.txt"):
        list_files(tmp_path / "masks", (".jpg",), "masks")


def test_list_files_rejects_a_file(tmp_path):
    _touch(tmp_path, "file.jpg")
    with pytest.raises(DatasetError, match="not a folder"):
        list_files(tmp_path / "file.jpg", (".jpg",))


def test_pair_by_stem_pairs_across_suffixes(tmp_path):
    images = list_files(_touch(tmp_path / "Original", "2.tif", "1.tif"), (".tif",))
    masks = list_files(_touch(tmp_path / "Ground Truth", "1.png", "2.png"), (".png",))
    pairs = pair_by_stem(images, masks)
    assert [(s, i.name, m.name) for s, i, m in pairs] == [("1", "1.tif", "1.png"), ("2", "2.tif", "2.png")]


def test_pair_by_stem_lists_unpaired_files_on_both_sides(tmp_path):
    images = list_files(_touch(tmp_path / "images", "a.jpg", "b.jpg", "only_image.jpg"), (".jpg",))
    masks = list_files(_touch(tmp_path / "masks", "a.jpg", "b.jpg", "only_mask.jpg"), (".jpg",))
    with pytest.raises(DatasetError) as info:
        pair_by_stem(images, masks)
    message = str(info.value)
    assert "only_image.jpg" in message and "only_mask.jpg" in message
    assert str(tmp_path / "images") in message and "remove the unpaired files" in message
    assert [s for s, _, _ in pair_by_stem(images, masks, allow_unpaired=True)] == ["a", "b"]


def test_pair_by_stem_lists_only_the_first_few(tmp_path):
    images = list_files(_touch(tmp_path / "images", *[f"{i:02d}.jpg" for i in range(12)]), (".jpg",))
    masks = list_files(_touch(tmp_path / "masks", "00.jpg"), (".jpg",))
    with pytest.raises(DatasetError, match=r"11 image\(s\) .* 01.jpg, .*05.jpg, \.\.\. and 6 more"):
        pair_by_stem(images, masks)


def test_pair_by_stem_rejects_two_files_with_one_stem(tmp_path):
    images = list_files(_touch(tmp_path / "images", "a.jpg", "a.png"), (".jpg", ".png"))
    masks = list_files(_touch(tmp_path / "masks", "a.png"), (".png",))
    with pytest.raises(DatasetError, match=r"stem 'a' \(a.jpg, a.png\)"):
        pair_by_stem(images, masks)


# ---------------------------------------------------------------------------------------------------------------------
# datalist


def _write_pngs(folder, names):
    for sub, value in (("images", 100), ("labels", 1)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            shape = (4, 5, 3) if sub == "images" else (4, 5)
            save_png(np.full(shape, value, np.uint8), folder / sub / f"{name}.png")


def test_datalist_paths_are_relative_and_load_with_monai(tmp_path):
    _write_pngs(tmp_path, NAMES[:10])
    splits = split_names(NAMES[:10], seed=0)
    entries = datalist_entries(splits)
    entries["training"][0] = {k: str(tmp_path / v) for k, v in entries["training"][0].items()}  # absolute
    path = write_datalist(tmp_path / "datalist.json", entries)
    raw = json.loads(path.read_text())
    assert list(raw) == list(SPLIT_KEYS)
    assert all(not e["image"].startswith("/") and e["image"].startswith("images/") for k in raw for e in raw[k])
    for key in SPLIT_KEYS:
        loaded = load_decathlon_datalist(str(path), True, key)
        assert len(loaded) == len(splits[key])
        for entry in loaded:
            assert Path(entry["image"]).parent == tmp_path / "images" and Path(entry["image"]).is_file()
            assert Path(entry["label"]).parent == tmp_path / "labels" and Path(entry["label"]).is_file()


def test_datalist_missing_split_is_empty_and_bad_input_raises(tmp_path):
    _write_pngs(tmp_path, ["a"])
    path = write_datalist(tmp_path / "d.json", {"training": datalist_entries({"training": ["a"]})["training"]})
    assert json.loads(path.read_text()) == {
        "training": [{"image": "images/a.png", "label": "labels/a.png"}],
        "validation": [],
        "test": [],
    }
    with pytest.raises(DatasetError, match="missing files"):
        write_datalist(tmp_path / "d.json", datalist_entries({"training": ["b"]}))
    with pytest.raises(DatasetError, match="unknown datalist split keys"):
        write_datalist(tmp_path / "d.json", {"train": []})
    with pytest.raises(DatasetError, match="needs both"):
        write_datalist(tmp_path / "d.json", {"training": [{"image": "images/a.png"}]})


# ---------------------------------------------------------------------------------------------------------------------
# output folder


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    check_output_dir(out)  # missing is fine
    out.mkdir()
    (out / "unrelated.txt").write_text("kept")
    check_output_dir(out)  # unrelated files are fine
    (out / "datalist.json").write_text("{}")
    with pytest.raises(DatasetError, match=rf"output folder {out} .*overwrite=True \(--overwrite"):
        check_output_dir(out)
    check_output_dir(out, overwrite=True)


def test_staged_output_moves_files_in_and_clears_stale_ones_on_overwrite(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as staging:
        _write_pngs(staging, ["old"])
        (staging / "datalist.json").write_text("{}")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["old.png"]
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json", "images", "labels"]
    with pytest.raises(DatasetError, match="already holds"):
        with staged_output(out):
            pass
    with staged_output(out, overwrite=True) as staging:
        _write_pngs(staging, ["new"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["new.png"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["new.png"]
    assert not (out / "datalist.json").exists()


def test_staged_output_leaves_the_folder_untouched_on_error(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as staging:
        _write_pngs(staging, ["old"])
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True) as staging:
            _write_pngs(staging, ["new"])
            raise RuntimeError("failed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["old.png"]
    fresh = tmp_path / "fresh" / "data"
    with pytest.raises(RuntimeError):
        with staged_output(fresh):
            raise RuntimeError("failed at once")
    assert not fresh.exists()


def test_staged_output_with_a_relative_folder_writes_a_datalist_that_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with staged_output("out/data") as staging:
        assert staging.is_absolute()
        image = save_png(np.zeros((4, 4), np.uint8), staging / IMAGES_DIR / "a.png")
        label = save_png(np.zeros((4, 4), np.uint8), staging / LABELS_DIR / "a.png")
        write_datalist(staging / DATALIST_NAME, {"training": [{"image": image, "label": label}]})
    entry = json.loads((tmp_path / "out" / "data" / DATALIST_NAME).read_text())["training"][0]
    assert entry == {"image": "images/a.png", "label": "labels/a.png"}
