"""Building blocks shared by the dataset preparers (polyp, and later MoNuSeg, ACDC, Synapse, DRIVE...).

Every preparer writes the same layout, which the bundles read through ``monai.data.load_decathlon_datalist``::

    <out>/images/<name>.png
    <out>/labels/<name>.png
    <out>/datalist.json     {"training": [{"image": "images/<name>.png", "label": "labels/<name>.png"}, ...],
                             "validation": [...], "test": [...]}

Preparers may add a ``<out>/fov/<name>.png`` field-of-view mask per image (entry key ``"fov"``), an ``"unlabeled"``
section of image-only entries and a ``"metadata"`` object (see :func:`write_datalist`).

The pieces here are: a seeded, file-name-based split (:func:`split_names`), pairing images with masks by file stem
(:func:`pair_by_stem`), listing an input folder with clear errors (:func:`list_files`), a guarded output folder
that is only filled when preparation succeeds (:func:`staged_output`), and the datalist writer
(:func:`write_datalist`). Bad input raises :class:`DatasetError`, whose message names the file or folder at fault
and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = [
    "DATALIST_NAME",
    "DEFAULT_FRACTIONS",
    "FOV_DIR",
    "IMAGES_DIR",
    "LABELS_DIR",
    "METADATA_KEY",
    "OUTPUT_DIRS",
    "SPLIT_KEYS",
    "UNLABELED_KEY",
    "DatasetError",
    "DatasetWarning",
    "ROLE_CHECKS",
    "check_image_and_mask_roles",
    "check_output_dir",
    "datalist_entries",
    "find_layouts",
    "format_names",
    "list_files",
    "pair_by_stem",
    "save_png",
    "split_counts",
    "split_names",
    "split_names_fixed",
    "staged_output",
    "validate_fractions",
    "write_datalist",
]

SPLIT_KEYS: tuple[str, str, str] = ("training", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
IMAGES_DIR = "images"
LABELS_DIR = "labels"
#: optional folder of 0/1 field-of-view masks (the region where metrics are computed), entry key "fov"
FOV_DIR = "fov"
#: the output sub-folders a preparation writes, checked and cleared by :func:`staged_output`
OUTPUT_DIRS: tuple[str, ...] = (IMAGES_DIR, LABELS_DIR, FOV_DIR)
DATALIST_NAME = "datalist.json"
#: optional datalist section of image-only entries (for example for semi-supervised training)
UNLABELED_KEY = "unlabeled"
#: optional datalist object describing the data (channels, label names, source...)
METADATA_KEY = "metadata"

#: how many offending file names an error message lists before summarising the rest
MAX_LISTED = 5


class DatasetError(ValueError):
    """Bad dataset input or output. The message names the file or folder at fault and says what to do."""


class DatasetWarning(UserWarning):
    """Suspicious but usable dataset input (for example a mask that is all background)."""


ROLE_CHECKS = 3
"""How many image/mask pairs of each source the preparers check for swapped folders."""

MASK_MAX_VALUES = 32
"""A mask or label map holds at most this many distinct values (class indices, or 0/255)."""


def _why_not_a_mask(array: np.ndarray, lossy: bool) -> str | None:
    """None when ``array`` looks like a mask or label map (one channel, a few distinct values), else why not."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3].astype(np.float32)
        spread = float(np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean())
        if spread > 8.0:
            return f"it is a colour image ({a.shape[-1]} channels that differ)"
        a = a[..., 0]
    sample = a.ravel()[:: max(1, a.size // 1_000_000)]
    values = np.unique(sample)
    if values.size <= MASK_MAX_VALUES and np.all(values == np.round(values)):
        return None
    low, high = float(values[0]), float(values[-1])
    extreme = float(np.mean((sample <= low + 0.15 * (high - low)) | (sample >= high - 0.15 * (high - low))))
    if lossy and extreme >= 0.9:
        return None  # a lossy-compressed (JPEG) binary mask: noise around two levels
    return f"it has {values.size} distinct values, {100 * (1 - extreme):.0f}% of its pixels mid-tones"


def check_image_and_mask_roles(
    image: np.ndarray,
    mask: np.ndarray,
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    swap_only: bool = False,
) -> None:
    """Stop when a mask does not look like a mask (one channel, a few distinct values), suggesting a swap.

    Some public copies of datasets ship the image and mask folders the other way round; thresholded, an RGB frame
    becomes a plausible-looking but meaningless "label". Preparers call this on the first :data:`ROLE_CHECKS`
    raw pairs of each source.

    Args:
        image: the raw image array (``(H, W)``, ``(H, W, C)`` or a volume).
        mask: the raw mask or label array.
        image_path: the image file (named in the message).
        mask_path: the mask file (named in the message).
        image_dir: the image folder (default: the image file's folder).
        mask_dir: the mask folder (default: the mask file's folder).
        swap_only: raise only when the folders look swapped (the image looks like a mask); for preparers whose own
            mask checks already explain other problems.

    Raises:
        DatasetError: naming both files and folders; when the image looks like a mask, suggesting the swap.
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    image_dir = Path(image_dir) if image_dir is not None else image_path.parent
    mask_dir = Path(mask_dir) if mask_dir is not None else mask_path.parent
    why = _why_not_a_mask(mask, lossy=mask_path.suffix.lower() in (".jpg", ".jpeg"))
    if why is None:
        return
    message = f"mask {mask_path} does not look like a mask: {why} (a mask has one channel and a few distinct values)."
    if _why_not_a_mask(image, lossy=image_path.suffix.lower() in (".jpg", ".jpeg")) is None:
        raise DatasetError(
            f"{message} And image {image_path} looks like a mask: the image and mask folders seem swapped (images: "
            f"{image_dir}, masks: {mask_dir}; some public copies ship them that way). To fix: swap the two folders "
            "(rename them, or pass each as the other's argument)."
        )
    if not swap_only:
        raise DatasetError(f"{message} To fix: check that {mask_dir} holds the masks of the images in {image_dir}.")


def format_names(names: Sequence[str | os.PathLike], limit: int = MAX_LISTED) -> str:
    """Comma-separated first ``limit`` names of ``names``, with a count of the rest.

    Args:
        names: the file names or paths to list.
        limit: how many to show before writing "... and N more".
    """
    shown = ", ".join(str(name) for name in names[:limit])
    rest = len(names) - limit
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


# ----------------------------------------------------------------------------------------------------------------------
# split


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Check a (training, validation, test) fraction triple and return it as floats.

    Args:
        fractions: three non-negative numbers summing to 1 (within 1e-6), in the order of :data:`SPLIT_KEYS`.

    Raises:
        DatasetError: when there are not three fractions, one is negative, or they do not sum to 1.
    """
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLIT_KEYS):
        raise DatasetError(
            f"split fractions must be three numbers (training, validation, test), got {list(fractions)}; "
            "pass for example 0.8 0.1 0.1."
        )
    if any(not np.isfinite(f) or f < 0 for f in values):
        raise DatasetError(f"split fractions must be finite and non-negative, got {list(values)}.")
    if abs(sum(values) - 1.0) > 1e-6:
        raise DatasetError(f"split fractions must sum to 1, got {list(values)} (sum {sum(values):g}).")
    return values  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """Number of items per split for ``n`` items.

    Largest-remainder rounding of ``n * fraction`` (ties go to the earlier split), so the counts always add up to
    ``n``. Then every split with a positive fraction that came out empty takes one item from the largest split, as
    long as that leaves the largest split non-empty: with 5 items and (0.8, 0.1, 0.1) this gives 3/1/1 rather than
    4/1/0, so validation and test are never silently empty.

    Args:
        n: number of items, >= 0.
        fractions: (training, validation, test) fractions, see :func:`validate_fractions`.
    """
    values = validate_fractions(fractions)
    if n < 0:
        raise DatasetError(f"cannot split a negative number of items ({n}).")
    exact = [n * f for f in values]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(values)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, f in enumerate(values):
        largest = max(range(len(counts)), key=lambda j: counts[j])
        if f > 0 and counts[i] == 0 and counts[largest] > 1:
            counts[largest] -= 1
            counts[i] += 1
    return counts[0], counts[1], counts[2]


def _name_key(name: str, seed: int) -> str:
    """Seeded hash of one name: the rank of a name depends only on itself and the seed."""
    return hashlib.sha256(f"{seed}\x00{name}".encode()).hexdigest()


def split_names(
    names: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[str]]:
    """Deterministic, seeded split of file names into training / validation / test.

    Names are ranked by a seeded SHA-256 hash of the name itself (ties, i.e. never in practice, by name), and the
    ranking is cut at :func:`split_counts`. So the result depends only on the set of names, the fractions and the seed:
    not on file-system order, the platform or the Python hash seed. Adding or removing a few names moves only the
    names near the cut points. Each split is returned sorted.

    Args:
        names: unique file names (or stems, or any string ids); order does not matter.
        fractions: (training, validation, test) fractions summing to 1.
        seed: any integer; a different seed gives a different split.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``.

    Raises:
        DatasetError: for duplicate names or invalid fractions.
    """
    names = list(names)
    duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
    if duplicates:
        raise DatasetError(f"cannot split: duplicate names {format_names(duplicates)}; every item needs a unique name.")
    ranked = sorted(names, key=lambda n: (_name_key(n, seed), n))
    n_train, n_val, _ = split_counts(len(ranked), fractions)
    parts = (ranked[:n_train], ranked[n_train : n_train + n_val], ranked[n_train + n_val :])
    return {key: sorted(part) for key, part in zip(SPLIT_KEYS, parts)}


def split_names_fixed(
    names: Iterable[str],
    fixed: Mapping[str, Iterable[str]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Seeded split in which some splits are given (an official test set, a published validation list).

    The names listed in ``fixed`` go to their split; the other names are split with :func:`split_names` among the
    splits that ``fixed`` does not name, with ``fractions`` renormalised over those splits. For example with the
    default (0.8, 0.1, 0.1) and a fixed test list the rest is split 8/9 training, 1/9 validation; with a fixed
    validation list, 8/9 training, 1/9 test.

    Args:
        names: unique names; order does not matter.
        fixed: split key -> names of that split (each must be in ``names``); an empty mapping gives :func:`split_names`.
        fractions: (training, validation, test) fractions summing to 1.
        seed: seed of the split of the names not in ``fixed``.

    Raises:
        DatasetError: for an unknown split key, a fixed name that is not in ``names`` or is in two splits, or when
            names are left over for splits whose fractions are all zero.
    """
    names = list(names)
    values = validate_fractions(fractions)
    unknown = sorted(set(fixed) - set(SPLIT_KEYS))
    if unknown:
        raise DatasetError(f"unknown split keys {unknown}; use {list(SPLIT_KEYS)}.")
    assigned: dict[str, str] = {}
    for key in SPLIT_KEYS:
        for name in fixed.get(key, ()):
            if assigned.get(name, key) != key:
                raise DatasetError(f"{name!r} is listed in both the {assigned[name]!r} and the {key!r} split.")
            assigned[name] = key
    missing = sorted(set(assigned) - set(names))
    if missing:
        raise DatasetError(f"the fixed split lists names that are not in the dataset: {format_names(missing)}.")
    free = [key for key in SPLIT_KEYS if key not in fixed]
    rest = [name for name in names if name not in assigned]
    total = sum(v for k, v in zip(SPLIT_KEYS, values) if k in free)
    if rest and total <= 0:
        raise DatasetError(
            f"{len(rest)} names are in no fixed split, but the fractions of the other splits {free} are all zero; "
            "give one of them a positive fraction."
        )
    splits: dict[str, list[str]] = {key: [] for key in SPLIT_KEYS}
    if rest:
        splits = split_names(rest, [v / total if k in free else 0.0 for k, v in zip(SPLIT_KEYS, values)], seed)
    for name, key in assigned.items():
        splits[key].append(name)
    return {key: sorted(splits[key]) for key in SPLIT_KEYS}


# ----------------------------------------------------------------------------------------------------------------------
# input folders


def list_files(folder: str | os.PathLike, extensions: Iterable[str], description: str = "input") -> list[Path]:
    """Sorted files of ``folder`` (not recursive) whose suffix is one of ``extensions`` (case-insensitive).

    Hidden files (``.DS_Store``, macOS ``._name`` resource forks) are skipped.

    Args:
        folder: the folder to list.
        extensions: accepted suffixes with the dot, for example ``(".jpg", ".jpeg")``.
        description: what the folder holds, for error messages (for example "Kvasir-SEG image").

    Raises:
        DatasetError: when the folder does not exist, is not a folder, or holds no file with an accepted suffix.
    """
    folder = Path(folder)
    suffixes = tuple(e.lower() for e in extensions)
    if not folder.exists():
        raise DatasetError(f"{description} folder {folder} does not exist; check the path (and that it is unpacked).")
    if not folder.is_dir():
        raise DatasetError(f"{description} folder {folder} is not a folder; pass the folder that holds the files.")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )
    if not files:
        found = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        what = f"it holds {len(found)} other entries ({format_names(found)})" if found else "it is empty"
        raise DatasetError(
            f"{description} folder {folder} holds no {'/'.join(suffixes)} files ({what}); "
            "point to the folder that holds them, or re-download / unpack the dataset."
        )
    return files


LayoutT = TypeVar("LayoutT")


def find_layouts(
    path: str | os.PathLike, detect: Callable[[Path], LayoutT | None], what: str = "dataset", depth: int = 3
) -> list[LayoutT]:
    """The dataset layouts that ``detect`` recognises in ``path`` and the folders below it.

    Breadth first, down to ``depth`` levels; hidden folders and ``__MACOSX`` are skipped, and the folders below a
    folder whose layout was recognised are not searched. So a release unpacked into a wrapper folder (or two, as
    ``MoNuSeg 2018 Training Data/MoNuSeg 2018 Training Data/``) is found from the outer folder.

    Args:
        path: the folder given by the user.
        detect: returns a description of the layout that a folder holds directly, or None.
        what: the dataset, for error messages.
        depth: how many levels below ``path`` to search.

    Raises:
        DatasetError: when ``path`` does not exist or is not a folder.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{what} folder {path} does not exist; check the path (and that the archive is unpacked).")
    if not path.is_dir():
        raise DatasetError(f"{what} path {path} is not a folder; unpack the archive and pass the folder.")
    found: list[LayoutT] = []
    level = [path]
    for current in range(depth + 1):
        below: list[Path] = []
        for folder in level:
            layout = detect(folder)
            if layout is not None:
                found.append(layout)
            elif current < depth:
                below += [
                    child
                    for child in sorted(folder.iterdir())
                    if child.is_dir() and not child.name.startswith(".") and child.name != "__MACOSX"
                ]
        level = below
    return found


def _by_stem(files: Sequence[Path], folder_desc: str, key: Callable[[Path], str] | None = None) -> dict[str, Path]:
    """Map stem (or ``key(path)``) -> file, refusing two files with the same one (for example ``a.jpg``, ``a.png``)."""
    by_stem: dict[str, Path] = {}
    for path in files:
        stem = path.stem if key is None else key(path)
        if stem in by_stem:
            raise DatasetError(
                f"{folder_desc}: two files share the stem {stem!r} ({by_stem[stem].name}, {path.name}) "
                f"in {path.parent}; remove one of them."
            )
        by_stem[stem] = path
    return by_stem


def pair_by_stem(
    images: Sequence[Path],
    masks: Sequence[Path],
    allow_unpaired: bool = False,
    image_key: Callable[[Path], str] | None = None,
    mask_key: Callable[[Path], str] | None = None,
) -> list[tuple[str, Path, Path]]:
    """Pair image files with mask files that have the same stem (the name without its suffix).

    Args:
        images: image files (all in one folder, as from :func:`list_files`).
        masks: mask files.
        allow_unpaired: skip unpaired files instead of raising.
        image_key: the pairing id of an image file, when it is not its stem (for example ``21`` for DRIVE's
            ``21_training.tif``); the returned "stem" is then this id.
        mask_key: the pairing id of a mask file (for example ``21`` for ``21_manual1.gif``).

    Returns:
        ``[(stem, image, mask), ...]`` sorted by stem.

    Raises:
        DatasetError: when a stem appears twice in one list, or (unless ``allow_unpaired``) when an image has no mask
            or a mask no image; the message lists the first few of each and the folders.
    """
    image_by_stem = _by_stem(images, "images", image_key)
    mask_by_stem = _by_stem(masks, "masks", mask_key)
    no_mask = sorted(image_by_stem.keys() - mask_by_stem.keys())
    no_image = sorted(mask_by_stem.keys() - image_by_stem.keys())
    if (no_mask or no_image) and not allow_unpaired:
        lines = ["images and masks must pair up by file name (stem):"]
        if no_mask:
            folder = image_by_stem[no_mask[0]].parent
            names = [image_by_stem[s].name for s in no_mask]
            lines.append(f"  {len(no_mask)} image(s) in {folder} have no mask: {format_names(names)}")
        if no_image:
            folder = mask_by_stem[no_image[0]].parent
            names = [mask_by_stem[s].name for s in no_image]
            lines.append(f"  {len(no_image)} mask(s) in {folder} have no image: {format_names(names)}")
        lines.append("Re-download the dataset, or remove the unpaired files, so that every image has one mask.")
        raise DatasetError("\n".join(lines))
    stems = sorted(image_by_stem.keys() & mask_by_stem.keys())
    return [(s, image_by_stem[s], mask_by_stem[s]) for s in stems]


# ----------------------------------------------------------------------------------------------------------------------
# output folder


def _output_conflicts(out_dir: Path, subdirs: Sequence[str] = OUTPUT_DIRS) -> list[Path]:
    """The existing outputs in ``out_dir`` that a preparation would overwrite."""
    conflicts = []
    for sub in subdirs:
        folder = out_dir / sub
        if folder.is_dir() and any(folder.iterdir()):
            conflicts.append(folder)
    if (out_dir / DATALIST_NAME).exists():
        conflicts.append(out_dir / DATALIST_NAME)
    return conflicts


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, subdirs: Sequence[str] = OUTPUT_DIRS) -> Path:
    """Refuse to write into an output folder that already holds prepared data, unless ``overwrite``.

    Args:
        out_dir: the output folder (may not exist yet).
        overwrite: allow replacing what is there.
        subdirs: the output sub-folders (relative POSIX paths, such as ``"volumes/images"``) whose files count as
            prepared data; :data:`OUTPUT_DIRS` by default.

    Raises:
        DatasetError: naming the folder and the ``overwrite=True`` / ``--overwrite`` flag, when ``out_dir`` holds a
            non-empty ``images/``, ``labels/`` or ``fov/`` folder or a ``datalist.json`` and ``overwrite`` is false;
            or when ``out_dir`` exists and is not a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"output path {out_dir} exists and is not a folder; pass a folder path.")
    conflicts = _output_conflicts(out_dir, subdirs) if out_dir.is_dir() else []
    if conflicts and not overwrite:
        found = format_names([c.relative_to(out_dir).as_posix() for c in conflicts])
        raise DatasetError(
            f"output folder {out_dir} already holds prepared data ({found}); "
            "pass overwrite=True (--overwrite on the command line) to replace it, or choose another folder."
        )
    return out_dir


def _clear_previous(out_dir: Path, subdirs: Sequence[str] = OUTPUT_DIRS, suffixes: Sequence[str] = (".png",)) -> None:
    """Remove what a previous preparation wrote: the ``suffixes`` files of ``subdirs``, and the datalist."""
    endings = tuple(suffix.lower() for suffix in suffixes)
    for sub in subdirs:
        folder = out_dir / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and path.name.lower().endswith(endings):
                    path.unlink()
    (out_dir / DATALIST_NAME).unlink(missing_ok=True)


@contextmanager
def staged_output(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    subdirs: Sequence[str] | None = None,
    suffixes: Sequence[str] = (".png",),
) -> Iterator[Path]:
    """Write a prepared dataset into a staging folder, moved into ``out_dir`` only if the block succeeds.

    Checks ``out_dir`` first (:func:`check_output_dir`). Yields a hidden staging folder (an absolute path, also for a
    relative ``out_dir``) inside ``out_dir`` holding
    empty ``images/`` and ``labels/`` folders; write files there (and in a ``fov/`` folder, if the block creates one).
    On success the previous outputs are cleared (PNG files of ``images/``, ``labels/`` and ``fov/`` and
    ``datalist.json``: only with ``overwrite``, since otherwise there are none) and the staged files are moved in,
    including a staged ``datalist.json``. On an exception the staging folder is removed, so ``out_dir`` is left as it
    was (a freshly created, still empty ``out_dir`` is removed too).

    Args:
        out_dir: the output folder.
        overwrite: allow replacing prepared data already in ``out_dir``.
        subdirs: other output sub-folders, relative POSIX paths (for example ``("volumes/images",
            "volumes/labels")``): each is created empty in the staging folder, and these (instead of
            :data:`OUTPUT_DIRS`) are checked, cleared and moved in. None gives the behaviour described above.
        suffixes: file endings of the previous outputs cleared on overwrite (for example ``(".nii.gz",)``); files
            with other endings are left alone.
    """
    out_dirs = OUTPUT_DIRS if subdirs is None else tuple(subdirs)
    out_dir = check_output_dir(out_dir, overwrite, out_dirs)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir.resolve() / f".staging-{uuid.uuid4().hex[:8]}"  # absolute: entries resolve from any cwd
    try:
        for sub in (IMAGES_DIR, LABELS_DIR) if subdirs is None else out_dirs:
            (staging / sub).mkdir(parents=True)
        yield staging
        _clear_previous(out_dir, out_dirs, suffixes)
        for sub in (s for s in out_dirs if (staging / s).is_dir()):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
            for path in (staging / sub).iterdir():
                os.replace(path, out_dir / sub / path.name)
        if (staging / DATALIST_NAME).exists():
            os.replace(staging / DATALIST_NAME, out_dir / DATALIST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array as PNG.

    Args:
        array: uint8 image, ``(H, W)`` or ``(H, W, 3)``.
        path: output file (``.png``).
    """
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(f"save_png expects uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    path = Path(path)
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(path, compress_level=1)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# datalist


def datalist_entries(
    splits: Mapping[str, Sequence[str]], image_dir: str = IMAGES_DIR, label_dir: str = LABELS_DIR, suffix: str = ".png"
) -> dict[str, list[dict[str, str]]]:
    """Datalist entries for split names laid out as ``<image_dir>/<name><suffix>`` and ``<label_dir>/<name><suffix>``.

    Args:
        splits: split key -> names, as from :func:`split_names`.
        image_dir: image folder relative to the datalist's folder.
        label_dir: label folder relative to the datalist's folder.
        suffix: file suffix of both images and labels.
    """
    return {
        key: [{"image": f"{image_dir}/{n}{suffix}", "label": f"{label_dir}/{n}{suffix}"} for n in names]
        for key, names in splits.items()
    }


def _relative(path: str | os.PathLike, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form; relative inputs are taken as already relative to ``base``."""
    path = Path(path)
    if path.is_absolute():
        path = Path(os.path.relpath(path.resolve(), base.resolve()))
    return path.as_posix()


def _datalist_entry(
    entry: Mapping[str, str | os.PathLike], keys: Sequence[str], datalist_path: Path, check_files: bool
) -> dict[str, str]:
    """The path keys ``keys`` of one entry (those present), relative to the datalist's folder, checked to exist."""
    base = datalist_path.parent
    rel = {k: _relative(entry[k], base) for k in keys if k in entry}
    missing = [v for v in rel.values() if check_files and not (base / v).is_file()]
    if missing:
        raise DatasetError(f"datalist {datalist_path} would reference missing files {missing} (under {base}).")
    return rel


def write_datalist(
    datalist_path: str | os.PathLike,
    splits: Mapping[str, Sequence[Mapping[str, str | os.PathLike]]],
    check_files: bool = True,
    extra_keys: Sequence[str] = (),
    unlabeled: Sequence[Mapping[str, str | os.PathLike]] | None = None,
    metadata: Mapping[str, object] | None = None,
    info_keys: Sequence[str] = (),
) -> Path:
    """Write a MONAI (Decathlon-style) datalist JSON with the keys ``training``, ``validation`` and ``test``.

    Entries are ``{"image": ..., "label": ...}``; absolute paths are made relative to the datalist file's folder
    (relative ones are taken as already relative to it), so ``monai.data.load_decathlon_datalist(path, True, key)``
    resolves them wherever the folder is moved. A missing split key is written as an empty list.

    Args:
        datalist_path: the JSON file to write (its folder must exist).
        splits: split key -> list of entries with "image" and "label" paths.
        check_files: raise if a referenced file does not exist.
        extra_keys: further path keys kept in the entries that have them (for example ``"fov"``); other keys are
            dropped.
        unlabeled: image-only entries (``"image"`` and optionally ``extra_keys``) written as a
            :data:`UNLABELED_KEY` section; None writes no such section.
        metadata: JSON-serialisable description of the data, written as a :data:`METADATA_KEY` object; None writes
            none. ``load_decathlon_datalist`` reads only the section it is asked for, so both are ignored by readers
            of the three splits.
        info_keys: further keys copied as they are (not paths; JSON-serialisable values, for example ``"case"`` or
            ``"slice"``) in the split entries that have them.

    Raises:
        DatasetError: for an unknown split key, an entry without "image"/"label" (an unlabeled one without "image"),
            or (``check_files``) a missing file.
    """
    datalist_path = Path(datalist_path)
    unknown = sorted(set(splits) - set(SPLIT_KEYS))
    if unknown:
        raise DatasetError(f"unknown datalist split keys {unknown}; use {list(SPLIT_KEYS)}.")
    data: dict[str, object] = {}
    for key in SPLIT_KEYS:
        entries = []
        for entry in splits.get(key, []):
            if "image" not in entry or "label" not in entry:
                raise DatasetError(f"datalist entry {dict(entry)} in {key!r} needs both 'image' and 'label'.")
            rel = _datalist_entry(entry, ("image", "label", *extra_keys), datalist_path, check_files)
            entries.append({**rel, **{k: entry[k] for k in info_keys if k in entry}})
        data[key] = entries
    if unlabeled is not None:
        if any("image" not in entry for entry in unlabeled):
            bad = next(dict(entry) for entry in unlabeled if "image" not in entry)
            raise DatasetError(f"datalist entry {bad} in {UNLABELED_KEY!r} needs 'image'.")
        keys = ("image", *extra_keys)
        data[UNLABELED_KEY] = [_datalist_entry(entry, keys, datalist_path, check_files) for entry in unlabeled]
    if metadata is not None:
        data[METADATA_KEY] = dict(metadata)
    datalist_path.write_text(json.dumps(data, indent=2) + "\n")
    return datalist_path
