"""Run length in tokens or FLOPs (pretrain.length) and the warmup-stable-decay schedule
(pretrain.train.schedule): pure functions, plus the config keys that choose them. No training here; the one
real run with train.tokens and wsd is in tests/test_scaling_ladder.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pretrain.config import ConfigError, ScheduleConfig, TrainConfig
from pretrain.length import LengthError, steps_for
from pretrain.load import config_from_dict, load_config
from pretrain.train.schedule import describe, lr_lambda, warmup_cosine, warmup_stable_decay, wsd_decay_steps

ROOT = Path(__file__).resolve().parents[1]


def test_tokens_and_flops_become_whole_steps():
    assert steps_for(units_per_step=2048, tokens=20480) == 10  # exact: no extra step
    assert steps_for(units_per_step=2048, tokens=20481) == 11  # never less than asked for
    assert steps_for(units_per_step=2048, tokens=1) == 1
    # flops: tokens = flops / FLOPs per token, then as above
    assert steps_for(units_per_step=1024, flops=1e12, flops_per_unit=1.58e6) == math.ceil(1e12 / 1.58e6 / 1024)
    with pytest.raises(LengthError, match="one of train.tokens and train.flops"):
        steps_for(units_per_step=8, tokens=1, flops=1, flops_per_unit=1)
    with pytest.raises(LengthError, match="FLOPs per unit"):
        steps_for(units_per_step=8, flops=1e9, flops_per_unit=None)


def test_length_keys_are_alternatives():
    assert TrainConfig().steps == 100  # nothing given: 100 steps, as before
    t = TrainConfig(tokens=1e6)
    assert t.steps is None and t.tokens == 1e6
    assert TrainConfig.model_validate(t.model_dump()).tokens == 1e6  # a dumped config reloads as it was
    with pytest.raises(ConfigError, match="train: steps and flops are both set: give one run length"):
        config_from_dict({"data": {"train": "d"}, "train": {"steps": 5, "flops": 1e12}})
    # An override of one length replaces the file's (gpt-tiny.yaml gives steps), the last one winning.
    assert load_config(ROOT / "configs/gpt-tiny.yaml", ["train.flops=1e12", "train.steps=5"]).train.flops is None
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", ["train.tokens=5e5"])
    assert cfg.train.steps is None and cfg.train.tokens == 5e5
    with pytest.raises(ConfigError, match="schedule: decay_steps is the cosine horizon"):
        load_config(ROOT / "configs/gpt-tiny.yaml", ["schedule.type=wsd", "schedule.decay_steps=50"])


def test_wsd_boundaries():
    t = ScheduleConfig(warmup_steps=10, type="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    f = lr_lambda(t, 100)
    assert wsd_decay_steps(100, 0.2) == 20
    assert [f(i) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warm-up
    assert all(f(i) == 1.0 for i in range(10, 80))  # stable: the peak up to total - decay
    assert f(80) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 20)))  # the 1-sqrt cooldown's first step
    assert f(99) == pytest.approx(0.1)  # the last step is at the floor
    assert all(f(i) > f(i + 1) for i in range(80, 99))
    # A stable-phase checkpoint at step k serves every longer total: its steps had the same rate.
    g = lr_lambda(t, 300)
    assert all(f(i) == g(i) for i in range(80))
    # No cooldown at fraction 0; a cooldown longer than the run after warm-up starts at warm-up's end.
    assert warmup_stable_decay(99, warmup=10, total=100, decay=0, floor=0.1) == 1.0
    assert warmup_stable_decay(10, warmup=10, total=20, decay=20, floor=0.0) == pytest.approx(1 - math.sqrt(0.1))
    assert describe(t, 3e-4, 100) == {"type": "wsd", "steps": 100, "warmup_steps": 10, "lr": 3e-4, "min_lr_ratio": 0.1,
                                "decay_fraction": 0.2, "decay_steps": 20}


def test_cosine_is_unchanged():
    t = ScheduleConfig(warmup_steps=5, min_lr_ratio=0.1)
    f = lr_lambda(t, 50)
    assert [f(i) for i in range(50)] == [warmup_cosine(i, warmup=5, total=50, floor=0.1) for i in range(50)]
    t = ScheduleConfig(warmup_steps=5, decay_steps=200)  # the horizon, not the run's length
    assert lr_lambda(t, 50)(40) == warmup_cosine(40, warmup=5, total=200, floor=0.1)
    assert describe(t, 1e-3, 50)["decay_steps"] == 200
