"""The pathology_coco bundle: its stages through ConfigWorkflow on tiny synthetic H&E tiles, MLflow, bad input (each
method file and two-process DDP: tests/bundles/test_all_bundles.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ckpt_export
from PIL import Image

from kd_components import BackupOnStart, DistillationTrainer, FrozenEncoder
from kd_components.data.common import DatasetError
from kd_components.data.pathology import prepare_pathology_data
from kd_components.modules import Translator
from tests.bundles.conftest import BUNDLES, SHARED, make_he_tiles, make_workflow, root_cause, run_workflow
from tests.bundles.conftest import FAST as BUNDLE_FAST

BUNDLE = "pathology_coco"
FAST = BUNDLE_FAST[BUNDLE]
TILE = 64  # the side of the tiny setup's tiles (conftest.make_he_tiles)


@pytest.fixture(scope="module")
def data_dir(tiny) -> Path:
    """10 synthetic tiles prepared by the real preparer (the session's tiny setup): 6 training, 2 validation, 2 test."""
    return tiny(BUNDLE).data_dir


@pytest.fixture(scope="module")
def trained(tiny) -> dict:
    """The session's tiny setup (teacher and both paraphrasers trained one epoch): the overrides pointing at them."""
    setup = tiny(BUNDLE)
    return {**setup.over, "teacher_ckpt": str(setup.models / "teacher.pt"), "paraphraser_dir": str(setup.models)}


def test_paraphraser_stage_trains_a_paraphraser_per_named_tap(tiny):
    """The stage the tiny setup ran: one paraphraser per tap name, on the teacher tap of that name, trained and
    saved; it writes paraphrasers only."""
    setup = tiny(BUNDLE)
    wf = setup.paraphrasers
    for role, trainer_id in (("shallow", "train#trainer"), ("deep", "paraphraser_deep#trainer")):
        trainer = wf.parser.get_parsed_content(trainer_id)
        assert f"teacher:{trainer.tap}" == wf.parser.get_parsed_content(f"taps#{role}#teacher")
        assert trainer.state.epoch == 1 and np.isfinite(trainer.state.metrics["train_reconstruction"])
        assert (setup.models / f"paraphraser_{role}.pt").is_file()
    assert not (setup.models / "model.pt").exists()  # the paraphraser stage writes paraphrasers only


def test_check_properties_of_every_stage(trained, data_dir, tmp_path):
    # the paraphraser stage backs up the paraphrasers of its paraphraser_dir: give it an empty one
    stages = {
        "distill": ["train.json"],
        "teacher": ["train.json", "train_teacher.json"],
        "paraphraser": ["train.json", "train_paraphraser.json"],
    }
    for stage, names in stages.items():
        over = {**trained, "ckpt_dir": str(tmp_path)}
        if stage == "paraphraser":
            over["paraphraser_dir"] = str(tmp_path)
        wf = make_workflow(BUNDLE, names, **over)
        wf.initialize()
        assert wf.check_properties() == [], names
    (tmp_path / "model.pt").touch()  # inference's initialize checks that the weights and images exist
    infer = make_workflow(
        BUNDLE, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path), dataset_dir=str(data_dir / "images")
    )
    infer.initialize()
    assert infer.check_properties() == []


def test_train_and_inference_networks_agree():
    """inference.json (MONAI only) defines exactly the student, patch and scale that train.json trains with."""
    train = make_workflow(BUNDLE, ["train.json"]).parser
    infer = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser
    infer["settings_path"] = ""  # no trained settings: inference.json's defaults
    for key in ("network_def", "image_scale", "sw_overlap", "num_classes"):
        assert train.get(key) == infer.get(key), key
    assert train.get_parsed_content("image_size") == infer.get_parsed_content("image_size")
    n_t = sum(p.numel() for p in train.get_parsed_content("teacher_def").parameters())
    n_s = sum(p.numel() for p in train.get_parsed_content("network_def").parameters())
    assert (n_t, n_s) == (6_501_341, 408_485)  # the counts docs/README.md reports
    assert n_s <= 0.1 * n_t


def test_paraphraser_widths_fit_the_tapped_layers():
    """Paraphrasers take the teacher taps' channels; translators map the student taps to the same factor width."""
    parser = make_workflow(BUNDLE, ["train.json"]).parser
    teacher, student = parser.get_parsed_content("teacher_def"), parser.get_parsed_content("network_def")
    t_out, s_out = {}, {}
    for role in ("shallow", "deep"):
        t_mod = dict(teacher.named_modules())[parser.get(f"taps#{role}#teacher").removeprefix("teacher:")]
        s_mod = dict(student.named_modules())[parser.get(f"taps#{role}#student").removeprefix("student:")]
        t_mod.register_forward_hook(lambda m, i, o, role=role: t_out.__setitem__(role, o))
        s_mod.register_forward_hook(lambda m, i, o, role=role: s_out.__setitem__(role, o))
    x = torch.rand(1, 3, 64, 64)
    teacher.eval()(x), student.eval()(x)
    for role in ("shallow", "deep"):
        para = parser.get(f"paraphraser_def#{role}")
        translator = parser.get(f"distill#correlation_term#transforms#student_{role}")
        assert para["in_channels"] == t_out[role].shape[1]
        assert translator["in_channels"] == s_out[role].shape[1]
        assert para["factor_channels"] == s_out[role].shape[1]  # teacher compressed to the student's width
        assert t_out[role].shape[2:] == s_out[role].shape[2:]
    assert t_out["shallow"].shape[-1] > t_out["deep"].shape[-1]  # shallow is the finer layer


def test_coco_distill_evaluate_infer_export_with_mlflow(trained, tmp_path):
    """CoCo (train.json default) trains translators and discriminator, leaves teacher and paraphrasers untouched."""
    ckpt_dir = tmp_path / "models"
    over = {**trained, "ckpt_dir": str(ckpt_dir), "output_dir": str(tmp_path / "eval")}
    frozen_files = [Path(trained["teacher_ckpt"])] + [
        Path(trained["paraphraser_dir"]) / f"paraphraser_{r}.pt" for r in ("shallow", "deep")
    ]
    before = [torch.load(f, weights_only=True) for f in frozen_files]

    wf = make_workflow(BUNDLE, ["train.json"], tracking="mlflow", **over)
    wf.initialize()
    distiller = wf.parser.get_parsed_content("distiller")
    term = distiller.terms[0]
    assert [t.name for t in distiller.terms] == ["coco_correlation", "adversarial"]
    assert isinstance(term.transforms["teacher_shallow"], FrozenEncoder)
    assert isinstance(term.transforms["student_deep"], Translator)
    translator_before = [p.detach().clone() for p in term.transforms["student_deep"].parameters()]
    wf.run()
    wf.finalize()

    trainer = wf.parser.get_parsed_content("train#trainer")
    assert isinstance(trainer, DistillationTrainer) and trainer.adversarial is not None
    expected = {"train_coco_correlation", "train_adversarial", "train_adversarial_discriminator", "train_supervised"}
    assert expected <= set(trainer.state.metrics)
    assert all(np.isfinite(v) for v in trainer.state.metrics.values())
    after = [torch.load(f, weights_only=True) for f in frozen_files]
    assert all(torch.equal(b[k], a[k]) for b, a in zip(before, after, strict=True) for k in b)
    assert any(not torch.equal(b, p) for b, p in zip(translator_before, term.transforms["student_deep"].parameters()))

    # model.pt is a plain student state dict (MONAI Label loads it strict=False: a wrong key would fail silently);
    # discriminator.pt holds the discriminator bank and its optimizer
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)
    student = make_workflow(BUNDLE, ["inference.json"], workflow_type="infer").parser.get_parsed_content("network_def")
    assert set(state) == set(student.state_dict())
    disc = torch.load(ckpt_dir / "discriminator" / "discriminator.pt", weights_only=True)
    assert set(disc) == {"discriminators", "discriminator_optimizer"}
    assert all(k.startswith("adversarial.") for k in disc["discriminators"])

    client = MlflowClient(f"sqlite:///{tmp_path}/eval/mlruns.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = next(r for r in runs if "train_coco_correlation" in r.data.metrics)
    assert {"train_adversarial_discriminator", "train_supervised", "val_mean_dice"} <= set(run.data.metrics)
    assert run.data.params["kd.terms"] == "coco_correlation,adversarial"

    # evaluation on the test split at the tiles' own size (image_scale 0.5 is inverted before the metrics)
    ev = run_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", image_scale=0.5, **over)
    metrics = ev.parser.get_parsed_content("validate#evaluator").state.metrics
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["val_mean_iou"] <= 1.0
    for name in ("val_mean_dice", "val_mean_iou", "val_hd95"):
        rows = (tmp_path / "eval" / f"{name}_raw.csv").read_text().splitlines()
        assert rows[0] == "filename,class0,mean" and len(rows) == 1 + 2  # header + the two test tiles

    out = tmp_path / "masks"
    run_workflow(
        BUNDLE,
        ["inference.json"],
        workflow_type="infer",
        dataset_dir=str(Path(trained["dataset_dir"]) / "images"),
        ckpt_dir=str(ckpt_dir),
        output_dir=str(out),
        image_size=FAST["image_size"],
        image_scale=0.5,
    )
    masks = sorted(out.glob("*_seg.png"))
    assert len(masks) == 10
    mask = Image.open(masks[0])
    assert mask.size == (TILE, TILE) and set(mask.getdata()) <= {0, 255}

    ts = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt_dir / "model.pt"),
        meta_file=str(BUNDLES / BUNDLE / "configs/metadata.json"),
        config_file=str(BUNDLES / BUNDLE / "configs/inference.json"),
    )
    assert torch.jit.load(str(ts))(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_paraphraser_stage_backs_up_existing_paraphrasers(trained, tmp_path):
    """The paraphraser stage never loses paraphrasers: they are copied to backup/ when its first trainer starts (the
    student stage's backups: test_each_method_file_trains in test_all_bundles.py)."""
    (tmp_path / "paraphraser_shallow.pt").write_bytes(b"precious")
    over = {
        **trained,
        "ckpt_dir": str(tmp_path),
        "output_dir": str(tmp_path / "eval"),
        "paraphraser_dir": str(tmp_path),
    }
    wf = make_workflow(BUNDLE, ["train.json", "train_paraphraser.json"], **over)
    wf.initialize()
    # fire the stage's backup handler alone (the stage itself runs in the session's tiny setup)
    backup = next(h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, BackupOnStart))
    backup(None)
    (copy,) = (tmp_path / "backup").glob("paraphraser_shallow.*.pt")
    assert copy.read_bytes() == b"precious"


def test_missing_teacher_or_paraphraser_says_what_to_run(trained, tmp_path):
    over = {**trained, "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path / "eval")}
    for names in (["train.json"], ["train.json", "train_paraphraser.json"]):
        # (the paraphraser stage's initialize backs up the paraphrasers of its paraphraser_dir: an empty one here)
        no_teacher = {"teacher_ckpt": str(tmp_path / "teacher.pt"), "paraphraser_dir": str(tmp_path / "new")}
        wf = make_workflow(BUNDLE, names, **{**over, **no_teacher})
        with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
            wf.initialize()
            wf.run()
        cause = root_cause(err.value)
        assert isinstance(cause, FileNotFoundError) and "teacher checkpoint not found" in str(cause)
        assert "train_teacher.json" in str(cause)

    wf = make_workflow(BUNDLE, ["train.json"], **{**over, "paraphraser_dir": str(tmp_path)})
    with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
        wf.initialize()
        wf.run()
    cause = root_cause(err.value)
    assert isinstance(cause, FileNotFoundError) and "paraphraser_shallow.pt" in str(cause)
    assert "train_paraphraser.json" in str(cause) and "--paraphraser_dir" in str(cause)


def test_missing_or_empty_datalist_and_bad_labels_say_what_to_do(trained, data_dir, tmp_path):
    def failure(dataset_dir: Path) -> BaseException:
        wf = make_workflow(
            BUNDLE,
            ["train.json", "train_teacher.json"],
            **{**trained, "dataset_dir": str(dataset_dir), "ckpt_dir": str(tmp_path / "models")},
        )
        with pytest.raises(RuntimeError) as err:  # initialize's early checks or the run
            wf.initialize()
            wf.run()
        return root_cause(err.value)

    cause = failure(tmp_path)
    assert isinstance(cause, DatasetError) and "datalist not found" in str(cause)
    assert "kd_components.data.pathology" in str(cause)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "datalist.json").write_text('{"training": [], "validation": [], "test": []}')
    cause = failure(empty)
    assert isinstance(cause, DatasetError) and "'training' section" in str(cause) and "is empty" in str(cause)

    bad = tmp_path / "bad"
    prepare_pathology_data(bad, tiles_dir=make_he_tiles(tmp_path / "raw", n=5, seed=1))
    label = sorted((bad / "labels").glob("*.png"))[0]
    Image.fromarray((np.array(Image.open(label)) * 255).astype(np.uint8)).save(label)  # a 0/255 mask
    cause = failure(bad)
    assert "outside the class indices 0..1" in str(cause) and label.name in str(cause)


MONUSEG = SHARED / "datasets" / "MoNuSeg"


@pytest.mark.skipif(not (MONUSEG / "images").is_dir(), reason=f"real data not found at {MONUSEG}")
def test_short_real_data_run_on_monuseg(tmp_path):
    """Prepare 6 real MoNuSeg tiles (1000x1000) and run every stage once, at 1/8 scale with 64x64 patches."""
    data = tmp_path / "data"
    prepare_pathology_data(data, monuseg_dir=MONUSEG, limit=6, fractions=(0.5, 0.25, 0.25))
    over = {
        **FAST,
        "image_size": [64, 64],
        "image_scale": 0.125,
        "dataset_dir": str(data),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
    }
    run_workflow(BUNDLE, ["train.json", "train_teacher.json"], **over)
    run_workflow(BUNDLE, ["train.json", "train_paraphraser.json"], paraphraser_epochs=1, **over)
    wf = run_workflow(BUNDLE, ["train.json"], **over)
    metrics = wf.parser.get_parsed_content("train#trainer").state.metrics
    assert all(np.isfinite(v) for v in metrics.values())
    run_workflow(BUNDLE, ["train.json", "evaluate.json"], workflow_type="eval", **over)
    rows = (tmp_path / "eval" / "val_hd95_raw.csv").read_text().splitlines()
    assert len(rows) == 1 + 1  # the one test tile, evaluated at its full 1000x1000 size


METHODS = sorted(p.stem for p in (BUNDLES / BUNDLE / "configs" / "methods").glob("*.json"))
BASELINES = {"none", "kdas", "logit_kd", "cwd", "dist", "at", "fitnet", "structured_kd", "ifvd", "emkd", "cirkd"}


def test_method_list_covers_the_baselines():
    assert BASELINES | {"mgd", "idd", "coco", "coco_no_adv"} <= set(METHODS)


def test_coco_method_file_equals_the_default():
    default = make_workflow(BUNDLE, ["train.json"]).parser
    coco = make_workflow(BUNDLE, ["train.json", "methods/coco.json"]).parser
    assert coco.get() == default.get()
