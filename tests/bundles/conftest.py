"""Helpers for running bundle stages through ``monai.bundle.ConfigWorkflow`` on tiny synthetic data.

Every bundle's tiny setup (synthetic data prepared by the real preparer, a teacher trained one epoch, the
paraphrasers where the bundle has that stage) is made once per session by the :func:`tiny` fixture and shared by
tests/bundles/test_all_bundles.py (the behaviour every bundle shares, parametrised over the bundles) and each
bundle's own test file (what only that bundle does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from kd_components.data.pathology import prepare_pathology_data
from kd_components.data.synthetic import make_synthetic_polyps
from kd_components.data.synthetic_vessels import make_synthetic_vessels
from kd_components.data.synthetic_volumes import make_synthetic_volumes
from kd_components.data.volumes import prepare_acdc_data, write_slices

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
SHARED = REPO.parent / "shared"
SCHEMA = SHARED / "schema" / "meta_schema_20240725.json"


def configs(bundle: str, *names: str) -> list[str]:
    """Absolute paths of ``bundles/<bundle>/configs/<name>`` for each name."""
    return [str(BUNDLES / bundle / "configs" / n) for n in names]


def make_workflow(bundle: str, names: list[str], workflow_type: str = "train", **override) -> ConfigWorkflow:
    """A ConfigWorkflow of ``bundle`` merging ``names`` in order, with ``bundle_root`` set and ``override`` applied."""
    override.setdefault("bundle_root", str(BUNDLES / bundle))
    return ConfigWorkflow(
        config_file=configs(bundle, *names),
        meta_file=configs(bundle, "metadata.json")[0],
        logging_file=False,
        workflow_type=workflow_type,
        **override,
    )


def run_workflow(bundle: str, names: list[str], workflow_type: str = "train", **override) -> ConfigWorkflow:
    """Initialise, run and finalise a workflow; returns it so tests can inspect its parsed content."""
    wf = make_workflow(bundle, names, workflow_type, **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def torchrun_training(bundle: str, **override) -> None:
    """Run ``train.json`` + ``multi_gpu_train.json`` of ``bundle`` with ``torchrun`` on 2 CPU processes (gloo).

    Args:
        bundle: the bundle folder name.
        override: config overrides, passed as ``--key value`` (non-strings as compact JSON).

    Fails the test with the end of the workers' stderr when the run does not succeed.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run",
        "--config_file", str(configs(bundle, "train.json", "multi_gpu_train.json")),
        "--bundle_root", str(BUNDLES / bundle),
    ]  # fmt: skip
    for key, value in override.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))]
    # the repository on the path: the workers import kd_components even where the package is not installed
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=BUNDLES / bundle, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (MONAI wraps errors raised inside config expressions)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@pytest.fixture(scope="session")
def schema_path() -> Path:
    if not SCHEMA.is_file():
        pytest.skip(f"metadata schema not found at {SCHEMA}")
    return SCHEMA


FAST: dict[str, dict[str, Any]] = {
    "cardiac3d_swin": {
        # one iteration per stage at 64x32x32, the smallest patch the SwinUNETR teacher takes in training
        "image_size": [64, 32, 32],
        "epochs": 1,
        "batch_size": 1,
        "num_samples": 1,
        "num_workers": 0,
        "sw_batch_size": 2,
        "epoch_length": 1,
    },
    "multiorgan_graphflow": {
        "image_size": [32, 32],
        "epochs": 1,
        "batch_size": 8,
        "num_workers": 0,
        "sw_batch_size": 4,
    },
    "pathology_coco": {
        # 32x32 patches (2 per tile, 2 tiles per batch: 3 iterations) of 64x64 tiles; validation: whole tiles
        "image_size": [32, 32],
        "epochs": 1,
        "batch_size": 2,
        "num_samples": 2,
        "num_workers": 0,
        "val_interval": 1,
    },
    "polyp_kdas": {"image_size": [32, 32], "epochs": 1, "batch_size": 4, "num_workers": 0},
    "vessel_lightvessel": {
        "image_size": [32, 32],
        "patches_per_image": 1,
        "epochs": 1,
        "batch_size": 4,
        "num_workers": 0,
    },
}
"""Per bundle: the overrides of a tiny run (a few iterations of one epoch)."""

VESSEL_SIZE = (32, 48)
"""(H, W) of the synthetic vessel images: not square, so a transposed mask would be caught."""

VOLUME_SHAPE = (40, 36, 4)
"""(H, W, Z) of the synthetic ACDC-like volumes of cardiac3d_swin and multiorgan_graphflow."""

VOLUME_PATIENTS = {"cardiac3d_swin": 5, "multiorgan_graphflow": 9}
"""Patients of those volumes: 2 validates (2 and 7 for multiorgan_graphflow, as its splits.csv says); the test split
is drawn from the others."""


def make_he_tiles(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` H&E-like tiles in the generic tiles layout: ``images/*.png`` (RGB) and ``masks/*.png`` (0/255).

    A pink, noisy background (eosin) holds 3-7 darker purple ellipses (haematoxylin-stained nuclei, 4-10 px across);
    the mask is the union of the ellipses.

    Args:
        root: output folder (``images/`` and ``masks/`` are created in it).
        n: number of tiles.
        size: tile side in pixels.
        seed: seed of the random tiles.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(3, 8)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2.0, 5.0, 2)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        pink = np.array([235.0, 170.0, 200.0]) + rng.normal(0.0, 8.0, (size, size, 3))
        purple = np.array([95.0, 55.0, 145.0]) + rng.normal(0.0, 12.0, (size, size, 3))
        image = np.where(mask[..., None], purple, pink).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"tile_{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"tile_{i:02d}.png")
    return root


def make_data(bundle: str, root: Path) -> Path:
    """Write ``bundle``'s tiny synthetic training data under ``root`` with the real preparer; returns its folder.

    - cardiac3d_swin: 5 ACDC-like patients (patient 2 validates) as volumes;
    - multiorgan_graphflow: 9 patients (2 and 7 validate) as volumes and 2D training slices;
    - pathology_coco: 10 64x64 H&E tiles, 6 training, 2 validation (one per DDP rank), 2 test;
    - polyp_kdas: 20 32x32 synthetic polyps;
    - vessel_lightvessel: 20 32x48 synthetic X-ray vessel images (not square: a transposed mask would be caught).
    """
    if bundle == "cardiac3d_swin":
        raw = make_synthetic_volumes(
            root / "raw" / "ACDC", patients=VOLUME_PATIENTS[bundle], shape=VOLUME_SHAPE, val=(2,)
        )
        return prepare_acdc_data(raw, root / "data").parent
    if bundle == "multiorgan_graphflow":
        raw = make_synthetic_volumes(
            root / "raw" / "ACDC", patients=VOLUME_PATIENTS[bundle], shape=VOLUME_SHAPE, val=(2, 7)
        )
        write_slices(prepare_acdc_data(raw, root / "data"))
        return root / "data"
    if bundle == "pathology_coco":
        raw = make_he_tiles(root / "he_tiles", n=10)
        prepare_pathology_data(root / "data", tiles_dir=raw, fractions=(0.6, 0.2, 0.2), overwrite=True)
        return root / "data"
    if bundle == "polyp_kdas":
        return make_synthetic_polyps(root / "data", n=20, size=(32, 32), seed=0, overwrite=True).parent
    if bundle == "vessel_lightvessel":
        return make_synthetic_vessels(root / "data", n=20, size=VESSEL_SIZE, seed=0, modality="xray").parent
    raise ValueError(f"no tiny setup for bundle {bundle!r}: add it to tests/bundles/conftest.py")


@dataclass
class TinyBundle:
    """A bundle's tiny setup: its synthetic data and the models its student stage reads (trained once).

    Attributes:
        bundle: the bundle folder name.
        data_dir: the prepared data folder (``dataset_dir``).
        models: the folder of ``teacher.pt`` and, where the bundle has that stage, the paraphrasers.
        paraphrasers: the paraphraser stage's workflow (``None`` for a bundle without one), for tests that inspect it.
    """

    bundle: str
    data_dir: Path
    models: Path
    paraphrasers: ConfigWorkflow | None = field(default=None, repr=False)

    @property
    def over(self) -> dict[str, Any]:
        """The tiny-run overrides with the data (no output folders)."""
        return {**FAST[self.bundle], "dataset_dir": str(self.data_dir)}

    def student(self, out: Path, **extra: Any) -> dict[str, Any]:
        """Overrides of a student run writing its models into ``out`` and its evaluation into ``out/eval``."""
        over = {**self.over, "ckpt_dir": str(out), "output_dir": str(out / "eval")}
        over["teacher_ckpt"] = str(self.models / "teacher.pt")
        if self.paraphrasers is not None:
            over["paraphraser_dir"] = str(self.models)
        return {**over, **extra}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[[str], TinyBundle]:
    """``tiny(bundle)``: the bundle's :class:`TinyBundle`, made on first use and shared by the whole session.

    The teacher trains one epoch of the tiny data into ``models``; a bundle with ``train_paraphraser.json`` then
    trains its paraphrasers (one epoch) into the same folder.
    """
    made: dict[str, TinyBundle] = {}

    def get(bundle: str) -> TinyBundle:
        if bundle not in made:
            root = tmp_path_factory.mktemp(bundle)
            data_dir, models = make_data(bundle, root), root / "models"
            over = {**FAST[bundle], "dataset_dir": str(data_dir), "ckpt_dir": str(models)}
            run_workflow(bundle, ["train.json", "train_teacher.json"], output_dir=str(root / "teacher_eval"), **over)
            assert (models / "teacher.pt").is_file()
            paraphrasers = None
            if (BUNDLES / bundle / "configs" / "train_paraphraser.json").is_file():
                stage = ["train.json", "train_paraphraser.json"]
                paraphrasers = run_workflow(bundle, stage, paraphraser_epochs=1, **over)
            made[bundle] = TinyBundle(bundle, data_dir, models, paraphrasers)
        return made[bundle]

    return get
