"""Properties every bundle keeps, tested once and parametrised over the bundles: valid metadata, clear inference
errors, each method file merges with multi-GPU training and trains, two-process DDP training, the comparison
runner's ids exist."""

from __future__ import annotations

import json
import pydoc
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from kd_components import BackupOnStart, DistillationTrainer
from kd_components.terms import loss_arguments
from tests.bundles.conftest import BUNDLES, FAST, make_workflow, root_cause, torchrun_training

NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "train.json").is_file())
RUNNER_IDS = ["network_def", "teacher_def", "teacher_ckpt", "ckpt_dir", "ckpt_name", "dataset_dir", "output_dir"]


def _stages(bundle: str) -> list[str]:
    configs = BUNDLES / bundle / "configs"
    return ["train_teacher.json"] + [f"methods/{p.name}" for p in sorted((configs / "methods").glob("*.json"))]


def test_every_seed_bundle_is_here():
    assert {"polyp_kdas", "pathology_coco", "multiorgan_graphflow", "vessel_lightvessel"} <= set(NAMES)


@pytest.mark.parametrize("bundle", NAMES)
def test_every_stage_merges_with_multi_gpu_training(bundle):
    """A method file (which may replace ``train#trainer`` by a reference) merged before ``multi_gpu_train.json``
    keeps a trainer dict whose ``max_epochs`` MONAI Label can set."""
    configs = BUNDLES / bundle / "configs"
    for stage in _stages(bundle):
        parser = ConfigParser()
        parser.read_config([str(configs / "train.json"), str(configs / stage), str(configs / "multi_gpu_train.json")])
        trainer, seen = parser["train#trainer"], set()
        while isinstance(trainer, str) and trainer[:1] in "@%" and trainer not in seen:  # follow references
            seen.add(trainer)
            trainer = parser[trainer[1:]]
        assert isinstance(trainer, dict) and "max_epochs" in trainer, f"{stage}: train#trainer is {trainer!r}"


def _method_copies() -> dict[str, list]:
    """``{method file name: [its path in each bundle that has it]}`` for the methods of several bundles."""
    copies: dict[str, list] = {}
    for bundle in NAMES:
        for path in sorted((BUNDLES / bundle / "configs" / "methods").glob("*.json")):
            copies.setdefault(path.name, []).append(path)
    return {name: paths for name, paths in copies.items() if len(paths) > 1}


def test_a_method_file_is_the_same_text_in_every_bundle():
    """One preset per method: a method file present in several bundles is byte-identical in all of them (what a
    bundle tunes lives in its train.json: taps#<name>, distill#<knob>), and names no trainer and no module path."""
    copies = _method_copies()
    assert {"none.json", "logit_kd.json", "mgd.json", "structured_kd_holistic.json"} <= set(copies)
    for name, paths in copies.items():
        texts = {path.parent.parent.parent.name: path.read_bytes() for path in paths}
        reference = max(texts.values(), key=list(texts.values()).count)  # the text most bundles share
        differ = sorted(bundle for bundle, text in texts.items() if text != reference)
        assert not differ, f"methods/{name} of {differ} differs from the copy in the other bundles {sorted(texts)}"
    for bundle in NAMES:
        for path in (BUNDLES / bundle / "configs" / "methods").glob("*.json"):
            text = path.read_text()
            assert 'train#trainer"' not in text and '_target_": "SupervisedTrainer' not in text, path
            assert not re.search(r"#\d+\"", text), f"{path}: a config id patched by list index"
            assert not re.search(r"\"(student|teacher):model", text), f"{path}: a module path instead of @taps#..."


@pytest.mark.parametrize("bundle", NAMES)
def test_the_taps_section_names_shallow_and_deep_sources(bundle):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    taps = parser["taps"]
    assert {"shallow", "deep"} <= set(taps)
    for name, sides in taps.items():
        assert set(sides) == {"student", "teacher"}, name
        assert all(sides[side].startswith(f"{side}:") for side in sides), name


@pytest.mark.parametrize("bundle", NAMES)
def test_the_comparison_runner_finds_its_ids_and_class_names(bundle):
    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    for key in RUNNER_IDS:
        assert key in parser, f"{bundle}/configs/train.json has no {key!r}"
    assert (configs / "methods" / "none.json").is_file() and (configs / "evaluate.json").is_file()
    channels = json.loads((configs / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    assert channels["channel_def"]["0"] == "background"
    assert len(channels["channel_def"]) == parser.get_parsed_content("num_classes")


@pytest.mark.parametrize("bundle", NAMES)
def test_metadata_and_network_io(bundle, schema_path):
    configs = BUNDLES / bundle / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(schema_path))
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        n=1,
    )


@pytest.mark.parametrize("bundle", NAMES)
def test_inference_without_weights_or_inputs_says_what_to_do(bundle, tmp_path):
    infer = make_workflow(bundle, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        infer.initialize()
    assert re.search("student weights not found.*train the student first", str(root_cause(err.value)))
    (tmp_path / "model.pt").touch()
    infer = make_workflow(
        bundle, ["inference.json"], workflow_type="infer", ckpt_dir=str(tmp_path), dataset_dir=str(tmp_path)
    )
    with pytest.raises(RuntimeError) as err:
        infer.initialize()
    assert re.search("no input (images|volumes).*--dataset_dir", str(root_cause(err.value)))


def _terms(node):
    """Every ``DistillationTerm`` dict in a config tree."""
    if isinstance(node, dict):
        if node.get("_target_") == "kd_components.DistillationTerm":
            yield node
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            yield from _terms(child)


@pytest.mark.parametrize("bundle", NAMES)
def test_every_term_names_arguments_its_loss_takes(bundle):
    """The check ``DistillationTerm`` makes when built, done on the config text of every file (no teacher needed)."""
    checked = 0
    for path in sorted((BUNDLES / bundle / "configs").rglob("*.json")):
        for term in _terms(json.loads(path.read_text())):
            loss = pydoc.locate(term["loss"]["_target_"])
            names, required, var_keyword = loss_arguments(loss.forward if isinstance(loss, type) else loss)
            names, required = [n for n in names if n != "self"], [n for n in required if n != "self"]
            inputs = set(term.get("inputs", {"student": "student", "teacher": "teacher"}))
            where = f"{path.relative_to(BUNDLES)} term {term['name']!r}"
            assert var_keyword or inputs <= set(names), f"{where}: inputs {sorted(inputs)}, loss takes {names}"
            assert set(required) <= inputs, f"{where}: inputs {sorted(inputs)}, loss needs {required}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("bundle", NAMES)
def test_every_critic_reads_the_bundle_input_pool(bundle):
    """``--critic_input_pool N`` reaches every adversarial term of every config file of the bundle."""
    critics = []
    for path in sorted((BUNDLES / bundle / "configs").rglob("*.json")):
        for term in _terms(json.loads(path.read_text())):
            if term["loss"]["_target_"].endswith("AdversarialDistillationLoss"):
                critics.append(path.name)
                assert term["loss"].get("input_pool") == "@critic_input_pool", f"{path.name} term {term['name']!r}"
    if critics:
        train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
        assert isinstance(train["critic_input_pool"], int) and isinstance(train["critic_every"], int)
        assert train["train"]["trainer"]["critic_every"] == "@critic_every"


def test_the_paper_critic_file_is_one_text_and_restores_the_paper_schedule():
    """``configs/paper_critic.json`` undoes a bundle's critic cost levers; it is the same text wherever it is."""
    files = {p.read_text() for p in BUNDLES.glob("*/configs/paper_critic.json")}
    assert len(files) == 1
    assert json.loads(files.pop()) == {"critic_input_pool": 1, "critic_every": 1}
    trains = {name: json.loads((BUNDLES / name / "configs" / "train.json").read_text()) for name in NAMES}
    with_levers = [n for n, t in trains.items() if t.get("critic_input_pool", 1) != 1 or t.get("critic_every", 1) != 1]
    assert with_levers
    assert all((BUNDLES / name / "configs" / "paper_critic.json").is_file() for name in with_levers)


def _reaches(parser: ConfigParser, key: str, text: str, seen: set[str] | None = None) -> bool:
    """Whether the raw config at ``key``, or one it references with ``@``, contains ``text``."""
    raw = json.dumps(parser.get(key))
    seen = seen if seen is not None else {key}
    if text in raw:
        return True
    refs = [r for r in re.findall(r"@([\w#]+)", raw) if r not in seen and r in parser]
    seen.update(refs)
    return any(_reaches(parser, ref, text, seen) for ref in refs)


ADVERSARIAL_METHODS = {"asd", "coco", "graph_flow", "lightvessel", "structured_kd_holistic"}
"""The method files with an adversarial term, in whichever bundle they are."""

METHOD_CASES = [
    (bundle, path.stem)
    for bundle in NAMES
    for path in sorted((BUNDLES / bundle / "configs" / "methods").glob("*.json"))
]


@pytest.mark.parametrize(("bundle", "method"), METHOD_CASES)
def test_each_method_file_trains(bundle, method, tiny, tmp_path):
    """Every method file merged onto train.json alone trains the tiny setup (one iteration) with the one trainer and
    reports each of its terms; the teacher does not change; the student is saved, and exactly when a term is
    adversarial, the trained discriminators are saved beside it; the files the run overwrites are copied to
    backup/ first; only methods that load paraphrasers need them (an empty ``paraphraser_dir`` otherwise)."""
    setup = tiny(bundle)
    names = ["train.json", f"methods/{method}.json"]
    parser = make_workflow(bundle, names).parser
    adversarial = method in ADVERSARIAL_METHODS
    extra = {}
    if setup.paraphrasers is not None and not _reaches(parser, "distill#terms", "load_paraphraser_encoder"):
        extra["paraphraser_dir"] = str(tmp_path / "no_paraphrasers")
    wf = make_workflow(bundle, names, **setup.student(tmp_path, **extra), **{"train#trainer#epoch_length": 1})
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    teacher = trainer.teacher if trainer.teacher is not None else torch.nn.Identity()  # none.json: no teacher
    assert (trainer.teacher is None) == (method == "none")
    before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    if adversarial:  # parameters: spectral norm's power-iteration buffers change in any forward pass in train mode
        before.update({f"d.{k}": v.detach().clone() for k, v in trainer.discriminators.named_parameters()})
    (backup,) = [h for h in wf.parser.get_parsed_content("train#handlers") if isinstance(h, BackupOnStart)]
    precious = [Path(p) for p in backup.paths]  # the student's checkpoint (and the discriminator's) of a rerun
    assert tmp_path / "model.pt" in precious
    for path in precious:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"precious")
    wf.run()
    wf.finalize()
    assert isinstance(trainer, DistillationTrainer)  # one trainer; the terms decide what runs
    terms = [t.name for t in wf.parser.get_parsed_content("distiller").terms]
    assert bool(terms) == (method != "none")
    assert all(f"train_{name}" in trainer.state.metrics for name in terms)
    assert all(np.isfinite(v) for v in trainer.state.metrics.values())
    assert (trainer.adversarial is not None) == adversarial
    assert (tmp_path / "model.pt").read_bytes() != b"precious"
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    written = [p for p in (tmp_path / "discriminator").glob("*.pt") if p.read_bytes() != b"precious"]
    assert len(written) == int(adversarial)
    if adversarial:
        assert all(f"train_{name}_discriminator" in trainer.state.metrics for name in trainer.adversarial.terms)
        assert any(not torch.equal(before[f"d.{k}"], v) for k, v in trainer.discriminators.named_parameters())
        saved = torch.load(written[0], weights_only=True)["discriminators"]
        assert saved.keys() == trainer.discriminators.state_dict().keys()
    for path in precious:
        (copy,) = (path.parent / "backup").glob(f"{path.stem}.*{path.suffix}")
        assert copy.read_bytes() == b"precious"


SEMI_SUPERVISED = [name for name in NAMES if (BUNDLES / name / "configs" / "semisupervised.json").is_file()]
"""Bundles with the low-label paradigm as two overrides: ``semisupervised.json`` (distillation on every training
image, supervision on a seeded ``labelled_fraction`` of them) and ``labelled_only.json`` (its baseline)."""


def test_the_low_label_overrides_come_in_pairs():
    assert set(SEMI_SUPERVISED) == set(NAMES), "every bundle has the low-label paradigm"
    assert all((BUNDLES / name / "configs" / "labelled_only.json").is_file() for name in SEMI_SUPERVISED)


def _group(item: dict) -> str:
    """What a bundle labels as a whole: the patient (3D volumes), the volume (2D slices) or else the image."""
    return item.get("patient", item.get("case", item["image"]))


@pytest.mark.parametrize("bundle", SEMI_SUPERVISED)
def test_semisupervised_supervises_the_labelled_images_and_distils_on_all(bundle, tiny, tmp_path):
    """With ``semisupervised.json`` the bundle's own transforms load the unlabelled images (no label file read), give
    them an all-zero placeholder label and a ``labelled`` flag collated per sample; the trainer counts exactly the
    split's labelled share and trains every term; ``labelled_only.json`` trains on the labelled images only,
    repeated to the whole list's length (as many steps per epoch)."""
    setup = tiny(bundle)
    over = {**setup.student(tmp_path), "labelled_fraction": 0.5, "seed": 3}
    wf = make_workflow(bundle, ["train.json", "semisupervised.json"], **over)
    split = wf.parser.get_parsed_content("labelled_split")
    wf.parser["batch_size"] = len(split)  # one batch holds labelled and unlabelled samples: they must collate together
    wf.initialize()
    labelled_groups = {_group(item) for item in split if item["labelled"]}
    unlabelled_groups = {_group(item) for item in split if not item["labelled"]}
    assert not labelled_groups & unlabelled_groups, "a patient (volume, image) is labelled or not, never both"
    groups = len(labelled_groups | unlabelled_groups)
    assert abs(len(labelled_groups) - 0.5 * groups) <= 0.5, "half of the patients (volumes, images), rounded"
    share = sum(item["labelled"] for item in split) / len(split)
    assert all(("label" in item) == item["labelled"] for item in split)
    flags, foreground, mixed = [], 0, False
    for batch in wf.parser.get_parsed_content("train#dataloader"):
        labelled = batch["labelled"]
        assert labelled.dtype == torch.bool and labelled.shape == (len(batch["image"]),)
        assert batch["label"].shape[2:] == batch["image"].shape[2:]
        assert not batch["label"][~labelled].any(), "an unlabelled image's placeholder label is all background"
        foreground += int(batch["label"][labelled].sum())
        flags += labelled.tolist()
        mixed = mixed or bool(labelled.any() and (~labelled).any())
    per_image = len(flags) // len(split)  # patches drawn per image (one, or the bundle's patch count)
    assert per_image >= 1 and len(flags) == per_image * len(split)
    assert sorted(flags) == sorted(item["labelled"] for item in split for _ in range(per_image)), "each with its flag"
    assert foreground > 0, "the labelled images keep their labels"
    assert mixed, "a batch mixed labelled and unlabelled samples"
    dataset = wf.parser.get_parsed_content("train#dataset")
    samples = []
    for i in range(len(dataset)):
        item = dataset[i]  # one fetch: the random transforms run once per item
        samples += item if isinstance(item, list) else [item]
    keys = {frozenset(sample) for sample in samples}
    assert len(keys) == 1, f"labelled and unlabelled samples must have the same keys to collate in any order: {keys}"
    wf.run()
    wf.finalize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.semi_supervised
    assert trainer.state.metrics["train_labelled_fraction"] == pytest.approx(share, abs=0.5 / len(split))
    terms = [t.name for t in wf.parser.get_parsed_content("distiller").terms]
    assert terms and all(np.isfinite(trainer.state.metrics[f"train_{name}"]) for name in terms)
    method_terms = [t.name for t in wf.parser.get_parsed_content("distill#terms")]
    assert terms == method_terms + ["pixel_kd"], "the teacher's per-pixel answers stand in for the missing labels"
    without = make_workflow(bundle, ["train.json", "semisupervised.json"], **{**over, "pixel_kd_weight": 0})
    assert [t.name for t in without.parser.get_parsed_content("distiller").terms] == method_terms

    base = make_workflow(
        bundle, ["train.json", "methods/none.json", "labelled_only.json"], **{**over, "ckpt_dir": str(tmp_path / "b")}
    )
    base.initialize()
    data = base.parser.get_parsed_content("train#dataset").data
    assert {d["image"] for d in data} == {item["image"] for item in split if item["labelled"]}
    assert len(data) == len(split), "repeated to the whole list's length: as many steps per epoch"
    baseline = base.parser.get_parsed_content("train#trainer")  # the same trainer: no teacher, no terms, no critic
    assert type(baseline).__name__ == "DistillationTrainer"
    assert baseline.teacher is None and baseline.discriminators is None
    assert baseline.distillation_settings()["kd.terms"] == ""
    base.run()
    base.finalize()
    assert np.isfinite(baseline.state.metrics["train_supervised"]), "the baseline trains on its labelled images"


DDP_BATCH = {
    "cardiac3d_swin": 1,
    "multiorgan_graphflow": 4,
    "pathology_coco": 1,
    "polyp_kdas": 2,
    "vessel_lightvessel": 2,
}
"""The per-process batch size of the two-process runs (enough samples for both ranks)."""


@pytest.mark.parametrize("bundle", NAMES)
def test_torchrun_ddp_gloo_leaves_one_model_and_discriminator(bundle, tiny, tmp_path):
    """train.json + multi_gpu_train.json on 2 CPU processes (gloo) with the bundle's default method: one student
    checkpoint, its settings and resume state, the discriminator's checkpoint when the method is adversarial, no
    DDP ``module.`` prefix in any key, and rank 0's loss curves."""
    models = tmp_path / "models"
    over = tiny(bundle).student(models, output_dir=str(tmp_path / "eval"), batch_size=DDP_BATCH[bundle])
    torchrun_training(bundle, **over)
    adversarial = _reaches(make_workflow(bundle, ["train.json"]).parser, "distill#terms", "AdversarialDistillationLoss")
    expected = ["model.pt", "model_settings.json", "resume"]
    assert sorted(p.name for p in models.iterdir()) == sorted(expected + ["discriminator"] * adversarial)
    settings = json.loads((models / "model_settings.json").read_text())
    assert settings["image_size"] == FAST[bundle]["image_size"]
    keys = list(torch.load(models / "model.pt", weights_only=True))
    for path in (models / "discriminator").glob("*.pt"):
        keys += list(torch.load(path, weights_only=True)["discriminators"])
    assert keys and not any(k.startswith("module.") or ".module." in k for k in keys)
    assert (tmp_path / "eval" / "loss_curves.png").is_file()  # written by rank 0
