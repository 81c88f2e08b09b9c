"""tools/bench_engine_ab.py compares like with like: its bare step and its engine step train the same model
from the same weights on the same batches, so equal losses step after step (the ratio it reports is then
the engine's cost alone)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from bench_engine_ab import steps_of  # noqa: E402

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.max_seq_len=32", "model.vocab_size=50304",
        "train.micro_batch_size=2", "train.global_batch_size=4"]  # two micro-batches: accumulation included


@pytest.mark.parametrize("compiled", [False, True])
def test_bare_and_engine_steps_train_alike(tiny_shards, one_rank_group, compiled):
    data = [f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}"]
    bare, engine = steps_of("configs/gpt-tiny.yaml", [*TINY, *data], compiled, threads=2)
    losses = [(float(bare(i)), float(engine(i))) for i in range(4)]
    for b, e in losses:
        assert b == pytest.approx(e, rel=1e-4), losses
    assert losses[-1][0] < losses[0][0]  # and they train: the same batches come round again, lower
    torch._dynamo.reset()
