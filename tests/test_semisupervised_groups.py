"""Tests of kd_components.semisupervised_groups: the labelled / unlabelled split made by group (volume, patient)."""

from __future__ import annotations

import random

import pytest

from kd_components.semisupervised_groups import split_labelled_by_group


def slices(cases: dict[str, int]) -> list[dict]:
    """Slice entries as write_slices makes them: ``{"image", "label", "case", "slice"}``, case by case."""
    return [
        {"image": f"images/{case}_{k:03d}.npy", "label": f"labels/{case}_{k:03d}.npy", "case": case, "slice": k}
        for case, n in cases.items()
        for k in range(n)
    ]


CASES = {f"patient{p:03d}_frame{f:02d}": 3 + p % 4 for p in range(1, 13) for f in (1, 2)}


def test_whole_groups_keep_or_lose_their_labels():
    data = slices(CASES)
    out = split_labelled_by_group(data, 0.25, seed=3)
    by_case: dict[str, set[bool]] = {}
    for item in out:
        by_case.setdefault(item["case"], set()).add(item["labelled"])
        assert ("label" in item) == item["labelled"]
    assert all(len(flags) == 1 for flags in by_case.values()), "a case has both labelled and unlabelled slices"
    assert sum(flags == {True} for flags in by_case.values()) == round(0.25 * len(CASES))
    assert [item["image"] for item in out] == [item["image"] for item in data]
    assert all("labelled" not in item and "label" in item for item in data), "the input was modified"


def test_mapping_groups_cases_by_patient():
    data = slices(CASES)
    patients = {case: case.split("_")[0] for case in CASES}
    out = split_labelled_by_group(data, 0.5, seed=0, groups=patients)
    labelled_patients = {patients[i["case"]] for i in out if i["labelled"]}
    unlabelled_patients = {patients[i["case"]] for i in out if not i["labelled"]}
    assert not labelled_patients & unlabelled_patients, "both frames of a patient must fall on the same side"
    assert len(labelled_patients) == 6
    # a case missing from the mapping is its own group
    out = split_labelled_by_group(data, 1.0, groups={})
    assert all(i["labelled"] for i in out)


def test_choice_is_seeded_and_independent_of_item_order():
    data = slices(CASES)
    a = split_labelled_by_group(data, 0.3, seed=5)
    shuffled = data[:]
    random.Random(0).shuffle(shuffled)
    b = split_labelled_by_group(shuffled, 0.3, seed=5)
    chosen = {i["case"] for i in a if i["labelled"]}
    assert chosen == {i["case"] for i in b if i["labelled"]}
    assert chosen != {i["case"] for i in split_labelled_by_group(data, 0.3, seed=6) if i["labelled"]}
    assert sum(i["labelled"] for i in split_labelled_by_group(data, 0.0)) == 0
    assert len({i["case"] for i in split_labelled_by_group(data, 0.001) if i["labelled"]}) == 1


def test_items_without_label_stay_unlabelled_and_bad_input_is_named():
    data = slices({"a": 2, "b": 2})
    data[0].pop("label")
    out = split_labelled_by_group(data, 1.0)
    assert [i["labelled"] for i in out] == [False, True, True, True]
    with pytest.raises(KeyError, match="no 'case' key.*write_slices"):
        split_labelled_by_group([{"image": "x.npy", "label": "y.npy"}], 0.5)
    with pytest.raises(ValueError, match="labelled_fraction"):
        split_labelled_by_group(data, 1.5)
