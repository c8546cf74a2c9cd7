"""The command line the dataset preparers share: ``python -m kd_components.data.<preparer> --out DIR ...``.

Each preparer module has a ``build_parser()`` that starts from :func:`preparer_parser` (the options every preparer
takes, spelled and documented once) and adds its source options, and a ``main(argv)`` that passes the parsed
options to its preparation function through :func:`shared_arguments` and :func:`run_preparer`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kd_components.data.common import DEFAULT_FRACTIONS, DatasetError

__all__ = ["SHARED_OPTIONS", "preparer_parser", "run_preparer", "shared_arguments"]

SHARED_OPTIONS = ("seed", "fractions", "overwrite", "limit", "max_size")
"""The parsed options that keep their name as arguments of the preparation functions (when the parser has them)."""


def preparer_parser(
    name: str,
    description: str,
    seeds: str = "the split",
    fractions_note: str = "",
    limit: str | None = None,
    max_size: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of ``python -m kd_components.data.<name>`` with the options every preparer takes.

    ``--out DIR`` (required), ``--seed``, ``--fractions TRAIN VAL TEST`` and ``--overwrite``; ``--limit N`` and
    ``--max-size N`` when their help is given. ``--help`` lists them in their own section, after the preparer's
    source options.

    Args:
        name: the preparer module in :mod:`kd_components.data`, e.g. ``"polyp"``.
        description: what the preparer reads and writes, for ``--help``.
        seeds: what ``--seed`` seeds, e.g. ``"the images and the split"``.
        fractions_note: appended to the help of ``--fractions``, e.g. how an official split is kept.
        limit: what ``--limit N`` keeps the first N of, e.g. ``"pairs of each dataset"``; ``None``: no ``--limit``.
        max_size: what ``--max-size N`` shrinks, e.g. ``"images"``; ``None``: no ``--max-size``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m kd_components.data.{name}", description=description)
    shared = parser.add_argument_group("options every preparer takes")
    shared.add_argument("--out", metavar="DIR", required=True, help="output data folder (created if needed)")
    shared.add_argument("--seed", type=int, default=0, help=f"seed of {seeds} (default: 0)")
    shared.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help=f"split fractions, summing to 1{fractions_note} (default: 0.8 0.1 0.1)",
    )
    shared.add_argument("--overwrite", action="store_true", help="replace data already prepared in --out")
    if limit is not None:
        shared.add_argument("--limit", type=int, metavar="N", help=f"use only the first N {limit}")
    if max_size is not None:
        shared.add_argument(
            "--max-size", type=int, metavar="N", help=f"shrink {max_size} so that the longest side is at most N pixels"
        )
    return parser


def shared_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``out_dir`` and the :data:`SHARED_OPTIONS` the parser has, as preparation-function arguments."""
    return {"out_dir": args.out, **{key: getattr(args, key) for key in SHARED_OPTIONS if hasattr(args, key)}}


def run_preparer(prepare: Callable[..., Path | Sequence[Path]], **kwargs: Any) -> int:
    """Run a preparation function for the command line and turn its outcome into an exit status.

    Progress messages of the preparers' loggers are printed (level INFO).

    Args:
        prepare: the preparation function, returning the datalist path (or several paths, printed one a line).
        kwargs: its arguments.

    Returns:
        0 after printing the returned path(s), or 1 after printing the :class:`DatasetError` (which names the file
        at fault and says what to do) to standard error.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = prepare(**kwargs)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in [paths] if isinstance(paths, Path) else paths:
        print(path)
    return 0
