"""What `pretrain bench kernels` times: per op, the axes it sweeps, the inputs at one point, the providers.

Every op is swept along the sequence length T and along its width (the hidden size H; the vocabulary V for
cross-entropy, whose rows have no hidden size), the other dimensions held at model-realistic values
(Llama-7B-like widths, GQA 4:1 with 128-wide heads, GPT-2's 50,304-row head). `quick` swaps in tiny shapes
that the Triton interpreter gets through in seconds: they check that the sweep, CSV and plots work, not
how fast anything is.

Providers, in Liger-Kernel's naming: `triton` (ours), `torch` (the plain-PyTorch reference, eager),
`torch_compile` (that reference under `torch.compile`, what a user without our kernels would reach for)
and, for attention, `sdpa` (`F.scaled_dot_product_attention`, FlashAttention's kernels on a GPU).

The mixture-of-experts ops route B*T tokens to k = 2 of E = 8 experts (Mixtral's shape), skewed so that
the experts' counts are uneven; their `torch` is the reference (for `grouped_mm` a Python loop of one
`torch.matmul` per expert) and `grouped_mm` adds `torch_grouped` (`torch._grouped_mm`) where torch offers
it, a CUDA GPU of compute capability 9.0+; on a CPU that provider is absent and silently skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain import kernels
from pretrain.kernels.grouped_mm import torch_grouped_available

PROVIDERS = ("triton", "torch", "torch_compile", "sdpa", "torch_grouped")
VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 128, as nanoGPT and our gpt2-124m config use


@dataclass(frozen=True)
class Axis:
    """One swept dimension: its name in the CSV (`x_name`), its label on the plot, its values, and the
    other dimensions' values while it moves."""

    name: str
    label: str
    values: tuple[int, ...]
    fixed: dict[str, int]

    def points(self) -> list[dict[str, int]]:
        return [{**self.fixed, self.name: v} for v in self.values]


@dataclass(frozen=True)
class OpBench:
    """`make(dims, dtype, device)` -> the op's positional inputs (float ones require grad);
    `fns[provider](*inputs)` -> the op's output (a tensor; a scalar for the losses)."""

    op: str
    axes: tuple[Axis, ...]
    make: Callable[[dict, torch.dtype, torch.device], list]
    fns: dict[str, Callable]


@dataclass(frozen=True)
class Sizes:
    """The sweep of one op at one scale: T values (at width `w_fixed`), width values (at `t_fixed`)."""

    batch: int
    t: tuple[int, ...]
    w: tuple[int, ...]
    t_fixed: int
    w_fixed: int
    extra: dict | None = None  # dimensions that never move (head size, vocabulary)


def _axes(width: str, label: str, s: Sizes) -> tuple[Axis, ...]:
    extra = s.extra or {}
    return (Axis("T", "sequence length T", s.t, {"B": s.batch, width: s.w_fixed, **extra}),
            Axis(width, label, s.w, {"B": s.batch, "T": s.t_fixed, **extra}))


_FULL_T = (1024, 2048, 4096, 8192)
_FULL_H = (1024, 2048, 4096, 8192)


def _leaf(*shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype).requires_grad_()


def _targets(n: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), device=device)


def _compiled(fn: Callable) -> Callable:
    """`torch.compile(fn)`, made on the first call: importing Dynamo costs seconds that a sweep without the
    torch_compile provider should not pay. One compiled function per op: Dynamo marks a dimension dynamic
    once it sees a second size of it, so a sweep costs two or three compilations per op, not one per point."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return call


def _attention(quick: bool) -> OpBench:
    s = (Sizes(1, (16, 32), (32, 64), 16, 32, {"D": 16}) if quick
         else Sizes(2, _FULL_T, _FULL_H, 2048, 2048, {"D": 128}))

    def make(dims, dtype, device):
        hq = max(1, dims["H"] // dims["D"])
        hkv = max(1, hq // 4)  # GQA 4:1, as Llama-3 has
        return [_leaf(dims["B"], h, dims["T"], dims["D"], dtype=dtype, device=device) for h in (hq, hkv, hkv)]

    def ref(q, k, v):
        return kernels.attention_reference(q, k, v, True)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    return OpBench("attention", _axes("H", f"hidden size H (heads of {s.extra['D']})", s), make, {
        "triton": lambda q, k, v: kernels.attention(q, k, v, True, backend="triton"),
        "torch": ref, "torch_compile": _compiled(ref), "sdpa": sdpa})


def _rows_sizes(quick: bool) -> Sizes:
    return Sizes(1, (8, 16), (32, 64), 8, 64) if quick else Sizes(4, _FULL_T, _FULL_H, 2048, 4096)


def _rms_norm(quick: bool) -> OpBench:
    def make(dims, dtype, device):
        h = dims["H"]
        return [_leaf(dims["B"], dims["T"], h, dtype=dtype, device=device),
                _leaf(h, dtype=dtype, device=device, scale=0.1, shift=1.0)]

    def ref(x, w):
        return kernels.rms_norm_reference(x, w, 1e-6)

    return OpBench("rms_norm", _axes("H", "hidden size H", _rows_sizes(quick)), make, {
        "triton": lambda x, w: kernels.rms_norm(x, w, 1e-6, backend="triton"),
        "torch": ref, "torch_compile": _compiled(ref)})


def _layer_norm(quick: bool) -> OpBench:
    def make(dims, dtype, device):
        h = dims["H"]
        return [_leaf(dims["B"], dims["T"], h, dtype=dtype, device=device),
                _leaf(h, dtype=dtype, device=device, scale=0.1, shift=1.0),
                _leaf(h, dtype=dtype, device=device, scale=0.1)]

    def ref(x, w, b):
        return kernels.layer_norm_reference(x, w, b, 1e-5)

    return OpBench("layer_norm", _axes("H", "hidden size H", _rows_sizes(quick)), make, {
        "triton": lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, backend="triton"),
        "torch": ref, "torch_compile": _compiled(ref)})


def _rope(quick: bool) -> OpBench:
    s = (Sizes(1, (8, 16), (32, 64), 8, 64, {"D": 16}) if quick
         else Sizes(4, _FULL_T, _FULL_H, 2048, 4096, {"D": 128}))

    def make(dims, dtype, device):
        heads = max(1, dims["H"] // dims["D"])
        return [_leaf(dims["B"], heads, dims["T"], dims["D"], dtype=dtype, device=device),
                torch.arange(dims["T"], device=device)]

    def ref(x, pos):
        return kernels.rope_reference(x, pos, 10000.0)

    return OpBench("rope", _axes("H", f"hidden size H (heads of {s.extra['D']})", s), make, {
        "triton": lambda x, pos: kernels.rope(x, pos, 10000.0, backend="triton"),
        "torch": ref, "torch_compile": _compiled(ref)})


def ffn_width(h: int) -> int:
    """The SwiGLU inner width for hidden size `h`: 8h/3 rounded up to a multiple of 64 (Llama's rule)."""
    return 64 * math.ceil(8 * h / 3 / 64)


def _swiglu(quick: bool) -> OpBench:
    def make(dims, dtype, device):
        f = ffn_width(dims["H"])
        return [_leaf(dims["B"], dims["T"], f, dtype=dtype, device=device) for _ in range(2)]

    return OpBench("swiglu", _axes("H", "hidden size H (F = 8H/3)", _rows_sizes(quick)), make, {
        "triton": lambda g, u: kernels.swiglu(g, u, backend="triton"),
        "torch": kernels.swiglu_reference, "torch_compile": _compiled(kernels.swiglu_reference)})


def _cross_entropy(quick: bool) -> OpBench:
    s = (Sizes(1, (8, 16), (100, 300), 8, 300) if quick
         else Sizes(2, _FULL_T, (32000, 50304, 128256, 151936), 2048, VOCAB))

    def make(dims, dtype, device):
        n = dims["B"] * dims["T"]
        return [_leaf(n, dims["V"], dtype=dtype, device=device, scale=2.0), _targets(n, dims["V"], device)]

    return OpBench("cross_entropy", _axes("V", "vocabulary size V", s), make, {
        "triton": lambda x, t: kernels.cross_entropy(x, t, backend="triton"),
        "torch": kernels.cross_entropy_reference,
        "torch_compile": _compiled(kernels.cross_entropy_reference)})


def _linear_cross_entropy(quick: bool) -> OpBench:
    s = (Sizes(1, (8, 16), (32, 64), 8, 64, {"V": 300}) if quick
         else Sizes(2, _FULL_T, _FULL_H, 2048, 2048, {"V": VOCAB}))

    def make(dims, dtype, device):
        n, h, v = dims["B"] * dims["T"], dims["H"], dims["V"]
        return [_leaf(n, h, dtype=dtype, device=device),
                _leaf(v, h, dtype=dtype, device=device, scale=h ** -0.5), _targets(n, v, device)]

    # The eager baseline is the plain composition: the full (N, V) logits, then the loss.
    ref = kernels.linear_cross_entropy_unfused
    return OpBench("linear_cross_entropy", _axes("H", f"hidden size H (V = {s.extra['V']})", s), make, {
        "triton": lambda x, w, t: kernels.linear_cross_entropy(x, w, t, backend="triton"),
        "torch": ref, "torch_compile": _compiled(ref)})


_MOE = {"E": 8, "K": 2}  # experts, slots per token


def _moe_sizes(quick: bool) -> Sizes:
    return Sizes(1, (8, 16), (32, 64), 8, 64, _MOE) if quick else Sizes(2, _FULL_T, _FULL_H, 2048, 4096, _MOE)


def _moe_experts(dims, device) -> torch.Tensor:
    """Top-k of skewed random scores: expert e is favoured over e + 1, so the counts are uneven."""
    scores = torch.rand(dims["B"] * dims["T"], dims["E"], device=device)
    return (scores - 0.05 * torch.arange(dims["E"], device=device)).topk(dims["K"], -1).indices


def _moe_permute(quick: bool) -> OpBench:
    def make(dims, dtype, device):
        return [_leaf(dims["B"] * dims["T"], dims["H"], dtype=dtype, device=device), _moe_experts(dims, device)]

    def fn(backend):
        return lambda x, ex: kernels.moe_permute(x, ex, _MOE["E"], backend=backend)[0]

    s = _moe_sizes(quick)
    return OpBench("moe_permute", _axes("H", "hidden size H (E = 8, k = 2)", s), make,
                   {"triton": fn("triton"), "torch": fn("reference")})


def _moe_unpermute(quick: bool) -> OpBench:
    def make(dims, dtype, device):
        n = dims["B"] * dims["T"]
        order = kernels.moe_routing(_moe_experts(dims, device), dims["E"])[1]
        return [_leaf(n * dims["K"], dims["H"], dtype=dtype, device=device), order,
                _leaf(n, dims["K"], dtype=dtype, device=device, scale=0.1, shift=0.5)]

    def fn(backend):
        return lambda ys, order, w: kernels.moe_unpermute(ys, order, w, backend=backend)

    s = _moe_sizes(quick)
    return OpBench("moe_unpermute", _axes("H", "hidden size H (E = 8, k = 2)", s), make,
                   {"triton": fn("triton"), "torch": fn("reference")})


def _grouped_mm(quick: bool) -> OpBench:
    """The experts' up projection: (B*T*k, H) rows in expert order times (E, H, F) weights, F = 8H/3."""
    def make(dims, dtype, device):
        h = dims["H"]
        counts = kernels.moe_routing(_moe_experts(dims, device), dims["E"])[0]
        return [_leaf(dims["B"] * dims["T"] * dims["K"], h, dtype=dtype, device=device),
                _leaf(dims["E"], h, ffn_width(h), dtype=dtype, device=device, scale=h ** -0.5), counts]

    def fn(backend):
        return lambda xs, w, counts: kernels.grouped_mm(xs, w, counts, backend=backend)

    fns = {"triton": fn("triton"), "torch": fn("reference")}
    if torch.cuda.is_available() and torch_grouped_available(torch.device("cuda")):
        fns["torch_grouped"] = fn("torch_grouped")
    return OpBench("grouped_mm", _axes("H", "hidden size H (F = 8H/3, E = 8, k = 2)", _moe_sizes(quick)), make, fns)


_BUILDERS = {
    "attention": _attention, "rms_norm": _rms_norm, "layer_norm": _layer_norm, "rope": _rope,
    "swiglu": _swiglu, "cross_entropy": _cross_entropy, "linear_cross_entropy": _linear_cross_entropy,
    "moe_permute": _moe_permute, "moe_unpermute": _moe_unpermute, "grouped_mm": _grouped_mm,
}
OPS = tuple(_BUILDERS)


def op_bench(op: str, quick: bool) -> OpBench:
    """The sweep of `op` (one of OPS) at full (GPU) or tiny (`quick`, interpreter) scale."""
    return _BUILDERS[op](quick)
