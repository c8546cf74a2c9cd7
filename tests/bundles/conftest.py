"""Helpers for running bundle stages through ``monai.bundle.ConfigWorkflow`` on tiny synthetic data."""

from __future__ import annotations

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
