"""A mixture of experts resumed at another world size (expert parallelism 1: the experts are weights like any other)
goes on as the run would have at its own size, its routers' balance bias included: DeepSpeed's universal load
restores the parameters from the optimizer's states and never reads the module's buffers, which resume.load then
restores itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain.load import config_from_dict

SEQ, VOCAB, GLOBAL, SAVE_AT, MORE = 16, 64, 4, 4, 3


def _config(world: int):
    return config_from_dict({
        "data": {"train": "unused"}, "cluster": {"workers": world}, "zero": {"stage": 2},
        "train": {"micro_batch_size": GLOBAL // world, "global_batch_size": GLOBAL, "precision": "fp32"},
        "schedule": {"warmup_steps": 1}, "optimizer": {"lr": 3e-3},
        "model": {"type": "mixtral", "n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 48,
                  "vocab_size": VOCAB, "max_seq_len": SEQ, "kernels": "reference",
                  "moe": {"n_experts": 4, "top_k": 2, "aux_loss": 0.0, "score": "sigmoid", "bias_balance": 0.01}},
    })


def _ranks(rank: int, world: int, where: str) -> None:
    """World 2: SAVE_AT steps, the routers' balance bias set to known values, a checkpoint, MORE steps (the
    reference). World 1: the checkpoint through DeepSpeed's universal format, then the same MORE steps."""
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.build import build_model
    from pretrain.train.engine import backward_and_step, build_engine, clips_itself

    cfg, out = _config(world), Path(where)
    mb = GLOBAL // world
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(7))[rank * mb:(rank + 1) * mb]

    def steps(engine, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            loss = engine(ids[:, :-1], targets=ids[:, 1:]) / (mb * SEQ)
            backward_and_step(engine, loss, cfg.optimizer.grad_clip if clips_itself(cfg) else None)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        return losses

    store = ckpt.Storage(str(out / "ckpt"))
    staging = out / f"staging-{world}-{rank}"
    saver = ckpt.Checkpointer(store, staging, rank, world)
    plan = ckpt.decide(store, None, rank, world)
    engine = build_engine(cfg, build_model(cfg, torch.device("cpu"))[0], world, steps=20,
                          load_universal=plan.universal_url is not None)
    balance = {n: b for n, b in engine.module.named_buffers() if n.endswith("balance")}
    if plan.step is None:
        steps(engine, SAVE_AT)
        for i, b in enumerate(balance.values()):
            b.copy_(torch.linspace(-0.05, 0.05, b.numel()) * (i + 1))  # what the bias would have learnt
        saver.save(engine, SAVE_AT, {"step": SAVE_AT, "data": {}})
        saver.close()
    else:
        ckpt.prepare_universal(plan, staging, rank)
        with ckpt.opened(plan, staging, rank) as (step_dir, udir):
            ckpt.load(engine, step_dir, rank, udir)
    losses = steps(engine, MORE)
    if rank == 0:
        (out / f"world{world}.json").write_text(json.dumps({
            "losses": losses, "balance": {n: b.tolist() for n, b in balance.items()}}))


@pytest.mark.slow
def test_a_moe_resumed_on_fewer_workers_goes_on_alike_with_its_balance_bias(gloo_ranks, tmp_path):
    gloo_ranks(_ranks, str(tmp_path), world=2, timeout=300)
    gloo_ranks(_ranks, str(tmp_path), world=1, timeout=300)
    two, one = (json.loads((tmp_path / f"world{w}.json").read_text()) for w in (2, 1))
    assert (tmp_path / "ckpt" / f"step-{SAVE_AT}" / "universal").is_dir()
    assert two["balance"] and one["balance"] == two["balance"]  # restored, not zeros
    diff = max(abs(a - b) for a, b in zip(two["losses"], one["losses"], strict=True))
    assert diff < 1e-4, (diff, two["losses"], one["losses"])
