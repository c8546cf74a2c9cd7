"""Prepare the vessel bundle's data folder from the official DRIVE, CHASE_DB1, ARCADE and XCAD releases.

Input layouts (in the folder given or up to 3 levels below it, see :func:`~kd_components.data.common.find_layouts`;
folder names are case-insensitive):

- **DRIVE** (retinal fundus, 565x584 RGB): ``training/images/NN_training.tif``, ``training/1st_manual/NN_manual1.gif``
  (vessel annotations), ``training/mask/NN_training_mask.gif`` (field-of-view masks), ``test/images/NN_test.tif``,
  ``test/mask/NN_test_mask.gif`` and, in the distributions that have it, ``test/1st_manual/NN_manual1.gif``. Files
  pair by their number ``NN``. With test annotations, the official split is kept: ``training/`` is split into
  training and validation (seeded), ``test/`` is the test split. Without them, ``training/`` is split into all three
  and the test images (with their FOV masks) are listed in the datalist's ``"unlabeled"`` section.
- **CHASE_DB1** (retinal fundus, 999x960 RGB, 14 children, both eyes): one flat folder of ``Image_NNL.jpg`` /
  ``Image_NNR.jpg`` with the annotations of two observers, ``Image_NNL_1stHO.png`` and ``Image_NNL_2ndHO.png``
  (``annotator=1``, the default, or ``2``). The split is seeded by *subject* ``NN``: both eyes of a child are in the
  same split. CHASE_DB1 has no FOV masks, so one is derived from each image: the non-black area, i.e. red channel
  ``> fov_threshold`` (default 20 of 255: the background outside the camera aperture is black up to JPEG noise,
  while the fundus is bright in the red channel, even at its dark rim), opened with a 5x5 window (removes isolated
  noisy pixels), then with its holes filled on the assumption that the FOV is convex (a pixel is kept when FOV
  pixels lie on both sides of it in its row and in its column): the aperture is a disc, possibly cut by the top and
  bottom image borders.
- **ARCADE** (X-ray coronary angiography, the COCO release, ``syntax`` task, 512x512 grey):
  ``syntax/{train,val,test}/images/*.png`` and ``syntax/{train,val,test}/annotations/{train,val,test}.json`` (the
  file name's case does not matter; a single ``.json`` file of another name is accepted too). Each COCO annotation is
  one artery segment: ``category_id`` 1..26 (the SYNTAX segments, named in ``"categories"``) and ``segmentation``, a
  list of polygons ``[x1, y1, x2, y2, ...]`` in pixel coordinates (a pixel ``(i, j)`` covering
  ``[j, j+1] x [i, i+1]``). The label is the union of all polygons (binary vessel mask), or with
  ``arcade_segments=True`` the ``category_id`` of each pixel (a later annotation overwrites an earlier one where they
  overlap). Polygons are rasterised with ``PIL.ImageDraw`` on a 4x finer grid and a pixel is vessel when more than
  half of its 16 sub-pixels are inside, so the mask area matches the polygon area (PIL's direct fill includes the
  boundary pixels, which makes thin polygons about 25 % too wide). The official train / val / test split is kept;
  output names carry the part (``arcade_train_1``), since every part numbers its images from 1.
- **XCAD** (X-ray coronary angiography, 512x512 grey; the ``XCAD.zip`` of Ma et al., ICCV 2021, as read by their
  code and by the DARL code): ``test/images/*.png`` with binary masks of the same names in ``test/masks/`` (126
  labelled pairs) and ``train/trainB/*.png``, unlabelled angiograms. ``train/trainC/`` (frames before contrast
  injection, without vessels) and ``train/trainA/`` (synthetic fractal labels, made by the authors' code) are not
  used. As there are no labelled training images, the labelled pairs are split (seeded) into all three splits;
  the ``trainB`` images go to the ``"unlabeled"`` section (``unlabeled=False`` skips them). A folder that holds
  ``images/`` + ``masks/`` directly (same file names) is accepted as the labelled pairs too.

Output layout (see :mod:`kd_components.data.common`)::

    <out>/images/<dataset>_<stem>.png    RGB uint8 (fundus) or grey uint8 (X-ray)
    <out>/labels/<dataset>_<stem>.png    uint8, 0 = background, 1 = vessel (ARCADE segments: 1..26)
    <out>/fov/<dataset>_<stem>.png       uint8 0/1 field of view (DRIVE, CHASE_DB1 only)
    <out>/datalist.json                  "training" / "validation" / "test": [{"image", "label"[, "fov"]}],
                                         "unlabeled": [{"image"[, "fov"]}], "metadata": {"channels", "labels", ...}

``<dataset>`` is ``drive``, ``chase``, ``arcade`` or ``xcad``. The FOV lets evaluation restrict metrics to the
imaged area; X-ray images are imaged everywhere, so they get no FOV (an all-ones mask would be the same). The
``metadata`` object records the dataset, modality, number of image channels (3 or 1), the label names, which
splits are official, the seed, fractions and ``max_size``.

Annotations are read as grey levels: a file with two grey levels is binary whatever they are (0/255, 0/1), the
higher one being vessel. A lossless file with more levels is thresholded at ``> 127``, unless more than 1 % of its
pixels lie between 32 and 223: then thresholding would be arbitrary (an image given as annotation, or an annotation
resized with interpolation) and preparation stops with an error naming the file.

With ``max_size``, images whose longest side is larger are shrunk (aspect kept) with antialiased bilinear
resampling; labels and FOV masks are resampled with the same filter per class and take the class of highest
resampled weight (for binary masks a majority vote), as in :mod:`kd_components.data.polyp`. Note that vessels
thinner than about two pixels after shrinking partly vanish from the labels: keep the full size for thin vessels.

Command line::

    python -m kd_components.data.vessels --drive /data/DRIVE --out DIR [--seed 0] [--fractions 0.8 0.1 0.1]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from kd_components.data.cli import preparer_parser, run_preparer, shared_arguments
from kd_components.data.common import (
    DATALIST_NAME,
    DEFAULT_FRACTIONS,
    FOV_DIR,
    IMAGES_DIR,
    LABELS_DIR,
    ROLE_CHECKS,
    SPLIT_KEYS,
    DatasetError,
    DatasetWarning,
    check_image_and_mask_roles,
    find_layouts,
    format_names,
    list_files,
    pair_by_stem,
    save_png,
    split_names,
    staged_output,
    validate_fractions,
    write_datalist,
)
from kd_components.data.polyp import _read_any, read_image

__all__ = [
    "DATASETS",
    "FOV_THRESHOLD",
    "VesselCase",
    "arcade_categories",
    "assign_splits",
    "binarise_annotation",
    "derive_fov",
    "find_arcade",
    "find_chase",
    "find_drive",
    "find_xcad",
    "main",
    "prepare_vessel_data",
    "rasterise_polygons",
    "read_annotation",
    "resize_label",
]

logger = logging.getLogger(__name__)

DATASETS = ("drive", "chase", "arcade", "xcad")
FUNDUS_DATASETS = ("drive", "chase")
#: datasets whose pool is an official training set (the others have no official split of their labelled images)
OFFICIAL_TRAINING = ("drive", "arcade")
#: red-channel level above which a CHASE_DB1 pixel is inside the field of view
FOV_THRESHOLD = 20
#: size of the opening window that removes isolated noisy pixels from a derived FOV
FOV_OPENING = 5
#: sub-pixels per pixel side when rasterising COCO polygons
SUPERSAMPLE = 4
#: a lossless annotation with more than this fraction of its pixels in (32, 223) is not binary
MAX_AMBIGUOUS_FRACTION = 0.01
MASK_EXTENSIONS = (".gif", ".png", ".tif", ".tiff", ".bmp")
LOSSLESS_EXTENSIONS = MASK_EXTENSIONS
ARCADE_PARTS = {"train": "training", "val": "validation", "test": "test"}
#: split of a case whose split is decided by the seeded split (an official training set, or an unsplit dataset)
POOL = "pool"
UNLABELED = "unlabeled"

T = TypeVar("T")


@dataclass(frozen=True)
class VesselCase:
    """One image of a dataset, before conversion.

    Args:
        name: output name ``<dataset>_<stem>``.
        image: the image file.
        split: ``"pool"`` (official training data or an unsplit dataset: split by the seeded split),
            ``"validation"`` or ``"test"`` (official splits), or ``"unlabeled"``.
        group: split unit: cases with the same group always land in the same split (the subject for CHASE_DB1).
        label: the annotation file: a mask image, or for ARCADE the COCO JSON holding ``annotations``; None when
            unlabelled.
        fov: the field-of-view mask file; None when there is none (derived for CHASE_DB1, none for X-ray).
        annotations: ARCADE only: ``((category_id, (polygon, ...)), ...)``, each polygon a flat
            ``(x1, y1, x2, y2, ...)`` tuple.
    """

    name: str
    image: Path
    split: str
    group: str
    label: Path | None = None
    fov: Path | None = None
    annotations: tuple[tuple[int, tuple[tuple[float, ...], ...]], ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# locating the official layouts


def _child(folder: Path, name: str) -> Path | None:
    """The child folder of ``folder`` called ``name`` (case-insensitive), if any."""
    matches = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower())
    return matches[0] if matches else None


def _child_or_default(folder: Path, name: str) -> Path:
    """The child folder called ``name`` (case-insensitive), or ``folder / name`` (for error messages) if absent."""
    return _child(folder, name) or folder / name


def _locate(path: str | os.PathLike, finder: Callable[[Path], T | None], what: str, expected: str) -> T:
    """The one result of ``finder`` in ``path`` or the folders below it (:func:`find_layouts`).

    Args:
        path: the folder given by the user.
        finder: returns what it finds in a folder (for example the dataset root), or None.
        what: the dataset, for messages.
        expected: the expected layout, for messages.

    Raises:
        DatasetError: when ``path`` is missing, or holds no layout or several.
    """
    found = find_layouts(path, finder, what)
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(f"{what}: several dataset folders under {path} ({format_names(found)}); pass one of them.")
    raise DatasetError(
        f"{what} folder {path} does not have the official layout: expected {expected} (or a folder below it "
        "holding it); pass the folder that holds it."
    )


def _number_key(pattern: str) -> Callable[[Path], str]:
    """Pairing key: the first group of ``pattern`` matched against the stem (the stem itself when it does not match)."""
    regex = re.compile(pattern, re.IGNORECASE)

    def key(path: Path) -> str:
        match = regex.fullmatch(path.stem)
        return match.group(1) if match else path.stem

    return key


def _drive_part(folder: Path, part: str, labelled: bool) -> list[VesselCase]:
    """The cases of DRIVE's ``training`` or ``test`` folder."""
    images = list_files(_child_or_default(folder, "images"), (".tif", ".tiff"), f"DRIVE {part} image")
    fovs = list_files(_child_or_default(folder, "mask"), MASK_EXTENSIONS, f"DRIVE {part} FOV mask")
    image_key = _number_key(rf"(\d+)_{part}")
    fov_pairs = pair_by_stem(images, fovs, image_key=image_key, mask_key=_number_key(r"(\d+)_.*"))
    fov_by_id = {i: fov for i, _, fov in fov_pairs}
    labels: dict[str, Path] = {}
    if labelled:
        manual = list_files(_child_or_default(folder, "1st_manual"), MASK_EXTENSIONS, f"DRIVE {part} annotation")
        label_pairs = pair_by_stem(images, manual, image_key=image_key, mask_key=_number_key(r"(\d+)_manual1"))
        labels = {i: label for i, _, label in label_pairs}
    split = (POOL if part == "training" else "test") if labelled else UNLABELED
    return [
        VesselCase(f"drive_{image.stem}", image, split, f"{part}_{i}", labels.get(i), fov_by_id[i])
        for i, image in sorted((image_key(p), p) for p in images)
    ]


def find_drive(path: str | os.PathLike) -> list[VesselCase]:
    """The cases of the official DRIVE layout in ``path`` (or the one folder below it holding ``training/``).

    ``training/`` is the training pool; ``test/`` (optional) is the test split when it has ``1st_manual/``,
    otherwise its images are unlabelled.

    Args:
        path: the DRIVE folder (holding ``training/`` and ``test/``), or the folder it was unpacked into.

    Raises:
        DatasetError: for a missing folder or layout, a sub-folder without files, or unpaired files.
    """
    root = _locate(path, lambda f: f if _child(f, "training") else None, "DRIVE", "training/ and test/")
    cases = _drive_part(_child_or_default(root, "training"), "training", labelled=True)
    test = _child(root, "test")
    if test is not None:
        cases += _drive_part(test, "test", labelled=_child(test, "1st_manual") is not None)
    return cases


def _chase_root(folder: Path) -> Path | None:
    """``folder`` if it holds CHASE_DB1 images (``Image_*.jpg``)."""
    is_image = re.compile(r"image_\d+[lr]\.jpe?g", re.IGNORECASE).fullmatch
    return folder if any(p.is_file() and is_image(p.name) for p in folder.iterdir()) else None


def find_chase(path: str | os.PathLike, annotator: int = 1) -> list[VesselCase]:
    """The cases of the official CHASE_DB1 layout: ``Image_NN[LR].jpg`` with ``Image_NN[LR]_{1st,2nd}HO.png``.

    Args:
        path: the CHASE_DB1 folder, or the folder it was unpacked into.
        annotator: the observer whose annotations are the labels: 1 (``_1stHO``) or 2 (``_2ndHO``).

    Raises:
        DatasetError: for a missing folder, an image whose name is not ``Image_NN[LR]``, or unpaired files.
    """
    if annotator not in (1, 2):
        raise DatasetError(f"CHASE_DB1 has the annotations of observers 1 and 2; got annotator={annotator}.")
    root = _locate(path, _chase_root, "CHASE_DB1", "Image_01L.jpg, Image_01L_1stHO.png, ...")
    images = list_files(root, (".jpg", ".jpeg"), "CHASE_DB1 image")
    name_pattern = re.compile(r"image_(\d+)[lr]", re.IGNORECASE)
    bad = [p.name for p in images if not name_pattern.fullmatch(p.stem)]
    if bad:
        raise DatasetError(
            f"CHASE_DB1 folder {root} holds images whose names are not Image_<NN><L|R>.jpg: {format_names(bad)}; "
            "the subject number is needed for the split: rename or remove them."
        )
    suffix = "_1stHO" if annotator == 1 else "_2ndHO"
    masks = [p for p in list_files(root, MASK_EXTENSIONS, "CHASE_DB1 annotation") if p.stem.endswith(suffix)]
    if not masks:
        raise DatasetError(f"CHASE_DB1 folder {root} holds no *{suffix}.png annotations; re-download the dataset.")
    pairs = pair_by_stem(images, masks, mask_key=lambda p: p.stem[: -len(suffix)])
    cases = []
    for stem, image, mask in pairs:
        subject = name_pattern.fullmatch(stem).group(1)  # type: ignore[union-attr]
        cases.append(VesselCase(f"chase_{stem}", image, POOL, f"subject_{int(subject):02d}", mask))
    return cases


def _arcade_root(folder: Path) -> Path | None:
    """The ARCADE ``syntax`` folder: ``folder/syntax`` or ``folder`` itself, when it holds ``train/images``."""
    for candidate in (_child(folder, "syntax"), folder):
        train = _child(candidate, "train") if candidate is not None else None
        if train is not None and _child(train, "images") is not None:
            return candidate
    return None


def _coco_file(folder: Path, part: str) -> Path:
    """The COCO JSON of an ARCADE part: ``<part>.json`` (any case), or the only ``.json`` file."""
    files = list_files(folder, (".json",), f"ARCADE {part} annotation")
    named = [p for p in files if p.stem.lower() == part]
    if named:
        return named[0]
    if len(files) == 1:
        return files[0]
    raise DatasetError(
        f"ARCADE annotation folder {folder} holds several JSON files ({format_names([p.name for p in files])}) and "
        f"none is called {part}.json; keep only the COCO file of the {part} images."
    )


def _load_json(path: Path) -> object:
    """Parse a JSON file, naming it in errors."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot read COCO annotation file {path} ({err}); re-download the dataset.") from err


def _require(item: object, keys: Sequence[str], what: str, path: Path) -> dict:
    """``item`` as a dict holding ``keys``, or a DatasetError naming the missing keys and the file."""
    if not isinstance(item, dict):
        raise DatasetError(f"COCO file {path}: {what} must be a JSON object, got {type(item).__name__}.")
    missing = [k for k in keys if k not in item]
    if missing:
        raise DatasetError(
            f"COCO file {path}: {what} lacks the key(s) {', '.join(map(repr, missing))}; "
            "the file is malformed or not a COCO file: re-download the dataset."
        )
    return item


def _polygons(annotation: dict, path: Path) -> tuple[tuple[float, ...], ...]:
    """The polygons of one COCO annotation, checked."""
    what = f"annotation {annotation.get('id', '?')} (image_id {annotation['image_id']})"
    segmentation = annotation["segmentation"]
    if not isinstance(segmentation, list):
        raise DatasetError(
            f"COCO file {path}: {what} has an RLE segmentation ({type(segmentation).__name__}); only polygon lists "
            "[[x1, y1, x2, y2, ...], ...] are supported."
        )
    polygons = []
    for polygon in segmentation:
        ok = isinstance(polygon, list) and all(isinstance(v, (int, float)) for v in polygon)
        if not ok or len(polygon) % 2 or len(polygon) < 6:
            raise DatasetError(
                f"COCO file {path}: {what} has a polygon that is not a flat list of at least 3 (x, y) pairs "
                f"({str(polygon)[:60]}); fix or remove the annotation."
            )
        polygons.append(tuple(float(v) for v in polygon))
    return tuple(polygons)


def _arcade_part(folder: Path, part: str, check_categories: bool) -> list[VesselCase]:
    """The cases of one ARCADE part (``train``, ``val`` or ``test``) with their polygons."""
    image_dir = _child_or_default(folder, "images")
    files = {p.name: p for p in list_files(image_dir, (".png",), f"ARCADE {part} image")}
    json_path = _coco_file(_child_or_default(folder, "annotations"), part)
    coco = _require(_load_json(json_path), ("images", "annotations"), "the top level", json_path)
    categories = {c.get("id") for c in coco.get("categories", []) if isinstance(c, dict)}
    images = {}
    for entry in coco["images"]:
        entry = _require(entry, ("id", "file_name"), "an entry of 'images'", json_path)
        file_name = Path(str(entry["file_name"])).name
        if file_name not in files:
            raise DatasetError(
                f"COCO file {json_path} lists image {file_name!r} (id {entry['id']}), which is not in {image_dir}; "
                "re-download the dataset, or remove the entry."
            )
        images[entry["id"]] = (file_name, entry)
    unlisted = sorted(set(files) - {name for name, _ in images.values()})
    if unlisted:
        raise DatasetError(
            f"{len(unlisted)} image(s) in {image_dir} are not listed in {json_path}: {format_names(unlisted)}; "
            "re-download the dataset, or remove them."
        )
    per_image: dict[object, list[tuple[int, tuple[tuple[float, ...], ...]]]] = {key: [] for key in images}
    for annotation in coco["annotations"]:
        annotation = _require(annotation, ("image_id", "category_id", "segmentation"), "an annotation", json_path)
        if annotation["image_id"] not in images:
            raise DatasetError(
                f"COCO file {json_path}: annotation {annotation.get('id', '?')} refers to image_id "
                f"{annotation['image_id']}, which is not in its 'images' list; re-download the dataset."
            )
        category = annotation["category_id"]
        if check_categories and (category not in categories or not isinstance(category, int) or not 0 < category < 256):
            raise DatasetError(
                f"COCO file {json_path}: annotation {annotation.get('id', '?')} has category_id {category!r}, "
                f"which is not one of the file's 'categories' ids 1..255 ({sorted(map(str, categories))[:30]})."
            )
        per_image[annotation["image_id"]].append((int(category), _polygons(annotation, json_path)))
    split = POOL if part == "train" else ARCADE_PARTS[part]
    cases = [
        VesselCase(
            f"arcade_{part}_{Path(name).stem}", files[name], split, f"{part}_{name}", json_path, None, tuple(anns)
        )
        for key, (name, _) in images.items()
        for anns in [per_image[key]]
    ]
    return sorted(cases, key=lambda c: c.name)


def arcade_categories(path: str | os.PathLike) -> dict[int, str]:
    """Category id -> name of the ARCADE ``train`` annotations (the SYNTAX segment names, ``"1"``, ``"16a"``...).

    Args:
        path: the ARCADE folder (as for :func:`find_arcade`).
    """
    root = _locate(path, _arcade_root, "ARCADE", "syntax/{train,val,test}/{images,annotations}/")
    train = _child_or_default(root, "train")
    json_path = _coco_file(_child_or_default(train, "annotations"), "train")
    coco = _require(_load_json(json_path), ("categories",), "the top level", json_path)
    names = {}
    for category in coco["categories"]:
        category = _require(category, ("id", "name"), "an entry of 'categories'", json_path)
        names[int(category["id"])] = str(category["name"])
    return names


def find_arcade(path: str | os.PathLike, segments: bool = False) -> list[VesselCase]:
    """The cases of the ARCADE COCO release (``syntax`` task): ``syntax/{train,val,test}/{images,annotations}/``.

    ``train`` is the training pool, ``val`` and ``test`` (each optional) the validation and test splits.

    Args:
        path: the ``syntax`` folder, a folder holding it, or the folder that was unpacked into.
        segments: the labels will be the segment categories: check that every ``category_id`` is listed.

    Raises:
        DatasetError: for a missing folder or layout, a malformed COCO file (missing keys are named), an annotation
            of an image that is not listed, a listed image that is missing, or an image that is not listed.
    """
    root = _locate(path, _arcade_root, "ARCADE", "syntax/{train,val,test}/{images,annotations}/")
    cases = []
    for part in ARCADE_PARTS:
        folder = _child(root, part)
        if folder is not None:
            cases += _arcade_part(folder, part, segments)
        elif part == "train":
            raise DatasetError(f"ARCADE folder {root} has no train/ folder; re-download the dataset.")
    return cases


def _xcad_root(folder: Path) -> tuple[Path, Path, Path | None] | None:
    """``(images, masks, unlabelled images or None)`` of an XCAD folder, official (``test/``) or flat."""
    test = _child(folder, "test")
    for candidate in (test, folder):
        if candidate is None:
            continue
        images, masks = _child(candidate, "images"), _child(candidate, "masks")
        if images is not None and masks is not None:
            train = _child(folder, "train") if candidate is test else None
            return images, masks, _child(train, "trainB") if train is not None else None
    return None


def find_xcad(path: str | os.PathLike, unlabeled: bool = True) -> list[VesselCase]:
    """The cases of XCAD: labelled ``test/images`` + ``test/masks`` pairs, unlabelled ``train/trainB`` images.

    Args:
        path: the XCAD folder (holding ``train/`` and ``test/``), the folder it was unpacked into, or a folder
            holding ``images/`` and ``masks/``.
        unlabeled: include the ``train/trainB`` images as unlabelled cases.

    Raises:
        DatasetError: for a missing folder or layout, empty folders or unpaired files.
    """
    images_dir, masks_dir, unlabeled_dir = _locate(
        path, _xcad_root, "XCAD", "test/images/ and test/masks/ (and train/trainB/), or images/ and masks/"
    )
    extensions = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    images = list_files(images_dir, extensions, "XCAD image")
    masks = list_files(masks_dir, MASK_EXTENSIONS, "XCAD mask")
    cases = [VesselCase(f"xcad_{stem}", image, POOL, stem, mask) for stem, image, mask in pair_by_stem(images, masks)]
    if unlabeled and unlabeled_dir is not None:
        for image in list_files(unlabeled_dir, extensions, "XCAD unlabelled image"):
            cases.append(VesselCase(f"xcad_trainB_{image.stem}", image, UNLABELED, f"trainB_{image.stem}"))
    return cases


# ----------------------------------------------------------------------------------------------------------------------
# reading and converting


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` uint8 of an ``(H, W, 3)`` image: one channel when all three are equal, else ITU-R 601 luma."""
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.round(luma).astype(np.uint8)


def binarise_annotation(grey: np.ndarray, path: str | os.PathLike, lossless: bool = True) -> np.ndarray:
    """Binarise an annotation to uint8 0/1, refusing lossless files that are not binary.

    Two grey levels (or one): the higher is foreground (0/255, 0/1, ...; a single level is foreground only when it is
    above 127, or 1 in a 0/1 file, i.e. never for an all-zero file). More levels: ``grey > 127``, unless the file is
    lossless and more than 1 % of its pixels lie strictly between 32 and 223, which no binary annotation does.

    Args:
        grey: ``(H, W)`` uint8 grey levels.
        path: the file, for messages.
        lossless: the file is lossless (GIF, PNG, TIFF, BMP); lossy (JPEG) files are always thresholded.

    Raises:
        DatasetError: naming the file, when a lossless annotation is not binary.
    """
    levels = np.unique(grey)
    if levels.size == 2:
        return (grey == levels[1]).astype(np.uint8)
    if levels.size == 1:
        return np.full(grey.shape, levels[0] > 127 or levels[0] == 1, dtype=np.uint8)
    ambiguous = float(np.mean((grey > 32) & (grey < 223)))
    if lossless and ambiguous > MAX_AMBIGUOUS_FRACTION:
        raise DatasetError(
            f"annotation {path} is not binary: it holds {levels.size} grey levels and {ambiguous:.1%} of its pixels "
            "lie between 32 and 223, so thresholding it at >127 would be arbitrary. Is it an image rather than an "
            "annotation, or was it resized with interpolation? Replace it with the original binary (0/255) file."
        )
    return (grey > 127).astype(np.uint8)


def read_annotation(path: str | os.PathLike) -> np.ndarray:
    """Read a binary annotation (vessel or FOV mask: GIF, PNG, TIFF...) as ``(H, W)`` uint8 0/1.

    Args:
        path: the mask file; RGB masks are converted to grey (ITU-R 601 luma).

    Raises:
        DatasetError: naming the file, when it cannot be read or is not binary (see :func:`binarise_annotation`).
    """
    path = Path(path)
    grey = _to_grey(read_image(path))
    return binarise_annotation(grey, path, lossless=path.suffix.lower() in LOSSLESS_EXTENSIONS)


def derive_fov(image: np.ndarray, threshold: int = FOV_THRESHOLD, opening: int = FOV_OPENING) -> np.ndarray:
    """Field-of-view mask of a fundus photograph: its non-black area, cleaned, with the holes of a convex FOV filled.

    ``red > threshold`` (the grey level for a grey image), opened with an ``opening`` x ``opening`` window (PIL
    minimum then maximum filter: removes isolated noisy pixels outside the aperture), then a pixel is kept when FOV
    pixels lie on both sides of it in its row and in its column (fills dark spots inside the aperture, exact for a
    convex FOV such as a disc cut by the image borders).

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` grey uint8.
        threshold: level above which a pixel is inside.
        opening: odd window size of the opening; 1 skips it.
    """
    from PIL import Image, ImageFilter

    red = image[..., 0] if image.ndim == 3 else image
    mask = Image.fromarray(((red > threshold) * 255).astype(np.uint8))
    if opening > 1:
        mask = mask.filter(ImageFilter.MinFilter(opening)).filter(ImageFilter.MaxFilter(opening))
    inside = np.asarray(mask) > 127
    rows = np.logical_or.accumulate(inside, axis=1) & np.logical_or.accumulate(inside[:, ::-1], axis=1)[:, ::-1]
    cols = np.logical_or.accumulate(inside, axis=0) & np.logical_or.accumulate(inside[::-1], axis=0)[::-1]
    return (rows & cols).astype(np.uint8)


def rasterise_polygons(
    polygons: Sequence[Sequence[float]], size: tuple[int, int], supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Union of COCO polygons as an ``(H, W)`` bool mask, sampled so that the mask area matches the polygon area.

    COCO coordinates are continuous, pixel ``(i, j)`` covering ``[j, j+1] x [i, i+1]``. Each polygon is drawn with
    ``PIL.ImageDraw`` on a ``supersample`` times finer grid over its bounding box (sub-pixel centres on the grid
    points, which PIL fills when inside or on the outline), and a pixel is inside when more than half of its
    sub-pixels are.

    Args:
        polygons: flat ``[x1, y1, x2, y2, ...]`` sequences of at least 3 points, in pixels.
        size: ``(H, W)`` of the mask.
        supersample: sub-pixels per pixel side (1 is PIL's direct fill).
    """
    from PIL import Image, ImageDraw

    height, width = size
    k = int(supersample)
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        xs, ys = np.asarray(polygon[0::2], dtype=float), np.asarray(polygon[1::2], dtype=float)
        x0, y0 = max(0, math.floor(xs.min())), max(0, math.floor(ys.min()))
        x1, y1 = min(width, math.ceil(xs.max()) + 1), min(height, math.ceil(ys.max()) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
        points = [((x - x0) * k - 0.5, (y - y0) * k - 0.5) for x, y in zip(xs, ys)]
        ImageDraw.Draw(canvas).polygon(points, fill=1)
        counts = np.asarray(canvas, dtype=np.uint16).reshape(y1 - y0, k, x1 - x0, k).sum(axis=(1, 3))
        mask[y0:y1, x0:x1] |= counts * 2 > k * k
    return mask


def _arcade_label(case: VesselCase, size: tuple[int, int], segments: bool) -> np.ndarray:
    """The label of an ARCADE case: union of its polygons, or the category of each pixel."""
    label = np.zeros(size, dtype=np.uint8)
    for category, polygons in case.annotations or ():
        inside = rasterise_polygons(polygons, size)
        label[inside] = category if segments else 1
    return label


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample a label map to ``(H, W)`` ``size``: per-class antialiased bilinear weights, highest weight wins.

    For a 0/1 mask this is a majority vote on the resampled grid (ties go to background).

    Args:
        label: ``(H, W)`` uint8 class indices.
        size: ``(H, W)`` after resampling.
    """
    from PIL import Image

    classes = np.unique(label)
    weights = []
    for value in classes:
        indicator = Image.fromarray((label == value).astype(np.float32), mode="F")
        weights.append(np.asarray(indicator.resize((size[1], size[0]), Image.Resampling.BILINEAR)))
    best = np.argmax(np.stack(weights), axis=0)  # first (lowest) class wins ties
    return classes[best].astype(np.uint8)


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resampling of a uint8 grey or RGB image to ``(H, W)`` ``size``."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def _target_size(shape: tuple[int, ...], max_size: int | None) -> tuple[int, int] | None:
    """``(H, W)`` after shrinking to a longest side of ``max_size`` (aspect kept), None when no resizing is needed."""
    height, width = shape[:2]
    if max_size is None or max(height, width) <= max_size:
        return None
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class _Options:
    """Conversion options of :func:`prepare_vessel_data` (see there)."""

    grey: bool
    fov: str  # "file", "derive" or "none"
    max_size: int | None
    segments: bool
    fov_threshold: int


def _check_size(reference: np.ndarray, other: np.ndarray, image_path: Path, other_path: Path, what: str) -> None:
    """Raise when an annotation's size differs from its image's."""
    if reference.shape[:2] != other.shape[:2]:
        (h, w), (oh, ow) = reference.shape[:2], other.shape[:2]
        raise DatasetError(
            f"image {image_path} is {w}x{h} (WxH) but its {what} {other_path} is {ow}x{oh}; re-download the pair "
            "or remove both files."
        )


def _convert_case(case: VesselCase, options: _Options) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read, check and resize one case: ``(image, label or None, fov or None)``."""
    rgb = read_image(case.image)
    image = _to_grey(rgb) if options.grey else rgb
    label = None
    if case.annotations is not None:
        label = _arcade_label(case, image.shape[:2], options.segments)
    elif case.label is not None:
        label = read_annotation(case.label)
        _check_size(image, label, case.image, case.label, "annotation")
    fov = None
    if options.fov == "file" and case.fov is not None:
        fov = read_annotation(case.fov)
        _check_size(image, fov, case.image, case.fov, "FOV mask")
    elif options.fov == "derive":
        fov = derive_fov(rgb, options.fov_threshold)
    if fov is not None and not fov.any():
        source = case.fov or f"the non-black area (red > {options.fov_threshold}) of {case.image}"
        raise DatasetError(f"the field of view of {case.image} is empty ({source}); is this a fundus photograph?")
    size = _target_size(image.shape, options.max_size)
    if size is not None:
        image = _resize_image(image, size)
        label = resize_label(label, size) if label is not None else None
        fov = resize_label(fov, size) if fov is not None else None
    return image, label, fov


# ----------------------------------------------------------------------------------------------------------------------
# splitting


def _pool_fractions(official: set[str], fractions: Sequence[float]) -> tuple[float, float, float]:
    """Fractions for the pool: training, plus the splits the release does not provide, renormalised."""
    kept = [f if key == "training" or key not in official else 0.0 for key, f in zip(SPLIT_KEYS, fractions)]
    total = sum(kept)
    if total <= 0:
        raise DatasetError(
            f"split fractions {list(fractions)} leave nothing for the training data (the release provides the "
            f"{sorted(official)} split(s)); give training a positive fraction."
        )
    return kept[0] / total, kept[1] / total, kept[2] / total


def assign_splits(cases: Sequence[VesselCase], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Case names per split: official splits kept, the pool split by group with :func:`split_names`.

    The pool (official training data, or a dataset without official split) fills training and every split the
    release does not provide, with ``fractions`` renormalised over those splits. Unlabelled cases are left out.

    Args:
        cases: the cases of one dataset.
        fractions: (training, validation, test) fractions, summing to 1.
        seed: seed of the split.
    """
    fractions = validate_fractions(fractions)
    official = {case.split for case in cases if case.split in SPLIT_KEYS}
    splits: dict[str, list[str]] = {key: sorted(c.name for c in cases if c.split == key) for key in SPLIT_KEYS}
    pool = [case for case in cases if case.split == POOL]
    if pool:
        groups = split_names(sorted({case.group for case in pool}), _pool_fractions(official, fractions), seed)
        group_split = {group: key for key, part in groups.items() for group in part}
        for case in pool:
            splits[group_split[case.group]].append(case.name)
    return {key: sorted(names) for key, names in splits.items()}


# ----------------------------------------------------------------------------------------------------------------------
# preparation


def _find_cases(
    dataset: str, source_dir: str | os.PathLike, annotator: int, segments: bool, unlabeled: bool
) -> list[VesselCase]:
    """The cases of ``dataset`` in ``source_dir``."""
    if annotator != 1 and dataset != "chase":
        raise DatasetError(f"annotator={annotator}: only CHASE_DB1 has a second observer's annotations here.")
    if segments and dataset != "arcade":
        raise DatasetError("arcade_segments=True (--arcade-segments) applies to ARCADE only.")
    if dataset == "drive":
        cases = find_drive(source_dir)
    elif dataset == "chase":
        cases = find_chase(source_dir, annotator)
    elif dataset == "arcade":
        cases = find_arcade(source_dir, segments)
    else:
        cases = find_xcad(source_dir, unlabeled)
    if not unlabeled:
        cases = [case for case in cases if case.split != UNLABELED]
    names = [case.name for case in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{dataset}: several files map to the output name(s) {format_names(duplicates)}.")
    if not any(case.split != UNLABELED for case in cases):
        raise DatasetError(f"{dataset} folder {source_dir} holds no labelled image; check the folder.")
    return cases


def _write_case(staging: Path, name: str, image: np.ndarray, label: np.ndarray | None, fov: np.ndarray | None) -> dict:
    """Save one converted case into ``staging``; return its datalist entry (absolute paths)."""
    entry = {"image": save_png(image, staging / IMAGES_DIR / f"{name}.png")}
    if label is not None:
        entry["label"] = save_png(label, staging / LABELS_DIR / f"{name}.png")
    if fov is not None:
        entry["fov"] = save_png(fov, staging / FOV_DIR / f"{name}.png")
    return entry


def _check_empty(dataset: str, empty: list[str], total: int) -> None:
    """Warn about labels that are all background; raise when all are."""
    if not empty:
        return
    if len(empty) == total:
        raise DatasetError(
            f"all {total} {dataset} labels are background: is the annotation folder right, and are the annotations "
            "0/255 with 255 = vessel?"
        )
    warnings.warn(
        f"{len(empty)} of {total} {dataset} labels are all background: {format_names(empty)}; they are kept.",
        DatasetWarning,
        stacklevel=3,
    )


def _label_names(source_dir: str | os.PathLike, segments: bool) -> dict[str, str]:
    """Label value -> name, for the datalist's metadata."""
    if not segments:
        return {"0": "background", "1": "vessel"}
    names = arcade_categories(source_dir)
    return {"0": "background", **{str(k): f"segment {v}" for k, v in sorted(names.items())}}


def _metadata(dataset: str, cases: Sequence[VesselCase], options: _Options, **extra: object) -> dict[str, object]:
    """The datalist's ``metadata`` object; ``extra`` items are added as they are."""
    official = {case.split for case in cases if case.split in SPLIT_KEYS}
    if dataset in OFFICIAL_TRAINING:
        official.add("training")
    fov = {"file": "dataset FOV masks", "derive": f"derived: red channel > {options.fov_threshold}"}
    return {
        "dataset": dataset,
        "modality": "fundus" if dataset in FUNDUS_DATASETS else "x-ray angiography",
        "channels": 1 if options.grey else 3,
        "fov": fov.get(options.fov),
        "official_splits": [key for key in SPLIT_KEYS if key in official],
        **extra,
    }


def prepare_vessel_data(
    out_dir: str | os.PathLike,
    dataset: str,
    source_dir: str | os.PathLike,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    overwrite: bool = False,
    max_size: int | None = None,
    annotator: int = 1,
    arcade_segments: bool = False,
    fov_threshold: int = FOV_THRESHOLD,
    unlabeled: bool = True,
) -> Path:
    """Convert one official vessel dataset into the vessel bundle's data folder; return the datalist path.

    Writes ``<out_dir>/images/<dataset>_<stem>.png`` (RGB for fundus, grey for X-ray), ``labels/`` (uint8 0/1, or
    ARCADE segment ids), ``fov/`` (0/1, fundus only) and ``datalist.json`` with ``training`` / ``validation`` /
    ``test`` entries ``{"image", "label"[, "fov"]}``, an ``unlabeled`` section and a ``metadata`` object (see the
    module docstring for the layouts and the split rules). Nothing is written unless the whole preparation succeeds.

    Args:
        out_dir: output folder, created if needed.
        dataset: ``"drive"``, ``"chase"``, ``"arcade"`` or ``"xcad"``.
        source_dir: the dataset folder in its official layout, or the folder it was unpacked into.
        seed: seed of the split.
        fractions: (training, validation, test) fractions summing to 1; splits the release provides are kept and
            the fractions are renormalised over the others.
        overwrite: replace prepared data already in ``out_dir``.
        max_size: shrink images whose longest side is larger to this size (aspect kept); None keeps full size.
        annotator: CHASE_DB1 observer whose annotations are the labels, 1 or 2.
        arcade_segments: ARCADE labels are the SYNTAX segment ids (1..26) instead of a binary vessel mask.
        fov_threshold: CHASE_DB1: red-channel level above which a pixel is inside the derived field of view.
        unlabeled: list the unlabelled images (DRIVE test images without annotations, XCAD ``trainB``) in the
            ``unlabeled`` section; False skips them.

    Raises:
        DatasetError: naming the file or folder at fault: a missing folder or layout, unpaired files, an unreadable
            image, GIF or TIFF, a malformed COCO file, an annotation of a missing image, a non-binary annotation, a
            size mismatch, an empty dataset, bad arguments, or an output folder holding data without ``overwrite``.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown vessel dataset {dataset!r}; use one of {DATASETS}.")
    if max_size is not None and max_size < 1:
        raise DatasetError(f"max_size must be a positive number of pixels, got {max_size}.")
    fractions = validate_fractions(fractions)
    cases = _find_cases(dataset, source_dir, annotator, arcade_segments, unlabeled)
    splits = assign_splits(cases, fractions, seed)
    fov_mode = {"drive": "file", "chase": "derive"}.get(dataset, "none")
    options = _Options(dataset not in FUNDUS_DATASETS, fov_mode, max_size, arcade_segments, fov_threshold)
    labels = _label_names(source_dir, arcade_segments)
    metadata = _metadata(
        dataset,
        cases,
        options,
        labels=labels,
        annotator=annotator,
        seed=seed,
        fractions=list(fractions),
        max_size=max_size,
    )
    split_of = {name: key for key, names in splits.items() for name in names}
    entries: dict[str, list[dict]] = {key: [] for key in SPLIT_KEYS}
    unlabeled_entries: list[dict] = []
    empty: list[str] = []
    with staged_output(out_dir, overwrite) as staging:
        if fov_mode != "none":
            (staging / FOV_DIR).mkdir()
        checked = 0
        for case in cases:
            if case.label is not None and case.annotations is None and checked < ROLE_CHECKS:
                checked += 1  # swapped image and annotation folders
                check_image_and_mask_roles(
                    _read_any(case.image), _read_any(case.label), case.image, case.label, swap_only=True
                )
            image, label, fov = _convert_case(case, options)
            if label is not None and not label.any():
                empty.append(case.name)
            entry = _write_case(staging, case.name, image, label, fov)
            if case.split == UNLABELED:
                unlabeled_entries.append(entry)
            else:
                entries[split_of[case.name]].append(entry)
        _check_empty(dataset, empty, sum(case.split != UNLABELED for case in cases))
        metadata["counts"] = {key: len(part) for key, part in entries.items()} | {UNLABELED: len(unlabeled_entries)}
        datalist = staging / DATALIST_NAME
        write_datalist(datalist, entries, extra_keys=("fov",), unlabeled=unlabeled_entries, metadata=metadata)
    logger.info("wrote %s (%s)", Path(out_dir) / DATALIST_NAME, metadata["counts"])
    return Path(out_dir) / DATALIST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m kd_components.data.vessels``."""
    parser = preparer_parser(
        "vessels",
        "Convert an official DRIVE, CHASE_DB1, ARCADE (COCO, syntax) or XCAD release into the vessel bundle's "
        "data folder: OUT/images/<dataset>_<stem>.png (RGB fundus, grey X-ray), OUT/labels/*.png (0/1), "
        "OUT/fov/*.png (0/1 field of view, fundus only) and OUT/datalist.json (official splits kept, the rest "
        "seeded; an 'unlabeled' section; a 'metadata' object).",
        fractions_note=", renormalised over the splits the release lacks",
        max_size="images",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--drive", metavar="DIR", help="DRIVE folder (holding training/ and test/)")
    source.add_argument("--chase", metavar="DIR", help="CHASE_DB1 folder (Image_01L.jpg, Image_01L_1stHO.png, ...)")
    source.add_argument("--arcade", metavar="DIR", help="ARCADE COCO release (holding syntax/) or its syntax/ folder")
    source.add_argument("--xcad", metavar="DIR", help="XCAD folder (holding test/images, test/masks, train/trainB)")
    parser.add_argument(
        "--annotator", type=int, choices=(1, 2), default=1, help="CHASE_DB1 observer: 1 (_1stHO, default) or 2"
    )
    parser.add_argument(
        "--arcade-segments", action="store_true", help="ARCADE labels are the SYNTAX segment ids 1..26, not 0/1"
    )
    parser.add_argument(
        "--fov-threshold",
        type=int,
        default=FOV_THRESHOLD,
        help=f"CHASE_DB1: red level above which a pixel is in the derived FOV (default: {FOV_THRESHOLD})",
    )
    parser.add_argument(
        "--no-unlabeled", action="store_true", help="do not list unlabelled images (DRIVE test, XCAD trainB)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 for a dataset error).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    args = build_parser().parse_args(argv)
    dataset = next(name for name in DATASETS if getattr(args, name) is not None)
    return run_preparer(
        prepare_vessel_data,
        dataset=dataset,
        source_dir=getattr(args, dataset),
        annotator=args.annotator,
        arcade_segments=args.arcade_segments,
        fov_threshold=args.fov_threshold,
        unlabeled=not args.no_unlabeled,
        **shared_arguments(args),
    )


if __name__ == "__main__":
    sys.exit(main())
