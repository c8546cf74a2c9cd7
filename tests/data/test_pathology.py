"""Tests of the pathology tile preparation (MoNuSeg releases, generic tiles), on small fixtures and on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from kd_components.data.common import SPLIT_KEYS, DatasetError, DatasetWarning
from kd_components.data.pathology import (
    find_monuseg,
    main,
    parse_aperio_xml,
    prepare_pathology_data,
    rasterise_polygons,
    read_tile_label,
)

REAL_MONUSEG = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "MoNuSeg"
SIZE = (64, 80)  # (H, W)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures in the official layouts


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> np.ndarray:
    """``(n, 2)`` (x, y) vertices of an ellipse."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _xml(polygons: list[np.ndarray], degenerate: int = 0) -> str:
    """Aperio ImageScope XML as in MoNuSeg: attribute headers, then one Region per nucleus."""
    regions = []
    for i, points in enumerate(polygons, start=1):
        vertices = "".join(f'<Vertex X="{x:.4f}" Y="{y:.4f}" Z="0" />' for x, y in points)
        regions.append(f'<Region Id="{i}" Type="0"><Attributes/><Vertices>{vertices}</Vertices></Region>')
    for j in range(degenerate):
        regions.append(
            f'<Region Id="{100 + j}"><Vertices><Vertex X="3" Y="3"/><Vertex X="5" Y="4"/></Vertices></Region>'
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?><Annotations MicronsPerPixel="0.252000"><Annotation Id="1">'
        '<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes><Regions><RegionAttributeHeaders>'
        '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/></RegionAttributeHeaders>'
        + "".join(regions)
        + "</Regions><Plots/></Annotation></Annotations>"
    )


def _tile(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)


def make_monuseg(
    image_dir: Path, xml_dir: Path, stems: list[str], seed: int = 0, degenerate: int = 1
) -> dict[str, list[np.ndarray]]:
    """TIFF tiles + XML annotations (a few ellipse nuclei, one overlapping pair, ``degenerate`` 2-vertex regions)."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    xml_dir.mkdir(parents=True, exist_ok=True)
    polygons = {}
    for stem in stems:
        nuclei = [
            _ellipse(rng.uniform(12, 68), rng.uniform(12, 52), rng.uniform(4, 8), rng.uniform(4, 8)) for _ in "ab"
        ]
        nuclei.append(nuclei[0] + (3.0, 2.0))  # overlaps the first one
        tifffile.imwrite(image_dir / f"{stem}.tif", _tile(rng), photometric="rgb")
        (xml_dir / f"{stem}.xml").write_text(_xml(nuclei, degenerate))
        polygons[stem] = nuclei
    return polygons


def make_monuseg_train(root: Path, stems=("TCGA-A1", "TCGA-A2", "TCGA-A3", "TCGA-A4", "TCGA-A5")) -> Path:
    """Official training release, nested twice as the zip unpacks: returns the outer folder."""
    inner = root / "MoNuSeg 2018 Training Data" / "MoNuSeg 2018 Training Data"
    make_monuseg(inner / "Tissue Images", inner / "Annotations", list(stems))
    return root / "MoNuSeg 2018 Training Data"


def make_monuseg_test(root: Path, stems=("TCGA-T1", "TCGA-T2")) -> Path:
    """Official test release: TIFF and XML in one folder."""
    make_monuseg(root / "MoNuSegTestData", root / "MoNuSegTestData", list(stems), seed=1, degenerate=0)
    return root / "MoNuSegTestData"


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_rasterised(root: Path, n: int = 4) -> dict[str, np.ndarray]:
    """The shared copy's layout: images/*.png + masks/*.png (0/255)."""
    rng = np.random.default_rng(2)
    truth = {}
    for i in range(n):
        mask = np.zeros(SIZE, np.uint8)
        mask[10 + i : 30 + i, 20:40] = 1
        _png(root / "images" / f"TCGA-R{i}.png", _tile(rng))
        _png(root / "masks" / f"TCGA-R{i}.png", mask * 255)
        truth[f"TCGA-R{i}"] = mask
    return truth


def _label(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / "labels" / f"{name}.png"))


def _datalist(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def _names(datalist: dict, key: str) -> list[str]:
    return [Path(e["image"]).stem for e in datalist[key]]


# ---------------------------------------------------------------------------------------------------------------------
# rasterisation


@pytest.mark.parametrize("radius", [4.0, 7.0, 15.0])
def test_rasterised_area_is_close_to_the_analytic_area(radius):
    rng = np.random.default_rng(int(radius))
    for _ in range(5):
        points = _ellipse(rng.uniform(30, 34), rng.uniform(30, 34), radius, radius * 1.3, n=40)
        area, perimeter = (
            _shoelace(points),
            float(np.linalg.norm(np.diff(points, axis=0, append=points[:1]), axis=1).sum()),
        )
        mask, instances = rasterise_polygons([points], (64, 64))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert abs(mask.sum() - area) <= 0.06 * area
        assert np.array_equal(instances > 0, mask > 0)
        plain, _ = rasterise_polygons([points], (64, 64), supersample=1)  # PIL's fill includes the edge pixels
        assert abs(plain.sum() - (area + perimeter / 2 + 1)) <= 0.05 * area + 2


def test_axis_aligned_rectangle_is_exact_and_plain_fill_includes_the_edges():
    rectangle = np.array([[10, 10], [20, 10], [20, 25], [10, 25]], dtype=float)
    mask, _ = rasterise_polygons([rectangle], (40, 40))
    assert mask.sum() == 150
    plain, _ = rasterise_polygons([rectangle], (40, 40), supersample=1)
    assert plain.sum() == 11 * 16 and plain[10, 10] == 1 and plain[25, 20] == 1


def test_overlaps_merge_in_the_mask_and_the_earlier_region_keeps_shared_pixels():
    a = np.array([[5, 5], [15, 5], [15, 15], [5, 15]], dtype=float)
    mask, instances = rasterise_polygons([a, a + 5, a + 100], (30, 30))  # the third is outside the image
    assert mask.sum() == 100 + 100 - 25
    assert instances[12, 12] == 1 and instances[18, 18] == 2 and set(np.unique(instances)) == {0, 1, 2}


def test_parse_aperio_xml_counts_regions_and_skips_degenerate_ones(tmp_path):
    polygons = [_ellipse(20, 20, 5, 6), _ellipse(40, 30, 4, 4)]
    path = tmp_path / "a.xml"
    path.write_text(_xml(polygons, degenerate=2))
    parsed, skipped = parse_aperio_xml(path)
    assert skipped == 2 and len(parsed) == 2
    np.testing.assert_allclose(parsed[0], polygons[0], atol=1e-4)


@pytest.mark.parametrize(
    "text, match",
    [
        ("<Annotations><Annotation><Regions><Region>", r"bad\.xml: not well-formed XML at line 1"),
        ("<Annotations><Annotation/></Annotations>", r"bad\.xml: no <Regions> element"),
        (
            '<Annotations><Annotation><Regions><Region Id="7"><Vertices><Vertex X="1" Y="2"/><Vertex X="a" Y="2"/>'
            '<Vertex X="1" Y="5"/></Vertices></Region></Regions></Annotation></Annotations>',
            r"bad\.xml: <Region Id='7'> \(region 1\), vertex 2 has X='a'",
        ),
        (
            '<Annotations><Annotation><Regions><Region Id="3"><Vertices><Vertex Y="2"/></Vertices></Region>'
            "</Regions></Annotation></Annotations>",
            r"bad\.xml: <Region Id='3'> \(region 1\), vertex 1 has X=None",
        ),
    ],
    ids=["truncated", "no-regions", "bad-number", "missing-attribute"],
)
def test_malformed_xml_names_the_file_and_the_element(tmp_path, text, match):
    path = tmp_path / "bad.xml"
    path.write_text(text)
    with pytest.raises(DatasetError, match=match):
        parse_aperio_xml(path)


# ---------------------------------------------------------------------------------------------------------------------
# MoNuSeg releases


def test_official_training_release_is_rasterised_and_split(tmp_path):
    root = make_monuseg_train(tmp_path)
    inner = root / "MoNuSeg 2018 Training Data"
    source = find_monuseg(tmp_path)
    assert source.layout == "xml" and source.image_dir == inner / "Tissue Images"
    out = tmp_path / "out"
    with pytest.warns(
        DatasetWarning, match=r"skipped 5 annotation region\(s\) with fewer than 3 vertices \(no area\) in 5 file"
    ):
        prepare_pathology_data(out, monuseg_dir=root, instances=True)
    data = _datalist(out)
    names = sorted(n for key in SPLIT_KEYS for n in _names(data, key))
    assert names == [f"monuseg_TCGA-A{i}" for i in range(1, 6)]
    assert [len(data[key]) for key in SPLIT_KEYS] == [3, 1, 1]
    assert data["metadata"]["skipped_regions"] == 5 and data["metadata"]["labels"] == {
        "0": "background",
        "1": "nucleus",
    }
    for stem in ("TCGA-A1", "TCGA-A4"):
        nuclei, _ = parse_aperio_xml(inner / "Annotations" / f"{stem}.xml")
        label = _label(out, f"monuseg_{stem}")
        expected, instances = rasterise_polygons(nuclei, SIZE)
        assert label.shape == SIZE and label.dtype == np.uint8
        np.testing.assert_array_equal(label, expected)
        union = sum(_shoelace(p) for p in nuclei[:2])  # the third overlaps the first: bounded by the sum
        assert 0.9 * max(_shoelace(p) for p in nuclei) < label.sum() <= 1.04 * (union + _shoelace(nuclei[2]))
        saved = np.asarray(Image.open(out / "instances" / f"monuseg_{stem}.png"))
        np.testing.assert_array_equal(saved, instances)
        image = np.asarray(Image.open(out / "images" / f"monuseg_{stem}.png"))
        np.testing.assert_array_equal(image, tifffile.imread(inner / "Tissue Images" / f"{stem}.tif"))


def test_training_and_test_releases_give_the_official_test_split(tmp_path):
    train, test = make_monuseg_train(tmp_path), make_monuseg_test(tmp_path)
    out = tmp_path / "out"
    with pytest.warns(DatasetWarning):
        prepare_pathology_data(out, monuseg_dir=train, monuseg_test_dir=test)
    data = _datalist(out)
    assert _names(data, "test") == ["monuseg_TCGA-T1", "monuseg_TCGA-T2"]
    assert sorted(_names(data, "training") + _names(data, "validation")) == [f"monuseg_TCGA-A{i}" for i in range(1, 6)]
    assert len(data["validation"]) >= 1 and not (out / "instances").exists()
    # a parent holding both releases is ambiguous
    with pytest.raises(DatasetError, match="several dataset folders.*--monuseg-test"):
        find_monuseg(tmp_path)


def test_test_names_fix_the_test_split_and_split_is_seeded(tmp_path):
    root = make_monuseg_train(tmp_path)
    splits = []
    for seed in (0, 0, 3):
        out = tmp_path / f"out{len(splits)}"
        with pytest.warns(DatasetWarning):
            prepare_pathology_data(out, monuseg_dir=root, test_names=["TCGA-A2", "monuseg_TCGA-A5"], seed=seed)
        data = _datalist(out)
        assert _names(data, "test") == ["monuseg_TCGA-A2", "monuseg_TCGA-A5"]
        splits.append([_names(data, key) for key in SPLIT_KEYS])
    assert splits[0] == splits[1]
    with pytest.raises(DatasetError, match="test name 'TCGA-Z9' is not one of the prepared tiles"):
        with pytest.warns(DatasetWarning):
            prepare_pathology_data(tmp_path / "bad", monuseg_dir=root, test_names=["TCGA-Z9"])


def test_rasterised_copy_layout_and_max_size(tmp_path):
    truth = make_rasterised(tmp_path / "MoNuSeg")
    out = tmp_path / "out"
    prepare_pathology_data(out, monuseg_dir=tmp_path / "MoNuSeg")
    for stem, mask in truth.items():
        np.testing.assert_array_equal(_label(out, f"monuseg_{stem}"), mask)
    small = tmp_path / "small"
    prepare_pathology_data(small, monuseg_dir=tmp_path / "MoNuSeg", max_size=40)
    label = _label(small, "monuseg_TCGA-R0")
    assert label.shape == (32, 40) and set(np.unique(label)) == {0, 1}
    assert abs(label.sum() - truth["TCGA-R0"].sum() / 4) <= 12
    with pytest.raises(DatasetError, match="instance maps need XML polygon annotations"):
        prepare_pathology_data(tmp_path / "x", monuseg_dir=tmp_path / "MoNuSeg", instances=True)


# ---------------------------------------------------------------------------------------------------------------------
# generic tiles


def test_generic_tiles_binary_and_multiclass(tmp_path):
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 3, SIZE).astype(np.uint8)
    _png(tmp_path / "gastric" / "images" / "t1.png", _tile(rng))
    Image.fromarray(_tile(rng)).save(tmp_path / "gastric" / "images" / "t2.jpg", quality=95)
    tifffile.imwrite(tmp_path / "gastric" / "images" / "t3.tif", _tile(rng), photometric="rgb")
    _png(tmp_path / "gastric" / "masks" / "t1.png", classes)
    palette = Image.fromarray(classes, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "gastric" / "masks" / "t2.png")
    tifffile.imwrite(tmp_path / "gastric" / "masks" / "t3.tif", classes)
    out = tmp_path / "out"
    prepare_pathology_data(out, tiles_dir=tmp_path / "gastric", num_classes=3, tiles_name="gastric")
    for stem in ("t1", "t2", "t3"):
        np.testing.assert_array_equal(_label(out, f"gastric_{stem}"), classes)
    data = _datalist(out)
    assert data["metadata"]["num_classes"] == 3 and data["metadata"]["name"] == "gastric"
    small = tmp_path / "small"
    prepare_pathology_data(small, tiles_dir=tmp_path / "gastric", num_classes=3, max_size=40)
    assert _label(small, "tiles_t1").shape == (32, 40) and _label(small, "tiles_t1").max() == 2
    # the same masks read as binary: 0/1/2 is not a binary mask, and the message says what to pass
    with pytest.raises(DatasetError, match=r"masks.t1\.png holds the values 0, 1, 2.*--num-classes"):
        prepare_pathology_data(tmp_path / "binary", tiles_dir=tmp_path / "gastric")
    with pytest.raises(DatasetError, match=r"t1\.png holds labels 2 outside 0\.\.1 \(num_classes=2\)"):
        prepare_pathology_data(tmp_path / "two", tiles_dir=tmp_path / "gastric", num_classes=2)


def test_read_tile_label_binary_encodings(tmp_path):
    mask = np.zeros(SIZE, np.uint8)
    mask[5:20, 5:30] = 1
    for name, array in (("a.png", mask), ("b.png", mask * 255), ("c.png", np.stack([mask * 255] * 3, -1))):
        _png(tmp_path / name, array)
        np.testing.assert_array_equal(read_tile_label(tmp_path / name), mask)
    Image.fromarray(mask * 255).save(tmp_path / "d.jpg", quality=50)
    np.testing.assert_array_equal(read_tile_label(tmp_path / "d.jpg"), mask)
    with pytest.raises(DatasetError, match=r"d\.jpg: class-index masks must be lossless"):
        read_tile_label(tmp_path / "d.jpg", num_classes=3)


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_missing_folder_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match=rf"MoNuSeg folder {tmp_path / 'nope'} does not exist"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=tmp_path / "nope")
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match="does not have a known layout: expected .*Tissue Images"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=tmp_path / "empty")
    with pytest.raises(DatasetError, match="pass exactly one input"):
        prepare_pathology_data(tmp_path / "out")


def test_image_without_xml_and_xml_without_image_are_named(tmp_path):
    root = make_monuseg_train(tmp_path)
    inner = root / "MoNuSeg 2018 Training Data"
    (inner / "Annotations" / "TCGA-A2.xml").unlink()
    (inner / "Annotations" / "TCGA-Z9.xml").write_text(_xml([]))
    with pytest.raises(DatasetError, match=r"(?s)have no mask: TCGA-A2\.tif.*have no image: TCGA-Z9\.xml"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=root)
    assert not (tmp_path / "out").exists()


def test_malformed_xml_and_unreadable_tiff_fail_the_preparation(tmp_path):
    root = make_monuseg_train(tmp_path)
    inner = root / "MoNuSeg 2018 Training Data"
    (inner / "Annotations" / "TCGA-A3.xml").write_text("<Annotations><Regions>")
    with pytest.raises(DatasetError, match=r"malformed annotation .*TCGA-A3\.xml: not well-formed XML"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=root)
    make_monuseg(inner / "Tissue Images", inner / "Annotations", ["TCGA-A3"])
    (inner / "Tissue Images" / "TCGA-A4.tif").write_bytes(b"II*\x00 this is not a TIFF")
    with pytest.raises(DatasetError, match=r"TCGA-A4\.tif"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=root)
    assert not (tmp_path / "out").exists()


def test_empty_dataset_and_existing_output(tmp_path):
    for sub in ("Tissue Images", "Annotations"):
        (tmp_path / "MoNuSeg" / sub).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"Tissue Images holds no \.tif/\.tiff files \(it is empty\)"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=tmp_path / "MoNuSeg")
    make_rasterised(tmp_path / "raster", n=2)
    prepare_pathology_data(tmp_path / "out", monuseg_dir=tmp_path / "raster")
    with pytest.raises(DatasetError, match="already holds prepared data.*--overwrite"):
        prepare_pathology_data(tmp_path / "out", monuseg_dir=tmp_path / "raster")
    prepare_pathology_data(tmp_path / "out", monuseg_dir=tmp_path / "raster", overwrite=True)


def test_command_line(tmp_path, capsys):
    make_rasterised(tmp_path / "raster", n=3)
    (tmp_path / "test.txt").write_text("# held out\nTCGA-R1\n")
    out = tmp_path / "out"
    assert (
        main(["--monuseg", str(tmp_path / "raster"), "--out", str(out), "--test-list", str(tmp_path / "test.txt")]) == 0
    )
    assert capsys.readouterr().out.strip() == str(out / "datalist.json")
    assert _names(_datalist(out), "test") == ["monuseg_TCGA-R1"]
    assert main(["--tiles", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "tiles folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# real data


def test_real_monuseg_subset_loads_with_monai(tmp_path):
    if not (REAL_MONUSEG / "images").is_dir():
        pytest.skip(f"real MoNuSeg not found at {REAL_MONUSEG}")
    stems = sorted(p.stem for p in (REAL_MONUSEG / "images").glob("*.png"))[:3]
    for sub in ("images", "masks"):
        (tmp_path / "MoNuSeg" / sub).mkdir(parents=True)
        for stem in stems:
            (tmp_path / "MoNuSeg" / sub / f"{stem}.png").symlink_to(REAL_MONUSEG / sub / f"{stem}.png")
    out = tmp_path / "out"
    prepare_pathology_data(out, monuseg_dir=tmp_path / "MoNuSeg")
    transform = Compose([LoadImaged(("image", "label")), EnsureChannelFirstd(("image", "label"))])
    count = 0
    for key in SPLIT_KEYS:
        for entry in load_decathlon_datalist(str(out / "datalist.json"), True, key):
            data = transform(entry)
            assert data["image"].shape == (3, 1000, 1000) and data["label"].shape == (1, 1000, 1000)
            stem = Path(entry["label"]).stem.removeprefix("monuseg_")
            original = np.asarray(Image.open(REAL_MONUSEG / "masks" / f"{stem}.png"))
            assert set(np.unique(data["label"].numpy())) == {0.0, 1.0}
            assert int(data["label"].sum()) == int((original == 255).sum()) > 0
            count += 1
    assert count == 3
