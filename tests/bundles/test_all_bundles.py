"""Properties every bundle keeps: valid metadata, clear inference errors, each method file merges with multi-GPU
training, and the comparison runner's ids exist."""

from __future__ import annotations

import json
import pydoc
import re

import pytest
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from kd_components.terms import loss_arguments
from tests.bundles.conftest import BUNDLES, make_workflow, root_cause

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
