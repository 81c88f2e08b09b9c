"""Config loading, overrides and validation; the CLI's one-line errors with nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, grad_accum_steps, worker_counts
from pretrain.load import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"gpt-tiny.yaml", "gpt2-124m.yaml", "llama-1b.yaml", "llama-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * cfg.cluster.workers) == 0
    assert grad_accum_steps(cfg) >= 1


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", ["train.steps=12", "zero.stage=3", "train.precision=fp32",
                                                        "run.name=x", "data.train=/a/b"])
    assert cfg.train.steps == 12 and cfg.zero.stage == 3 and cfg.run.name == "x"
    assert [s.path for s in cfg.data.train] == ["/a/b"]


def test_mixture_sources():
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", ["data.train=[{path: a, weight: 0.7}, {path: b, weight: 0.3}]"])
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 0.7), ("b", 0.3)]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_layers=abc", "model.n_layers"),
        ("train.stepz=5", "train.stepz"),
        ("zero.stage=4", "zero.stage"),
        ("train.precision=fp8", "train.precision"),
        ("nosection.x=1", "nosection"),
        ("train.global_batch_size=15", "train.global_batch_size"),
        ("model.n_heads=5", "model.n_heads"),
        # Seeds are unsigned 32-bit; no float in the tree is NaN or infinite; AdamW betas lie in [0, 1).
        ("train.seed=-1", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
        ("optimizer.betas=[0.9,nan]", "optimizer.betas"),
        ("model.init_std=inf", "model.init_std"),
        ("data.train=[{path: a, weight: .nan}]", "data.train.weight"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/gpt-tiny.yaml", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_seed_and_beta_bounds_are_inclusive_where_they_should_be():
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", ["train.seed=0", "optimizer.betas=[0.0, 0.999]"])
    assert cfg.train.seed == 0 and cfg.optimizer.betas == (0.0, 0.999)
    assert load_config(ROOT / "configs/gpt-tiny.yaml", ["train.seed=4294967295"]).train.seed == 2**32 - 1


def test_missing_file_and_bad_override_form():
    with pytest.raises(ConfigError, match="not found"):
        load_config(ROOT / "configs/nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(ROOT / "configs/gpt-tiny.yaml", ["train.steps"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _refused(config: str, tmp_path: Path, *overrides: str) -> str:
    """`pretrain train configs/<config>` with overrides: exit 2, one line on stderr, no run directory; the line."""
    runs = tmp_path / "runs"
    r = _cli("train", str(ROOT / "configs" / config), f"run.dir={runs}", "run.name=bad", *overrides, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert not runs.exists()
    return lines[0]


@pytest.mark.parametrize(
    "override, expect",
    [("model.n_layers=abc", "model.n_layers"), ("train.stepz=5", "train.stepz"),
     ("data.train=/nonexistent/shards", "/nonexistent/shards"),
     # The objective's checks, before any worker starts:
     ("model.vocab_size=1000", "model.vocab_size (1000) is smaller than the data's tokenizer vocabulary (50257)"),
     ("model.max_seq_len=16", "model.max_seq_len (16)"),
     ("objective.type=masked_lm", "model.causal"),
     # The registries list what exists; renamed keys say what they are called now.
     ("model.type=mamba", "model.type 'mamba' is not registered (registered: bert, dit, gpt2, llama, mixtral, olmoe, qwen2_moe, qwen3_moe)"),
     ("objective.type=dpo", "registered: causal_lm, ddpm, masked_lm, rectified_flow"),
     ("model.family=gpt2", "model.family is now called model.type"),
     ("train.sample_tokens=8", "objective.sample_tokens"),
     # Keys that moved out of `train` into sections of their own:
     ("train.lr=0.1", "train.lr is now optimizer.lr"),
     ("train.ckpt_every=5", "train.ckpt_every is now checkpoint.every")],
)
def test_cli_errors_exit_2_with_one_line_and_no_run_dir(tmp_path, tiny_shards, override, expect):
    line = _refused("gpt-tiny.yaml", tmp_path, f"data.train={tiny_shards / 'train'}",
                    f"data.val={tiny_shards / 'val'}", "model.vocab_size=50304", override)
    assert expect in line


def test_cli_refuses_a_negative_seed_before_ray(tmp_path):
    """A bad value fails in the config, before preflight or Ray: no shards are needed to see it."""
    line = _refused("gpt-tiny.yaml", tmp_path, "train.seed=-1")
    assert line.startswith("error: train.seed:"), line


# configs/dit-fashion.yaml with a model or objective that does not fit its images.
DIFFUSION_ERRORS = [
    ("model.input_size=30", "model.input_size (30) is not divisible by model.patch_size (4)"),
    ("model.num_classes=5", "model.num_classes (5) is smaller than the data's 10 classes"),
    ("model.in_channels=3", "model.in_channels (3) does not match the data's 1 channels"),
    ("model.input_size=24", "model.input_size (24) is smaller than the data's 28x28 images"),
    ("objective.sampler=ddim", "objective.sampler"),
    ("model.learn_sigma=true", "objective.type=rectified_flow does not learn a variance"),
]


def test_cli_refuses_another_data_kind(tmp_path):
    """Image shards given to a token objective: one line naming the objective and both kinds."""
    import numpy as np
    from PIL import Image

    from pretrain.data.write_images import write_images

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((4, 4), 40 * i, dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    write_images(str(tmp_path / "imgs"), out=tmp_path / "img-shards", shard_samples=4, val_fraction=0.25)
    line = _refused("gpt-tiny.yaml", tmp_path, f"data.train={tmp_path / 'img-shards' / 'train'}", "data.val=null")
    assert line == "error: objective.type=causal_lm reads tokens shards, but data.train holds images shards"


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """Fashion-MNIST-like shards: random 28x28 images, labels 0..9."""
    from tests.data.test_image_stream import write_idx_source

    return write_idx_source(tmp_path_factory.mktemp("images"), 40, 20, 28, seed=0)


@pytest.mark.parametrize("override, expect", DIFFUSION_ERRORS)
def test_cli_diffusion_errors(tmp_path, image_shards, override, expect):
    assert expect in _refused("dit-fashion.yaml", tmp_path, f"data.train={image_shards / 'train'}",
                              f"data.val={image_shards / 'val'}", override)


def test_cli_refuses_token_shards_for_a_dit(tmp_path, tiny_shards):
    line = _refused("dit-fashion.yaml", tmp_path, f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}")
    assert line == "error: objective.type=rectified_flow reads images shards, but data.train holds tokens shards"


# ----------------------------------------------------------------------------- elastic worker counts


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_restarts_at_every_allowed_size(path):
    """Each group size an elastic restart may get divides the global batch by the micro-batch."""
    cfg = load_config(path)
    sizes = worker_counts(cfg)
    assert sizes[-1] == cfg.cluster.workers and sizes[0] == (cfg.cluster.min_workers or cfg.cluster.workers)
    assert all(cfg.train.global_batch_size % (cfg.train.micro_batch_size * n) == 0 for n in sizes)


@pytest.mark.parametrize(
    "overrides, expect",
    [(["cluster.min_workers=48"],  # the llama-7b setting issue 13 found: no size from 48 to 63 divides 1024
      "cluster.min_workers=48: 48 workers do not divide train.global_batch_size (1024) by train.micro_batch_size (1)"),
     (["cluster.min_workers=32"], "cluster.min_workers=32: 33 workers do not divide"),
     (["cluster.min_workers=32", "cluster.worker_counts=[32, 48, 64]"], "cluster.worker_counts: 48 workers do not"),
     (["cluster.min_workers=32", "cluster.worker_counts=[64]"],
      "cluster.worker_counts [64] must include cluster.min_workers (32) and cluster.workers (64)"),
     (["cluster.worker_counts=[32]"], "must include cluster.min_workers (64) and cluster.workers (64)"),
     (["cluster.min_workers=32", "cluster.worker_counts=[0, 32, 64]"], "cluster.worker_counts")],
)
def test_elastic_sizes_that_do_not_divide_are_named(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/llama-7b.yaml", overrides)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_listed_worker_counts_bound_the_elastic_range():
    cfg = load_config(ROOT / "configs/llama-7b.yaml", ["cluster.min_workers=32", "cluster.worker_counts=[128, 64, 32]"])
    assert worker_counts(cfg) == [32, 64]  # 128 divides, but lies above cluster.workers
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", ["cluster.min_workers=1"])
    assert worker_counts(cfg) == [1, 2]


def test_cli_refuses_a_non_dividing_elastic_range(tmp_path):
    """gpt-tiny on 4 workers, micro-batch 1, global 8, elastic from 2: 3 workers cannot split 8 sequences."""
    line = _refused("gpt-tiny.yaml", tmp_path, "cluster.workers=4", "train.micro_batch_size=1",
                    "train.global_batch_size=8", "cluster.min_workers=2")
    assert line == ("error: cluster.min_workers=2: 3 workers do not divide train.global_batch_size (8) by "
                    "train.micro_batch_size (1)")


def test_documented_slurm_examples_validate():
    """Every `sbatch --nodes=N cluster/slurm.sbatch CONFIG` in the script and its README, at N x 8 workers
    (what the script passes), loads: an example never starts Ray only to fail on its own config."""
    text = (ROOT / "cluster" / "slurm.sbatch").read_text() + (ROOT / "cluster" / "README.md").read_text()
    examples = re.findall(r"sbatch --nodes=(\d+) cluster/slurm\.sbatch (configs/\S+\.yaml)", text)
    assert len(examples) >= 2
    for nodes, config in examples:
        load_config(ROOT / config, [f"cluster.workers={int(nodes) * 8}"])


def test_every_moved_train_key_says_where_it_lives_now(tmp_path):
    """Each key that left `train` (in a YAML file or as an override) gives one line naming its new home, and
    the new home holds the value that was given."""
    from pretrain.config import MOVED

    base = (ROOT / "configs/gpt-tiny.yaml").read_text()
    values = {"betas": "[0.9, 0.99]", "schedule": "wsd", "branch_from": "runs/x", "init_from": "runs/y",
              "ema_warmup": "true", "ema_decay": "0.99", "min_lr_ratio": "0.2", "decay_fraction": "0.3",
              "grad_clip": "0.5", "weight_decay": "0.01", "lr": "0.002", "ckpt_keep": "2", "ckpt_keep_every": "4",
              "warmup_steps": "3", "decay_steps": "30", "eval_every": "7", "eval_batches": "2", "ckpt_every": "9"}
    assert {k.split(".")[1] for k in MOVED} == set(values)
    for old, new in MOVED.items():
        key, value = old.split(".")[1], values[old.split(".")[1]]
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "configs/gpt-tiny.yaml", [f"{old}={value}"])
        assert str(e.value) == f"{old} is now {new}"
        f = tmp_path / f"{key}.yaml"
        f.write_text(base.replace("train:\n", f"train:\n  {key}: {value}\n", 1))
        with pytest.raises(ConfigError) as e:
            load_config(f)
        assert str(e.value) == f"{old} is now {new}"
        section, field = new.split(".")
        given = load_config(ROOT / "configs/gpt-tiny.yaml", [f"{new}={value}"])
        import yaml

        assert getattr(getattr(given, section), field) == (tuple(yaml.safe_load(value)) if key == "betas"
                                                            else yaml.safe_load(value))
