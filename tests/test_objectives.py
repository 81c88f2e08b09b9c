"""Objectives: the loss is weighted by units over the global batch, and masked-LM masks are BERT's rule
as a pure function of (seed, sample position).

The weighting test runs the real loop (`pretrain.train.loop.train`) on 2 gloo ranks x 2 accumulation
steps with an objective (registered here) that drops the second half of the targets of some
sequences, and checks the logged loss and gradient norm of step 1 against a computation of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.load import config_from_dict, load_config
from pretrain.objectives import register
from pretrain.objectives.causal_lm import CausalLM
from pretrain.objectives.masked_lm import MaskedLMConfig, mask_tokens

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


@register
class HalfTargetsLM(CausalLM):
    """Causal LM whose sequences at positions p with (p // 4) even lose the second half of their
    targets: micro-batches (4 rows) and ranks then hold different numbers of loss units."""

    name = "test_half_targets"

    def prepare(self, batch, device):
        out = super().prepare(batch, device)
        t = out["targets"].clone()
        drop = (batch["positions"] // 4) % 2 == 0
        t[drop, t.shape[1] // 2:] = IGNORE
        return {**out, "targets": t}


class HalfTargetsConfig(CausalLM.Config):
    type: str = "test_half_targets"


HalfTargetsLM.Config = HalfTargetsConfig


# ----------------------------------------------------------------------------- masking


def test_masking_statistics_match_bert():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (80, 128))  # 10,240 tokens
    inputs, targets = mask_tokens(ids, np.arange(80), 1234, MaskedLMConfig(), 50257, 50257)
    chosen = targets != IGNORE
    assert abs(chosen.mean() - 0.15) < 0.01
    assert (targets[chosen] == ids[chosen]).all() and (inputs[~chosen] == ids[~chosen]).all()
    masked = (inputs == 50257) & chosen
    kept = (inputs == ids) & chosen
    randomised = chosen & ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(randomised.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01


def test_masks_depend_on_seed_and_position_only():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, (16, 64))
    pos = np.arange(100, 116)
    cfg = MaskedLMConfig()
    whole = mask_tokens(ids, pos, 7, cfg, 1000, 1000)
    # The same samples in other batches (another world size or accumulation) and another order: same masks.
    parts = [mask_tokens(ids[s], pos[s], 7, cfg, 1000, 1000) for s in (slice(8, 16), slice(0, 8))]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([parts[1][k], parts[0][k]]), whole[k])
    other_seed = mask_tokens(ids, pos, 8, cfg, 1000, 1000)
    other_pos = mask_tokens(ids, pos + 16, 7, cfg, 1000, 1000)
    assert (other_seed[1] != whole[1]).any() and (other_pos[1] != whole[1]).any()


# ----------------------------------------------------------------------------- loss weighting


def _rank_main(rank: int, world: int, tree: dict) -> None:
    from pretrain.train.loop import train

    train(config_from_dict(tree))


@pytest.mark.slow
def test_loss_is_sum_over_global_batch_divided_by_global_units(tmp_path, tiny_shards, gloo_ranks):
    tiny = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.max_seq_len=32",
            "model.vocab_size=50304", "model.kernels=reference", "train.micro_batch_size=4", "train.global_batch_size=16",
            "cluster.workers=2", "zero.stage=0", "train.steps=1", "eval.every=0", "checkpoint.every=0",
            "log.wandb=false", "objective.type=test_half_targets", "objective.sample_tokens=0"]
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", [*tiny, f"run.dir={tmp_path}", "run.name=w",
                                                       f"data.train={tiny_shards / 'train'}", "data.val=null"])
    (tmp_path / "w").mkdir()
    gloo_ranks(_rank_main, cfg.model_dump(mode="json"), timeout=300, env={"LOCAL_RANK": "0"})
    row = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])

    # Independently: the same initial weights, the global batch of step 1 (positions 0..15), per-token
    # losses in float64, summed and divided by the number of targets kept.
    from pretrain.data import build_train_stream
    from pretrain.models import get_family
    from pretrain.train.build import init_model

    torch.manual_seed(cfg.train.seed)
    model = init_model(get_family("gpt2").build(cfg.model), cfg).double()
    stream = build_train_stream(cfg.data, seed=cfg.train.seed, rank=0, world_size=1, micro_batch_size=16,
                                grad_accum=1)
    batch = next(stream)
    assert batch["positions"].tolist() == list(range(16))
    ids = batch["input_ids"]
    targets = ids[:, 1:].clone()
    targets[(batch["positions"] // 4) % 2 == 0, targets.shape[1] // 2:] = IGNORE
    per_token = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), targets.flatten(),
                                                  ignore_index=IGNORE, reduction="none")
    kept = (targets != IGNORE).sum()
    assert 0 < kept < targets.numel()
    loss = per_token.sum() / kept
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert row["loss"] == pytest.approx(loss.item(), rel=1e-6, abs=1e-6)
    assert row["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    # The check discriminates: a mean of micro-batch means is another number.
    means = [per_token.view(16, -1)[k:k + 4].sum() / (targets[k:k + 4] != IGNORE).sum() for k in range(0, 16, 4)]
    assert abs(torch.stack(means).mean().item() - loss.item()) > 1e-3
