"""The hardware peaks that model FLOPs and bytes are compared against: MFU in training, % of peak in the
kernel bench. The project's one table of accelerators lives here.

Model FLOPs per unit of work (a token, an image) come from the model family
(`pretrain.models.Family.flops_per_unit`); this module knows only devices. GPU figures are the vendors'
datasheet values, dense (without 2:4 structured sparsity: NVIDIA's tensor-core figures marked "*" are
with sparsity and are halved here, written as `x / 2` so they can be checked against the sheet). fp32 is
the plain figure (CUDA cores; AMD's fp32 matrix rate); TF32 counts only where it is switched on
(`train.tf32`), because PyTorch leaves cuBLAS matmuls in IEEE fp32 by default. A device missing from the
table has no MFU, never a guessed one: `peak_flops` warns and returns None unless `log.peak_flops` is set.
A CPU's peak is measured, not looked up.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from dataclasses import dataclass

import torch

T = 1e12  # the sheets give TFLOP/s


@dataclass(frozen=True)
class DeviceSpec:
    """One device model's dense peaks (FLOP/s) and memory bandwidth (TB/s)."""

    model: str
    names: tuple[str, ...]  # word sets that identify it in the CUDA/ROCm device name (see `device_spec`)
    fp32: float  # plain fp32, no tensor cores
    tf32: float  # fp32 matmuls on TF32 tensor cores (AMD: XF32)
    bf16: float
    fp16: float
    tb_s: float  # memory bandwidth
    memory_gb: float  # memory capacity as the sheet gives it (GB; `pretrain plan` fits a run into it)


SPECS: tuple[DeviceSpec, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet, https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
    # (SXM and NVL columns; the PCIe column is in its 2022 edition, nvidia-h100-datasheet-2287922).
    # torch names the SXM5 part "NVIDIA H100 80GB HBM3".
    DeviceSpec("H100 SXM", ("H100 80GB HBM3", "H100 SXM", "H100 SXM5"),
               fp32=67 * T, tf32=989 / 2 * T, bf16=1979 / 2 * T, fp16=1979 / 2 * T, tb_s=3.35, memory_gb=80),
    DeviceSpec("H100 PCIe", ("H100 PCIe",),
               fp32=51 * T, tf32=756 / 2 * T, bf16=1513 / 2 * T, fp16=1513 / 2 * T, tb_s=2.0, memory_gb=80),
    DeviceSpec("H100 NVL", ("H100 NVL",),
               fp32=60 * T, tf32=835 / 2 * T, bf16=1671 / 2 * T, fp16=1671 / 2 * T, tb_s=3.9, memory_gb=94),
    # NVIDIA H200 Tensor Core GPU datasheet, https://resources.nvidia.com/en-us-data-center-overview-mc/en-us-data-center-overview/hpc-datasheet-sc23-h200
    # (H200 SXM and H200 NVL columns).
    DeviceSpec("H200 SXM", ("H200",),
               fp32=67 * T, tf32=989 / 2 * T, bf16=1979 / 2 * T, fp16=1979 / 2 * T, tb_s=4.8, memory_gb=141),
    DeviceSpec("H200 NVL", ("H200 NVL",),
               fp32=60 * T, tf32=835 / 2 * T, bf16=1671 / 2 * T, fp16=1671 / 2 * T, tb_s=4.8, memory_gb=141),
    # NVIDIA HGX B200 datasheet, https://resources.nvidia.com/en-us-dgx-systems/hgx-b200-datasheet
    # (per-GPU figures; TF32 2.2 PFLOPS*, FP16/BF16 4.5 PFLOPS*, FP32 75 TFLOPS, 180 GB at 7.7 TB/s).
    DeviceSpec("B200", ("B200",),
               fp32=75 * T, tf32=2200 / 2 * T, bf16=4500 / 2 * T, fp16=4500 / 2 * T, tb_s=7.7, memory_gb=180),
    # NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    # Compute is the same for SXM and PCIe; bandwidth is not: 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s,
    # 40GB (either) 1,555 GB/s. torch names them "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", ...
    DeviceSpec("A100 SXM 80GB", ("A100 SXM4", "A100 SXM"),
               fp32=19.5 * T, tf32=312 / 2 * T, bf16=624 / 2 * T, fp16=624 / 2 * T, tb_s=2.039, memory_gb=80),
    DeviceSpec("A100 SXM 40GB", ("A100 SXM4 40GB", "A100 SXM 40GB"),
               fp32=19.5 * T, tf32=312 / 2 * T, bf16=624 / 2 * T, fp16=624 / 2 * T, tb_s=1.555, memory_gb=40),
    DeviceSpec("A100 PCIe 80GB", ("A100 PCIe",),
               fp32=19.5 * T, tf32=312 / 2 * T, bf16=624 / 2 * T, fp16=624 / 2 * T, tb_s=1.935, memory_gb=80),
    DeviceSpec("A100 PCIe 40GB", ("A100 PCIe 40GB",),
               fp32=19.5 * T, tf32=312 / 2 * T, bf16=624 / 2 * T, fp16=624 / 2 * T, tb_s=1.555, memory_gb=40),
    # NVIDIA L40S datasheet, https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413 (it lists dense and
    # sparse: TF32 183 | 366*, BF16/FP16 362.05 | 733*; 48 GB GDDR6 at 864 GB/s).
    DeviceSpec("L40S", ("L40S",),
               fp32=91.6 * T, tf32=183 * T, bf16=362.05 * T, fp16=362.05 * T, tb_s=0.864, memory_gb=48),
    # NVIDIA L4 datasheet, https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet
    # (TF32 120*, BF16/FP16 242*; 24 GB at 300 GB/s). "NVIDIA L4" only: the L40 is another chip.
    DeviceSpec("L4", ("L4",),
               fp32=30.3 * T, tf32=120 / 2 * T, bf16=242 / 2 * T, fp16=242 / 2 * T, tb_s=0.3, memory_gb=24),
    # AMD Instinct MI300X datasheet, https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf
    # (dense figures listed as such; fp32 is the matrix rate, 163.4, equal to the vector one; 5.3 TB/s).
    DeviceSpec("MI300X", ("MI300X",),
               fp32=163.4 * T, tf32=653.7 * T, bf16=1307.4 * T, fp16=1307.4 * T, tb_s=5.3, memory_gb=192),
)

PRECISIONS = ("fp32", "bf16", "fp16")


def _words(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


def device_spec(name: str) -> DeviceSpec | None:
    """The table entry for a CUDA/ROCm device name, or None. An entry matches when every word of one of its
    `names` is a word of the device name (whole words: "L4" is not "L40S", "H200" is not "GH200"); of the
    matches, the one with the most words wins, so "H100 PCIe" beats nothing-but-"H100" and "H200 NVL" beats
    "H200"."""
    words = set(_words(name))
    best, best_len = None, 0
    for spec in SPECS:
        for alias in spec.names:
            need = _words(alias)
            if len(need) > best_len and words.issuperset(need):
                best, best_len = spec, len(need)
    return best


def peak_for(name: str, precision: str, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of the device called `name` at `precision` (fp32, bf16, fp16), or None when the
    device is not in the table. `tf32`: fp32 matmuls run on TF32 tensor cores, so fp32 uses that peak."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: want one of {', '.join(PRECISIONS)}")
    spec = device_spec(name)
    if spec is None:
        return None
    if precision == "fp32":
        return spec.tf32 if tf32 else spec.fp32
    return getattr(spec, precision)


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


def gpu_peak(name: str, precision: str, tf32: bool = False) -> float | None:
    """`peak_for`, with one warning when the device is not in the table (its run then logs no MFU)."""
    peak = peak_for(name, precision, tf32)
    if peak is None:
        used = "tf32" if tf32 and precision == "fp32" else precision
        warnings.warn(f"no peak FLOP/s known for GPU {name!r}: MFU is not reported; set log.peak_flops to its "
                      f"dense {used} peak per worker", stacklevel=2)
    return peak


def peak_flops(device: torch.device, precision: str, threads: int = 1, tf32: bool = False) -> float | None:
    """Per-worker peak FLOP/s: the table for GPUs (None for one it lacks), a measurement for CPUs."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision, tf32)
    return measured_cpu_peak(threads, precision)


def mfu_field(model_flops_per_s: float, peak_per_worker: float | None, world: int) -> dict[str, float]:
    """The step row's `mfu` entry: the model FLOP/s over all workers' peak together. Without a known peak
    there is no entry, so dashboards show a gap rather than a number measured against a guess."""
    if peak_per_worker is None:
        return {}
    return {"mfu": model_flops_per_s / (peak_per_worker * world)}
