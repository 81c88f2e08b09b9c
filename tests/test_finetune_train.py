"""Fine-tuning a released checkpoint end to end (Ray Train + DeepSpeed, real transformers/peft formats): a tiny
Llama saved by transformers' `save_pretrained`, chat data rendered with its tokenizer's template, LoRA and full
fine-tuning from `init.path`.

- ZeRO 1, 2 and 3 on 2 workers give the losses of ZeRO-0 on 1 worker within 1e-3 at step 10 (LoRA), and so does
  full fine-tuning under ZeRO-3, where the model is built in partitions and the checkpoint streams into them;
- a LoRA run's checkpoints hold the adapters and their optimizer state, not the frozen base;
- `pretrain export --format peft` loads with `peft.PeftModel.from_pretrained` on the transformers model and
  gives our logits within 1e-4; `--format hf` (merged) loads with transformers and gives the same logits;
- `pretrain generate` answers from the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pretrain.launch.local import launch
from pretrain.load import load_config
from tests.helpers import CHAT_WORDS, make_chat_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/finetune-smollm2.yaml"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A tiny Llama (GQA, odd sizes) with its chat tokenizer, as a Hugging Face model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = make_chat_tokenizer(tmp_path_factory.mktemp("released") / "tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=416, hidden_size=96, intermediate_size=264, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)  # tied, as SmolLM2
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sft_data(released, tmp_path_factory) -> Path:
    import numpy as np

    from pretrain.cli.data import app

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("sft")
    lines = []
    for _ in range(240):
        q = " ".join(rng.choice(CHAT_WORDS, int(rng.integers(2, 6))))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"reverse {q}"},
                                              {"role": "assistant", "content": " ".join(q.split()[::-1])}]}))
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["sft", str(root / "chat.jsonl"), "--tokenizer", str(released), "--out",
                                 str(root / "shards"), "--seq-len", "64", "--val-fraction", "0.1"])
    assert r.exit_code == 0, r.output
    return root / "shards"


def _train(tmp_path: Path, released: Path, data: Path, name: str, *extra: str, lora: bool = True) -> list[dict]:
    from pretrain.hub.sources import resolve

    cfg = load_config(CONFIG, [f"run.dir={tmp_path / 'runs'}", f"run.name={name}", f"init.path={released}",
                               f"data.train={data / 'train'}", f"data.val={data / 'val'}", "model.kernels=reference",
                               "model.max_seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
                               "train.steps=10", "schedule.warmup_steps=2", "eval.every=0", "checkpoint.every=5",
                               "eval.batches=1", "log.wandb=false", "lora.rank=4", *extra])
    if not lora:
        cfg.lora = None
    launch(resolve(cfg), started_at=time.time(), quiet=True)
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def test_lora_and_full_finetune_under_zero3_match_zero0(tmp_path, released, sft_data, ray_local):
    base_bytes = (released / "model.safetensors").stat().st_size
    for kind, stages in (("lora", (2, 3)), ("full", (3,))):
        ref = _train(tmp_path, released, sft_data, f"{kind}-z0", "cluster.workers=1", "zero.stage=0", lora=kind == "lora")
        assert ref[-1]["loss"] < ref[0]["loss"], kind  # it learns
        for stage in stages:
            rows = _train(tmp_path, released, sft_data, f"{kind}-z{stage}", "cluster.workers=2", f"zero.stage={stage}",
                          lora=kind == "lora")
            assert [r["step"] for r in rows] == list(range(1, 11))
            assert rows[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-3), (kind, stage)
            assert rows[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5), (kind, stage)  # the same released weights
    summary = json.loads((tmp_path / "runs" / "lora-z3" / "summary.json").read_text())
    assert 0 < summary["params_trainable"] < summary["params"] / 5
    # LoRA checkpoints: the adapters and their Adam moments, not the frozen base; full fine-tuning holds it all.
    lora_ckpt = _size(tmp_path / "runs" / "lora-z3" / "checkpoints" / "step-10")
    full_ckpt = _size(tmp_path / "runs" / "full-z3" / "checkpoints" / "step-10")
    assert lora_ckpt < base_bytes / 2 and full_ckpt > 2 * base_bytes


def test_exports_load_in_transformers_and_peft(tmp_path, released, sft_data, ray_local):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pretrain.cli import app
    from pretrain.trained import loaded

    _train(tmp_path, released, sft_data, "lora", "cluster.workers=2", "zero.stage=2", "optimizer.lr=5e-3")
    run = tmp_path / "runs" / "lora"
    ours = loaded.load(run).model
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(ids)
        base = AutoModelForCausalLM.from_pretrained(released, dtype=torch.float32).eval()
        assert (base(ids).logits - want).abs().max() > 1e-3  # the adapters changed the model

    runner = CliRunner()
    r = runner.invoke(app, ["export", str(run), "--format", "peft", "--out", str(tmp_path / "adapter")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(released.resolve()) and cfg["r"] == 4
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
    assert torch.allclose(peft_logits, want, rtol=1e-4, atol=1e-4)

    r = runner.invoke(app, ["export", str(run), "--format", "hf", "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(merged, want, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()

    # The export refuses to overwrite, in one line.
    r = runner.invoke(app, ["export", str(run), "--format", "hf", "--out", str(tmp_path / "merged")])
    assert r.exit_code == 2 and "exists" in r.output

    r = runner.invoke(app, ["generate", str(run), "--chat", "--prompt", "reverse river stone", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
