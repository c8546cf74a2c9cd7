"""Catch typo'd and mistyped ``--key value`` overrides of ``python -m monai.bundle run`` before anything runs.

MONAI passes every unknown ``--key value`` of ``monai.bundle run`` to ``ConfigWorkflow(**override)``, which sets it
with ``ConfigParser.update``: a key that matches no config id silently creates a new, unused id (``--epoch 2``
leaves ``epochs`` at 100; ``--distill#alpa 0.9`` changes nothing), and a non-numeric learning rate only fails when
the optimizer is built, after the datasets are cached.

The rule (:func:`validate_overrides`):

- an override key must name an id of the merged config files (``epochs``, ``distill#alpha``, ``network_def#channels``,
  ``train#handlers#0#interval``); new ids belong in a config file merged with ``--config_file`` (new ids and ``+``
  merges in files are fine), not on the command line;
- where the config holds a number, the override must be a number (an integer where the config has an integer), or
  an expression (``$...``, ``@...``); where it holds a list, a list or an expression; where a boolean, a boolean;
- ``monai.bundle run``'s own arguments (``config_file``, ``meta_file``, ``logging_file``, ``tracking``,
  ``args_file``, ``run_id``...) are not overrides, and with ``--tracking`` the ids its settings add
  (``tracking_uri``, ``experiment_name``, ``run_name``... for ``mlflow``) are valid too.

:func:`check_overrides` applies it to the command line of the current process (also under ``torchrun``); bundle
configs call it first in ``initialize``. Workflows built from Python (``ConfigWorkflow(**override)``) are not
affected; call :func:`validate_overrides` there.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = ["OverrideError", "validate_overrides", "check_overrides", "parse_cli_overrides", "RUN_ARGUMENTS"]

RUN_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)
"""Arguments of ``monai.bundle run`` / ``create_workflow`` / ``ConfigWorkflow`` that are not config overrides."""

_EXPRESSION_PREFIXES = ("$", "@", "%")


class OverrideError(ValueError):
    """An override names no config id, or has the wrong type for its id."""


def _ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id of a config: dict keys and list indices, joined with ``#``."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        key = f"{prefix}#{key}" if prefix else str(key)
        yield key
        yield from _ids(value, key)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_problem(key: str, default: Any, value: Any) -> str | None:
    """Why ``value`` cannot replace ``default`` at ``key`` (None when it can)."""
    if isinstance(value, str) and value.startswith(_EXPRESSION_PREFIXES):
        return None  # an expression or reference: its type is known only when evaluated
    if isinstance(default, str) and default.startswith(_EXPRESSION_PREFIXES):
        return None  # the default is an expression: no type to compare with
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return f"--{key} must be true or false (the config has {json.dumps(default)}), got {value!r}"
    elif isinstance(default, int) and _is_number(default):
        if not (_is_number(value) and float(value).is_integer()):
            return f"--{key} must be an integer (the config has {default}), got {value!r}"
    elif isinstance(default, float):
        if not _is_number(value):
            return f"--{key} must be a number (the config has {default}), got {value!r}"
    elif isinstance(default, list) and default and all(_is_number(v) for v in default):
        if not (isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)):
            return f"--{key} must be a list of numbers like {json.dumps(default)}, got {value!r}"
    return None


def validate_overrides(
    config_file: str | Sequence[str], override: Mapping[str, Any], extra_ids: Sequence[str] = ()
) -> None:
    """Check ``override`` against the merged ``config_file`` (the rule in this module's docstring).

    Args:
        config_file: the config files, merged in order as ``monai.bundle`` does (``+`` merges included).
        override: ``{id: value}`` as passed to ``ConfigWorkflow``; ``monai.bundle run``'s own arguments are skipped.
        extra_ids: further valid ids (e.g. those ``--tracking mlflow`` adds: ``tracking_uri``, ``experiment_name``).

    Raises:
        OverrideError: listing every unknown key with the closest valid ids, and every mistyped value, each with
            its key.
    """
    config = ConfigParser.load_config_files(config_file)
    parser = ConfigParser(config)
    ids = sorted(set(_ids(config)))
    problems = []
    for key, value in override.items():
        if key in RUN_ARGUMENTS or key in extra_ids or key.startswith("_meta_"):
            continue
        normal = key.replace("::", "#")
        if normal not in parser:
            close = difflib.get_close_matches(normal, ids, n=3, cutoff=0.6)
            if not close:  # a typo in the last part of a nested id: compare that part among its siblings
                head, _, tail = normal.rpartition("#")
                siblings = [i for i in ids if i.rpartition("#")[0] == head]
                close = [f"{head}#{c}" if head else c for c in difflib.get_close_matches(
                    tail, [s.rpartition("#")[2] for s in siblings], n=3, cutoff=0.5)]  # fmt: skip
            hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "no similar id exists."
            problems.append(f"--{key} matches no id of the config ({hint})")
            continue
        problem = _type_problem(normal, parser[normal], value)
        if problem:
            problems.append(problem)
    if problems:
        raise OverrideError(
            "invalid override(s): "
            + "; ".join(problems)
            + ". Overrides must name an existing config id with a value of its type; to add a new id, put it in a "
            "config file merged with --config_file."
        )


def _parse_value(text: str) -> Any:
    """A command-line value as ``fire`` reads it: a Python literal when it parses as one, else the string."""
    try:
        from fire.parser import DefaultParseValue

        return DefaultParseValue(text)
    except ImportError:  # fire is a dependency of monai.bundle's CLI; this is a fallback only
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def parse_cli_overrides(argv: Sequence[str], raw: bool = False) -> Any:
    """The config files and overrides of a ``monai.bundle run`` command line (None for other command lines).

    Args:
        argv: ``sys.argv`` of the process.

        raw: return every argument, ``{key: value}``, ``monai.bundle run``'s own included.

    Returns:
        ``(config_file, {key: value})`` with values parsed as ``fire`` parses them; the contents of
        ``--args_file`` are included (the command line wins).
    """
    if not argv or not str(argv[0]).replace(os.sep, "/").endswith("monai/bundle/__main__.py"):
        return None
    if len(argv) < 2 or argv[1] != "run":
        return None
    args: dict[str, Any] = {}
    tokens = list(argv[2:])
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or token == "--":
            continue  # positional (run_id)
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i < len(tokens) and not tokens[i].startswith("--"):
                text, i = tokens[i], i + 1
            else:
                args[key.replace("-", "_")] = True
                continue
        args[key.replace("-", "_")] = _parse_value(text)
    if "args_file" in args:
        from_file = ConfigParser.load_config_file(str(args["args_file"]))
        args = {**from_file, **args}
    if raw:
        return args
    return args.get("config_file"), {k: v for k, v in args.items() if k not in RUN_ARGUMENTS}


def check_overrides(argv: Sequence[str] | None = None) -> None:
    """Validate the overrides of this process's ``python -m monai.bundle run`` command (first in ``initialize``).

    Does nothing when the process was not started by ``monai.bundle run`` (e.g. a workflow built in Python).

    Args:
        argv: the command line; default ``sys.argv``.

    Raises:
        OverrideError: see :func:`validate_overrides`.
    """
    parsed = parse_cli_overrides(sys.argv if argv is None else argv)
    if parsed is None or parsed[0] is None:
        return
    config_file, override = parsed
    argv = sys.argv if argv is None else argv
    validate_overrides(_config_files(config_file), override, _tracking_ids(parse_cli_overrides(argv, raw=True)))


def _config_files(config_file: Any) -> Any:
    """``--config_file`` as ``monai.bundle`` reads it (a list may come written as a string)."""
    if isinstance(config_file, str) and not Path(config_file).is_file():
        try:  # monai.bundle also accepts a list written as a string, e.g. "['a.json','b.json']"
            return ast.literal_eval(config_file)
        except (ValueError, SyntaxError):
            pass
    return config_file


def _tracking_ids(args: Mapping[str, Any] | None) -> list[str]:
    """The config ids that ``--tracking`` adds (MONAI's ``mlflow`` settings, or a settings file's ``configs``)."""
    tracking = (args or {}).get("tracking")
    if not tracking:
        return []
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    elif isinstance(tracking, Mapping):
        settings = tracking
    else:
        try:
            settings = ConfigParser.load_config_files(tracking)
        except Exception:  # MONAI reports a bad --tracking itself
            return []
    return list(settings.get("configs", {}))
