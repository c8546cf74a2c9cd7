"""Inference benchmark: parameters, FLOPs, latency, throughput and peak memory of networks on one input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kd_components.utils import count_parameters

from .measure import autocast, flops_per_input, peak_memory_mib, ratio, time_interleaved

__all__ = ["benchmark_inference"]


def benchmark_inference(
    networks: dict[str, nn.Module],
    input_shape: Sequence[int],
    device: torch.device,
    amp: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Parameters, FLOPs per input, latency, throughput and peak memory of each network (eval, no gradients).

    Args:
        networks: ``{"teacher": ..., "student": ...}``.
        input_shape: the input shape with batch and channels, e.g. ``(1, 3, 352, 352)``.
        device: where to run.
        amp: run under autocast.
        warmup: untimed runs first.
        repeats: timed runs (interleaved between the networks).

    Returns:
        ``{name: {...}, "ratios": {student / teacher for each quantity}}`` when both names are given.
    """
    example = torch.rand(*input_shape, device=device)
    calls = {}
    result: dict[str, Any] = {}
    for name, net in networks.items():
        net.to(device).eval()

        def forward(net: nn.Module = net) -> None:
            with torch.no_grad(), autocast(device, amp):
                net(example)

        calls[name] = forward
        result[name] = {
            "params": count_parameters(net),
            "gflops_per_input": flops_per_input(net, example, amp) / 1e9,
        }
    timings = time_interleaved(calls, warmup, repeats, device)
    for name, fn in calls.items():
        latency = timings[name]
        result[name]["latency"] = latency
        result[name]["images_per_s"] = ratio(input_shape[0] * 1e3, latency["median_ms"])
        result[name]["peak_mib"] = peak_memory_mib(fn, device)
    if "teacher" in result and "student" in result:
        s, t = result["student"], result["teacher"]
        result["ratios"] = {
            "params": ratio(s["params"], t["params"]),
            "gflops_per_input": ratio(s["gflops_per_input"], t["gflops_per_input"]),
            "latency": ratio(s["latency"]["median_ms"], t["latency"]["median_ms"]),
            "images_per_s": ratio(s["images_per_s"], t["images_per_s"]),
            "peak_mib": ratio(s["peak_mib"], t["peak_mib"]),
        }
    return result
