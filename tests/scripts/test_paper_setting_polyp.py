"""scripts/paper_setting_polyp.sh: the GPU orchestration script parses, and refuses bad calls before any training.

Its runs (data preparation, plan, jobs, collect) are the comparison runner's, tested in test_compare_methods.py; a
whole trial (``TRIAL=1``) takes minutes, so it is checked by hand (see the script's header), not here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "paper_setting_polyp.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0


def test_missing_arguments_print_the_usage_and_fail(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "usage: bash scripts/paper_setting_polyp.sh KVASIR_DIR OUT" in done.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written before the arguments are checked"


def test_a_missing_kvasir_folder_stops_before_any_training(tmp_path):
    """The preparer's error (naming the folder) is shown and the script stops: no plan, no job."""
    missing = tmp_path / "no_such_kvasir"
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(missing), str(out)], capture_output=True, text=True)
    assert done.returncode == 1
    assert str(missing) in done.stdout + done.stderr
    assert not (out / "comparison").exists()
