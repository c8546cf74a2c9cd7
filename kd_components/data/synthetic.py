"""Synthetic polyp-like segmentation data, in the same layout as the prepared Kvasir-SEG / CVC-ClinicDB data.

Each image is a textured pink/red "mucosa" background (smooth two-scale texture, uneven lighting, vignetting,
pixel noise) with 0 to ``max_blobs`` polyp-like blobs: rotated ellipses, somewhat paler and smoother than the
background, with dome shading (brighter centre, darker rim), a soft edge and a faint shadow ring, plus small
specular highlights anywhere. The colours of blob and background vary from image to image and overlap, so no
single-channel threshold separates them (best global one: Dice about 0.46 on the default 64 images), while shape,
shading and texture make the task easy for a small UNet (MONAI UNet, 4 levels from 16 channels: validation Dice
about 0.8 after 4 epochs on 256 images of 64x64).

Output (see :mod:`kd_components.data.common`)::

    <out>/images/synthetic_<i>.png    RGB uint8
    <out>/labels/synthetic_<i>.png    uint8, 0 = background, 1 = polyp
    <out>/datalist.json               seeded file-name-based training / validation / test split

Command line::

    python -m kd_components.data.synthetic --out DIR --n 64 --size 64 64 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_components.data.cli import preparer_parser, run_preparer, shared_arguments
from kd_components.data.common import (
    DATALIST_NAME,
    DEFAULT_FRACTIONS,
    IMAGES_DIR,
    LABELS_DIR,
    DatasetError,
    datalist_entries,
    save_png,
    split_names,
    staged_output,
    write_datalist,
)

__all__ = ["main", "make_synthetic_polyps", "synthetic_polyp", "synthetic_polyp_arrays"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-scale smooth noise: a ``(cells + 1)^2`` grid of normal values, bilinearly upsampled."""
    height, width = shape
    grid = rng.standard_normal((cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, height), np.linspace(0, cells, width)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mucosa-like RGB background (float, 0..255 scale) and its base colour."""
    shape = yy.shape
    red = rng.uniform(165, 215)
    base = np.array([red, red * rng.uniform(0.42, 0.6), red * rng.uniform(0.42, 0.62)])
    texture = 0.09 * _smooth_noise(rng, shape, 3) + 0.06 * _smooth_noise(rng, shape, 10)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.0, 0.25) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    vignette = rng.uniform(0.2, 0.6) * ((yy - cy) ** 2 + (xx - cx) ** 2)
    brightness = (1 + texture + gradient - vignette)[..., None]
    tint = 1 + 0.04 * np.stack([_smooth_noise(rng, shape, 4) for _ in range(3)], axis=-1)
    return base * brightness * tint, base


def _add_blob(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, base: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> None:
    """Paint one shaded, soft-edged elliptical blob into ``image`` (in place) and mark it in ``mask``."""
    cy, cx = rng.uniform(0.15, 0.85, size=2)
    semi_axes = rng.uniform(0.07, 0.22, size=2)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    r = np.sqrt((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2)
    inside = r < 1
    if not inside.any():
        return
    colour = base * np.array([rng.uniform(0.98, 1.12), rng.uniform(1.1, 1.4), rng.uniform(1.0, 1.3)])
    dome = 0.78 + 0.32 * np.sqrt(np.clip(1 - r**2, 0, 1))
    texture = 1 + 0.04 * _smooth_noise(rng, yy.shape, 6)
    blob = colour * (dome * texture)[..., None]
    alpha = np.clip((1 - r) / 0.15, 0, 1)[..., None]
    shadow = 1 - rng.uniform(0.1, 0.25) * np.clip(1 - np.abs(r - 1.05) / 0.2, 0, 1)[..., None]
    image *= shadow * (1 - alpha)
    image += alpha * blob
    mask |= inside


def _add_highlights(rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> None:
    """Small specular (near-white) spots anywhere, as from the endoscope light; in place."""
    height, width = yy.shape
    for _ in range(rng.poisson(1.5)):
        cy, cx = rng.uniform(0.05, 0.95, size=2)
        radius = rng.uniform(0.7, 1.8) / max(height, width)
        spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]
        image += spot * (rng.uniform(235, 255) - image)


def synthetic_polyp(
    rng: np.random.Generator, size: tuple[int, int] = (64, 64), n_blobs: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic polyp image and its mask.

    Args:
        rng: numpy random generator (the only source of randomness).
        size: ``(H, W)`` of the image.
        n_blobs: number of blobs to draw (0 gives an all-background mask; a blob may fall partly outside).

    Returns:
        ``(image, mask)``: ``(H, W, 3)`` RGB uint8 and ``(H, W)`` uint8 with values 0 and 1.
    """
    height, width = size
    yy, xx = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    image, base = _background(rng, yy, xx)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(n_blobs):
        _add_blob(rng, image, mask, base, yy, xx)
    _add_highlights(rng, image, yy, xx)
    image += rng.normal(0, rng.uniform(3, 9), size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask.astype(np.uint8)


def _blob_counts(rng: np.random.Generator, n: int, max_blobs: int, empty_fraction: float) -> np.ndarray:
    """Blobs per image: 0 with probability ``empty_fraction``, else 1..max_blobs with weights 1/k."""
    weights = 1 / np.arange(1, max_blobs + 1)
    counts = rng.choice(np.arange(1, max_blobs + 1), size=n, p=weights / weights.sum())
    counts[rng.random(n) < empty_fraction] = 0
    return counts


def synthetic_polyp_arrays(
    n: int, size: tuple[int, int] = (64, 64), seed: int = 0, max_blobs: int = 3, empty_fraction: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic polyp images and masks in memory (the data :func:`make_synthetic_polyps` writes).

    Args:
        n: number of images.
        size: ``(H, W)`` of each image.
        seed: random seed; the same arguments always give the same arrays.
        max_blobs: most blobs per image (at least 1).
        empty_fraction: probability that an image has no blob, in [0, 1].

    Returns:
        ``(images, masks)``: ``(n, H, W, 3)`` uint8 RGB and ``(n, H, W)`` uint8 0/1.
    """
    _check_arguments(n, size, max_blobs, empty_fraction)
    rng = np.random.default_rng(seed)
    counts = _blob_counts(rng, n, max_blobs, empty_fraction)
    images = np.empty((n, *size, 3), dtype=np.uint8)
    masks = np.empty((n, *size), dtype=np.uint8)
    for i, n_blobs in enumerate(counts):
        images[i], masks[i] = synthetic_polyp(rng, size, int(n_blobs))
    return images, masks


def _check_arguments(n: int, size: Sequence[int], max_blobs: int, empty_fraction: float) -> None:
    """Raise DatasetError for arguments that cannot give a dataset."""
    if n < 1:
        raise DatasetError(f"n must be a positive number of images, got {n}.")
    if len(size) != 2 or min(size) < 8:
        raise DatasetError(f"size must be (H, W) with both at least 8 pixels, got {tuple(size)}.")
    if max_blobs < 1:
        raise DatasetError(f"max_blobs must be at least 1, got {max_blobs}.")
    if not 0 <= empty_fraction <= 1:
        raise DatasetError(f"empty_fraction must be in [0, 1], got {empty_fraction}.")


def make_synthetic_polyps(
    out_dir: str | os.PathLike,
    n: int = 64,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    overwrite: bool = False,
    max_blobs: int = 3,
    empty_fraction: float = 0.05,
) -> Path:
    """Write a synthetic polyp dataset in the prepared-data layout; return the datalist path.

    Writes ``<out_dir>/images/synthetic_<i>.png`` (RGB uint8), ``<out_dir>/labels/synthetic_<i>.png`` (uint8 0/1)
    and ``<out_dir>/datalist.json`` with the seeded file-name-based split, exactly like
    :func:`kd_components.data.polyp.prepare_polyp_data`, so a bundle runs on it as on real data.

    Args:
        out_dir: output folder, created if needed.
        n: number of images.
        size: ``(H, W)`` of each image.
        seed: seed of both the images and the split.
        fractions: (training, validation, test) fractions, summing to 1.
        overwrite: replace data already prepared in ``out_dir``.
        max_blobs: most blobs per image.
        empty_fraction: probability that an image has no blob (its mask is all 0).

    Raises:
        DatasetError: for invalid arguments, or an output folder that already holds data without ``overwrite``.
    """
    _check_arguments(n, size, max_blobs, empty_fraction)
    size = (int(size[0]), int(size[1]))
    names = [f"synthetic_{i:0{max(4, len(str(n - 1)))}d}" for i in range(n)]
    splits = split_names(names, fractions, seed)
    images, masks = synthetic_polyp_arrays(n, size, seed, max_blobs, empty_fraction)
    with staged_output(out_dir, overwrite) as staging:
        for name, image, mask in zip(names, images, masks):
            save_png(image, staging / IMAGES_DIR / f"{name}.png")
            save_png(mask, staging / LABELS_DIR / f"{name}.png")
        write_datalist(staging / DATALIST_NAME, datalist_entries(splits))
    return Path(out_dir) / DATALIST_NAME


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m kd_components.data.synthetic``."""
    parser = preparer_parser(
        "synthetic",
        "Write a synthetic polyp-like segmentation dataset (OUT/images/*.png RGB, OUT/labels/*.png 0/1, "
        "OUT/datalist.json with a seeded split), in the same layout as the prepared Kvasir-SEG data.",
        seeds="the images and the split",
    )
    parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="image size")
    parser.add_argument("--max-blobs", type=int, default=3, help="most blobs per image (default: 3)")
    parser.add_argument(
        "--empty-fraction", type=float, default=0.05, help="probability of an image without blob (default: 0.05)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 for a dataset error).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    args = build_parser().parse_args(argv)
    return run_preparer(
        make_synthetic_polyps,
        n=args.n,
        size=tuple(args.size),
        max_blobs=args.max_blobs,
        empty_fraction=args.empty_fraction,
        **shared_arguments(args),
    )


if __name__ == "__main__":
    sys.exit(main())
