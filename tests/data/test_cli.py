"""The command line the dataset preparers share (kd_components.data.cli): one set of options, mapped once."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from kd_components.data.cli import preparer_parser, run_preparer, shared_arguments
from kd_components.data.common import DatasetError

# preparer module: (the arguments that select a source, its preparation functions)
PREPARERS = {
    "polyp": (["--kvasir", "k"], ["prepare_polyp_data"]),
    "pathology": (["--tiles", "t"], ["prepare_pathology_data"]),
    "vessels": (["--drive", "d"], ["prepare_vessel_data"]),
    "volumes": (["--acdc", "a"], ["prepare_acdc_data", "prepare_synapse_data"]),
    "synthetic": ([], ["make_synthetic_polyps"]),
    "synthetic_vessels": ([], ["make_synthetic_vessels"]),
}


@pytest.mark.parametrize("name", sorted(PREPARERS))
def test_every_preparer_takes_the_shared_options_and_its_function_their_names(name):
    module = importlib.import_module(f"kd_components.data.{name}")
    source, functions = PREPARERS[name]
    parser = module.build_parser()
    assert parser.prog == f"python -m kd_components.data.{name}"
    args = parser.parse_args([*source, "--out", "o", "--seed", "3", "--fractions", "0.5", "0.25", "0.25"])
    shared = shared_arguments(args)
    assert shared["out_dir"] == "o" and shared["seed"] == 3 and shared["fractions"] == [0.5, 0.25, 0.25]
    assert shared["overwrite"] is False
    for function in functions:
        accepted = inspect.signature(getattr(module, function)).parameters
        assert set(shared) <= set(accepted), f"{function} does not take {set(shared) - set(accepted)}"
    with pytest.raises(SystemExit):
        parser.parse_args(source)  # --out is required


def test_optional_shared_options_only_when_asked():
    bare = shared_arguments(preparer_parser("x", "d").parse_args(["--out", "o"]))
    assert set(bare) == {"out_dir", "seed", "fractions", "overwrite"}
    full = preparer_parser("x", "d", limit="items", max_size="images")
    assert shared_arguments(full.parse_args(["--out", "o", "--limit", "2", "--max-size", "8"])) == {
        **bare,
        "limit": 2,
        "max_size": 8,
    }


def test_run_preparer_prints_the_paths_or_the_dataset_error(capsys, tmp_path):
    paths = [tmp_path / "datalist.json", tmp_path / "slices" / "datalist.json"]
    assert run_preparer(lambda out_dir: paths, out_dir="o") == 0
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    assert run_preparer(lambda out_dir: Path(out_dir), out_dir="o") == 0
    assert capsys.readouterr().out.strip() == "o"

    def failing(out_dir):
        raise DatasetError(f"{out_dir}: no images/ folder")

    assert run_preparer(failing, out_dir="o") == 1
    assert capsys.readouterr().err.strip() == "error: o: no images/ folder"


def test_an_unreadable_test_list_is_reported_like_a_dataset_error(capsys, tmp_path):
    from kd_components.data.pathology import main

    assert main(["--tiles", str(tmp_path), "--out", str(tmp_path / "o"), "--test-list", str(tmp_path / "no.txt")]) == 1
    assert "cannot read the test list" in capsys.readouterr().err
