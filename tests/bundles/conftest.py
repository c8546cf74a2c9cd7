"""Helpers for running bundle stages through ``monai.bundle.ConfigWorkflow`` on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

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
