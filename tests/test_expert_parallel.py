"""Expert parallelism (pretrain/train/expert_parallel.py): a layer whose experts are spread over two real gloo ranks
computes what the whole layer computes, forward and backward; a tiny Mixtral trained with EP 2 on two ranks under
ZeRO 0, 1 and 2 gives the losses of EP 1 on one rank with the same global batch, each rank holding only its experts,
and continues exactly from its checkpoint; ZeRO-3 at EP 1 on two ranks gives the one-rank losses too; what cannot
work is refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain.errors import ConfigError, RunError
from pretrain.load import config_from_dict
from tests.helpers import run_gloo_ranks

SEQ, VOCAB, GLOBAL, STEPS, SAVE_AT = 16, 64, 4, 10, 6


def _block_ranks(rank: int, world: int) -> None:
    """Each rank: the whole block on its own rows (the reference), then the block with its experts spread over
    both ranks, the weights being the full ones' slices."""
    from pretrain.hub.load import write_parameter
    from pretrain.models.moe import MoE, MoeConfig
    from pretrain.train.expert_parallel import ParallelExperts, parallelize_experts

    torch.manual_seed(0)  # the same whole block on both ranks
    block = MoE(MoeConfig(n_experts=4, top_k=2, aux_loss=0.0), 24, 40, "reference")
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(1 + rank)  # each rank's own rows (an odd, different number)
    x = torch.randn(3 + 2 * rank, 7, 24, generator=g)
    up = torch.randn(x.shape, generator=g)
    xr = x.clone().requires_grad_()
    (block(xr) * up).sum().backward()
    want = {n: p.grad.clone() for n, p in block.named_parameters()}

    ep = copy.deepcopy(block)
    ep.zero_grad()
    assert parallelize_experts(ep, 2) == 1
    assert isinstance(ep.experts, ParallelExperts)
    for name in ("gate_up", "down"):
        write_parameter(getattr(ep.experts, name), getattr(block.experts, name).detach())
        assert getattr(ep.experts, name).shape[0] == 2
    xe = x.clone().requires_grad_()
    out = ep(xe)
    (out * up).sum().backward()
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.router.weight.grad, want["router.weight"], rtol=1e-5, atol=1e-6)
    # A rank's experts are reached by both ranks' rows: their gradient is the sum of both references'.
    for name in ("gate_up", "down"):
        full = want[f"experts.{name}"].clone()
        dist.all_reduce(full)
        torch.testing.assert_close(getattr(ep.experts, name).grad, full[2 * rank:2 * rank + 2], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_parallel_experts_compute_the_whole_layer_forward_and_backward(gloo_ranks):
    gloo_ranks(_block_ranks, timeout=300)


def _config(world: int, ep: int, stage: int, **moe):
    return config_from_dict({
        "data": {"train": "unused"}, "cluster": {"workers": world}, "zero": {"stage": stage},
        "train": {"micro_batch_size": GLOBAL // world, "global_batch_size": GLOBAL, "precision": "fp32"},
        "schedule": {"warmup_steps": 1}, "optimizer": {"lr": 3e-3},
        # No auxiliary loss: the balance loss of half a batch is not half the whole batch's, at any EP (plain
        # data parallelism differs from one rank the same way).
        "model": {"type": "mixtral", "n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 48,
                  "vocab_size": VOCAB, "max_seq_len": SEQ, "kernels": "reference",
                  "moe": {"n_experts": 4, "top_k": 2, "aux_loss": 0.0, "expert_parallel": ep, **moe}},
    })


def _train_ranks(rank: int, world: int, ep: int, stage: int, out: str) -> None:
    """STEPS steps on one global batch (rank r takes its rows); rank 0 writes the mean loss and the global
    gradient norm of each step, the shapes of this rank's expert weights and the sizes of the optimizer's parameter
    groups. At EP > 1 the run also saves a checkpoint at step SAVE_AT, and a second engine restored from it takes the
    remaining steps again: their losses too."""
    from pretrain.train import checkpoint as ckpt
    from pretrain.train.build import build_model
    from pretrain.train.engine import backward_and_step, build_engine, clips_itself

    cfg = _config(world, ep, stage)
    mb = GLOBAL // world
    # One global batch, learnt by heart: the loss falls far in ten steps.
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(7))[rank * mb:(rank + 1) * mb]

    def steps(engine, n: int) -> tuple[list[float], list[float]]:
        losses, norms = [], []
        for _ in range(n):
            loss = engine(ids[:, :-1], targets=ids[:, 1:]) / (mb * SEQ)
            norms.append(backward_and_step(engine, loss, cfg.optimizer.grad_clip if clips_itself(cfg) else None))
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
        return losses, norms

    def engine():
        return build_engine(cfg, build_model(cfg, torch.device("cpu"))[0], world, steps=STEPS)

    first = engine()
    saver = None
    if ep > 1:
        where = Path(out).parent / "ckpt"
        saver = ckpt.Checkpointer(ckpt.Storage(str(where)), where.parent / f"staging-{rank}", rank, world)
        losses, norms = steps(first, SAVE_AT)
        saver.save(first, SAVE_AT, {"step": SAVE_AT, "data": {}})
        saver.close()
        more = steps(first, STEPS - SAVE_AT)
        losses, norms = losses + more[0], norms + more[1]
    else:
        losses, norms = steps(first, STEPS)
    experts = {n: list(p.shape) for n, p in first.module.named_parameters() if ".experts." in n}
    partitions = {n: [p.ds_tensor.numel(), p.ds_numel] for n, p in first.module.named_parameters()
                  if ".experts." in n and hasattr(p, "ds_tensor")}  # ZeRO-3: this rank's share, of the whole
    inner = getattr(first.optimizer, "optimizer", first.optimizer)
    groups = [len(pg["params"]) for pg in inner.param_groups]
    resumed = None
    if saver is not None:
        again = engine()
        plan = ckpt.decide(saver.store, None, rank, world, ep=ep)
        with ckpt.opened(plan, saver.staging, rank) as (step_dir, _):
            assert ckpt.load(again, step_dir, rank)["step"] == SAVE_AT
        resumed = steps(again, STEPS - SAVE_AT)[0]
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "norms": norms, "experts": experts, "groups": groups,
                                         "resumed": resumed, "partitions": partitions}))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    """The reference: EP 1 on one rank at ZeRO-0 (on one rank, stages 0-2 step alike)."""
    where = tmp_path_factory.mktemp("one-rank")
    run_gloo_ranks(_train_ranks, 1, 0, str(where / "one.json"), rendezvous=where / "rdzv", world=1, timeout=300)
    return json.loads((where / "one.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 1, 0])
def test_expert_parallel_trains_as_one_rank_does(stage, one_rank, gloo_ranks, tmp_path):
    gloo_ranks(_train_ranks, 2, stage, str(tmp_path / "ep.json"), world=2, timeout=300)
    one, ep = one_rank, json.loads((tmp_path / "ep.json").read_text())
    assert one["losses"][-1] < one["losses"][0] - 0.5, one["losses"]  # it trains
    diff = max(abs(a - b) for a, b in zip(one["losses"], ep["losses"], strict=True))
    assert diff < 1e-4, (diff, one["losses"], ep["losses"])
    # The global gradient norm counts every expert once (and clips: above grad_clip 1.0 at first).
    assert one["norms"][0] > 1.0
    torch.testing.assert_close(torch.tensor(ep["norms"]), torch.tensor(one["norms"]), rtol=1e-4, atol=0)
    # Each EP rank holds two of the four experts of each layer; the whole model holds all four.
    assert one["experts"] and all(shape[0] == 4 for shape in one["experts"].values())
    assert ep["experts"].keys() == one["experts"].keys()
    assert all(ep["experts"][n] == [2, *shape[1:]] for n, shape in one["experts"].items())
    assert len(ep["groups"]) > len(one["groups"])  # the experts' optimizer state in groups of their own
    # Restored from the step-6 checkpoint (both ranks' experts and optimizer state), the run goes on exactly.
    torch.testing.assert_close(torch.tensor(ep["resumed"]), torch.tensor(ep["losses"][SAVE_AT:]), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_zero3_partitions_the_experts_at_expert_parallel_1_and_trains_as_one_rank_does(one_rank, gloo_ranks, tmp_path):
    gloo_ranks(_train_ranks, 1, 3, str(tmp_path / "two.json"), world=2, timeout=300)
    one, two = one_rank, json.loads((tmp_path / "two.json").read_text())
    assert one["losses"][-1] < one["losses"][0] - 0.5, one["losses"]
    diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
    assert diff < 1e-4, (diff, one["losses"], two["losses"])
    # Partitioned like every other weight: each rank keeps half of every expert tensor's elements.
    assert len(two["partitions"]) == 4 and all(2 * mine == whole for mine, whole in two["partitions"].values())


def test_what_cannot_be_spread_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"model.moe.expert_parallel \(3\) must divide model.moe.n_experts \(4\)"):
        _config(3, 3, 2)
    with pytest.raises(ConfigError, match=r"expert_parallel \(2\) must divide cluster.workers: 3 workers"):
        config_from_dict({**_config(2, 2, 2).model_dump(mode="json"), "cluster": {"workers": 3},
                          "train": {"micro_batch_size": 1, "global_batch_size": 3}})
    with pytest.raises(ConfigError, match=r"needs zero.stage 0-2"):
        _config(2, 2, 3)
    # Its checkpoints hold each EP rank's experts: no restart at another size, no EMA of other ranks' experts.
    tree = _config(2, 2, 2).model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"expert_parallel \(2\) resumes only at the same number of workers"):
        config_from_dict({**tree, "cluster": {"workers": 4, "min_workers": 2, "worker_counts": [2, 4]},
                          "train": {**tree["train"], "micro_batch_size": 1}})
    with pytest.raises(ConfigError, match=r"ema.decay with model.moe.expert_parallel \(2\)"):
        config_from_dict({**tree, "ema": {"decay": 0.99}})
    from pretrain.train.expert_parallel import check

    cfg = _config(2, 2, 2)
    with pytest.raises(RunError, match=r"must divide the number of workers \(3\)"):
        check(cfg, 3)
    check(cfg, 4)
