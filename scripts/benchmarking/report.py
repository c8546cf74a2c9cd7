"""Markdown tables of a benchmark run (the JSON that ``python scripts/benchmark.py`` writes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["fmt", "markdown_report"]


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats with ``digits`` decimals and thousands separators, "n/a" for None and non-finite."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _size(size: Sequence[int]) -> str:
    """``352×352``."""
    return "×".join(str(s) for s in size)


def _items(training: dict[str, Any]) -> str:
    """`` (N patches per iteration)`` when the loader's batches hold N != batch size items (random crops)."""
    items = training.get("batch_items", training["batch_size"])
    return f" ({items} patches per iteration)" if items != training["batch_size"] else ""


def markdown_report(results: dict[str, Any]) -> str:
    """Markdown tables (inference, training) of every bundle in ``results`` (the JSON written by :func:`main`)."""
    machine = results["machine"]
    lines = [
        f"Machine: {machine.get('gpu', machine['platform'])}, device {machine['device']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}"
        + (", glibc keeping freed memory (mallopt)." if machine.get("keep_freed_memory") else "."),
        "",
    ]
    for item in results["bundles"]:
        inf, tr = item["inference"], item["training"]
        lines += [
            f"### {item['bundle']}: inference ({_size(inf['image_size'])}, batch {inf['batch']}, "
            f"AMP {'on' if inf['amp'] else 'off'})",
            "",
            "| network | params | GFLOPs / input | latency median (ms) | latency IQR (ms) | images / s "
            "| peak memory (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ("teacher", "student"):
            r = inf[name]
            lines.append(
                f"| {name} | {fmt(r['params'])} | {fmt(r['gflops_per_input'], 2)} | "
                f"{fmt(r['latency']['median_ms'])} | {fmt(r['latency']['iqr_ms'])} | {fmt(r['images_per_s'])} | "
                f"{fmt(r['peak_mib'])} |"
            )
        if "ratios" in inf:
            q = inf["ratios"]
            lines.append(
                f"| student / teacher | {fmt(q['params'], 3)} | {fmt(q['gflops_per_input'], 3)} | "
                f"{fmt(q['latency'], 3)} | | {fmt(q['images_per_s'], 2)} | {fmt(q['peak_mib'], 3)} |"
            )
        lines.append("")
        if not tr.get("methods"):
            lines += [f"Training: no distillation method to measure ({tr.get('skipped')}).", ""]
            continue
        lines += [
            f"### {item['bundle']}: training iteration ({_size(tr['image_size'])}, batch {tr['batch_size']}"
            + _items(tr)
            + f", AMP {'on' if tr['amp'] else 'off'})",
            "",
            "| step | median (ms) | IQR (ms) | peak memory (MiB) | minor page faults | overhead (c) / ((a) + (b)) "
            "| its IQR over rounds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        a, b = tr["student_step"], tr["teacher_forward"]
        lines.append(
            f"| (a) student step (forward + backward + optimizer) | {fmt(a['median_ms'])} | {fmt(a['iqr_ms'])} | "
            f"{fmt(a['peak_mib'])} | {fmt(a.get('page_faults'), 0)} | | |"
        )
        lines.append(
            f"| (b) teacher forward, no gradients | {fmt(b['median_ms'])} | {fmt(b['iqr_ms'])} | "
            f"{fmt(b['peak_mib'])} | {fmt(b.get('page_faults'), 0)} | | |"
        )
        lines.append(f"| (a) + (b) | {fmt(tr['ideal_ms'])} | | | | 1.000 (ideal) | |")
        for name, m in tr["methods"].items():
            cycle = m.get("lever_cycle", 1)
            over = f", mean of a {cycle}-iteration critic cycle; peak: its worst iteration" if cycle > 1 else ""
            lines.append(
                f"| (c) {name}: DistillationTrainer iteration ({', '.join(m['terms'])}{over}) | "
                f"{fmt(m['median_ms'])} | "
                f"{fmt(m['iqr_ms'])} | {fmt(m['peak_mib'])} | {fmt(m.get('page_faults'), 0)} | "
                f"**{fmt(m['overhead_ratio'], 3)}** | "
                f"{fmt(m['overhead_ratio_quartiles']['q3'] - m['overhead_ratio_quartiles']['q1'], 3)} |"
            )
        loader = tr["loader"]
        if "per_batch" in loader:
            p = loader["per_batch"]
            lines.append(
                f"| data loader, per batch ({loader['num_workers']} workers; first batch "
                f"{fmt(loader['first_batch_s'], 2)} s, dataset cache + trainer build "
                f"{fmt(loader['cache_and_build_s'], 2)} s) | {fmt(p['median_ms'])} | {fmt(p['iqr_ms'])} | | | | |"
            )
        else:
            lines.append(f"| data loader | {loader.get('skipped', 'n/a')} | | | | | |")
        if tr.get("skipped"):
            lines.append("")
            lines.append("Not measured: " + "; ".join(f"{k} ({v})" for k, v in tr["skipped"].items()) + ".")
        lines.append("")
    return "\n".join(lines)
