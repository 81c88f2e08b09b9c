"""Model FLOPs per token and the hardware peak they are compared against (MFU).

Training FLOPs per token follow Kaplan et al. 2020 / PaLM (Chowdhery et al. 2022, appendix B):
6 * N for the matrix products (forward 2N, backward 4N), with N the parameters that take part in a
matrix product (embedding lookups excluded, the LM head included), plus 12 * L * d * T for the
attention scores and their product with the values.
"""

from __future__ import annotations

import functools
import time

import torch

from pretrain.config import ModelConfig

# Dense peak FLOP/s per device (bf16 tensor cores; fp32 uses the TF32 figure where it exists).
_GPU_PEAK = {
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 70e12, "fp32": 35e12},
    "L4": {"bf16": 121e12, "fp32": 60e12},
}


def flops_per_token(m: ModelConfig, n_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T."""
    return 6.0 * n_matmul_params + 12.0 * m.n_layers * m.d_model * seq_len


def matmul_params(counts: dict[str, int], m: ModelConfig) -> int:
    """Non-embedding parameters plus the LM head, which is a vocab x d product even when tied
    (an untied head is already inside the non-embedding count)."""
    return counts["params_non_embedding"] + (m.vocab_size * m.d_model if counts["tied"] else 0)


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
