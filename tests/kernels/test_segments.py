"""Packed sequences: attention with `segment_ids` is per-document attention, and RoPE takes a caller's
frequency table and per-document positions. Triton runs under the interpreter in fp32, small shapes.

The ground truth for a packed row is each document run alone, through the same public function without
segment ids: outputs and the gradients of q, k and v must agree within 1e-5. Documents have ragged
lengths that straddle the kernels' 64-wide tiles (and a 1-token document), rows end in padding (id 0),
and heads are grouped (Hq 4, Hkv 2).
"""

from __future__ import annotations

import pytest
import torch

from pretrain import kernels
from pretrain.kernels.checks import packed_segments
from pretrain.kernels.rope import default_inv_freq

pytestmark = pytest.mark.kernels

ROWS = ([37, 64, 1, 20], [150], [70, 66])  # S = 150: the first row ends in 28 padding tokens, the last in 14
S, HQ, HKV, D = 150, 4, 2, 40


def _packed(gen):
    seg = torch.stack([packed_segments(r, S - sum(r)) for r in ROWS])
    # q as the model makes it: a (B, S, H, D) buffer seen through a transpose.
    q = torch.randn(len(ROWS), S, HQ, D, generator=gen).transpose(1, 2)
    k, v = (torch.randn(len(ROWS), HKV, S, D, generator=gen) for _ in range(2))
    dy = torch.randn(len(ROWS), HQ, S, D, generator=gen)
    return seg, q, k, v, dy


def _fwd_bwd(q, k, v, dy, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = kernels.attention(*leaves, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, dy))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_attention_is_attention_per_document(causal):
    gen = torch.Generator().manual_seed(0)
    seg, q, k, v, dy = _packed(gen)
    packed = _fwd_bwd(q, k, v, dy, causal=causal, segment_ids=seg, backend="triton")
    for t in packed:
        assert not torch.isnan(t).any()  # every row written, none fully masked
    for b in range(len(ROWS)):
        for doc in seg[b].unique().tolist():  # padding (id 0) is a document of its own too
            idx = (seg[b] == doc).nonzero().squeeze(1)
            alone = _fwd_bwd(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx], dy[b:b + 1, :, idx],
                             causal=causal, backend="triton")
            for name, got, want in zip(("out", "dq", "dk", "dv"), packed, alone, strict=True):
                err = (got[b:b + 1, :, idx] - want).abs().max().item()
                assert err <= 1e-5, f"row {b} document {doc} ({idx.numel()} tokens) {name}: {err:.3g}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_triton_matches_reference_with_unordered_ids(causal):
    """Correctness never relies on ids being sorted: tiles are skipped only when their id ranges are disjoint."""
    gen = torch.Generator().manual_seed(1)
    _, q, k, v, dy = _packed(gen)
    seg = torch.randint(0, 4, (len(ROWS), S), generator=gen)  # int64, interleaved ids
    seg[1, :64] = 7  # one tile whose ids share nothing with the rest of its row
    got = _fwd_bwd(q, k, v, dy, causal=causal, segment_ids=seg, backend="triton")
    want = _fwd_bwd(q, k, v, dy, causal=causal, segment_ids=seg, backend="reference")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert (a - b).abs().max().item() <= 1e-5, name


def test_without_segment_ids_nothing_changes():
    gen = torch.Generator().manual_seed(2)
    _, q, k, v, dy = _packed(gen)
    plain = _fwd_bwd(q, k, v, dy, backend="triton")
    one_doc = _fwd_bwd(q, k, v, dy, segment_ids=torch.ones(len(ROWS), S, dtype=torch.int32), backend="triton")
    reference = _fwd_bwd(q, k, v, dy, backend="reference")
    for a, b, r in zip(plain, one_doc, reference, strict=True):
        assert (a - b).abs().max().item() <= 1e-6
        assert (a - r).abs().max().item() <= 1e-5


def test_segment_ids_are_checked():
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match="segment_ids"):
        kernels.attention(q, k, k, segment_ids=torch.ones(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        kernels.attention(q, k, k, segment_ids=torch.ones(2, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        kernels.attention(q, k[:, :, :6], k[:, :, :6], causal=False, segment_ids=torch.ones(2, 8, dtype=torch.int32))


def _rope_grads(x, pos, dy, **kw):
    leaf = x.detach().clone().requires_grad_(True)
    y = kernels.rope(leaf, pos, **kw)
    return y.detach(), torch.autograd.grad(y, leaf, dy)[0]


def test_rope_with_a_table():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 64, generator=gen).transpose(1, 2)  # (B, H, S, D) view, as the model passes it
    dy = torch.randn(2, 3, 5, 64, generator=gen)
    pos = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]])
    table = default_inv_freq(64, 500000.0, x.device)
    table[16:] /= 8  # not theta^(-2i/D) for any theta
    got = _rope_grads(x, pos, dy, inv_freq=table, backend="triton")
    want = _rope_grads(x, pos, dy, inv_freq=table, backend="reference")
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() <= 1e-5
    # The default table passed explicitly is exactly the default path, bit for bit.
    for backend in ("triton", "reference"):
        explicit = _rope_grads(x, pos, dy, theta=10000.0, inv_freq=default_inv_freq(64, 10000.0, x.device),
                               backend=backend)
        for a, b in zip(explicit, _rope_grads(x, pos, dy, theta=10000.0, backend=backend), strict=True):
            assert torch.equal(a, b), backend
    with pytest.raises(ValueError, match="inv_freq"):
        kernels.rope(x, pos, inv_freq=table[:31])


def test_rope_positions_restart_per_document():
    gen = torch.Generator().manual_seed(4)
    lengths = [7, 1, 12]
    x = torch.randn(2, 3, sum(lengths), 40, generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].expand(2, -1)
    packed = kernels.rope(x, pos, backend="triton")
    start = 0
    for n in lengths:
        alone = kernels.rope(x[:, :, start:start + n].contiguous(), torch.arange(n), backend="triton")
        assert (packed[:, :, start:start + n] - alone).abs().max().item() <= 1e-6
        start += n


def test_packed_ops_compile_in_one_graph():
    """The optional tensor arguments keep the custom ops' schemas valid under dynamo + AOTAutograd."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 33, 40, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 33, 40, generator=gen, requires_grad=True)
    seg = packed_segments([20, 10], 3)[None]
    pos = torch.cat([torch.arange(20), torch.arange(13)])[None]
    table = default_inv_freq(40, 10000.0, q.device) / 2

    def f(q, k):
        q, k = kernels.rope(q, pos, inv_freq=table), kernels.rope(k, pos, inv_freq=table)
        return kernels.attention(q, k, k, segment_ids=seg).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k)
    want = f(q, k)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k)), strict=True):
        torch.testing.assert_close(a, b)
