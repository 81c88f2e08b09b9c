"""The GPU path of every kernel compiles for an H100 (sm_90) down to a cubin, on this CPU-only machine.

The interpreter runs kernels as NumPy, which accepts code the real compiler rejects (type mismatches
across branches, dot shapes, constexpr misuse). Compiling ahead of time with Triton's bundled ptxas
checks the GPU build of each kernel with the bf16 configuration its launcher uses on a GPU."""

from __future__ import annotations

import importlib

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

# importlib: the package re-exports functions under the same names as their modules.
attention, cross_entropy, grouped_mm, layer_norm, moe, rms_norm, rope, swiglu = (
    importlib.import_module(f"pretrain.kernels.{m}")
    for m in ("attention", "cross_entropy", "grouped_mm", "layer_norm", "moe", "rms_norm", "rope", "swiglu")
)

pytestmark = pytest.mark.kernels

BF16, F32, I64 = "*bf16", "*fp32", "*i64"
GMM = dict(DOT=tl.bfloat16, PREC="tf32", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
ATTN = dict(DOT=tl.bfloat16, PREC="tf32", BLOCK_D=128)
# Without segments the launchers pass the fp32 log-sum-exp buffer in the unused SEG slot.
ATTN_SEG = (("", F32, False), ("_segments", "*i32", True))
KERNELS = {
    "rms_fwd": (rms_norm._rms_fwd_kernel, dict(X=BF16, R=BF16, W=BF16, Y=BF16, S=BF16, RSTD=F32, eps="fp32"),
                dict(HAS_RES=True, BLOCK_R=2, BLOCK_D=4096), 4),
    "rms_bwd": (rms_norm._rms_bwd_kernel, dict(DY=BF16, X=BF16, W=BF16, RSTD=F32, DS=BF16, DX=BF16, DWP=F32),
                dict(HAS_DS=True, BLOCK_R=2, BLOCK_D=4096), 4),
    "ln_fwd": (layer_norm._ln_fwd_kernel, dict(X=BF16, W=BF16, B=BF16, SH=BF16, SC=BF16, Y=BF16, MEAN=F32,
                                               RSTD=F32, eps="fp32"),
               dict(HAS_W=True, HAS_B=True, HAS_SHIFT=True, HAS_SCALE=True, BLOCK_R=2, BLOCK_D=4096), 4),
    "ln_bwd": (layer_norm._ln_bwd_kernel, dict(DY=BF16, X=BF16, W=BF16, B=BF16, SC=BF16, MEAN=F32, RSTD=F32,
                                               DX=BF16, DWP=F32, DBP=F32, DSC=F32),
               dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, BLOCK_R=2, BLOCK_D=4096), 4),
    "rope": (rope._rope_kernel, dict(X=BF16, P=I64, F=F32, Y=BF16), dict(BACKWARD=True, BLOCK_R=64, BLOCK_H=64), 4),
    "swiglu_fwd": (swiglu._swiglu_fwd_kernel, dict(G=BF16, U=BF16, Y=BF16), dict(BLOCK_R=4, BLOCK_N=1024), 4),
    "swiglu_bwd": (swiglu._swiglu_bwd_kernel, dict(DY=BF16, G=BF16, U=BF16, DG=BF16, DU=BF16),
                   dict(BLOCK_R=4, BLOCK_N=1024), 4),
    "ce_fwd": (cross_entropy._ce_fwd_kernel, dict(X=BF16, T=I64, LOSS=F32, LSE=F32, z_loss="fp32"),
               dict(BLOCK_R=1, BLOCK_V=4096), 4),
    "ce_bwd": (cross_entropy._ce_bwd_kernel, dict(X=BF16, T=I64, LSE=F32, SCALE=F32, DX=BF16, z_loss="fp32"),
               dict(BLOCK_R=1, BLOCK_V=4096), 4),
    "moe_gather": (moe._gather_kernel, dict(X=BF16, ORDER=I64, Y=BF16), dict(BLOCK_R=4, BLOCK_N=1024), 4),
    "moe_combine": (moe._combine_kernel, dict(YS=BF16, INV=I64, W=BF16, OUT=BF16),
                    dict(HAS_W=True, BLOCK_R=4, BLOCK_N=1024), 4),
    "moe_unpermute_bwd": (moe._unpermute_bwd_kernel, dict(DOUT=BF16, YS=BF16, ORDER=I64, W=BF16, DYS=BF16, DW=BF16),
                          dict(BLOCK_R=16, BLOCK_N=256), 4),
    "grouped_mm": (grouped_mm._gmm_kernel, dict(X=BF16, W=BF16, Y=BF16, TILE_E="*i32", TILE_R=I64, OFFS=I64), GMM, 4),
    "grouped_mm_dw": (grouped_mm._gmm_dw_kernel, dict(X=BF16, DY=BF16, DW=BF16, OFFS=I64), GMM, 4),
    **{f"attn_fwd{tag}": (attention._attn_fwd_kernel,
                          dict(Q=BF16, K=BF16, V=BF16, SEG=seg, OUT=BF16, LSE=F32, qk_scale="fp32"),
                          dict(CAUSAL=True, HAS_SEGMENTS=has, BLOCK_M=64, BLOCK_N=64, **ATTN), 4)
       for tag, seg, has in ATTN_SEG},
    **{f"attn_dkdv{tag}": (attention._attn_bwd_dkdv_kernel,
                           dict(Q=BF16, K=BF16, V=BF16, SEG=seg, DO=BF16, LSE=F32, DELTA=F32, DK=BF16, DV=BF16,
                                qk_scale="fp32", sm_scale="fp32"),
                           dict(CAUSAL=True, HAS_SEGMENTS=has, BLOCK_M=64, BLOCK_N=64, **ATTN), 4)
       for tag, seg, has in ATTN_SEG},
    **{f"attn_dq{tag}": (attention._attn_bwd_dq_kernel,
                         dict(Q=BF16, K=BF16, V=BF16, SEG=seg, DO=BF16, LSE=F32, DELTA=F32, DQ=BF16,
                              qk_scale="fp32", sm_scale="fp32"),
                         dict(CAUSAL=True, HAS_SEGMENTS=has, BLOCK_M=64, BLOCK_N=64, **ATTN), 4)
       for tag, seg, has in ATTN_SEG},
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_sm90(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton.jit must build a real JITFunction here
    lazy, types, constexprs, warps = KERNELS[name]
    fn = triton.jit(lazy.fn)
    # Unlisted arguments are sizes and strides: 32-bit ints.
    sig = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"]  # ptxas accepted it
    assert compiled.metadata.shared <= 228 * 1024  # fits an H100 SM's shared memory
