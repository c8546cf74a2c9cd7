"""Bundles as the benchmarks see them: names, methods, parsed configs, synthetic data and random paraphrasers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

__all__ = [
    "REPO",
    "BUNDLES",
    "SYNTHETIC_DATA",
    "PARAPHRASERS",
    "bundle_names",
    "method_names",
    "config_parser",
    "input_channels",
    "device_override",
    "synthetic_data_kind",
    "synthetic_data",
    "make_paraphrasers",
]

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
# synthetic data each bundle is benchmarked on without --dataset_dir (see synthetic_data): "polyps" (RGB PNG images
# and 0/1 labels, the layout of prepared Kvasir-SEG and of prepared MoNuSeg tiles), "vessels" (grey X-ray-like for a
# 1-channel bundle, fundus-like for 3 channels), "volumes" (ACDC-like NIfTI volumes, prepared with their 2D slices);
# a bundle not listed here gets "polyps" when it is 2D with 3 input channels
SYNTHETIC_DATA = {
    "polyp_kdas": "polyps",
    "pathology_coco": "polyps",
    "vessel_lightvessel": "vessels",
    "multiorgan_graphflow": "volumes",
}
# the paraphrasers of the bundles that have a paraphraser stage (configs/train_paraphraser.json), as
# (network id, checkpoint path id) in train.json + train_paraphraser.json: make_paraphrasers saves each network,
# untrained, at its checkpoint path
PARAPHRASERS = {
    "pathology_coco": [
        ("paraphraser#shallow", "paraphraser_ckpt#shallow"),
        ("paraphraser#deep", "paraphraser_ckpt#deep"),
    ],
    "multiorgan_graphflow": [
        ("paraphraser#shallow_network", "paraphraser#shallow_ckpt"),
        ("paraphraser#deep_network", "paraphraser#deep_ckpt"),
    ],
}


def bundle_names(root: Path = BUNDLES) -> list[str]:
    """Folders under ``root`` that have ``configs/train.json``, sorted."""
    return sorted(p.parent.parent.name for p in root.glob("*/configs/train.json"))


def method_names(bundle: Path) -> list[str]:
    """The bundle's method override files (``configs/methods/<name>.json``), sorted by name."""
    return sorted(p.stem for p in (bundle / "configs" / "methods").glob("*.json"))


def config_parser(files: Sequence[Path], override: dict[str, Any]) -> ConfigParser:
    """A ``ConfigParser`` of ``files`` merged in order, with ``override`` applied (ids to values)."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(override)
    return parser


def input_channels(bundle: Path, parser: ConfigParser) -> int:
    """The bundle's input channels: ``metadata.json``'s input ``num_channels``, else ``network_def#in_channels``."""
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        inputs = json.loads(meta.read_text()).get("network_data_format", {}).get("inputs", {})
        for item in inputs.values():
            if "num_channels" in item:
                return int(item["num_channels"])
    return int(parser.get("network_def#in_channels", 1))


def device_override(device: torch.device, amp: bool) -> dict[str, Any]:
    """Config overrides that put a bundle's run on ``device`` with AMP ``amp``."""
    return {"device": f"$torch.device('{device}')", "amp": amp}


def synthetic_data_kind(name: str, channels: int, spatial_dims: int) -> str:
    """Which synthetic data the bundle ``name`` is benchmarked on without ``--dataset_dir`` (see
    :data:`SYNTHETIC_DATA`): its entry there, else ``"polyps"`` for a 2D bundle with 3 input channels.

    Raises:
        ValueError: for any other bundle, saying to give ``--dataset_dir`` or to add it to ``SYNTHETIC_DATA``.
    """
    if name in SYNTHETIC_DATA:
        return SYNTHETIC_DATA[name]
    if spatial_dims == 2 and channels == 3:
        return "polyps"
    raise ValueError(
        f"no synthetic data for bundle {name!r} ({spatial_dims}D, {channels} input channels): give --dataset_dir "
        f"(a dataset prepared for it) or add it to SYNTHETIC_DATA in scripts/benchmark.py (kinds: "
        f"{sorted(set(SYNTHETIC_DATA.values()))})"
    )


def synthetic_data(kind: str, out: Path, size: Sequence[int], batch_size: int, batches: int, channels: int = 3) -> Path:
    """Write tiny synthetic data of ``kind`` (:data:`SYNTHETIC_DATA`) in ``out`` with enough training items for
    ``batches + 1`` full batches; returns the folder to pass as ``dataset_dir``."""
    n = max(10, math.ceil(batch_size * (batches + 1) / 0.8) + 2)  # the training split holds 80%
    height, width = int(size[0]), int(size[1])
    if kind == "polyps":
        from kd_components.data.synthetic import make_synthetic_polyps

        make_synthetic_polyps(out, n=n, size=(height, width), seed=0, overwrite=True)
    elif kind == "vessels":
        from kd_components.data.synthetic_vessels import make_synthetic_vessels

        modality = "xray" if channels == 1 else "fundus"
        make_synthetic_vessels(out, n=n, size=(height, width), seed=0, overwrite=True, modality=modality)
    elif kind == "volumes":
        from kd_components.data.synthetic_volumes import make_synthetic_volumes
        from kd_components.data.volumes import prepare_acdc_data, write_slices

        depth = 4  # slices per volume, two volumes per patient; 1/9 of the "train" patients go to the test split
        patients = max(5, math.ceil(batch_size * (batches + 1) / (2 * depth) * 9 / 8) + 2)
        raw = make_synthetic_volumes(out.parent / f"{out.name}_raw", patients, (height, width, depth), val=(2,))
        write_slices(prepare_acdc_data(raw, out, overwrite=True), overwrite=True)
    else:
        raise ValueError(f"unknown synthetic data kind {kind!r} (kinds: {sorted(set(SYNTHETIC_DATA.values()))})")
    return out


def make_paraphrasers(bundle: Path, override: dict[str, Any], out_dir: Path) -> list[str]:
    """Save randomly initialised paraphrasers where the bundle's distillation methods load them from ``out_dir``.

    For a bundle with a paraphraser stage (``configs/train_paraphraser.json``), each (network id, checkpoint id)
    pair of :data:`PARAPHRASERS` is resolved in ``configs/train.json`` + that stage, with ``paraphraser_dir`` set to
    ``out_dir``, and the network's state dict is saved, untrained, at the checkpoint path (weights do not change the
    cost, as for the teacher). Returns the names of the files written (none without the stage).

    Args:
        bundle: the bundle folder.
        override: config overrides (data, sizes, device...); ``paraphraser_dir`` is set to ``out_dir``.
        out_dir: the folder to write the paraphrasers in (created).

    Raises:
        ValueError: when the bundle has a paraphraser stage but no entry in :data:`PARAPHRASERS`.
    """
    from kd_components import save_state_dict

    stage = bundle / "configs" / "train_paraphraser.json"
    if not stage.is_file():
        return []
    if bundle.name not in PARAPHRASERS:
        raise ValueError(
            f"{stage} exists but PARAPHRASERS in {__name__} has no entry for {bundle.name!r}: add its paraphrasers "
            "as (network id, checkpoint path id) pairs"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    parser = config_parser([bundle / "configs" / "train.json", stage], {**override, "paraphraser_dir": str(out_dir)})
    written = []
    for network_id, ckpt_id in PARAPHRASERS[bundle.name]:
        path = Path(parser.get_parsed_content(ckpt_id))
        save_state_dict(parser.get_parsed_content(network_id), path)
        written.append(path.name)
    return sorted(written)
