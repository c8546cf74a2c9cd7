"""Tests of kd_components.semisupervised: seeded split, placeholder labels, the semi-supervised trainers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader, MetaTensor
from monai.losses import DiceLoss
from monai.networks.nets import UNet

from kd_components.distiller import Distiller
from kd_components.losses import AdversarialDistillationLoss
from kd_components.modules import SelfAttentionDiscriminator
from kd_components.semisupervised import (
    PlaceholderLabeld,
    SemiSupervisedAdversarialDistillationTrainer,
    SemiSupervisedDistillationTrainer,
    labelled_only,
    split_labelled,
)
from kd_components.terms import DistillationTerm


def test_split_is_seeded_and_keeps_the_fraction():
    datalist = [{"image": f"img{i}.png", "label": f"seg{i}.png"} for i in range(20)] + [{"image": "extra.png"}]
    a = split_labelled(datalist, 0.3, seed=7)
    assert a == split_labelled(datalist, 0.3, seed=7)
    assert a != split_labelled(datalist, 0.3, seed=8)
    kept = [item for item in a if item["labelled"]]
    assert len(kept) == 6 and all(item["label"] == item["image"].replace("img", "seg") for item in kept)
    assert all("label" not in item for item in a if not item["labelled"])
    assert a[-1] == {"image": "extra.png", "labelled": False}
    assert [item["image"] for item in a] == [item["image"] for item in datalist]
    assert all("labelled" not in item and "label" in item for item in datalist[:20]), "the input was modified"
    assert sum(item["labelled"] for item in split_labelled(datalist, 0.0)) == 0
    assert sum(item["labelled"] for item in split_labelled(datalist, 1.0)) == 20
    assert sum(item["labelled"] for item in split_labelled(datalist, 0.01)) == 1
    with pytest.raises(ValueError, match="labelled_fraction"):
        split_labelled(datalist, 1.5)


def test_labelled_only_takes_as_many_steps_as_the_whole_list():
    datalist = split_labelled([{"image": f"img{i}.png", "label": f"seg{i}.png"} for i in range(10)], 0.3, seed=1)
    kept = [item["image"] for item in datalist if item["labelled"]]
    repeated = labelled_only(datalist)
    assert len(repeated) == len(datalist)
    assert [item["image"] for item in repeated] == [kept[i % len(kept)] for i in range(len(datalist))]
    assert all(item["labelled"] and "label" in item for item in repeated)
    assert [item["image"] for item in labelled_only(datalist, same_length=False)] == kept
    repeated[0]["image"] = "changed.png"
    assert repeated[len(kept)]["image"] == kept[0] and "changed.png" not in [i["image"] for i in datalist]
    with pytest.raises(ValueError, match="labelled_fraction"):
        labelled_only(split_labelled(datalist, 0.0))


def test_placeholder_label_and_collated_mask():
    image = MetaTensor(torch.randn(3, 16, 16))
    transform = PlaceholderLabeld(keys="label")
    labelled = transform({"image": image, "label": torch.ones(1, 16, 16), "labelled": True})
    unlabelled = transform({"image": image, "labelled": False})
    no_flag = transform({"image": image})
    assert torch.equal(unlabelled["label"], torch.zeros(1, 16, 16)) and isinstance(unlabelled["label"], MetaTensor)
    assert bool(labelled["labelled"]) and not bool(unlabelled["labelled"]) and not bool(no_flag["labelled"])
    assert not bool(transform({"image": image, "label": torch.ones(1, 16, 16), "labelled": False})["labelled"])
    batch = next(iter(DataLoader([labelled, unlabelled], batch_size=2)))
    assert batch["labelled"].dtype == torch.bool and batch["labelled"].tolist() == [True, False]
    assert batch["label"].shape == (2, 1, 16, 16)


def items(flags: list[bool]) -> list[dict]:
    """Samples through PlaceholderLabeld; labelled samples have all-one labels, placeholders are all zero."""
    gen = torch.Generator().manual_seed(1)
    transform = PlaceholderLabeld(keys="label")
    out = []
    for flag in flags:
        item = {"image": torch.randn(3, 16, 16, generator=gen)}
        if flag:
            item["label"] = torch.ones(1, 16, 16)
        out.append(transform(item))
    return out


class Spy:
    """A loss wrapper recording what it is called with."""

    def __init__(self, loss):
        self.loss, self.calls = loss, []

    def __call__(self, *args, **kwargs):
        self.calls.append([a.detach().clone() for a in [*args, *kwargs.values()]])
        return self.loss(*args, **kwargs)


def build(flags: list[bool], label_term: bool = False, cls=SemiSupervisedDistillationTrainer, **kwargs):
    torch.manual_seed(0)
    student = UNet(2, 3, 2, (4, 8), (2,), num_res_units=0)
    teacher = UNet(2, 3, 2, (8, 16), (2,), num_res_units=0)
    terms = [DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"})]
    label_spy = Spy(lambda student, label: (student[:, 1:].sigmoid() - label).pow(2).mean())
    if label_term:
        terms.append(DistillationTerm("region", label_spy, {"student": "student", "label": "label"}, weight=0.5))
    distiller = Distiller(terms)
    supervised = Spy(DiceLoss(to_onehot_y=True, softmax=True))
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1)
    trainer = cls(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(items(flags), batch_size=2),
        network=student,
        optimizer=optimizer,
        loss_function=supervised,
        teacher=teacher,
        distiller=distiller,
        **kwargs,
    )
    kit = SimpleNamespace(trainer=trainer, student=student, supervised=supervised, label_spy=label_spy, preds=[])
    kit.outputs = []
    student.register_forward_hook(lambda _m, _i, out: kit.preds.append(out.detach().clone()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: kit.outputs.append(dict(e.state.output[0])))
    return kit


def test_unlabelled_batch_skips_supervised_loss_and_still_trains():
    kit = build([False, False])
    before = {k: v.clone() for k, v in kit.student.state_dict().items()}
    kit.trainer.run()
    assert kit.supervised.calls == []
    assert float(kit.outputs[0]["loss_supervised"]) == 0.0 and float(kit.outputs[0]["loss_logit"]) > 0
    weights = [k for k in before if k.endswith("weight")]  # (a bias before instance norm gets no gradient)
    unchanged = [k for k in weights if torch.equal(kit.student.state_dict()[k], before[k])]
    assert not unchanged, f"the distillation term did not train {unchanged}"
    assert kit.trainer.state.metrics["train_labelled_fraction"] == 0.0


def test_mixed_batch_supervises_exactly_the_labelled_samples():
    kit = build([False, True, True, False, False, False], label_term=True)
    kit.trainer.run()
    # iteration 1: [unlabelled, labelled]; iteration 2: [labelled, unlabelled]; iteration 3: none labelled
    assert len(kit.supervised.calls) == 2
    for call, pred, index in zip(kit.supervised.calls, kit.preds, [1, 0]):
        got_pred, got_label = call
        assert got_pred.shape[0] == 1 and torch.equal(got_pred, pred[index : index + 1])
        assert torch.equal(got_label, torch.ones(1, 1, 16, 16)), "a placeholder label reached the supervised loss"
    # the label-reading term sees the labelled samples only, and is skipped without any
    assert len(kit.label_spy.calls) == 2
    for (student, label), pred, index in zip(kit.label_spy.calls, kit.preds, [1, 0]):
        assert torch.equal(student, pred[index : index + 1]) and torch.equal(label, torch.ones(1, 1, 16, 16))
    assert float(kit.outputs[2]["loss_region"]) == 0.0 and float(kit.outputs[2]["loss_supervised"]) == 0.0
    metrics = kit.trainer.state.metrics
    assert metrics["train_supervised"] == pytest.approx(sum(float(o["loss_supervised"]) for o in kit.outputs[:2]) / 2)
    assert metrics["train_region"] == pytest.approx(sum(float(o["loss_region"]) for o in kit.outputs[:2]) / 2)
    assert metrics["train_logit"] == pytest.approx(sum(float(o["loss_logit"]) for o in kit.outputs) / 3)
    assert metrics["train_labelled_fraction"] == pytest.approx(2 / 6)


def test_fully_labelled_batch_is_plain_distillation():
    kit = build([True, True])
    kit.trainer.run()
    assert len(kit.supervised.calls) == 1 and kit.supervised.calls[0][0].shape[0] == 2


def test_label_terms_policy_and_flag_errors():
    with pytest.raises(ValueError, match="read 'label'"):
        build([True, False], label_term=True, label_terms="error")
    with pytest.raises(ValueError, match="label_terms"):
        build([True, False], label_terms="skip")
    unflagged = build([True, False])
    unflagged.trainer.data_loader = DataLoader([{k: v for k, v in d.items() if k != "labelled"} for d in items([1, 0])])
    with pytest.raises(KeyError, match="PlaceholderLabeld"):
        unflagged.trainer.run()


def test_every_term_reading_label_is_refused():
    torch.manual_seed(0)
    student, teacher = UNet(2, 3, 2, (4, 8), (2,), num_res_units=0), UNet(2, 3, 2, (4, 8), (2,), num_res_units=0)
    distiller = Distiller([DistillationTerm("region", F.mse_loss, {"input": "student", "target": "label"})])
    with pytest.raises(ValueError, match="teach the student nothing"):
        SemiSupervisedDistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(items([True, False]), batch_size=2),
            network=student,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            loss_function=DiceLoss(to_onehot_y=True, softmax=True),
            teacher=teacher,
            distiller=distiller,
        )


def test_semi_supervised_adversarial_trainer():
    torch.manual_seed(0)
    student = UNet(2, 3, 2, (4, 8), (2,), num_res_units=0)
    teacher = UNet(2, 3, 2, (8, 16), (2,), num_res_units=0)
    plain = SelfAttentionDiscriminator(2, 2, channels=(8,), attention_blocks=(), tanh_inputs=True)
    conditioned = SelfAttentionDiscriminator(2, 3, channels=(8,), attention_blocks=(), tanh_inputs=True)
    terms = [
        DistillationTerm("adv", AdversarialDistillationLoss(plain, "hinge"), weight=0.1),
        DistillationTerm(
            "asd",
            AdversarialDistillationLoss(conditioned, "hinge"),
            {"student": "student", "teacher": "teacher", "condition": "label"},
            weight=0.1,
        ),
        DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"}),
    ]
    distiller = Distiller(terms)
    bank = distiller.discriminators()
    d_batches = {"adv": [], "asd": []}
    plain.register_forward_pre_hook(lambda _m, args: d_batches["adv"].append(args[0].shape[0]))
    conditioned.register_forward_pre_hook(lambda _m, args: d_batches["asd"].append(args[0].shape[0]))
    trainer = SemiSupervisedAdversarialDistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(items([True, False, False, False]), batch_size=2),
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        teacher=teacher,
        distiller=distiller,
        discriminator_optimizer=torch.optim.Adam(bank.parameters(), lr=1e-3),
    )
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    trainer.run()
    assert all(not torch.equal(v, before[k]) for k, v in bank.state_dict().items() if k.endswith("original"))
    # hinge discriminator step: D(real) and D(fake), then the generator term D(fake), every iteration for "adv";
    # the label-conditioned "asd" only in iteration 1 (one labelled sample) and its generator term likewise
    assert d_batches["adv"] == [2, 2, 2, 2, 2, 2]
    assert d_batches["asd"] == [1, 1, 1]
    assert trainer.state.output[0]["loss_asd_discriminator"] == 0.0
    assert trainer.state.metrics["train_asd_discriminator"] > 0


def test_ddp_distiller_must_find_unused_label_term_modules():
    import tempfile

    import torch.distributed as dist

    store = tempfile.NamedTemporaryFile(delete=False)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        student = UNet(2, 3, 2, (4, 8), (2,), num_res_units=0)
        teacher = UNet(2, 3, 2, (8, 16), (2,), num_res_units=0)
        region = DistillationTerm(
            "region",
            lambda student, teacher, label: F.mse_loss(student, teacher) + 0 * label.mean(),
            {"student": "student:model.0", "teacher": "teacher:model.0", "label": "label"},
            align={"student": "teacher"},
        )
        logit = DistillationTerm("logit", F.mse_loss, {"input": "student", "target": "teacher"})
        distiller = Distiller([logit, region], student, teacher, (1, 3, 16, 16))
        kwargs = dict(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(items([True, False]), batch_size=2),
            network=student,
            optimizer=torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1),
            loss_function=DiceLoss(to_onehot_y=True, softmax=True),
            teacher=teacher,
        )
        with pytest.raises(ValueError, match="find_unused_parameters=True"):
            SemiSupervisedDistillationTrainer(**kwargs, distiller=torch.nn.parallel.DistributedDataParallel(distiller))
        wrapped = torch.nn.parallel.DistributedDataParallel(distiller, find_unused_parameters=True)
        trainer = SemiSupervisedDistillationTrainer(**kwargs, distiller=wrapped)
        trainer.run()
        assert float(trainer.state.output[0]["loss_region"]) > 0
    finally:
        dist.destroy_process_group()
