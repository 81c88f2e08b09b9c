"""The hardware peak that model FLOPs are compared against (MFU).

Model FLOPs per unit of work (a token, an image) come from the model family
(`pretrain.models.Family.flops_per_unit`); this module knows only devices.
"""

from __future__ import annotations

import functools
import time

import torch

# Dense peak FLOP/s per device (bf16 tensor cores; fp32 uses the TF32 figure where it exists).
_GPU_PEAK = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
}


@functools.cache
def measured_cpu_peak(threads: int, dtype: str = "fp32") -> float:
    """This CPU's matmul rate with `threads` threads: the best of a few 1024^3 products."""
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(old)
    return 2 * 1024**3 / best


def peak_flops(device: torch.device, precision: str, threads: int = 1) -> float:
    """Per-worker peak FLOP/s: a table for GPUs, a measurement for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in _GPU_PEAK.items():
            if key in name:
                return peaks[precision]
        return _GPU_PEAK["A100"][precision]  # unknown GPU: a conservative, stated default
    return measured_cpu_peak(threads, precision)
