"""Never lose a model: one test per failure case of issue 11 (atomic checkpoints, backups, one run per folder,
NaN guards, override validation, early checks, resume, swapped folders)."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from monai.networks.nets import UNet
from torch import nn

from kd_components import (
    AtomicCheckpointSaver,
    BackupOnStart,
    CheckpointWriteError,
    FiniteLossGuard,
    ParaphraserTrainer,
    RunLockError,
    TrainingStateCheckpoint,
    acquire_run_lock,
    atomic_save,
    load_teacher,
    release_run_lock,
)
from kd_components import checkpoint as ckpt_module
from kd_components.modules.paraphraser import Paraphraser
from kd_components.run_lock import LOCK_NAME


def _scored_engine(scores: list[float]) -> Engine:
    """An engine whose epoch ``e`` reports ``scores[e - 1]`` as its key metric."""
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _score(e: Engine) -> None:
        e.state.metrics = {"dice": scores[e.state.epoch - 1]}

    return engine


def _failing_save(obj, f, *args, **kwargs):
    """``torch.save`` on a disk that fills up half-way: some bytes are written, then ENOSPC."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as g:
            g.write(b"partial")
    else:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


# 1. atomic checkpoints


def test_monai_saver_deletes_the_best_model_before_writing_its_successor(tmp_path):
    """The bug being fixed: with MONAI's saver a failed write leaves no model at all."""
    net = nn.Linear(2, 2)
    engine = _scored_engine([0.5, 0.9])
    CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice",
                    key_metric_filename="model.pt").attach(engine)  # fmt: skip
    engine.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").is_file()
    engine.state.max_epochs = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", _failing_save)
        with pytest.raises(OSError):
            engine.run([0], max_epochs=2)
    assert not (tmp_path / "model.pt").is_file() or (tmp_path / "model.pt").read_bytes() == b"partial"


def test_full_disk_keeps_the_last_good_model_and_names_the_folder(tmp_path, monkeypatch):
    net = nn.Linear(2, 2)
    engine = _scored_engine([0.5, 0.9, 0.95])
    saver = AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice", key_metric_filename="model.pt"
    )
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    good = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        net.weight.add_(1.0)
    monkeypatch.setattr(ckpt_module.torch, "save", _failing_save)
    with pytest.raises(CheckpointWriteError, match=str(tmp_path)) as err:
        engine.run([0], max_epochs=2)
    assert "No space left" in str(err.value) and "unchanged" in str(err.value)
    survived = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(good[k], survived[k]) for k in good)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind
    assert saver.state_dict()["_saved"][0][0] == 0.5  # the best-model tracking still describes the file on disk


def test_saver_refuses_unwritable_folder_before_training(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(CheckpointWriteError, match="not_a_folder.*ckpt_dir"):
        AtomicCheckpointSaver(str(blocker / "models"), {"model": nn.Linear(1, 1)}, save_key_metric=True)


def test_saver_never_writes_nan_weights(tmp_path):
    net = nn.Linear(2, 2)
    engine = _scored_engine([0.5, 0.9])
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="dice",
                          key_metric_filename="model.pt").attach(engine)  # fmt: skip
    engine.run([0], max_epochs=1)
    before = (tmp_path / "model.pt").read_bytes()
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="model.pt.*NaN"):
        engine.run([0], max_epochs=2)
    assert (tmp_path / "model.pt").read_bytes() == before


def test_atomic_save_keeps_file_permissions_readable(tmp_path):
    path = atomic_save({"x": torch.ones(1)}, tmp_path / "a.pt")
    assert path.stat().st_mode & 0o044  # group/others can read, like a plain torch.save


# 2. backups copy, and only when the run starts


def test_backup_on_start_copies_only_when_the_run_starts(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"precious")
    engine = Engine(lambda e, b: None)
    BackupOnStart([str(model)]).attach(engine)
    assert not (tmp_path / "backup").exists()  # building the handler copies nothing
    engine.run([0], max_epochs=1)
    backups = list((tmp_path / "backup").iterdir())
    assert [b.read_bytes() for b in backups] == [b"precious"] and model.read_bytes() == b"precious"


# 3. one run per output folder


def test_second_run_on_the_same_folder_fails_fast(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from kd_components import acquire_run_lock; acquire_run_lock({str(tmp_path)!r}); "
         "import time; print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=f"PID {holder.pid}.*--ckpt_dir"):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # the killed run's lock is stale: taken over
    assert (tmp_path / LOCK_NAME).is_file()
    lock = acquire_run_lock(tmp_path)
    assert f'"pid": {os.getpid()}' in lock.read_text()
    release_run_lock(tmp_path)
    assert not lock.exists()


# 4. NaN/Inf guards


def _tiny_trainer(lr: float, handlers: list, epochs: int = 2, **kwargs) -> SupervisedTrainer:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    data = [{"image": torch.rand(2, 1, 8, 8), "label": torch.randint(0, 2, (2, 1, 8, 8))} for _ in range(3)]
    return SupervisedTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=lambda p, y: (p - y.float()).pow(2).mean() * (float("nan") if lr > 1e3 else 1.0),
        train_handlers=handlers,
        **kwargs,
    )


def test_supervised_trainer_stops_on_nan_before_the_step_naming_the_loss():
    trainer = _tiny_trainer(1e4, [FiniteLossGuard(stage="teacher")])
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"teacher stopped: non-finite loss at epoch 1, iteration 1: loss=nan"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in trainer.network.state_dict().items())  # no step taken


def test_paraphraser_trainer_stops_on_nan():
    teacher = UNet(2, 1, 2, (4, 8), (2,), num_res_units=0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("inf"))
    para = Paraphraser(spatial_dims=2, in_channels=4, factor_channels=2)
    trainer = ParaphraserTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[{"image": torch.rand(2, 1, 8, 8)}],
        network=para,
        optimizer=torch.optim.Adam(para.parameters()),
        teacher=teacher,
        tap="model.0.conv",
    )
    with pytest.raises(FloatingPointError, match="paraphraser stage stopped.*model.0.conv"):
        trainer.run()


def test_teacher_with_nan_weights_is_refused_naming_the_file(tmp_path):
    net = UNet(2, 1, 2, (4, 8), (2,), num_res_units=0)
    state = net.state_dict()
    state["model.0.conv.weight"] = torch.full_like(state["model.0.conv.weight"], float("nan"))
    torch.save(state, tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match=f"{tmp_path / 'teacher.pt'} holds NaN/Inf"):
        load_teacher(UNet(2, 1, 2, (4, 8), (2,), num_res_units=0), tmp_path / "teacher.pt")


# 7. resume


def test_training_state_saved_each_epoch_and_restored(tmp_path):
    path = tmp_path / "model_resume.pt"
    first = _tiny_trainer(0.1, [TrainingStateCheckpoint(path)], epochs=2)
    first.run()
    saved = torch.load(path, weights_only=True)
    assert saved["engine"]["epoch"] == 2 and saved["engine"]["iteration"] == 6
    assert {"network", "optimizer"} <= set(saved)

    handler = TrainingStateCheckpoint(path, resume=True)
    epochs_run = []
    resumed = _tiny_trainer(0.1, [handler], epochs=4)
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    restored = {}
    resumed.add_event_handler(
        Events.STARTED, lambda e: restored.update({k: v.clone() for k, v in e.network.state_dict().items()})
    )
    resumed.run()
    assert all(torch.equal(restored[k], saved["network"][k]) for k in saved["network"])
    assert epochs_run == [3, 4] and resumed.state.iteration == 12


# bundle-level cases, on the polyp bundle (the fastest) with tiny synthetic data

BUNDLE = "polyp_kdas"
FAST = {"image_size": [32, 32], "batch_size": 4, "num_workers": 0, "cache_rate": 0.0}
STUDENT_ALONE = ["train.json", "methods/none.json"]


@pytest.fixture(scope="module")
def polyp_data(tmp_path_factory):
    from kd_components.data.synthetic import make_synthetic_polyps

    out = tmp_path_factory.mktemp("polyp_data")
    make_synthetic_polyps(out, n=12, size=(32, 32), seed=0, overwrite=True)
    return out


def _bundle_cli(*args: str, cwd=None) -> list[str]:
    from tests.bundles.conftest import BUNDLES, configs

    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs(BUNDLE, *STUDENT_ALONE)),
        "--bundle_root", str(BUNDLES / BUNDLE), *args,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    from tests.bundles.conftest import REPO

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}


def test_typo_and_non_numeric_overrides_fail_before_anything_runs(polyp_data, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"precious")
    cmd = _bundle_cli("--dataset_dir", str(polyp_data), "--ckpt_dir", str(tmp_path), "--epoch", "2",
                      "--learning_rate", "abc")  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--epoch matches no id of the config (did you mean --epochs?)" in proc.stderr
    assert "--learning_rate must be a number (the config has 0.0001), got 'abc'" in proc.stderr
    assert (tmp_path / "model.pt").read_bytes() == b"precious" and not (tmp_path / "backup").exists()


def test_failed_start_leaves_the_model_in_place(polyp_data, tmp_path):
    from tests.bundles.conftest import make_workflow

    (tmp_path / "model.pt").write_bytes(b"precious")
    over = {**FAST, "epochs": 1, "dataset_dir": str(polyp_data), "ckpt_dir": str(tmp_path)}
    wf = make_workflow(BUNDLE, STUDENT_ALONE, output_dir=str(tmp_path / "eval"), learning_rate="abc", **over)
    wf.initialize()
    with pytest.raises(RuntimeError):  # AdamW refuses lr="abc" when the trainer is built
        wf.run()
    assert (tmp_path / "model.pt").read_bytes() == b"precious" and not (tmp_path / "backup").exists()


def test_student_alone_run_is_guarded_backed_up_atomic_and_locked(polyp_data, tmp_path):
    from tests.bundles.conftest import make_workflow, root_cause

    (tmp_path / "model.pt").write_bytes(b"precious")
    over = {**FAST, "epochs": 1, "dataset_dir": str(polyp_data), "ckpt_dir": str(tmp_path)}
    wf = make_workflow(BUNDLE, STUDENT_ALONE, output_dir=str(tmp_path / "eval"), learning_rate=1e30, **over)
    wf.initialize()
    assert (tmp_path / LOCK_NAME).is_file()
    with pytest.raises(Exception) as err:
        wf.run()
    assert isinstance(root_cause(err.value), FloatingPointError) and "non-finite loss" in str(root_cause(err.value))
    assert (tmp_path / "model.pt").read_bytes() == b"precious"  # never replaced by NaN weights
    assert [p.read_bytes() for p in (tmp_path / "backup").iterdir()] == [b"precious"]  # copied at the start


def _epoch_of(path) -> int:
    try:
        return torch.load(path, weights_only=True)["engine"]["epoch"]
    except Exception:
        return 0


def test_kill_9_then_resume_restores_the_state_and_finishes(polyp_data, tmp_path):
    """kill -9 a 4-epoch run after epoch 2 is saved, then --resume true: restored state equals the saved one."""
    import signal
    import time

    from tests.bundles.conftest import make_workflow

    state_file = tmp_path / "resume" / "model_resume.pt"
    args = ["--dataset_dir", str(polyp_data), "--ckpt_dir", str(tmp_path), "--output_dir", str(tmp_path / "eval"),
            "--epochs", "40", "--image_size", "[32,32]", "--batch_size", "4", "--num_workers", "0"]  # fmt: skip
    proc = subprocess.Popen(_bundle_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while _epoch_of(state_file) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(state_file, weights_only=True)
    k = saved["engine"]["epoch"]
    assert k >= 2 and (tmp_path / LOCK_NAME).is_file()  # the killed run's lock stays behind: stale

    over = {**FAST, "dataset_dir": str(polyp_data), "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path / "eval")}
    wf = make_workflow(BUNDLE, STUDENT_ALONE, epochs=k + 2, resume=True, **over)
    wf.initialize()  # takes over the stale lock
    trainer = wf.parser.get_parsed_content("train#trainer")
    restored, epochs_run = {}, []

    def _capture(engine):
        restored["network"] = {n: v.clone() for n, v in engine.network.state_dict().items()}
        restored["optimizer"] = copy.deepcopy(engine.optimizer.state_dict())
        restored["epoch"], restored["iteration"] = engine.state.epoch, engine.state.iteration
        restored["best"] = wf.parser.get_parsed_content("validate#evaluator").state.best_metric

    trainer.add_event_handler(Events.STARTED, _capture)  # after the resume handler, which runs first
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    wf.run()
    assert restored["epoch"] == k and restored["iteration"] == saved["engine"]["iteration"]
    assert restored["best"] == saved["validators"][0]["best_metric"] > 0  # a worse epoch cannot replace model.pt
    assert all(torch.equal(restored["network"][n], saved["network"][n]) for n in saved["network"])
    opt_saved, opt_restored = saved["optimizer"]["state"], restored["optimizer"]["state"]
    assert opt_saved.keys() == opt_restored.keys()
    assert all(torch.equal(opt_saved[i]["exp_avg"], opt_restored[i]["exp_avg"]) for i in opt_saved)
    assert epochs_run == [k + 1, k + 2]  # nothing redone: the kill came after epoch k was saved
    assert _epoch_of(state_file) == k + 2
    wf.finalize()
    assert not (tmp_path / LOCK_NAME).exists()  # released when the run ends (and at exit)


# 6. early checks in initialize, and data errors that name the file


def _initialize_error(polyp_data, tmp_path, error_type: type = BaseException, **override) -> BaseException:
    """The innermost error of ``error_type`` raised by the student-alone stage's ``initialize``."""
    from tests.bundles.conftest import make_workflow

    over = {**FAST, "epochs": 1, "dataset_dir": str(polyp_data), "ckpt_dir": str(tmp_path / "models"), **override}
    wf = make_workflow(BUNDLE, STUDENT_ALONE, output_dir=str(tmp_path / "eval"), **over)
    with pytest.raises(Exception) as err:
        wf.initialize()
    cause, found = err.value, err.value
    while cause is not None:  # MONAI wraps errors raised in config expressions
        found = cause if isinstance(cause, error_type) else found
        cause = cause.__cause__
    return found


def test_image_size_not_fitting_the_strides_names_the_key_and_fix(polyp_data, tmp_path):
    cause = _initialize_error(polyp_data, tmp_path, image_size=[30, 30])
    assert "image_size [30, 30] does not fit the network" in str(cause) and "--image_size [32, 32]" in str(cause)


def test_in_channels_not_matching_the_data_names_the_key_and_file(polyp_data, tmp_path):
    cause = _initialize_error(polyp_data, tmp_path, **{"network_def#in_channels": 1})
    assert "has 3 channel(s), the network takes 1 (network_def#in_channels)" in str(cause)
    assert "synthetic_0001.png" in str(cause)


def test_unwritable_checkpoint_folder_fails_at_initialize(polyp_data, tmp_path):
    (tmp_path / "file").write_text("")
    cause = _initialize_error(polyp_data, tmp_path, CheckpointWriteError, ckpt_dir=str(tmp_path / "file" / "models"))
    assert isinstance(cause, CheckpointWriteError) and "--ckpt_dir" in str(cause) and "file/models" in str(cause)


def _broken_copy(polyp_data, tmp_path, how: str):
    import json
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(polyp_data, data)
    first = data / "images" / "synthetic_0001.png"
    if how == "truncated":
        first.write_bytes(first.read_bytes()[:40])
    elif how == "greyscale":
        Image.open(first).convert("L").save(first)
    elif how == "no_label":
        datalist = json.loads((data / "datalist.json").read_text())
        datalist["training"][0].pop("label")
        (data / "datalist.json").write_text(json.dumps(datalist))
    return data


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", r"could not read .*synthetic_0001.png .*truncated, corrupt"),
        ("greyscale", r"image .*synthetic_0001.png has 1 channel\(s\), the network takes 3"),
        ("no_label", r"datalist entry \(.*synthetic_0001.png\) has no \['label'\] key"),
    ],
)
def test_data_errors_name_the_file(polyp_data, tmp_path, how, message):
    import re

    cause = _initialize_error(_broken_copy(polyp_data, tmp_path, how), tmp_path, ValueError)
    assert re.search(message, str(cause)), str(cause)


# 8. preparers catch swapped image and mask folders


def _swap(a, b) -> None:
    tmp = a.with_name(a.name + ".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_clinicdb_with_swapped_folders_is_refused_suggesting_the_swap(tmp_path):
    from kd_components.data.common import DatasetError
    from kd_components.data.polyp import prepare_polyp_data
    from tests.data.test_polyp import make_clinicdb

    make_clinicdb(tmp_path)
    root = tmp_path / "CVC-ClinicDB"
    _swap(root / "Original", root / "Ground Truth")  # some public copies ship it this way
    swapped = r"(?s)does not look like a mask: it is a colour image.*folders seem swapped"
    with pytest.raises(DatasetError, match=swapped):
        prepare_polyp_data(tmp_path / "out", clinicdb_dir=root)
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_xcad_with_swapped_folders_is_refused_suggesting_the_swap(tmp_path):
    from kd_components.data.common import DatasetError
    from kd_components.data.vessels import prepare_vessel_data
    from tests.data.test_vessels import make_xcad

    make_xcad(tmp_path)
    _swap(tmp_path / "XCAD" / "test" / "images", tmp_path / "XCAD" / "test" / "masks")
    with pytest.raises(DatasetError, match=r"(?s)looks like a mask: the image and mask folders seem swapped"):
        prepare_vessel_data(tmp_path / "out", "xcad", tmp_path / "XCAD")


def test_adversarial_resume_restores_discriminators_and_continues_like_an_uninterrupted_run(tmp_path):
    """Distiller (adapters and discriminators) and the discriminators' optimizer are in the state; 2 + 1 epochs ==
    3 epochs."""
    from tests.test_adversarial_trainer import build

    def snap(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    straight = build(epochs=3)
    straight.trainer.run()

    path = tmp_path / "model_resume.pt"
    first = build(epochs=2)
    TrainingStateCheckpoint(path).attach(first.trainer)
    first.trainer.run()
    saved = torch.load(path, weights_only=True)
    assert {"network", "optimizer", "distiller", "discriminator_optimizer"} <= set(saved)
    saved_discriminator = {
        k.removeprefix("terms.0.loss.discriminator."): v
        for k, v in saved["distiller"].items()
        if k.startswith("terms.0.loss.discriminator.")
    }
    assert saved_discriminator.keys() == first.discriminator.state_dict().keys()

    second = build(epochs=3)
    TrainingStateCheckpoint(path, resume=True).attach(second.trainer)
    restored = {}
    second.trainer.add_event_handler(Events.STARTED, lambda e: restored.update(snap(e.discriminators["adv"])))
    second.trainer.run()
    assert all(torch.equal(restored[k], v) for k, v in saved_discriminator.items())
    assert second.trainer.state.epoch == 3
    for a, b in ((straight.student, second.student), (straight.bank, second.bank)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x.float(), y.float(), atol=1e-6), name


def test_resume_state_of_an_adversarial_run_from_before_the_registered_discriminators_is_refused(tmp_path):
    """Such a file keeps the discriminators apart ("discriminators") and a distiller state without them: resuming
    from it stops before training, naming the file, the object and what to do."""
    from tests.test_adversarial_trainer import build

    path = tmp_path / "model_resume.pt"
    first = build(epochs=1)
    TrainingStateCheckpoint(path).attach(first.trainer)
    first.trainer.run()
    state = torch.load(path, weights_only=True)
    prefix = "terms.0.loss.discriminator."
    state["discriminators"] = {
        "adv." + k[len(prefix) :]: v for k, v in state["distiller"].items() if k.startswith(prefix)
    }
    state["distiller"] = {k: v for k, v in state["distiller"].items() if not k.startswith(prefix)}
    torch.save(state, path)
    second = build(epochs=2)
    TrainingStateCheckpoint(path, resume=True).attach(second.trainer)
    with pytest.raises(ValueError, match=r"(?s)model_resume\.pt: 'distiller' does not fit.*before the discriminators"):
        second.trainer.run()
    assert second.trainer.state.epoch == 0


# 5. override validation: the rule, and MONAI's legitimate uses


def test_override_rule_accepts_ids_of_merged_files_and_refuses_typos_and_wrong_types(tmp_path):
    from kd_components import OverrideError, check_overrides, validate_overrides
    from kd_components.overrides import parse_cli_overrides
    from tests.bundles.conftest import configs

    files = configs(BUNDLE, "train.json", "methods/structured_kd_holistic.json")
    # ids that exist only in the merged method file (its third term), and an item a "+validate#handlers" merge appends
    appended = tmp_path / "extra_saver.json"
    saver = {"_target_": "CheckpointSaver", "key_metric_filename": "x"}
    appended.write_text(json.dumps({"+validate#handlers": [saver]}))
    merged = [*files, str(appended)]
    validate_overrides(files, {"discriminator_learning_rate": 1e-4, "distill#terms#2#weight": 0.2})
    validate_overrides(merged, {"validate#handlers#2#key_metric_filename": "d.pt"})
    validate_overrides(files, {"epochs": 3, "learning_rate": "$1e-3 * 2", "image_size": [64, 64], "resume": True})
    with pytest.raises(OverrideError, match=r"--distill#alpa matches no id .*did you mean --distill#alpha"):
        validate_overrides(files, {"distill#alpa": 0.9})
    with pytest.raises(OverrideError, match=r"--epochs must be an integer \(the config has 100\), got '2x'"):
        validate_overrides(files, {"epochs": "2x"})
    with pytest.raises(OverrideError, match=r"--resume must be true or false"):
        validate_overrides(files, {"resume": "yes"})

    import monai.bundle.__main__ as cli

    argv = [cli.__file__, "run", "training", "--config_file", str(files), "--epoch=2", "--amp", "--meta_file", "m"]
    assert parse_cli_overrides(argv) == (files, {"epoch": 2, "amp": True})
    assert parse_cli_overrides(["pytest", "-x"]) is None  # workflows built in Python are not checked
    check_overrides([*argv[:5], "--tracking", "mlflow", "--tracking_uri", "file:/tmp/x", "--epochs", "2"])
    with pytest.raises(OverrideError, match="--tracking_uri matches no id"):  # only with --tracking
        check_overrides([*argv[:5], "--tracking_uri", "file:/tmp/x"])


def test_teacher_with_non_finite_outputs_is_refused_naming_the_file(tmp_path):
    net = UNet(2, 1, 2, (4, 8), (2,), num_res_units=0)
    state = net.state_dict()
    state["model.0.conv.weight"] = torch.full_like(state["model.0.conv.weight"], 1e38)  # finite, but overflows
    torch.save(state, tmp_path / "teacher.pt")
    teacher = load_teacher(UNet(2, 1, 2, (4, 8), (2,), num_res_units=0), tmp_path / "teacher.pt")  # no probe: loads
    assert teacher is not None
    with pytest.raises(ValueError, match=f"{tmp_path / 'teacher.pt'} gives NaN/Inf outputs"):
        load_teacher(UNet(2, 1, 2, (4, 8), (2,), num_res_units=0), tmp_path / "teacher.pt", probe_shape=[1, 1, 8, 8])


def test_paraphraser_stage_resumes_both_paraphrasers(tmp_path):
    """The paraphraser stage saves each trainer's state; --resume true continues both (1 more epoch each)."""
    from kd_components.data.pathology import prepare_pathology_data
    from tests.bundles.conftest import FAST, make_he_tiles, make_workflow, run_workflow

    COCO_FAST = FAST["pathology_coco"]

    data = tmp_path / "data"
    prepare_pathology_data(data, tiles_dir=make_he_tiles(tmp_path / "raw", n=6), fractions=(0.6, 0.2, 0.2))
    models = tmp_path / "models"
    over = {**COCO_FAST, "dataset_dir": str(data), "ckpt_dir": str(models), "output_dir": str(tmp_path / "eval")}
    teacher = make_workflow("pathology_coco", ["train.json"], **over).parser.get_parsed_content("teacher_def")
    atomic_save(teacher.state_dict(), models / "teacher.pt")  # any finite teacher will do
    stage = ["train.json", "train_paraphraser.json"]
    run_workflow("pathology_coco", stage, paraphraser_epochs=1, **over)
    for role in ("shallow", "deep"):
        assert torch.load(models / f"paraphraser_{role}_resume.pt", weights_only=True)["engine"]["epoch"] == 1
    wf = run_workflow("pathology_coco", stage, paraphraser_epochs=2, resume=True, **over)
    for trainer_id, handlers_id in (("train#trainer", "train#handlers"), ("paraphraser_deep#trainer",
                                                                        "paraphraser_deep#handlers")):  # fmt: skip
        trainer = wf.parser.get_parsed_content(trainer_id)
        assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * trainer.state.epoch_length
        (state,) = [h for h in wf.parser.get_parsed_content(handlers_id) if isinstance(h, TrainingStateCheckpoint)]
        assert state.loaded["engine"]["epoch"] == 1  # continued from epoch 1, not restarted
