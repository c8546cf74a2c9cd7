"""Prepare the polyp bundle's data folder from the official Kvasir-SEG and CVC-ClinicDB releases.

Input layouts (the folder given, or its parent when exactly one child folder has the layout):

- Kvasir-SEG (the official ``kvasir-seg.zip`` unpacks to ``Kvasir-SEG/``): ``images/*.jpg`` and ``masks/*.jpg``
  with the same file names; masks are grey JPEGs, 255 = polyp, with JPEG noise around the edges.
- CVC-ClinicDB: ``Original/*.tif`` and ``Ground Truth/*.tif`` (also ``.tiff`` / ``.png``, and the folder spellings
  ``GroundTruth`` / ``Ground_Truth``, which some mirrors use).

Output layout (see :mod:`kd_components.data.common`)::

    <out>/images/<dataset>_<stem>.png    RGB uint8
    <out>/labels/<dataset>_<stem>.png    uint8, 0 = background, 1 = polyp
    <out>/datalist.json                  seeded file-name-based training / validation / test split

``<dataset>`` is ``kvasir`` or ``clinicdb``. Masks are converted to grey (ITU-R 601 luma for RGB masks) and
thresholded at ``> 127``; lossless masks (PNG/TIFF) that already hold only 0 and 1 are kept as they are. With
``max_size``, images whose longest side is larger are shrunk, keeping the aspect ratio: the image with antialiased
bilinear resampling; the mask is thresholded first at full resolution (which removes the JPEG noise), then resampled
with the same filter and thresholded again at one half, i.e. a local majority vote on the same sampling grid as the
image. That keeps the labels exactly 0/1 and avoids the aliasing of nearest-neighbour shrinking.

The split is made per dataset (so each dataset contributes the same fractions to each split) with
:func:`kd_components.data.common.split_names`. Note that CVC-ClinicDB frames come from 29 video sequences, so a
frame-level split puts near-identical frames in training and test; use it for development, not for headline numbers.

Command line::

    python -m kd_components.data.polyp --kvasir /data/Kvasir-SEG [--clinicdb /data/CVC-ClinicDB] --out DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
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
    format_names,
    list_files,
    pair_by_stem,
    save_png,
    split_names,
    staged_output,
    write_datalist,
)

__all__ = [
    "MASK_THRESHOLD",
    "PolypSource",
    "binarise_mask",
    "find_clinicdb",
    "find_kvasir",
    "main",
    "prepare_polyp_data",
    "read_image",
    "read_mask",
    "resize_pair",
]

logger = logging.getLogger(__name__)

#: grey level above which a mask pixel is polyp
MASK_THRESHOLD = 127
KVASIR_EXTENSIONS = (".jpg", ".jpeg", ".png")
CLINICDB_EXTENSIONS = (".tif", ".tiff", ".png")
LOSSLESS_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
EMPTY_MASK_POLICIES = ("warn", "error", "ignore")


@dataclass(frozen=True)
class PolypSource:
    """One input dataset: its output prefix and its image and mask folders.

    Args:
        dataset: output name prefix, ``kvasir`` or ``clinicdb``.
        image_dir: folder of the images.
        mask_dir: folder of the masks (same file stems as the images).
        extensions: accepted file suffixes in both folders.
    """

    dataset: str
    image_dir: Path
    mask_dir: Path
    extensions: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------------------------
# locating the official layouts


def _subdir(folder: Path, names: Sequence[str]) -> Path | None:
    """The child folder of ``folder`` whose name is one of ``names`` (case-insensitive), if any."""
    wanted = {n.lower() for n in names}
    matches = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() in wanted)
    return matches[0] if matches else None


def _find_layout(
    path: str | os.PathLike, image_names: Sequence[str], mask_names: Sequence[str], what: str
) -> tuple[Path, Path]:
    """Find ``(image_dir, mask_dir)`` in ``path`` or, when unambiguous, in one of its child folders."""
    path = Path(path)
    expected = f"{path}/{image_names[0]}/ and {path}/{mask_names[0]}/"
    if not path.exists():
        raise DatasetError(f"{what} folder {path} does not exist; pass the unpacked dataset folder ({expected}).")
    if not path.is_dir():
        raise DatasetError(f"{what} path {path} is not a folder; unpack the archive and pass the folder.")
    candidates = [path] + sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = []
    for folder in candidates:
        image_dir, mask_dir = _subdir(folder, image_names), _subdir(folder, mask_names)
        if image_dir is not None and mask_dir is not None:
            if folder == path:
                return image_dir, mask_dir
            found.append((image_dir, mask_dir))
    if len(found) == 1:
        return found[0]
    if found:
        roots = [str(image_dir.parent) for image_dir, _ in found]
        raise DatasetError(f"{what}: several dataset folders under {path} ({format_names(roots)}); pass one of them.")
    raise DatasetError(
        f"{what} folder {path} does not have the official layout: expected {expected} "
        f"(or a single child folder holding them); pass the folder that holds {image_names[0]}/ and {mask_names[0]}/."
    )


def find_kvasir(path: str | os.PathLike) -> PolypSource:
    """Locate the official Kvasir-SEG layout ``images/`` + ``masks/`` in ``path`` or its single child folder.

    Args:
        path: the ``Kvasir-SEG`` folder, or the folder it was unpacked into.

    Raises:
        DatasetError: when the folder is missing, lacks the layout, or holds several candidates.
    """
    image_dir, mask_dir = _find_layout(path, ("images",), ("masks",), "Kvasir-SEG")
    return PolypSource("kvasir", image_dir, mask_dir, KVASIR_EXTENSIONS)


def find_clinicdb(path: str | os.PathLike) -> PolypSource:
    """Locate the official CVC-ClinicDB layout ``Original/`` + ``Ground Truth/`` in ``path`` or its single child.

    Args:
        path: the ``CVC-ClinicDB`` folder, or the folder it was unpacked into (for example one holding only ``TIF/``).

    Raises:
        DatasetError: when the folder is missing, lacks the layout, or holds several candidates.
    """
    image_dir, mask_dir = _find_layout(
        path, ("Original",), ("Ground Truth", "GroundTruth", "Ground_Truth"), "CVC-ClinicDB"
    )
    return PolypSource("clinicdb", image_dir, mask_dir, CLINICDB_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------------------------
# reading and converting


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Bring integer / bool / [0, 1] float pixels to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
        return np.round(array * 255).astype(np.uint8)
    raise DatasetError(
        f"{path}: unsupported pixel type {array.dtype} (range {array.min()}..{array.max()}); "
        "convert the file to 8-bit PNG or remove it and its pair."
    )


def _to_channels_last(array: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` planar arrays (C in 3, 4; some TIFFs) to ``(H, W, C)``."""
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def _read_pil(path: Path) -> np.ndarray:
    """Decode a file with PIL to an array; the whole file is decoded, so truncation is detected."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "RGBA"):
            image = image.convert("RGB")
        return np.asarray(image)


def _read_any(path: Path) -> np.ndarray:
    """Decode an image file to ``(H, W)`` or ``(H, W, C)`` uint8: tifffile for TIFF (PIL as fallback), else PIL."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            try:
                array = tifffile.imread(path, key=0)
            except Exception:
                with warnings.catch_warnings():  # for example JPEG-compressed TIFFs without imagecodecs
                    warnings.simplefilter("ignore")
                    array = _read_pil(path)
        else:
            array = _read_pil(path)
    except Exception as err:
        raise DatasetError(
            f"cannot read image file {path} ({type(err).__name__}: {err}); it is corrupt, truncated or not an image: "
            "re-download the dataset, or remove this file and its image/mask pair."
        ) from err
    array = _to_channels_last(np.asarray(array))
    if array.ndim not in (2, 3) or min(array.shape[:2]) == 0:
        raise DatasetError(f"{path}: expected a 2D image, got an array of shape {array.shape}; remove this file.")
    return _to_uint8(array, path)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` RGB uint8 (grey is repeated, alpha dropped).

    Args:
        path: JPEG, PNG or TIFF file.

    Raises:
        DatasetError: naming the file when it cannot be decoded or has an unsupported shape or pixel type.
    """
    path = Path(path)
    array = _read_any(path)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] not in (3, 4):
        raise DatasetError(f"{path}: expected a grey, RGB or RGBA image, got {array.shape[-1]} channels.")
    return np.ascontiguousarray(array[..., :3])


def read_mask(path: str | os.PathLike, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Read a mask file as ``(H, W)`` uint8 with values 0 (background) and 1 (polyp).

    RGB(A) masks are converted to grey with ITU-R 601 luma (as PIL's ``"L"`` mode), then binarised with
    :func:`binarise_mask`.

    Args:
        path: JPEG, PNG or TIFF mask file.
        threshold: grey level above which a pixel is polyp.

    Raises:
        DatasetError: naming the file when it cannot be decoded or has an unsupported shape or pixel type.
    """
    path = Path(path)
    array = _read_any(path)
    if array.ndim == 3:
        if array.shape[-1] == 1:
            array = array[..., 0]
        elif array.shape[-1] in (3, 4):
            rgb = array[..., :3].astype(np.float32)
            array = np.round(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.uint8)
        else:
            raise DatasetError(f"{path}: expected a grey or RGB mask, got {array.shape[-1]} channels.")
    return binarise_mask(array, threshold, lossless=path.suffix.lower() in LOSSLESS_EXTENSIONS)


def binarise_mask(grey: np.ndarray, threshold: int = MASK_THRESHOLD, lossless: bool = False) -> np.ndarray:
    """Binarise a grey mask to uint8 0/1: ``grey > threshold``.

    Args:
        grey: ``(H, W)`` grey levels.
        threshold: grey level above which a pixel is foreground.
        lossless: the mask comes from a lossless file; if it then holds only 0 and 1 it is taken as already binary
            (some mirrors store 0/1 masks). Lossy (JPEG) masks are always thresholded, since noise may make a black
            mask hold 1s.
    """
    if lossless and grey.size and grey.max() <= 1:
        return grey.astype(np.uint8)
    return (grey > threshold).astype(np.uint8)


def resize_pair(image: np.ndarray, mask: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Shrink an image and its 0/1 mask so that the longest side is at most ``max_size``, keeping the aspect ratio.

    The image uses antialiased bilinear resampling (PIL); the mask is resampled with the same filter as 0/255 and
    thresholded at ``> 127``, i.e. a local majority vote aligned with the image, so it stays exactly 0/1. Smaller
    images are returned unchanged (never enlarged).

    Args:
        image: ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` uint8 0/1.
        max_size: longest side after resizing, or None to keep the size.
    """
    from PIL import Image

    height, width = mask.shape
    if max_size is None or max(height, width) <= max_size:
        return image, mask
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    grey = np.asarray(Image.fromarray(mask * 255).resize(size, Image.Resampling.BILINEAR))
    return image, (grey > 127).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# preparation


def _output_name(dataset: str, stem: str) -> str:
    """File-system friendly ``<dataset>_<stem>`` (runs of characters other than letters, digits, ``.-_`` -> ``_``)."""
    return f"{dataset}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}"


def _collect_pairs(source: PolypSource, limit: int | None) -> list[tuple[str, Path, Path]]:
    """``[(output name, image, mask), ...]`` of a source, sorted by stem, the first ``limit`` if given."""
    images = list_files(source.image_dir, source.extensions, f"{source.dataset} image")
    masks = list_files(source.mask_dir, source.extensions, f"{source.dataset} mask")
    pairs = pair_by_stem(images, masks)
    if limit is not None:
        pairs = pairs[:limit]
    named: dict[str, tuple[Path, Path]] = {}
    for stem, image, mask in pairs:
        name = _output_name(source.dataset, stem)
        if name in named:
            raise DatasetError(f"{image} and {named[name][0]} both map to the output name {name}; rename one of them.")
        named[name] = (image, mask)
    return [(name, image, mask) for name, (image, mask) in named.items()]


def _convert_pair(image_path: Path, mask_path: Path, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and resize one image/mask pair."""
    image, mask = read_image(image_path), read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise DatasetError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but its mask {mask_path} is "
            f"{mask.shape[1]}x{mask.shape[0]}; re-download the pair or remove both files."
        )
    return resize_pair(image, mask, max_size)


def _background_how(resized: bool) -> str:
    """How a mask came out all background, for messages."""
    return f"after thresholding at >{MASK_THRESHOLD}" + (" and resizing" if resized else "")


def _check_empty(source: PolypSource, empty: list[Path], total: int, policy: str, resized: bool) -> None:
    """Apply the ``warn`` / ``ignore`` empty-mask policy to the masks of one source that are all background."""
    if not empty or policy == "ignore":
        return
    how = _background_how(resized)
    if len(empty) == total:
        raise DatasetError(
            f"all {total} masks in {source.mask_dir} are background {how}: is this the mask folder, and are the masks "
            "0/255 (255 = polyp)? Fix the input, or pass empty_masks='ignore' (--empty-masks ignore) to keep them."
        )
    warnings.warn(
        f"{len(empty)} of {total} masks in {source.mask_dir} are all background {how}: "
        f"{format_names([p.name for p in empty])}; they are kept (images without polyp).",
        DatasetWarning,
        stacklevel=4,
    )


def _prepare_source(
    source: PolypSource, staging: Path, max_size: int | None, limit: int | None, empty_masks: str
) -> list[str]:
    """Convert one source into ``staging``; return the output names."""
    pairs = _collect_pairs(source, limit)
    logger.info("%s: %d image/mask pairs from %s", source.dataset, len(pairs), source.image_dir.parent)
    empty = []
    for i, (name, image_path, mask_path) in enumerate(pairs):
        if i < ROLE_CHECKS:  # swapped image and mask folders would otherwise threshold RGB frames into "masks"
            check_image_and_mask_roles(
                _read_any(image_path), _read_any(mask_path), image_path, mask_path, source.image_dir, source.mask_dir
            )
        image, mask = _convert_pair(image_path, mask_path, max_size)
        if not mask.any():
            if empty_masks == "error":
                raise DatasetError(
                    f"mask {mask_path} is all background {_background_how(max_size is not None)}; remove this pair, "
                    "or pass empty_masks='warn' or 'ignore' (--empty-masks) to keep it."
                )
            empty.append(mask_path)
        save_png(image, staging / IMAGES_DIR / f"{name}.png")
        save_png(mask, staging / LABELS_DIR / f"{name}.png")
    _check_empty(source, empty, len(pairs), empty_masks, max_size is not None)
    return [name for name, _, _ in pairs]


def prepare_polyp_data(
    out_dir: str | os.PathLike,
    kvasir_dir: str | os.PathLike | None = None,
    clinicdb_dir: str | os.PathLike | None = None,
    max_size: int | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    overwrite: bool = False,
    limit: int | None = None,
    empty_masks: str = "warn",
) -> Path:
    """Convert Kvasir-SEG and/or CVC-ClinicDB into the polyp bundle's data folder; return the datalist path.

    Writes ``<out_dir>/images/<dataset>_<stem>.png`` (RGB uint8), ``<out_dir>/labels/<dataset>_<stem>.png`` (uint8
    0/1) and ``<out_dir>/datalist.json`` (keys ``training``, ``validation``, ``test``; paths relative to
    ``out_dir``). Nothing is written to ``out_dir`` unless the whole preparation succeeds.

    Args:
        out_dir: output folder, created if needed.
        kvasir_dir: the Kvasir-SEG folder (``images/`` + ``masks/``) or its parent; None to skip.
        clinicdb_dir: the CVC-ClinicDB folder (``Original/`` + ``Ground Truth/``) or its parent; None to skip.
        max_size: shrink images whose longest side is larger to this size (aspect kept); None keeps full size.
        seed: seed of the file-name-based split.
        fractions: (training, validation, test) fractions, summing to 1; applied to each dataset separately.
        overwrite: replace prepared data already in ``out_dir`` (its PNGs in images/ and labels/, and datalist.json).
        limit: use only the first ``limit`` pairs (by file name) of each dataset, for quick runs and tests.
        empty_masks: what to do with masks that are all background: ``"warn"`` (keep them, warn), ``"error"`` or
            ``"ignore"``. Unless ``"ignore"``, a dataset whose masks are *all* background is an error.

    Raises:
        DatasetError: naming the file or folder at fault: a missing folder or layout, no images or masks, unpaired
            files, an unreadable or corrupt image, an image/mask size mismatch, empty masks (per ``empty_masks``),
            bad arguments, or an output folder that already holds data without ``overwrite``.
    """
    if kvasir_dir is None and clinicdb_dir is None:
        raise DatasetError("no input: pass kvasir_dir (--kvasir) and/or clinicdb_dir (--clinicdb).")
    if max_size is not None and max_size < 1:
        raise DatasetError(f"max_size must be a positive number of pixels, got {max_size}.")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of pairs, got {limit}.")
    if empty_masks not in EMPTY_MASK_POLICIES:
        raise DatasetError(f"empty_masks must be one of {EMPTY_MASK_POLICIES}, got {empty_masks!r}.")
    split_names([], fractions)  # validates the fractions before any work
    sources = [find_kvasir(kvasir_dir)] if kvasir_dir is not None else []
    sources += [find_clinicdb(clinicdb_dir)] if clinicdb_dir is not None else []
    splits: dict[str, list[str]] = {}
    with staged_output(out_dir, overwrite) as staging:
        for source in sources:
            names = _prepare_source(source, staging, max_size, limit, empty_masks)
            for key, part in split_names(names, fractions, seed).items():
                splits.setdefault(key, []).extend(part)
        write_datalist(staging / DATALIST_NAME, datalist_entries(splits))
    counts = ", ".join(f"{key} {len(part)}" for key, part in splits.items())
    logger.info("wrote %s (%s)", Path(out_dir) / DATALIST_NAME, counts)
    return Path(out_dir) / DATALIST_NAME


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m kd_components.data.polyp``."""
    parser = preparer_parser(
        "polyp",
        "Convert the official Kvasir-SEG (images/, masks/ JPEG) and/or CVC-ClinicDB (Original/, 'Ground Truth'/ "
        "TIFF) releases into the polyp bundle's data folder: OUT/images/<dataset>_<stem>.png (RGB), "
        "OUT/labels/<dataset>_<stem>.png (0/1, masks thresholded at >127) and OUT/datalist.json with a seeded "
        "file-name-based training/validation/test split.",
        limit="pairs of each dataset",
        max_size="images",
    )
    parser.add_argument("--kvasir", metavar="DIR", help="Kvasir-SEG folder (holding images/ and masks/) or its parent")
    parser.add_argument(
        "--clinicdb", metavar="DIR", help="CVC-ClinicDB folder (holding Original/ and 'Ground Truth'/) or its parent"
    )
    parser.add_argument(
        "--empty-masks",
        choices=EMPTY_MASK_POLICIES,
        default="warn",
        help="masks that are all background: keep with a warning (default), fail, or keep silently",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 for a dataset error).

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kvasir is None and args.clinicdb is None:
        parser.error("pass --kvasir DIR and/or --clinicdb DIR")
    return run_preparer(
        prepare_polyp_data,
        kvasir_dir=args.kvasir,
        clinicdb_dir=args.clinicdb,
        empty_masks=args.empty_masks,
        **shared_arguments(args),
    )


if __name__ == "__main__":
    sys.exit(main())
