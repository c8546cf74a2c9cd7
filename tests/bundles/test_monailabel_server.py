"""A real MONAI Label server (``monaibundle`` app) serving and retraining ``polyp_kdas`` on 127.0.0.1.

monailabel is heavy (it pulls sam2 -> torchvision and a CUDA torch), so it lives in its own venv and never changes
the torch of the main test environment. These tests are marked ``monailabel`` and skipped unless that venv exists
(``/work/venvs/monailabel`` or ``$MONAILABEL_VENV``). Set it up once::

    python -m venv /work/venvs/monailabel
    /work/venvs/monailabel/bin/pip install monailabel==0.8.5 pydicom==2.4.4 dicomweb-client==0.59.1 pynetdicom==2.0.2

and run ``OMP_NUM_THREADS=1 python -m pytest -m monailabel tests/bundles/test_monailabel_server.py``. The server runs
the venv's ``monailabel start_server`` with the venv's ``bin`` first on ``PATH`` (the ``monailabel`` script calls
``python`` from ``PATH``), ``--conf sam2 false`` (SAM2 downloads weights at start-up) and ``--conf zoo_source
github``; the repository is on its ``PYTHONPATH`` because retraining runs ``configs/train.json`` (distillation).

Checked: ``/info/`` (the student is the only model offered, the teacher in ``models/teacher/`` is not), ``/infer/``
(a PNG mask of the image's size, equal to the bundle's own ``inference.json`` result), ``/train/`` (a new
``models/model.pt``, fine-tuned at the served model's recorded image size, the previous model copied to
``models/backup/``, and ``/infer/`` then equal to the bundle's own inference with the new weights).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from kd_components.data.synthetic import make_synthetic_polyps
from tests.bundles.conftest import BUNDLES, run_workflow

requests = pytest.importorskip("requests")

VENV = Path(os.environ.get("MONAILABEL_VENV", "/work/venvs/monailabel"))
BUNDLE = "polyp_kdas"
REPO = BUNDLES.parent
SERVED_SIZE = [48, 64]  # the size the served student was "trained" at (recorded in model_settings.json)

pytestmark = [
    pytest.mark.monailabel,
    pytest.mark.skipif(not (VENV / "bin" / "monailabel").is_file(), reason=f"no monailabel venv at {VENV}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sample_app() -> Path:
    found = sorted(VENV.glob("**/sample-apps/monaibundle/main.py"))
    if not found:
        pytest.skip(f"the monaibundle sample app is not in {VENV}")
    return found[0].parent


def _make_served_bundle(root: Path) -> Path:
    """The repository's bundle with random student and teacher weights, as a user would copy it into the app."""
    src = BUNDLES / BUNDLE
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    train = json.loads((root / "configs" / "train.json").read_text())
    train.update(batch_size=2, num_workers=0, cache_rate=0.0)  # image_size: the served model's, from its settings
    (root / "configs" / "train.json").write_text(json.dumps(train, indent=4))
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "train.json"))
    torch.manual_seed(0)
    (root / "models" / "teacher").mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    torch.save(parser.get_parsed_content("teacher_def").state_dict(), root / "models" / "teacher" / "teacher.pt")
    (root / "models" / "model_settings.json").write_text(json.dumps({"image_size": SERVED_SIZE}))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    """Start ``monailabel start_server`` on a free port; yields the URL, the served bundle and the data."""
    work = tmp_path_factory.mktemp("monailabel")
    app = work / "apps" / "monaibundle"
    shutil.copytree(_sample_app(), app)
    bundle = _make_served_bundle(app / "model" / BUNDLE)
    data = work / "data"
    make_synthetic_polyps(data, n=6, size=(48, 80), seed=0, overwrite=True)  # not square: (H, W) mix-ups show
    studies = work / "studies"
    studies.mkdir()
    for image in sorted((data / "images").glob("*.png"))[:4]:
        shutil.copy(image, studies / image.name)
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(VENV),
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [str(VENV / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--conf", "models", BUNDLE, "--conf", "zoo_source", "github", "--conf", "sam2", "false"]
    cmd += ["--conf", "preload", "false", "--host", "127.0.0.1", "--port", str(port)]
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel exited with {proc.returncode}:\n{(work / 'server.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"monailabel did not answer in 600 s:\n{(work / 'server.log').read_text()[-4000:]}")
            time.sleep(2)
        yield {"url": url, "bundle": bundle, "data": data, "studies": studies, "work": work, "log": work / "server.log"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _infer(server: dict, image_id: str) -> np.ndarray:
    params = {"result_extension": ".png", "result_dtype": "uint8", "device": "cpu"}
    r = requests.post(
        f"{server['url']}/infer/{BUNDLE}",
        params={"image": image_id, "output": "image"},
        data={"params": json.dumps(params)},
        timeout=300,
    )
    assert r.status_code == 200, r.text[-2000:]
    return np.asarray(Image.open(io.BytesIO(r.content)))


def _own_inference(server: dict, image_id: str, out: Path) -> np.ndarray:
    """The bundle's own inference.json (MONAI only) on the same image, weights and recorded size."""
    images = out / "in"
    images.mkdir(parents=True)
    shutil.copy(server["studies"] / f"{image_id}.png", images)
    run_workflow(
        BUNDLE,
        ["inference.json"],
        workflow_type="infer",
        bundle_root=str(server["bundle"]),
        dataset_dir=str(images),
        output_dir=str(out / "masks"),
    )
    return np.asarray(Image.open(out / "masks" / f"{image_id}_seg.png"))


def test_info_offers_the_student_only(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    model = info["models"][BUNDLE]
    assert model["labels"] == {"polyp": 1} and model["dimension"] == 2
    assert model["config"]["model_filename"] == ["model.pt"]  # models/teacher/teacher.pt is not offered
    assert BUNDLE in info["trainers"]


def test_infer_returns_the_bundles_mask_at_the_image_size(server, tmp_path):
    image_id = sorted(p.stem for p in server["studies"].glob("*.png"))[0]
    mask = _infer(server, image_id)
    height, width = np.asarray(Image.open(server["studies"] / f"{image_id}.png")).shape[:2]
    assert mask.shape == (height, width) == (48, 80)
    assert set(np.unique(mask)) <= {0, 1}
    own = _own_inference(server, image_id, tmp_path)
    np.testing.assert_array_equal(mask > 0, own > 0)


def test_train_writes_a_new_model_that_infer_then_uses(server, tmp_path):
    ids = sorted(p.stem for p in server["studies"].glob("*.png"))
    for image_id in ids:
        with open(server["data"] / "labels" / f"{image_id}.png", "rb") as f:
            r = requests.put(
                f"{server['url']}/datastore/label",
                params={"image": image_id, "tag": "final"},
                files={"label": (f"{image_id}.png", f, "image/png")},
                timeout=60,
            )
        assert r.status_code == 200, r.text
    models = server["bundle"] / "models"
    before = _sha(models / "model.pt")
    old = _own_inference(server, ids[0], tmp_path / "old")

    params = {"max_epochs": 2, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "pretrained": True}
    status = _train(server, params)
    assert status["status"] == "DONE", server["log"].read_text()[-4000:]

    assert _sha(models / "model.pt") != before  # a new student
    assert json.loads((models / "model_settings.json").read_text()) == {"image_size": SERVED_SIZE}  # fine-tuned
    assert any(_sha(p) == before for p in (models / "backup").glob("model.*.pt"))  # the old one copied, not lost
    assert sorted(p.name for p in models.glob("*.pt")) == ["model.pt"]  # still the only model offered

    new = _own_inference(server, ids[0], tmp_path / "new")
    assert not np.array_equal(old > 0, new > 0), "old and new students agree here: this image cannot tell them apart"
    served = _infer(server, ids[0])
    np.testing.assert_array_equal(served > 0, new > 0)  # /infer/ serves the retrained student


def _train(server: dict, params: dict) -> dict:
    r = requests.post(f"{server['url']}/train/{BUNDLE}", json=params, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 900
    while True:
        status = requests.get(f"{server['url']}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR"):
            return status
        assert time.monotonic() < deadline, f"training still {status.get('status')} after 900 s"
        time.sleep(5)


def test_train_without_validation_data_fails_and_keeps_the_model(server):
    """val_split 0: no validation data, so the saver would never run; the run fails clearly instead of a silent DONE."""
    models = server["bundle"] / "models"
    before = _sha(models / "model.pt")
    log_start = len(server["log"].read_text())
    status = _train(server, {"max_epochs": 1, "val_split": 0.0, "device": "cpu", "multi_gpu": False})
    assert status["status"] == "ERROR"
    assert "no validation data" in server["log"].read_text()[log_start:]
    assert _sha(models / "model.pt") == before
