"""List the tap candidates of a network defined in a bundle config, with their output shapes.

Usage::

    python -m kd_components.list_taps --config_file bundles/polyp_kdas/configs/train.json \\
        --net_id teacher_def --input_shape 1 3 256 256 [--filter decoder] [--depth 3]

Each row is a name to use as ``"student:<name>"`` / ``"teacher:<name>"`` in a distillation term.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from monai.bundle import ConfigParser

from kd_components.taps import list_tap_candidates

__all__ = ["format_tap_table", "main"]


def format_tap_table(rows: Sequence[tuple[str, str, tuple[int, ...] | None]], params: dict[str, int]) -> str:
    """Render ``(name, type, shape)`` rows as an aligned text table with each module's parameter count."""
    header = ("name", "type", "output shape", "params")
    body = [(n, t, "-" if s is None else "x".join(map(str, s)), f"{params.get(n, 0):,}") for n, t, s in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_components.list_taps", description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", nargs="+", required=True, help="bundle config file(s), merged in order")
    parser.add_argument("--net_id", default="network_def", help="config id of the network (e.g. teacher_def)")
    parser.add_argument("--input_shape", type=int, nargs="+", required=True, help="e.g. 1 3 256 256")
    parser.add_argument("--filter", default="", help="only names containing this text")
    parser.add_argument("--depth", type=int, default=0, help="only names with at most this many dots + 1 (0: all)")
    args = parser.parse_args(argv)

    config = ConfigParser()
    config.read_config(args.config_file)
    if args.net_id not in config:
        close = [k for k in config.get().keys() if "net" in k or "teacher" in k or "def" in k]
        parser.error(f"{args.net_id!r} is not an id in {args.config_file}; network-like ids there: {close}")
    network = config.get_parsed_content(args.net_id)
    rows = list_tap_candidates(network, args.input_shape)
    modules = dict(network.named_modules())
    params = {n: sum(p.numel() for p in modules[n].parameters()) for n, _, _ in rows}
    rows = [r for r in rows if args.filter in r[0] and (args.depth <= 0 or r[0].count(".") < args.depth)]
    print(format_tap_table(rows, params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
