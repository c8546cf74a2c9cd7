"""Tests of ApplyFOVd: metrics restricted to the field of view, entries without one left unchanged."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric

from kd_components.fov import ApplyFOVd
from kd_components.metrics import cldice


def _one_hot(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) 0/1 → (2, H, W) one-hot float."""
    return torch.stack([1 - mask, mask]).float()


def test_pixels_outside_the_fov_are_neither_false_positive_nor_negative():
    label = torch.zeros(8, 8)
    label[2:6, 4] = 1  # a vessel inside the FOV
    pred = label.clone()
    pred[0, :] = 1  # a false positive row outside the FOV
    label_outside = label.clone()
    label_outside[7, :] = 1  # a vessel the prediction misses, outside the FOV
    fov = torch.ones(1, 8, 8)
    fov[:, 0, :] = 0
    fov[:, 7, :] = 0
    data = {"pred": _one_hot(pred), "label": _one_hot(label_outside), "fov": fov}
    out = ApplyFOVd(keys=["pred", "label"])(data)
    dice = DiceMetric(include_background=False)(out["pred"][None], out["label"][None])
    assert dice.item() == pytest.approx(1.0)
    assert cldice(out["pred"][None, 1:], out["label"][None, 1:]).item() == pytest.approx(1.0)
    # without the FOV the same prediction is wrong: 4 true positives, 8 false positives, 8 false negatives
    unmasked = DiceMetric(include_background=False)(data["pred"][None], data["label"][None])
    assert unmasked.item() == pytest.approx(2 * 4 / (2 * 4 + 8 + 8))
    assert torch.equal(out["pred"][:, 0, :], torch.zeros(2, 8)) and torch.equal(out["fov"], fov)


def test_entries_without_fov_pass_unchanged_and_meta_is_kept():
    pred = MetaTensor(_one_hot(torch.eye(4)), meta={"filename_or_obj": "case.png"})
    out = ApplyFOVd(keys=["pred", "label"])({"pred": pred, "label": pred.clone()})
    assert torch.equal(out["pred"], pred) and out["pred"] is pred
    fov = MetaTensor(torch.ones(1, 4, 4), meta={"filename_or_obj": "fov.png"})
    fov[0, 0, 0] = 0
    out = ApplyFOVd(keys="pred")({"pred": pred, "fov": fov})
    assert isinstance(out["pred"], MetaTensor) and out["pred"].meta["filename_or_obj"] == "case.png"
    assert out["pred"][:, 0, 0].sum() == 0 and out["pred"][:, 1:, :].sum() == pred[:, 1:, :].sum()
    # a FOV without a channel dimension works too
    out2 = ApplyFOVd(keys="pred")({"pred": pred, "fov": fov[0]})
    assert torch.equal(out2["pred"], out["pred"])


def test_bad_fov_says_which_file_and_what_to_do():
    pred = _one_hot(torch.zeros(4, 4))
    fov = MetaTensor(torch.ones(1, 4, 5), meta={"filename_or_obj": "/data/fov/drive_21.png"})
    with pytest.raises(ValueError, match=r"drive_21\.png has shape \(1, 4, 5\).*To fix"):
        ApplyFOVd(keys="pred")({"pred": pred, "fov": fov})
    with pytest.raises(ValueError, match="load it first"):
        ApplyFOVd(keys="pred")({"pred": pred, "fov": "/data/fov/drive_21.png"})
    with pytest.raises(KeyError):
        ApplyFOVd(keys="label")({"pred": pred, "fov": torch.ones(1, 4, 4)})
