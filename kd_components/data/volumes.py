"""Prepare 3D multi-organ data (ACDC cardiac MRI, Synapse / BTCV abdominal CT) for the Graph Flow bundle.

The bundle trains on 2D slices and evaluates per volume, so the data is prepared as volumes (one datalist entry per
volume, split by patient) and, optionally, as 2D slices for training (:func:`write_slices`).

Input layouts (the folder given, or the single folder below it, up to three levels down, that has the layout):

- ACDC, SSL4MIS pre-processed form (as the shared copy in ``datasets/ACDC``): ``imagesTr/*.nii.gz`` (float32, already
  per-volume min-max normalised) + ``labelsTr/*.nii.gz`` (0..3), named ``patientXXX_frameYY``, and optionally a
  ``splits.csv`` (columns ``image`` and ``split`` or ``split_*``, values train / val / test). These files carry an
  identity affine: the voxel spacing is unknown.
- ACDC, official release (``database/``): ``training/patientXXX/patientXXX_frameYY.nii.gz`` +
  ``patientXXX_frameYY_gt.nii.gz`` and ``Info.cfg`` (``ED: 1``, ``ES: 12``, ... : the frames are tagged ED/ES);
  ``patientXXX_4d.nii.gz`` is ignored. Patients of a ``testing/`` folder with ground truth form the test split.
  Raw MR intensities; spacing from the NIfTI header.
- Synapse / BTCV, NIfTI (``RawData/Training/``): ``img/imgXXXX.nii.gz`` + ``label/labelXXXX.nii.gz`` (HU, labels
  0..13), named ``caseXXXX`` here. ``RawData/Testing`` (no labels) is not used.
- Synapse, TransUNet's pre-processed form: ``train_npz/caseXXXX_sliceYYY.npz`` (keys ``image``, ``label``: one 2D
  slice each, image already windowed to [0, 1], labels 0..8) and/or ``test_vol_h5/caseXXXX.npy.h5`` (``image``,
  ``label`` volumes (Z, H, W)). The slices of a case are stacked back into a volume (indices must be contiguous);
  the h5 cases (TransUNet's 12 test cases) form the test split. Reading ``.h5`` needs ``h5py``
  (``pip install h5py``), which is not a dependency of this package.

Intensities (images are written as float32 in [0, 1]):

- MRI (ACDC): per-volume min-max, ``(x - min) / (max - min)``, as SSL4MIS did for the shared copy (so that copy is
  unchanged up to rounding); ``normalise="percentile"`` clips to the (0.5, 99.5) percentiles first, which is robust
  to a few very bright voxels; ``"none"`` keeps images that are already in [0, 1].
- CT (BTCV NIfTI): clipped to the window [-125, 275] HU and scaled to [0, 1], as TransUNet. TransUNet's npz/h5 images
  are already windowed and kept as they are (if they hold values outside [0, 1], they are windowed like HU).

Synapse 8-organ subset (``label_map="synapse8"``, the TransUNet mapping of the 13 BTCV labels): spleen 1 -> 1,
right kidney 2 -> 2, left kidney 3 -> 3, gallbladder 4 -> 4, liver 6 -> 5, stomach 7 -> 6, aorta 8 -> 7,
pancreas 11 -> 8; esophagus (5), inferior vena cava (9), portal and splenic veins (10) and the adrenal glands (12, 13)
become background. TransUNet's npz/h5 labels already use it.

Output layout::

    <out>/volumes/images/<case>.nii.gz    float32 in [0, 1], shape (H, W, Z) as stored in the source
    <out>/volumes/labels/<case>.nii.gz    uint8 class indices
    <out>/datalist.json                   "training" / "validation" / "test": one entry per volume
                                          {"image", "label", "case", "patient"[, "phase"][, "spacing"]}, and a
                                          "metadata" object (labels, num_classes, spacing_known, intensity, split)

NIfTI sources keep their affine and header, so the spacing stays in the output header. ``metadata.spacing_known`` is
false when any volume's spacing is unknown (the SSL4MIS copy, TransUNet's npz/h5): evaluation should then report
HD95 and volumes in voxels. Entries carry ``"spacing"`` (mm, per axis) when it is known.

Split: by patient (both ACDC frames of a patient go to the same split), seeded
(:func:`kd_components.data.common.split_names_fixed`). ACDC with ``splits.csv``: its ``val`` patients form the
validation split, its ``test`` patients (if any) the test split, and when it has no test patients the test split is
drawn (seeded) from its ``train`` patients, with the share ``test / (training + test)`` of ``fractions`` (1/9 of them
with the default 0.8 / 0.1 / 0.1). A ``testing/`` folder (ACDC release) or ``test_vol_h5/`` (TransUNet) fixes the test
split and the rest is split into training / validation.

2D slices for training: :func:`write_slices` writes every slice along ``axis`` (by default the last, Z) as NPY, in
the standard 2D layout ``<out>/slices/{images,labels}/<case>_<k>.npy`` + ``datalist.json`` (entries with ``"case"``
and ``"slice"``). A MONAI 2D pipeline loads them with ``LoadImaged(keys, reader="NumpyReader")`` and
``EnsureChannelFirstd(keys, channel_dim="no_channel")``; NPY files load in microseconds, so ``CacheDataset`` fills
quickly and exactly (float32, no 8-bit rounding as PNG would have). :func:`slice_datalist` with :class:`SelectSliced`
is the in-memory alternative (no files; each volume is read once per slice while caching, fine for ACDC-sized data).

Command line::

    python -m kd_components.data.volumes --acdc DIR --out DIR [--normalise minmax] [--slices]
    python -m kd_components.data.volumes --synapse DIR --out DIR [--label-map synapse8] [--window -125 275] [--slices]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from kd_components.data.cli import preparer_parser, run_preparer, shared_arguments
from kd_components.data.common import (
    DATALIST_NAME,
    DEFAULT_FRACTIONS,
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
    split_names_fixed,
    staged_output,
    write_datalist,
)

__all__ = [
    "ACDC_LABELS",
    "BTCV_LABELS",
    "BTCV_TO_SYNAPSE8",
    "CT_WINDOW",
    "SLICES_DIR",
    "SYNAPSE8_LABELS",
    "VOLUMES_DIR",
    "SelectSliced",
    "VolumeCase",
    "VolumeSource",
    "check_labels",
    "find_acdc",
    "find_synapse",
    "main",
    "normalise_intensity",
    "prepare_acdc_data",
    "prepare_synapse_data",
    "remap_labels",
    "slice_datalist",
    "window_ct",
    "write_slices",
]

logger = logging.getLogger(__name__)

VOLUMES_DIR = "volumes"
SLICES_DIR = "slices"
VOLUME_SUBDIRS = (f"{VOLUMES_DIR}/{IMAGES_DIR}", f"{VOLUMES_DIR}/{LABELS_DIR}")
NIFTI_SUFFIX = ".nii.gz"
#: how deep below the given folder the layouts are searched
SEARCH_DEPTH = 3
NORMALISATIONS = ("minmax", "percentile", "none")
LABEL_MAPS = ("none", "synapse8")
#: TransUNet's CT window in HU
CT_WINDOW: tuple[float, float] = (-125.0, 275.0)
DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)
INFO_KEYS = ("case", "patient", "phase", "spacing")

ACDC_LABELS = {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
BTCV_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "right kidney",
    "3": "left kidney",
    "4": "gallbladder",
    "5": "esophagus",
    "6": "liver",
    "7": "stomach",
    "8": "aorta",
    "9": "inferior vena cava",
    "10": "portal and splenic veins",
    "11": "pancreas",
    "12": "right adrenal gland",
    "13": "left adrenal gland",
}
#: TransUNet's 8-organ Synapse subset: BTCV label -> Synapse label; the other BTCV labels become background
BTCV_TO_SYNAPSE8 = {1: 1, 2: 2, 3: 3, 4: 4, 6: 5, 7: 6, 8: 7, 11: 8}
SYNAPSE8_LABELS = {"0": "background", **{str(new): BTCV_LABELS[str(old)] for old, new in BTCV_TO_SYNAPSE8.items()}}


@dataclass(frozen=True)
class VolumeCase:
    """One volume to prepare.

    Args:
        case: output name (``patient001_frame01``, ``case0001``).
        patient: the split unit (both ACDC frames of a patient share it).
        kind: how it is stored: ``"nifti"`` (image + label files), ``"npz"`` (TransUNet slices) or ``"h5"``.
        image: the image file (NIfTI or h5); for ``"npz"`` the first slice file.
        label: the label file (NIfTI); the same as ``image`` for ``"npz"`` and ``"h5"``.
        slices: the slice files in slice order, for ``"npz"``.
        phase: ``"ED"`` / ``"ES"`` for ACDC frames named in ``Info.cfg``.
    """

    case: str
    patient: str
    kind: str
    image: Path
    label: Path
    slices: tuple[Path, ...] = ()
    phase: str | None = None


@dataclass
class VolumeSource:
    """A located dataset: its cases, fixed splits and how to read it.

    Args:
        name: dataset name (``ACDC``, ``Synapse``).
        layout: the layout recognised, for messages and the datalist metadata.
        root: the folder holding the layout.
        cases: the volumes, sorted by case.
        fixed: split key -> patients whose split is given by the release (``splits.csv``, ``testing/``,
            ``test_vol_h5/``).
        spacing_known: whether the files carry a real voxel spacing.
        split_rule: how the split is made, for the datalist metadata.
    """

    name: str
    layout: str
    root: Path
    cases: list[VolumeCase]
    fixed: dict[str, list[str]] = field(default_factory=dict)
    spacing_known: bool = True
    split_rule: str = "seeded patient-level split"


# ----------------------------------------------------------------------------------------------------------------------
# files and arrays


def _case_name(path: Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` / ``.npy.h5`` / other suffix."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".npy.h5", ".h5", ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _nifti_files(folder: Path, what: str) -> list[Path]:
    """The ``.nii.gz`` / ``.nii`` files of ``folder``, sorted."""
    files = [p for p in list_files(folder, (".gz", ".nii"), what) if p.name.lower().endswith((".nii.gz", ".nii"))]
    if not files:
        raise DatasetError(
            f"{what} folder {folder} holds no .nii.gz / .nii files; point to the folder that holds them."
        )
    return files


def _load_nifti(path: Path):
    """Open a NIfTI file (data read lazily)."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as err:
        raise DatasetError(
            f"cannot read NIfTI file {path} ({type(err).__name__}: {err}); re-download it, or remove it and its pair."
        ) from err


def _as_3d(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``array`` as a 3D volume (a trailing singleton 4th axis is dropped), else a DatasetError naming the file."""
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) == 0:
        raise DatasetError(
            f"{what} {path} has shape {tuple(array.shape)}: expected a 3D volume (H, W, Z); remove it (4D cine files "
            "such as patientXXX_4d.nii.gz are not used) or convert it."
        )
    return array


def _nifti_array(image, path: Path, what: str) -> np.ndarray:
    """The data of an opened NIfTI file as a 3D array."""
    try:
        array = np.asanyarray(image.dataobj)
    except Exception as err:
        raise DatasetError(f"cannot read the data of {what} {path} ({type(err).__name__}: {err}).") from err
    return _as_3d(array, path, what)


def normalise_intensity(
    volume: np.ndarray,
    method: str = "minmax",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    path: str | os.PathLike = "volume",
) -> np.ndarray:
    """Scale an MR volume to float32 in [0, 1].

    Args:
        volume: the raw intensities.
        method: ``"minmax"``: ``(x - min) / (max - min)`` over the volume; ``"percentile"``: clip to the
            ``percentiles`` first, then min-max; ``"none"``: keep, after checking the values are in [0, 1].
            A constant volume gives zeros.
        percentiles: lower and upper percentiles (0..100) of ``"percentile"``.
        path: the file, for error messages.

    Raises:
        DatasetError: for non-finite values, an unknown method, or (``"none"``) values outside [0, 1].
    """
    volume = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise DatasetError(f"image {path} holds NaN or infinite values; fix or remove it.")
    if method == "none":
        if volume.size and (volume.min() < 0 or volume.max() > 1):
            raise DatasetError(
                f"image {path} has values {volume.min():g}..{volume.max():g}, outside [0, 1]; use "
                "normalise='minmax' or 'percentile' (--normalise)."
            )
        return volume
    if method == "percentile":
        low, high = np.percentile(volume, percentiles).astype(np.float32)
        volume = np.clip(volume, low, high)
    elif method != "minmax":
        raise DatasetError(f"normalise must be one of {NORMALISATIONS}, got {method!r}.")
    low, high = volume.min(), volume.max()
    if high <= low:
        return np.zeros_like(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def window_ct(volume: np.ndarray, window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """Clip CT intensities (HU) to ``window`` and scale them to float32 [0, 1].

    Args:
        volume: intensities in HU.
        window: (low, high) HU, low < high; TransUNet's (-125, 275) by default.
    """
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise DatasetError(f"the CT window must have low < high, got {window}.")
    return ((np.clip(np.asarray(volume, dtype=np.float32), low, high) - low) / (high - low)).astype(np.float32)


def check_labels(label: np.ndarray, num_classes: int, path: str | os.PathLike) -> np.ndarray:
    """Check that a label volume holds integer classes ``0 .. num_classes - 1`` and return it as uint8.

    Args:
        label: the label values.
        num_classes: number of classes including background.
        path: the file, for error messages.

    Raises:
        DatasetError: naming the file and the offending values.
    """
    label = np.asarray(label)
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            raise DatasetError(f"label {path} holds non-integer values; labels must be class indices.")
    values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DatasetError(
            f"label {path} holds the values {format_names([int(v) for v in bad])} outside 0..{num_classes - 1} "
            f"({num_classes} classes); check that this is the right dataset (or label map), or fix the file."
        )
    return label.astype(np.uint8)


def remap_labels(label: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map label values through ``mapping``; values not in it become 0 (background).

    Args:
        label: integer label volume with values >= 0.
        mapping: old value -> new value (for example :data:`BTCV_TO_SYNAPSE8`).
    """
    label = np.asarray(label).astype(np.int64)
    table = np.zeros(max(int(label.max(initial=0)), max(mapping, default=0)) + 1, dtype=np.uint8)
    for old, new in mapping.items():
        table[old] = new
    return table[np.clip(label, 0, None)]


def _check_shapes(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    """Raise when an image and its label differ in shape, naming both files and shapes."""
    if image.shape != label.shape:
        raise DatasetError(
            f"image {image_path} has shape {tuple(image.shape)} but its label {label_path} has shape "
            f"{tuple(label.shape)}; re-download the pair or remove both files."
        )


# ----------------------------------------------------------------------------------------------------------------------
# TransUNet npz / h5


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image, label)`` 2D arrays of a TransUNet slice file."""
    try:
        with np.load(path) as data:
            missing = [k for k in ("image", "label") if k not in data.files]
            if missing:
                raise DatasetError(
                    f"slice file {path} has no {missing} array(s) (it holds {data.files}); expected TransUNet's "
                    "train_npz format with 'image' and 'label'."
                )
            image, label = np.asarray(data["image"]), np.asarray(data["label"])
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(
            f"cannot read slice file {path} ({type(err).__name__}: {err}); remove or re-download it."
        ) from err
    if image.ndim != 2 or image.shape != label.shape:
        raise DatasetError(
            f"slice file {path}: expected 2D 'image' and 'label' of one shape, got {image.shape} and {label.shape}."
        )
    return image, label


def _stack_npz(case: VolumeCase) -> tuple[np.ndarray, np.ndarray]:
    """Stack a case's slice files into (H, W, Z) image and label volumes."""
    images, labels = [], []
    for path in case.slices:
        image, label = _read_npz(path)
        if images and image.shape != images[0].shape:
            raise DatasetError(
                f"slice {path} has shape {image.shape} but {case.slices[0]} has {images[0].shape}; the slices of "
                f"{case.case} must have one shape."
            )
        images.append(image)
        labels.append(label)
    return np.stack(images, axis=-1), np.stack(labels, axis=-1)


def _h5py():
    """Import h5py, or explain how to install it."""
    try:
        import h5py
    except ImportError as err:
        raise DatasetError(
            "reading TransUNet's test_vol_h5/*.npy.h5 volumes needs h5py, which is not installed: "
            "pip install h5py (or prepare only train_npz/ by moving test_vol_h5/ aside)."
        ) from err
    return h5py


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, Z) image and label volumes of a TransUNet ``.npy.h5`` file (stored (Z, H, W))."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as data:
            missing = [k for k in ("image", "label") if k not in data]
            if missing:
                raise DatasetError(f"volume file {path} has no {missing} dataset(s) (it holds {list(data)}).")
            image, label = np.asarray(data["image"]), np.asarray(data["label"])
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"cannot read volume file {path} ({type(err).__name__}: {err}).") from err
    image, label = _as_3d(image, path, "image"), _as_3d(label, path, "label")
    _check_shapes(image, label, path, path)
    return np.moveaxis(image, 0, -1), np.moveaxis(label, 0, -1)


# ----------------------------------------------------------------------------------------------------------------------
# locating ACDC


_ACDC_FRAME = re.compile(r"^(patient\d+_frame\d+)(_gt)?\.nii(\.gz)?$", re.IGNORECASE)
_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)


def _acdc_patient(case: str) -> str:
    """The patient of an ACDC case name (``patient001_frame01`` -> ``patient001``)."""
    match = re.match(r"(patient\d+)", case, re.IGNORECASE)
    return match.group(1) if match else case.split("_frame")[0]


def _acdc_frame(path: Path) -> str:
    """``patient001_frame01_gt.nii.gz`` -> ``patient001_frame01``."""
    return _ACDC_FRAME.match(path.name).group(1)  # type: ignore[union-attr]


def _patient_dirs(folder: Path) -> list[Path]:
    """The ``patientXXX`` sub-folders of ``folder``."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT.match(p.name))


def _read_info_cfg(path: Path) -> dict[str, str]:
    """The ``Key: value`` items of an ACDC ``Info.cfg``; ED and ES must be integers."""
    items = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DatasetError(f"malformed {path}, line {number}: {line.strip()!r} is not 'Key: value'.")
        items[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if key in items and not re.fullmatch(r"\d+", items[key]):
            raise DatasetError(f"malformed {path}: {key} is {items[key]!r}, expected a frame number.")
    return items


def _acdc_patient_cases(folder: Path) -> list[VolumeCase]:
    """The frames with ground truth of one patient folder of the ACDC release."""
    files = [p for p in folder.iterdir() if p.is_file() and _ACDC_FRAME.match(p.name)]
    images = [p for p in files if not _ACDC_FRAME.match(p.name).group(2)]  # type: ignore[union-attr]
    labels = [p for p in files if _ACDC_FRAME.match(p.name).group(2)]  # type: ignore[union-attr]
    if not images and not labels:
        raise DatasetError(
            f"ACDC patient folder {folder} holds no patientXXX_frameYY.nii.gz files; re-download the patient."
        )
    pairs = pair_by_stem(images, labels, image_key=_acdc_frame, mask_key=_acdc_frame)
    info = _read_info_cfg(folder / "Info.cfg") if (folder / "Info.cfg").is_file() else {}
    phases = {int(info[k]): k for k in ("ED", "ES") if k in info}
    cases = []
    for case, image, label in pairs:
        frame = int(re.search(r"frame(\d+)", case, re.IGNORECASE).group(1))  # type: ignore[union-attr]
        cases.append(VolumeCase(case, _acdc_patient(case), "nifti", image, label, phase=phases.get(frame)))
    return cases


def _acdc_release_cases(split_dir: Path, limit: int | None) -> list[VolumeCase]:
    """The cases of a ``training/`` (or ``testing/``) folder of the ACDC release."""
    patients = _patient_dirs(split_dir)[:limit]
    no_info = [p.name for p in patients if not (p / "Info.cfg").is_file()]
    if no_info:
        warnings.warn(
            f"{len(no_info)} ACDC patient folder(s) in {split_dir} have no Info.cfg ({format_names(no_info)}): their "
            "frames are not tagged ED / ES.",
            DatasetWarning,
            stacklevel=4,
        )
    return [case for patient in patients for case in _acdc_patient_cases(patient)]


def _acdc_layout(folder: Path) -> tuple[str, Path] | None:
    """``("ssl4mis" | "release" | "patients", folder)`` when ``folder`` holds an ACDC layout."""
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    if "imagestr" in children and "labelstr" in children:
        return "ssl4mis", folder
    if "training" in children and _patient_dirs(children["training"]):
        return "release", folder
    if _patient_dirs(folder):
        return "patients", folder
    return None


def _splits_csv(path: Path) -> dict[str, str]:
    """case -> split key of an SSL4MIS-style ``splits.csv``."""
    aliases = {"train": "training", "training": "training", "val": "validation", "valid": "validation"}
    aliases |= {"validation": "validation", "test": "test", "testing": "test"}
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {path} ({err}); fix it, or pass use_splits=False (--ignore-splits).") from err
    columns = list(rows[0]) if rows else []
    split_column = "split" if "split" in columns else next((c for c in columns if c.startswith("split")), None)
    if "image" not in columns or split_column is None:
        raise DatasetError(
            f"{path} needs an 'image' and a 'split' (or 'split_*') column, it has {columns}; fix it, or pass "
            "use_splits=False (--ignore-splits) for a seeded split."
        )
    splits = {}
    for number, row in enumerate(rows, start=2):
        value = (row[split_column] or "").strip().lower()
        if value not in aliases:
            raise DatasetError(f"{path}, line {number}: unknown split {row[split_column]!r} (use train, val or test).")
        splits[_case_name(Path(row["image"]))] = aliases[value]
    return splits


def _fixed_from_csv(path: Path, cases: list[VolumeCase]) -> dict[str, list[str]]:
    """Patient-level validation / test lists from ``splits.csv``; its training patients are left free."""
    by_case = _splits_csv(path)
    unlisted = [c.case for c in cases if c.case not in by_case]
    if unlisted:
        raise DatasetError(
            f"{len(unlisted)} case(s) are not in {path}: {format_names(unlisted)}; add them, or pass "
            "use_splits=False (--ignore-splits) for a seeded patient-level split."
        )
    by_patient: dict[str, str] = {}
    for case in cases:
        split = by_case[case.case]
        if by_patient.setdefault(case.patient, split) != split:
            raise DatasetError(
                f"{path} puts the frames of {case.patient} in different splits ({by_patient[case.patient]!r} and "
                f"{split!r}); a patient's frames must share a split."
            )
    return {
        key: sorted(p for p, s in by_patient.items() if s == key)
        for key in ("validation", "test")
        if key in by_patient.values()
    }


def _ssl4mis_source(root: Path, use_splits: bool, limit: int | None) -> VolumeSource:
    """The SSL4MIS ``imagesTr/`` + ``labelsTr/`` layout."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    images = _nifti_files(children["imagestr"], "ACDC image")
    labels = _nifti_files(children["labelstr"], "ACDC label")
    pairs = pair_by_stem(images, labels, image_key=_case_name, mask_key=_case_name)
    cases = [VolumeCase(case, _acdc_patient(case), "nifti", image, label) for case, image, label in pairs]
    if limit is not None:
        keep = sorted({c.patient for c in cases})[:limit]
        cases = [c for c in cases if c.patient in keep]
    source = VolumeSource("ACDC", "ACDC, SSL4MIS pre-processed (imagesTr/ + labelsTr/)", root, cases)
    source.spacing_known = False  # SSL4MIS stored the volumes without spacing: identity affine
    csv_path = root / "splits.csv"
    if use_splits and csv_path.is_file():
        source.fixed = _fixed_from_csv(csv_path, cases)
        source.split_rule = (
            "splits.csv: its val patients are the validation split"
            + (", its test patients the test split" if "test" in source.fixed else "")
            + "; the others are split (seeded, by patient) into training"
            + ("" if "test" in source.fixed else " and test")
        )
    return source


def find_acdc(path: str | os.PathLike, use_splits: bool = True, limit: int | None = None) -> VolumeSource:
    """Locate ACDC (SSL4MIS ``imagesTr/`` + ``labelsTr/``, or the official release) in ``path`` or below it.

    Args:
        path: the dataset folder or a folder it was unpacked into.
        use_splits: use the SSL4MIS ``splits.csv`` when there is one.
        limit: keep only the first ``limit`` patients (per release folder), for quick runs and tests.

    Raises:
        DatasetError: for a missing folder or layout, several candidate folders, unpaired frames, a malformed
            ``Info.cfg`` or ``splits.csv``.
    """
    path = Path(path)
    found = find_layouts(path, _acdc_layout, "ACDC", SEARCH_DEPTH)
    if not found:
        raise DatasetError(
            f"ACDC folder {path} does not have a known layout: expected imagesTr/ + labelsTr/ (SSL4MIS) or "
            "training/patientXXX/patientXXX_frameYY[_gt].nii.gz (official release); pass that folder."
        )
    if len(found) > 1:
        raise DatasetError(f"ACDC: several dataset folders under {path} ({format_names([str(f) for _, f in found])}).")
    layout, root = found[0]
    if layout == "ssl4mis":
        return _ssl4mis_source(root, use_splits, limit)
    if layout == "patients":
        cases = _acdc_release_cases(root, limit)
        return VolumeSource("ACDC", "ACDC official release (patient folders)", root, cases)
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    cases = _acdc_release_cases(children["training"], limit)
    source = VolumeSource("ACDC", "ACDC official release (training/ [+ testing/])", root, cases)
    testing = children.get("testing")
    if testing is not None and _patient_dirs(testing):
        test_cases = _acdc_testing_cases(testing, limit)
        source.cases += test_cases
        source.fixed = {"test": sorted({c.patient for c in test_cases})} if test_cases else {}
        if test_cases:
            source.split_rule = "testing/ patients are the test split; training/ is split (seeded, by patient)"
    return source


def _acdc_testing_cases(testing: Path, limit: int | None) -> list[VolumeCase]:
    """The cases of the release's ``testing/`` folder, or none when it has no ground truth (2017 release)."""
    patients = _patient_dirs(testing)[:limit]
    if not any(p.name.lower().endswith(("_gt.nii.gz", "_gt.nii")) for patient in patients for p in patient.iterdir()):
        warnings.warn(f"{testing} has no ground truth (_gt) files: it is not used.", DatasetWarning, stacklevel=4)
        return []
    return _acdc_release_cases(testing, limit)


# ----------------------------------------------------------------------------------------------------------------------
# locating Synapse / BTCV


def _synapse_layout(folder: Path) -> tuple[str, Path] | None:
    """``("btcv" | "transunet", folder)`` when ``folder`` holds a Synapse layout."""
    children = {p.name.lower() for p in folder.iterdir() if p.is_dir()}
    if "img" in children and "label" in children:
        return "btcv", folder
    if "train_npz" in children or "test_vol_h5" in children:
        return "transunet", folder
    return None


def _btcv_key(path: Path) -> str:
    """``img0001.nii.gz`` / ``label0001.nii.gz`` -> ``0001``."""
    return re.sub(r"^(img|image|label|labels|seg)[_-]?", "", _case_name(path), flags=re.IGNORECASE)


def _btcv_cases(root: Path, limit: int | None) -> list[VolumeCase]:
    """The image/label pairs of BTCV's ``img/`` + ``label/``."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    images = _nifti_files(children["img"], "BTCV image")
    labels = _nifti_files(children["label"], "BTCV label")
    pairs = pair_by_stem(images, labels, image_key=_btcv_key, mask_key=_btcv_key)[:limit]
    return [VolumeCase(f"case{key}", f"case{key}", "nifti", image, label) for key, image, label in pairs]


def _npz_cases(folder: Path, limit: int | None) -> list[VolumeCase]:
    """TransUNet's ``train_npz/caseXXXX_sliceYYY.npz`` grouped by case, with contiguous slice indices."""
    pattern = re.compile(r"^(.+)_slice(\d+)\.npz$", re.IGNORECASE)
    files = list_files(folder, (".npz",), "TransUNet slice")
    strays = [p.name for p in files if not pattern.match(p.name)]
    if strays:
        raise DatasetError(
            f"files in {folder} are not named <case>_slice<index>.npz: {format_names(strays)}; rename or remove them."
        )
    by_case: dict[str, dict[int, Path]] = {}
    for path in files:
        case, index = pattern.match(path.name).groups()  # type: ignore[union-attr]
        by_case.setdefault(case, {})[int(index)] = path
    cases = []
    for case in sorted(by_case)[:limit]:
        indices = sorted(by_case[case])
        gaps = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
        if gaps:
            raise DatasetError(
                f"{folder}: slices {format_names([str(g) for g in gaps])} of {case} are missing (it has "
                f"{indices[0]}..{indices[-1]}); the volume cannot be rebuilt: re-download them."
            )
        paths = tuple(by_case[case][i] for i in indices)
        cases.append(VolumeCase(case, case, "npz", paths[0], paths[0], slices=paths))
    return cases


def _h5_cases(folder: Path, limit: int | None) -> list[VolumeCase]:
    """TransUNet's ``test_vol_h5/caseXXXX.npy.h5`` volumes."""
    files = list_files(folder, (".h5",), "TransUNet volume")[:limit]
    return [VolumeCase(_case_name(p), _case_name(p), "h5", p, p) for p in files]


def find_synapse(path: str | os.PathLike, limit: int | None = None) -> VolumeSource:
    """Locate Synapse / BTCV (``img/`` + ``label/`` NIfTI, or TransUNet's ``train_npz/`` / ``test_vol_h5/``).

    Args:
        path: the dataset folder (``RawData``, ``Training``, TransUNet's ``Synapse``) or a folder above it.
        limit: keep only the first ``limit`` cases (per folder), for quick runs and tests.

    Raises:
        DatasetError: for a missing folder or layout, several candidate folders, unpaired files, badly named or
            missing slices, or h5 volumes without h5py installed.
    """
    path = Path(path)
    found = find_layouts(path, _synapse_layout, "Synapse", SEARCH_DEPTH)
    if not found:
        raise DatasetError(
            f"Synapse folder {path} does not have a known layout: expected img/ + label/ (BTCV RawData/Training) or "
            "train_npz/ and/or test_vol_h5/ (TransUNet); pass that folder."
        )
    if len(found) > 1:
        raise DatasetError(
            f"Synapse: several dataset folders under {path} ({format_names([str(f) for _, f in found])}); pass one."
        )
    layout, root = found[0]
    if layout == "btcv":
        cases = _btcv_cases(root, limit)
        return VolumeSource("Synapse", "BTCV NIfTI (img/ + label/)", root, cases)
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train = _npz_cases(children["train_npz"], limit) if "train_npz" in children else []
    test = _h5_cases(children["test_vol_h5"], limit) if "test_vol_h5" in children else []
    if test:
        _h5py()  # fail early, before any work, when h5py is missing
    both = sorted({c.case for c in train} & {c.case for c in test})
    if both:
        raise DatasetError(f"cases {format_names(both)} are in both train_npz/ and test_vol_h5/ under {root}.")
    source = VolumeSource("Synapse", "TransUNet pre-processed (train_npz/ + test_vol_h5/)", root, train + test)
    source.spacing_known = False
    if test:
        source.fixed = {"test": [c.patient for c in test]}
        source.split_rule = "test_vol_h5/ cases are the test split; train_npz/ cases are split (seeded) in training"
    return source


# ----------------------------------------------------------------------------------------------------------------------
# preparation


def _read_case(case: VolumeCase) -> tuple[np.ndarray, np.ndarray, object | None]:
    """Raw ``(image, label, reference NIfTI or None)`` of a case, shapes checked."""
    if case.kind == "npz":
        image, label = _stack_npz(case)
        return image, label, None
    if case.kind == "h5":
        image, label = _read_h5(case.image)
        return image, label, None
    image_nii, label_nii = _load_nifti(case.image), _load_nifti(case.label)
    image = _nifti_array(image_nii, case.image, "image")
    label = _nifti_array(label_nii, case.label, "label")
    _check_shapes(image, label, case.image, case.label)
    return image, label, image_nii


def _spacing(reference, spacing_known: bool) -> list[float] | None:
    """The voxel spacing of a NIfTI header when it is known (a qform or sform code is set)."""
    if reference is None or not spacing_known:
        return None
    header = reference.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        return None
    return [round(float(z), 6) for z in header.get_zooms()[:3]]


def _save_nifti(array: np.ndarray, path: Path, reference) -> None:
    """Save a volume as NIfTI, with the affine and header of ``reference`` when given (else an identity affine)."""
    import nibabel as nib

    if reference is None:
        image = nib.Nifti1Image(array, np.eye(4))
    else:
        header = reference.header.copy()
        header.set_data_dtype(array.dtype)
        header["cal_min"], header["cal_max"] = 0, 0  # the raw display range no longer applies
        image = nib.Nifti1Image(array, reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(path))


def _prepare_volumes(
    source: VolumeSource,
    out_dir: str | os.PathLike,
    convert: Callable[[VolumeCase, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    metadata: dict[str, object],
    seed: int,
    fractions: Sequence[float],
    overwrite: bool,
) -> Path:
    """Convert the cases of ``source`` into ``out_dir`` and write the volume datalist; return its path."""
    if not source.cases:
        raise DatasetError(f"{source.name}: no volumes found in {source.root}.")
    patients = sorted({c.patient for c in source.cases})
    split_of = {
        p: key for key, names in split_names_fixed(patients, source.fixed, fractions, seed).items() for p in names
    }
    entries: dict[str, list[dict[str, object]]] = {key: [] for key in SPLIT_KEYS}
    spacing_known = source.spacing_known
    with staged_output(out_dir, overwrite, subdirs=VOLUME_SUBDIRS, suffixes=(NIFTI_SUFFIX, ".nii")) as staging:
        for i, case in enumerate(source.cases):
            raw_image, raw_label, reference = _read_case(case)
            if i < ROLE_CHECKS and case.kind not in ("npz", "h5"):  # swapped image and label folders
                check_image_and_mask_roles(raw_image, raw_label, case.image, case.label, swap_only=True)
            image, label = convert(case, raw_image, raw_label)
            spacing = _spacing(reference, source.spacing_known)
            spacing_known = spacing_known and spacing is not None
            image_path = staging / VOLUME_SUBDIRS[0] / f"{case.case}{NIFTI_SUFFIX}"
            label_path = staging / VOLUME_SUBDIRS[1] / f"{case.case}{NIFTI_SUFFIX}"
            _save_nifti(image, image_path, reference)
            _save_nifti(label, label_path, reference)
            entry = {
                "image": image_path.relative_to(staging).as_posix(),
                "label": label_path.relative_to(staging).as_posix(),
                "case": case.case,
                "patient": case.patient,
            }
            entry |= {"phase": case.phase} if case.phase else {}
            entry |= {"spacing": spacing} if spacing else {}
            entries[split_of[case.patient]].append(entry)
            logger.info("%s: %s %s", case.case, tuple(image.shape), split_of[case.patient])
        metadata = {
            "name": source.name,
            "source_layout": source.layout,
            **metadata,
            "spacing_known": spacing_known,
            "slice_axis": 2,
            "split": source.split_rule,
            "split_seed": seed,
        }
        write_datalist(staging / DATALIST_NAME, entries, metadata=metadata, info_keys=INFO_KEYS)
    counts = ", ".join(f"{key} {len(part)}" for key, part in entries.items())
    logger.info("wrote %s (%s volumes)", Path(out_dir) / DATALIST_NAME, counts)
    return Path(out_dir) / DATALIST_NAME


def _check_common(limit: int | None, fractions: Sequence[float]) -> None:
    """Validate the arguments shared by the preparers."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number, got {limit}.")
    split_names_fixed([], {}, fractions)


def prepare_acdc_data(
    acdc_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    normalise: str = "minmax",
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    use_splits: bool = True,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    overwrite: bool = False,
    limit: int | None = None,
) -> Path:
    """Convert ACDC (SSL4MIS copy or official release) into the volume layout; return the datalist path.

    Nothing is written to ``out_dir`` unless the whole preparation succeeds.

    Args:
        acdc_dir: the ACDC folder (``imagesTr/`` + ``labelsTr/``, or the release's ``database/`` / ``training/``).
        out_dir: output folder, created if needed.
        normalise: intensity scaling per volume: ``"minmax"``, ``"percentile"`` or ``"none"``
            (:func:`normalise_intensity`).
        percentiles: clipping percentiles of ``"percentile"``.
        use_splits: use ``splits.csv`` (SSL4MIS) when present; else a seeded patient-level split.
        seed: seed of the patient-level split.
        fractions: (training, validation, test) fractions summing to 1; see the module docstring for how they apply
            next to a given split.
        overwrite: replace prepared volumes already in ``out_dir``.
        limit: keep only the first ``limit`` patients (per release folder).

    Raises:
        DatasetError: naming the file or folder at fault: a missing folder or layout, unpaired image/label, a shape
            mismatch, a non-3D volume, labels outside 0..3, an unreadable file, an empty dataset, bad arguments, or an
            output folder that already holds data without ``overwrite``.
    """
    if normalise not in NORMALISATIONS:
        raise DatasetError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}.")
    if not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise DatasetError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}.")
    _check_common(limit, fractions)
    source = find_acdc(acdc_dir, use_splits, limit)

    def convert(case: VolumeCase, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return normalise_intensity(image, normalise, percentiles, case.image), check_labels(label, 4, case.label)

    how = {"minmax": "per-volume min-max to [0, 1]", "none": "kept (already in [0, 1])"}.get(
        normalise, f"per-volume clip to percentiles {list(percentiles)}, then min-max to [0, 1]"
    )
    metadata = {"modality": "MRI", "num_classes": 4, "labels": ACDC_LABELS, "intensity": how}
    return _prepare_volumes(source, out_dir, convert, metadata, seed, fractions, overwrite)


def prepare_synapse_data(
    synapse_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_map: str = "none",
    window: tuple[float, float] = CT_WINDOW,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    overwrite: bool = False,
    limit: int | None = None,
) -> Path:
    """Convert Synapse / BTCV (NIfTI, or TransUNet's npz/h5) into the volume layout; return the datalist path.

    Nothing is written to ``out_dir`` unless the whole preparation succeeds.

    Args:
        synapse_dir: the dataset folder (BTCV ``img/`` + ``label/``, or TransUNet's ``train_npz/`` + ``test_vol_h5/``).
        out_dir: output folder, created if needed.
        label_map: ``"none"`` keeps BTCV's 13 organ labels (0..13); ``"synapse8"`` maps them to TransUNet's 8-organ
            subset (:data:`BTCV_TO_SYNAPSE8`). TransUNet's npz/h5 labels are already 8-organ and are kept.
        window: CT window (HU) clipped and scaled to [0, 1].
        seed: seed of the case-level split.
        fractions: (training, validation, test) fractions summing to 1.
        overwrite: replace prepared volumes already in ``out_dir``.
        limit: keep only the first ``limit`` cases (per folder).

    Raises:
        DatasetError: naming the file or folder at fault (see :func:`prepare_acdc_data`), and for h5 volumes when
            h5py is not installed.
    """
    if label_map not in LABEL_MAPS:
        raise DatasetError(f"label_map must be one of {LABEL_MAPS}, got {label_map!r}.")
    window_ct(np.zeros(1), window)  # validates the window
    _check_common(limit, fractions)
    source = find_synapse(synapse_dir, limit)
    pre_processed = source.layout.startswith("TransUNet")
    eight = pre_processed or label_map == "synapse8"
    num_classes = 9 if eight else 14

    def convert(case: VolumeCase, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if pre_processed and image.size and 0.0 <= float(image.min()) and float(image.max()) <= 1.0:
            image = np.asarray(image, dtype=np.float32)
        else:
            image = window_ct(image, window)
        if pre_processed or label_map == "none":
            return image, check_labels(label, num_classes, case.label)
        return image, remap_labels(check_labels(label, 14, case.label), BTCV_TO_SYNAPSE8)

    metadata = {
        "modality": "CT",
        "num_classes": num_classes,
        "labels": SYNAPSE8_LABELS if eight else BTCV_LABELS,
        "label_map": "synapse8 (TransUNet 8-organ subset)" if eight else "none (BTCV 13 organs)",
        "intensity": f"CT clipped to [{window[0]:g}, {window[1]:g}] HU and scaled to [0, 1]"
        + (" (TransUNet's npz/h5 images in [0, 1] kept)" if pre_processed else ""),
    }
    return _prepare_volumes(source, out_dir, convert, metadata, seed, fractions, overwrite)


# ----------------------------------------------------------------------------------------------------------------------
# 2D slices


def _spatial_axis(axis: int, ndim: int = 3) -> int:
    """``axis`` as a non-negative spatial axis of a 3D volume."""
    if not -ndim <= axis < ndim:
        raise DatasetError(f"slice axis {axis} is out of range for a {ndim}D volume.")
    return axis % ndim


def _slice_indices(label: np.ndarray, axis: int, skip_empty: bool) -> list[int]:
    """The slice indices along ``axis``, only those with foreground when ``skip_empty``."""
    if not skip_empty:
        return list(range(label.shape[axis]))
    other = tuple(a for a in range(label.ndim) if a != axis)
    return [int(k) for k in np.flatnonzero(np.any(label != 0, axis=other))]


def slice_datalist(
    entries: Sequence[Mapping[str, object]], axis: int = -1, skip_empty: bool = False, base_dir: str | None = None
) -> list[dict[str, object]]:
    """Expand volume entries into one entry per 2D slice, with the slice index under ``"slice"``.

    Reads each label volume once to count (and, with ``skip_empty``, select) the slices. Use the result with
    ``LoadImaged`` + ``EnsureChannelFirstd`` + :class:`SelectSliced`; with ``CacheDataset`` each volume is then read
    once per slice while caching, which suits small volumes (ACDC). For CT, prefer :func:`write_slices`.

    Args:
        entries: volume entries with "image" and "label" paths (for example from ``load_decathlon_datalist``).
        axis: the slicing axis of the (H, W, Z) volume (-1: Z).
        skip_empty: keep only slices whose label has foreground.
        base_dir: folder that relative paths are relative to (default: the working folder).

    Raises:
        DatasetError: for an unreadable or non-3D label volume.
    """
    spatial = _spatial_axis(axis)
    expanded = []
    for entry in entries:
        path = Path(str(entry["label"]))
        path = Path(base_dir) / path if base_dir is not None and not path.is_absolute() else path
        label = _nifti_array(_load_nifti(path), path, "label")
        expanded += [{**entry, "slice": k} for k in _slice_indices(label, spatial, skip_empty)]
    return expanded


class SelectSliced(MapTransform):
    """Dictionary transform taking the 2D slice ``data[slice_key]`` of channel-first 3D arrays.

    After ``LoadImaged`` + ``EnsureChannelFirstd`` the arrays are ``(C, H, W, Z)``; the result is ``(C, H, W)``
    (for ``axis=-1``). Use it with the entries of :func:`slice_datalist`.

    Args:
        keys: the keys to slice (for example ``("image", "label")``).
        slice_key: the key holding the slice index (as written by :func:`slice_datalist`).
        axis: spatial axis of the volume to slice (-1: the last, Z).
        allow_missing_keys: do not raise when a key is missing.
    """

    def __init__(
        self, keys: KeysCollection, slice_key: str = "slice", axis: int = -1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key = slice_key
        self.spatial = _spatial_axis(axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with the slice of each key."""
        result = dict(data)
        selector = (slice(None),) * (1 + self.spatial) + (int(result[self.slice_key]),)
        for key in self.key_iterator(result):
            result[key] = result[key][selector]
        return result


def _read_volume_datalist(path: Path, keys: Sequence[str]) -> tuple[dict[str, list[dict]], dict]:
    """The ``keys`` sections (paths made absolute) and the metadata of a volume datalist."""
    if not path.is_file():
        raise DatasetError(f"volume datalist {path} not found; prepare the volumes first (--acdc / --synapse).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"volume datalist {path} is not valid JSON ({err}).") from err
    unknown = [k for k in keys if k not in SPLIT_KEYS]
    if unknown:
        raise DatasetError(f"unknown split keys {unknown}; use {list(SPLIT_KEYS)}.")
    sections = {}
    for key in keys:
        entries = data.get(key, [])
        for entry in entries:
            for item in ("image", "label"):
                entry[item] = str(path.parent / entry[item])
        sections[key] = entries
    return sections, data.get("metadata", {})


def write_slices(
    datalist_path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    axis: int = -1,
    splits: Sequence[str] = ("training",),
    skip_empty: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the 2D slices of prepared volumes as NPY files with their own datalist; return its path.

    Layout: ``<out_dir>/images/<case>_<k>.npy`` (float32 (H, W) for ``axis=-1``), ``<out_dir>/labels/<case>_<k>.npy``
    (uint8) and ``<out_dir>/datalist.json`` (entries with "case" and "slice"; the splits not in ``splits`` are empty;
    "metadata" is the volumes' plus "slice_axis"). ``<k>`` has at least three digits.

    Args:
        datalist_path: the volume datalist written by :func:`prepare_acdc_data` / :func:`prepare_synapse_data`.
        out_dir: output folder; default ``<datalist folder>/slices``.
        axis: slicing axis of the (H, W, Z) volumes (-1: Z).
        splits: which splits to slice (validation and test are usually evaluated per volume).
        skip_empty: keep only slices whose label has foreground.
        overwrite: replace slices already in ``out_dir``.

    Raises:
        DatasetError: for a missing or invalid datalist, unknown split keys, an unreadable volume, or an output folder
            that already holds data without ``overwrite``.
    """
    datalist_path = Path(datalist_path)
    spatial = _spatial_axis(axis)
    sections, metadata = _read_volume_datalist(datalist_path, splits)
    out_dir = Path(out_dir) if out_dir is not None else datalist_path.parent / SLICES_DIR
    entries: dict[str, list[dict[str, object]]] = {key: [] for key in SPLIT_KEYS}
    with staged_output(out_dir, overwrite, subdirs=(IMAGES_DIR, LABELS_DIR), suffixes=(".npy",)) as staging:
        for key, volumes in sections.items():
            for volume in volumes:
                image_path, label_path = Path(volume["image"]), Path(volume["label"])
                image = _nifti_array(_load_nifti(image_path), image_path, "image").astype(np.float32)
                label = _nifti_array(_load_nifti(label_path), label_path, "label").astype(np.uint8)
                _check_shapes(image, label, image_path, label_path)
                case = volume.get("case", _case_name(image_path))
                for k in _slice_indices(label, spatial, skip_empty):
                    name = f"{case}_{k:03d}"
                    np.save(staging / IMAGES_DIR / f"{name}.npy", np.ascontiguousarray(np.take(image, k, spatial)))
                    np.save(staging / LABELS_DIR / f"{name}.npy", np.ascontiguousarray(np.take(label, k, spatial)))
                    entries[key].append(
                        {
                            "image": f"{IMAGES_DIR}/{name}.npy",
                            "label": f"{LABELS_DIR}/{name}.npy",
                            "case": case,
                            "slice": k,
                        }
                    )
        slice_metadata = {**metadata, "slice_axis": spatial, "skip_empty": skip_empty, "sliced_splits": list(splits)}
        write_datalist(staging / DATALIST_NAME, entries, metadata=slice_metadata, info_keys=("case", "slice"))
    logger.info("wrote %s (%s slices)", out_dir / DATALIST_NAME, ", ".join(f"{k} {len(v)}" for k, v in entries.items()))
    return out_dir / DATALIST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m kd_components.data.volumes``."""
    parser = preparer_parser(
        "volumes",
        "Convert ACDC (SSL4MIS imagesTr/ + labelsTr/ or the official release) or Synapse / BTCV (img/ + label/ "
        "NIfTI, or TransUNet's train_npz/ + test_vol_h5/) into OUT/volumes/{images,labels}/<case>.nii.gz "
        "(float32 [0, 1] images, uint8 labels) and OUT/datalist.json with a patient-level "
        "training/validation/test split; --slices also writes 2D NPY slices for training to OUT/slices/.",
        limit="patients / cases per folder",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--acdc", metavar="DIR", help="ACDC folder (or a folder holding it)")
    source.add_argument("--synapse", metavar="DIR", help="Synapse / BTCV folder (or a folder holding it)")
    parser.add_argument("--normalise", choices=NORMALISATIONS, default="minmax", help="ACDC intensity scaling")
    parser.add_argument(
        "--percentiles", type=float, nargs=2, default=list(DEFAULT_PERCENTILES), metavar=("LOW", "HIGH")
    )
    parser.add_argument("--ignore-splits", action="store_true", help="ignore ACDC's splits.csv: seeded split")
    parser.add_argument("--label-map", choices=LABEL_MAPS, default="none", help="BTCV labels: 13 organs or synapse8")
    parser.add_argument("--window", type=float, nargs=2, default=list(CT_WINDOW), metavar=("LOW", "HIGH"))
    parser.add_argument("--slices", action="store_true", help="also write 2D NPY slices to OUT/slices/")
    parser.add_argument("--slice-splits", nargs="+", default=["training"], choices=SPLIT_KEYS, metavar="SPLIT")
    parser.add_argument("--skip-empty-slices", action="store_true", help="write only slices with foreground")
    return parser


def _prepare_from_cli(args: argparse.Namespace) -> list[Path]:
    """The volumes' datalist (ACDC or Synapse, as ``args`` say), then the slices' datalist with ``--slices``."""
    if args.acdc is not None:
        percentiles, use_splits = tuple(args.percentiles), not args.ignore_splits
        path = prepare_acdc_data(
            args.acdc,
            normalise=args.normalise,
            percentiles=percentiles,
            use_splits=use_splits,
            **shared_arguments(args),
        )
    else:
        path = prepare_synapse_data(
            args.synapse, label_map=args.label_map, window=tuple(args.window), **shared_arguments(args)
        )
    if not args.slices:
        return [path]
    return [path, write_slices(path, None, -1, args.slice_splits, args.skip_empty_slices, args.overwrite)]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 for a dataset error).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    return run_preparer(_prepare_from_cli, args=build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
