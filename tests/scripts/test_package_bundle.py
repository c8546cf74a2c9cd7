"""Packaging a bundle for the model zoo, downloading it over HTTP with ``monai.bundle download`` and running its
``inference.json`` in a Python that cannot import ``kd_components``."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from scripts import package_bundle

REPO = Path(__file__).resolve().parents[2]
BUNDLE = "polyp_kdas"

# Runs a command in this interpreter without the site hook (-S): site-packages are put on sys.path by hand, so no
# .pth file runs and the editable install of kd_components (an import hook installed by a .pth) is not there; the
# working directory is outside the repository. The first thing it does is check that kd_components is missing.
NO_KD = textwrap.dedent(
    """
    import runpy, site, sys
    sys.path = [p for p in sys.path if p not in ("", ".")] + site.getsitepackages()
    try:
        import kd_components
    except ImportError:
        pass
    else:
        sys.exit("kd_components is importable: " + str(kd_components.__file__))
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    """
)


def _run_without_kd(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, "-S", "-c", NO_KD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture()
def student(tmp_path) -> Path:
    """Random student weights of the bundle, with the trained settings beside them."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    torch.manual_seed(0)
    path = tmp_path / "trained" / "model.pt"
    path.parent.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    (tmp_path / "trained" / "model_settings.json").write_text(json.dumps({"image_size": [64, 48]}))
    return path


@pytest.fixture()
def served(tmp_path) -> Iterator[tuple[Path, int]]:
    """A folder served over HTTP on 127.0.0.1 (a free port); yields the folder and the port."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_archive_layout_weights_and_checksum(student, tmp_path):
    out = tmp_path / "dist"
    assert package_bundle.main(["--bundle", BUNDLE, "--weights", str(student), "--out", str(out)]) == 0
    archive = out / f"{BUNDLE}.zip"
    names = zipfile.ZipFile(archive).namelist()
    assert {n.split("/")[0] for n in names} == {BUNDLE}  # one top-level folder
    assert f"{BUNDLE}/configs/inference.json" in names and f"{BUNDLE}/LICENSE" in names
    assert [n for n in names if n.endswith(".pt")] == [f"{BUNDLE}/models/model.pt"]  # no teacher, no resume state
    with zipfile.ZipFile(archive) as zf:
        assert zf.read(f"{BUNDLE}/models/model.pt") == student.read_bytes()
        assert json.loads(zf.read(f"{BUNDLE}/models/model_settings.json")) == {"image_size": [64, 48]}
        meta = json.loads(zf.read(f"{BUNDLE}/configs/metadata.json"))
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 48]
    digest, filename = (out / f"{BUNDLE}.zip.sha256").read_text().split()
    assert filename == archive.name and digest == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_refuses_weights_of_another_network(tmp_path):
    wrong = tmp_path / "teacher.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit polyp_kdas's student.*missing keys"):
        package_bundle.package_bundle(BUNDLE, wrong, tmp_path / "dist")
    assert package_bundle.main(["--bundle", BUNDLE, "--weights", str(wrong), "--out", str(tmp_path / "d")]) == 1
    assert not (tmp_path / "dist" / f"{BUNDLE}.zip").exists()


def test_download_over_http_and_infer_without_kd_components(student, served, tmp_path):
    www, port = served
    package_bundle.package_bundle(BUNDLE, student, www)
    outside = tmp_path / "user"  # not the repository
    outside.mkdir()
    url = f"http://127.0.0.1:{port}/{BUNDLE}.zip"
    proc = _run_without_kd(["download", "--name", BUNDLE, "--url", url, "--bundle_dir", str(outside)], outside)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = outside / BUNDLE
    assert (root / "models" / "model.pt").read_bytes() == student.read_bytes()

    images = outside / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    args = ["run", "--config_file", "configs/inference.json", "--bundle_root", str(root)]
    args += ["--dataset_dir", str(images), "--output_dir", str(outside / "masks")]
    proc = _run_without_kd(args, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask = Image.open(outside / "masks" / "a_seg.png")
    assert mask.size == (40, 30) and set(np.unique(np.asarray(mask))) <= {0, 255}

    # the Python that ran it really lacks kd_components (the check above exits non-zero when it is importable)
    probe = _run_without_kd(["--help"], outside)
    assert "kd_components is importable" not in probe.stderr
