"""Package a bundle with trained student weights as a model-zoo zip: ``<out>/<name>.zip`` and ``<name>.zip.sha256``.

The archive holds one top-level ``<name>/`` folder, as ``python -m monai.bundle download`` and MONAI Label expect:

.. code-block:: text

    <name>/LICENSE
    <name>/configs/*.json, logging.conf (methods/ and every other stage included)
    <name>/docs/...
    <name>/models/model.pt                (the student state dict, checked against inference.json's network_def)
    <name>/models/model_settings.json     (when the weights have one beside them, or --image_size is given)

Nothing else from the bundle folder is copied: no teacher, resume states, backups, data, evaluation outputs or
MLflow stores. When the image size is known, ``metadata.json``'s ``network_data_format`` spatial shapes are set to
it. Usage::

    python scripts/package_bundle.py --bundle polyp_kdas --weights bundles/polyp_kdas/models/model.pt --out dist

Then anyone can fetch and run it with MONAI alone::

    python -m monai.bundle download --name polyp_kdas --url <where dist/polyp_kdas.zip is served> --bundle_dir .
    cd polyp_kdas && python -m monai.bundle run --config_file configs/inference.json --dataset_dir <images>

The ``.sha256`` file is in ``sha256sum`` format (``sha256sum -c polyp_kdas.zip.sha256`` checks it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from kd_components.utils import non_finite_tensors, state_dict_mismatch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
INCLUDED = ("LICENSE", "configs", "docs")
"""What of the bundle folder goes into the archive (``models/`` is written from ``--weights``)."""
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")

__all__ = ["package_bundle", "check_student_weights", "sha256_of", "main"]


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_student_weights(bundle_dir: Path, weights: Path) -> dict[str, torch.Tensor]:
    """Load ``weights`` and check they are a finite state dict whose keys and shapes match ``inference.json``'s
    ``network_def`` exactly (MONAI Label loads with ``strict=False``, so a misfit would otherwise fail silently).

    Raises:
        ValueError: naming the missing, unexpected or misshaped keys, or the non-finite tensors.
    """
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights} is not a plain state dict (a mapping of names to tensors)")
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    mismatch = state_dict_mismatch(parser.get_parsed_content("network_def").state_dict(), state)
    if mismatch:
        raise ValueError(
            f"{weights} does not fit {bundle_dir.name}'s student (inference.json network_def): {mismatch}. Pass "
            "the student's models/model.pt written by configs/train.json (not the teacher's)."
        )
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"{weights} holds NaN/Inf weights ({bad[:3]}): refusing to package a diverged student")
    return state


def _set_spatial_shape(meta_file: Path, image_size: Sequence[int]) -> None:
    """Write ``image_size`` as the inputs' and outputs' ``spatial_shape`` of a 2D bundle's ``metadata.json``."""
    meta = json.loads(meta_file.read_text())
    for part in ("inputs", "outputs"):
        for item in meta.get("network_data_format", {}).get(part, {}).values():
            shape = item.get("spatial_shape")
            if isinstance(shape, list) and len(shape) == len(image_size):
                item["spatial_shape"] = list(image_size)
    meta_file.write_text(json.dumps(meta, indent=4) + "\n")


def package_bundle(
    bundle: str | Path,
    weights: str | Path,
    out: str | Path,
    name: str | None = None,
    image_size: Sequence[int] | None = None,
) -> Path:
    """Write ``<out>/<name>.zip`` (top-level ``<name>/``) and ``<out>/<name>.zip.sha256``; returns the zip's path.

    Args:
        bundle: a bundle name under ``bundles/`` or the path of a bundle folder.
        weights: the trained student state dict; it becomes ``models/model.pt``.
        out: the output folder (created if needed).
        name: the bundle name in the archive; default: the bundle folder's name.
        image_size: the size the student was trained at; default: ``<weights stem>_settings.json`` beside the
            weights, if any. Written to ``models/model_settings.json`` (read by ``inference.json``).

    Raises:
        FileNotFoundError: when the bundle or the weights do not exist.
        ValueError: when the weights do not fit the bundle's student.
    """
    bundle_dir = Path(bundle) if Path(bundle).is_dir() else BUNDLES / str(bundle)
    if not (bundle_dir / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"no bundle with configs/inference.json at {bundle_dir}")
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"student weights not found: {weights}. Train the student first (configs/train.json)")
    name = name or bundle_dir.name
    check_student_weights(bundle_dir, weights)
    settings_file = weights.with_name(weights.stem + "_settings.json")
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if image_size is not None:
        settings["image_size"] = [int(s) for s in image_size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out) as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        for item in INCLUDED:
            src = bundle_dir / item
            if src.is_dir():
                shutil.copytree(src, stage / item, ignore=SKIPPED)
            elif src.is_file():
                shutil.copy2(src, stage / item)
        (stage / "models").mkdir()
        shutil.copyfile(weights, stage / "models" / "model.pt")
        if settings:
            (stage / "models" / "model_settings.json").write_text(json.dumps(settings, indent=4, sort_keys=True) + "\n")
            if "image_size" in settings:
                _set_spatial_shape(stage / "configs" / "metadata.json", settings["image_size"])
        partial = Path(tmp) / f"{name}.zip"
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(stage.rglob("*")):
                zf.write(path, path.relative_to(Path(tmp)).as_posix())
        target = out / f"{name}.zip"
        partial.replace(target)
    checksum = out / f"{name}.zip.sha256"
    checksum.write_text(f"{sha256_of(target)}  {target.name}\n")
    return target


def build_parser() -> argparse.ArgumentParser:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle name under bundles/, or a bundle folder")
    parser.add_argument("--weights", required=True, help="the trained student state dict (models/model.pt)")
    parser.add_argument("--out", required=True, help="output folder for <name>.zip and <name>.zip.sha256")
    parser.add_argument("--name", default=None, help="bundle name in the archive (default: the folder's name)")
    parser.add_argument(
        "--image_size", type=int, nargs="+", default=None, help="trained image size (default: read beside --weights)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Package the bundle; prints the zip's path and its SHA-256."""
    args = build_parser().parse_args(argv)
    try:
        target = package_bundle(args.bundle, args.weights, args.out, name=args.name, image_size=args.image_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{target}\nsha256 {sha256_of(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
