"""Labelled / unlabelled split by group (patient, volume) for semi-supervised training on 2D slices.

:func:`kd_components.split_labelled` chooses the labelled items one by one. When a datalist holds the 2D slices of
volumes, that would mix labelled and unlabelled slices of one volume (and of one patient), which is not how a
partially annotated dataset looks: a patient is annotated or not. :func:`split_labelled_by_group` makes the same
seeded choice over groups instead (for example the ``"case"`` of each slice entry written by
:func:`kd_components.data.volumes.write_slices`, optionally mapped to its patient), and every item of a chosen group
keeps its label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kd_components.semisupervised import LABELLED, split_labelled

__all__ = ["split_labelled_by_group"]


def split_labelled_by_group(
    datalist: Sequence[Mapping[str, Any]],
    labelled_fraction: float,
    seed: int = 0,
    group_key: str = "case",
    groups: Mapping[str, str] | None = None,
    label_key: str = "label",
    flag_key: str = LABELLED,
) -> list[dict[str, Any]]:
    """Keep the labels of a seeded fraction of the *groups* of a datalist; the items of the other groups lose theirs.

    The group of an item is ``groups[item[group_key]]`` when ``groups`` is given (e.g. case -> patient, so that both
    ACDC frames of a patient fall on the same side), else ``item[group_key]``. The groups that have at least one
    labelled item are sorted by name and :func:`kd_components.split_labelled` chooses ``round(fraction · n)`` of them
    (at least one when ``fraction > 0``) with ``seed``: the choice depends only on the group names, the fraction and
    the seed, not on the order or number of items. Every returned item is a copy carrying ``flag_key`` (``True``
    when it kept its label), ready for :class:`kd_components.PlaceholderLabeld`.

    Args:
        datalist: items like ``{"image": path, "label": path, "case": name}`` (e.g. a slice datalist's training
            section).
        labelled_fraction: fraction in [0, 1] of the groups that keep their labels.
        seed: the seed of the choice.
        group_key: the item key naming its group (or the key that ``groups`` maps).
        groups: optional mapping from ``item[group_key]`` to a coarser group name (e.g. case -> patient); values
            missing from it are their own group.
        label_key: the key of the label.
        flag_key: the key of the flag added to every item.

    Returns:
        the items in their original order.

    Raises:
        KeyError: when an item has no ``group_key`` (the message names the item and the key).
        ValueError: when ``labelled_fraction`` is outside [0, 1].
    """
    group_of = []
    for index, item in enumerate(datalist):
        if group_key not in item:
            raise KeyError(
                f"datalist item {index} ({item.get('image', item)}) has no {group_key!r} key to group it by; "
                f"prepare the slices with kd_components.data.volumes.write_slices (its entries carry 'case'), or "
                f"set group_key to a key the items have"
            )
        name = str(item[group_key])
        group_of.append(str(groups.get(name, name)) if groups is not None else name)
    labelled_groups = sorted({g for g, item in zip(group_of, datalist, strict=True) if item.get(label_key) is not None})
    chosen = split_labelled([{label_key: g} for g in labelled_groups], labelled_fraction, seed, label_key, flag_key)
    keep = {g for g, entry in zip(labelled_groups, chosen, strict=True) if entry[flag_key]}
    out = []
    for group, item in zip(group_of, datalist, strict=True):
        item = dict(item)
        labelled = group in keep and item.get(label_key) is not None
        if not labelled:
            item.pop(label_key, None)
        item[flag_key] = labelled
        out.append(item)
    return out
