"""Synthetic cardiac-MRI-like volumes in the SSL4MIS ACDC layout, to run the volume bundles without real data.

Each volume holds, on every slice, a left-ventricle disc (label 3) inside a myocardium ring (2) with a right-ventricle
ellipse (1) beside it, smaller towards base and apex, on a dark noisy background; intensities are min-max scaled to
[0, 1] per volume, as in the SSL4MIS copy. The output is raw data for
:func:`kd_components.data.volumes.prepare_acdc_data` (then :func:`kd_components.data.volumes.write_slices` for the 2D
training slices)::

    <out>/imagesTr/patient<NNN>_frame<01|02>.nii.gz    float32 (H, W, Z), identity affine, no qform / sform code
    <out>/labelsTr/patient<NNN>_frame<01|02>.nii.gz    uint8 0..3
    <out>/splits.csv                                    image, label, split_ssl4mis ("train" / "val")
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["make_synthetic_volumes", "synthetic_heart_volume"]


def synthetic_heart_volume(
    rng: np.random.Generator, shape: tuple[int, int, int] = (40, 36, 4)
) -> tuple[np.ndarray, np.ndarray]:
    """One cardiac-MRI-like volume: LV (3) disc, myocardium (2) ring around it, RV (1) ellipse beside it.

    Args:
        rng: the random generator (position, size and noise).
        shape: ``(H, W, Z)``.

    Returns:
        the image (H, W, Z) float32 in [0, 1] (per-volume min-max) and the label (H, W, Z) uint8.
    """
    h, w, z = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.5, 0.6)
    radius = min(h, w) * rng.uniform(0.11, 0.15)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    for k in range(z):
        r = radius * (1.0 - 0.4 * abs(k - (z - 1) / 2) / z)  # smaller towards base and apex
        lv = ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2
        rv = ((yy - cy) / (1.3 * r)) ** 2 + ((xx - cx + 2.2 * r) / (0.8 * r)) ** 2
        label[rv <= 1, k] = 1
        label[lv <= 1.9, k] = 2
        label[lv <= 1, k] = 3
        image[..., k] = np.choose(label[..., k], [0.15, 0.75, 0.35, 0.9]) + rng.normal(0, 0.05, (h, w))
    image = (image - image.min()) / (image.max() - image.min())
    return image.astype(np.float32), label


def _save_nifti(path: Path, array: np.ndarray) -> None:
    """NIfTI with an identity affine and no qform / sform code, as the shared SSL4MIS copy (spacing unknown)."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.eye(4))
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    nib.save(image, str(path))


def make_synthetic_volumes(
    out_dir: str | os.PathLike,
    patients: int = 9,
    shape: tuple[int, int, int] = (40, 36, 4),
    val: Sequence[int] = (2, 7),
    seed: int = 0,
) -> Path:
    """Write ACDC-like volumes in the SSL4MIS layout: ``imagesTr/`` + ``labelsTr/`` (two frames per patient) and
    ``splits.csv``.

    Args:
        out_dir: output folder, created if needed (existing files of the same names are replaced).
        patients: number of patients, numbered from 1.
        shape: ``(H, W, Z)`` of every volume.
        val: the patient numbers of the ``"val"`` split of ``splits.csv``; the others are ``"train"``.
        seed: seed of the volumes.

    Returns:
        ``out_dir`` as a path, ready for :func:`kd_components.data.volumes.prepare_acdc_data`.
    """
    if patients < 1:
        raise ValueError(f"patients must be positive, got {patients}.")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(1, patients + 1):
        for frame in ("01", "02"):
            name = f"patient{number:03d}_frame{frame}.nii.gz"
            image, label = synthetic_heart_volume(rng, tuple(shape))
            _save_nifti(root / "imagesTr" / name, image)
            _save_nifti(root / "labelsTr" / name, label)
            split = "val" if number in val else "train"
            rows.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "split_ssl4mis": split})
    with (root / "splits.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label", "split_ssl4mis"])
        writer.writeheader()
        writer.writerows(rows)
    return root
