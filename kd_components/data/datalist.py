"""Read a bundle's datalist with errors that say which file is wrong and what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path

from monai.data import load_decathlon_datalist

from kd_components.data.common import DatasetError, format_names

__all__ = ["load_datalist"]


def load_datalist(path: str | os.PathLike, key: str, hint: str = "", check_files: bool = True) -> list[dict]:
    """Load the ``key`` section of a datalist JSON, checking that it exists, is non-empty and its files exist.

    Paths in the file are relative to its folder (the layout every preparer in :mod:`kd_components.data` writes).

    Args:
        path: the datalist JSON file.
        key: the section, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        hint: what the user should do when the datalist is missing (e.g. the preparation command).
        check_files: verify that every ``image`` / ``label`` file listed exists.

    Returns:
        the entries, with absolute paths.

    Raises:
        DatasetError: when the file is missing or malformed, the section is missing or empty, or a listed file
            does not exist.
    """
    path = Path(path)
    todo = hint or "prepare the data with the bundle's preparation command, or pass --dataset_dir / --datalist"
    if not path.is_file():
        raise DatasetError(f"datalist not found: {path}. To fix: {todo}.")
    try:
        sections = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"datalist {path} is not valid JSON ({err}). To fix: {todo}.") from err
    if not isinstance(sections, dict) or key not in sections:
        found = list(sections) if isinstance(sections, dict) else type(sections).__name__
        raise DatasetError(f"datalist {path} has no {key!r} section (found: {found}). To fix: {todo}.")
    if not sections[key]:
        raise DatasetError(f"the {key!r} section of datalist {path} is empty: the split has no cases. To fix: {todo}.")
    entries = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key)
    if check_files:
        missing = [e[k] for e in entries for k in ("image", "label") if k in e and not os.path.exists(e[k])]
        if missing:
            raise DatasetError(
                f"datalist {path} ({key!r}) lists {len(missing)} file(s) that do not exist: {format_names(missing)}. "
                f"To fix: {todo}."
            )
    return entries
