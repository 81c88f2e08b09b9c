"""How one provider at one point is measured: time as the median and 20th/80th percentiles, peak memory.

Modes, as Liger-Kernel's benchmarks define them: `forward` times the op's call (autograd recording, as in
training), `backward` times only the backward of an output made once beforehand (`retain_graph`), `full`
times both. On a GPU the times come from `triton.testing.do_bench` (CUDA events, the L2 cache flushed
between calls, gradients set to None outside the timed region); on a CPU from a `perf_counter` loop,
which is all a CPU needs and only there to exercise the sweep.

Memory is the peak of `torch.cuda.max_memory_allocated` above what was allocated before the call (inputs
excluded, outputs and the autograd graph's saved tensors included), for `full` mode, in MB. There is no
CPU counterpart worth a row: torch's CPU allocator is invisible to `tracemalloc`, so CPU runs write no
memory rows rather than zeros.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)  # the CSV's y_value_50, y_value_20, y_value_80
MODES = ("forward", "backward", "full")
MB = 2**20


def _grad_leaves(inputs: list) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _runner(fn: Callable, inputs: list, mode: str) -> Callable[[], object]:
    """The zero-argument call that `mode` times."""
    if mode == "forward":
        return lambda: fn(*inputs)
    if mode == "full":
        def full():
            out = fn(*inputs)
            out.backward(dy_for(out))
        return full
    out = fn(*inputs)
    dy = dy_for(out)
    return lambda: out.backward(dy, retain_graph=True)


_dys: dict[tuple, torch.Tensor] = {}


def dy_for(out: torch.Tensor) -> torch.Tensor:
    """A fixed random upstream gradient for an output of this shape (ones for a scalar loss), made once so
    that `full` mode does not time a `randn`."""
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _dys:
        _dys[key] = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)
    return _dys[key]


def speed(fn: Callable, inputs: list, mode: str, *, reps: int = 10, rep_ms: int = 40) -> tuple[float, ...]:
    """(median, p20, p80) milliseconds of one call of `fn(*inputs)` in `mode`."""
    run, leaves = _runner(fn, inputs, mode), _grad_leaves(inputs)
    if leaves and leaves[0].is_cuda:
        import triton.testing

        qs = triton.testing.do_bench(run, warmup=15, rep=rep_ms, grad_to_none=leaves,
                                     quantiles=list(QUANTILES))
        return tuple(float(q) for q in qs)
    times = []
    for i in range(reps + 1):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        run()
        if i:  # the first call warms up (allocator, lazy kernel decoration)
            times.append((time.perf_counter() - t0) * 1e3)
    return tuple(float(q) for q in np.quantile(times, QUANTILES))


def memory(fn: Callable, inputs: list, mode: str = "full", *, reps: int = 3) -> tuple[float, ...] | None:
    """(median, p20, p80) MB of peak CUDA memory of one call in `mode` above the memory held before it;
    None on a CPU (see the module docstring)."""
    leaves = _grad_leaves(inputs)
    if not (leaves and leaves[0].is_cuda):
        return None
    run = _runner(fn, inputs, mode)
    peaks = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / MB)
    return tuple(float(q) for q in np.quantile(peaks, QUANTILES))
