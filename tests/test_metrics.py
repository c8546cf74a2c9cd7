"""Tests of the clDice metric, its MONAI metric class and its Ignite handler, and of HD95 in header units with a
stated penalty for empty predictions."""

from __future__ import annotations

import math

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import from_engine
from monai.transforms import AsDiscreted, Compose

from kd_components.metrics import (
    ClDiceHandler,
    ClDiceMetric,
    SpacedHausdorffDistance,
    cldice,
    hausdorff_with_penalty,
    image_diagonal,
    skeletonize,
    soft_skeleton,
    voxel_spacing,
)


def _line(shape: tuple[int, ...], gap: int | None = None) -> torch.Tensor:
    """A (1, 1, *shape) mask with a one-voxel line along the last axis (voxels 1..len-2), optionally with a gap."""
    mask = torch.zeros(1, 1, *shape)
    centre = tuple(s // 2 for s in shape[:-1])
    mask[(0, 0, *centre, slice(1, shape[-1] - 1))] = 1
    if gap is not None:
        mask[(0, 0, *centre, gap)] = 0
    return mask


def _random_vessels(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A (2, 1, *shape) mask of a few random axis-aligned bars 1 to 3 voxels thick."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 1, *shape)
    for b in range(2):
        for _ in range(4):
            axis = int(torch.randint(len(shape), (1,), generator=generator))
            index = [slice(None)] * len(shape)
            for other in range(len(shape)):
                if other != axis:
                    start = int(torch.randint(1, shape[other] - 4, (1,), generator=generator))
                    width = int(torch.randint(1, 4, (1,), generator=generator))
                    index[other] = slice(start, start + width)
            mask[(b, 0, *index)] = 1
    return mask


def test_hand_checked_broken_line_2d_and_3d():
    # the line has 7 pixels and is its own skeleton; the broken one has 6 (its skeleton: itself)
    # Tprec = |S(P) ∩ G| / |S(P)| = 6/6, Tsens = |S(G) ∩ P| / |S(G)| = 6/7, clDice = 2 * (6/7) / (1 + 6/7) = 12/13
    for shape in ((5, 9), (5, 5, 9)):
        line, broken = _line(shape), _line(shape, gap=4)
        assert torch.equal(skeletonize(line), line.bool())
        assert cldice(broken, line).item() == pytest.approx(12 / 13)
        assert cldice(line, broken).item() == pytest.approx(12 / 13)  # symmetric


def test_identical_masks_score_one_and_the_metric_is_symmetric():
    for shape in ((24, 20), (12, 14, 10)):
        a, b = _random_vessels(0, shape), _random_vessels(1, shape)
        assert torch.allclose(cldice(a, a), torch.ones(2, 1))
        assert torch.allclose(cldice(a, b), cldice(b, a))
        assert (cldice(a, b) < 1).all()


def test_vessels_count_by_length_not_area():
    label = torch.zeros(1, 1, 40, 40)
    label[0, 0, 10:17, 2:38] = 1  # a thick vessel, 7 pixels wide
    label[0, 0, 30, 2:38] = 1  # a thin one of the same length
    thick_only = label.clone()
    thick_only[0, 0, 30] = 0
    dice = (2 * (thick_only * label).sum() / (thick_only.sum() + label.sum())).item()
    value = cldice(thick_only, label).item()
    assert dice > 0.9 and value < 0.7  # the missed thin vessel is about half of the centerlines
    too_thick = label.clone()
    too_thick[0, 0, 28:33, 2:38] = 1  # too thick but on the right centerline: Tprec and Tsens stay 1
    assert cldice(too_thick, label).item() == pytest.approx(1.0)


def test_skeleton_of_a_bar_is_its_centre_line():
    bar = torch.zeros(1, 1, 11, 15)
    bar[0, 0, 4:7, 2:13] = 1
    expected = torch.zeros_like(bar, dtype=torch.bool)
    expected[0, 0, 5, 3:12] = True
    assert torch.equal(skeletonize(bar), expected)
    full = torch.ones(1, 1, 6, 6)  # the image border counts as background
    assert skeletonize(full).any() and cldice(full, full).item() == 1


@pytest.mark.parametrize("shape", [(2, 1, 40, 36), (1, 2, 20, 18, 16)])
def test_binary_skeleton_equals_the_soft_skeleton_of_a_binary_mask(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    assert torch.equal(skeletonize(mask), soft_skeleton(mask.float()) > 0.5)
    assert torch.equal(skeletonize(mask, iterations=2), soft_skeleton(mask.float(), iterations=2) > 0.5)


def test_soft_skeleton_is_differentiable_and_in_range():
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    skeleton = soft_skeleton(x, iterations=5)
    assert skeleton.shape == x.shape and 0 <= skeleton.min() and skeleton.max() <= 1
    skeleton.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_empty_masks():
    empty, line = torch.zeros(1, 1, 5, 9), _line((5, 9))
    assert math.isnan(cldice(empty, empty).item())
    assert cldice(empty, empty, ignore_empty=False).item() == 1
    assert math.isnan(cldice(line, empty).item()) and cldice(line, empty, ignore_empty=False).item() == 0
    assert cldice(empty, line).item() == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        cldice(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="1 to 3 spatial"):
        cldice(torch.zeros(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="skeleton must be one of"):
        ClDiceMetric(skeleton="scipy")


def test_skimage_skeleton_when_installed():
    pytest.importorskip("skimage")
    line, broken = _line((5, 9)), _line((5, 9), gap=4)
    assert cldice(broken, line, skeleton="skimage").item() == pytest.approx(12 / 13)


def test_metric_class_on_one_hot_inputs():
    label = _random_vessels(2, (20, 20))
    pred = label.clone()
    pred[1, 0, :, 8:12] = 0
    one_hot = lambda m: torch.cat([1 - m, m], dim=1)  # noqa: E731
    metric = ClDiceMetric(reduction="none")
    values = metric(one_hot(pred), one_hot(label))
    assert values.shape == (2, 1) and values[0].item() == pytest.approx(1.0) and values[1].item() < 1
    metric = ClDiceMetric(get_not_nans=True)
    metric(one_hot(pred), one_hot(label))
    metric(one_hot(torch.zeros(1, 1, 20, 20)), one_hot(torch.zeros(1, 1, 20, 20)))  # empty label: left out
    mean, not_nans = metric.aggregate()
    assert not_nans.item() == 2 and mean.item() == pytest.approx(float(values.mean()))
    assert ClDiceMetric(include_background=True)(one_hot(label), one_hot(label)).shape == (2, 2)
    assert ClDiceMetric()(label, label).shape == (2, 1)  # single channel: the foreground


class _Thresholder(torch.nn.Module):
    """A 'network' whose two-channel logits reproduce its (binary) input, optionally with a column cut out."""

    def __init__(self, cut: bool) -> None:
        super().__init__()
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if self.cut:
            x[..., 8:11] = 0
        return torch.cat([1 - x, x], dim=1) * 10


@pytest.mark.parametrize("cut", [False, True])
def test_handler_in_a_supervised_evaluator(cut):
    label = _random_vessels(3, (20, 20))
    data = [{"image": label[i], "label": label[i]} for i in range(2)]
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    handler = ConfigParser(
        {
            "metric": {
                "_target_": "kd_components.metrics.ClDiceHandler",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        }
    ).get_parsed_content("metric")
    assert isinstance(handler, ClDiceHandler)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=_Thresholder(cut),
        postprocessing=post,
        key_val_metric={"val_cldice": handler},
        additional_metrics={"val_cldice_details": ClDiceHandler(output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    value = evaluator.state.metrics["val_cldice"]
    assert value == pytest.approx(evaluator.state.metrics["val_cldice_details"])
    if cut:
        assert 0 < value < 1
    else:
        assert value == pytest.approx(1.0)
    assert evaluator.state.metric_details["val_cldice"].shape == (2, 1)


def _shifted_cube(spacing: tuple[float, float, float]) -> tuple[list[MetaTensor], list[MetaTensor]]:
    """One case: a label cube and a prediction shifted by one voxel along the last axis, one-hot (2, 8, 8, 8)."""
    label = torch.zeros(1, 8, 8, 8)
    label[0, 2:6, 2:6, 2:5] = 1
    pred = torch.roll(label, shifts=1, dims=3)
    affine = torch.diag(torch.tensor([*spacing, 1.0]))
    onehot = [MetaTensor(torch.cat([1 - x, x]), affine=affine) for x in (pred, label)]
    return [onehot[0]], [onehot[1]]


def test_voxel_spacing_from_the_affine():
    assert voxel_spacing(MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([1.5, 1.5, 5.0, 1])))) == [
        1.5,
        1.5,
        5.0,
    ]
    assert voxel_spacing(MetaTensor(torch.zeros(1, 4, 4))) == [1.0, 1.0]
    assert voxel_spacing(torch.zeros(1, 4, 4)) is None


@pytest.mark.parametrize("spacing, expected", [((1.0, 1.0, 1.0), 1.0), ((1.5, 1.5, 5.0), 5.0), ((4.0, 1.0, 2.0), 2.0)])
def test_spaced_hausdorff_distance_is_in_header_units(spacing, expected):
    handler = SpacedHausdorffDistance(percentile=95, save_details=False)
    handler.reset()
    handler.update(_shifted_cube(spacing))
    assert handler.compute() == pytest.approx(expected)
    plain = SpacedHausdorffDistance(percentile=95, save_details=False)
    plain.reset()
    pred, label = _shifted_cube(spacing)
    plain.update(([p.as_tensor() for p in pred], [y.as_tensor() for y in label]))
    assert plain.compute() == pytest.approx(1.0)  # no geometry: voxels


def _onehot(mask: torch.Tensor) -> torch.Tensor:
    """(1, *spatial) binary mask -> (2, *spatial) one-hot."""
    return torch.cat([1 - mask, mask])


def _square(shape: tuple[int, int] = (12, 16)) -> torch.Tensor:
    mask = torch.zeros(1, *shape)
    mask[0, 3:7, 4:9] = 1
    return mask


def test_image_diagonal_is_in_spacing_units_and_beyond_any_voxel_distance():
    assert image_diagonal((3, 4)) == pytest.approx(5.0)
    assert image_diagonal((3, 4), (2.0, 0.5)) == pytest.approx(math.sqrt(36 + 4))
    assert image_diagonal((8, 8, 8), (1.0, 1.0, 5.0)) == pytest.approx(math.sqrt(64 + 64 + 1600))
    assert image_diagonal((12, 16)) > math.hypot(11, 15)  # the farthest two pixel centres
    with pytest.raises(ValueError, match="spacing"):
        image_diagonal((3, 4), (1.0,))


def test_hausdorff_with_penalty_scores_empty_masks_with_the_diagonal():
    label, empty = _onehot(_square()), _onehot(torch.zeros(1, 12, 16))
    diagonal = image_diagonal((12, 16))
    for pred, gt in ((empty, label), (label, empty)):  # a missed structure, and one where there is none
        value, penalised = hausdorff_with_penalty(pred, gt, percentile=95)
        assert value.tolist() == pytest.approx([diagonal]) and penalised.tolist() == [True]
    value, penalised = hausdorff_with_penalty(empty, empty, percentile=95)
    assert math.isnan(value.item()) and penalised.tolist() == [False]  # nothing to measure
    shifted = _onehot(torch.roll(_square(), 2, dims=2))
    value, penalised = hausdorff_with_penalty(shifted, label, percentile=95)
    assert value.item() == pytest.approx(2.0) and penalised.tolist() == [False]
    value, _ = hausdorff_with_penalty(empty, label, spacing=(0.5, 2.0), empty_penalty="diagonal")
    assert value.item() == pytest.approx(image_diagonal((12, 16), (0.5, 2.0)))
    value, _ = hausdorff_with_penalty(empty, label, empty_penalty=100.0)
    assert value.item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="empty_penalty"):
        hausdorff_with_penalty(empty, label, empty_penalty="max")


def test_hausdorff_with_penalty_per_class():
    label = torch.zeros(12, 16, dtype=torch.long)
    label[2:5, 2:5], label[7:10, 9:13] = 1, 2
    pred = label.clone()
    pred[pred == 2] = 0  # class 2 missed entirely
    onehot = [torch.nn.functional.one_hot(x, 3).permute(2, 0, 1).float() for x in (pred, label)]
    value, penalised = hausdorff_with_penalty(*onehot, percentile=95)
    assert value.tolist() == pytest.approx([0.0, image_diagonal((12, 16))]) and penalised.tolist() == [False, True]


def test_spaced_hausdorff_handler_counts_and_penalises_empty_predictions():
    label = _onehot(_square())
    empty = _onehot(torch.zeros(1, 12, 16))
    shifted = _onehot(torch.roll(_square(), 1, dims=2))
    data = [{"image": p, "label": label} for p in (empty, shifted, empty)]

    class _Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def evaluate(handler: SpacedHausdorffDistance) -> SupervisedEvaluator:
        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"),
            val_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
            network=_Identity(),
            key_val_metric={"val_hd95": handler},
        )
        evaluator.run()
        return evaluator

    handler = ConfigParser(
        {
            "metric": {
                "_target_": "kd_components.metrics.SpacedHausdorffDistance",
                "percentile": 95,
                "empty_penalty": "diagonal",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        }
    ).get_parsed_content("metric")
    evaluator = evaluate(handler)
    diagonal = image_diagonal((12, 16))
    per_case = evaluator.state.metric_details["val_hd95"]
    assert per_case.flatten().tolist() == pytest.approx([diagonal, 1.0, diagonal])
    assert evaluator.state.metric_details["val_hd95_penalised"].flatten().tolist() == [1.0, 0.0, 1.0]
    assert evaluator.state.metrics["val_hd95_penalised"] == 2
    assert evaluator.state.metrics["val_hd95"] == pytest.approx((2 * diagonal + 1.0) / 3)
    # without the penalty (MONAI's behaviour): the empty cases are non-finite and the mean leaves them out
    with pytest.warns(UserWarning, match="all 0"):
        plain = evaluate(SpacedHausdorffDistance(percentile=95, output_transform=from_engine(["pred", "label"])))
    assert (~torch.isfinite(plain.state.metric_details["val_hd95"])).sum() == 2
    assert plain.state.metrics["val_hd95"] == pytest.approx(1.0)
    assert "val_hd95_penalised" not in plain.state.metric_details
    with pytest.raises(ValueError, match="empty_penalty"):
        SpacedHausdorffDistance(empty_penalty="maximum")


def test_every_bundle_evaluates_hd95_with_the_diagonal_penalty():
    import json
    from pathlib import Path

    bundles = Path(__file__).resolve().parents[1] / "bundles"
    for evaluate in sorted(bundles.glob("*/configs/evaluate.json")):
        entry = json.loads(evaluate.read_text())["validate#additional_metrics#val_hd95"]
        assert entry["_target_"] == "kd_components.metrics.SpacedHausdorffDistance", evaluate
        assert entry["empty_penalty"] == "diagonal" and entry["percentile"] == 95, evaluate
