"""Synthetic thin-vessel segmentation data, in the same layout as the prepared DRIVE / CHASE_DB1 / ARCADE / XCAD data.

Each image holds 2 to 4 vessel trees grown as branching random walks: a branch takes steps of 1.5 px with a smoothly
varying turning rate, its width tapers from the trunk's 3 to 4.2 px to 60 % of it, and it spawns side branches
(0.6 to 0.8 times as wide, at 25 to 60 degrees) down to a width of 1 px and three levels of branching. The label is
the branches drawn with ``PIL.ImageDraw`` at their rounded width (1 to 4 px), so nearly every vessel pixel is within
2 px of the background.

The image is a textured background (two-scale smooth noise, a brightness gradient, vignetting, pixel noise) in which
vessels are darker (default) or brighter with a soft profile (the label blurred with a Gaussian of about 0.7 px, so
1-px vessels keep only part of the contrast) and a contrast that varies from image to image and along the vessels.
Background variations are larger than the vessel contrast, so no global threshold separates them (best global
threshold on the green / grey channel: Dice about 0.3 on 16 images of 96x96), while local contrast and shape make the
task learnable: a small MONAI UNet (4 levels from 16 channels, one residual unit) reaches a Dice of about 0.85 and a
clDice of about 0.89 on 32 held-out images after 12 epochs on 192 images of 64x64 (fundus or X-ray).

- ``modality="fundus"``: RGB, orange-red fundus colours (vessels darkest in green), a bright optic disc where the trees
  start, and by default a circular field of view (black outside; labels restricted to it).
- ``modality="xray"``: grey, as an angiogram: large smooth anatomy-like shading, trees starting near the border, no
  field of view by default.

Output (see :mod:`kd_components.data.common` and :mod:`kd_components.data.vessels`)::

    <out>/images/synthetic_vessels_<i>.png    RGB (fundus) or grey (xray) uint8
    <out>/labels/synthetic_vessels_<i>.png    uint8, 0 = background, 1 = vessel
    <out>/fov/synthetic_vessels_<i>.png       uint8 0/1 field of view (when ``fov``)
    <out>/datalist.json                       seeded split, entries {"image", "label"[, "fov"]}, "unlabeled": [],
                                              "metadata" (channels, modality...)

Command line::

    python -m kd_components.data.synthetic_vessels --out DIR --n 64 --size 96 96 --seed 0 [--modality xray]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_components.data.cli import preparer_parser, run_preparer, shared_arguments
from kd_components.data.common import (
    DATALIST_NAME,
    DEFAULT_FRACTIONS,
    FOV_DIR,
    IMAGES_DIR,
    LABELS_DIR,
    SPLIT_KEYS,
    DatasetError,
    save_png,
    split_names,
    staged_output,
    write_datalist,
)
from kd_components.data.synthetic import _smooth_noise

__all__ = ["MODALITIES", "main", "make_synthetic_vessels", "synthetic_vessel", "synthetic_vessel_arrays"]

MODALITIES = ("fundus", "xray")
CONTRASTS = ("dark", "bright", "mixed")
STEP = 1.5
MAX_DEPTH = 3
Branch = tuple[np.ndarray, np.ndarray]  # (points (N, 2) as (x, y), widths (N,))


# ----------------------------------------------------------------------------------------------------------------------
# vessel trees


def _grow(
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    width: float,
    length: float,
    depth: int,
    size: tuple[int, int],
    branches: list[Branch],
) -> None:
    """Grow one branch as a random walk from ``start`` (appending it and its side branches to ``branches``).

    Args:
        rng: random generator.
        start: ``(x, y)`` start point in pixels.
        angle: initial direction in radians.
        width: width at the start, tapering to 60 % at the end.
        length: length in pixels (shorter when the branch leaves the image).
        depth: branching level (0 for a trunk); side branches stop at :data:`MAX_DEPTH`.
        size: ``(H, W)`` of the image.
        branches: output list of ``(points, widths)``.
    """
    height, width_px = size
    steps = max(2, int(length / STEP))
    wobble, turn = rng.uniform(0.02, 0.07), 0.0
    points, widths = [np.asarray(start, dtype=float)], [width]
    for i in range(1, steps + 1):
        turn = 0.8 * turn + rng.normal(0, wobble)
        angle += turn
        point = points[-1] + STEP * np.array([math.cos(angle), math.sin(angle)])
        if not (-2 <= point[0] <= width_px + 2 and -2 <= point[1] <= height + 2):
            break
        current = width * (1 - 0.4 * i / steps)
        points.append(point)
        widths.append(current)
        if depth < MAX_DEPTH and current * 0.7 >= 0.9 and rng.random() < 0.05:
            side = angle + rng.choice([-1, 1]) * rng.uniform(0.45, 1.05)
            child_length = (steps - i) * STEP * rng.uniform(0.5, 0.9)
            _grow(rng, point, side, current * rng.uniform(0.6, 0.8), child_length, depth + 1, size, branches)
    if len(points) > 1:
        branches.append((np.stack(points), np.asarray(widths)))


def _trees(rng: np.random.Generator, size: tuple[int, int], modality: str) -> tuple[list[Branch], np.ndarray]:
    """The branches of 2 to 4 trees and their common root ``(x, y)`` (fundus) or first root (x-ray)."""
    height, width = size
    extent = max(height, width)
    branches: list[Branch] = []
    if modality == "fundus":  # trees leave the optic disc in all directions
        root = np.array([rng.uniform(0.3, 0.7) * width, rng.uniform(0.35, 0.65) * height])
        n_trees = int(rng.integers(2, 5))
        angles = rng.uniform(0, 2 * np.pi) + np.arange(n_trees) * 2 * np.pi / n_trees + rng.normal(0, 0.3, n_trees)
        for angle in angles:
            _grow(rng, root, angle, rng.uniform(3.0, 4.2), rng.uniform(0.5, 0.9) * extent, 0, size, branches)
        return branches, root
    roots = []
    for _ in range(int(rng.integers(2, 4))):  # trees enter near a border and head for the centre
        along, inset = rng.uniform(0.15, 0.85), rng.uniform(0, 0.1)
        x, y = ((along, inset), (along, 1 - inset), (inset, along), (1 - inset, along))[int(rng.integers(4))]
        root = np.array([x * width, y * height])
        angle = math.atan2(height / 2 - root[1], width / 2 - root[0]) + rng.normal(0, 0.4)
        _grow(rng, root, angle, rng.uniform(3.0, 4.2), rng.uniform(0.6, 1.0) * extent, 0, size, branches)
        roots.append(root)
    return branches, roots[0]


def _draw_label(branches: Sequence[Branch], size: tuple[int, int]) -> np.ndarray:
    """The branches drawn at their rounded widths (1 to 4 px) as an ``(H, W)`` bool mask."""
    from PIL import Image, ImageDraw

    height, width = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for points, widths in branches:
        rounded = np.clip(np.round(widths), 1, 4).astype(int)
        cuts = np.flatnonzero(np.diff(rounded)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(points)]):
            run = points[max(0, lo - 1) : hi]  # overlap one point so that the runs join
            if len(run) > 1:
                draw.line([tuple(p) for p in run], fill=1, width=int(rounded[lo]), joint="curve")
    return np.asarray(canvas, dtype=bool)


# ----------------------------------------------------------------------------------------------------------------------
# images


def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: ``(yy, xx)``."""
    height, width = size
    return np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")


def _shading(rng: np.random.Generator, size: tuple[int, int], smooth: float, fine: float) -> np.ndarray:
    """Multiplicative background brightness around 1: smooth noise, a gradient and vignetting."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.0, 0.25) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    vignette = rng.uniform(0.3, 0.8) * ((yy - cy) ** 2 + (xx - cx) ** 2)
    return 1 + smooth * _smooth_noise(rng, size, 3) + fine * _smooth_noise(rng, size, 9) + gradient - vignette


def _vessel_profile(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """Soft vessel opacity in [0, 1]: the label blurred (thin vessels keep less), times a contrast varying in space."""
    from PIL import Image, ImageFilter

    blurred = Image.fromarray(label.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.9)))
    density = np.asarray(blurred, dtype=np.float32) / 255
    contrast = rng.uniform(0.18, 0.4) * (0.75 + 0.25 * np.tanh(_smooth_noise(rng, label.shape, 4)))
    return np.clip(density * 1.3, 0, 1) * contrast


def _disc(size: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    """Bool disc of ``radius`` px around ``centre`` ``(x, y)``."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (xx + 0.5 - centre[0]) ** 2 + (yy + 0.5 - centre[1]) ** 2 < radius**2


def _fundus_image(
    rng: np.random.Generator, opacity: np.ndarray, sign: float, root: np.ndarray, fov: np.ndarray | None
) -> np.ndarray:
    """RGB fundus-like image (float, 0..255 scale)."""
    size = opacity.shape
    base = np.array([rng.uniform(170, 225), rng.uniform(65, 110), rng.uniform(20, 50)])
    image = base * _shading(rng, size, 0.12, 0.06)[..., None]
    yy, xx = np.mgrid[: size[0], : size[1]]
    radius = rng.uniform(0.05, 0.08) * max(size)  # optic disc: bright yellowish spot at the trees' root
    disc = np.exp(-((xx + 0.5 - root[0]) ** 2 + (yy + 0.5 - root[1]) ** 2) / (2 * radius**2))[..., None]
    image += disc * (np.array([250, 220, 150]) - image) * rng.uniform(0.5, 0.8)
    image *= 1 - sign * opacity[..., None] * np.array([0.55, 1.0, 0.75])
    image += rng.normal(0, rng.uniform(2, 6), size=image.shape)
    if fov is not None:
        image[~fov] = rng.uniform(0, 4, size=(int((~fov).sum()), 3))
    return image


def _xray_image(rng: np.random.Generator, opacity: np.ndarray, sign: float, fov: np.ndarray | None) -> np.ndarray:
    """Grey angiogram-like image (float, 0..255 scale)."""
    image = rng.uniform(110, 170) * _shading(rng, opacity.shape, 0.18, 0.07)
    image *= 1 - sign * opacity
    image += rng.normal(0, rng.uniform(3, 8), size=image.shape)
    if fov is not None:
        image[~fov] = rng.uniform(0, 4, size=int((~fov).sum()))
    return image


def synthetic_vessel(
    rng: np.random.Generator,
    size: tuple[int, int] = (96, 96),
    modality: str = "fundus",
    fov: bool | None = None,
    contrast: str = "dark",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One synthetic vessel image, its label and its field of view.

    Args:
        rng: numpy random generator (the only source of randomness).
        size: ``(H, W)`` of the image.
        modality: ``"fundus"`` (RGB) or ``"xray"`` (grey).
        fov: add a circular field of view (black outside, labels restricted to it); None: for fundus only.
        contrast: vessels ``"dark"``er or ``"bright"``er than the background, or ``"mixed"`` (drawn per image).

    Returns:
        ``(image, label, fov)``: ``(H, W, 3)`` or ``(H, W)`` uint8; ``(H, W)`` uint8 0/1; ``(H, W)`` uint8 0/1 or None.
    """
    size = (int(size[0]), int(size[1]))
    use_fov = modality == "fundus" if fov is None else fov
    branches, root = _trees(rng, size, modality)
    label = _draw_label(branches, size)
    mask = None
    if use_fov:
        centre = np.array([size[1], size[0]]) / 2 + rng.normal(0, 0.02 * min(size), 2)
        mask = _disc(size, centre, rng.uniform(0.46, 0.54) * min(size))
        label &= mask
    bright = contrast == "bright" or (contrast == "mixed" and rng.random() < 0.5)
    sign = -1.0 if bright else 1.0
    opacity = _vessel_profile(rng, label)
    if modality == "fundus":
        image = _fundus_image(rng, opacity, sign, root, mask)
    else:
        image = _xray_image(rng, opacity, sign, mask)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, label.astype(np.uint8), None if mask is None else mask.astype(np.uint8)


def _check_arguments(n: int, size: Sequence[int], modality: str, contrast: str) -> None:
    """Raise DatasetError for arguments that cannot give a dataset."""
    if n < 1:
        raise DatasetError(f"n must be a positive number of images, got {n}.")
    if len(size) != 2 or min(size) < 16:
        raise DatasetError(f"size must be (H, W) with both at least 16 pixels, got {tuple(size)}.")
    if modality not in MODALITIES:
        raise DatasetError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    if contrast not in CONTRASTS:
        raise DatasetError(f"contrast must be one of {CONTRASTS}, got {contrast!r}.")


def synthetic_vessel_arrays(
    n: int,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    modality: str = "fundus",
    fov: bool | None = None,
    contrast: str = "dark",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``n`` synthetic vessel images, labels and FOV masks in memory (the data :func:`make_synthetic_vessels` writes).

    Args:
        n: number of images.
        size: ``(H, W)`` of each image.
        seed: random seed; the same arguments always give the same arrays.
        modality: ``"fundus"`` (RGB) or ``"xray"`` (grey).
        fov: add a circular field of view; None: for fundus only.
        contrast: ``"dark"``, ``"bright"`` or ``"mixed"`` vessels.

    Returns:
        ``(images, labels, fovs)``: ``(n, H, W, 3)`` or ``(n, H, W)`` uint8, ``(n, H, W)`` uint8 0/1, and
        ``(n, H, W)`` uint8 0/1 or None without field of view.
    """
    _check_arguments(n, size, modality, contrast)
    rng = np.random.default_rng(seed)
    samples = [synthetic_vessel(rng, size, modality, fov, contrast) for _ in range(n)]
    images = np.stack([s[0] for s in samples])
    labels = np.stack([s[1] for s in samples])
    fovs = None if samples[0][2] is None else np.stack([s[2] for s in samples])
    return images, labels, fovs


def make_synthetic_vessels(
    out_dir: str | os.PathLike,
    n: int = 64,
    size: tuple[int, int] = (96, 96),
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    overwrite: bool = False,
    modality: str = "fundus",
    fov: bool | None = None,
    contrast: str = "dark",
) -> Path:
    """Write a synthetic vessel dataset in the prepared-data layout of :mod:`kd_components.data.vessels`.

    Writes ``<out_dir>/images/synthetic_vessels_<i>.png``, ``labels/`` (0/1), ``fov/`` (0/1, with a field of view)
    and ``datalist.json`` (seeded file-name-based split, entries ``{"image", "label"[, "fov"]}``, an empty
    ``unlabeled`` section and a ``metadata`` object with the channel count), so a bundle runs on it as on real data.

    Args:
        out_dir: output folder, created if needed.
        n: number of images.
        size: ``(H, W)`` of each image.
        seed: seed of both the images and the split.
        fractions: (training, validation, test) fractions, summing to 1.
        overwrite: replace data already prepared in ``out_dir``.
        modality: ``"fundus"`` (RGB) or ``"xray"`` (grey).
        fov: add a circular field of view; None: for fundus only.
        contrast: ``"dark"``, ``"bright"`` or ``"mixed"`` vessels.

    Returns:
        the path of the datalist.

    Raises:
        DatasetError: for invalid arguments, or an output folder that already holds data without ``overwrite``.
    """
    _check_arguments(n, size, modality, contrast)
    size = (int(size[0]), int(size[1]))
    names = [f"synthetic_vessels_{i:0{max(4, len(str(n - 1)))}d}" for i in range(n)]
    splits = split_names(names, fractions, seed)
    images, labels, fovs = synthetic_vessel_arrays(n, size, seed, modality, fov, contrast)
    entries: dict[str, dict[str, Path]] = {}
    with staged_output(out_dir, overwrite) as staging:
        if fovs is not None:
            (staging / FOV_DIR).mkdir()
        for i, name in enumerate(names):
            entries[name] = {
                "image": save_png(images[i], staging / IMAGES_DIR / f"{name}.png"),
                "label": save_png(labels[i], staging / LABELS_DIR / f"{name}.png"),
            }
            if fovs is not None:
                entries[name]["fov"] = save_png(fovs[i], staging / FOV_DIR / f"{name}.png")
        metadata = {
            "dataset": "synthetic_vessels",
            "modality": modality,
            "channels": 3 if modality == "fundus" else 1,
            "labels": {"0": "background", "1": "vessel"},
            "fov": "synthetic circular field of view" if fovs is not None else None,
            "official_splits": [],
            "seed": seed,
            "fractions": [float(f) for f in fractions],
            "size": list(size),
            "contrast": contrast,
            "counts": {key: len(splits[key]) for key in SPLIT_KEYS},
        }
        split_entries = {key: [entries[name] for name in splits[key]] for key in SPLIT_KEYS}
        write_datalist(staging / DATALIST_NAME, split_entries, extra_keys=("fov",), unlabeled=[], metadata=metadata)
    return Path(out_dir) / DATALIST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m kd_components.data.synthetic_vessels``."""
    parser = preparer_parser(
        "synthetic_vessels",
        "Write a synthetic thin-vessel segmentation dataset (OUT/images/*.png, OUT/labels/*.png 0/1, OUT/fov/*.png "
        "for fundus, OUT/datalist.json with a seeded split), in the layout of kd_components.data.vessels.",
        seeds="the images and the split",
    )
    parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--size", type=int, nargs=2, default=[96, 96], metavar=("H", "W"), help="image size")
    parser.add_argument("--modality", choices=MODALITIES, default="fundus", help="fundus (RGB) or xray (grey)")
    fov = parser.add_mutually_exclusive_group()
    fov.add_argument("--fov", dest="fov", action="store_true", default=None, help="circular field of view")
    fov.add_argument("--no-fov", dest="fov", action="store_false", help="no field of view")
    parser.add_argument("--contrast", choices=CONTRASTS, default="dark", help="vessel polarity (default: dark)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 for a dataset error).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    args = build_parser().parse_args(argv)
    return run_preparer(
        make_synthetic_vessels,
        n=args.n,
        size=tuple(args.size),
        modality=args.modality,
        fov=args.fov,
        contrast=args.contrast,
        **shared_arguments(args),
    )


if __name__ == "__main__":
    sys.exit(main())
