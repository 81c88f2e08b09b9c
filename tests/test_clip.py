"""ZeRO-0 in fp32 clips in the loop (one `clip_grad_norm_`, which also gives the logged norm) instead of in
DeepSpeed (a second norm of the same gradients): both give the same training, on two real gloo ranks whose
gradients DeepSpeed all-reduces before either clip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.load import load_config

ROOT = Path(__file__).resolve().parents[1]
CLIP = 0.05  # below every step's norm: each step is clipped


def _rank(rank: int, world: int, out: str) -> None:
    import torch

    import pretrain.train.engine as engine_mod
    from pretrain.train.build import build_model

    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", "zero.stage=0",
        "train.precision=fp32", f"optimizer.grad_clip={CLIP}", "train.micro_batch_size=2", "train.global_batch_size=8",
        "optimizer.lr=1e-2", "schedule.warmup_steps=0"])
    assert engine_mod.clips_itself(cfg)
    result = {}
    for who in ("loop", "deepspeed"):
        if who == "deepspeed":
            engine_mod.clips_itself = lambda c: False  # the ds config's gradient_clipping, DeepSpeed's own clip
        model, _ = build_model(cfg, torch.device("cpu"))  # seeded per parameter name: the same start both times
        engine = engine_mod.build_engine(cfg, model, world, steps=10)
        clip = CLIP if engine_mod.clips_itself(cfg) else None
        data = torch.Generator().manual_seed(rank)
        rows = []
        for _ in range(3 * 2):  # three optimizer steps of two micro-batches
            x = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=data)
            loss = engine(x[:, :-1], targets=x[:, 1:]) / 32
            norm = engine_mod.backward_and_step(engine, loss, clip)
            rows.append([float(loss.detach()), norm])
        result[who] = rows
    if rank == 0:
        Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_loop_clip_equals_deepspeed_clip(tmp_path, gloo_ranks):
    out = tmp_path / "result.json"
    gloo_ranks(_rank, str(out))
    result = json.loads(out.read_text())
    ours, theirs = result["loop"], result["deepspeed"]
    norms = [n for _, n in ours if n is not None]
    assert len(norms) == 3 and min(norms) > CLIP  # every step clipped: the comparison means something
    for (la, na), (lb, nb) in zip(ours, theirs, strict=True):
        assert abs(la - lb) <= 1e-6 * max(1.0, abs(lb)), (la, lb)
        assert (na is None) == (nb is None) and (na is None or abs(na - nb) <= 1e-5 * nb), (na, nb)
    assert ours[-1][0] != ours[1][0]  # the steps moved the weights
