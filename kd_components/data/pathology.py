"""Prepare H&E pathology tiles (MoNuSeg 2018, or any image/mask tile set) for the CoCo DistillNet bundle.

Input layouts (the folder given, or the single folder below it, up to three levels down, that has the layout):

- MoNuSeg 2018 official training release (``MoNuSeg 2018 Training Data/``): ``Tissue Images/*.tif`` (RGB TIFF,
  1000x1000) and ``Annotations/*.xml`` (Aperio ImageScope XML, one ``Region`` polygon per nucleus) with the same
  stems; the polygons are rasterised here (see below).
- MoNuSeg 2018 official test release (``MoNuSegTestData/``): the ``*.tif`` images and ``*.xml`` annotations in one
  folder.
- Already rasterised (as the shared copy in ``datasets/MoNuSeg``): ``images/*.png`` + ``masks/*.png`` (0/255).
- Generic tiles (for example the gastric-cancer tiles of the CoCo paper): ``images/`` + ``masks/`` (or
  ``labels/``) with matching stems, any of PNG / JPEG / TIFF / BMP. Masks are binary (0/255 or 0/1; lossy JPEG
  masks are thresholded at ``> 127``) or, with ``num_classes``, class indices ``0 .. num_classes - 1`` (grey or
  palette PNG/TIFF).

Output layout (see :mod:`kd_components.data.common`)::

    <out>/images/<dataset>_<stem>.png      RGB uint8, full size (the bundle trains on patches and infers with a
                                           sliding window); ``max_size`` shrinks larger tiles
    <out>/labels/<dataset>_<stem>.png      uint8, 0 = background, 1 = nucleus (or class indices)
    <out>/instances/<dataset>_<stem>.png   optional (``instances=True``, XML input only): uint16 nucleus ids,
                                           0 = background, i = the i-th region of the XML
    <out>/datalist.json                    training / validation / test, plus a "metadata" object

``<dataset>`` is ``monuseg`` or the ``tiles_name`` given for generic tiles.

Polygon rasterisation. Vertex ``X``/``Y`` are taken as 0-based pixel coordinates with pixel centres at integer
positions (as PIL, scikit-image and OpenCV use them). Each polygon is drawn with ``PIL.ImageDraw.polygon`` on a
``supersample`` times finer grid over its bounding box; PIL fills every sub-pixel whose centre lies inside the polygon
*or on its edges*. A pixel is nucleus when strictly more than half of its ``supersample x supersample`` sub-pixels are
filled, i.e. when the polygon covers more than half of it. With the default ``supersample=4`` the area of a
nucleus-sized polygon (radius 5-20 px) comes out within about 1-3 % of its analytic (shoelace) area. With
``supersample=1`` this is PIL's plain fill, which includes the boundary pixels: area about
``A + perimeter / 2 + 1``, i.e. nuclei some 10-20 % larger than annotated. Overlapping nuclei are merged in the binary
mask; in the instance map the earlier region keeps the shared pixels (as the organisers' MATLAB code does). Regions
with fewer than 3 vertices are skipped with a :class:`~kd_components.data.common.DatasetWarning` that counts them.

Split: seeded, file-name based (:func:`kd_components.data.common.split_names`). With ``monuseg_test_dir`` (the
official test release) or ``test_names`` the test split is fixed and the rest is split into training and validation
with the training and validation fractions renormalised
(:func:`kd_components.data.common.split_names_fixed`).

Command line::

    python -m kd_components.data.pathology --monuseg TRAIN_DIR [--monuseg-test TEST_DIR] [--instances] --out DIR
    python -m kd_components.data.pathology --tiles DIR [--num-classes N] --out DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_components.data.cli import preparer_parser, run_preparer, shared_arguments
from kd_components.data.common import (
    DATALIST_NAME,
    DEFAULT_FRACTIONS,
    IMAGES_DIR,
    LABELS_DIR,
    ROLE_CHECKS,
    DatasetError,
    DatasetWarning,
    check_image_and_mask_roles,
    datalist_entries,
    find_layouts,
    format_names,
    list_files,
    pair_by_stem,
    save_png,
    split_names_fixed,
    staged_output,
    write_datalist,
)
from kd_components.data.polyp import _read_any, read_image, resize_pair

__all__ = [
    "INSTANCES_DIR",
    "PathologySource",
    "find_monuseg",
    "find_tiles",
    "main",
    "parse_aperio_xml",
    "prepare_pathology_data",
    "rasterise_polygons",
    "read_tile_label",
]

logger = logging.getLogger(__name__)

INSTANCES_DIR = "instances"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
LOSSY_EXTENSIONS = (".jpg", ".jpeg")
TISSUE_DIR_NAMES = ("Tissue Images", "Tissue_Images", "TissueImages")
ANNOTATION_DIR_NAMES = ("Annotations",)
MASK_DIR_NAMES = ("masks", "labels")
#: how deep below the given folder the layouts are searched
SEARCH_DEPTH = 3
MONUSEG_LABELS = {"0": "background", "1": "nucleus"}


@dataclass(frozen=True)
class PathologySource:
    """One input folder and how its annotations are stored.

    Args:
        dataset: output name prefix (``monuseg`` or the name given for generic tiles).
        layout: ``"xml"`` (Aperio XML polygons) or ``"masks"`` (mask images).
        image_dir: folder of the images.
        annotation_dir: folder of the XML files or masks (the same as ``image_dir`` for the MoNuSeg test layout).
        description: the layout, for messages and the datalist metadata.
    """

    dataset: str
    layout: str
    image_dir: Path
    annotation_dir: Path
    description: str


# ----------------------------------------------------------------------------------------------------------------------
# locating the layouts


def _child(folder: Path, names: Sequence[str]) -> Path | None:
    """The child folder of ``folder`` named one of ``names`` (case-insensitive), if any."""
    wanted = {n.lower() for n in names}
    matches = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() in wanted)
    return matches[0] if matches else None


def _has_files(folder: Path, extensions: Sequence[str]) -> bool:
    """Whether ``folder`` directly holds a visible file with one of ``extensions``."""
    return any(p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions for p in folder.iterdir())


def _monuseg_layout(folder: Path) -> PathologySource | None:
    """The MoNuSeg layout held directly by ``folder``, if any."""
    tissue, annotations = _child(folder, TISSUE_DIR_NAMES), _child(folder, ANNOTATION_DIR_NAMES)
    if tissue is not None and annotations is not None:
        return PathologySource("monuseg", "xml", tissue, annotations, "MoNuSeg official training release")
    images, masks = _child(folder, ("images",)), _child(folder, MASK_DIR_NAMES)
    if images is not None and masks is not None:
        return PathologySource("monuseg", "masks", images, masks, "rasterised MoNuSeg (images/ + masks/)")
    if _has_files(folder, TIFF_EXTENSIONS) and _has_files(folder, (".xml",)):
        return PathologySource("monuseg", "xml", folder, folder, "MoNuSeg official test release")
    return None


def _find(path: Path, detect: Callable[[Path], PathologySource | None], what: str, expected: str) -> PathologySource:
    """The layout found by ``detect`` in ``path`` or, when unambiguous, in one folder below it."""
    found = find_layouts(path, detect, what, SEARCH_DEPTH)
    if len(found) == 1:
        return found[0]
    if found:
        roots = [str(s.image_dir if s.image_dir == s.annotation_dir else s.image_dir.parent) for s in found]
        raise DatasetError(
            f"{what}: several dataset folders under {path} ({format_names(roots)}); pass one of them (for MoNuSeg, "
            "the training release with --monuseg and the test release with --monuseg-test)."
        )
    raise DatasetError(f"{what} folder {path} does not have a known layout: expected {expected}; pass that folder.")


def find_monuseg(path: str | os.PathLike) -> PathologySource:
    """Locate a MoNuSeg release in ``path`` or in the single folder below it (up to three levels) that holds one.

    Recognised: the official training release (``Tissue Images/`` + ``Annotations/``), the official test release
    (``*.tif`` + ``*.xml`` in one folder) and an already rasterised copy (``images/`` + ``masks/``).

    Args:
        path: the release folder or a folder it was unpacked into.

    Raises:
        DatasetError: when the folder is missing, holds none of the layouts, or holds several.
    """
    path = Path(path)
    expected = (
        f"{path}/Tissue Images/ + {path}/Annotations/ (training release), *.tif + *.xml in {path} (test release), "
        f"or {path}/images/ + {path}/masks/ (rasterised)"
    )
    return _find(path, _monuseg_layout, "MoNuSeg", expected)


def find_tiles(path: str | os.PathLike, name: str = "tiles") -> PathologySource:
    """Locate a generic tile set, ``images/`` + ``masks/`` (or ``labels/``), in ``path`` or the single folder below.

    Args:
        path: the dataset folder or a folder it was unpacked into.
        name: output name prefix of the tiles.

    Raises:
        DatasetError: when the folder is missing, lacks the layout, or holds several candidates.
    """
    path = Path(path)

    def detect(folder: Path) -> PathologySource | None:
        images, masks = _child(folder, ("images",)), _child(folder, MASK_DIR_NAMES)
        if images is None or masks is None:
            return None
        return PathologySource(name, "masks", images, masks, "image/mask tiles")

    return _find(path, detect, "tiles", f"{path}/images/ + {path}/masks/ (or labels/) with matching file names")


# ----------------------------------------------------------------------------------------------------------------------
# XML polygons


def _coordinate(vertex: ET.Element, axis: str, where: str, path: Path) -> float:
    """The ``X`` or ``Y`` attribute of a ``Vertex`` as a finite float."""
    raw = vertex.get(axis)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value):
        raise DatasetError(
            f"malformed annotation {path}: {where} has {axis}={raw!r} (expected a number); fix or re-download the "
            "XML file, or remove it and its image."
        )
    return value


def parse_aperio_xml(path: str | os.PathLike) -> tuple[list[np.ndarray], int]:
    """Read the nucleus polygons of an Aperio ImageScope XML annotation (MoNuSeg).

    Every ``Region`` under ``Annotations/Annotation/Regions`` is one polygon, given by its ``Vertices/Vertex``
    elements' ``X`` and ``Y`` attributes (pixels). Regions with fewer than 3 vertices (no area) are skipped and
    counted.

    Args:
        path: the XML file.

    Returns:
        ``(polygons, skipped)``: a list of ``(N, 2)`` float64 ``(x, y)`` arrays in file order, and the number of
        regions skipped for having fewer than 3 vertices.

    Raises:
        DatasetError: naming the file (and the element) when it is not well-formed XML, has no ``Regions`` element, or
            a vertex lacks a numeric ``X``/``Y``.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        raise DatasetError(
            f"malformed annotation {path}: not well-formed XML at line {line}, column {column} ({err}); re-download "
            "the annotation, or remove it and its image."
        ) from err
    except OSError as err:
        raise DatasetError(f"cannot read annotation {path} ({err}).") from err
    if root.tag != "Regions" and root.find(".//Regions") is None:
        raise DatasetError(
            f"malformed annotation {path}: no <Regions> element under <{root.tag}>; expected Aperio ImageScope XML "
            "(Annotations/Annotation/Regions/Region/Vertices/Vertex X= Y=)."
        )
    polygons, skipped = [], 0
    for index, region in enumerate(root.iter("Region"), start=1):
        where = f"<Region Id={region.get('Id', '?')!r}> (region {index})"
        vertices = [v for v in region.iter("Vertex")]
        points = [
            (
                _coordinate(v, "X", f"{where}, vertex {i}", path),
                _coordinate(v, "Y", f"{where}, vertex {i}", path),
            )
            for i, v in enumerate(vertices, start=1)
        ]
        if len(points) < 3:
            skipped += 1
            continue
        polygons.append(np.asarray(points, dtype=np.float64))
    return polygons, skipped


def _polygon_crop(points: np.ndarray, shape: tuple[int, int], supersample: int) -> tuple[int, int, np.ndarray] | None:
    """``(y0, x0, covered)``: the pixels of the polygon's bounding box (clipped to ``shape``) covered by > 1/2."""
    from PIL import Image, ImageDraw

    height, width = shape
    x0, y0 = max(int(np.floor(points[:, 0].min())) - 1, 0), max(int(np.floor(points[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(points[:, 0].max())) + 1, width - 1)
    y1 = min(int(np.ceil(points[:, 1].max())) + 1, height - 1)
    if x1 < x0 or y1 < y0:
        return None  # entirely outside the image
    crop_w, crop_h = x1 - x0 + 1, y1 - y0 + 1
    canvas = Image.new("L", (crop_w * supersample, crop_h * supersample), 0)
    # pixel (x0, y0)'s centre is at fine coordinate (supersample - 1) / 2: fine = (x - x0 + 1/2) * s - 1/2
    fine = (points - (x0, y0) + 0.5) * supersample - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in fine.tolist()], fill=1)
    filled = np.asarray(canvas)
    if supersample > 1:
        filled = filled.reshape(crop_h, supersample, crop_w, supersample).sum(axis=(1, 3)) * 2 > supersample**2
    return y0, x0, filled.astype(bool)


def rasterise_polygons(
    polygons: Sequence[np.ndarray], shape: tuple[int, int], supersample: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise polygons into a binary mask and an instance map (see the module docstring for the fill rule).

    Args:
        polygons: ``(N, 2)`` ``(x, y)`` vertex arrays in pixels (pixel centres at integers), N >= 3.
        shape: ``(height, width)`` of the image.
        supersample: sub-pixels per pixel side; a pixel is inside when more than half of its sub-pixels are filled
            by ``PIL.ImageDraw.polygon``. 1 is PIL's plain fill, which includes the pixels on the polygon's edges.

    Returns:
        ``(mask, instances)``: uint8 ``(H, W)`` 0/1 union of the polygons, and int32 ``(H, W)`` instance ids (i + 1
        for ``polygons[i]``; where polygons overlap the earlier one keeps the pixel).
    """
    if supersample < 1:
        raise DatasetError(f"supersample must be a positive integer, got {supersample}.")
    instances = np.zeros(shape, dtype=np.int32)
    for number, points in enumerate(polygons, start=1):
        crop = _polygon_crop(np.asarray(points, dtype=np.float64), shape, supersample)
        if crop is None:
            continue
        y0, x0, covered = crop
        window = instances[y0 : y0 + covered.shape[0], x0 : x0 + covered.shape[1]]
        window[covered & (window == 0)] = number
    return (instances > 0).astype(np.uint8), instances


# ----------------------------------------------------------------------------------------------------------------------
# mask images


def _read_label_pixels(path: Path) -> np.ndarray:
    """Decode a mask image to ``(H, W)`` integers: palette indices stay indices, grey RGB collapses to one channel."""
    from PIL import Image

    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            import tifffile

            array = np.asarray(tifffile.imread(path, key=0))
        else:
            with Image.open(path) as image:
                image.load()
                array = np.asarray(image.convert("L") if image.mode == "1" else image)
    except Exception as err:
        raise DatasetError(
            f"cannot read mask file {path} ({type(err).__name__}: {err}); it is corrupt, truncated or not an image: "
            "re-export it, or remove it and its image."
        ) from err
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] not in (3, 4):
        rgb = array[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            return np.round(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.int64)
        array = rgb[..., 0]
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[:2] if array.shape[-1] == 1 else array.shape[1:])
    if array.ndim != 2 or min(array.shape) == 0:
        raise DatasetError(f"mask {path}: expected a 2D grey or indexed image, got an array of shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        if not np.array_equal(array, np.round(array)):
            raise DatasetError(
                f"mask {path}: non-integer values ({array.dtype}); masks must hold 0/255, 0/1 or classes."
            )
    return array.astype(np.int64)


def read_tile_label(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """Read a tile's mask as ``(H, W)`` uint8 labels.

    Binary (``num_classes`` None or 2): 0/255 and 0/1 masks give 0/1; lossy (JPEG) masks and RGB masks are converted
    to grey and thresholded at ``> 127``. Multi-class (``num_classes`` > 2): grey or palette values are the class
    indices and must lie in ``0 .. num_classes - 1``.

    Args:
        path: PNG / JPEG / TIFF / BMP mask.
        num_classes: number of classes including background; None for binary masks.

    Raises:
        DatasetError: naming the file when it cannot be read, or holds values that are not a binary mask (unless
            ``num_classes`` is given) or lie outside ``0 .. num_classes - 1``.
    """
    path = Path(path)
    values = _read_label_pixels(path)
    lossy = path.suffix.lower() in LOSSY_EXTENSIONS
    found = np.unique(values)
    if num_classes is None or num_classes == 2:
        if lossy:
            return (values > 127).astype(np.uint8)
        if set(found.tolist()) <= {0, 1}:
            return values.astype(np.uint8)
        if set(found.tolist()) <= {0, 255}:
            return (values == 255).astype(np.uint8)
        if num_classes is None:
            raise DatasetError(
                f"mask {path} holds the values {format_names(found.tolist())}, which is not a binary mask (0/255 or "
                "0/1); pass num_classes (--num-classes) for class-index masks, or fix the mask."
            )
    if lossy:
        raise DatasetError(f"mask {path}: class-index masks must be lossless (PNG / TIFF / BMP), not JPEG.")
    bad = found[(found < 0) | (found >= num_classes)]
    if bad.size:
        raise DatasetError(
            f"mask {path} holds labels {format_names(bad.tolist())} outside 0..{num_classes - 1} "
            f"(num_classes={num_classes}); pass the right --num-classes, or fix the mask."
        )
    return values.astype(np.uint8)


def _resize_labels(
    image: np.ndarray, label: np.ndarray, instances: np.ndarray | None, max_size: int | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Shrink a tile so its longest side is at most ``max_size``: binary labels as the polyp data, multi-class
    labels by a per-class vote on the same bilinear filter, instances by nearest neighbour."""
    from PIL import Image

    height, width = label.shape
    if max_size is None or max(height, width) <= max_size:
        return image, label, instances
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if num_classes <= 2:
        small_image, small_label = resize_pair(image, label, max_size)
    else:
        small_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        votes = [
            np.asarray(Image.fromarray((label == c).astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
            for c in range(num_classes)
        ]
        small_label = np.argmax(np.stack(votes), axis=0).astype(np.uint8)
    if instances is not None:
        instances = np.asarray(Image.fromarray(instances).resize(size, Image.Resampling.NEAREST))
    return small_image, small_label, instances


# ----------------------------------------------------------------------------------------------------------------------
# preparation


@dataclass(frozen=True)
class _Item:
    """One tile: output name, image file, annotation (XML or mask) file."""

    name: str
    image: Path
    annotation: Path


def _output_name(dataset: str, stem: str) -> str:
    """File-system friendly ``<dataset>_<stem>``."""
    return f"{dataset}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}"


def _items(source: PathologySource, limit: int | None) -> list[_Item]:
    """The image/annotation pairs of a source, sorted by stem (the first ``limit``)."""
    if source.layout == "xml":
        images = list_files(source.image_dir, TIFF_EXTENSIONS, f"{source.description} image")
        annotations = list_files(source.annotation_dir, (".xml",), f"{source.description} annotation")
    else:
        images = list_files(source.image_dir, IMAGE_EXTENSIONS, f"{source.description} image")
        annotations = list_files(source.annotation_dir, IMAGE_EXTENSIONS, f"{source.description} mask")
    pairs = pair_by_stem(images, annotations)
    return [_Item(_output_name(source.dataset, stem), image, ann) for stem, image, ann in pairs[:limit]]


@dataclass
class _Tally:
    """What a preparation counted, for warnings and the datalist metadata."""

    skipped_regions: int = 0
    skipped_files: list[str] | None = None
    empty: list[str] | None = None


def _annotation_to_label(
    item: _Item, shape: tuple[int, int], layout: str, num_classes: int | None, supersample: int, tally: _Tally
) -> tuple[np.ndarray, np.ndarray | None]:
    """The label (and, for XML, instance map) of one tile."""
    if layout == "xml":
        polygons, skipped = parse_aperio_xml(item.annotation)
        if skipped:
            tally.skipped_regions += skipped
            tally.skipped_files = [*(tally.skipped_files or []), f"{item.annotation.name} ({skipped})"]
        return rasterise_polygons(polygons, shape, supersample)
    label = read_tile_label(item.annotation, num_classes)
    if label.shape != shape:
        raise DatasetError(
            f"image {item.image} is {shape[1]}x{shape[0]} (WxH) but its mask {item.annotation} is "
            f"{label.shape[1]}x{label.shape[0]}; re-export the pair or remove both files."
        )
    return label, None


def _save_instances(instances: np.ndarray, path: Path) -> None:
    """Save an instance map as a 16-bit PNG."""
    from PIL import Image

    if instances.max(initial=0) > np.iinfo(np.uint16).max:
        raise DatasetError(f"{path.name}: more than 65535 instances do not fit a 16-bit PNG.")
    Image.fromarray(instances.astype(np.uint16)).save(path, compress_level=1)


def _prepare_source(
    source: PathologySource,
    staging: Path,
    num_classes: int | None,
    max_size: int | None,
    supersample: int,
    instances: bool,
    limit: int | None,
    tally: _Tally,
) -> list[_Item]:
    """Convert the tiles of one source into ``staging``; return its items."""
    items = _items(source, limit)
    logger.info("%s: %d tiles from %s", source.description, len(items), source.image_dir)
    for i, item in enumerate(items):
        if i < ROLE_CHECKS and source.layout != "xml":  # swapped image and mask folders
            check_image_and_mask_roles(
                _read_any(item.image),
                _read_label_pixels(item.annotation),
                item.image,
                item.annotation,
                source.image_dir,
                source.annotation_dir,
                swap_only=True,
            )
        image = read_image(item.image)
        label, instance_map = _annotation_to_label(
            item, image.shape[:2], source.layout, num_classes, supersample, tally
        )
        image, label, instance_map = _resize_labels(image, label, instance_map, max_size, num_classes or 2)
        if not label.any():
            tally.empty = [*(tally.empty or []), item.annotation.name]
        save_png(image, staging / IMAGES_DIR / f"{item.name}.png")
        save_png(label, staging / LABELS_DIR / f"{item.name}.png")
        if instances and instance_map is not None:
            _save_instances(instance_map, staging / INSTANCES_DIR / f"{item.name}.png")
    return items


def _warn(tally: _Tally, total: int) -> None:
    """Warn about skipped regions and all-background labels."""
    if tally.skipped_regions:
        warnings.warn(
            f"skipped {tally.skipped_regions} annotation region(s) with fewer than 3 vertices (no area) in "
            f"{len(tally.skipped_files or [])} file(s): {format_names(tally.skipped_files or [])}.",
            DatasetWarning,
            stacklevel=3,
        )
    if tally.empty:
        warnings.warn(
            f"{len(tally.empty)} of {total} labels are all background: {format_names(tally.empty)}; they are kept.",
            DatasetWarning,
            stacklevel=3,
        )


def _check_arguments(
    num_classes: int | None, max_size: int | None, limit: int | None, supersample: int, fractions: Sequence[float]
) -> None:
    """Validate the numeric arguments before any work."""
    if num_classes is not None and not 2 <= num_classes <= 256:
        raise DatasetError(f"num_classes must be in 2..256 (uint8 PNG labels), got {num_classes}.")
    if max_size is not None and max_size < 1:
        raise DatasetError(f"max_size must be a positive number of pixels, got {max_size}.")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of tiles, got {limit}.")
    if supersample < 1:
        raise DatasetError(f"supersample must be a positive integer, got {supersample}.")
    split_names_fixed([], {}, fractions)  # validates the fractions


def _fixed_test(names: list[str], test_items: list[_Item], test_names: Sequence[str] | None, dataset: str) -> list[str]:
    """The output names of the fixed test split: the test release's tiles and the names (or stems) listed."""
    fixed = [item.name for item in test_items]
    for given in test_names or ():
        name = given if given in names else _output_name(dataset, Path(given).stem)
        if name not in names:
            raise DatasetError(f"test name {given!r} is not one of the prepared tiles ({format_names(names)}).")
        fixed.append(name)
    return fixed


def prepare_pathology_data(
    out_dir: str | os.PathLike,
    monuseg_dir: str | os.PathLike | None = None,
    tiles_dir: str | os.PathLike | None = None,
    monuseg_test_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    tiles_name: str = "tiles",
    max_size: int | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    test_names: Sequence[str] | None = None,
    instances: bool = False,
    supersample: int = 4,
    overwrite: bool = False,
    limit: int | None = None,
) -> Path:
    """Convert MoNuSeg or a generic tile set into the pathology bundle's data folder; return the datalist path.

    Nothing is written to ``out_dir`` unless the whole preparation succeeds.

    Args:
        out_dir: output folder, created if needed.
        monuseg_dir: a MoNuSeg release (official training or test layout, or rasterised ``images/`` + ``masks/``).
        tiles_dir: a generic tile set (``images/`` + ``masks/``); exclusive with ``monuseg_dir``.
        monuseg_test_dir: the official MoNuSeg test release: its tiles form the test split.
        num_classes: classes of generic tiles including background (class-index masks); None for binary masks.
        tiles_name: output name prefix of generic tiles.
        max_size: shrink tiles whose longest side is larger to this size (aspect kept); None keeps full size.
        seed: seed of the file-name-based split.
        fractions: (training, validation, test) fractions summing to 1; with a fixed test split only the training and
            validation fractions matter (renormalised).
        test_names: stems (or output names) of tiles that form the test split.
        instances: also write ``instances/<name>.png`` (uint16 nucleus ids) for XML annotations.
        supersample: sub-pixels per pixel side of the polygon rasterisation (1: PIL's plain fill).
        overwrite: replace prepared data already in ``out_dir``.
        limit: use only the first ``limit`` tiles (by file name) of each input folder, for quick runs and tests.

    Raises:
        DatasetError: naming the file or folder at fault: a missing folder or layout, an image without annotation or
            an annotation without image, malformed XML, an unreadable image (TIFF), a mask that is not binary or has
            labels outside ``0 .. num_classes - 1``, an image/mask size mismatch, an empty dataset, bad arguments, or
            an output folder that already holds data without ``overwrite``.
    """
    if (monuseg_dir is None) == (tiles_dir is None):
        raise DatasetError("pass exactly one input: monuseg_dir (--monuseg) or tiles_dir (--tiles).")
    if monuseg_test_dir is not None and monuseg_dir is None:
        raise DatasetError("monuseg_test_dir (--monuseg-test) goes with monuseg_dir (--monuseg).")
    if monuseg_dir is not None and num_classes not in (None, 2):
        raise DatasetError("MoNuSeg masks are binary (nucleus / background): do not pass num_classes with it.")
    _check_arguments(num_classes, max_size, limit, supersample, fractions)
    source = find_monuseg(monuseg_dir) if monuseg_dir is not None else find_tiles(tiles_dir, tiles_name)  # type: ignore[arg-type]
    test_source = find_monuseg(monuseg_test_dir) if monuseg_test_dir is not None else None
    xml_input = source.layout == "xml" or (test_source is not None and test_source.layout == "xml")
    if instances and not xml_input:
        raise DatasetError("instance maps need XML polygon annotations (the official MoNuSeg release).")
    subdirs = (IMAGES_DIR, LABELS_DIR, INSTANCES_DIR) if instances or (Path(out_dir) / INSTANCES_DIR).is_dir() else None
    tally = _Tally()
    with staged_output(out_dir, overwrite, subdirs=subdirs) as staging:
        args = (staging, num_classes, max_size, supersample, instances, limit, tally)
        items = _prepare_source(source, *args)
        test_items = _prepare_source(test_source, *args) if test_source is not None else []
        names = [item.name for item in items + test_items]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise DatasetError(
                f"tiles {format_names(clashes)} are in both {source.image_dir} and {test_source.image_dir}; "  # type: ignore[union-attr]
                "the training and test releases must not share tiles."
            )
        if not names:
            raise DatasetError(f"no tiles found in {source.image_dir}.")
        _warn(tally, len(names))
        fixed = _fixed_test(names, test_items, test_names, source.dataset)
        splits = split_names_fixed(names, {"test": fixed} if fixed else {}, fractions, seed)
        metadata: dict[str, object] = {
            "name": "MoNuSeg" if monuseg_dir is not None else tiles_name,
            "source_layout": source.description + (f" + {test_source.description}" if test_source else ""),
            "num_classes": num_classes or 2,
            "labels": MONUSEG_LABELS if monuseg_dir is not None else None,
            "max_size": max_size,
            "polygon_fill": f"PIL ImageDraw.polygon, pixel inside if > 1/2 covered at {supersample}x supersampling"
            if xml_input
            else None,
            "skipped_regions": tally.skipped_regions,
            "split_seed": seed,
        }
        metadata = {key: value for key, value in metadata.items() if value is not None}
        write_datalist(staging / DATALIST_NAME, datalist_entries(splits), metadata=metadata)
    logger.info("wrote %s (%s)", Path(out_dir) / DATALIST_NAME, ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return Path(out_dir) / DATALIST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m kd_components.data.pathology``."""
    parser = preparer_parser(
        "pathology",
        "Convert MoNuSeg 2018 (official 'Tissue Images'/ + Annotations/ XML release, the test release, or a "
        "rasterised images/ + masks/ copy) or a generic tile set (images/ + masks/) into the pathology bundle's "
        "data folder: OUT/images/<name>.png (RGB), OUT/labels/<name>.png (0/1 or class indices) and "
        "OUT/datalist.json with a seeded file-name-based training/validation/test split.",
        limit="tiles of each folder",
        max_size="tiles",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--monuseg", metavar="DIR", help="MoNuSeg release folder (or a folder holding it)")
    source.add_argument("--tiles", metavar="DIR", help="tile set folder holding images/ and masks/ (or labels/)")
    parser.add_argument("--monuseg-test", metavar="DIR", help="official MoNuSeg test release: the test split")
    parser.add_argument("--num-classes", type=int, metavar="N", help="class-index masks with N classes (tiles only)")
    parser.add_argument("--name", default="tiles", help="output name prefix of --tiles (default: tiles)")
    parser.add_argument("--test-list", metavar="FILE", help="text file of tile stems (one a line) for the test split")
    parser.add_argument("--instances", action="store_true", help="also write instances/<name>.png (XML input)")
    parser.add_argument("--supersample", type=int, default=4, help="polygon rasterisation sub-pixels (default: 4)")
    return parser


def _read_test_list(path: str | None) -> list[str] | None:
    """The stems listed in a ``--test-list`` file (blank lines and ``#`` comments skipped)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"cannot read the test list {path} ({err}).") from err
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 for a dataset error).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    args = build_parser().parse_args(argv)
    return run_preparer(  # the list is read inside: an unreadable one is reported as a dataset error
        lambda **kwargs: prepare_pathology_data(test_names=_read_test_list(args.test_list), **kwargs),
        monuseg_dir=args.monuseg,
        tiles_dir=args.tiles,
        monuseg_test_dir=args.monuseg_test,
        num_classes=args.num_classes,
        tiles_name=args.name,
        instances=args.instances,
        supersample=args.supersample,
        **shared_arguments(args),
    )


if __name__ == "__main__":
    sys.exit(main())
