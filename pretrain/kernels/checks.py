"""The correctness rule for kernels and the sweep of odd-shaped cases it is applied to.

Rule (FlashAttention's): against an fp64 run of the reference, the kernel's max error in a dtype may be
at most `FACTOR` times the error of the plain-PyTorch reference run in that same dtype, plus a small
absolute floor. NaN never passes; since launchers fill outputs with NaN first under the interpreter,
an element a kernel forgot to write fails too. Shared by `tests/kernels` and `pretrain bench kernels`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pretrain import kernels
from pretrain.kernels.rope import default_inv_freq

FACTOR = 3.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy",
       "moe_permute", "moe_unpermute", "grouped_mm")


@dataclass
class Case:
    """One call: `make(dtype, gen)` builds the args; `call(*args, backend=)` runs the op."""

    op: str
    label: str
    make: Callable
    call: Callable


@dataclass
class Result:
    op: str
    case: str
    dtype: str
    tensor: str  # "out" or "grad:<arg>"
    err: float  # kernel vs fp64 reference
    ref_err: float  # reference in this dtype vs fp64 reference
    bound: float
    ok: bool


def _randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _attention_cases(small: bool) -> list[Case]:
    out = []
    grid = [(1, 40, True), (77, 64, False)] if small else list(itertools.product((1, 77, 130), (40, 64), (True, False)))
    for i, (s, d, causal) in enumerate(grid):
        b = (1, 3)[i % 2]
        hq, hkv = (4, 1) if i % 3 != 2 else (2, 2)  # mostly GQA 4:1, some plain multi-head
        skv = s if causal or s != 77 else 130  # one family with Skv != S (cross-attention shape)
        strided = i % 2 == 1  # (B, S, H, D) buffers seen through a transpose, as the model makes them

        def make(dtype, gen, b=b, s=s, skv=skv, d=d, hq=hq, hkv=hkv, strided=strided):
            def t(h, n):
                if strided:
                    return _randn(gen, b, n, h, d, dtype=dtype).transpose(1, 2)
                return _randn(gen, b, h, n, d, dtype=dtype)
            return [t(hq, s), t(hkv, skv), t(hkv, skv)]

        label = f"B{b} Hq{hq} Hkv{hkv} S{s} Skv{skv} D{d} {'causal' if causal else 'full'}{' strided' if strided else ''}"
        out.append(Case("attention", label, make,
                        lambda q, k, v, backend, causal=causal: kernels.attention(q, k, v, causal, backend=backend)))
    if not small:
        out += _packed_attention_cases()
    return out


def packed_segments(lengths: list[int], pad: int) -> torch.Tensor:
    """One packed row's ids: documents 1, 2, ... of the given lengths, then `pad` tokens of id 0."""
    ids = [i + 1 for i, n in enumerate(lengths) for _ in range(n)] + [0] * pad
    return torch.tensor(ids, dtype=torch.int32)


def _packed_attention_cases() -> list[Case]:
    """Packed rows: ragged documents that straddle the 64-wide tiles, a 1-token one, trailing padding."""
    out = []
    for s, causal, rows in ((130, True, ([37, 64, 1, 20], [130])), (77, False, ([50, 20], [1, 76]))):
        seg = torch.stack([packed_segments(r, s - sum(r)) for r in rows])

        def make(dtype, gen, s=s, seg=seg):
            b = seg.shape[0]
            return [_randn(gen, b, 4, s, 40, dtype=dtype), _randn(gen, b, 2, s, 40, dtype=dtype),
                    _randn(gen, b, 2, s, 40, dtype=dtype), seg]

        label = f"B2 Hq4 Hkv2 S{s} D40 {'causal' if causal else 'full'} packed {rows[0]}+pad"
        out.append(Case("attention", label, make, lambda q, k, v, seg, backend, causal=causal:
                        kernels.attention(q, k, v, causal, segment_ids=seg, backend=backend)))
    return out


def _rows_shapes(small: bool):
    return [(1, 1), (3, 77)] if small else [(1, 1), (3, 77), (1, 130), (3, 130)]


def _rms_norm_cases(small: bool) -> list[Case]:
    out = []
    for i, ((b, s), h) in enumerate(itertools.product(_rows_shapes(small), (123, 64))):
        res = i % 2 == 0

        def make(dtype, gen, b=b, s=s, h=h, res=res):
            x = _randn(gen, b, s, h + 5, dtype=dtype)[..., :h]  # a strided slice of a wider buffer
            w = _randn(gen, h, dtype=dtype, scale=0.5) + 1
            return [x, w, _randn(gen, b, s, h, dtype=dtype) if res else None]

        out.append(Case("rms_norm", f"B{b} S{s} H{h}{' +residual' if res else ''} strided", make,
                        lambda x, w, r, backend: kernels.rms_norm(x, w, 1e-6, r, backend=backend)))
    return out


def _layer_norm_cases(small: bool) -> list[Case]:
    out = []
    kinds = ("affine", "adaLN", "plain")
    for i, ((b, s), kind) in enumerate(itertools.product(_rows_shapes(small), kinds)):
        h = 123 if i % 2 == 0 else 64

        def make(dtype, gen, b=b, s=s, h=h, kind=kind):
            x = _randn(gen, b, s, h, dtype=dtype)
            if kind == "plain":
                return [x, None, None, None, None]
            w, bias = _randn(gen, h, dtype=dtype, scale=0.5) + 1, _randn(gen, h, dtype=dtype, scale=0.5)
            if kind == "affine":
                return [x, w, bias, None, None]
            return [x, w, bias, _randn(gen, b, 1, h, dtype=dtype), _randn(gen, b, 1, h, dtype=dtype, scale=0.5)]

        out.append(Case("layer_norm", f"B{b} S{s} H{h} {kind}", make,
                        lambda x, w, bias, sh, sc, backend: kernels.layer_norm(x, w, bias, 1e-5, sh, sc, backend=backend)))
    return out


def _rope_cases(small: bool) -> list[Case]:
    out = []
    for i, ((b, s), d) in enumerate(itertools.product(_rows_shapes(small), (40, 64))):
        per_batch = i % 2 == 1

        def make(dtype, gen, b=b, s=s, d=d, per_batch=per_batch):
            x = _randn(gen, b, s, 3, d, dtype=dtype).transpose(1, 2)
            pos = torch.arange(s)[None] + torch.randint(0, 1000, (b, 1), generator=gen) if per_batch else torch.arange(s)
            return [x, pos]

        out.append(Case("rope", f"B{b} H3 S{s} D{d} {'(B,S)' if per_batch else '(S,)'} positions strided", make,
                        lambda x, pos, backend: kernels.rope(x, pos, 10000.0, backend=backend)))
    if not small:
        # A caller's table (here Llama-3-like: theta 5e5, the low-frequency half stretched 8x), with
        # positions restarting at 0 at each packed document.
        table = default_inv_freq(64, 500000.0, torch.device("cpu"))
        table[16:] /= 8

        def make(dtype, gen):
            pos = torch.cat([torch.arange(n) for n in (40, 1, 36)])[None].expand(3, -1)
            return [_randn(gen, 3, 77, 3, 64, dtype=dtype).transpose(1, 2), pos]

        out.append(Case("rope", "B3 H3 S77 D64 inv_freq table, per-document positions strided", make,
                        lambda x, pos, backend: kernels.rope(x, pos, inv_freq=table, backend=backend)))
    return out


def _swiglu_cases(small: bool) -> list[Case]:
    out = []
    for (b, s) in _rows_shapes(small):
        def make(dtype, gen, b=b, s=s):
            gu = _randn(gen, b, s, 2 * 123, dtype=dtype)
            return list(gu.chunk(2, dim=-1))  # the halves of a fused projection: strided views

        out.append(Case("swiglu", f"B{b} S{s} F123 strided", make, lambda g, u, backend: kernels.swiglu(g, u, backend=backend)))
    return out


def _targets(gen, n, v):
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.2] = -100  # some ignored rows, as padding makes
    return t


def _ce_cases(small: bool) -> list[Case]:
    out = []
    for i, ((b, s), v) in enumerate(itertools.product(_rows_shapes(small), (123, 1000))):
        z = 1e-3 if i % 2 else 0.0

        def make(dtype, gen, n=b * s, v=v):
            logits = _randn(gen, n, v + 3, dtype=dtype, scale=2.0)[:, :v]
            t = _targets(gen, n, v)
            t[0] = 0  # at least one kept row: the mean over zero rows is NaN by definition
            return [logits, t]

        out.append(Case("cross_entropy", f"N{b * s} V{v} z{z} strided", make,
                        lambda x, t, backend, z=z: kernels.cross_entropy(x, t, -100, z, backend=backend)))
    return out


def _lce_cases(small: bool) -> list[Case]:
    out = []
    for i, ((b, s), h) in enumerate(itertools.product(_rows_shapes(small), (123, 64))):
        z = 1e-3 if i % 2 else 0.0

        def make(dtype, gen, n=b * s, h=h):
            t = _targets(gen, n, 1000)
            t[0] = 0
            return [_randn(gen, n, h, dtype=dtype), _randn(gen, 1000, h, dtype=dtype, scale=h ** -0.5), t]

        out.append(Case("linear_cross_entropy", f"N{b * s} H{h} V1000 z{z}", make,
                        lambda x, w, t, backend, z=z: kernels.linear_cross_entropy(x, w, t, -100, z, backend=backend)))
    return out


def routing_sample(gen, t: int, k: int, n_experts: int, empty=()) -> torch.Tensor:
    """Top-k expert ids (t, k), distinct per token, skewed toward low ids (uneven counts), never `empty`."""
    scores = torch.rand(t, n_experts, generator=gen) - 0.15 * torch.arange(n_experts)
    scores[:, list(empty)] = -float("inf")
    return scores.topk(k, -1).indices


# (tokens T, slots k, experts E, width, experts that get no token): uneven counts, k = 1 and 2.
_MOE = [(13, 2, 5, 123, (3,)), (7, 1, 4, 64, (0, 2))]
_MOE_FULL = [(1, 2, 3, 40, ()), (50, 2, 6, 40, (4,))]


def _moe_label(t, k, e, d, empty):
    return f"T{t} k{k} E{e} d{d}" + (f" empty {list(empty)}" if empty else "")


def _moe_permute_cases(small: bool) -> list[Case]:
    out = []
    for t, k, e, d, empty in _MOE + ([] if small else _MOE_FULL):
        def make(dtype, gen, t=t, k=k, e=e, d=d, empty=empty):
            return [_randn(gen, t, d + 3, dtype=dtype)[:, :d], routing_sample(gen, t, k, e, empty)]

        out.append(Case("moe_permute", _moe_label(t, k, e, d, empty) + " strided", make,
                        lambda x, ex, backend, e=e: kernels.moe_permute(x, ex, e, backend=backend)[0]))
    return out


def _moe_unpermute_cases(small: bool) -> list[Case]:
    out = []
    for t, k, e, d, empty in _MOE + ([] if small else _MOE_FULL):
        def make(dtype, gen, t=t, k=k, e=e, d=d, empty=empty):
            order = kernels.moe_routing(routing_sample(gen, t, k, e, empty), e)[1]
            return [_randn(gen, t * k, d, dtype=dtype), order, torch.rand(t, k, generator=gen).to(dtype)]

        out.append(Case("moe_unpermute", _moe_label(t, k, e, d, empty), make,
                        lambda ys, order, w, backend: kernels.moe_unpermute(ys, order, w, backend=backend)))
    return out


def _grouped_mm_cases(small: bool) -> list[Case]:
    out = []
    # (T, k, E, d_in, d_out, empty): groups longer than one 32-row tile, d_out over several 64-wide tiles.
    grid = [(13, 2, 5, 40, 24, (3,)), (50, 2, 6, 64, 130, (0, 4))] + ([] if small else [(7, 1, 4, 123, 1, (1, 2))])
    for t, k, e, d_in, d_out, empty in grid:
        def make(dtype, gen, t=t, k=k, e=e, d_in=d_in, d_out=d_out, empty=empty):
            counts = kernels.moe_routing(routing_sample(gen, t, k, e, empty), e)[0]
            return [_randn(gen, t * k, d_in, dtype=dtype), _randn(gen, e, d_in, d_out, dtype=dtype, scale=d_in ** -0.5),
                    counts]

        out.append(Case("grouped_mm", f"N{t * k} E{e} {d_in}x{d_out}" + (f" empty {list(empty)}" if empty else ""),
                        make, lambda xs, w, counts, backend: kernels.grouped_mm(xs, w, counts, backend=backend)))
    return out


_BUILDERS = {
    "attention": _attention_cases, "rms_norm": _rms_norm_cases, "layer_norm": _layer_norm_cases,
    "rope": _rope_cases, "swiglu": _swiglu_cases, "cross_entropy": _ce_cases, "linear_cross_entropy": _lce_cases,
    "moe_permute": _moe_permute_cases, "moe_unpermute": _moe_unpermute_cases, "grouped_mm": _grouped_mm_cases,
}


def cases(op: str, small: bool = False) -> list[Case]:
    """The odd-shaped cases of `op`; `small` keeps two or so per op (the bench's quick CPU sweep)."""
    return _BUILDERS[op](small)


def _run(case: Case, args: list, backend: str, grads_out: list | None, dtype: torch.dtype | None):
    """Run the op on fresh leaves built from `args` (cast to `dtype` if given, strides kept)."""
    leaves = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = (a if dtype is None else a.to(dtype)).detach().requires_grad_(True)
        leaves.append(a)
    out = case.call(*leaves, backend=backend)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grads_out is None:
        return [o.detach() for o in outs], None
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out, strict=True)])
    grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    return [o.detach() for o in outs], grads


def _moved(a, device: torch.device):
    """`a` on `device` with its strides and storage offset kept (`Tensor.to` would make a sliced view
    contiguous, and the strided cases test exactly such views)."""
    if not isinstance(a, torch.Tensor) or a.device == device:
        return a
    whole = a.as_strided((a.untyped_storage().nbytes() // a.element_size(),), (1,), 0)
    return whole.to(device).as_strided(a.shape, a.stride(), a.storage_offset())


def check(case: Case, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu",
          backend: str = "triton") -> list[Result]:
    """Forward and every input gradient of one case in one dtype, each judged by the rule. The inputs are
    drawn on the CPU (the same numbers on every device) and moved to `device`. `backend` is the path judged:
    "triton" (the kernels, on a GPU or under the interpreter), or "auto" on CPU without the interpreter (the
    ATen path, `pretrain.kernels._runtime.use_aten`)."""
    gen = torch.Generator().manual_seed(seed)
    args = [_moved(a, torch.device(device)) for a in case.make(dtype, gen)]
    out64, _ = _run(case, args, "reference", None, torch.float64)
    dys = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in out64]
    ref64, g64 = _run(case, args, "reference", dys, torch.float64)
    ref, gref = _run(case, args, "reference", dys, None)
    got, ggot = _run(case, args, backend, dys, None)
    names = [f"out{i}" if len(got) > 1 else "out" for i in range(len(got))]
    arg_names = [f"grad:{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    results = []
    dname = next(k for k, v in DTYPES.items() if v == dtype)
    for name, x, r, r64 in zip(names + arg_names, got + ggot, ref + gref, ref64 + g64, strict=True):
        err = (x.double() - r64).abs().max().item() if x.numel() else 0.0
        ref_err = (r.double() - r64).abs().max().item() if r.numel() else 0.0
        bound = FACTOR * ref_err + FLOOR[dtype]
        nan = bool(torch.isnan(x).any()) or x.shape != r64.shape
        results.append(Result(case.op, case.label, dname, name, err, ref_err, bound, not nan and err <= bound))
    return results


def sweep(ops=OPS, dtypes=tuple(DTYPES), small: bool = False, device: str | torch.device = "cpu") -> list[Result]:
    return [r for op in ops for c in cases(op, small) for d in dtypes for r in check(c, DTYPES[d], device=device)]
